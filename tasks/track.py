"""Tracking stage: write a finished training's outcome to its MLflow run."""

from __future__ import annotations

import json
import math
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from babysit import plots, tracking
from babysit.config import Config
from tasks.build import InitReport
from tasks.preprocess import Prepared
from tasks.train import TrainResult, deployable, run_logger


def flag_tags(flags: dict[str, str]) -> dict[str, str]:
    """Flags as MLflow tags: 'babysit.flags' lists them, 'flag.<name>' holds each reason."""
    return {"babysit.flags": ",".join(sorted(flags)) or "none", **{f"flag.{name}": reason for name, reason in flags.items()}}


def flags_from_tags(tags: dict[str, str]) -> dict[str, str]:
    """A run's flags back from its tags (flag_tags' inverse): name -> reason."""
    return {key.removeprefix("flag."): reason for key, reason in sorted(tags.items()) if key.startswith("flag.")}


def outcome_metrics(result: TrainResult) -> dict[str, float]:
    """A training's summary metrics; test metrics only when the test split was read."""
    metrics = {
        "initial_loss": result.initial_loss,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
    }
    if not math.isnan(result.test_acc):
        metrics.update(test_loss=result.test_loss, test_acc=result.test_acc)
    return metrics


def log_init_report(run: tracking.RunRef, report: InitReport) -> None:
    # step = hidden layer index (1 = first), so MLflow's chart reads as the lecture's per-layer plot
    tracking.log_metric_series(run, report.layer_stats, first_step=1)
    tracking.log_metrics(run, {"n_params": report.n_params})
    tracking.set_tags(run, {"babysit.architecture": report.architecture})
    if report.histograms:
        figure = plots.activation_histograms(report.histograms, report.layer_stats)
        tracking.log_figure(run, figure, "init_activations.png")
        plots.close(figure)


def warn_init_flags(run: tracking.RunRef, flags: dict[str, str]) -> None:
    """Say what is wrong at init before the first epoch is spent, in the log and as run tags."""
    if flags:
        run_logger().warning("flags at init, before training: %s", "; ".join(f"{name}: {why}" for name, why in flags.items()))
        tracking.set_tags(run, flag_tags(flags))


def run_status(flags: dict[str, str], stop_reason: str | None = None) -> str:
    """babysit.status tag: 'diverged' when the loss blew up, 'pruned' when a search's pruner stopped it, else 'finished'."""
    return "diverged" if "diverged" in flags else "pruned" if stop_reason and stop_reason.startswith("pruned") else "finished"


def log_outcome(
    run: tracking.RunRef, cfg: Config, result: TrainResult, flags: dict[str, str], prepared: Prepared,
    report: str | None = None, model: nn.Module | None = None, raw_example: Any = None,
) -> None:
    """Outcome metrics and flags; artifacts: report, curves, config, the fitted transform and, given
    `model` and `raw_example` (and tracking.log_model), the model behind its preprocessing."""
    tracking.log_metrics(run, outcome_metrics(result), step=result.epochs_run)
    tracking.set_tags(run, {**flag_tags(flags), "babysit.stop_reason": result.stop_reason or "completed", "babysit.status": run_status(flags, result.stop_reason), **result.transfer})
    if report:
        tracking.log_text(run, report, "report.md")
    figure = plots.training_curves(result.history, cfg.name)
    tracking.log_figure(run, figure, "curves.png")
    plots.close(figure)
    tracking.log_text(run, cfg.to_yaml(), "config.yaml")
    # the model outputs class indices: output i is the label classes[i] (a CSV's 'setosa', a folder's name)
    tracking.log_text(run, json.dumps(prepared.splits.classes, indent=1) + "\n", "classes.json")
    tracking.log_pickle(run, prepared.transformer, "preprocess/transformer.joblib")
    if cfg.tracking.log_model and model is not None and raw_example is not None:
        tracking.log_torch_model(run, deployable(model, prepared), raw_example)


@task(name="log-results", cache_policy=NO_CACHE)
def log_results_task(
    run: tracking.RunRef, cfg: Config, result: TrainResult, flags: dict[str, str], prepared: Prepared,
    report: str | None = None, model: nn.Module | None = None, raw_example: Any = None,
) -> None:
    log_outcome(run, cfg, result, flags, prepared, report, model, raw_example)
