"""Tracking stage: write a finished training's outcome to its MLflow run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from babysit import plots, tracking
from babysit.config import Config
from tasks.build import InitReport
from tasks.preprocess import Prepared
from tasks.train import TrainResult


def flag_tags(flags: dict[str, str]) -> dict[str, str]:
    """Flags as MLflow tags: 'babysit.flags' lists them, 'flag.<name>' holds each reason."""
    return {"babysit.flags": ",".join(sorted(flags)) or "none", **{f"flag.{name}": reason for name, reason in flags.items()}}


def outcome_metrics(result: TrainResult) -> dict[str, float]:
    return {
        "initial_loss": result.initial_loss,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "test_loss": result.test_loss,
        "test_acc": result.test_acc,
        "train_seconds": result.seconds,
    }


def log_init_report(run: tracking.RunRef, report: InitReport) -> None:
    # step = hidden layer index (1 = first), so MLflow's chart reads as the lecture's per-layer plot
    tracking.log_metric_series(run, report.layer_stats, first_step=1)
    tracking.log_metrics(run, {"n_params": report.n_params})
    tracking.set_tags(run, {"babysit.architecture": report.architecture})


def log_outcome(run: tracking.RunRef, cfg: Config, result: TrainResult, flags: dict[str, str], prepared: Prepared) -> None:
    tracking.log_metrics(run, outcome_metrics(result), step=result.epochs_run)
    tracking.set_tags(run, {**flag_tags(flags), "babysit.stop_reason": result.stop_reason or "completed"})
    figure = plots.training_curves(result.history, cfg.name)
    tracking.log_figure(run, figure, "curves.png")
    plots.close(figure)
    tracking.log_text(run, cfg.to_yaml(), "config.yaml")
    tracking.log_pickle(run, prepared.transformer, "preprocess/transformer.joblib")


@task(name="log-results", cache_policy=NO_CACHE)
def log_results_task(run: tracking.RunRef, cfg: Config, result: TrainResult, flags: dict[str, str], prepared: Prepared) -> None:
    log_outcome(run, cfg, result, flags, prepared)
