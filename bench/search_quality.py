"""Search quality at equal trial budgets: coarse-to-fine random vs grid vs one-stage random (vs TPE).

On digits, with conf/search_digits.yaml's space and base config, every method gets the same
number of trainings and the same epochs per training; the figure of merit is the best
validation accuracy it finds, as mean ± std over search seeds.

    .venv/bin/python bench/search_quality.py [--seeds 5] [--stages 2] [--trials 8] [--epochs 3] [--threads 2] [--set search.top_k=3 ...]

Methods (budget B = stages × trials):
  coarse-to-fine  `stages` stages of `trials` points from the YAML's sampler; between stages the space narrows
                  (babysit.space.narrow with the YAML's top_k/pad/edge/widen), exactly as
                  flows/search.py does it, including the sampler seed seed·1000 + stage.
  grid            sampler 'grid' with B points: a full grid (every choice option × k levels per
                  numeric field). The defaults make the full grid exactly B = 16 points
                  (2 batchnorm options × 2³ levels); other budgets may leave grid with fewer.
  random          one stage of B random points (seed·1000: its first `trials` points are the
                  coarse stage's, so the two methods share their common random numbers).
  tpe             Optuna's TPESampler(seed) with its defaults, B trials; skipped, and said so,
                  when optuna is not installed (.venv/bin/pip install -c constraints-cpu.txt optuna).

Trials are evaluated with the plain functions (make_spec → Config → train_and_test(test=False),
run_flags for divergence and lr_too_low), not through Prefect/MLflow: this measures search, not orchestration.
The data split is fixed (the YAML's seed); a search seed drives the sampling and, as in the flow
(where `seed` is one field), the trials' init and batch order, so grid also varies over seeds.
Pruning is off in every method (the YAML's fine stage prunes; that would change the budget).
Identical trial configs are trained once and reused (training on CPU is deterministic).
OMP_WAIT_POLICY defaults to PASSIVE here: on a busy 2-core machine two spinning OpenMP threads
made a 3-epoch training 10-20x slower (7-15 s instead of 0.5-1 s); accuracies are unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads its OpenMP runtime

import torch

from babysit.config import Config, SearchExperiment, field_problem, load_config, reads_field
from babysit.flags import run_flags
from babysit.space import Narrowing, Space, describe, narrow, parse_dist, sample
from flows.search import trial_base
from tasks.data import load_splits
from tasks.preprocess import Prepared, fit_preprocess
from tasks.train import train_and_test
from tasks.trial import make_spec


class Evaluator:
    """Trains one sampled config with the plain functions; returns the flow's trial record
    {'params', 'score' (best val acc, None if diverged or failed), 'diverged', 'too_slow', 'too_fast'}."""

    def __init__(self, base_tree: dict[str, Any], prepared: Prepared, epochs: int, threads: int):
        self.base_tree, self.prepared, self.epochs, self.threads = base_tree, prepared, epochs, threads
        self.cache: dict[str, tuple[float | None, bool, bool, bool]] = {}
        self.trainings = 0  # fresh trainings, cache hits excluded
        self.seconds = 0.0  # wall time of those trainings
        self.failures: list[str] = []

    def __call__(self, params: dict[str, Any], seed: int, stage: str = "bench", index: int = 0) -> dict[str, Any]:
        tree = {**self.base_tree, "seed": seed}
        spec = make_spec(tree, stage, index, params, self.epochs, self.threads, "cpu")
        key = json.dumps(spec.config, sort_keys=True)
        if key not in self.cache:
            self.cache[key] = self._train(Config.model_validate(spec.config))
        score, diverged, too_slow, too_fast = self.cache[key]
        return {"params": params, "score": score, "diverged": diverged, "too_slow": too_slow, "too_fast": too_fast}

    def _train(self, cfg: Config) -> tuple[float | None, bool, bool, bool]:
        started = time.perf_counter()
        self.trainings += 1
        try:
            result, _ = train_and_test(cfg, self.prepared, test=False)
        except Exception as err:  # a failed trial scores None, as in tasks/trial.py
            self.failures.append(f"{type(err).__name__}: {err}")
            return None, False, False, False
        finally:
            self.seconds += time.perf_counter() - started
        flags = run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, n_classes=self.prepared.splits.n_classes, base_lr=cfg.optim.lr)
        acc = result.best_val_acc
        return (None if "diverged" in flags or math.isnan(acc) else acc), "diverged" in flags, "lr_too_low" in flags, "lr_too_high" in flags


def best_score(trials: list[dict[str, Any]]) -> float:
    return max((t["score"] for t in trials if t["score"] is not None), default=math.nan)


def coarse_to_fine(space: Space, evaluate: Evaluator, seed: int, stages: int, per_stage: int, narrowing: Narrowing, is_valid: Any, sampler: str) -> tuple[list, list[str]]:
    """flows/search.py's stage loop, minus Prefect and MLflow."""
    trials, edges = [], []
    for number in range(stages):
        points = sample(space, per_stage, sampler, seed=seed * 1000 + number)
        stage_trials = [evaluate(p, seed, f"stage{number}", i) for i, p in enumerate(points)]
        trials += stage_trials
        if number + 1 < stages:
            space, stage_edges = narrow(space, stage_trials, narrowing, is_valid, lambda field, params: reads_field(field, params, evaluate.base_tree))
            edges += [f"{field}={side}" for field, side in stage_edges.items()]
    return trials, edges


