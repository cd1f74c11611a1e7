"""search_flow: the lecture's coarse-to-fine random search, stage by stage.

Each stage samples its trials from the current space and runs them concurrently as Prefect
tasks; the next stage's space narrows around the top-k trials, or moves past an edge where the
best value sat. A final stage retrains the best config longer and reads the test set, once.
Re-running the same search resumes it: finished trials are found in MLflow by their key.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from typing import NoReturn

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from babysit import plots, recurring, scaleout, tracking
from babysit.owners import alive_here, gone_here, process_identity
from babysit.advice import search_advice
from babysit.errors import BabysitError
from babysit.config import Config, SearchExperiment, field_problem, load_config, reads_field, result_identity, shortest_stage, with_values
from babysit.provenance import provenance_tags
from babysit.pruning import Pruner
from babysit.space import Narrowing, describe, edge_band, edge_side, grid_shortfall, inside_declared, narrow, parse_dist, sample
from models.transfer import load_source
from tasks.check import overfit_tiny_subset
from tasks.data import data_fingerprint, load_data_task
from tasks.preprocess import Prepared, preprocess_task
from tasks.train import pick_device, training_device, transfer_source
from tasks.trial import TrialResult, TrialSpec, forks_workers, gpu_for, make_spec, result_from_run, stop_flag, trial_task, worker_processes


@dataclass(frozen=True)
class SearchSummary:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    best_params: dict
    best_val_acc: float | None
    final_val_acc: float | None
    test_acc: float | None
    edges: list[str]  # 'edge:<field>=low|high', one per stage where it happened
    ranges: dict[str, dict[str, str]]  # stage -> field -> distribution it sampled from
    trials_run: int
    trials_reused: int
    url: str
    changes: tuple[str, ...] = ()  # since the latest finished run of this search (babysit.recurring)
    advice: str = ""  # report.md: per stage what happened to the trials, which ranges to move


def trials_frame(results: list[TrialResult]) -> pd.DataFrame:
    """One row per trial: stage, status, val_acc, flags, and `param.<field>` per searched field."""
    rows = []
    for r in results:
        row = {"stage": r.stage, "index": r.index, "trial_key": r.key, "status": r.status, "val_acc": r.val_acc, "epochs_run": r.epochs_run,
               "flags": ",".join(sorted(r.flags)), "reason": r.reason, "seconds": r.seconds, "reused": r.reused, "run_id": r.run_id}
        row.update({f"param.{k}": (str(v) if isinstance(v, list) else v) for k, v in r.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def search_hash(exp: SearchExperiment, data_version: str = "") -> str:
    """Identifies a search's definition, and the version of its data (tasks.data.data_fingerprint): a
    changed file, or data rewritten in place, starts a new parent run instead of resuming."""
    # where trials run (workers, runner) does not change results, as where one trains does not (trial keys)
    tree = result_identity(exp.model_dump(mode="json", exclude={"search": {"workers", "runner", "dask_address"}}), data_version)
    # as parsed: loguniform(1e-4, 1e-1) and loguniform(0.0001, 0.1) are one range
    # in the file's order, which the samplers follow: the same ranges in another order sample other trials
    tree["search"]["space"] = [[field, dist.kind, dist.low, dist.high, dist.options] for field, dist in
                               ((field, parse_dist(field, spec)) for field, spec in exp.search.space.items())]
    if data_version:  # in place of the path, as in trial keys
        tree["data_version"] = data_version
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


RECURRENCE_TAGS = {"babysit.schedule", "babysit.scheduled_for", "babysit.warm_from"}  # recurrence_of's


def open_parent(exp: SearchExperiment, uri: str, named: list, recurrence: dict[str, str] | None = None, run_name: str | None = None,
                data_version: str = "") -> tuple[tracking.RunRef, dict[str, object], object | None]:
    """Create the parent run, or reopen the latest one of the same search among `named` (the
    parent runs of this search's name, newest first: recurrence_of); return it with the
    finished trial runs it can reuse by trial key, and the earlier run it reopened (None: a new
    run). Children left RUNNING by a killed process become FAILED. `recurrence` (babysit.recurring)
    tells a scheduled or warm-started run from earlier ones.

    Trials of earlier runs of the same name whose file differed are reused too (newest first): a
    trial's key is its whole config, stage and seed, so an edited file reruns only the trials it
    changed. Not for scheduled runs (each night searches afresh), nor trials pruned there
    (pruning judged them against that run's stage-mates)."""
    experiment_id = tracking.open_store(uri, exp.tracking.experiment)
    identity = {"babysit.kind": "search", "babysit.search_name": exp.name, "babysit.search_hash": search_hash(exp, data_version), **(recurrence or {})}
    # a run by hand never takes over a scheduled one, nor one warm-started from another run: all of these tags must agree
    previous = [run for run in named if all(run.data.tags.get(k) == identity.get(k) for k in identity.keys() | RECURRENCE_TAGS)] if exp.search.resume else []
    owner = {"babysit.owner": process_identity()}  # the process running the search: another one must not resume it meanwhile
    # the run this one would resume, or (by hand) an earlier run whose trials it would reuse or train again
    shared = previous[:1] + ([run for run in named if "babysit.schedule" not in run.data.tags] if "babysit.schedule" not in identity else [])
    refuse_if_running(exp.name, shared)
    if previous:
        # its edges are written afresh when it ends: a field whose edge this run does not reach keeps no tag of the last one
        parent = tracking.reopen_run(uri, previous[0], stale=("edge.", "babysit.flags"))
        tracking.set_tags(parent, {**owner, **provenance_tags(exp)})  # the flow run (and commit) that finishes it
        finished = finished_trials(uri, experiment_id, [parent.run_id], own=True)
    else:
        versioned = {"babysit.data_version": data_version} if data_version else {}
        parent = tracking.start_run(uri, exp.tracking.experiment, run_name or exp.tracking.run_name or exp.name, parent_params(exp),
                                    {**identity, **versioned, **provenance_tags(exp), **owner})
        finished = {}
    if exp.search.resume and "babysit.schedule" not in identity:
        earlier = [run.info.run_id for run in named if run.info.run_id != parent.run_id and "babysit.schedule" not in run.data.tags]
        for key, run in finished_trials(uri, experiment_id, earlier, pruned=False).items():
            finished.setdefault(key, run)
    return parent, finished, previous[0] if previous else None


def parent_params(exp: SearchExperiment) -> dict[str, object]:
    """The parent run's params: the file's settings, where a searched field's is its range, not
    the file's base value (QA: optim.lr=0.001 read as the search's rate)."""
    params = {**exp.flat(), **{field: f"searched: {spec}" for field, spec in exp.search.space.items()}}
    if lr_follows_searched_name(exp):  # not the base optimizer's default, which a trial of another optimizer never trained at (QA)
        params["optim.lr"] = "unset: the default of each trial's optim.name"
    return params


def refuse_if_running(name: str, runs: list) -> None:
    """A BabysitError when one of a search's parent `runs` is RUNNING in a live process of this machine."""
    if held := [run for run in runs if run.info.status == "RUNNING" and alive_here(run.data.tags.get("babysit.owner", ""))]:
        _, pid, _ = held[0].data.tags["babysit.owner"].rsplit(":", 2)
        raise BabysitError(f"search {name} is running now, in process {pid} on this machine (MLflow run {held[0].info.run_id}): "
                           "two runs of one search would train its trials twice. Wait for it to end, or stop it (Ctrl-C) and run "
                           "the command again to resume it.")


def check_not_running(exp: SearchExperiment) -> None:
    """`babysit search`, before Prefect's server starts: a search by hand that runs now in another
    process is refused at once, not ~20 s later (QA). open_parent refuses it again, for deployments."""
    uri = tracking.resolve_uri(exp.tracking.uri)
    if (db := tracking.sqlite_path(uri)) is not None and not db.exists():  # a new store: nothing runs in it
        return
    named = tracking.find_runs(uri, tracking.open_store(uri, exp.tracking.experiment), {"babysit.kind": "search", "babysit.search_name": exp.name})
    refuse_if_running(exp.name, [run for run in named if "babysit.schedule" not in run.data.tags])  # as open_parent's by hand


def fail_abandoned(uri: str, named: list, keep: str) -> set[str]:
    """Mark FAILED the parent runs among `named` (but `keep`, the one this search resumes) that a
    killed process of this machine left RUNNING, and their trials left RUNNING with them; their
    ids. A rerun with an edited file starts a new parent, and nothing else would end them."""
    ended = set()
    for run in named:
        if run.info.status == "RUNNING" and run.info.run_id != keep and gone_here(run.data.tags.get("babysit.owner", "")):
            finished_trials(uri, run.info.experiment_id, [run.info.run_id], own=True)  # its RUNNING trials become FAILED
            tracking.fail(tracking.RunRef(uri, run.info.run_id, run.info.experiment_id), "interrupted: its process is gone")
            ended.add(run.info.run_id)
    return ended


def finished_trials(uri: str, experiment_id: str, parent_ids: list[str], own: bool = False, pruned: bool = True) -> dict[str, object]:
    """The FINISHED trial runs of the parents `parent_ids` by trial key (without `pruned`, not the
    trials pruned there); a key found under several parents is taken from the first. With `own`
    (the search's own parent, reopened), its children left RUNNING by a killed process are marked
    FAILED; another search's are left alone, as they may be training right now."""
    finished: dict[str, object] = {}
    for parent_id in parent_ids:
        for child in tracking.find_runs(uri, experiment_id, {"mlflow.parentRunId": parent_id}, newest_first=False):
            if own and child.info.status == "RUNNING":
                tracking.mark_failed(uri, child.info.run_id, "interrupted: found RUNNING when the search was resumed", experiment_id)
            elif child.info.status == "FINISHED" and (pruned or child.data.tags.get("babysit.status") != "pruned"):
                finished.setdefault(child.data.tags.get("babysit.trial_key", ""), child)
    return finished


def submit_trial(runner, spec: TrialSpec, prepared: Prepared, parent: tracking.RunRef, pruner: Pruner | None, pool, final: bool = False, raw_example=None, stop=None):
    """One trial task on `runner` (entered; shared by the stages: a Dask cluster starts once per
    search). With `pool` (runner: processes) the task hands its training to a worker process;
    with `stop` (runner: threads, tasks.trial.stop_flag) it trains here until the flag is set."""
    arguments = {"spec": spec, "prepared": prepared, "parent": parent, "pruner": pruner, "pool": pool, "final": final, "raw_example": raw_example}
    if stop is not None:
        arguments["stop"] = stop
    if isinstance(runner, ThreadPoolTaskRunner):  # not Dask: it would hand its workers the quotes themselves
        # quoted, Prefect does not walk every trial's data and config looking for futures
        arguments = {name: quote(value) for name, value in arguments.items()}
    return runner.submit(trial_task, arguments)


def run_stage(specs: list[TrialSpec], finished: dict, prepared: Prepared, parent: tracking.RunRef, pruner: Pruner, runner, pool=None, stop=None) -> list[TrialResult]:
    """Reuse finished trials; run the others `workers` at a time through the search's task runner."""
    reused = {s.key: result_from_run(finished[s.key], s) for s in specs if s.key in finished}
    todo = [s for s in specs if s.key not in reused]
    if todo and pruner.rule != "none" and isinstance(runner, ThreadPoolTaskRunner):  # Dask's workers never prune
        for result in reused.values():  # the trials they ran beside the first time
            pruner.replay(tracking.metric_history(parent.uri, result.run_id, "val_acc"))
    futures = [submit_trial(runner, s, prepared, parent, pruner, pool, stop=stop) for s in todo]
    fresh = {s.key: f.result() for s, f in zip(todo, futures)}
    return [reused.get(s.key) or fresh[s.key] for s in specs]


def numeric_choice_warnings(exp: SearchExperiment) -> list[str]:
    """A choice of numbers is a grid along its field: nothing narrows between its values, nor moves
    past its ends (QA: every trial barely learned at the larger of two rates, and no edge was said)."""
    warnings = []
    for field, spec in exp.search.space.items():
        dist = parse_dist(field, spec)
        options = dist.options or ()
        if not dist.numeric and len(options) > 1 and all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options):
            warnings.append(f"search.space `{field}` ~ {dist.describe()}: a choice of numbers searches those values only; the stages neither narrow "
                            "between them nor move past the largest or smallest, and a best value at either end is not flagged as an edge: "
                            "use loguniform, uniform or int(low, high) to let them")
    return warnings


def lr_follows_searched_name(exp: SearchExperiment) -> bool:
    """optim.lr left unset, optim.name searched: each trial trains at its own optimizer's default rate (trial_base)."""
    return exp.optim.lr_follows_name and "optim.name" in exp.search.space and "optim.lr" not in exp.search.space


def init_sources(exp: SearchExperiment) -> list[str]:
    """The model.init_from sources the search's trials may read: the file's, and those a searched choice offers."""
    sources = [exp.model.init_from] if exp.model.init_from else []
    if "model.init_from" in exp.search.space:
        sources += [str(option) for option in parse_dist("model.init_from", exp.search.space["model.init_from"]).options or [] if option]
    return list(dict.fromkeys(sources))


def check_searched_devices(exp: SearchExperiment) -> None:
    """Every `train.device` the search may sample trains here, or the search stops before it starts."""
    if "train.device" not in exp.search.space:
        return
    for option in parse_dist("train.device", exp.search.space["train.device"]).options or []:
        try:
            pick_device(str(option))
        except BabysitError as err:
            raise BabysitError(f"search.space `train.device` offers '{option}', which no trial could train on: {err}") from None


def threads_per_trial(workers: int) -> int:
    """workers × threads ≤ cores: more threads than cores only makes trials fight for them."""
    return max(1, (os.cpu_count() or 1) // workers)


def most_epochs(exp: SearchExperiment) -> int:
    """The most epochs a trial reports to its stage's pruner: its stage's, then, when it may start
    from model.init_from, its fine-tuning epochs (numbered after those), as many as the file or
    its searched range allows."""
    fine_tuning = exp.train.unfreeze_epochs
    if "train.unfreeze_epochs" in exp.search.space:
        dist = parse_dist("train.unfreeze_epochs", exp.search.space["train.unfreeze_epochs"])
        fine_tuning = max(fine_tuning, int(dist.high) if dist.numeric else max(int(option) for option in dist.options))
    may_transfer = bool(exp.model.init_from) or "model.init_from" in exp.search.space
    return max(stage.epochs for stage in exp.search.stages) + (fine_tuning if may_transfer else 0)


def trial_epochs(spec: TrialSpec) -> int:
    """Epochs `spec` trains at most: its stage's, then fine-tuning's when it starts from model.init_from."""
    train = spec.config["train"]
    return train["epochs"] + (train["unfreeze_epochs"] if spec.config["model"]["init_from"] else 0)


def trial_threads(exp: SearchExperiment) -> int | None:
    """train.threads of each trial; None where trials train on other machines (a Dask cluster's)."""
    if exp.search.runner == "dask" and exp.search.dask_address:
        return None
    if exp.search.runner == "processes" and forks_workers():
        # as in DataLoader's workers: a forked child that runs OpenMP threads after its parent did hangs
        return 1
    # processes too: each worker process sets its trial's train.threads (torch's default is all cores)
    return threads_per_trial(exp.search.workers)


def top_k_warnings(exp: SearchExperiment) -> list[str]:
    """A top_k count that takes in every trial of a stage narrows around all of them."""
    return [f"search.top_k {exp.search.top_k}: stage {stage.name} has {stage.trials} trials, so every trial counts as a top one and its "
            "ranges narrow around all of them; use fewer (or a share such as 0.25)"
            for stage in exp.search.stages[:-1]  # the last one's top trials narrow nothing
            if isinstance(exp.search.top_k, int) and exp.search.top_k >= stage.trials]


def final_warnings(exp: SearchExperiment) -> list[str]:
    """A final retrain shorter than a stage's trials tests a weaker model than the one the search found (QA)."""
    if exp.search.final is None:
        return []
    longest = max(exp.search.stages, key=lambda stage: stage.epochs)
    if exp.search.final.epochs >= longest.epochs:
        return []
    return [f"search.final.epochs {exp.search.final.epochs}: stage {longest.name} trains its trials {longest.epochs} epochs, so the final "
            "retrain would train the best config for fewer epochs than the trial that found it, and the test set would judge a weaker "
            f"model than the search's best; the final stage retrains longer: set search.final.epochs to at least {longest.epochs}"]


def log_stage(stage: str, space_text: dict[str, str], results: list[TrialResult]) -> None:
    frame = trials_frame(results)
    table = frame.drop(columns=["trial_key", "run_id", "reason"]).sort_values("val_acc", ascending=False, na_position="last")
    create_table_artifact(table=table.fillna("").to_dict("records"), key=f"search-stage-{stage}".lower().replace("_", "-"),
                          description=f"Stage `{stage}`: {len(results)} trials sampled from " + ", ".join(f"`{k}` ~ {v}" for k, v in space_text.items()))


def review_stage(stage: str, space_text: dict[str, str], space: dict, results: list[TrialResult], narrowing: Narrowing,
                 is_valid, base_tree: dict) -> tuple[dict, dict[str, str]]:
    """A stage's table logged; the space narrowed around its top trials, or moved past
    the edges where its best values sat (field -> low | high)."""
    log_stage(stage, space_text, results)
    best = max((r.val_acc for r in results if r.val_acc is not None), default=None)
    get_run_logger().info("stage %s: %d trials (%d reused), best val acc %s", stage, len(results), sum(r.reused for r in results), f"{best:.4f}" if best is not None else "n/a")
    trials = [{"params": r.params, "score": r.val_acc, "diverged": r.status == "diverged", "too_slow": "lr_too_low" in r.flags,
               "too_fast": "lr_too_high" in r.flags} for r in results]
    return narrow(space, trials, narrowing, is_valid, lambda field, params: reads_field(field, params, base_tree))


def stage_specs(exp: SearchExperiment, stage, number: int, space: dict, base_tree: dict, threads: int | None, device: str, data_version: str = "") -> list[TrialSpec]:
    """The stage's trials sampled from `space`; a config sampled twice runs once (same config,
    same seed: same result), and so do configs that differ only in fields they do not read
    (optim.momentum beside optim.name adam: babysit.config.READ_ONLY_WHEN)."""
    logger = get_run_logger()
    points = sample(space, stage.trials, exp.search.sampler, seed=exp.seed * 1000 + number)
    if exp.search.sampler == "grid" and (shortfall := grid_shortfall(space, stage.trials)):
        logger.warning("stage %s, grid sampler: %s", stage.name, shortfall)
    by_index = exp.search.runner != "processes"  # worker processes keep to a GPU each (tasks.trial.on_slot)
    sampled = [make_spec(base_tree, stage.name, i, p, stage.epochs, threads, gpu_for(device, i) if by_index else None, data_version) for i, p in enumerate(points)]
    first_of_each: dict[str, TrialSpec] = {}
    for spec in sampled:
        trained = {field: value for field, value in spec.params.items() if reads_field(field, spec.params, base_tree)}
        first_of_each.setdefault(json.dumps(trained, sort_keys=True, default=str), spec)
    specs = list(first_of_each.values())
    if len(specs) < len(sampled):
        logger.info("stage %s: %d of %d sampled configs would train as another does (a small discrete space, or values of fields "
                    "that the trial's optimizer, schedule or model does not read); each distinct training runs once", stage.name, len(sampled) - len(specs), len(sampled))
    return specs


def warn_edge(stage: str, last: bool, field: str, side: str, cause: str, narrowed: tuple[str, str] | None = None) -> None:
    if last and narrowed:
        get_run_logger().warning("stage %s, the last: %s's range should move past its %s edge (%s), which narrowing set inside the file's range "
                                 "(%s of %s): add a stage or narrow less (search.pad)", stage, field, side, cause, *narrowed)
    elif last:
        get_run_logger().warning("stage %s, the last: %s's range should move past its %s edge (%s): widen it in the file and search again", stage, field, side, cause)
    else:
        get_run_logger().warning("stage %s: %s's range moves past its %s edge (%s)", stage, field, side, cause)


def best_value(field: str, results: list[TrialResult], base_tree: dict) -> object | None:
    """`field`'s value in the best of `results` that trained with it (of tied trials the latest, as
    the search's best trial); None when none of them scored."""
    scored = [r for r in results if r.val_acc is not None and reads_field(field, r.params, base_tree)]
    return max(reversed(scored), key=lambda r: r.val_acc).params[field] if scored else None


def outranked_edge(field: str, side: str, dist, results: list[TrialResult], best: TrialResult | None, edge: float, base_tree: dict) -> bool:
    """The last stage's best value sat at `side` of `field`'s range, but the search's best trial, from
    an earlier stage, lies inside it: the stage's own best says nothing of where the optimum is (QA:
    "move the lr range down" while the final retrained a rate 18× higher)."""
    if best is None or best in results or not reads_field(field, best.params, base_tree):
        return False
    stage_best = best_value(field, results, base_tree)
    return stage_best is not None and edge_side(dist, stage_best, edge) == side and edge_side(dist, best.params[field], edge) != side


def edge_cause(field: str, side: str, dist, results: list[TrialResult], edge: float, base_tree: dict) -> str:
    """Why narrow() moved `field`'s range past its `side` edge, for the log and report.md: the best trial that
    trained with the field had its value there; or, for the learning rate, every trial diverged or
    learned too fast (down), or most of the best trials barely learned (up)."""
    scored = [r for r in results if r.val_acc is not None and reads_field(field, r.params, base_tree)]
    if not scored:
        return "every trial diverged: the learning rate is too high"
    best = best_value(field, results, base_tree)
    if side == "low" and all("lr_too_high" in r.flags for r in scored):
        return f"every trial that finished learned too fast (lr_too_high), the best at {best:.4g}: the learning rate is too high"
    if edge_side(dist, best, edge) == side:
        return f"the best value, {best:.4g}, sat at that edge"
    return f"most of the best trials barely learned (lr_too_low), the best at {best:.4g}: the learning rate is too low"


def trial_base(exp: SearchExperiment) -> dict:
    """The config tree that each trial's sampled values are set on. An lr left unset in the file
    stays unset here, so that a trial with a searched optim.name trains at that optimizer's
    default lr (DEFAULT_LR), not at the base optimizer's."""
    tree = exp.base_config().model_dump(mode="json")
    if exp.optim.lr_follows_name:
        del tree["optim"]["lr"]
    return tree


def check_before_searching(name: str, base_tree: dict, space: dict, prepared: Prepared, parent: tracking.RunRef) -> None:
    """The lecture's first step: the base config must overfit a tiny subset, or the search is
    pointless. A searched lr is checked at the middle of its range (geometric on a log scale); with
    model.init_from, from the transferred weights (random ones when the base widths do not fit them)."""
    searched_lr = {"optim.lr": space["optim.lr"].from_unit(0.5)} if "optim.lr" in space else {}
    checked = Config.model_validate(with_values(base_tree, searched_lr))
    source = None
    # the weights the trials start from, as `babysit check` judges them; when the base widths do not fit them, searched widths may (each trial says)
    with suppress(BabysitError):
        source = transfer_source(checked, prepared.splits.input_shape, prepared.splits.n_classes)
    check = overfit_tiny_subset(checked, prepared, source=source)
    start = f", from model.init_from {checked.model.init_from}" if source is not None else ""
    tracking.set_tags(parent, {"babysit.sanity_check": f"{'passed' if check.passed else 'failed'}{start}: {check.reason}"})
    if not check.passed:
        lr = f"optim.lr {checked.optim.lr:.3g}" + (", the middle of its searched range" if searched_lr else "")
        raise BabysitError(f"search {name}: the base config ({lr}{start}) cannot overfit a tiny subset ({check.reason}); fix the model or the lr (range) before searching.")


def run_search(exp: SearchExperiment) -> SearchSummary:
    logger = get_run_logger()
    base = exp.base_config()
    if not exp.search.dask_address:  # trials train here: a base config, or a searched device, that cannot train stops the search before it starts
        training_device(base)
        check_searched_devices(exp)
    base_tree = trial_base(exp)
    splits = load_data_task(base.data, base.seed)
    prepared = preprocess_task(splits, base.preprocess)
    version = data_fingerprint(base.data)  # user data rewritten in place: other trial keys, nothing reused
    uri = tracking.resolve_uri(base.tracking.uri)
    # a missing or unreadable source is said before the parent run exists; whether it fits, each trial says (widths may be searched)
    for source in init_sources(exp):
        load_source(source, uri)
    dask = exp.search.runner == "dask"
    if dask:  # every Dask worker must write to the same store and report to the same Prefect API
        if exp.search.dask_address:
            scaleout.check_scheduler(exp.search.dask_address)
        uri = scaleout.dask_tracking_uri(uri, exp.search.dask_address)
    # one task runner for all stages and the final retrain
    runner = scaleout.task_runner(exp.search.runner, exp.search.workers, exp.search.dask_address, prefect_api_for_dask(exp) if dask else None)
    named, recurrence, parent_name = recurrence_of(exp, uri)
    if exp.search.warm_start == "latest" and "babysit.warm_from" not in recurrence:
        logger.info("search.warm_start latest: no finished run of search %s yet, so the first stage samples the file's ranges", exp.name)
    for warning in top_k_warnings(exp) + numeric_choice_warnings(exp) + final_warnings(exp):
        logger.warning(warning)
    parent, finished, reopened = open_parent(exp, uri, named, recurrence, parent_name, version)  # the store and experiment exist before any fan-out
    past = [run for run in named if run.info.status == "FINISHED"]
    ended = fail_abandoned(uri, named, keep=parent.run_id)
    if ended:
        logger.info("search %s: earlier runs %s, left RUNNING by a process that was killed, are now FAILED, with their unfinished trials", exp.name, ", ".join(sorted(ended)))
    if stale := [run.info.run_id for run in named if run.info.status == "RUNNING" and run.info.run_id not in ended | {parent.run_id}]:
        logger.warning("search %s: earlier runs %s are still RUNNING in MLflow. Unless they are running now, a killed process left them: "
                       "rerunning the file that started them resumes them and marks their interrupted trials FAILED", exp.name, ", ".join(stale))
    before = recurring.latest_before(past, reopened)
    previous = recurring.past_search(before, list(exp.search.space), [s.name for s in exp.search.stages]) if before is not None else None
    threads = trial_threads(exp)
    if threads and exp.search.runner == "threads":
        torch.set_num_threads(threads)
    if dask and any(stage.prune != "none" for stage in exp.search.stages):
        logger.warning("search.runner=dask: no trial is pruned (each Dask worker sees only its own trials' epochs); "
                       "pruning needs runner processes or threads (docs/scale-out.md)")
    narrowing = Narrowing(exp.search.top_k, exp.search.pad, exp.search.edge, exp.search.widen)

    shortest = shortest_stage(exp.search)

    def is_valid(field: str, value: object) -> bool:
        if field == "optim.warmup_epochs" and isinstance(value, (int, float)) and value >= shortest:  # a moved range: every trial must reach its rate
            return False
        return field_problem(base_tree, field, value) is None

    space = declared = {field: parse_dist(field, spec) for field, spec in exp.search.space.items()}
    if "babysit.warm_from" in recurrence and previous is not None:
        space, notes = recurring.warm_space(space, previous, is_valid)
        logger.info("warm start from %s: %s", previous.run_name, "; ".join(f"{k} ~ {v}" for k, v in notes.items()))
    results: list[TrialResult] = []
    ranges: dict[str, dict[str, str]] = {}
    edges: list[str] = []
    unmoved: dict[str, str] = {}  # field -> side: the last stage's best value at an edge
    cut_short: dict[str, tuple[str, str]] = {}  # of those, the edges inside the file's range: field -> (last range, file's range)
    causes: dict[tuple[str, str], str] = {}  # (field, side) -> why its range moved past that edge, the last time it did
    moved_after: dict[tuple[str, str], str] = {}  # (field, side) -> the stage whose trials moved it, the last time
    stages = exp.search.stages
    processes = nullcontext((None, None))
    if exp.search.runner == "processes":  # room in shared memory for any stage's pruning reports
        processes = worker_processes(exp.search.workers, prepared, epochs=most_epochs(exp), trials=max(s.trials for s in stages))
    # threads: Ctrl-C sets the flag before the task runner waits for its running trials
    stopping = stop_flag() if exp.search.runner == "threads" else nullcontext()

    def review(number: int, stage_results: list[TrialResult], best: TrialResult | None = None) -> dict:
        """After stage `number`: its table and ranges logged, its edges noted; the space the next stage
        samples from. The last stage's edges are judged against the search's `best` trial too."""
        stage, last = stages[number], number + 1 == len(stages)
        band = edge_band(exp.search.sampler, space, stage.trials, exp.search.edge)
        narrowed, stage_edges = review_stage(stage.name, ranges[stage.name], space, stage_results, replace(narrowing, edge=band), is_valid, base_tree)
        for field, side in stage_edges.items():
            if last and outranked_edge(field, side, space[field], stage_results, best, band, base_tree):
                continue
            edges[:] = with_edge(edges, field, side)
            if last:  # no stage left to move it: the file's range has to, unless narrowing set that edge
                unmoved[field] = side
                if inside_declared(space[field], declared[field], side):
                    cut_short[field] = (space[field].describe(), declared[field].describe())
            causes[field, side] = edge_cause(field, side, space[field], stage_results, band, base_tree)
            moved_after[field, side] = stage.name
            warn_edge(stage.name, last, field, side, causes[field, side], cut_short.get(field))
        return narrowed

    def advice(searched: pd.DataFrame) -> str:
        """report.md: the trials' problems, and the edges the stages moved past (those the last stage left are said once)."""
        moved = [edge_of(flag) for flag in edges]  # both sides of a field that two stages moved opposite ways
        return search_advice(searched, [(f, side) for f, side in moved if unmoved.get(f) != side], unmoved, causes, cut_short,
                             lambda field, values: reads_field(field, values, base_tree), moved_after, exp.search.top_k)

    def give_up(number: int, stage_results: list[TrialResult], failed_stage: str | None = None) -> NoReturn:
        """No best trial to go on from: the trials and the advice go to MLflow, the reason to the user."""
        review(number, stage_results)
        searched = trials_frame(results)
        tracking.set_tags(parent, edge_tags(edges))
        tracking.log_csv(parent, searched, "trials.csv")
        tracking.log_text(parent, advice(searched), "report.md")
        raise BabysitError(nothing_scored(exp.name, searched, parent.run_id, failed_stage))

    with tracking.finished_or_failed(parent), runner, processes as (pool, reports), stopping as stop:
        if dask and scaleout.is_local_file_store(uri):  # workers that joined a loopback scheduler from elsewhere
            scaleout.dask_tracking_uri(uri, exp.search.dask_address, scaleout.dask_workers(runner))
        if exp.search.sanity_check:
            check_before_searching(exp.name, base_tree, space, prepared, parent)
        for number, stage in enumerate(stages):
            ranges[stage.name] = describe(space)
            # before its trials: a stage that is interrupted still says what it sampled from
            tracking.set_tags(parent, {f"range.{stage.name}.{field}": text for field, text in ranges[stage.name].items()})
            specs = stage_specs(exp, stage, number, space, base_tree, threads, base.train.device, version)
            pruner = Pruner(stage.prune, stage.prune_warmup_epochs, stage.asha_eta)
            if reports is not None and pruner.rule != "none":  # worker processes see each other's epochs in shared memory
                pruner = pruner.shared(reports)
                if (longest := max(map(trial_epochs, specs))) > reports.epochs:  # a fine-tuning range moved past the file's
                    logger.warning("stage %s: trials of up to %d epochs are pruned in their first %d only (search.runner=threads prunes every epoch)",
                                   stage.name, longest, reports.epochs)
            stage_results = run_stage(specs, finished, prepared, parent, pruner, runner, pool, stop)
            results += stage_results
            if all(r.status == "failed" for r in stage_results):  # an error, not a range: the next stage would fail alike
                give_up(number, stage_results, stage.name)
            if number + 1 < len(stages):
                space = review(number, stage_results)
        # the last stage's review waits until the final retrain and the figure, the longest steps left, have started
        scored = [r for r in results if r.val_acc is not None]
        if not scored:  # the ranges are wrong, not the code: the trials and the advice still go to MLflow
            give_up(len(stages) - 1, stage_results)
        best = max(reversed(scored), key=lambda r: r.val_acc)  # a tie goes to the latest trial: a later stage searched where the ranges moved
        trained_with = {f: v for f, v in best.params.items() if reads_field(f, best.params, base_tree)}  # not the momentum Adam's best never read
        if lr_follows_searched_name(exp):  # the rate it trained at, its optimizer's default
            trained_with["optim.lr"] = Config.model_validate(with_values(base_tree, best.params)).optim.lr
        final, retraining = None, None
        if exp.search.final is not None:
            spec = make_spec(base_tree, "final", 0, best.params, exp.search.final.epochs, threads, None, version)
            if spec.key in finished:
                final = result_from_run(finished[spec.key], spec)
            else:
                retraining = submit_trial(runner, spec, prepared, parent, None, pool, final=True, raw_example=splits.X_train[:5], stop=stop)
        searched, fields = trials_frame(results), list(exp.search.space)  # search.png shows the searched stages only
        linear = [field for field, dist in space.items() if dist.kind in ("uniform", "int")]
        # a trial sits in a field's panel only if it trained with it: not Adam's trials at a momentum they never read
        plotted = searched.assign(**{f"read.{field}": [reads_field(field, r.params, base_tree) for r in results] for field in fields})
        # drawing it (~0.3 s) is the longest step left: worker processes with nothing to train draw its rows,
        # at once, while this process writes the rest and draws the rows they leave it
        idle = (exp.search.workers - (retraining is not None)) if pool is not None else 0
        rows = plots.overview_rows(fields)
        drawing = [pool.submit(figure_row, plotted, fields, row, linear) if row < rows_for_workers(rows, idle) else None for row in range(rows)]
        review(len(stages) - 1, stage_results, best)
        if retraining is not None and exp.search.runner == "threads":  # it trains in a thread here: matplotlib is not thread-safe
            final, retraining = retraining.result(), None
        drawing = [drawn or figure_row(plotted, fields, row, linear) for row, drawn in enumerate(drawing)]
        report = advice(searched)
        if retraining is not None:
            final = retraining.result()
        if final is not None:
            results.append(final)
        frame = trials_frame(results)
        reused_from = {finished[r.key].data.tags.get("mlflow.parentRunId", "") for r in results if r.reused} - {parent.run_id}
        log_search_outcome(parent, frame, best, trained_with, final, edges, sorted(reused_from))
        tracking.log_text(parent, report, "report.md")
        changes = recurring.changes_since(previous, best.val_acc, ranges, search_hash(exp, version), parent_params(exp), version)
        if changes:
            tracking.set_tags(parent, {"babysit.previous_search": previous.run_id})
            tracking.log_text(parent, "\n".join(changes) + "\n", "changes.txt")
        url = tracking.run_url(parent)
        if runtime.flow_run.id is not None:  # while the figure is drawn
            create_link_artifact(link=url, link_text=f"MLflow search {parent.run_id}", description=f"Parent MLflow run of search {exp.name}")
            markdown = summary_markdown(exp.name, frame, best, trained_with, final, edges, ranges) + "".join(f"\n- {line}" if i else f"\n\nChanges {line}" for i, line in enumerate(changes))
            create_markdown_artifact(markdown=markdown + "\n\n" + report, key="search-summary", description=f"Search {exp.name}")
        tracking.log_image(parent, stacked_rows(drawing, plotted, fields, linear), "search.png")

    return SearchSummary(
        parent.run_id, parent.experiment_id, uri, trained_with, best.val_acc,
        final.val_acc if final else None, final.test_acc if final else None, edges, ranges,
        int((~frame["reused"]).sum()), int(frame["reused"].sum()), url, tuple(changes), report,
    )


def nothing_scored(name: str, trials: pd.DataFrame, run_id: str, failed_stage: str | None = None) -> str:
    """Why a search has no best trial (or, with `failed_stage`, stopped after a stage whose every
    trial failed), and what to change: one paragraph."""
    counts = trials["status"].value_counts()
    in_scope = trials["stage"] == failed_stage if failed_stage is not None else trials["status"].notna()
    failed = trials.loc[in_scope & (trials["status"] == "failed"), "reason"].dropna()
    if failed_stage is not None:
        said = f"search {name}: all {int((trials['stage'] == failed_stage).sum())} trials of stage {failed_stage} failed with an error, so the search stopped there"
    else:
        said = f"search {name}: none of its {len(trials)} trials finished with a score ({counts.get('diverged', 0)} diverged, {counts.get('failed', 0)} failed)"
    if not failed.empty:
        said += f"; the first failure: {str(failed.iloc[0]).rstrip('.')}"
    diverged_lr = trials.loc[trials["status"] == "diverged", "param.optim.lr"] if "param.optim.lr" in trials else pd.Series(dtype=float)
    if not diverged_lr.empty and failed_stage is None:
        said += f"; lower optim.lr's range below {diverged_lr.min():.3g}, the lowest that diverged"
    return said + f". The trials and report.md are in MLflow run {run_id}."


def prefect_api_for_dask(exp: SearchExperiment) -> str | None:
    """The Prefect API that this search's Dask workers report their task runs to."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    current = None if configured or exp.search.dask_address else str(get_client(sync_client=True).api_url)  # the temporary server
    return scaleout.dask_prefect_api(exp.search.dask_address, configured, current)


def recurrence_of(exp: SearchExperiment, uri: str) -> tuple[list, dict[str, str], str]:
    """The earlier parent runs of this search's name (newest first, whatever their file and
    status), this run's recurrence tags (a deployment's schedule, the run it warm-starts from)
    and its parent run's name."""
    experiment_id = tracking.open_store(uri, exp.tracking.experiment)
    named = tracking.find_runs(uri, experiment_id, {"babysit.kind": "search", "babysit.search_name": exp.name})
    latest = next((run for run in named if run.info.status == "FINISHED"), None)
    context = FlowRunContext.get()  # not runtime.deployment.id: outside deployments that asks the API for the flow run
    in_deployment = context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None
    scheduled = runtime.flow_run.scheduled_start_time if in_deployment else None
    recurrence = recurring.schedule_identity(runtime.deployment.name if in_deployment else None, scheduled)
    if exp.search.warm_start == "latest" and latest is not None:
        recurrence["babysit.warm_from"] = latest.info.run_id
    return named, recurrence, recurring.run_name(exp.tracking.run_name or exp.name, recurrence)


