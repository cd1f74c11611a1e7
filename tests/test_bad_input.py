"""Bad input found by QA: each stops with exit status 2 and one paragraph that names the file or
field and what was expected; never a traceback, never an MLflow run left RUNNING."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

# Prefect binds its console log handler to sys.stderr when it is first imported. Imported here, at
# collection (as the flow tests do), that is pytest's session-long stream; first imported inside a
# test, it would be that test's captured stream, closed after it, and every later log line would
# print a "Logging error" traceback into the next test's output.
import flows.train  # noqa: F401
from babysit import tracking
from babysit.cli import main
from babysit.config import SearchExperiment, load_config
from babysit.errors import BabysitError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "conf" / "digits_mlp.yaml")
SEARCH = str(ROOT / "conf" / "search_digits.yaml")


def one_paragraph(text: str) -> str:
    """The message as one line; fails if it is more than one paragraph."""
    assert text.strip(), "nothing printed"
    assert "\n\n" not in text.strip(), text
    return " ".join(text.split())


def running_runs(uri: str) -> list[str]:
    """Ids of the store's RUNNING runs, in every experiment (deleted ones too); none without a store."""
    db = tracking.sqlite_path(uri)
    if db is not None and not db.exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r.info.run_id for r in client.search_runs(experiments, run_view_type=ViewType.ALL) if r.info.status == "RUNNING"]


def deleted_experiment(uri: str, name: str) -> str:
    """Create experiment `name` in the store at `uri` and delete it, as a user would in the UI; returns its id."""
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(name)
    client.delete_experiment(experiment_id)
    return experiment_id


# 1. Not UTF-8: PyYAML never sees the file; the error says which byte, where.


@pytest.mark.parametrize(("command", "content", "byte"), [("train", b"name: caf\xe9\n", "0xe9"), ("search", b"\xff\xfe", "0xff")], ids=["latin-1", "utf-16-bom"])
def test_a_config_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, tracking_uri, capsys, command, content, byte):
    path = tmp_path / "latin.yaml"
    path.write_bytes(content)
    assert main([command, str(path)]) == 2
    out, err = capsys.readouterr()
    message = one_paragraph(out)
    assert str(path) in message and "UTF-8" in message and byte in message and "line 1" in message
    assert "Traceback" not in out + err
    assert not tracking.sqlite_path(tracking_uri).exists()


# 2. Unknown keys inside a list of sections or an optional section list that section's fields.


@pytest.mark.parametrize(
    ("overrides", "stage_key", "expected"),
    [
        (["search.final.epoch=1"], None, "`search.final.epoch` (expected one of: epochs)"),
        (["search.stages.0.epoch=1"], None, "`search.stages.0.epoch` (expected one of: name, trials, epochs, prune"),
        ([], "trial", "`search.stages.1.trial` (expected one of: name, trials, epochs, prune"),
    ],
    ids=["final-override", "stage-override", "stage-yaml"],
)
def test_unknown_field_in_a_stage_or_the_final_lists_that_sections_fields(tmp_path, overrides, stage_key, expected):
    tree = yaml.safe_load(Path(SEARCH).read_text())
    if stage_key:
        tree["search"]["stages"][1][stage_key] = 3
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(BabysitError) as err:
        load_config(path, overrides, model=SearchExperiment)
    assert expected in " ".join(str(err.value).split())


# 5. A search file given to `train` or `check`: say which command reads it.


@pytest.mark.parametrize("command", ["train", "check"])
def test_train_or_check_on_a_search_file_points_to_babysit_search(tracking_uri, capsys, command):
    assert main([command, SEARCH]) == 2
    out, err = capsys.readouterr()
    message = one_paragraph(out)
    assert "unknown field `search`" in message and "search file" in message
    assert f"babysit search {SEARCH}" in message
    assert "Traceback" not in out + err


# 3. A deleted experiment keeps its name in MLflow and refuses runs.


def test_a_deleted_experiment_says_how_to_restore_it_and_creates_no_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    experiment_id = deleted_experiment(uri, "qa_deleted")
    with pytest.raises(BabysitError) as err:
        tracking.start_run(uri, "qa_deleted", None, {"lr": 0.1}, {})
    message = str(err.value)
    assert "`tracking.experiment` 'qa_deleted' is deleted" in message and uri in message
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in message
    assert "another name" in message
    assert running_runs(uri) == []
    assert MlflowClient(tracking_uri=uri).search_runs([experiment_id], run_view_type=ViewType.ALL) == []


