"""`babysit server up|down|status|env`: a local Prefect server and MLflow tracking server.

Each server is a background process group whose PID, command and log live in a state folder
(`.babysit/` by default): `down` stops exactly the processes that `up` started, by PID, never
by name. Both bind 127.0.0.1 unless told otherwise. Health is checked over HTTP
(Prefect: GET /api/health, MLflow: GET /health). Nothing here runs at import time.

With no servers, babysit works as before: each flow starts a temporary Prefect server and
MLflow writes to sqlite:///mlruns/mlflow.db. With them, the same code reports to the servers once
PREFECT_API_URL and MLFLOW_TRACKING_URI are exported (`babysit server env` prints the lines).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from babysit.errors import BabysitError

STATE = Path(".babysit")
WORK_POOL = "babysit-local"  # prefect.yaml's deployments run on this `process` pool


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server, and how to tell that it is up."""

    name: str  # prefect | mlflow
    command: list[str]
    env: dict[str, str]  # added to the environment of the server process
    host: str
    port: int
    health_path: str  # GET http://host:port<health_path> answers 200 when ready
    export: dict[str, str]  # what clients set to use it, e.g. {"PREFECT_API_URL": ...}
    marker: tuple[str, ...]  # words in the process's command line (checked before a kill)
    ui: str = ""

    @property
    def health_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.port}{self.health_path}"


@dataclass
class Record:
    """A started server, as state/servers.json keeps it."""

    name: str
    pid: int
    host: str
    port: int
    health_url: str
    export: dict[str, str]
    log: str
    command: list[str]
    marker: list[str]
    ui: str = ""
    started: float = field(default_factory=time.time)
    healthy_after_s: float | None = None


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def sqlite_url(path: Path, driver: str = "sqlite") -> str:
    return f"{driver}:///{path.resolve()}"


def prefect_spec(state: Path, host: str = "127.0.0.1", port: int = 4200, database_url: str | None = None) -> ServerSpec:
    """`prefect server start` with its home (and SQLite database, unless `database_url` names
    another, e.g. postgresql+asyncpg://...) under state/prefect; scheduler services on, for cron deployments."""
    home = (state / "prefect").resolve()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url or sqlite_url(home / "prefect.db", "sqlite+aiosqlite"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    api = f"http://{client_host(host)}:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return ServerSpec("prefect", command, env, host, port, "/api/health", {"PREFECT_API_URL": api},
                      ("prefect", "server"), ui=f"http://{client_host(host)}:{port}")


