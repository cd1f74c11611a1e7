"""Search throughput through the real search_flow (Prefect + MLflow): trials per minute with 1 and
2 workers, and the per-trial overhead of orchestration + tracking over bare training.

    .venv/bin/python bench/search_throughput.py [--trials 16] [--epochs 2] [--repeats 3]

Part 1. Each case runs conf/search_digits.yaml as ONE stage of --trials random trials × --epochs epochs,
with `search.final=null` (no retrain), `search.resume=false` (nothing reused) and the same seed,
so every case trains the same trial configs:
  workers=1 threads, workers=2 threads, workers=2 processes, and workers=1 threads with
  --trials/4 trials (only to split the overhead into a per-search and a per-trial part).

Flows run as `babysit search` runs them: Prefect's temporary server (ephemeral mode, its home and
database in a temporary folder, PREFECT_API_URL unset) and babysit.servers.temporary_server_settings.
Start-up is excluded: the server starts first (start_server_holding_writes), then one untimed
warm-up search creates the MLflow SQLite store (in a temporary folder, exported as
MLFLOW_TRACKING_URI) and pays first-import costs.
Each search is then timed around the search_flow() call ("wall"); Prefect's own start→end of
the flow run is shown beside it (wall − that = creating and finishing the flow run, including
any back-off while the server's SQLite is busy). Worker processes of runner=processes are
forked once per search by the flow itself, so their start-up is part of that case's wall.

Bare time: the same trial configs (same sampler seed, same torch threads as the flow gives them:
cores / workers with threads, torch's default in worker processes; checked by trial key against
the flow's MLflow runs), trained one after another with plain train_and_test(test=False), in
passes before the Prefect server starts and after it stops (so that the server, busy storing a
finished flow's events, does not slow the bare trainings: its work is the flow's overhead).
Each pass trains in a fresh thread, as the flow's trials do, and the main thread never trains:
libgomp (OMP_WAIT_POLICY unset) spins idle threads hard only while a process's OpenMP threads fit
its cores. Measured here under load: 2-thread 1-epoch trainings took 20-36 s in a process with
one OpenMP team and 0.1 s once a second team existed, so a main thread that trained would put
the flow's trials (second team) and the bare trainings (first team) in different modes.
  trials/min          = 60 · trials / wall
  overhead per trial  = (workers · wall − bare) / trials, in worker-seconds: the time a trial
                        holds a worker beyond its bare training (includes the per-search costs:
                        data, parent run, artifacts and plots, spread over the trials)
  per-search / per-trial split (workers=1 threads): a line through the two trial counts.
Each timed search starts after --settle seconds of quiet. Two estimates, cases alternating within
each repeat: medians over --repeats, and the least disturbed ("best": the fastest search of each
case; bare = the sum over trials of each trial's fastest training). On a shared 2-core machine two torch threads stall whenever another process
takes a core, which swings the same 16 trainings between 2 s and 15 s: read "best" as the cost
of the code, and the median as what a busy machine gave.

Part 2 (--shipped-repeats): the search exactly as the YAML ships it (coarse 20 x 2 epochs, fine
10 x 8 epochs with median pruning), final retrain and resume
off, with workers=1 (threads, and processes), workers=2 processes (the default runner) and workers=2
threads: wall time and trials per minute, and the speed-up of 2 workers over the faster single worker;
also the same for the trial phase alone (first trial's start to last trial's end, see trial_phase).
Beside each repeat, the hardware's own ceiling for that speed-up: bare PyTorch trainings of the
same size (the coarse stage's trial configs at its epochs, then the first half of them at the fine
stage's epochs), one after another in 1 forked process and shared out to 2 forked processes
(1 torch thread each, as the search's worker processes train), no Prefect, no MLflow. Two
processes on this machine's 2 vCPUs do not give ×2 (shared caches, hypervisor steal), and
no runner can beat what bare training gets; the search's speed-up is also shown as a share of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors
PREFECT_HOME = tempfile.TemporaryDirectory(prefix="bench-prefect-", ignore_cleanup_errors=True)  # removed at exit, as every scratch folder here
os.environ["PREFECT_HOME"] = PREFECT_HOME.name  # a temporary server with its own database
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # quiet console; the API still gets the logs

import torch

DEFAULT_THREADS = torch.get_num_threads()  # what a fresh worker process uses (train.threads None)

from babysit import servers, tracking
from babysit.config import Config, SearchExperiment, load_config
from babysit.space import parse_dist, sample
from flows.search import search_flow, threads_per_trial
from tasks.data import load_splits
from tasks.preprocess import Prepared, fit_preprocess
from tasks.train import train_and_test
from tasks.trial import make_spec

GOAL_OVERHEAD_S = 0.25  # per trial
GOAL_SPEEDUP = 1.6  # 2 workers over 1
BARE_ONE, BARE_TWO = "bare, 1 process", "bare, 2 processes"  # the ceiling (shipped_search)

BareKey = tuple[int, str]  # (torch threads, trial key)


@dataclass
class Case:
    label: str
    workers: int
    runner: str
    trials: int
    specs: list = field(default_factory=list)  # the trials the flow will run (TrialSpec)
    wall: list[float] = field(default_factory=list)  # per repeat
    in_flow: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)  # per bare pass

    @property
    def bare_keys(self) -> list[BareKey]:
        return [(self.threads or DEFAULT_THREADS, s.key) for s in self.specs]

    def overrides(self, epochs: int) -> list[str]:
        return [
            f"search.workers={self.workers}",
            f"search.runner={self.runner}",
            f"search.stages=[{{name: coarse, trials: {self.trials}, epochs: {epochs}}}]",
            "search.final=null",
            "search.resume=false",
            "search.sanity_check=false",
            "tracking.experiment=bench-throughput",
        ]

    @property
    def threads(self) -> int | None:
        """torch threads per trial, as flows/search.py sets them (None: torch's default)."""
        return threads_per_trial(self.workers) if self.runner in ("threads", "processes") else None


def timed_search(config: str, overrides: list[str]) -> tuple[float, float, object]:
    """(wall of the search_flow call, Prefect's start→end of the flow run, the SearchSummary)."""
    from prefect.client.orchestration import get_client

    started = time.perf_counter()
    with servers.temporary_server_settings():
        state = search_flow(config=config, overrides=overrides, return_state=True)
    wall = time.perf_counter() - started
    summary = state.result()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    in_flow = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else float("nan")
    return wall, in_flow, summary


def start_server_holding_writes() -> None:
    """Start Prefect's temporary server as babysit.servers sets it up, except that it holds its
    batched writes of task-run states and events until it stops. `babysit search` starts a server
    per command, and for a search shorter than the 60-s flush interval (and 1000 records) those
    writes run at the command's exit, after the search. Here one server serves every search of
    the benchmark, so each 60-s flush (measured: ~1.7 s of server CPU for a minute of searches)
    would land inside a random timed search, a 2-worker one hardest (no spare core)."""
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    held = {f"server.services.{service}.{setting}": 10**6 for service in servers.BATCHED_SERVICES for setting in ("batch_size", "flush_interval")}
    settings = servers.for_temporary_server(context.settings).copy_with_update(updates=held)
    with SettingsContext(profile=context.profile, settings=settings):
        servers.start_temporary_server_apart()


def trial_specs(config: str, overrides: list[str], threads: int | None) -> list:
    """The stage's trials exactly as run_search builds them (sampler seed seed·1000 for stage 0)."""
    exp = load_config(config, overrides, model=SearchExperiment)
    base_tree = exp.base_config().model_dump(mode="json")
    stage = exp.search.stages[0]
    space = {f: parse_dist(f, spec) for f, spec in exp.search.space.items()}
    points = sample(space, stage.trials, exp.search.sampler, seed=exp.seed * 1000)
    return [make_spec(base_tree, stage.name, i, p, stage.epochs, threads, None) for i, p in enumerate(points)]


def check_same_trials(case: Case, uri: str, summary) -> None:
    children = tracking.find_runs(uri, summary.experiment_id, {"mlflow.parentRunId": summary.parent_run_id})
    flow_keys, keys = {run.data.tags.get("babysit.trial_key") for run in children}, {s.key for s in case.specs}
    if flow_keys != keys:
        raise RuntimeError(f"{case.label}: the bare trials differ from the flow's ({len(flow_keys ^ keys)} trial keys differ)")


def bare_pass(cases: list[Case], prepared: Prepared, log: dict[BareKey, list[float]]) -> None:
    """Train every distinct (threads, trial) of the cases once with plain train_and_test, in a
    fresh thread that ends with the pass (like a task runner's); each case gets the pass's total."""
    seconds: dict[BareKey, float] = {}

    def train_all() -> None:
        for case in cases:
            for (threads, key), spec in zip(case.bare_keys, case.specs):
                if (threads, key) not in seconds:
                    torch.set_num_threads(threads)
                    started = time.perf_counter()
                    train_and_test(Config.model_validate(spec.config), prepared, test=False)
                    seconds[threads, key] = time.perf_counter() - started
                    log[threads, key].append(seconds[threads, key])

    with ThreadPoolExecutor(1) as pool:
        pool.submit(train_all).result()
    for case in cases:
        case.bare.append(sum(seconds[k] for k in case.bare_keys))


def report(title: str, cases: list[Case], wall: dict[str, float], in_flow: dict[str, float], bare: dict[str, float]) -> None:
    """One table and the goal lines for one estimate (median or best) of wall and bare seconds."""
    one, two, procs, few = cases
    per_min = {c.label: 60 * c.trials / wall[c.label] for c in cases}
    overhead = {c.label: (c.workers * wall[c.label] - bare[c.label]) / c.trials for c in cases}
    print(title)
    print(f"  {'case':32s} {'wall s':>7s} {'flow run s':>10s} {'trials/min':>10s} {'x w=1':>6s} {'bare s':>7s} {'bare/trial':>10s} {'overhead/trial':>14s}")
    for c in cases:
        print(f"  {c.label:32s} {wall[c.label]:7.1f} {in_flow[c.label]:10.1f} {per_min[c.label]:10.1f} {per_min[c.label] / per_min[one.label]:6.2f} "
              f"{bare[c.label]:7.1f} {bare[c.label] / c.trials:10.2f} {overhead[c.label]:13.2f}s")
    # workers=1 threads at two trial counts: overhead(n) = per_search + n · per_trial
    per_trial = (overhead[one.label] * one.trials - overhead[few.label] * few.trials) / (one.trials - few.trials)
    per_search = overhead[few.label] * few.trials - few.trials * per_trial
    speedup, speedup_procs = per_min[two.label] / per_min[one.label], per_min[procs.label] / per_min[one.label]
    print(f"  overhead split, workers=1 threads ({few.trials} vs {one.trials} trials): {per_search:.2f} s per search + {per_trial:.2f} s per trial")
    print(f"  speed-up 2 vs 1 worker on this one stage: threads x{speedup:.3f}, processes x{speedup_procs:.3f}   [goal >= x{GOAL_SPEEDUP}: "
          f"threads {'MET' if speedup >= GOAL_SPEEDUP else 'NOT MET'}, processes {'MET' if speedup_procs >= GOAL_SPEEDUP else 'NOT MET'}]")
    print(f"  overhead per trial, workers=1 threads: {overhead[one.label]:.2f} s all-in, {per_trial:.2f} s marginal   [goal <= {GOAL_OVERHEAD_S} s: "
          f"all-in {'MET' if overhead[one.label] <= GOAL_OVERHEAD_S else 'NOT MET'}, marginal {'MET' if per_trial <= GOAL_OVERHEAD_S else 'NOT MET'}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/search_digits.yaml")
    parser.add_argument("--trials", type=int, default=16, help="trials in the one stage")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (the YAML's coarse stage: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per case; also the bare passes")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each timed search")
    parser.add_argument("--shipped-repeats", type=int, default=3, help="timed runs per case of the search as the YAML ships it (0: skip)")
    args = parser.parse_args()
    from prefect.server.api.server import SubprocessASGIServer

    scratch = tempfile.TemporaryDirectory(prefix="bench-throughput-", ignore_cleanup_errors=True)
    store = scratch.name
    uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    small = max(2, args.trials // 4)
    cases = [
        Case("workers=1 threads", 1, "threads", args.trials),
        Case("workers=2 threads", 2, "threads", args.trials),
        Case("workers=2 processes", 2, "processes", args.trials),
        Case(f"workers=1 threads, {small} trials", 1, "threads", small),
    ]
    base = load_config(args.config, cases[0].overrides(args.epochs), model=SearchExperiment).base_config()
    splits = load_splits(base.data, base.seed)
    prepared = fit_preprocess(splits, base.preprocess)
    for case in cases:
        case.specs = trial_specs(args.config, case.overrides(args.epochs), case.threads)
    bare_log: dict[BareKey, list[float]] = defaultdict(list)
    before, after = (args.repeats + 1) // 2, args.repeats // 2

    print(f"search throughput on {args.config}: 1 stage x {args.trials} random trials x {args.epochs} epochs, final off, resume off; "
          f"model {base.model.hidden}, batch {base.train.batch_size}, diagnostics {base.train.diagnostics}")
    print(f"  {os.cpu_count()} cores, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; torch threads per trial: " + ", ".join(f"{c.label}: {c.threads or f'default ({DEFAULT_THREADS})'}" for c in cases[:3]))
    print(f"  MLflow: {uri}; {args.repeats} repeats, cases alternating, {args.settle:g} s settle before each search; "
          f"bare passes: {before} before the Prefect server starts, {after} after it stops", flush=True)

    for _ in range(before):
        bare_pass(cases, prepared, bare_log)
    print("  bare passes before: " + ", ".join(f"{c.label} {statistics.median(c.bare):.1f} s" for c in cases), flush=True)
    started = time.perf_counter()
    start_server_holding_writes()
    wall, _, _ = timed_search(args.config, Case("warm-up", 1, "threads", 1).overrides(epochs=1))
    print(f"  Prefect's temporary server started in {time.perf_counter() - started - wall:.1f} s; warm-up search (1 trial; creates the MLflow store, "
          f"first flow in this process): {wall:.1f} s (both excluded)", flush=True)
    shipped, phases = shipped_search(args.config, args.shipped_repeats, args.settle, prepared) if args.shipped_repeats else (None, None)
    for repeat in range(args.repeats):
        for case in cases:
            time.sleep(args.settle)
            wall, in_flow, summary = timed_search(args.config, case.overrides(args.epochs))
            check_same_trials(case, uri, summary)
            case.wall.append(wall)
            case.in_flow.append(in_flow)
            print(f"  repeat {repeat}: {case.label:32s} wall {wall:6.1f} s (flow run {in_flow:6.1f} s)", flush=True)
    SubprocessASGIServer().stop()  # the temporary server that the warm-up started (one per process)
    for _ in range(after):
        bare_pass(cases, prepared, bare_log)
    print("  bare passes, all: " + ", ".join(f"{c.label} " + "/".join(f"{b:.1f}" for b in c.bare) + " s" for c in cases))
    print(f"  server start-up, searches and the bare passes after: {time.perf_counter() - started:.0f} s")

    print()
    report(f"median of {args.repeats} repeats", cases,
           {c.label: statistics.median(c.wall) for c in cases}, {c.label: statistics.median(c.in_flow) for c in cases},
           {c.label: statistics.median(c.bare) for c in cases})
    print()
    report(f"best of {args.repeats} repeats (least disturbed: fastest search; bare = sum of each trial's fastest training)", cases,
           {c.label: min(c.wall) for c in cases}, {c.label: min(c.in_flow) for c in cases},
           {c.label: sum(min(bare_log[k]) for k in c.bare_keys) for c in cases})
    if shipped:
        print()
        print(f"the search as {args.config} ships it (every stage as written; final retrain off, resume off), median of {args.shipped_repeats}")
        searches = {label: value for label, value in shipped.items() if not label.startswith("bare")}
        baseline = min(("workers=1 threads", "workers=1 processes"), key=lambda label: statistics.median(searches[label][0]))  # the faster single worker
        one = statistics.median(searches[baseline][0])
        for label, (walls, trials) in searches.items():
            wall = statistics.median(walls)
            print(f"  {label:24s} wall {wall:6.1f} s  {trials} trials  {60 * trials / wall:6.1f} trials/min  x{one / wall:.2f}")
        speedup = one / statistics.median(searches["workers=2 processes"][0])
        print(f"  speed-up 2 workers (processes, the default runner) vs the faster single worker ({baseline}): x{speedup:.3f}   "
              f"[goal >= x{GOAL_SPEEDUP}: {'MET' if speedup >= GOAL_SPEEDUP else 'NOT MET'}]")
        # the same ratio within each repeat (the cases of a repeat ran back to back, so a slow spell of the machine hits them alike),
        # against the same single worker: the faster of two noisy times per repeat would be biased low where both runners are alike
        paired = [a / b for a, b in zip(searches[baseline][0], searches["workers=2 processes"][0])]
        print(f"  repeat by repeat ({baseline} / 2 processes, within each repeat): median x{statistics.median(paired):.2f}, "
              f"range x{min(paired):.2f}-x{max(paired):.2f}")
        phase_one = statistics.median(phases[baseline])
        print(f"  trial phase only (first trial's start to last trial's end, from MLflow; per-search work before and after left out): "
              + ", ".join(f"{label} {statistics.median(values):.1f} s" for label, values in phases.items())
              + f"; 2 processes x{phase_one / statistics.median(phases['workers=2 processes']):.2f} over {baseline}")
        ceiling = [a / b for a, b in zip(shipped[BARE_ONE][0], shipped[BARE_TWO][0])]
        print(f"  ceiling: bare PyTorch, {shipped[BARE_ONE][1]} trainings, 2 forked processes vs 1 (1 torch thread each): median x{statistics.median(ceiling):.2f}, "
              f"range x{min(ceiling):.2f}-x{max(ceiling):.2f}; the search's speed-up is {speedup / statistics.median(ceiling):.0%} of it "
              f"(repeat by repeat: median {statistics.median(p / c for p, c in zip(paired, ceiling)):.0%})")


_BARE: dict[str, Prepared] = {}  # the data that forked bare workers inherit


def _one_bare_thread() -> None:
    torch.set_num_threads(1)


def _bare_train(config: dict) -> None:
    train_and_test(Config.model_validate(config), _BARE["prepared"], test=False)


def bare_in_processes(configs: list[dict], prepared: Prepared, processes: int) -> float:
    """Seconds to train `configs` (plain train_and_test) shared out to `processes` forked processes
    of 1 torch thread, a trial at a time each, as the search's worker pool hands them out; the
    processes are started before the clock starts."""
    _BARE["prepared"] = prepared
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_one_bare_thread) as pool:
        list(pool.map(abs, range(processes)))
        started = time.perf_counter()
        list(pool.map(_bare_train, configs, chunksize=1))
        return time.perf_counter() - started


def ceiling_configs(config: str) -> list[dict]:
    """Bare trainings shaped like the YAML's search: its first stage's trials at that stage's
    epochs, then the first half of them at the next stage's epochs (the narrowed trials differ)."""
    exp = load_config(config, [], model=SearchExperiment)
    stages = exp.search.stages
    specs = trial_specs(config, ["search.resume=false"], 1)
    configs = [s.config for s in specs]
    if len(stages) > 1:
        longer = [{**c, "train": {**c["train"], "epochs": stages[1].epochs}} for c in configs[: len(configs) // 2]]
        configs += longer
    return configs


def shipped_search(config: str, repeats: int, settle: float, prepared: Prepared) -> tuple[dict[str, tuple[list[float], int]], dict[str, list[float]]]:
    """Wall times of the YAML's own search (every stage as written) with 1 and 2 workers, cases alternating."""
    cases = {"workers=1 threads": (1, "threads"), "workers=1 processes": (1, "processes"), "workers=2 processes": (2, "processes"), "workers=2 threads": (2, "threads")}
    walls: dict[str, list[float]] = {label: [] for label in cases}
    walls.update({BARE_ONE: [], BARE_TWO: []})
    phases: dict[str, list[float]] = {label: [] for label in cases}
    bare_configs = ceiling_configs(config)
    trials = 0
    for repeat in range(repeats):
        for label, processes in ((BARE_ONE, 1), (BARE_TWO, 2)):
            time.sleep(settle)
            walls[label].append(bare_in_processes(bare_configs, prepared, processes))
        print(f"  bare ceiling, repeat {repeat}: {len(bare_configs)} trainings, 1 process {walls[BARE_ONE][-1]:.1f} s, "
              f"2 processes {walls[BARE_TWO][-1]:.1f} s (x{walls[BARE_ONE][-1] / walls[BARE_TWO][-1]:.2f})", flush=True)
        for label, (workers, runner) in cases.items():
            time.sleep(settle)
            overrides = [f"search.workers={workers}", f"search.runner={runner}", "search.final=null", "search.resume=false", "tracking.experiment=bench-shipped"]
            wall, _, summary = timed_search(config, overrides)
            walls[label].append(wall)
            phases[label].append(trial_phase(summary))
            trials = summary.trials_run
            print(f"  shipped search, repeat {repeat}: {label:22s} wall {wall:6.1f} s, {trials} trials; trial phase {phases[label][-1]:.1f} s", flush=True)
    return {label: (values, trials if label in cases else len(bare_configs)) for label, values in walls.items()}, phases


def trial_phase(summary) -> float:
    """Seconds from the first trial's start to the last trial's end, from the trials' MLflow runs
    (start and end times in ms): the search's stages, the narrowing between them included; the
    per-search work before (Prefect flow run, data, parent run, worker start) and after (figure,
    trials.csv, report, artifacts) left out."""
    children = tracking.find_runs(summary.tracking_uri, summary.experiment_id, {"mlflow.parentRunId": summary.parent_run_id})
    return (max(r.info.end_time for r in children) - min(r.info.start_time for r in children)) / 1000


if __name__ == "__main__":
    main()