def test_an_experiment_whose_artifacts_live_on_a_stopped_tracking_server_is_refused_before_a_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    tracking.open_store(uri, "babysit")  # the store's tables
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment("served", artifact_location="mlflow-artifacts:/1")  # as `mlflow server` makes them
    with pytest.raises(BabysitError, match=r"`tracking.experiment` 'served' in .* keeps its artifacts on an MLflow tracking server \(mlflow-artifacts:/1"):
        tracking.start_run(uri, "served", None, {"lr": 0.1}, {})
    assert MlflowClient(tracking_uri=uri).search_runs([experiment_id], run_view_type=ViewType.ALL) == []


# 4. A tracking URI MLflow refuses: its exception is translated where the store is first opened.


@pytest.mark.parametrize(("uri", "reason"), [("foo://bar", "no MLflow store takes the scheme 'foo'"), ("file://{tmp}/filestore", "filesystem tracking backend")],
                         ids=["unknown-scheme", "file-store"])
def test_an_unusable_tracking_uri_names_the_field_and_what_is_accepted(tmp_path, uri, reason):
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(BabysitError) as err:
        tracking.start_run(uri, "babysit", None, {"lr": 0.1}, {})
    message = str(err.value)
    assert f"the tracking URI '{uri}'" in message and reason in message
    assert "sqlite:///path/to/mlflow.db" in message and "http://" in message
    assert "\n" not in message and "migrate" not in message  # MLflow's reason, not its advice
    assert not (tmp_path / "filestore").exists()  # no store was made, so no run can be RUNNING


def test_a_tracking_server_that_does_not_answer_is_said_at_once():
    import time

    started = time.perf_counter()
    with pytest.raises(BabysitError, match=r"the tracking URI 'http://127.0.0.1:1' .*no MLflow tracking server answers there; start it"):
        tracking.open_store("http://127.0.0.1:1", "babysit")
    assert time.perf_counter() - started < 30  # MLflow's own retries took minutes


@pytest.mark.parametrize("uri, address", [("postgresql://babysit@127.0.0.1:1/runs", "127.0.0.1:1"), ("mysql+pymysql://u:p@127.0.0.1:1/runs", "127.0.0.1:1")])
def test_a_tracking_database_that_does_not_answer_is_said_at_once(uri, address):
    import time

    started = time.perf_counter()
    with pytest.raises(BabysitError, match=rf"the tracking URI '{re.escape(uri)}' .*no database answers at {address}; start it"):
        tracking.open_store(uri, "babysit")
    assert time.perf_counter() - started < 30  # MLflow's own retries took ~2 minutes, then a traceback
    assert tracking.database_address("postgresql://u@db.example/runs") == ("db.example", 5432)  # the server's default port
    assert tracking.database_address("postgresql:///runs") is None and tracking.database_address("sqlite:///x.db") is None


def test_a_store_in_a_folder_this_user_cannot_write_is_said_at_once(tmp_path):
    import os
    import subprocess

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway, unless the folder is immutable
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("needs a folder this user cannot write: a user other than root, or chattr")
    try:
        with pytest.raises(BabysitError, match=r"the MLflow store .*locked/mlflow.db cannot be written here: its folder .*locked is not writable"):
            tracking.open_store(f"sqlite:///{folder}/mlflow.db", "babysit")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_a_prefect_api_that_does_not_answer_is_said_before_a_flow_starts():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from babysit import servers

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        with pytest.raises(BabysitError, match=r"PREFECT_API_URL is http://127.0.0.1:1/api, where no Prefect server answers"):
            with servers.temporary_server_settings():
                pass


def test_a_prefect_api_address_where_another_server_answers_is_said_before_a_flow_starts(capsys):
    # QA: Prefect's address without /api (404 at /health), or MLflow's (200 "OK" at /health), ended in Prefect's traceback
    import http.server
    import threading

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from babysit import cli

    class AsMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            found = self.path == "/health"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"OK" if found else b"not found")

        def log_message(self, *args):
            pass

    for handler, path, said in ((AsMlflow, "", "200, 'OK'"), (AsMlflow, "/api", "404 Not Found")):
        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as other:
            threading.Thread(target=other.serve_forever, daemon=True).start()
            try:
                api = f"http://127.0.0.1:{other.server_address[1]}{path}"
                with temporary_settings({PREFECT_API_URL: api}):
                    assert cli.main(["train", "conf/digits_mlp.yaml", "--set", "train.epochs=1"]) == 2
            finally:
                other.shutdown()
        out = " ".join(capsys.readouterr().out.split())
        assert f"PREFECT_API_URL is {api}, where a server answers but not Prefect's API ({api}/health: {said})" in out, out
        assert "Traceback" not in out


