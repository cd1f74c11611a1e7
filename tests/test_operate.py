"""Operate: real servers, deployments from prefect.yaml, a worker, Dask, recurring searches.

The servers are started by `babysit server up` on loopback with free ports and stopped by PID in
the fixture's teardown, failure or not. The pure parts (naming, warm start, the Dask store rule,
schedules) are tested on hand-made data first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from babysit import recurring, scaleout, servers
from babysit.config import SearchExperiment, load_config
from babysit.errors import BabysitError
from babysit.space import parse_dist

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_SEARCH = ["model.hidden=[32]", "search.workers=2", "search.final=null"]


# ---- pure: recurring searches ---------------------------------------------------------------

def past_run(run_id="p1", tags=None, best=0.9, stages=("coarse", "fine"), space=None):
    """A search parent run as MLflow returns it (only the attributes babysit reads)."""
    params = {"search.stages": repr([{"name": s, "trials": 4, "epochs": 1} for s in stages]), **{f"search.space.{k}": v for k, v in (space or {}).items()}}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=1_795_000_000_000),
                           data=SimpleNamespace(tags={"mlflow.runName": "search_digits", **(tags or {})}, params=params, metrics={"best_val_acc": best}))


def test_scheduled_runs_are_named_and_tagged_by_deployment_and_time():
    when = datetime(2026, 11, 28, 3, 0, tzinfo=timezone.utc)
    identity = recurring.schedule_identity("search-digits-nightly", when)
    assert identity == {"babysit.schedule": "search-digits-nightly", "babysit.scheduled_for": "2026-11-28T03:00:00Z"}
    assert recurring.run_name("search_digits", identity) == "search_digits search-digits-nightly 2026-11-28 03:00Z"
    every_40_s = recurring.schedule_identity("qa-search", datetime(2026, 11, 29, 8, 48, 19, tzinfo=timezone.utc))
    assert recurring.run_name("search_digits", every_40_s) == "search_digits qa-search 2026-11-29 08:48:19Z"  # not the next run's name too
    # two runs started by hand in the same minute (`prefect deployment run`) are two searches
    by_hand = [recurring.schedule_identity("search-digits", datetime(2026, 11, 28, 1, 15, s, 120_000, tzinfo=timezone.utc)) for s in (8, 23)]
    assert by_hand[0] != by_hand[1] and by_hand[0]["babysit.scheduled_for"] == "2026-11-28T01:15:08.120000Z"
    # outside a deployment (babysit search, tests) nothing changes
    assert recurring.schedule_identity(None, when) == {} and recurring.run_name("search_digits", {}) == "search_digits"


def test_stage_ranges_split_dotted_fields_and_follow_stage_order():
    tags = {"range.fine.optim.lr": "loguniform(0.001, 0.01)", "range.coarse.optim.lr": "loguniform(1e-05, 0.1)",
            "range.coarse.model.batchnorm": "choice([False, True])", "range.fine.model.batchnorm": "choice([True])",
            "best.optim.lr": "0.003"}
    past = recurring.past_search(past_run(tags=tags), ["optim.lr", "model.batchnorm"], [])
    assert list(past.ranges) == ["coarse", "fine"]
    assert recurring.final_ranges(past) == {"optim.lr": "loguniform(0.001, 0.01)", "model.batchnorm": "choice([True])"}
    assert past.best_val_acc == 0.9 and past.started.year == 2026


def test_warm_start_takes_the_last_ranges_and_keeps_the_file_range_where_they_do_not_fit():
    space = {f: parse_dist(f, s) for f, s in {"optim.lr": "loguniform(1e-5, 1e-1)", "model.dropout": "uniform(0, 0.5)",
                                               "model.batchnorm": "choice([false, true])", "train.batch_size": "int(16, 128)"}.items()}
    tags = {"range.fine.optim.lr": "loguniform(0.001, 0.01)", "range.fine.model.batchnorm": "choice([True])",
            "range.fine.model.dropout": "loguniform(0.01, 0.2)",  # the file now says uniform: kind changed
            "range.fine.train.batch_size": "int(8, 64)"}  # 8 is below what is_valid allows here
    past = recurring.past_search(past_run(tags=tags), list(space), ["coarse", "fine"])
    warmed, notes = recurring.warm_space(space, past, is_valid=lambda field, value: not (field == "train.batch_size" and value < 16))
    assert warmed["optim.lr"] == parse_dist("optim.lr", "loguniform(0.001, 0.01)")
    assert warmed["model.batchnorm"].options == (True,)
    assert warmed["model.dropout"] == space["model.dropout"] and "was loguniform, now uniform" in notes["model.dropout"]
    assert warmed["train.batch_size"] == space["train.batch_size"] and "no longer a valid range" in notes["train.batch_size"]


def test_an_int_range_narrowed_to_one_value_is_read_back_but_never_taken_from_a_file():
    # search.pad 0 narrows an int range whose top trials share a value to int(64, 64): the warm start
    # could not read its range tag and fell back to the file's range (QA)
    from babysit.space import Narrowing, narrow

    space = {"train.batch_size": parse_dist("train.batch_size", "int(16, 128)")}
    trials = [{"params": {"train.batch_size": b}, "score": s} for b, s in ((64, 0.9), (64, 0.9), (20, 0.5), (120, 0.4))]
    narrowed, _ = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert narrowed["train.batch_size"].describe() == "int(64, 64)"
    past = recurring.past_search(past_run(tags={"range.fine.train.batch_size": "int(64, 64)"}), list(space), ["coarse", "fine"])
    warmed, notes = recurring.warm_space(space, past)
    assert warmed == narrowed and notes["train.batch_size"].startswith("int(64, 64) (from ")
    with pytest.raises(ValueError, match="low must be below high"):
        parse_dist("train.batch_size", "int(64, 64)")  # in a file: no range to search


def test_changes_since_the_last_run_name_accuracy_and_moved_ranges():
    past = recurring.past_search(past_run(tags={"range.coarse.optim.lr": "loguniform(1e-05, 0.1)"}, best=0.95), ["optim.lr"], [])
    lines = recurring.changes_since(past, 0.97, {"coarse": {"optim.lr": "loguniform(0.001, 0.01)"}})
    assert lines[0].startswith("since search_digits (2026-") and "run p1" in lines[0]
    assert lines[1] == "best val acc 0.9500 -> 0.9700 (+0.0200)"
    assert lines[2] == "coarse optim.lr: loguniform(1e-05, 0.1) -> loguniform(0.001, 0.01)"
    assert recurring.changes_since(past, 0.95, {"coarse": {"optim.lr": "loguniform(1e-05, 0.1)"}})[-1] == "ranges: unchanged"
    assert recurring.changes_since(None, 0.97, {}) == []
    # a search whose file changed since (QA: batch norm on, then off, compared as if only luck differed) says so
    hashed = recurring.past_search(past_run(tags={"range.coarse.optim.lr": "loguniform(1e-05, 0.1)", "babysit.search_hash": "aaa"}), ["optim.lr"], [])
    assert "the search file changed since" in recurring.changes_since(hashed, 0.97, {"coarse": {"optim.lr": "loguniform(1e-05, 0.1)"}}, "bbb")[1]
    assert not any("file changed" in line for line in recurring.changes_since(hashed, 0.97, {"coarse": {"optim.lr": "loguniform(1e-05, 0.1)"}}, "aaa"))


def test_changes_since_say_which_settings_or_whether_the_data_changed():
    # QA: "the search file changed" said of a rerun that changed only search.final.epochs, or only touched its CSV
    ranges = {"coarse": {"optim.lr": "loguniform(1e-05, 0.1)"}}
    tags = {**{f"range.{stage}.optim.lr": text for stage, space in ranges.items() for text in space.values()}, "babysit.search_hash": "aaa",
            "babysit.data_version": "v1"}
    past = recurring.past_search(past_run(tags=tags), ["optim.lr"], [])
    now = {**past.params, "search.final.epochs": 4, "search.workers": 1}
    past.params["search.final.epochs"] = "30"
    lines = recurring.changes_since(past, 0.97, ranges, "bbb", now, "v1")
    assert "the search file changed since (search.final.epochs 30 -> 4): the two searches differ in more than their luck" in lines  # workers change no result
    lines = recurring.changes_since(past, 0.97, ranges, "bbb", {**now, "search.final.epochs": 30}, "v2")
    assert lines[1].startswith("the data changed since (its file was rewritten, or its modification time changed)")
    many = {**now, **{f"model.{key}": 1 for key in "abcdef"}}
    assert recurring.changes_since(past, 0.97, ranges, "bbb", many, "v1")[1].endswith("and 3 more): the two searches differ in more than their luck")


def test_changes_since_name_the_fields_no_longer_searched():
    # QA: optim.lr taken out of the space, and the summary said "ranges: unchanged" alone
    tags = {"range.coarse.optim.lr": "loguniform(1e-06, 1e-05)", "range.coarse.model.activation": "choice(['relu', 'tanh'])",
            "range.fine.optim.lr": "loguniform(8.612e-06, 9.99e-05)"}
    past = recurring.past_search(past_run(tags=tags, space={"optim.lr": "loguniform(1e-6, 1e-5)", "model.activation": "choice([relu, tanh])"}),
                                 ["model.activation"], ["coarse", "fine"])
    lines = recurring.changes_since(past, 0.9, {"coarse": {"model.activation": "choice(['relu', 'tanh'])"}})
    assert "ranges searched both times: unchanged" in lines and "ranges: unchanged" not in lines
    assert lines[-1] == "searched then, not now: coarse optim.lr, fine optim.lr"


def test_changes_since_a_run_with_other_stages_says_what_was_not_compared():
    past = recurring.past_search(past_run(tags={"range.wide.optim.lr": "loguniform(1e-05, 0.1)"}, best=0.95), ["optim.lr"], [])
    lines = recurring.changes_since(past, 0.97, {"coarse": {"optim.lr": "loguniform(1e-05, 0.1)"}})
    assert "ranges: unchanged" not in lines  # nothing was compared
    assert lines[-2:] == ["not searched then: coarse optim.lr", "searched then, not now: wide optim.lr"]  # a renamed stage
    both = {"wide": {"optim.lr": "loguniform(1e-05, 0.1)", "model.dropout": "uniform(0.0, 0.5)"}}
    assert recurring.changes_since(past, 0.97, both)[-2:] == ["ranges: unchanged", "not searched then: wide model.dropout"]


def test_a_resumed_search_compares_itself_with_an_earlier_run_only():
    from types import SimpleNamespace

    def run(run_id, started):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=started))

    newest_first = [run("later", 300), run("resumed", 200), run("earlier", 100)]
    assert recurring.latest_before(newest_first, newest_first[1]).info.run_id == "earlier"
    assert recurring.latest_before(newest_first, run("fresh", 400)).info.run_id == "later"
    assert recurring.latest_before(newest_first, newest_first[2]) is None
    assert recurring.latest_before(newest_first, None).info.run_id == "later"  # a new run
    assert recurring.latest_before([], None) is None


# ---- pure: scale-out rules, schedules, config -------------------------------------------------

def test_dask_workers_elsewhere_cannot_share_a_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BabysitError, match="other machines .*tcp://10.0.0.5:8786.*babysit server up"):
        scaleout.dask_tracking_uri("sqlite:///mlruns/mlflow.db", "tcp://10.0.0.5:8786")
    with pytest.raises(BabysitError, match="tcp://192.168.1.7:40001"):  # a loopback scheduler with a worker that joined from elsewhere
        scaleout.dask_tracking_uri("sqlite:///mlruns/mlflow.db", "tcp://127.0.0.1:8786", ["tcp://127.0.0.1:40000", "tcp://192.168.1.7:40001"])
    # a LocalCluster or loopback scheduler shares this machine's files: the path becomes absolute
    assert scaleout.dask_tracking_uri("sqlite:///mlruns/mlflow.db", None) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert scaleout.dask_tracking_uri("sqlite:///mlruns/mlflow.db", "tcp://[::1]:8786").startswith("sqlite:////")
    for shared in ("http://10.0.0.2:5000", "postgresql://mlflow@db/mlflow"):
        assert scaleout.dask_tracking_uri(shared, "tcp://10.0.0.5:8786") == shared


def test_a_dask_scheduler_that_does_not_answer_is_refused_before_the_search_starts():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        scaleout.check_scheduler(f"tcp://127.0.0.1:{listening.getsockname()[1]}")  # something answers: go on
        scaleout.check_scheduler(f"127.0.0.1:{listening.getsockname()[1]}")
        free = listening.getsockname()[1]
    with pytest.raises(BabysitError, match=rf"`search.dask_address` tcp://127.0.0.1:{free}: no Dask scheduler answers there"):
        scaleout.check_scheduler(f"tcp://127.0.0.1:{free}")


def test_the_dask_runner_makes_a_loopback_localcluster_or_joins_a_scheduler():
    local = scaleout.task_runner("dask", 3, None, "http://127.0.0.1:4200/api")
    assert local.address is None and local.cluster_kwargs == {
        "n_workers": 3, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:8787", "env": {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, "silence_logs": logging.ERROR}
    assert scaleout.task_runner("dask", 3, "tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert scaleout.task_runner("threads", 2)._max_workers == 2
    assert scaleout.task_runner("processes", 2)._max_workers == 4  # one trial waits, queued, for each worker process


def test_flows_on_a_temporary_prefect_server_send_no_heartbeats():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), servers.temporary_server_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None  # nothing could read them; each flow would wait ≤ 1 s for the thread
    with answering_server() as api, temporary_settings(updates={PREFECT_API_URL: api}, restore_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY}), \
            servers.temporary_server_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180  # a real server detects crashed runs by them


@contextmanager
def answering_server() -> Iterator[str]:
    """An HTTP server that answers every request (with 501): a PREFECT_API_URL that is up, for
    settings that only read it."""
    import http.server
    import threading

    with http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as answering:
        threading.Thread(target=answering.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{answering.server_port}/api"
        finally:
            answering.shutdown()


FAN_OUT = """
from prefect import flow, task
from babysit.servers import temporary_server_settings

