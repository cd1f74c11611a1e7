"""Cost of the per-epoch diagnostics (grad norms, update ratios, dead units) in babysit's training.

Same config, same data, same seed, one process; the cases alternate and the figures are medians
over --repeats after one untimed warm-up of each. "fit" times the loop alone; "train task" adds
the per-epoch MLflow write (one log_batch per epoch, 5 metrics without diagnostics, ~22 with).

    .venv/bin/python bench/diagnostics_cost.py [--epochs 20] [--repeats 7] [--threads 1]

One torch thread by default: on a shared 2-core machine, more threads stall on each other and
the run-to-run noise swamps a few-percent difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from babysit import tracking
from babysit.config import load_config
from tasks.data import load_splits
from tasks.preprocess import fit_preprocess
from babysit.diagnostics import dead_unit_metrics, dead_unit_probe, snapshot, step_diagnostics
from models.mlp import build_model
from tasks.train import evaluate, train_and_test, train_task


def fit_seconds(cfg, prepared) -> tuple[float, float]:
    """(wall, CPU) seconds of build + fit + test."""
    wall, cpu = time.perf_counter(), time.process_time()
    train_and_test(cfg, prepared)
    return time.perf_counter() - wall, time.process_time() - cpu


def task_seconds(cfg, prepared, uri: str) -> tuple[float, float]:
    run = tracking.start_run(uri, "bench", None, cfg.flat(), {})
    wall, cpu = time.perf_counter(), time.process_time()
    train_task.fn(cfg, prepared, run)
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    tracking.end_run(run)
    return elapsed


def diagnostics_seconds(cfg, prepared, epochs: int) -> float:
    """CPU seconds of just the per-epoch measurements, `epochs` times (300 rounds averaged): the
    snapshot, the dead-unit hooks on the validation pass (less the pass itself), the norms."""
    s = prepared.splits
    model = build_model(cfg.model, s.input_shape, s.n_classes, cfg.seed)
    X, y = torch.as_tensor(s.X_train), torch.as_tensor(s.y_train)
    X_val, y_val = torch.as_tensor(s.X_val), torch.as_tensor(s.y_val)
    torch.nn.functional.cross_entropy(model(X[:64]), y[:64]).backward()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    rounds, elapsed = 300, 0.0
    for _ in range(rounds):
        started = time.process_time()
        before = snapshot(model)
        elapsed += time.process_time() - started
        optimizer.step()  # not timed
        started = time.process_time()
        with dead_unit_probe(model) as dead:
            evaluate(model, X_val, y_val)
        step_diagnostics(model, before) | dead_unit_metrics(dead)
        elapsed += time.process_time() - started
        started = time.process_time()
        evaluate(model, X_val, y_val)  # the validation pass that fit runs anyway
        elapsed -= time.process_time() - started
    return elapsed / rounds * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/digits_mlp.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    base = [f"train.epochs={args.epochs}", "train.device=cpu", "tracking.log_model=false"]
    if args.threads:
        base.append(f"train.threads={args.threads}")
    cfg_on = load_config(args.config, [*base, "train.diagnostics=true"])
    cfg_off = load_config(args.config, [*base, "train.diagnostics=false"])
    splits = load_splits(cfg_on.data, cfg_on.seed)
    prepared = fit_preprocess(splits, cfg_on.preprocess)
    scratch = tempfile.TemporaryDirectory(prefix="bench-diagnostics-", ignore_cleanup_errors=True)  # removed at exit
    uri = f"sqlite:///{scratch.name}/mlflow.db"
    tracking.open_store(uri, "bench")

    cases = {
        "fit, no diagnostics": lambda: fit_seconds(cfg_off, prepared),
        "fit, diagnostics": lambda: fit_seconds(cfg_on, prepared),
        "train task (MLflow per epoch), no diagnostics": lambda: task_seconds(cfg_off, prepared, uri),
        "train task (MLflow per epoch), diagnostics": lambda: task_seconds(cfg_on, prepared, uri),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for case in cases.values():  # warm-up, untimed
        case()
    for _ in range(args.repeats):
        for name, case in cases.items():
            times[name].append(case())

    print(f"{cfg_on.name} {cfg_on.model.hidden}, {args.epochs} epochs, batch {cfg_on.train.batch_size}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    # CPU time (process_time) is what the process itself spent: far less disturbed than wall time
    # by other work on a shared machine (with one torch thread, CPU ≈ wall on an idle machine).
    for unit, pick in (("wall", 0), ("CPU", 1)):
        medians = {name: statistics.median(v[pick] for v in values) for name, values in times.items()}
        for name, values in times.items():
            print(f"  {unit:4s} {name:48s} {medians[name]:6.3f} s   (min {min(v[pick] for v in values):.3f}, max {max(v[pick] for v in values):.3f})")
        print(f"  {unit:4s} with / without diagnostics: fit x{medians['fit, diagnostics'] / medians['fit, no diagnostics']:.3f}, "
              f"train task x{medians['train task (MLflow per epoch), diagnostics'] / medians['train task (MLflow per epoch), no diagnostics']:.3f}")
    alone = diagnostics_seconds(cfg_on, prepared, args.epochs)
    base = statistics.median(v[1] for v in times["fit, no diagnostics"])
    print(f"  the measurements alone: {alone * 1000:.1f} ms per {args.epochs} epochs = {alone / base:.1%} of the fit's CPU time without them")


if __name__ == "__main__":
    main()
