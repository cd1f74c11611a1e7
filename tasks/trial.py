"""Search trials: one training of one sampled config, tracked as a nested MLflow run.

A trial never raises: a failure is recorded (FAILED child run, reason tag) and returned as data,
so one bad corner of a search space cannot stop the search.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from babysit import tracking
from babysit.config import Config, result_identity, with_values
from babysit.errors import BabysitError
from babysit.flags import run_flags
from babysit.pruning import Pruner, SharedReports
from tasks.preprocess import Prepared
from tasks.track import flag_tags, flags_from_tags, log_outcome, outcome_metrics, run_status
from tasks.train import train_and_test


@dataclass(frozen=True)
class TrialSpec:
    stage: str
    index: int  # position within its stage
    params: dict[str, Any]  # searched field -> value
    config: dict[str, Any]  # the full resolved training config (plain data)
    key: str  # deterministic: hash of config and stage


@dataclass
class TrialResult:
    key: str
    stage: str
    index: int
    params: dict[str, Any]
    status: str  # finished | diverged | pruned | failed
    val_acc: float | None  # best validation accuracy; None when the trial failed
    epochs_run: int = 0
    flags: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why it stopped early or failed
    run_id: str | None = None
    seconds: float = 0.0
    test_acc: float = math.nan  # final stage only
    reused: bool = False  # found finished in MLflow by a resumed search


def make_spec(base: dict[str, Any], stage: str, index: int, params: dict[str, Any], epochs: int, threads: int | None, device: str | None,
              data_version: str = "") -> TrialSpec:
    """A trial of `stage`: `params` set on the config tree `base`. Its key hashes the config and
    stage, and `data_version` (tasks.data.data_fingerprint: user files that may have changed in place)."""
    overrides = {**params, "train.epochs": epochs}
    if threads:
        overrides["train.threads"] = threads
    if device:
        overrides["train.device"] = device
    config = Config.model_validate(with_values(base, overrides)).model_dump(mode="json")
    keyed = result_identity(config, data_version)
    digest = hashlib.sha1(json.dumps([stage, keyed, data_version] if data_version else [stage, keyed], sort_keys=True).encode()).hexdigest()[:16]
    return TrialSpec(stage, index, {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}, config, digest)


def run_trial(spec: TrialSpec, prepared: Prepared, parent: tracking.RunRef, pruner: Pruner | None = None, final: bool = False, raw_example: Any = None,
              stopped: Callable[[], bool] | None = None) -> TrialResult:
    """Train one trial under a nested MLflow run. Only the final stage reads the test split.
    `stopped` (worker processes) is asked after each epoch whether the search was interrupted."""
    started = time.perf_counter()
    cfg = Config.model_validate(spec.config)
    tags = {"babysit.stage": spec.stage, "babysit.trial_key": spec.key, "babysit.trial_index": str(spec.index)}
    run = tracking.start_run(parent.uri, cfg.tracking.experiment, f"{spec.stage}-{spec.index:03d}", cfg.flat(), tags, parent=parent)

    metrics_out = tracking.MetricBuffer(run, cfg.tracking.flush_seconds)
    best_val_acc = -math.inf

    def on_epoch(epoch: int, metrics: dict[str, float]) -> str | None:
        nonlocal best_val_acc
        metrics_out.log(metrics, step=epoch)
        if stopped is not None and stopped():
            raise KeyboardInterrupt("the search was interrupted")
        if math.isfinite(metrics["val_acc"]):
            best_val_acc = max(best_val_acc, metrics["val_acc"])
        return pruner.report(epoch, metrics["val_acc"], best_val_acc if math.isfinite(best_val_acc) else None) if pruner is not None else None

    try:
        result, model = train_and_test(cfg, prepared, on_epoch, test=final)
        flags = run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, n_classes=prepared.splits.n_classes,
                          base_lr=cfg.optim.lr, transferred=bool(cfg.model.init_from), majority_share=prepared.splits.majority_share)
        reason = result.stop_reason
        status = run_status(flags, reason)
        if final:
            metrics_out.flush()
            log_outcome(run, cfg, result, flags, prepared, model=model, raw_example=raw_example)
        else:
            metrics_out.log(outcome_metrics(result), step=result.epochs_run)
        metrics_out.flush(tags={**flag_tags(flags), "babysit.status": status, "babysit.stop_reason": reason or "completed"})
        tracking.end_run(run, "FINISHED")
    except Exception as err:  # recorded, never raised: the search goes on
        reason = tracking.failure_reason(err)
        metrics_out.flush(tags={"babysit.status": "failed", "babysit.failure": reason})
        tracking.end_run(run, "FAILED")
        return TrialResult(spec.key, spec.stage, spec.index, spec.params, "failed", None, reason=reason, run_id=run.run_id, seconds=time.perf_counter() - started)
    except BaseException as err:
        metrics_out.flush(tags={"babysit.status": "failed", "babysit.failure": tracking.failure_reason(err)})
        tracking.end_run(run, "FAILED")
        raise
    val_acc = result.best_val_acc if status != "diverged" else None
    return TrialResult(
        spec.key, spec.stage, spec.index, spec.params, status, None if val_acc is None or math.isnan(val_acc) else val_acc,
        result.epochs_run, flags, reason, run.run_id, time.perf_counter() - started, result.test_acc,
    )


def result_from_run(run: Any, spec: TrialSpec) -> TrialResult:
    """Rebuild a finished trial's result from its MLflow run (a resumed search)."""
    tags, metrics = run.data.tags, run.data.metrics
    flags = flags_from_tags(tags)
    val_acc = metrics.get("best_val_acc")
    status = tags.get("babysit.status", "finished")
    return TrialResult(
        spec.key, spec.stage, spec.index, spec.params, status,
        None if status == "diverged" or val_acc is None or math.isnan(val_acc) else val_acc,
        int(metrics.get("epochs_run", 0)), flags, None if tags.get("babysit.stop_reason") == "completed" else tags.get("babysit.stop_reason"), run.info.run_id,
        float(metrics.get("train_seconds", 0.0)), metrics.get("test_acc", math.nan), reused=True,
    )


