"""train_flow end to end: a real Prefect flow writing to a real (temporary) MLflow store."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
import uuid
from pathlib import Path

import joblib
import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from babysit.config import Config, load_config
from babysit.errors import BabysitError
from flows.train import RunSummary, train_flow
from tasks.data import load_splits

CONFIG = str(Path(__file__).resolve().parents[1] / "conf" / "digits_mlp.yaml")
EPOCHS = 3
OVERRIDES = [f"train.epochs={EPOCHS}", "model.hidden=[64]", "optim.lr=3e-3", "optim.schedule=constant", "train.device=cpu", "train.threads=1", "tracking.experiment=flow-test"]
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@dataclass(frozen=True)
class Finished:
    uri: str
    client: MlflowClient
    summary: RunSummary
    run: Run
    cwd: Path  # the working directory during the flow


@pytest.fixture(scope="module")
def finished(prefect_harness, tmp_path_factory) -> Finished:
    """One successful flow run into its own store (module-wide: a flow run costs seconds)."""
    store, cwd = tmp_path_factory.mktemp("flow"), tmp_path_factory.mktemp("cwd")
    uri = f"sqlite:///{store}/mlruns/mlflow.db"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(cwd)  # nothing may land in the working directory; a stray ./mlruns would show here
        summary = train_flow(config=CONFIG, overrides=OVERRIDES)
    torch.set_num_threads(threads)
    client = MlflowClient(tracking_uri=uri)
    return Finished(uri, client, summary, client.get_run(summary.run_id), cwd)


def store_folder(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).parent


def all_runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments]) if experiments else []


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_run_is_finished_in_the_configured_experiment(finished):
    uri, client, summary, run = finished.uri, finished.client, finished.summary, finished.run
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "flow-test"
    assert summary.tracking_uri == uri and summary.experiment_id == run.info.experiment_id
    assert [r.info.run_id for r in all_runs(uri)] == [summary.run_id]


def test_nothing_lands_in_the_working_directory(finished):
    assert sorted(p.name for p in finished.cwd.iterdir()) == []


def test_params_are_the_flattened_config(finished):
    run = finished.run
    params = run.data.params
    assert params["optim.lr"] == "0.003"
    assert params["model.init"] == "he"
    assert params["model.hidden"] == "[64]"
    assert params["train.epochs"] == str(EPOCHS)
    assert params["optim.weight_decay"] == "0.0001"  # from the YAML file
    assert params["data.source"] == "digits" and params["seed"] == "0"
    # every field of every section, nothing nested; but the data fields digits does not read (a digits run listed data.n_classes=3, QA)
    cfg = load_config(CONFIG, OVERRIDES)
    expected = {f"{section}.{field}" for section, model in cfg if hasattr(model, "model_fields") for field in type(model).model_fields}
    unread = {"data.path", "data.target", "data.drop_columns", "data.n_samples", "data.n_classes", "data.noise", "data.image_size", "data.channels", "data.download"}
    assert expected - unread <= set(params) and not unread & set(params)
    assert {"data.n_classes", "data.noise"} <= set(load_config(CONFIG, ["data.source=spiral"]).flat()) and "data.path" not in load_config(CONFIG, ["data.source=spiral"]).flat()


def test_each_epoch_metric_has_one_entry_per_epoch(finished):
    uri, client, summary, run = finished.uri, finished.client, finished.summary, finished.run
    for key in EPOCH_METRICS:
        history = sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key
    val_acc = [m.value for m in sorted(client.get_metric_history(summary.run_id, "val_acc"), key=lambda m: m.step)]
    assert summary.best_val_acc == pytest.approx(max(val_acc))
    assert summary.best_val_acc > 0.9
    assert [m.value for m in client.get_metric_history(summary.run_id, "lr")] == [pytest.approx(3e-3)] * EPOCHS


def test_epoch_metrics_are_written_in_batches_by_time(tmp_path):
    from babysit import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, "buffer", None, {}, {})
    batched = tracking.MetricBuffer(run, flush_seconds=3600)
    for epoch in (1, 2, 3):
        batched.log({"val_acc": epoch / 10}, step=epoch)
    assert tracking.metric_history(uri, run.run_id, "val_acc") == []  # within the interval: not written yet
    batched.flush(tags={"babysit.status": "finished"})
    assert tracking.metric_history(uri, run.run_id, "val_acc") == [0.1, 0.2, 0.3]
    assert tracking.get_run(uri, run.run_id).data.tags["babysit.status"] == "finished"
    eager = tracking.MetricBuffer(run, flush_seconds=0)
    eager.log({"train_loss": 1.5}, step=1)
    assert tracking.metric_history(uri, run.run_id, "train_loss") == [1.5]  # interval passed: written at once
    tracking.end_run(run)


def test_a_local_store_writes_ahead_with_normal_sync_and_other_databases_are_left_alone(tmp_path):
    import sqlite3

    import sqlalchemy

    from babysit import tracking

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    run = tracking.start_run(uri, "write-ahead", None, {"lr": 0.1}, {})
    tracking.end_run(run)
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:  # the mode is kept in the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # every new connection to the store syncs normally (1); SQLite's default is full (2)
    for url, sync, journal in ((uri, 1, "wal"), (f"sqlite:///{tmp_path}/other.db", 2, "delete")):
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == sync
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == journal
        engine.dispose()
    stored = tracking.get_run(uri, run.run_id)
    assert (stored.info.status, stored.data.params) == ("FINISHED", {"lr": "0.1"})


def test_outcome_metrics_match_the_summary(finished):
    summary, run = finished.summary, finished.run
    metrics = run.data.metrics
    assert metrics["test_acc"] == pytest.approx(summary.test_acc)
    assert metrics["best_val_acc"] == pytest.approx(summary.best_val_acc)
    assert metrics["initial_loss"] == pytest.approx(summary.initial_loss)
    assert summary.initial_loss == pytest.approx(math.log(10), abs=0.1)
    assert summary.epochs_run == EPOCHS and summary.stop_reason is None


def test_tags_carry_flags_and_provenance(prefect_harness, finished):
    summary, run = finished.summary, finished.run
    tags = run.data.tags
    assert "babysit.flags" in tags
    listed = set(filter(None, tags["babysit.flags"].split(","))) - {"none"}
    assert listed == set(summary.flags)
    assert all(tags[f"flag.{name}"] == reason for name, reason in summary.flags.items())
    assert tags["babysit.seed"] == "0" and tags["babysit.config_name"] == "digits_mlp"
    # the Prefect flow run that produced the MLflow run, and it completed
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(uuid.UUID(tags["prefect.flow_run_id"]))
    assert flow_run.state.is_completed()


def test_artifacts_config_curves_transformer(finished):
    uri, client, summary, run = finished.uri, finished.client, finished.summary, finished.run
    paths = artifact_paths(client, summary.run_id)
    assert {"config.yaml", "curves.png", "preprocess/transformer.joblib", "classes.json"} <= paths
    assert json.loads(Path(client.download_artifacts(summary.run_id, "classes.json")).read_text()) == [str(digit) for digit in range(10)]
    local = client.download_artifacts(summary.run_id, "config.yaml")
    logged = Config.model_validate(yaml.safe_load(Path(local).read_text()))
    assert logged == load_config(CONFIG, OVERRIDES)
    png = Path(client.download_artifacts(summary.run_id, "curves.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the transformer was fitted on the raw training split: its mean is that split's mean
    transformer = joblib.load(client.download_artifacts(summary.run_id, "preprocess/transformer.joblib"))
    cfg = load_config(CONFIG, OVERRIDES)
    raw = load_splits(cfg.data, cfg.seed)
    np.testing.assert_allclose(transformer.mean_, raw.X_train.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-9)


def test_logged_model_belongs_to_the_run_and_its_store(finished):
    uri, client, summary, run = finished.uri, finished.client, finished.summary, finished.run
    # MLflow 3: a run's model is a LoggedModel of the run's experiment, addressable as runs:/<run>/model
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{summary.run_id}'")
    assert [m.name for m in models] == ["model"]
    assert Path(models[0].artifact_location.removeprefix("file://")).is_relative_to(store_folder(uri))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve through the global tracking URI
    try:
        assert isinstance(mlflow.pytorch.load_model(f"runs:/{summary.run_id}/model"), torch.nn.Module)
    finally:
        mlflow.set_tracking_uri(previous)


def test_logged_model_predicts_raw_test_inputs(finished):
    uri, client, summary, run = finished.uri, finished.client, finished.summary, finished.run
    # the run records its model's id among its outputs
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).source_run_id == summary.run_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    finally:
        mlflow.set_tracking_uri(previous)
    cfg = load_config(CONFIG, OVERRIDES)
    raw = load_splits(cfg.data, cfg.seed)
    assert raw.X_test.max() == 16.0  # raw pixel intensities 0..16, not standardized
    with torch.no_grad():
        predicted = model(torch.as_tensor(raw.X_test)).argmax(1).numpy()
    assert np.mean(predicted == raw.y_test) == pytest.approx(summary.test_acc, abs=0.02)
    assert summary.test_acc > 0.85


def test_bad_data_raises_and_leaves_no_running_run(prefect_harness, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.csv"
    with pytest.raises(BabysitError) as err:
        train_flow(config=CONFIG, overrides=["data.source=csv", f"data.path={missing}", "data.target=label", "train.epochs=1"])
    assert str(missing) in str(err.value)
    assert [r.info.status for r in all_runs(tracking_uri) if r.info.status == "RUNNING"] == []


def test_a_failure_inside_the_run_ends_it_failed(prefect_harness, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the experiment's artifact folder is a file: the config and the store are fine, the run's first artifact write fails
    (tmp_path / "blocked").write_text("a file where the artifact folder should be")
    experiment = load_config(CONFIG).tracking.experiment
    MlflowClient(tracking_uri).create_experiment(experiment, artifact_location=str(tmp_path / "blocked"))
    with pytest.raises(Exception):
        train_flow(config=CONFIG, overrides=["train.epochs=1", "model.hidden=[8]"])
    runs = all_runs(tracking_uri)
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags.get("babysit.failure")


@pytest.mark.parametrize("source", ["broken.pt", "missing.pt", "runs:/0123456789abcdef0123456789abcdef/model"])
def test_a_bad_init_from_stops_the_train_flow_before_it_has_a_run(prefect_harness, tracking_uri, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BabysitError, match=r"`model.init_from` "):
        train_flow(config=CONFIG, overrides=[f"model.init_from={source}", "train.epochs=1", "model.hidden=[8]"])
    assert all_runs(tracking_uri) == []


def test_a_training_run_left_running_by_a_process_that_is_gone_is_ended_failed_by_the_next(prefect_harness, tracking_uri, tmp_path, monkeypatch):
    import subprocess
    import sys

    from babysit import owners, tracking

    monkeypatch.chdir(tmp_path)
    killed, alive = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    try:
        identities = {"killed": owners.process_identity(killed.pid), "alive": owners.process_identity(alive.pid)}
        killed.kill()
        killed.wait()
        left = {who: tracking.start_run(tracking_uri, "flow-test", who, {}, {"babysit.kind": "train", owners.TAG: identity})
                for who, identity in identities.items()}
        client = tracking._client(tracking_uri)  # killed while its model was logged: MLflow's model stays PENDING (QA)
        half_written = client.create_logged_model(left["killed"].experiment_id, source_run_id=left["killed"].run_id, name="model")
        summary = train_flow(config=CONFIG, overrides=OVERRIDES)
    finally:
        alive.kill()
    ended = tracking.get_run(tracking_uri, left["killed"].run_id)
    assert ended.info.status == "FAILED" and ended.data.tags["babysit.failure"].startswith("interrupted: its process ended")
    assert str(client.get_logged_model(half_written.model_id).status) == "FAILED"
    assert tracking.get_run(tracking_uri, left["alive"].run_id).info.status == "RUNNING"  # its process may still end it
    tags = tracking.get_run(tracking_uri, summary.run_id).data.tags
    assert tags["babysit.kind"] == "train" and tags[owners.TAG] == owners.process_identity()


def test_logged_best_val_acc_is_the_best_epochs_not_the_last(tmp_path, one_thread):
    # Adam at 0.05 is noisy: validation accuracy peaks before the last epoch, and the run's
    # best_val_acc (what a search ranks trials by) must be that peak, the kept weights' accuracy
    from babysit import tracking
    from tasks.preprocess import fit_preprocess
    from tasks.track import log_outcome
    from tasks.train import train_and_test

    cfg = load_config(None, ["model.hidden=[64]", "optim.lr=0.05", "train.epochs=8", "train.device=cpu", "train.threads=1", "train.diagnostics=false"])
    prepared = fit_preprocess(load_splits(cfg.data, 0), cfg.preprocess)
    result, _ = train_and_test(cfg, prepared)
    val_acc = result.history["val_acc"]
    assert val_acc[-1] < max(val_acc), "precondition: the last epoch is not the best one"
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    run = tracking.start_run(uri, "best-epoch", None, {}, {})
    log_outcome(run, cfg, result, {}, prepared)
    tracking.end_run(run)
    metrics = tracking.get_run(uri, run.run_id).data.metrics
    assert metrics["best_val_acc"] == pytest.approx(max(val_acc))
    assert metrics["best_epoch"] == val_acc.index(max(val_acc)) + 1


def test_processes_that_open_a_new_sqlite_store_at_once_all_get_it_whole(tmp_path):
    # two commands started together on a new store both migrated its schema: alembic tracebacks, and a
    # store left half-migrated for good (QA); 3 of 4 such processes failed here
    import subprocess
    import sys
    import time

    from babysit import tracking

    code = """
import os, sys, time
from babysit import tracking
import mlflow.store.tracking.sqlalchemy_store  # imported before the start: the processes race on the store, not on imports
open(os.path.join(sys.argv[1], f"ready-{os.getpid()}"), "w").close()
deadline = time.monotonic() + 180  # never left waiting, whatever happens to the test
while not os.path.exists(os.path.join(sys.argv[1], "go")) and time.monotonic() < deadline:
    time.sleep(0.001)
print(tracking.open_store(f"sqlite:///{sys.argv[1]}/mlflow.db", "babysit"))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {"1"}  # one experiment, created once
    run = tracking.start_run(f"sqlite:///{tmp_path}/mlflow.db", "babysit", None, {}, {})
    assert tracking.get_run(run.uri, run.run_id).info.experiment_id == "1"