def mlflow_spec(state: Path, host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
                artifacts_destination: str | None = None, workers: int = 2) -> ServerSpec:
    """`mlflow server` on `backend_store_uri` (any SQLAlchemy URL; default: babysit's local store,
    so earlier local runs show up) serving artifacts itself from `artifacts_destination`
    (a folder, s3://..., ...): clients on other machines then need no shared file system."""
    from babysit import tracking

    backend = backend_store_uri or tracking.DEFAULT_URI
    if db := tracking.sqlite_path(backend):
        db.parent.mkdir(parents=True, exist_ok=True)
        backend = sqlite_url(db)
    # beside a SQLite store (tracking.served_artifacts): with the server down, babysit ui and report read them there
    destination = artifacts_destination or str((tracking.served_artifacts(backend) or Path("mlruns/served-artifacts")).resolve())
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
               "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", destination,
               "--workers", str(workers)]
    uri = f"http://{client_host(host)}:{port}"
    # MLflow 3's server also runs a job queue (8 processes) for GenAI jobs that babysit never submits
    env = {} if "MLFLOW_SERVER_ENABLE_JOB_EXECUTION" in os.environ else {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return ServerSpec("mlflow", command, env, host, port, "/health", {"MLFLOW_TRACKING_URI": uri},
                      ("mlflow", "server"), ui=f"{uri}/#/experiments?{tracking.UI_VIEW}")


@contextmanager
def temporary_server_settings() -> Iterator[None]:
    """Prefect settings for flows that this process runs, on the temporary server Prefect starts
    when no PREFECT_API_URL is set (a server that dies with this process; it inherits the settings
    in force when it starts). With a real server (deployments, `babysit server up`) nothing changes.
    - No flow heartbeats: nothing can read them after this process, yet every flow waits for its
      heartbeat thread at exit, up to a second.
    - Task-run states and events are written in batches of up to 1000 (Prefect's defaults are 1
      and 20: one database transaction per state change, ~70 ms of server CPU per search trial,
      and one per 20 events, ~7 ms more; on 2 cores that came out of the trials' time), and what
      is left when the server stops. A search of a few hundred trials is written after it,
      when the cores are free: with batches of 100, a flush in the middle of the digits search took
      ~0.3 s of CPU from its 2 workers. Timed flushes run every 60 s, not Prefect's 5 s: stopping the
      server cancels a timed task-run flush in flight, and Prefect then prints an error with a
      traceback (the batch is kept and written by the final flush); at 5 s that hit about one
      command in fifteen here."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_API_URL

    if api := PREFECT_API_URL.value():
        check_prefect_api(api)
        yield
        return
    context = get_settings_context()
    with SettingsContext(profile=context.profile, settings=for_temporary_server(context.settings)):
        start_temporary_server_apart()
        yield


_LAST_COPY: list = [None, None]  # [settings, their copy for the temporary server]
BATCHED_SERVICES = ("task_run_recorder", "event_persister")  # the temporary server's services that write in batches


def for_temporary_server(settings):
    """`settings` with temporary_server_settings' changes. The last copy is kept: a copy rebuilds
    all of Prefect's settings models (~0.05 s), and tests, benchmarks and notebooks run many
    flows in one process."""
    if _LAST_COPY[0] is not settings:
        batched = {f"server.services.{service}.{setting}": value for service in BATCHED_SERVICES
                   for setting, value in (("batch_size", 1000), ("flush_interval", 60))}
        _LAST_COPY[:] = [settings, settings.copy_with_update(updates={"flows.heartbeat_frequency": None, **batched})]
    return _LAST_COPY[1]


def start_temporary_server_apart() -> None:
    """Start Prefect's temporary server in a session of its own. Ctrl-C signals every process in
    the terminal's foreground group: the server died with it, and the interrupted flow, unable to
    record its crash, retried it for minutes before exiting with a traceback. Apart, the server
    lives until this process exits, when Prefect stops it as before; on Linux it is also told to
    stop if this process dies without stopping it (kill -9, a closed terminal)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return
    options: dict = {"start_new_session": True}
    if sys.platform == "linux":
        import ctypes

        prctl, pr_set_pdeathsig = ctypes.CDLL(None, use_errno=True).prctl, 1  # looked up here: the forked child only calls it
        options["preexec_fn"] = lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)
    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, **options)  # Prefect's start() takes no Popen options
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    held = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if held else None
    try:
        server.start()
    except Exception:
        if interrupted:  # Prefect can wrap the KeyboardInterrupt (a PydanticSerializationError, with a traceback): Ctrl-C it was
            raise KeyboardInterrupt from None
        raise
    finally:
        subprocess.Popen = popen
        if held:
            signal.signal(signal.SIGINT, previous)
    atexit.register(stop_uninterrupted, server)  # after Prefect's own exit handler: runs before it
    _STARTED.append(server)


_STARTED: list = []  # the temporary servers start_temporary_server_apart started


def stop_temporary_servers() -> None:
    """Stop the temporary servers this process started, now rather than at its exit (pytest
    closes its captured output first, and Prefect's 'Stopping temporary server' then fails to log)."""
    while _STARTED:
        stop_uninterrupted(_STARTED.pop())