@task
def square(x: int) -> int:
    return x * x

@flow
def fan_out(n: int) -> list[int]:
    return [future.result() for future in square.map(range(n))]

with temporary_server_settings():
    state = fan_out(6, return_state=True)
    from prefect.server.api.server import SubprocessASGIServer
    import os
    print("server in its own session:", os.getsid(SubprocessASGIServer().server_process.pid) != os.getsid(0))
    print(state.result(), state.state_details.flow_run_id)
"""


def test_a_temporary_server_batches_task_run_states_and_events_and_writes_them_all_when_it_stops(prefect_harness, tmp_path):
    import sqlite3

    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), servers.temporary_server_settings():
        services = get_current_settings().server.services
        for batched in (services.task_run_recorder, services.event_persister):  # Prefect's defaults: batches of 1 and 20
            assert (batched.batch_size, batched.flush_interval) == (1000, 60)
    # a fresh process whose temporary server stops with it, short of a batch of states and of events
    done = subprocess.run([sys.executable, "-c", FAN_OUT], cwd=ROOT, env=fresh_prefect_home(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "[0, 1, 4, 9, 16, 25]" in done.stdout, done.stderr[-2000:]
    assert "Error flushing" not in done.stderr and "Traceback" not in done.stderr
    assert "server in its own session: True" in done.stdout  # out of reach of the terminal's Ctrl-C
    flow_run_id = done.stdout.split()[-1]
    with sqlite3.connect(tmp_path / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM task_run WHERE flow_run_id = ?", (flow_run_id,)).fetchall()
        events = dict(db.execute("SELECT event, COUNT(*) FROM events WHERE resource_id = ? OR related_resource_ids LIKE ? GROUP BY event",
                                 (f"prefect.flow-run.{flow_run_id}", f'%"prefect.flow-run.{flow_run_id}"%')).fetchall())
    assert states == [("COMPLETED",)] * 6
    assert events.get("prefect.task-run.Completed") == 6 and events.get("prefect.flow-run.Completed") == 1, events


def fresh_prefect_home(tmp_path) -> dict[str, str]:
    """Environment for a babysit process with its own temporary Prefect server, whose database
    starts as a copy of the session's (which has Prefect's tables: creating them takes ~20 s here)."""
    import sqlite3

    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    database = tmp_path / "prefect.db"
    with sqlite3.connect(PREFECT_API_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]) as session_db, sqlite3.connect(database) as copy:
        session_db.backup(copy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{database}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def trial_runs(database: Path) -> int:
    """Trial runs in an MLflow SQLite store that another process may still be creating: read with
    sqlite3, as an MLflow client here would run the schema migrations alongside that process."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM tags WHERE key = 'mlflow.parentRunId'").fetchone()[0]
    except sqlite3.OperationalError:  # no file or no table yet
        return 0