def figure_row(searched: pd.DataFrame, fields: list[str], row: int, linear: list[str]) -> np.ndarray:
    """One row of search.png's panels, drawn (in a worker process, or here)."""
    figure = plots.search_overview(searched, fields, row, linear)
    try:
        return plots.pixels(figure)
    finally:
        plots.close(figure)


def rows_for_workers(rows: int, idle: int) -> int:
    """How many of search.png's rows (the first ones) `idle` worker processes draw. The flow's
    process has its other writes to do, about a row's drawing: it keeps the rows, if any, that
    leave every process about as much to do."""
    if idle == 0:
        return 0
    kept = max(0, round((rows + 1) / (idle + 1) - 1))
    return rows - kept


def stacked_rows(drawing: list, searched: pd.DataFrame, fields: list[str], linear: list[str]) -> np.ndarray:
    """search.png: its rows, drawn here or by worker processes (futures), one above the other."""
    rows = []
    for row, drawn in enumerate(drawing):
        try:
            rows.append(drawn.result() if isinstance(drawn, Future) else drawn)
        except BrokenProcessPool:  # its worker died (killed, out of memory): draw it here
            rows.append(figure_row(searched, fields, row, linear))
    return np.vstack(rows)


def log_search_outcome(parent: tracking.RunRef, frame: pd.DataFrame, best: TrialResult, trained_with: dict, final: TrialResult | None, edges: list[str],
                       reused_from: list[str]) -> None:
    """The parent's metrics, tags (`best.<field>`: the values the best trial trained with) and trials.csv. `reused_from`: the earlier runs of the same search
    whose trials it reused (a changed file); those trials stay their children, listed in trials.csv."""
    metrics = {"best_val_acc": best.val_acc, "trials": len(frame), "trials_diverged": int((frame["status"] == "diverged").sum()),
               "trials_failed": int((frame["status"] == "failed").sum()), "trials_pruned": int((frame["status"] == "pruned").sum())}
    if final is not None and final.val_acc is not None:
        metrics.update(final_val_acc=final.val_acc, test_acc=final.test_acc)
    tracking.log_metrics(parent, metrics)
    tags = {f"best.{k}": str(v) for k, v in trained_with.items()}
    tags.update({"babysit.best_trial": best.key, **edge_tags(edges)})
    if final is not None:
        tags["babysit.final_run_id"] = final.run_id or ""
    if reused_from:
        tags["babysit.reused_from"] = ",".join(reused_from)
    tracking.set_tags(parent, tags)
    tracking.log_csv(parent, frame, "trials.csv")