def gpu_for(device: str, slot: int) -> str | None:
    """Round-robin over the GPUs: the one for `slot` (a trial's index, or a worker process's
    number) when training would go to CUDA (`auto` or `cuda`) and there are several; None keeps
    `device` (one GPU, the CPU, or a GPU the config names)."""
    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if device in ("auto", "cuda") and count > 1 else None


def on_slot(spec: TrialSpec, slot: int) -> TrialSpec:
    """`spec` trained on worker process `slot`'s GPU: each worker keeps to one, so `workers` trials
    share G GPUs evenly however their trials finish (workers / G at a time on each)."""
    device = gpu_for(spec.config["train"]["device"], slot)
    if device is None:
        return spec
    return replace(spec, config={**spec.config, "train": {**spec.config["train"], "device": device}})


_WORKER: dict[str, Any] = {}  # in a worker process: the search's data, pruning reports, stop flag and slot number, set once by _start_worker


def _start_worker(prepared: Prepared, reports: SharedReports, stop: Any, slots: Any) -> None:
    import signal

    # Ctrl-C reaches the whole process group. A worker interrupted at a random point can die
    # holding the pool's result-queue lock, and the pool then waits for it forever; the flow
    # stops its workers instead, through `stop`, which they read between epochs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # and SIGTERM, which `timeout`, systemd and process managers send to the whole group: the flow's
    # process turns it into an interruption (Prefect's handler, which a fork would otherwise inherit
    # and raise in the middle of a trial, with a traceback)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal hangs up the whole group too: the flow stops them, as for Ctrl-C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if sys.platform == "linux":
        # die with the flow's process, kill -9 included: an orphan that went on to finish its
        # trial would add a second finished run to a key the resumed search runs again
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    tracking.forget_connections_after_fork()
    with slots.get_lock():  # this worker's number: 0, 1, ... in the order they start
        slot, slots.value = slots.value, slots.value + 1
    _WORKER.update(prepared=prepared, reports=reports, stop=stop, slot=slot)