# 3 and 4 through the CLI: the error is raised inside the train flow and still reads as one paragraph.


@pytest.mark.parametrize("problem", ["deleted experiment", "unusable uri"])
def test_store_errors_cross_the_train_flow_as_one_paragraph(prefect_harness, tracking_uri, tmp_path, capfd, monkeypatch, problem):
    monkeypatch.chdir(tmp_path)
    if problem == "deleted experiment":
        deleted_experiment(tracking_uri, "qa_deleted")
        overrides, expected = ["tracking.experiment=qa_deleted"], "mlflow experiments restore"
    else:
        overrides, expected = ["tracking.uri=foo://bar"], "the tracking URI 'foo://bar'"
    argv = ["train", DIGITS, "--set", "model.hidden=[8]", *[arg for item in overrides for arg in ("--set", item)]]
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2
    assert expected in one_paragraph(out)
    assert "Traceback" not in out + err and "MlflowException" not in out + err
    assert running_runs(tracking_uri) == []


@pytest.mark.parametrize("command", ["train", "search"])
def test_data_a_run_cannot_use_is_said_before_prefect_starts(tmp_path, tracking_uri, capsys, monkeypatch, command):
    # bad contents (not a missing file) were said only once the flow ran, after Prefect's server started: 20-90 s
    from prefect.settings import PREFECT_API_URL, temporary_settings

    table = tmp_path / "table.csv"
    table.write_text("a,b,kind\n" + "".join(f"{i},{i % 7},{i % 3}\n" for i in range(60)))
    config = SEARCH if command == "search" else DIGITS
    overrides = ["--set", "data.source=csv", "--set", f"data.path={table}", "--set", "data.target=label"]
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):  # nothing answers: reaching Prefect would be another error
        assert main([command, config, *overrides]) == 2
    said = one_paragraph(capsys.readouterr().out)
    assert "no target column 'label'" in said and "PREFECT_API_URL" not in said
    assert running_runs(tracking_uri) == []


def test_data_loaded_before_the_flow_is_handed_to_it_once(tmp_path):
    from tasks.data import load_ahead, load_data_task

    cfg = load_config(DIGITS)
    load_ahead(cfg.data, cfg.seed)
    first = load_data_task.fn(cfg.data, cfg.seed)
    again = load_data_task.fn(cfg.data, cfg.seed)  # a second flow in the same process reads the data itself
    assert first is not again and (first.X_train == again.X_train).all()
    other = cfg.data.model_copy(update={"val_fraction": 0.3})
    load_ahead(cfg.data, cfg.seed)
    assert len(load_data_task.fn(other, cfg.seed).y_val) != len(first.y_val)  # another config is not handed what was loaded for this one


def test_a_searched_batch_size_of_one_beside_the_files_batch_norm_is_refused_at_load(tmp_path):
    # int(1, 3) with model.batchnorm: true passed; 2 of 3 trials failed and the search flagged an edge on the one left (QA)
    with pytest.raises(BabysitError, match=r"search.space: `train.batch_size` cannot take 1: train.batch_size 1 with model.batchnorm: true"):
        load_config(SEARCH, ["model.batchnorm=true", "search.space={optim.lr: 'loguniform(1e-3, 1e-2)', train.batch_size: 'int(1, 3)'}"], model=SearchExperiment)
    load_config(SEARCH, ["model.batchnorm=true", "search.space={optim.lr: 'loguniform(1e-3, 1e-2)', train.batch_size: 'int(2, 3)'}"], model=SearchExperiment)


def test_a_run_whose_params_cannot_be_written_is_not_left_running(tmp_path):
    # QA: a deployment's first write failed after MLflow created the parent run, which stayed RUNNING
    from babysit import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(Exception, match="Invalid value|Invalid parameter|names may only contain"):
        tracking.start_run(uri, "params", "refused", {"a name MLflow refuses: #?*": 1}, {})
    (run,) = tracking.find_runs(uri, tracking.open_store(uri, "params"), {})
    assert run.info.status == "FAILED" and run.data.tags["babysit.failure"].startswith("MlflowException")