def stop_uninterrupted(server) -> None:
    """Stop the temporary server with Ctrl-C held off. At exit, a Ctrl-C in those few seconds
    (at most 5, then Prefect kills it) printed a traceback from Python's exit handlers; Prefect's
    own handler then finds it stopped."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def answers(url: str, timeout: float = 5.0) -> bool:
    """Whether a server answers at `url` at all: any HTTP status, an error or a login page included."""
    return http_answer(url, timeout)[0] is not None


def http_answer(url: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """(HTTP status, the first bytes of the body) of `url`; (None, b"") when no HTTP server answers."""
    import http.client

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(64)
    except urllib.error.HTTPError as err:
        return err.code, b""
    except (OSError, ValueError, http.client.HTTPException):  # refused, unknown host, timed out, not HTTP (ssh, ...)
        return None, b""


def lost_prefect_api(err: BaseException) -> str | None:
    """The Prefect API address when `err`, or an exception it came from, is a request to it that
    could not connect and nothing answers there now; else None."""
    import httpx

    while err is not None:
        if isinstance(err, httpx.TransportError):
            try:
                url = err.request.url
            except RuntimeError:  # raised without its request
                return None
            address = f"{url.scheme}://{url.host}:{url.port}" if url.port else f"{url.scheme}://{url.host}"
            return address if not answers(address) else None
        err = err.__cause__ or err.__context__
    return None


def check_prefect_api(api: str) -> None:
    """A PREFECT_API_URL where nothing answers is a BabysitError before a flow starts; Prefect itself
    would retry for a while and end in a traceback."""
    health = f"{api.rstrip('/')}/health"
    status, body = http_answer(health)
    if status is None:
        raise BabysitError(f"PREFECT_API_URL is {api}, where no Prefect server answers: start it (`babysit server up`, then run the "
                           "`export` lines that `babysit server env` prints), or unset PREFECT_API_URL to run on a temporary server "
                           "that each command starts and stops itself.")
    from prefect.settings import PREFECT_CLOUD_API_URL

    if api.startswith(PREFECT_CLOUD_API_URL.value()):  # a Cloud workspace's address: Prefect's client checks it otherwise, with the API key
        return
    # a Prefect server answers `true` there; QA: the address without /api (404), or MLflow's (404 at /api/health, 200 "OK" at /health),
    # ended in Prefect's traceback. Other answers (401, 403: a server behind authentication) are left to Prefect's client.
    said = "404 Not Found" if status == 404 else f"{status}, {body.decode(errors='replace').strip()[:40]!r}" if 200 <= status < 300 and body.strip() != b"true" else None
    if said:
        raise BabysitError(f"PREFECT_API_URL is {api}, where a server answers but not Prefect's API ({health}: {said}): "
                           "Prefect's API address ends in /api, such as http://127.0.0.1:4200/api (`babysit server env` prints it); "
                           "MLflow's address goes in MLFLOW_TRACKING_URI.")


def healthy(url: str, timeout: float = 2.0) -> bool:
    return http_answer(url, timeout)[0] == 200


def port_in_use(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether anything accepts a connection there (a host name that does not resolve: no)."""
    try:
        socket.create_connection((client_host(host), port), timeout=timeout).close()
        return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie child of this process is reaped and counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_ours(record: Record) -> bool:
    """The PID still runs the command we started (PIDs are reused after a reboot or a crash)."""
    if not alive(record.pid):
        return False
    cmdline = Path(f"/proc/{record.pid}/cmdline")
    if not cmdline.exists():  # no /proc (macOS): trust the PID file
        return True
    words = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return all(word in words for word in record.marker)


def load_state(state: Path) -> dict[str, Record]:
    path = state / "servers.json"
    if not path.is_file():
        return {}
    return {name: Record(**data) for name, data in json.loads(path.read_text()).items()}


def save_state(state: Path, records: dict[str, Record]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "servers.json").write_text(json.dumps({name: asdict(r) for name, r in records.items()}, indent=2) + "\n")
    for name, record in records.items():
        (state / f"{name}.pid").write_text(f"{record.pid}\n")


def start(spec: ServerSpec, state: Path) -> Record:
    """Start `spec` in its own session (process group), logging to state/<name>.log."""
    if port_in_use(spec.host, spec.port):
        raise BabysitError(f"port {spec.port} on {client_host(spec.host)} is already in use, so the {spec.name} server cannot start there; "
                           f"stop what uses it or pick another port (babysit server up --{spec.name}-port PORT).")
    state.mkdir(parents=True, exist_ok=True)
    log = state / f"{spec.name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(spec.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **spec.env}, start_new_session=True)
    return Record(spec.name, process.pid, spec.host, spec.port, spec.health_url, spec.export, str(log),
                  spec.command, list(spec.marker), spec.ui)


