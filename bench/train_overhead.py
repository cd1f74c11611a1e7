"""Overhead of babysit's train task (with its MLflow tracking) over a bare PyTorch loop.

Same model (same init), same data, same epochs, in one process; runs alternate and the figures
are medians over --repeats after one untimed warm-up of each (the first torch run and the
first MLflow model log pay one-off import and allocation costs). Every case is timed from
building the model to the test accuracy:

  bare PyTorch loop     what a person writes by hand: Adam, shuffled index slices, validation
                        accuracy per epoch, test accuracy at the end; nothing logged
  train task            tasks.train.train_task: the same, plus initial loss, train/val loss and
                        accuracy, lr schedule, per-layer diagnostics, best-weights restore, and
                        every epoch's metrics in MLflow (tracking.MetricBuffer)
  + run artifacts       plus the tracking stage (tasks.track.log_outcome): outcome metrics,
                        flag tags, curves PNG, config YAML, fitted transform and the model (pt2):
                        a fixed cost per run, whatever the number of epochs

    .venv/bin/python bench/train_overhead.py [--epochs 20] [--repeats 15]

Two torch threads on a shared 2-core machine swing one and the same run by ±15%: the script
prints the ratio of medians and the ratio of the fastest runs (the least disturbed estimate).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from babysit import tracking
from babysit.config import load_config
from models.mlp import build_model
from tasks.data import load_splits
from tasks.preprocess import fit_preprocess
from tasks.track import log_outcome
from tasks.train import train_task


def bare_loop(cfg, prepared) -> float:
    """The loop a person would write by hand: Adam, shuffled index slices, val accuracy per epoch."""
    s = prepared.splits
    started = time.perf_counter()
    X, y = torch.as_tensor(s.X_train), torch.as_tensor(s.y_train)
    X_val, y_val = torch.as_tensor(s.X_val), torch.as_tensor(s.y_val)
    model = build_model(cfg.model, s.input_shape, s.n_classes, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(y))
        for start in range(0, len(y), cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            (model(X_val).argmax(1) == y_val).float().mean().item()
    with torch.no_grad():
        (model(torch.as_tensor(s.X_test)).argmax(1) == torch.as_tensor(s.y_test)).float().mean().item()
    return time.perf_counter() - started


def babysit_task(cfg, prepared, uri: str, raw_example=None) -> float:
    """train_task; with `raw_example`, also the tracking stage's artifacts (model included)."""
    run = tracking.start_run(uri, "bench", None, cfg.flat(), {})
    started = time.perf_counter()
    result, model = train_task.fn(cfg, prepared, run)
    if raw_example is not None:
        log_outcome(run, cfg, result, {}, prepared, model=model, raw_example=raw_example)
    elapsed = time.perf_counter() - started
    tracking.end_run(run)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/digits_mlp.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    cfg = load_config(args.config, [f"train.epochs={args.epochs}", "train.device=cpu"])
    splits = load_splits(cfg.data, cfg.seed)
    prepared = fit_preprocess(splits, cfg.preprocess)
    scratch = tempfile.TemporaryDirectory(prefix="bench-train-", ignore_cleanup_errors=True)  # removed at exit
    uri = f"sqlite:///{scratch.name}/mlflow.db"
    tracking.open_store(uri, "bench")  # schema creation is a one-off cost of a new store

    cases = {
        "bare PyTorch loop": lambda: bare_loop(cfg, prepared),
        "babysit train task (epoch metrics in MLflow)": lambda: babysit_task(cfg, prepared, uri),
        "  + run artifacts (curves, config, model)": lambda: babysit_task(cfg, prepared, uri, splits.X_train[:5]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, case in cases.items():  # warm-up, untimed
        case()
    for _ in range(args.repeats):
        for name, case in cases.items():
            times[name].append(case())

    base = statistics.median(times["bare PyTorch loop"])
    print(f"digits MLP {cfg.model.hidden}, {args.epochs} epochs, batch {cfg.train.batch_size}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:45s} {median:6.3f} s   x{median / base:5.2f}   (min {min(values):.3f}, max {max(values):.3f})")
    task_times = times["babysit train task (epoch metrics in MLflow)"]
    task = statistics.median(task_times)
    fastest = min(task_times) / min(times["bare PyTorch loop"])
    artifacts = statistics.median(times["  + run artifacts (curves, config, model)"]) - task
    print(f"  train task vs bare: x{task / base:.2f} median, x{fastest:.2f} fastest runs [goal <= x1.10: "
          f"{'MET' if task / base <= 1.10 else 'NOT MET'} on the medians]; run artifacts: +{artifacts:.2f} s per run, whatever the epochs")


if __name__ == "__main__":
    main()
