"""Every MLflow call babysit makes lives here; the rest of the code returns data.

Runs are addressed by an explicit `RunRef` (tracking URI + run id), never by MLflow's
thread-local "active run": trials run in threads and tasks may hop threads.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from babysit.errors import BabysitError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
UI_VIEW = "workflowType=machine_learning"  # opens MLflow 3's "Model training" view, not GenAI's


@dataclass(frozen=True)
class RunRef:
    uri: str
    run_id: str
    experiment_id: str


def resolve_uri(configured: str | None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the local SQLite store under mlruns/."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store sit beside the database, under <db folder>/artifacts."""
    db = sqlite_path(uri)
    return (db.resolve().parent / "artifacts").as_uri() if db else None


def _client(uri: str):
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        _write_ahead(db)
    return MlflowClient(tracking_uri=uri)


_WRITE_AHEAD: set[str] = set()  # the SQLite stores this process uses, as absolute paths


@functools.cache  # once per store path
def _write_ahead(db: Path) -> None:
    """Open SQLite store `db` in write-ahead-log mode, with normal sync, as Prefect opens its own
    database. In SQLite's default (rollback journal, full sync) every MLflow write holds the
    file's lock through two fsyncs and readers block writers, so trials in two worker processes
    waited on each other: measured here, a trial's four MLflow writes took 50-64 ms alone and
    3-27 ms more beside a second writer; with the log and normal sync 40-47 ms, and 0-9 ms more.
    Normal sync never corrupts the file; a power cut (not a killed process) can lose the last
    writes, which a resumed search redoes. WAL needs a local disk (not NFS), as SQLite says."""
    if not _WRITE_AHEAD:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _tune_sqlite)  # every connection MLflow opens from now on
    _WRITE_AHEAD.add(str(db.resolve()))