@pytest.mark.parametrize("signum, status, reason", [(signal.SIGINT, 130, "interrupted"), (signal.SIGHUP, 129, "interrupted (SIGHUP)"),
                                                    (signal.SIGTERM, 143, "interrupted (SIGTERM)")], ids=["ctrl-c", "hang-up", "kill"])
def test_ctrl_c_a_hang_up_or_a_kill_stops_a_search_at_once_leaving_no_run_running(prefect_harness, tmp_path, signum, status, reason):
    # a hang-up (a closed terminal, a dropped SSH session) left the parent and its trials RUNNING, exit 129, no word (QA);
    # SIGTERM (`kill`, `timeout`) printed Prefect's "Crashed" lines only, and the runs' reason read "TerminationSignal: "
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**fresh_prefect_home(tmp_path), "MLFLOW_TRACKING_URI": uri}
    command = [str(Path(sys.executable).parent / "babysit"), "search", str(ROOT / "conf/search_digits.yaml"), "--set", "search.final=null",
               "--set", "search.stages=[{name: coarse, trials: 6, epochs: 3000}]"]
    # a session of its own, whose process group stands for the terminal's: Ctrl-C signals all of it
    # SIGINT's default action, as in a terminal: a shell's background job (`cmd &`) starts with it ignored, and so would babysit
    search = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and search.poll() is None and trial_runs(tmp_path / "mlflow.db") < 2:  # both workers are training
            time.sleep(0.5)
        os.killpg(search.pid, signum)
        try:
            out, _ = search.communicate(timeout=90)  # before: minutes, retrying a server the signal had stopped
        except subprocess.TimeoutExpired:  # show where it is stuck: babysit prints its threads' stacks on SIGUSR1
            os.kill(search.pid, signal.SIGUSR1)
            time.sleep(3)
            os.killpg(search.pid, signal.SIGKILL)
            out, _ = search.communicate(timeout=30)
            pytest.fail(f"babysit search did not stop within 90 s of Ctrl-C; its output ends:\n{out[-6000:]}")
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
    assert search.returncode == status, out[-3000:]
    assert "interrupted:" in out and "Traceback" not in out
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}
    assert {r.data.tags.get("babysit.failure").removesuffix(f" ({signal.Signals(signum).name})") for r in runs} == {"interrupted"}  # the trials and the parent
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["babysit.failure"] == reason