def one_stage(space: Space, evaluate: Evaluator, seed: int, budget: int, sampler: str) -> list:
    points = sample(space, budget, sampler, seed=seed * 1000)
    return [evaluate(p, seed, "stage0", i) for i, p in enumerate(points)]


def tpe(space: Space, evaluate: Evaluator, seed: int, budget: int, optuna: Any) -> list:
    """Optuna TPE with default settings; categorical fields are suggested by option index."""
    trials = []

    def objective(trial: Any) -> float:
        params = {}
        for field, dist in space.items():
            if dist.kind == "choice":
                params[field] = dist.options[trial.suggest_categorical(field, list(range(len(dist.options))))]
            elif dist.kind == "int":
                params[field] = trial.suggest_int(field, int(dist.low), int(dist.high))
            else:
                params[field] = trial.suggest_float(field, dist.low, dist.high, log=dist.kind == "loguniform")
        record = evaluate(params, seed, "stage0", trial.number)
        trials.append(record)
        return record["score"] if record["score"] is not None else 0.0  # diverged/failed: as bad as it gets

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=budget)
    return trials


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/search_digits.yaml")
    parser.add_argument("--seeds", type=int, default=5, help="search seeds 0..seeds-1")
    parser.add_argument("--stages", type=int, default=2, help="coarse-to-fine stages")
    parser.add_argument("--trials", type=int, default=8, help="trials per coarse-to-fine stage; budget = stages × trials")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every training, every method")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-tpe", action="store_true", help="skip Optuna TPE even if it is installed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override the YAML, as `babysit search --set`")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    exp = load_config(args.config, args.overrides, model=SearchExperiment)
    base = exp.base_config()
    base_tree = trial_base(exp)  # as the flow: an lr left unset follows each trial's optimizer
    splits = load_splits(base.data, base.seed)
    prepared = fit_preprocess(splits, base.preprocess)
    space = {field: parse_dist(field, spec) for field, spec in exp.search.space.items()}
    narrowing = Narrowing(exp.search.top_k, exp.search.pad, exp.search.edge, exp.search.widen)
    budget = args.stages * args.trials
    grid_size = len(sample(space, budget, "grid", 0))
    evaluate = Evaluator(base_tree, prepared, args.epochs, args.threads)

    optuna = None
    if not args.no_tpe:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:
            optuna = None

    def is_valid(field: str, value: Any) -> bool:
        return field_problem(base_tree, field, value) is None

    # ---- settings
    print(f"search quality on {args.config}: {base.data.source}, split train/val/test {len(splits.y_train)}/{len(splits.y_val)}/{len(splits.y_test)} "
          f"(data seed {base.seed}, fixed); val acc resolution 1/{len(splits.y_val)} = {1 / len(splits.y_val):.4f}")
    print(f"  model {base.model.hidden} {base.model.activation}, {base.optim.name}, batch {base.train.batch_size}, diagnostics {base.train.diagnostics}; "
          f"{args.epochs} epochs per training, torch threads {args.threads}, pruning off")
    print(f"  space: " + ", ".join(f"{k} ~ {v}" for k, v in describe(space).items()))
    print(f"  budget {budget} trainings per method and seed; seeds 0..{args.seeds - 1} (sampling + init/batch order)")
    print(f"  coarse-to-fine: {args.stages} stages x {args.trials} {exp.search.sampler} trials, narrowing top_k={narrowing.top_k} pad={narrowing.pad} edge={narrowing.edge} widen={narrowing.widen}")
    print(f"  grid: {grid_size} points" + ("" if grid_size == budget else f"  (NOTE: the full grid is smaller than the budget; grid runs {grid_size} trainings)"))
    print(f"  random: 1 stage x {budget} trials")
    print(f"  tpe: " + (f"optuna {optuna.__version__} TPESampler(seed) defaults, {budget} trials" if optuna else "SKIPPED (optuna not installed; .venv/bin/pip install -c constraints-cpu.txt optuna)" if not args.no_tpe else "SKIPPED (--no-tpe)"))
    print(flush=True)

    edges: dict[int, list[str]] = {}  # seed -> coarse-to-fine edge moves

    def run_c2f(seed: int) -> list:
        trials, edges[seed] = coarse_to_fine(space, evaluate, seed, args.stages, args.trials, narrowing, is_valid, exp.search.sampler)
        return trials

    methods = {
        "coarse-to-fine": run_c2f,
        "grid": lambda seed: one_stage(space, evaluate, seed, budget, "grid"),
        "random (1 stage)": lambda seed: one_stage(space, evaluate, seed, budget, "random"),
    }
    if optuna is not None:
        methods["tpe (optuna)"] = lambda seed: tpe(space, evaluate, seed, budget, optuna)

    best: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, int] = {}
    for seed in range(args.seeds):
        line = []
        for name, run in methods.items():
            trials = run(seed)
            counts[name] = len(trials)
            best[name].append(best_score(trials))
            line.append(f"{name} {best[name][-1]:.4f}")
        moved = f"   (c2f edge moves: {', '.join(edges[seed])})" if edges[seed] else ""
        print(f"seed {seed}: " + " | ".join(line) + moved, flush=True)

    # ---- summary
    print()
    print(f"best validation accuracy over {args.seeds} seeds, {args.epochs} epochs per training")
    print(f"  {'method':18s} {'trainings':>9s}   {'mean ± std':>17s}   {'min':>6s}  {'max':>6s}   {'vs grid':>8s}")
    grid_mean = statistics.mean(best["grid"])
    for name, values in best.items():
        mean, std = mean_std(values)
        print(f"  {name:18s} {counts[name]:9d}   {mean:.4f} ± {std:.4f}   {min(values):.4f}  {max(values):.4f}   {mean - grid_mean:+8.4f}")
    print(f"  fresh trainings {evaluate.trainings} (identical configs reused), {evaluate.seconds:.0f} s training, "
          f"{evaluate.seconds / max(evaluate.trainings, 1):.2f} s per training; failed {len(evaluate.failures)}; wall {time.perf_counter() - started:.0f} s")
    if evaluate.failures:
        print("  failures: " + "; ".join(sorted(set(evaluate.failures))[:3]))

    c2f = best["coarse-to-fine"]
    verdict = [f"coarse-to-fine >= grid on average: {'YES' if statistics.mean(c2f) >= grid_mean else 'NO'} "
               f"({statistics.mean(c2f):.4f} vs {grid_mean:.4f})"]
    if "tpe (optuna)" in best:
        # paired by seed: the two searches of one seed share the data and the training seed
        diffs = [a - b for a, b in zip(c2f, best["tpe (optuna)"])]
        mean_d = statistics.mean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
        within = abs(mean_d) <= 2 * se
        verdict.append(f"within noise of TPE: {'YES' if within else 'NO'} (c2f − tpe = {mean_d:+.4f}, 2 × paired s.e. = {2 * se:.4f})")
    else:
        verdict.append("TPE skipped (optuna not installed)")
    print("RESULT: " + "; ".join(verdict))


if __name__ == "__main__":
    main()