def with_edge(edges: list[str], field: str, side: str) -> list[str]:
    """The search's edge flags after a stage moved `field`'s range past its `side` edge: one flag
    per field and side, however many stages moved it, ordered by their latest move."""
    flag = f"edge:{field}={side}"
    return [e for e in edges if e != flag] + [flag]


def edge_of(flag: str) -> tuple[str, str]:
    """'edge:optim.lr=high' -> ('optim.lr', 'high')."""
    field, side = flag.removeprefix("edge:").rsplit("=", 1)
    return field, side


def edge_tags(edges: list[str]) -> dict[str, str]:
    """The parent run's flags and an `edge.<field>` tag per field: the side its range moved past last."""
    return {"babysit.flags": ",".join(edges) or "none", **{f"edge.{field}": side for field, side in map(edge_of, edges)}}


def summary_markdown(name: str, frame: pd.DataFrame, best: TrialResult, trained_with: dict, final: TrialResult | None, edges: list[str], ranges: dict) -> str:
    lines = [f"# Search `{name}`", "", "| stage | trials | finished | diverged | pruned | failed | best val acc | flags | sampled from |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, group in frame[frame["stage"] != "final"].groupby("stage", sort=False):
        counts = group["status"].value_counts()
        flags = group["flags"].str.split(",").explode().loc[lambda f: f != ""].value_counts()
        flag_text = ", ".join(f"{flag} ×{count}" for flag, count in flags.items()) or "none"
        space = "; ".join(f"{k} ~ {v}" for k, v in ranges.get(stage, {}).items())
        lines.append(f"| {stage} | {len(group)} | {counts.get('finished', 0)} | {counts.get('diverged', 0)} | {counts.get('pruned', 0)} | {counts.get('failed', 0)} | {group['val_acc'].max():.4f} | {flag_text} | {space} |")
    lines += ["", f"Best trial: `{best.stage}-{best.index:03d}` val acc {best.val_acc:.4f} with " + ", ".join(f"`{k}={v}`" for k, v in trained_with.items())]
    if final is not None:
        lines.append(f"Final retrain: val acc {final.val_acc or float('nan'):.4f}, test acc {final.test_acc:.4f}")
    if edges:
        lines.append("Edges (range moved past them): " + ", ".join(f"`{e}`" for e in edges))
    return "\n".join(lines)


@flow(name="search", flow_run_name="search-{config}")
def search_flow(config: str = "conf/search_digits.yaml", overrides: list[str] | None = None) -> SearchSummary:
    """Coarse-to-fine hyperparameter search from a YAML search file plus `--set` overrides."""
    return run_search(load_config(config, overrides, model=SearchExperiment))