def _tune_sqlite(connection: Any, _record: Any) -> None:

    if not isinstance(connection, sqlite3.Connection):
        return
    main_file = next((row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"), "")
    if main_file in _WRITE_AHEAD:
        try:
            connection.execute("PRAGMA journal_mode = WAL")  # kept in the file: once per store
        except sqlite3.OperationalError:  # another process holds it in the old mode: keep that
            pass
        connection.execute("PRAGMA synchronous = NORMAL")  # per connection


def open_store(uri: str, experiment: str) -> str:
    """Create the store (tables, folders) and the experiment once, before any fan-out.

    Concurrent first use of a fresh SQLite database races on schema creation and loses runs,
    so callers do this in the flow, before trials start. Returns the experiment id. Raises
    BabysitError, before any run exists, when MLflow cannot use `uri` or `experiment` is deleted.
    """
    with _creating(uri):
        found = _find_experiment(uri, experiment)
        if found is None:
            return _client(uri).create_experiment(experiment, artifact_location=local_artifact_root(uri))
    if found.lifecycle_stage == "deleted":  # MLflow keeps the name taken, and refuses runs in it
        raise BabysitError(
            f"`tracking.experiment` '{experiment}' is deleted in the MLflow store at {uri} (experiment id {found.experiment_id}), "
            f"and MLflow creates no runs in a deleted experiment: restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
            f"--experiment-id {found.experiment_id}`, or choose another name (--set tracking.experiment=NAME)."
        )
    if found.artifact_location.startswith("mlflow-artifacts:") and not is_remote(uri):
        raise BabysitError(
            f"`tracking.experiment` '{experiment}' in {uri} keeps its artifacts on an MLflow tracking server ({found.artifact_location}: "
            "it was created through one, such as `babysit server up`'s), which this store cannot reach: start that server and use it "
            "(`babysit server up`, then the `export` lines of `babysit server env`), or (train, search) choose another experiment: --set tracking.experiment=NAME."
        )
    return found.experiment_id


@contextmanager
def _creating(uri: str) -> Iterator[None]:
    """For a SQLite store, one babysit process at a time creates its tables and experiments. Two
    commands started together on a new store both migrated its schema: one failed with alembic's
    traceback, and the store could be left half-migrated for good (QA); this one waits instead."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(f"{db}.lock", timeout=300)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:  # an OSError too: first
        raise BabysitError(f"the MLflow store {db} has been locked for 5 minutes by another process creating it ({db}.lock): "
                           "if no babysit command is running, delete that lock file and run again.") from None
    except OSError:  # a folder this user cannot write: the store's own check says so
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _find_experiment(uri: str, experiment: str) -> Any:
    """The experiment named `experiment` (deleted ones too), or None; this is the first use of the
    store, so MLflow's refusal of the URI itself (unknown scheme, file store) surfaces here."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            _check_writable(db)
            _check_sqlite_file(db)
        else:
            check_reachable(uri)
        return _client(uri).get_experiment_by_name(experiment)
    except (MlflowException, OSError, SQLAlchemyError) as err:
        raise unusable_store(uri, err) from None


def check_store(uri: str) -> None:
    """For commands that read a store (report, ensemble, ui): a BabysitError when MLflow cannot
    use `uri` (an unknown scheme, a file that is no database), before anything asks it for a run."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    check_reachable(uri)
    try:
        if (db := sqlite_path(uri)) is not None:
            _check_sqlite_file(db)
        _client(uri).search_experiments(max_results=1)
    except (MlflowException, OSError, SQLAlchemyError) as err:
        raise unusable_store(uri, err) from None


def _check_sqlite_file(db: Path) -> None:
    """An existing file that is no SQLite database: MLflow retried opening it for ~100 s."""
    if db.is_file() and db.stat().st_size:
        with open(db, "rb") as handle:
            if handle.read(16) != b"SQLite format 3\x00":
                raise OSError(f"{db} is not a SQLite database")


def _said(uri: str) -> str:
    # commands with a config read it from `tracking.uri`; report, ensemble and ui from --uri (QA: ui was told about a config field)
    return f"the tracking URI '{uri}' (`tracking.uri` of a config, a command's --uri, or $MLFLOW_TRACKING_URI)"


def unusable_store(uri: str, err: Exception) -> Exception:
    return BabysitError(
        f"{_said(uri)}: MLflow cannot use it as a tracking store "
        f"({_mlflow_reason(err, uri)}); expected sqlite:///path/to/mlflow.db (the default is {DEFAULT_URI}), "
        "an MLflow tracking server such as http://127.0.0.1:5000 (`babysit server up`), or a database URL (postgresql://..., mysql://...)."
    )


def check_reachable(uri: str) -> None:
    """A tracking server or database where nothing answers is a BabysitError at once: MLflow would
    retry for minutes, then fail with a traceback. Local stores pass."""
    from babysit.servers import answers, port_in_use

    said = _said(uri)
    if is_remote(uri) and urlparse(uri).scheme != "databricks":
        if not answers(uri):
            raise BabysitError(f"{said}: no MLflow tracking server answers there; start it (`babysit server up`), or unset "
                               f"MLFLOW_TRACKING_URI to use the local store {DEFAULT_URI}.")
    elif (address := database_address(uri)) is not None and not port_in_use(*address, timeout=5.0):  # MLflow would retry a refused database for minutes
        raise BabysitError(f"{said}: no database answers at {address[0]}:{address[1]}; start it, or unset MLFLOW_TRACKING_URI "
                           f"to use the local store {DEFAULT_URI}.")


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # the servers' defaults, for URLs that name none


def database_address(uri: str) -> tuple[str, int] | None:
    """(host, port) of a database server URL (postgresql://user@host/db), None for anything else."""
    backend = urlparse(uri).scheme.split("+")[0]
    if backend not in DATABASE_PORTS:
        return None
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    return (url.host, url.port or DATABASE_PORTS[backend]) if url.host else None  # no host: a local socket


def _check_writable(db: Path) -> None:
    """SQLite writes the database and, beside it, its -wal and -shm files: a folder or file this
    process cannot write is a BabysitError now, not minutes of MLflow's retries and a traceback."""
    unwritable = db if db.exists() and not os.access(db, os.R_OK | os.W_OK) else db.parent if not os.access(db.parent, os.W_OK | os.X_OK) else None
    if unwritable is not None:
        raise BabysitError(f"the MLflow store {db} cannot be written here: {'the file' if unwritable == db else 'its folder'} {unwritable} is not writable by "
                           "this user; choose a store in a writable folder (--set tracking.uri=sqlite:///path/to/mlflow.db, or MLFLOW_TRACKING_URI).")


def _mlflow_reason(err: Exception, uri: str) -> str:
    """MLflow's reason in one clause, without its paragraphs of migration advice."""
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    if isinstance(err, UnsupportedModelRegistryStoreURIException):  # its text speaks of the model registry, whichever store refused
        return f"no MLflow store takes the scheme '{urlparse(uri).scheme}'"
    return " ".join(str(err).split()).split(". ")[0].rstrip(".")[:300]


def forget_connections_after_fork() -> None:
    """Call first thing in a forked child process: drops the database connections inherited from
    the parent without closing them (SQLAlchemy's recipe for os.fork, `Engine.dispose(close=False)`),
    so the child opens its own instead of sharing the parent's SQLite file handles."""

    for module in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store"):
        store = getattr(sys.modules.get(module), "SqlAlchemyStore", None)
        for engine in list(getattr(store, "_engine_map", {}).values()):
            engine.dispose(close=False)


def start_run(uri: str, experiment: str, run_name: str | None, params: dict[str, Any], tags: dict[str, str], parent: RunRef | None = None) -> RunRef:
    from mlflow.entities import Param

    experiment_id = parent.experiment_id if parent is not None else open_store(uri, experiment)
    client = _client(uri)
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent.run_id}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    try:
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
    except BaseException as err:  # not left RUNNING by a failed write (QA), nor by Ctrl-C between the two
        if lost_server(err) is None:  # a server that is gone would hold each write for its retries too: a rerun marks it
            with suppress(Exception):
                client.log_batch(run.info.run_id, tags=_run_tags({"babysit.failure": failure_reason(err)}))
            with suppress(Exception):
                client.set_terminated(run.info.run_id, "FAILED")
        raise
    return RunRef(uri, run.info.run_id, experiment_id)


MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000  # what MLflow accepts in one log_batch


def _metric_entities(points: Iterator[tuple[str, float, int]]) -> list:
    """MLflow Metric entities for (key, value, step) points, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value, step in points]


def _write(run: RunRef, metrics: list, tags: list | None = None) -> None:
    """`metrics` in as few log_batch calls as MLflow allows; `tags` with the first."""
    client = _client(run.uri)
    for start in range(0, max(len(metrics), 1), MAX_METRICS_PER_BATCH):
        chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
        if chunk or tags:
            client.log_batch(run.run_id, metrics=chunk, tags=tags or [])
        tags = None


def log_metrics(run: RunRef, metrics: dict[str, float], step: int = 0) -> None:
    """One batched write for all `metrics` at `step` (a per-value log_metric costs ~4 ms on SQLite)."""
    _write(run, _metric_entities((key, value, step) for key, value in metrics.items()))


class MetricBuffer:
    """Per-step metrics of one run, written in one batch when `flush_seconds` have passed since
    the last write, and by `flush`. A write costs ~10 ms on SQLite whatever its size, which is a
    whole epoch of a small model: epochs shorter than `flush_seconds` share writes; longer ones
    are written as they end. Call `flush` when the run ends, also when it fails.
    """

    def __init__(self, run: RunRef, flush_seconds: float):
        self.run, self.flush_seconds = run, flush_seconds
        self._pending: list = []
        self._last_write = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._pending += _metric_entities((key, value, step) for key, value in metrics.items())
        if time.monotonic() - self._last_write >= self.flush_seconds:
            self.flush()

    def flush(self, tags: dict[str, str] | None = None) -> None:
        """Write what is pending, and `tags`, in one call."""
        _write(self.run, self._pending, _run_tags(tags))
        self._pending, self._last_write = [], time.monotonic()


def log_metric_series(run: RunRef, series: dict[str, list[float]], first_step: int = 0) -> None:
    """Whole histories in one write: {'layer_std': [..]} becomes steps first_step, first_step+1, ..."""
    _write(run, _metric_entities((key, value, first_step + i) for key, values in series.items() for i, value in enumerate(values)))


def _run_tags(tags: dict[str, str] | None) -> list:
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)[:5000]) for key, value in (tags or {}).items()]  # MLflow's limit on a tag value


def set_tags(run: RunRef, tags: dict[str, str]) -> None:
    if tags:
        _client(run.uri).log_batch(run.run_id, tags=_run_tags(tags))


def log_text(run: RunRef, text: str, artifact_file: str) -> None:
    _client(run.uri).log_text(run.run_id, text, artifact_file)


def log_figure(run: RunRef, figure: Any, artifact_file: str) -> None:
    _client(run.uri).log_figure(run.run_id, figure, artifact_file)


def log_image(run: RunRef, pixels: Any, artifact_file: str) -> None:
    """An opaque image (numpy array of uint8, height × width × 3 or 4) as a PNG artifact."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        # RGB at zlib level 1: as small as MLflow's RGBA at level 6, in half the time (search.png: 0.03 s saved, every search)
        Image.fromarray(pixels[..., :3]).save(path, compress_level=1)
        log_file(run, path, artifact_folder(artifact_file))


def log_file(run: RunRef, path: str | Path, artifact_dir: str | None = None) -> None:
    _client(run.uri).log_artifact(run.run_id, str(path), artifact_dir)


def artifact_folder(artifact_file: str) -> str | None:
    """The folder of a run's artifact path ('plots/a.png' -> 'plots'); None at the top."""
    parent = Path(artifact_file).parent
    return None if parent == Path(".") else parent.as_posix()


def log_pickle(run: RunRef, obj: Any, artifact_file: str) -> None:
    """Save a fitted scikit-learn object with joblib as a run artifact."""
    import joblib

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        joblib.dump(obj, path)
        log_file(run, path, artifact_folder(artifact_file))


def log_torch_model(run: RunRef, model: Any, input_example: Any) -> str:
    """Log a torch module (eval mode, on the CPU) with its signature; returns the model URI."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    # Create the LoggedModel in the run's own experiment: left to itself, log_model files it
    # under the process's active experiment (Default), away from the run.
    logged = _client(run.uri).create_logged_model(run.experiment_id, name="model", source_run_id=run.run_id, model_type="pytorch")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(run.uri)  # log_model resolves its store from the global URI
    try:
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            run_id=run.run_id,
            model_id=logged.model_id,
            signature=infer_signature(input_example, output),
            input_example=input_example,
            # Explicit requirements: inferring them imports and probes the model (seconds).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    finally:  # set_tracking_uri also sets $MLFLOW_TRACKING_URI, which resolve_uri reads: the next run of this process would use this store
        mlflow.set_tracking_uri(before)
    return info.model_uri


def load_torch_model(model_uri: str, uri: str) -> Any:
    """A logged torch model, e.g. 'runs:/<run id>/model', from the store `uri` (the run's own), or
    from a local or storage path. Raises BabysitError if it cannot be found. Changes no global state.

    mlflow.pytorch.load_model(model_uri) alone asks MLflow's process-wide tracking URI, which in a
    fresh `babysit train` is sqlite:///mlflow.db in the working directory (QA: the README's transfer
    step found no run there, and left that file behind). download_artifacts takes the store, but
    in MLflow 3 a runs:/ URI leads to a logged model (models:/<model id>), which MLflow resolves in
    the process-wide store again. So this store's client turns runs:/ and models:/ URIs into the
    model's artifact location, and the artifacts are downloaded from there and loaded locally."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # asking would create an empty store there, which holds no run
        raise BabysitError(f"`model.init_from` {model_uri}: the tracking store {uri} (tracking.uri, else $MLFLOW_TRACKING_URI) does not exist yet, "
                           "so it holds no run; set tracking.uri to the store that the source run was logged to.")
    scheme = urlparse(model_uri).scheme
    try:
        location, client = model_uri, _client(uri) if scheme in ("runs", "models") else None
        if scheme == "runs":  # runs:/<run id>/<model name>: the logged model of that name, else (MLflow 2) the run's own artifacts
            run_id, _, name = model_uri.removeprefix("runs:").strip("/").partition("/")
            logged = client.search_logged_models([client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
            location = logged[0].artifact_location if logged else model_uri
        elif scheme == "models":  # models:/<model id>, or a registered models:/<name>/<version>, /<stage> or @<alias>
            found = get_model_name_and_version(client, model_uri)
            location = client.get_logged_model(found[0]).artifact_location if len(found) == 1 else client.get_model_version_download_uri(*found)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp, tracking_uri=uri)
            return mlflow.pytorch.load_model(local, map_location="cpu")
    except ImportError as err:  # s3://, gs://, ...: MLflow reads them with a client library of that storage
        raise BabysitError(f"`model.init_from` {model_uri}: MLflow needs the Python package `{err.name}` to read it; install it "
                           f"(`pip install {err.name}`), or download the model and give its folder or a state-dict file.") from None
    except (MlflowException, OSError) as err:
        raise BabysitError(f"`model.init_from` {model_uri}: neither a file nor a loadable MLflow model in the tracking store {uri} "
                           f"(tracking.uri, else $MLFLOW_TRACKING_URI): {' '.join(str(err).split())[:200]}") from None


def end_run(run: RunRef, status: str = "FINISHED") -> None:
    _client(run.uri).set_terminated(run.run_id, status=status)


def fail(run: RunRef, reason: str) -> None:
    """End `run` FAILED, with `reason` in its tag babysit.failure."""
    set_tags(run, {"babysit.failure": reason})
    end_run(run, "FAILED")


@contextmanager
def finished_or_failed(run: RunRef) -> Iterator[RunRef]:
    """End `run` FINISHED when the block completes, FAILED (with the reason) if it raises or is
    killed; unless its tracking server stopped answering: then MLflow would retry each of those
    writes before failing too, and the next command on the store ends the run (babysit.owners)."""
    try:
        yield run
    except BaseException as err:
        if lost_server(err) is None:
            fail(run, failure_reason(err))
        raise
    end_run(run, "FINISHED")


def failure_reason(err: BaseException) -> str:
    """babysit.failure's text: the error, or what interrupted the run (Ctrl-C, or a signal such as
    the SIGTERM of `kill`, `timeout` and process managers, which Prefect raises as TerminationSignal)."""
    if isinstance(err, Exception):
        return f"{type(err).__name__}: {err}"
    signum = getattr(err, "signal", None)
    return f"interrupted ({signal.Signals(signum).name})" if signum else "interrupted"


def lost_server(err: BaseException) -> str | None:
    """The address of the MLflow tracking server when `err`, or an exception it came from, is
    MLflow giving up on a request to it and the server does not answer now; else None."""

    from babysit.servers import answers

    while err is not None:
        if found := re.search(r"API request to (https?://\S+?)/api/", str(err)):
            return found[1] if not answers(found[1]) else None
        err = err.__cause__ or err.__context__
    return None


def end_abandoned(uri: str, experiment_id: str, tags: dict[str, str]) -> list[str]:
    """End FAILED the RUNNING runs with `tags` whose process (babysit.owners) has ended on this
    machine, killed or cut off from its tracking server before it could end them; their ids."""
    from babysit.owners import TAG, gone_here

    ended = []
    for found in find_runs(uri, experiment_id, tags):
        if found.info.status == "RUNNING" and gone_here(found.data.tags.get(TAG, "")):
            fail(RunRef(uri, found.info.run_id, experiment_id), "interrupted: its process ended before it ended the run")
            fail_pending_models(uri, experiment_id, found.info.run_id)
            ended.append(found.info.run_id)
    return ended


def fail_pending_models(uri: str, experiment_id: str, run_id: str) -> None:
    """Mark FAILED the models of a run that its killed process left PENDING, half-written (QA:
    a kill -9 while the model was logged left one in MLflow's Models view for good)."""
    from mlflow.entities import LoggedModelStatus

    client = _client(uri)
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def log_csv(run: RunRef, frame: Any, artifact_file: str) -> None:
    """A pandas DataFrame as a CSV artifact."""
    _client(run.uri).log_text(run.run_id, frame.to_csv(index=False), artifact_file)


def find_runs(uri: str, experiment_id: str, tags: dict[str, str], newest_first: bool = True) -> list:
    """Runs of an experiment whose tags equal `tags` (all of them)."""
    from mlflow.entities import ViewType

    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
    runs, token = [], None
    while True:
        page = _client(uri).search_runs([experiment_id], query, ViewType.ACTIVE_ONLY, max_results=1000, order_by=order, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def reopen_run(uri: str, run: Any, stale: tuple[str, ...] = ()) -> RunRef:
    """Mark an earlier run (as find_runs returned it) RUNNING again, to resume it: why it failed
    then no longer holds, nor its tags named or prefixed by `stale` (what the resumed run writes
    afresh when it ends)."""
    client = _client(uri)
    for key in run.data.tags:
        if key == "babysit.failure" or key.startswith(stale):
            client.delete_tag(run.info.run_id, key)
    client.update_run(run.info.run_id, status="RUNNING")
    return RunRef(uri, run.info.run_id, run.info.experiment_id)


def mark_failed(uri: str, run_id: str, reason: str, experiment_id: str) -> None:
    """End a trial's run that a killed process left RUNNING, tagged as a trial that failed."""
    run = RunRef(uri, run_id, experiment_id)
    set_tags(run, {"babysit.failure": reason, "babysit.status": "failed"})
    end_run(run, "FAILED")
    fail_pending_models(uri, experiment_id, run_id)  # a final retrain logs its model


def get_run(uri: str, run_id: str):
    return _client(uri).get_run(run_id)


def served_artifacts(uri: str) -> Path | None:
    """Where `babysit server up` keeps the artifacts it serves for the SQLite store `uri` (beside
    it); None for other stores. A local UI or report reads them there when the server is down."""
    db = sqlite_path(uri)
    return db.parent / "served-artifacts" if db is not None else None


def read_text(uri: str, run_id: str, artifact_file: str) -> str:
    """A text artifact of a run (e.g. report.md); for a run logged through `babysit server up`
    on this store, read from the server's folder (QA: with the server down, report said no report.md)."""
    client = _client(uri)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    if artifact_uri.startswith("mlflow-artifacts:") and (served := served_artifacts(uri)) is not None:
        local = served / urlparse(artifact_uri).path.lstrip("/") / artifact_file
        if local.is_file():
            return local.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, artifact_file, tmp)).read_text()


def experiment_name(uri: str, experiment_id: str) -> str:
    return _client(uri).get_experiment(experiment_id).name


def metric_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


@dataclass(frozen=True)
class RunRecord:
    """A logged run read back: what `babysit report` needs to rebuild the run's report."""

    run_id: str
    experiment_id: str
    status: str  # MLflow's: FINISHED, FAILED, RUNNING, ...
    tags: dict[str, str]
    metrics: dict[str, float]  # the last value of each metric
    histories: dict[str, list[float]]  # the requested metrics, ordered by step


def read_run(uri: str, run_id: str, history_keys: tuple[str, ...] = ()) -> RunRecord:
    """Read run `run_id` with the step-ordered history of each metric in `history_keys` (a key
    ending in '/' stands for every metric under that prefix). Raises BabysitError when the store
    or the run does not exist; a missing SQLite file is not created.
    """
    from mlflow.exceptions import MlflowException

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise BabysitError(f"no MLflow store at {db} (tracking URI {uri}): train a model first, or pass --uri / set MLFLOW_TRACKING_URI to the store that holds run '{run_id}'.")
    check_store(uri)  # else a file that is no database was a traceback, and an unknown scheme "no MLflow run" (QA)
    try:
        run = get_run(uri, run_id)
    except MlflowException:
        raise BabysitError(f"no MLflow run '{run_id}' in {uri}: check the id (`babysit ui` lists runs), or pass --uri / set MLFLOW_TRACKING_URI to the store that holds it.") from None
    wanted = [key for key in run.data.metrics if key in history_keys or any(p.endswith("/") and key.startswith(p) for p in history_keys)]
    return RunRecord(run_id, run.info.experiment_id, run.info.status, dict(run.data.tags), dict(run.data.metrics), {key: metric_history(uri, run_id, key) for key in wanted})


def run_url(run: RunRef, host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where a tracking server's UI, or else `babysit ui`, shows this run."""
    ui = run.uri.rstrip("/") if urlparse(run.uri).scheme in ("http", "https") else f"http://{host}:{port}"
    return f"{ui}/#/experiments/{run.experiment_id}/runs/{run.run_id}?{UI_VIEW}"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https", "databricks")
