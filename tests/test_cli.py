"""`babysit train`: bad input exits 2 with one paragraph naming the field, no traceback, no MLflow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from babysit import tracking
from babysit.cli import main, parser

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "conf" / "digits_mlp.yaml")
SEARCH = str(ROOT / "conf" / "search_digits.yaml")


def store_is_empty(uri: str) -> bool:
    """No database at all, or one without runs."""
    db = tracking.sqlite_path(uri)
    if not db.exists():
        return True
    client = MlflowClient(tracking_uri=uri)
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def one_paragraph(text: str) -> str:
    """The message as one line; fails if it is more than one paragraph."""
    assert text.strip(), "nothing printed"
    assert "\n\n" not in text.strip(), text
    return " ".join(text.split())


def bad_yaml(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize(
    ("tree", "overrides", "field"),
    [
        ({"model": {"activaton": "relu"}}, [], "model.activaton"),
        ({"optim": {"lr": -1}}, [], "optim.lr"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.6}}, [], "val_fraction"),
        ({}, ["optim.lr=-3e-3"], "optim.lr"),
        ({}, ["model.init=kaiming"], "model.init"),
        ({}, ["train.epochs=lots"], "train.epochs"),
        ({}, ["optim.lr"], "optim.lr"),  # no '=': not FIELD=VALUE
    ],
)
def test_bad_config_or_set_exits_2_naming_the_field(tmp_path, tracking_uri, capsys, tree, overrides, field):
    path = bad_yaml(tmp_path, tree)
    argv = ["train", path] + [arg for item in overrides for arg in ("--set", item)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    message = one_paragraph(out)
    assert message.startswith("error:")
    assert field in message
    assert "Traceback" not in out + err
    assert store_is_empty(tracking_uri)
    assert not tracking.sqlite_path(tracking_uri).exists()  # the store was not even created


def test_missing_config_file_exits_2(tmp_path, tracking_uri, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["train", str(path)]) == 2
    out, err = capsys.readouterr()
    assert str(path) in one_paragraph(out)
    assert "Traceback" not in out + err
    assert store_is_empty(tracking_uri)


def test_invalid_yaml_exits_2(tmp_path, tracking_uri, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: {lr: 0.1\n")
    assert main(["train", str(path)]) == 2
    out, err = capsys.readouterr()
    assert str(path) in one_paragraph(out)
    assert "Traceback" not in out + err


def test_console_script_exits_2_without_traceback(tmp_path, tracking_uri):
    # the installed `babysit` entry point, as a user runs it (validation fails before Prefect starts)
    path = bad_yaml(tmp_path, {"model": {"hidden": [32, "wide"]}})
    script = Path(sys.executable).parent / "babysit"
    done = subprocess.run([str(script), "train", path, "--set", "optim.lr=1e-3"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    message = one_paragraph(done.stdout)
    assert path in message and "model.hidden" in message
    assert "Traceback" not in done.stdout + done.stderr
    assert store_is_empty(tracking_uri)
    assert not (tmp_path / "mlruns").exists()


def test_a_missing_data_file_or_device_stops_a_search_before_prefect_starts(tmp_path, tracking_uri):
    # the installed `babysit`, as a user runs it: no temporary Prefect server is started for a run that cannot start
    script = Path(sys.executable).parent / "babysit"
    missing = tmp_path / "absent.csv"
    for problem, said in [(["--set", "data.source=csv", "--set", f"data.path={missing}", "--set", "data.target=label"], f"{missing}: data file not found"),
                          (["--set", "search.space.train.device=choice([cpu, cuda:99])"], "`train.device` offers 'cuda:99'")]:
        done = subprocess.run([str(script), "search", SEARCH, *problem], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2 and said in " ".join(done.stdout.split())
        assert "Starting temporary server" not in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    assert store_is_empty(tracking_uri)


def test_bad_data_file_exits_2_without_traceback(prefect_harness, tracking_uri, tmp_path, capfd, monkeypatch):
    # a file that exists but cannot be used is read inside the flow: the error crosses Prefect and still reads as one paragraph
    monkeypatch.chdir(tmp_path)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("a,b\n1,2\n3,4\n")
    code = main(["train", DIGITS, "--set", "data.source=csv", "--set", f"data.path={unlabelled}", "--set", "data.target=label"])
    out, err = capfd.readouterr()
    assert code == 2
    assert str(unlabelled) in " ".join(out.split()) and "label" in out
    assert "Traceback" not in out + err
    assert "failed with exception" not in out + err and "Encountered exception" not in out + err  # said once, at the end
    assert store_is_empty(tracking_uri)


def test_train_prints_the_summary(prefect_harness, tracking_uri, tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    code = main(["train", DIGITS, "--set", "train.epochs=1", "--set", "model.hidden=[16]", "--set", "train.threads=1", "--set", "tracking.log_model=false",
                 "--set", "name=digits[/b]"])  # a name that reads as console markup is printed as written
    torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out
    assert "test accuracy" in out and f"{run.data.metrics['test_acc']:.4f}" in out
    assert "babysit ui" in out and "babysit train: digits[/b]" in out


def test_train_says_a_test_accuracy_with_no_epoch_scored_is_the_initial_weights(prefect_harness, tracking_uri, tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    code = main(["train", DIGITS, "--set", "train.epochs=2", "--set", "optim={name: sgd, lr: 50.0}", "--set", "train.threads=1", "--set", "train.diagnostics=false"])
    torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "none (1 epoch(s) run, none scored; see flags)" in out
    assert "(the initial weights: no epoch scored)" in out


def test_train_on_another_store_hints_at_it_even_after_logging_a_model(prefect_harness, tracking_uri, tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    other = f"sqlite:///{tmp_path}/other.db"  # logging the model sets MLflow's URI in this process: the hint must not follow it
    code = main(["train", DIGITS, "--set", "train.epochs=1", "--set", "model.hidden=[16]", "--set", "train.threads=1", "--set", f"tracking.uri={other}"])
    torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    (run,) = MlflowClient(tracking_uri=other).search_runs([e.experiment_id for e in MlflowClient(tracking_uri=other).search_experiments()])
    assert code == 0
    # each on a line of its own, whole however narrow the terminal: to copy
    assert any(line.startswith(f"see it: babysit ui --uri {other}  →  http://127.0.0.1:5000/#/experiments/") and run.info.run_id in line for line in lines)
    assert f"what next: babysit report {run.info.run_id} --uri {other}" in lines
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_uri  # put back: the next run of this process goes to its own store


def test_help_shows_a_search_file_for_search_and_the_ensembles_default_size(capsys):
    for argv, shown in ((["search", "--help"], "conf/search_digits.yaml"), (["train", "--help"], "conf/digits_mlp.yaml"), (["ensemble", "--help"], "(default: 3)")):
        with pytest.raises(SystemExit):
            parser().parse_args(argv)
        assert shown in " ".join(capsys.readouterr().out.split())


def test_ui_arguments():
    args = parser().parse_args(["ui", "--port", "5001"])
    assert (args.command, args.port, args.host, args.uri) == ("ui", 5001, "127.0.0.1", None)
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["train"])  # the config file is required
    assert exit_.value.code == 2


def test_search_prints_a_final_retrain_that_diverged(prefect_harness, tracking_uri, tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    # SGD with momentum at lr 6 on spirals: the one trial scores chance before it blows up, the retrain diverges
    code = main(["search", str(ROOT / "conf" / "search_digits.yaml"), "--set", "data={source: spiral, n_samples: 300}", "--set", "preprocess.method=none",
                 "--set", "model.hidden=[16]", "--set", "model.head_init_scale=1.0", "--set", "optim={name: momentum, lr: 1.0, momentum: 0.9}",
                 "--set", "train.diagnostics=false", "--set", "search.workers=1", "--set", "search.space={optim.lr: 'choice([6.0])', model.activation: 'choice([relu])'}",
                 "--set", "search.stages=[{name: a, trials: 1, epochs: 1}]", "--set", "search.final.epochs=5"])
    torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "final retrain │ diverged or failed" in out
    assert "model.activation ~ choice([relu])" in out  # not eaten as console markup (it printed "choice()")
    assert "report │ - a: 1 trial (1 finished); best validation accuracy" in out  # report.md's advice, in the terminal too


def test_errors_print_brackets_as_written(tmp_path, capsys):
    path = bad_yaml(tmp_path, {"search": {"space": {"optim.lr": "normal(0, 1)"}, "stages": [{"name": "a", "trials": 1, "epochs": 1}]}})
    assert main(["search", path]) == 2
    assert "choice([a, b, ...])" in one_paragraph(capsys.readouterr().out)  # not eaten as console markup


@pytest.mark.parametrize("argv", [["ensemble", "abc", "--top", "0"], ["ensemble", "abc", "--epochs", "-1"], ["check", "conf/digits_mlp.yaml", "--subset", "x"]])
def test_counts_on_the_command_line_are_at_least_one(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "expected a whole number of at least 1" in capsys.readouterr().err


def test_summary_hints_name_the_store_and_a_tracking_servers_own_ui(monkeypatch):
    from rich.console import Console

    from babysit import tracking
    from babysit.cli import see_it, summary_table, with_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert with_uri("babysit report abc", tracking.DEFAULT_URI, tracking.DEFAULT_URI) == "babysit report abc"
    assert with_uri("babysit report abc", "sqlite:////tmp/x.db", tracking.DEFAULT_URI) == "babysit report abc --uri sqlite:////tmp/x.db"  # else it reads mlruns/
    assert with_uri("babysit report abc", "sqlite:////tmp/x y/ml flow.db", tracking.DEFAULT_URI) == "babysit report abc --uri 'sqlite:////tmp/x y/ml flow.db'"  # pastes into a shell
    served = tracking.RunRef("http://127.0.0.1:5099/", "r1", "2")
    assert see_it(tracking.run_url(served), served.uri, tracking.DEFAULT_URI) == f"http://127.0.0.1:5099/#/experiments/2/runs/r1?{tracking.UI_VIEW}"
    local = tracking.RunRef("sqlite:////tmp/x.db", "r1", "2")
    assert see_it(tracking.run_url(local), local.uri, tracking.DEFAULT_URI) == f"babysit ui --uri sqlite:////tmp/x.db  →  http://127.0.0.1:5000/#/experiments/2/runs/r1?{tracking.UI_VIEW}"
    console = Console(width=60, record=True)
    table = summary_table("babysit search: narrow terminal")
    table.add_row("MLflow parent run", "0123456789abcdef0123456789abcdef (sqlite:////a/long/path/to/a/store/mlflow.db)")
    console.print(table)
    assert "…" not in console.export_text()  # wrapped whole, not cut


def test_check_plots_in_a_folder_it_cannot_make_is_said_before_the_checks_run(capsys):
    assert main(["check", DIGITS, "--plots", "/proc/babysit-plots"]) == 2
    message = one_paragraph(capsys.readouterr().out)
    assert "--plots /proc/babysit-plots: cannot make that folder" in message and "PASS" not in message


def test_check_refuses_an_init_from_that_train_would_refuse(tmp_path, capsys):
    # it ran every check on a fresh model and passed, exit 0, while train said "no such file" (QA)
    assert main(["check", DIGITS, "--set", f"model.init_from={tmp_path / 'missing.pt'}"]) == 2
    message = one_paragraph(capsys.readouterr().out)
    assert "`model.init_from`" in message and "no such file" in message and "PASS" not in message
    import torch

    from babysit.config import load_config
    from models.mlp import build_model

    source = tmp_path / "source.pt"
    torch.save(build_model(load_config(DIGITS).model, 64, 10, seed=1).state_dict(), source)
    main(["check", DIGITS, "--set", f"model.init_from={source}", "--set", "train.threads=1", "--budget", "20"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"model.init_from {source}: read, and it fits; the checks below judge the transferred weights" in out
    assert "PASS initial loss: " in out and "from the transferred weights (ln(10) = 2.303 is random weights' loss: not checked)" in out


def test_ui_on_a_port_already_taken_says_so_instead_of_exiting_0(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is taken" in one_paragraph(capsys.readouterr().out)
    assert main(["ui", "--host", "192.0.2.1", "--port", str(port)]) == 2  # TEST-NET-1: no machine's address
    said = one_paragraph(capsys.readouterr().out)
    assert "--host 192.0.2.1" in said and "cannot serve there" in said and "taken" not in said


def test_ensemble_of_a_run_that_is_no_search_is_refused_before_a_flow_runs(tmp_path, capsys):
    from babysit import servers, tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trained = tracking.start_run(uri, "babysit", "a train run", {}, {"babysit.kind": "train"})
    started = len(servers._STARTED)
    assert main(["ensemble", trained.run_id, "--uri", uri]) == 2
    assert "is not a babysit search" in one_paragraph(capsys.readouterr().out)
    assert len(servers._STARTED) == started  # before: a temporary server, then a flow run that failed


def test_report_on_a_run_babysit_did_not_make_says_so(tmp_path, capsys):
    # QA: a plain MLflow run was reported as "No flags: the run looks healthy", exit 0
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("other"))
    assert main(["report", run.info.run_id, "--uri", uri]) == 2
    said = one_paragraph(capsys.readouterr().out)
    assert f"run {run.info.run_id} was not made by babysit (it has no babysit.* tags)" in said and "healthy" not in said


@pytest.mark.parametrize("argv", [["report", "0123abc"], ["ensemble", "0123abc"], ["ui", "--port", "5999"]])
@pytest.mark.parametrize("store", ["not_a_database", "foo://"])
def test_report_ensemble_and_ui_on_a_store_mlflow_cannot_use_say_so(argv, store, tmp_path, capsys):
    # a file that is no database was a traceback (DatabaseError), an unknown scheme "no MLflow run" or, for ui, MLflow's own traceback (QA)
    (tmp_path / "not_a_database").write_text("name: not a database\n")
    uri = f"sqlite:///{tmp_path / 'not_a_database'}" if store == "not_a_database" else store
    assert main([*argv, "--uri", uri]) == 2
    said = one_paragraph(capsys.readouterr().out)
    assert "the tracking URI '" in said and "MLflow cannot use it as a tracking store" in said  # rich may wrap the long path itself
    assert ("is not a SQLite database" if store == "not_a_database" else "no MLflow store takes the scheme 'foo'") in said
    assert (tmp_path / "not_a_database").read_text() == "name: not a database\n"  # left as it was


@pytest.mark.parametrize("argv", [["report", "0123abc"], ["ensemble", "0123abc"], ["ui"]])
def test_report_ensemble_and_ui_on_a_tracking_server_that_does_not_answer_say_so_at_once(argv, capsys):
    assert main([*argv, "--uri", "http://127.0.0.1:1"]) == 2  # before: minutes of retries, then "check the id"
    assert "no MLflow tracking server answers there" in one_paragraph(capsys.readouterr().out)


def test_a_run_logged_through_the_tracking_server_reads_its_artifacts_from_the_servers_folder_when_it_is_down(tmp_path):
    # with `babysit server up` stopped, report said a FINISHED search had no report.md, and the local UI gave 404s (QA)
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("served", artifact_location="mlflow-artifacts:/7")  # as the server creates it
    run = client.create_run(experiment)
    folder = tmp_path / "served-artifacts" / "7" / run.info.run_id / "artifacts"
    folder.mkdir(parents=True)
    (folder / "report.md").write_text("- coarse: 4 trials\n")
    assert tracking.served_artifacts(uri) == tmp_path / "served-artifacts"
    assert tracking.read_text(uri, run.info.run_id, "report.md") == "- coarse: 4 trials\n"


def test_the_tracking_server_keeps_its_artifacts_where_local_reads_look_for_them(tmp_path, monkeypatch):
    # a non-default SQLite store kept them in ./mlruns/served-artifacts, where nothing looked with the server down
    from babysit import servers

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "elsewhere" / "mlflow.db"

    def destination(**given) -> str:
        command = servers.mlflow_spec(tmp_path / "state", **given).command
        return command[command.index("--artifacts-destination") + 1]

    assert destination(backend_store_uri=f"sqlite:///{store}") == str(tracking.served_artifacts(f"sqlite:///{store}")) == str(store.parent / "served-artifacts")
    assert destination() == str(tmp_path / "mlruns" / "served-artifacts")  # the default store's, as before
    assert destination(backend_store_uri="postgresql://db/mlflow") == str(tmp_path / "mlruns" / "served-artifacts")
    assert destination(artifacts_destination="s3://bucket/x") == "s3://bucket/x"