def wait_healthy(records: list[Record], timeout: float) -> None:
    """Poll the servers together until each health URL answers, setting `healthy_after_s` (seconds
    from its start); BabysitError, with the log's tail, for one that exits or does not answer within
    `timeout` seconds of its start."""
    pending = list(records)
    while pending:
        for record in list(pending):
            if healthy(record.health_url):
                record.healthy_after_s = round(time.time() - record.started, 2)
                pending.remove(record)
            elif not alive(record.pid):
                raise BabysitError(f"the {record.name} server exited before it was healthy; the end of {record.log}:\n{log_tail(record.log)}")
            elif time.time() - record.started > timeout:
                raise BabysitError(f"the {record.name} server was not healthy at {record.health_url} after {timeout:.0f} s; the end of {record.log}:\n{log_tail(record.log)}")
        time.sleep(0.25)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(record: Record, timeout: float = 20.0) -> bool:
    """SIGTERM the process group `up` started (its leader is record.pid), SIGKILL after `timeout`.
    A leader killed by hand can leave its workers serving in its group (kill -9 of MLflow's server):
    they are stopped alike; the group id, the dead leader's PID, is not handed out again while the
    group lives. Returns False when nothing of our server runs any more (nothing is signalled)."""
    leader = is_ours(record)
    group = os.getpgid(record.pid) == record.pid if leader else not alive(record.pid) and _group_lives(record.pid)
    if not leader and not group:  # gone, or its PID now runs something else
        return False

    def running() -> bool:
        return alive(record.pid) if leader else _group_lives(record.pid)

    def signal_all(sig: int) -> None:
        try:
            os.killpg(record.pid, sig) if group else os.kill(record.pid, sig)
        except ProcessLookupError:
            pass

    terminate(signal_all, running, timeout)
    if group:  # workers the server forked may outlive their leader by a moment
        time.sleep(0.2)
        signal_all(signal.SIGKILL)
    return True


def run_in_own_group(command: list[str], grace: float = 10.0) -> int:
    """Run `command` in a process group of its own until it exits, or until this process gets
    SIGINT, SIGTERM or SIGHUP; either way its whole group is then stopped (SIGTERM, SIGKILL after
    `grace` seconds). MLflow's UI forks uvicorn and job workers: a supervisor's `kill PID` reached
    this process only, and they went on serving the port. Returns its exit status, or 128 + the
    signal's number when a signal stopped it (as a shell reports it: 130 for Ctrl-C)."""
    process = subprocess.Popen(command, start_new_session=True)
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopped.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while process.poll() is None and not stopped:
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

        def group_runs() -> bool:  # polling first reaps an exited leader: unreaped, it would still count in its group
            return process.poll() is None or _group_lives(process.pid)

        def signal_group(sig: int) -> None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

        if group_runs():
            terminate(signal_group, group_runs, grace)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    return 128 + stopped[0] if stopped else process.returncode


def terminate(send: Callable[[int], None], running: Callable[[], bool], grace: float) -> None:
    """send(SIGTERM), then send(SIGKILL) if still `running()` after `grace` seconds."""
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    if running():
        send(signal.SIGKILL)


def _group_lives(group: int) -> bool:
    """Whether any process of process group `group` still runs."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def up(specs: list[ServerSpec], state: Path = STATE, timeout: float = 180.0) -> list[Record]:
    """Start each server that is not already running from this state folder; wait until all are healthy.
    A server that fails takes the ones this call started down with it."""
    records = load_state(state)
    started: list[Record] = []
    try:
        for spec in specs:
            running = records.get(spec.name)
            if running is not None and is_ours(running):
                continue
            records[spec.name] = record = start(spec, state)
            started.append(record)
            save_state(state, records)
        wait_healthy(started, timeout)
    except BaseException:
        for record in started:
            stop(record)
            records.pop(record.name, None)
        save_state(state, records)
        raise
    save_state(state, records)
    return [records[spec.name] for spec in specs]


def down(state: Path = STATE, names: list[str] | None = None) -> list[tuple[str, bool]]:
    """Stop the servers recorded in `state` (all, or `names`); returns (name, was running)."""
    records = load_state(state)
    stopped = []
    for name in list(records):
        if names and name not in names:
            continue
        stopped.append((name, stop(records.pop(name))))
        (state / f"{name}.pid").unlink(missing_ok=True)
    if records or (state / "servers.json").exists():
        save_state(state, records)
    return stopped


def status(state: Path = STATE) -> list[tuple[Record, bool, bool]]:
    """(record, process running, healthy over HTTP) for each recorded server."""
    return [(r, is_ours(r), healthy(r.health_url)) for r in load_state(state).values()]


def exports(records: list[Record]) -> list[str]:
    """Shell lines that point babysit (and the prefect / mlflow CLIs) at the servers."""
    return [f"export {key}={value}" for r in records for key, value in r.export.items()]


def ensure_work_pool(api_url: str, name: str = WORK_POOL) -> bool:
    """Create the `process` work pool that prefect.yaml's deployments use; False if it existed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            return False
    return True
