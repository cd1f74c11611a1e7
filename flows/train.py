"""train_flow: config → data → preprocess → build → train → MLflow, one task per stage."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from babysit import owners, tracking
from babysit.provenance import provenance_tags
from babysit.config import Config, load_config, warmup_outlasts
from babysit.errors import BabysitError
from babysit.advice import run_report
from babysit.flags import init_flags, run_flags
from tasks.build import build_task
from tasks.data import load_data_task
from tasks.preprocess import preprocess_task
from tasks.track import log_init_report, log_results_task, warn_init_flags
from tasks.train import run_logger, train_task, training_device, transfer_source


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    best_val_acc: float
    test_acc: float
    best_epoch: int
    epochs_run: int
    initial_loss: float
    flags: dict[str, str]
    stop_reason: str | None
    url: str


def run_training(cfg: Config) -> RunSummary:
    """The train pipeline for an already validated config (used by train_flow and tests)."""
    training_device(cfg)  # a config that cannot train here stops the run before MLflow has one
    if problem := warmup_outlasts(cfg.optim.warmup_epochs, cfg.train.epochs, "train.epochs"):
        raise BabysitError(f"{cfg.name}: {problem}.")
    splits = load_data_task(cfg.data, cfg.seed)
    prepared = preprocess_task(splits, cfg.preprocess)
    s = prepared.splits
    source = transfer_source(cfg, s.input_shape, s.n_classes)  # a bad model.init_from stops here: no run is left FAILED
    init_report = build_task(cfg.model, s.input_shape, s.n_classes, cfg.seed, s.X_train[:256], source)  # what training starts from

    uri = tracking.resolve_uri(cfg.tracking.uri)
    kind_tag = {"babysit.kind": "train"}
    if ended := tracking.end_abandoned(uri, tracking.open_store(uri, cfg.tracking.experiment), kind_tag):
        run_logger().info("runs %s, left RUNNING by a process that ended before it could end them, are now FAILED", ", ".join(ended))
    run = tracking.start_run(uri, cfg.tracking.experiment, cfg.tracking.run_name, cfg.flat(), {**provenance_tags(cfg), **kind_tag, owners.TAG: owners.process_identity()})
    with tracking.finished_or_failed(run):
        log_init_report(run, init_report)
        warn_init_flags(run, init_flags(init_report.layer_stats, cfg.flags))  # before any epoch is spent
        result, model = train_task(cfg, prepared, run, source)
        flags = run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, init_report.layer_stats,
                          s.n_classes, cfg.optim.lr, transferred=bool(cfg.model.init_from), majority_share=s.majority_share)
        report = run_report(cfg.name, flags, result.history, result.initial_loss, result.diagnostics, result.stop_reason, run.run_id)
        log_results_task(run, cfg, result, flags, prepared, report, model, splits.X_train[:5])
    url = tracking.run_url(run)
    if runtime.flow_run.id is not None:
        create_link_artifact(link=url, link_text=f"MLflow run {run.run_id}", description=f"MLflow run of {cfg.name} (open with `babysit ui`)")
        create_markdown_artifact(markdown=report, key="babysit-report", description=f"flags and advice for {cfg.name} (`babysit report {run.run_id}`)")
    return RunSummary(
        run.run_id, run.experiment_id, uri, result.best_val_acc, result.test_acc, result.best_epoch,
        result.epochs_run, result.initial_loss, flags, result.stop_reason, url,
    )


@flow(name="train", flow_run_name="train-{config}")
def train_flow(config: str = "conf/digits_mlp.yaml", overrides: list[str] | None = None) -> RunSummary:
    """Train one model from a YAML experiment file plus `--set`-style overrides ('optim.lr=3e-3')."""
    return run_training(load_config(config, overrides))