def test_an_existing_dask_cluster_needs_a_prefect_server():
    with pytest.raises(BabysitError, match="PREFECT_API_URL"):
        scaleout.dask_prefect_api("tcp://10.0.0.5:8786", None, "http://127.0.0.1:8123/api")
    assert scaleout.dask_prefect_api("tcp://10.0.0.5:8786", "http://10.0.0.2:4200/api", None) == "http://10.0.0.2:4200/api"
    assert scaleout.dask_prefect_api(None, None, "http://127.0.0.1:8123/api") == "http://127.0.0.1:8123/api"  # ephemeral, LocalCluster


def test_search_runner_and_warm_start_are_validated_config():
    exp = load_config("conf/search_digits.yaml", ["search.runner=dask", "search.dask_address=tcp://127.0.0.1:8786", "search.warm_start=latest"], model=SearchExperiment)
    assert (exp.search.runner, exp.search.dask_address, exp.search.warm_start) == ("dask", "tcp://127.0.0.1:8786", "latest")
    with pytest.raises(BabysitError, match="`dask_address` is only used by `runner: dask`"):
        load_config("conf/search_digits.yaml", ["search.dask_address=tcp://127.0.0.1:8786"], model=SearchExperiment)
    with pytest.raises(BabysitError, match="search.runner"):
        load_config("conf/search_digits.yaml", ["search.runner=ray"], model=SearchExperiment)