def _trial_in_worker(spec: TrialSpec, parent: tracking.RunRef, pruner: Pruner | None, final: bool = False, raw_example: Any = None) -> TrialResult:
    if _WORKER["stop"].is_set():  # queued before the search was interrupted
        raise KeyboardInterrupt("the search was interrupted")
    if pruner is not None and pruner.detached:
        pruner.attached(_WORKER["reports"])
    return run_trial(on_slot(spec, _WORKER["slot"]), _WORKER["prepared"], parent, pruner, final, raw_example, stopped=_WORKER["stop"].is_set)


def forks_workers() -> bool:
    """Whether worker_processes forks (Linux, before this process has initialized CUDA)."""
    return sys.platform == "linux" and not torch.cuda.is_initialized()


@contextmanager
def worker_processes(workers: int, prepared: Prepared, start_method: str | None = None, epochs: int = 0, trials: int = 0) -> Iterator[tuple[ProcessPoolExecutor, SharedReports]]:
    """`workers` trial processes for a whole search, and the shared memory through which their
    trials prune: room for `trials` reports at each of `epochs` epochs (a stage's most).

    Small-model training holds the GIL for most of each step (two trials in two threads ran no
    faster than one after the other, bench/search_throughput.py), so parallel trials need
    processes. On Linux they are forked from the flow's process: no re-imports, and the data
    reaches them by inheritance instead of being pickled per trial. They start here, from the
    flow's thread, before any trial runs (a fork copies locks held by other threads). Elsewhere
    (macOS, Windows), or once this process has initialized CUDA (which a forked child cannot use),
    they are spawned and get the data once each.
    """
    fork = forks_workers()
    if fork:  # a process's first optimizer imports torch._dynamo (~2 s); import it once here, not once per worker
        importlib.import_module("torch._dynamo")
    context = multiprocessing.get_context(start_method or ("fork" if fork else "spawn"))
    reports = SharedReports(context, epochs, trials)
    stop = context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(prepared, reports, stop, context.Value("i", 0)))
    try:
        list(pool.map(abs, range(workers)))  # start every worker now
        yield pool, reports
    except BaseException:  # Ctrl-C, or the flow failed: running trials end at their next epoch, queued ones never start
        stop.set()
        pool.shutdown(cancel_futures=True)
        raise
    # idle, they exit on their own (Python joins them at its exit at the latest): ~0.02 s a search not waited for
    pool.shutdown(wait=False)


@contextmanager
def stop_flag() -> Iterator[threading.Event]:
    """A flag that trials in this process's threads (runner: threads) read after each epoch, set
    when the search leaves the block by an exception (Ctrl-C, a failed flow): enter it inside the
    task runner, which on exit waits for the trials it is running."""
    stop = threading.Event()
    try:
        yield stop
    except BaseException:
        stop.set()
        raise


@task(name="trial", task_run_name="{spec.stage}-{spec.index:03d}", cache_policy=NO_CACHE)  # as its MLflow run
def trial_task(
    spec: TrialSpec, prepared: Prepared, parent: tracking.RunRef, pruner: Pruner | None = None, final: bool = False,
    raw_example: Any = None, pool: ProcessPoolExecutor | None = None, stop: threading.Event | None = None,
) -> TrialResult:
    """One trial, here or (given `pool`, see worker_processes) in a worker process while this task
    waits. Here, a set `stop` (stop_flag) ends it at its next epoch."""
    if pool is not None:
        try:
            return pool.submit(_trial_in_worker, spec, parent, pruner, final, raw_example).result()
        except BrokenProcessPool:
            raise BabysitError(
                f"trial {spec.stage}-{spec.index:03d}: a worker process of this search died (killed, or out of memory). "
                f"Trials that finished are kept in MLflow and reused when the search runs again; with less memory "
                f"try search.workers=1, or search.runner=threads."
            ) from None
        except (CancelledError, RuntimeError) as err:  # after BrokenProcessPool, a RuntimeError too
            if isinstance(err, RuntimeError) and "shutdown" not in str(err):
                raise
            raise BabysitError(f"trial {spec.stage}-{spec.index:03d}: not run, the search was interrupted") from None
    return run_trial(spec, prepared, parent, pruner, final, raw_example, stopped=stop.is_set if stop is not None else None)