def test_schedules_are_checked_before_serving():
    from babysit import deploy

    assert deploy.schedule_for("0 3 * * *", None).cron == "0 3 * * *"
    assert deploy.schedule_for(None, 3600).interval.total_seconds() == 3600
    with pytest.raises(BabysitError, match="Invalid cron string.*five fields"):
        deploy.schedule_for("0 3 * *", None)
    with pytest.raises(BabysitError, match="exactly one"):
        deploy.schedule_for("0 3 * * *", 60)
    with pytest.raises(BabysitError, match="Invalid timezone") as err:  # a good cron with a bad zone gets no hint about cron's fields
        deploy.schedule_for("0 3 * * *", None, "Mars/Phobos")
    assert "five fields" not in str(err.value)
    assert deploy.is_search_file("conf/search_digits.yaml") and not deploy.is_search_file("conf/digits_mlp.yaml")


def test_serve_without_a_prefect_server_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from babysit import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .babysit/ state here
    assert cli.main(["serve", str(ROOT / "conf/digits_mlp.yaml"), "--cron", "0 3 * * *"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "no scheduler" in out and "start one with `babysit server up`" in out


def test_serve_refuses_a_name_prefect_cannot_deploy_and_a_server_that_does_not_answer(tmp_path, monkeypatch, capsys):
    from babysit import cli

    named = tmp_path / "named.yaml"
    named.write_text((ROOT / "conf/search_digits.yaml").read_text().replace("name: search_digits", "name: team/search-digits"))
    assert "team/search-digits" in named.read_text()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert cli.main(["serve", str(named), "--cron", "0 3 * * *"]) == 2
    assert f"deployment name 'team/search-digits' (the `name` of {named}) contains '/'" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["serve", str(named), "--cron", "0 3 * * *", "--name", "nightly"]) == 2
    assert "PREFECT_API_URL is http://127.0.0.1:1/api, where no Prefect server answers" in " ".join(capsys.readouterr().out.split())


def test_ports_outside_1_to_65535_are_refused_before_anything_starts(capsys):
    from babysit import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["ui", "--port", "99999"])
    assert exit_.value.code == 2 and "expected a port number from 1 to 65535, got '99999'" in capsys.readouterr().err


# ---- helpers for real servers ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (from /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def http_json(url: str, body: dict | None = None) -> dict:
    """Plain HTTP: GET, or POST a JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def search_runs(mlflow_url: str, experiment_id: str, filter_string: str) -> list[dict]:
    return http_json(f"{mlflow_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}).get("runs", [])


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def run_in_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on timeout the whole group is killed."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out)


# ---- real servers: PostgreSQL for MLflow's store, as a team would run it ----------------------

def postgres_programs() -> Path | None:
    """Debian's PostgreSQL server programs (initdb, postgres), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a loopback port with an `mlflow` database, stopped by PID at
    the end; yields its SQLAlchemy URL, or None where PostgreSQL is not installed (then MLflow runs
    on SQLite)."""
    import shutil
    import tempfile

    programs = postgres_programs()
    if programs is None:
        yield None
        return
    data = Path(tempfile.mkdtemp(prefix="babysit-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_postgres:
        shutil.chown(data, "postgres")
    port = free_port()
    server = None
    try:
        subprocess.run(as_postgres + [str(programs / "initdb"), "-D", str(data), "-U", "babysit", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        server = subprocess.Popen(as_postgres + [str(programs / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg.connect(host="127.0.0.1", port=port, user="babysit", dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not start"
                time.sleep(0.2)
        connection.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://babysit@127.0.0.1:{port}/mlflow"
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory, postgres):
    """`babysit server up` on loopback with free ports, MLflow on PostgreSQL (else SQLite);
    `babysit server down` (by PID) at the end."""
    state = tmp_path_factory.mktemp("operate") / "state"
    store = postgres or f"sqlite:///{state.parent / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [str(BIN / "babysit"), "server", "up", "--state", str(state), "--prefect-port", str(free_port()),
               "--mlflow-port", str(free_port()), "--backend-store-uri", store,
               "--artifacts-destination", str(state.parent / "artifacts"), "--mlflow-workers", "1"]
    try:
        up = run_in_group(command, env, timeout=240)
        assert up.returncode == 0, up.stdout
        records = {r.name: r for r in servers.load_state(state).values()}
        yield SimpleNamespace(state=state, records=records, output=up.stdout, env=env, store=store, artifacts=state.parent / "artifacts",
                              prefect_api=records["prefect"].export["PREFECT_API_URL"],
                              mlflow=records["mlflow"].export["MLFLOW_TRACKING_URI"])
    finally:
        recorded = servers.load_state(state)
        try:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)  # the in-process flows' last logs, while the server still listens
        finally:
            servers.down(state)
        assert not [r.pid for r in recorded.values() if servers.alive(r.pid)]


def test_server_up_starts_healthy_servers_on_loopback_only(live):
    assert set(live.records) == {"prefect", "mlflow"}
    for record in live.records.values():
        assert servers.healthy(record.health_url) and servers.is_ours(record)
        assert (live.state / f"{record.name}.pid").read_text().strip() == str(record.pid)
        assert listening_addresses(record.port) <= {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert f"export PREFECT_API_URL={live.prefect_api}" in live.output and f"export MLFLOW_TRACKING_URI={live.mlflow}" in live.output
    status = subprocess.run([str(BIN / "babysit"), "server", "status", "--state", str(live.state)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.count("healthy at") == 2
    assert live.store in live.records["mlflow"].command  # the store it was asked for (PostgreSQL where installed)


@pytest.fixture(scope="module")
def cluster(live):
    """A Dask LocalCluster of 2 single-threaded worker processes on loopback, shared by the Dask
    searches below through `search.dask_address` (its workers import torch once, not per search).
    The workers report task runs to the real Prefect server, as `dask worker` would with PREFECT_API_URL."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                      env={"PREFECT_API_URL": live.prefect_api}) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def dask_search(live, cluster):
    """A coarse (4 × 2 epochs) then fine (2 × 1 epoch) search on the Dask LocalCluster,
    reporting to the real Prefect server and logging to the real MLflow server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.search import search_flow

    overrides = TINY_SEARCH + ["search.runner=dask", f"search.dask_address={cluster}",
                               "search.stages=[{name: coarse, trials: 4, epochs: 2}, {name: fine, trials: 2, epochs: 1}]"]
    with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_API_URL: live.prefect_api}):
        patch.setenv("MLFLOW_TRACKING_URI", live.mlflow)
        return search_flow(config="conf/search_digits.yaml", overrides=overrides)


def test_a_search_on_a_dask_localcluster_logs_every_trial_to_the_mlflow_server(live, dask_search):
    assert dask_search.tracking_uri == live.mlflow
    # the MLflow REST API, over plain HTTP: the parent, its nested children, their metric histories
    parents = search_runs(live.mlflow, dask_search.experiment_id, "tags.`babysit.kind` = 'search'")
    (parent,) = [r for r in parents if r["info"]["run_id"] == dask_search.parent_run_id]
    # artifacts go through the server (--serve-artifacts) into its destination folder
    assert parent["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    assert list(live.artifacts.rglob(f"{dask_search.parent_run_id}/artifacts/trials.csv"))
    kids = search_runs(live.mlflow, dask_search.experiment_id, f"tags.`mlflow.parentRunId` = '{dask_search.parent_run_id}'")
    stages = sorted(tags_of(k)["babysit.stage"] for k in kids)
    assert stages == ["coarse"] * 4 + ["fine"] * 2
    assert all(k["info"]["status"] == "FINISHED" for k in kids)
    for kid in kids:
        query = urllib.parse.urlencode({"run_id": kid["info"]["run_id"], "metric_key": "val_acc"})
        history = http_json(f"{live.mlflow}/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]
        assert sorted(m["step"] for m in history) == ([1, 2] if tags_of(kid)["babysit.stage"] == "coarse" else [1])


def test_a_dask_localcluster_shares_a_local_sqlite_store(live, cluster, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from babysit import tracking
    from flows.search import search_flow

    monkeypatch.chdir(tmp_path)  # a relative store: the flow makes it absolute for the workers (whose folder differs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    overrides = TINY_SEARCH + ["search.runner=dask", f"search.dask_address={cluster}", "search.stages=[{name: coarse, trials: 2, epochs: 2}]"]
    with temporary_settings({PREFECT_API_URL: live.prefect_api}):
        summary = search_flow(config=str(ROOT / "conf/search_digits.yaml"), overrides=overrides)
    uri = f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert summary.tracking_uri == uri
    kids = tracking.find_runs(uri, summary.experiment_id, {"mlflow.parentRunId": summary.parent_run_id})
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert all(len(tracking.metric_history(uri, k.info.run_id, "val_acc")) == 2 for k in kids)


@pytest.fixture(scope="module")
def deployed(live, dask_search):
    """`prefect deploy --all` from prefect.yaml; a train and a nightly-search run; `prefect worker start --run-once`."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**live.env, "PREFECT_API_URL": live.prefect_api, "MLFLOW_TRACKING_URI": live.mlflow, "PWD": str(ROOT)}
    deploy = run_in_group([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, timeout=120)
    assert deploy.returncode == 0, deploy.stdout
    nightly = TINY_SEARCH + ["search.warm_start=latest", "search.stages=[{name: coarse, trials: 2, epochs: 1}]"]
    with temporary_settings({PREFECT_API_URL: live.prefect_api}):
        runs = {
            "train": run_deployment("train/train-digits", parameters={"overrides": ["model.hidden=[32]", "train.epochs=2"]}, timeout=0),
            "nightly": run_deployment("search/search-digits-nightly", parameters={"overrides": nightly}, timeout=0),
        }
    # A long-running worker (a --run-once poll gives up on its first busy answer from the server),
    # stopped by PID once both runs are final.
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", servers.WORK_POOL], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: live.prefect_api}):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 240
                while True:
                    finished = {name: client.read_flow_run(run.id) for name, run in runs.items()}
                    if all(run.state.is_final() for run in finished.values()) or time.monotonic() > deadline:
                        break
                    time.sleep(2)
                deployment = client.read_deployment_by_name("search/search-digits-nightly")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            out, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            out, _ = worker.communicate()
    return SimpleNamespace(runs=finished, deployment=deployment, worker=out)


def test_prefect_yaml_deploys_the_flows_with_a_nightly_schedule(deployed):
    (schedule,) = deployed.deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.active
    assert deployed.deployment.work_pool_name == servers.WORK_POOL
    assert deployed.deployment.parameters == {"config": "conf/search_digits.yaml", "overrides": ["search.warm_start=latest"]}


def test_a_worker_runs_the_train_deployment_into_the_mlflow_server(live, deployed):
    run = deployed.runs["train"]
    assert run.state.is_completed(), deployed.worker[-3000:]
    experiment = load_config("conf/digits_mlp.yaml").tracking.experiment
    experiment_id = http_json(f"{live.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]["experiment_id"]
    (logged,) = search_runs(live.mlflow, experiment_id, f"tags.`prefect.flow_run_id` = '{run.id}'") or [None]
    assert logged is not None and logged["info"]["status"] == "FINISHED"
    query = urllib.parse.urlencode({"run_id": logged["info"]["run_id"], "metric_key": "val_acc"})
    assert len(http_json(f"{live.mlflow}/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]) == 2


def test_a_bad_override_fails_the_flow_run_with_the_cli_message(live):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.train import train_flow

    with pytest.raises(BabysitError) as cli_error:
        load_config("conf/digits_mlp.yaml", ["model.activation=swish"])
    with temporary_settings({PREFECT_API_URL: live.prefect_api}):
        state = train_flow(config="conf/digits_mlp.yaml", overrides=["model.activation=swish"], return_state=True)
    assert state.is_failed() and str(cli_error.value) in state.message


def test_the_nightly_search_is_its_own_parent_warm_started_from_the_previous_search(live, dask_search, deployed):
    run = deployed.runs["nightly"]
    assert run.state.is_completed(), deployed.worker[-3000:]
    (parent,) = [r for r in search_runs(live.mlflow, dask_search.experiment_id, "tags.`babysit.schedule` = 'search-digits-nightly'")]
    tags = tags_of(parent)
    assert parent["info"]["run_name"].startswith("search_digits search-digits-nightly 20") and parent["info"]["run_id"] != dask_search.parent_run_id
    assert tags["babysit.warm_from"] == dask_search.parent_run_id
    # its only stage sampled from the previous search's last (fine) ranges, not the file's coarse ones
    warm = {key.removeprefix("range.coarse."): text for key, text in tags.items() if key.startswith("range.coarse.")}
    assert warm == dask_search.ranges["fine"] != dask_search.ranges["coarse"]
    assert tags["babysit.previous_search"] == dask_search.parent_run_id


def test_server_down_stops_what_a_killed_server_left_serving_in_its_group(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from babysit import servers

    # a leader that forks a worker, as `mlflow server` forks uvicorn's; kill -9 of the leader orphans the worker in its group
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        time.sleep(1.0)
        (worker,) = psutil.Process(leader.pid).children()
        leader.kill()
        leader.wait()
        record = servers.Record("mlflow", leader.pid, "127.0.0.1", 1, "http://127.0.0.1:1/health", {}, str(tmp_path / "log"), [], ["babysit-test-marker"])
        assert worker.is_running() and servers.stop(record, timeout=5.0)  # it was still serving
        worker.wait(timeout=10)
        assert not servers.stop(record, timeout=1.0)  # nothing left
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_signal_to_a_command_run_in_its_own_group_stops_what_it_forked(tmp_path):
    """babysit ui: `kill PID` reached babysit only, and MLflow's uvicorn and job workers went on serving."""
    marker = "61.2345"  # a sleep that only this test's grandchild runs
    forking = [sys.executable, "-c", f"import subprocess, time; subprocess.Popen(['sleep', '{marker}']); time.sleep(60)"]
    script = f"import sys; from babysit import servers; sys.exit(servers.run_in_own_group({forking!r}))"
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 30
    while not subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout, "the grandchild never started"
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=20) == 128 + signal.SIGTERM
    assert not subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).stdout


def test_a_tracking_server_that_dies_mid_run_ends_the_command_in_one_paragraph_and_the_next_run_fails_the_left_run(tmp_path):
    """Before: MLflow retried each write ~4 minutes, then a ~740-line traceback; the run stayed RUNNING for ever."""
    state, port = tmp_path / "state", free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # babysit's default, 4, waits ~15 s more
    env.pop("PREFECT_API_URL", None)
    up = [str(BIN / "babysit"), "server", "up", "--only", "mlflow", "--state", str(state), "--mlflow-port", str(port), "--mlflow-workers", "1",
          "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts")]
    train = [str(BIN / "babysit"), "train", "conf/digits_mlp.yaml", "--set", "model.hidden=[16]", "--set", "tracking.experiment=lost"]
    try:
        assert run_in_group(up, env, timeout=180).returncode == 0
        process = subprocess.Popen([*train, "--set", "train.epochs=100000", "--set", "tracking.flush_seconds=0"], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline, running = time.monotonic() + 120, []
        while not running and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            try:
                experiment = http_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lost")["experiment"]
            except urllib.error.HTTPError:  # not created yet
                continue
            running = search_runs(f"http://127.0.0.1:{port}", experiment["experiment_id"], "attributes.status = 'RUNNING'")
        assert running, "the training never started"
        (mlflow,) = servers.load_state(state).values()
        os.killpg(mlflow.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            out, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == 1 and time.monotonic() - killed < 90, out[-2000:]
        assert f"error: the MLflow tracking server at http://127.0.0.1:{port} stopped answering" in " ".join(out.split()) and "Traceback" not in out
        assert run_in_group(up, env, timeout=180).returncode == 0  # the server back, on the same store
        assert run_in_group([*train, "--set", "train.epochs=1"], env, timeout=180).returncode == 0
        (left,) = [r for r in search_runs(f"http://127.0.0.1:{port}", running[0]["info"]["experiment_id"], "") if r["info"]["run_id"] == running[0]["info"]["run_id"]]
        assert left["info"]["status"] == "FAILED" and tags_of(left)["babysit.failure"].startswith("interrupted")
    finally:
        servers.down(state)


def test_a_server_that_stopped_answering_is_told_apart_from_other_failures():
    import http.server
    import threading

    import httpx
    from mlflow.exceptions import MlflowException

    from babysit import tracking
    from babysit.cli import lost_server

    dead = free_port()
    refused = MlflowException(f"API request to http://127.0.0.1:{dead}/api/2.0/mlflow/runs/log-batch failed with exception ... Connection refused")
    try:  # as the flow re-raises it: the MLflow error is the cause
        raise RuntimeError("Flow run encountered an exception") from refused
    except RuntimeError as flow_failed:
        assert tracking.lost_server(flow_failed) == f"http://127.0.0.1:{dead}"
        assert lost_server(flow_failed).message.startswith(f"the MLflow tracking server at http://127.0.0.1:{dead} stopped answering")
    request = httpx.Request("POST", f"http://127.0.0.1:{dead}/api/flow_runs/filter")
    assert servers.lost_prefect_api(httpx.ConnectError("All connection attempts failed", request=request)) == f"http://127.0.0.1:{dead}"
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers every request (501)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = server.server_address[1]
        # a server that answers: its own error, not a lost server (the traceback is kept)
        assert tracking.lost_server(MlflowException(f"API request to http://127.0.0.1:{up}/api/2.0/mlflow/runs/get failed with error code 500")) is None
        assert lost_server(ValueError("a bug")) is None
    finally:
        server.shutdown()


def test_stopping_the_temporary_server_at_exit_holds_off_ctrl_c():
    # a Ctrl-C in the seconds Prefect's temporary server takes to stop printed a traceback from Python's exit handlers
    class SlowToStop:
        stopped = False

        def stop(self):
            os.kill(os.getpid(), signal.SIGINT)  # delivered while it stops
            time.sleep(0.2)
            self.stopped = True

    server = SlowToStop()
    servers.stop_uninterrupted(server)
    assert server.stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards


def test_every_process_that_imports_babysit_gets_its_environment_defaults():
    # deployment workers load flows/search.py:search_flow, not the CLI: MLflow's retries and its telemetry
    # (whose thread, offline, deleted a variable while requests read the environment: QA) were left as they were
    code = ("import os, flows.search; print(os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'],"
            " os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_DISABLE", "MLFLOW_HTTP", "PREFECT_SERVER_ANALYTICS"))}
    said = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert said.stdout.split() == ["true", "4", "false"], said.stderr[-2000:]
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert kept.stdout.split()[0] == "false"  # a user's own setting wins


def test_server_down_and_env_say_when_no_server_is_recorded_in_their_folder(tmp_path, capsys):
    # QA: from another folder, `down` printed nothing and exited 0 with both servers running; `env` printed an empty line
    from babysit import cli

    state = tmp_path / ".babysit"
    assert cli.main(["server", "down", "--state", str(state)]) == 1
    assert f"no servers recorded in {state.resolve()}/" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["server", "down", "--state", str(state), "--only", "mlflow"]) == 1
    assert "no mlflow server recorded in" in capsys.readouterr().out
    assert cli.main(["server", "env", "--state", str(state)]) == 1
    said = capsys.readouterr()
    assert said.out == "" and "no servers recorded in" in said.err  # eval "$(babysit server env)" exports nothing, and says why
    state.mkdir()
    (state / "servers.json").write_text("{}")  # as `server down` leaves it: a second `down` (a cleanup trap, `make stop`) is no error
    assert cli.main(["server", "down", "--state", str(state)]) == 0
    assert "no servers running from" in capsys.readouterr().out
