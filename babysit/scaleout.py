"""Where a search's trials run: threads, worker processes (tasks.trial.worker_processes), or a
Dask cluster (prefect-dask).

`search.runner: dask` runs trials on a LocalCluster of `search.workers` single-threaded worker
processes bound to 127.0.0.1, or on the scheduler at `search.dask_address`. Trials write to
MLflow from the Dask workers, so every worker must reach the same tracking store:
`dask_tracking_uri` refuses a local SQLite file for workers on other machines (docs/scale-out.md).
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from babysit.errors import BabysitError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", ""}


def is_loopback(address: str) -> bool:
    """'tcp://127.0.0.1:8786', 'localhost:8786', 'tcp://[::1]:8786' -> True; other hosts -> False."""
    host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_file_store(uri: str) -> bool:
    """SQLite files and plain paths: stores that only processes on this machine can write."""
    scheme = urlparse(uri).scheme
    return scheme in ("sqlite", "file", "") or len(scheme) == 1  # 'C:\\...' parses with scheme 'c'


def dask_tracking_uri(uri: str, address: str | None, worker_addresses: list[str] | tuple[str, ...] = ()) -> str:
    """The tracking URI that Dask workers should use, or BabysitError when they cannot share it.

    A LocalCluster (no address), a loopback scheduler and loopback workers share this machine's
    files: a relative SQLite path becomes absolute, since a worker's working folder may differ.
    Workers elsewhere need a tracking server (http://...) or a database they can all reach.
    """
    if not is_local_file_store(uri):
        return uri
    remote = [a for a in ([address] if address else []) + list(worker_addresses) if not is_loopback(a)]
    if remote:
        raise BabysitError(
            f"search.runner=dask with Dask workers on other machines ({', '.join(remote)}) cannot log trials to the "
            f"local MLflow store {uri}: each machine would write its own file. Start a tracking server "
            f"(`babysit server up`, or `mlflow server` on PostgreSQL as docs/scale-out.md shows) and set "
            f"MLFLOW_TRACKING_URI=http://HOST:5000 (or tracking.uri) for the search and every worker."
        )
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


DASK_PORT = 8786  # the scheduler's default


def check_scheduler(address: str) -> None:
    """A scheduler address where nothing answers is a BabysitError at once: Dask retries for 30 s,
    then the search failed with four chained tracebacks."""
    from babysit.servers import port_in_use

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("tcp", "tls") and not port_in_use(parsed.hostname or "127.0.0.1", parsed.port or DASK_PORT, timeout=5.0):
        raise BabysitError(f"`search.dask_address` {address}: no Dask scheduler answers there; start it (`dask scheduler`, and `dask worker "
                           f"{address}` on each machine, docs/scale-out.md), or leave the address out to run a LocalCluster of "
                           "`search.workers` processes here.")


def dask_prefect_api(address: str | None, configured: str | None, current: str | None) -> str | None:
    """The Prefect API URL that Dask workers report task runs to.

    Each worker process runs its trials as Prefect task runs. Without PREFECT_API_URL the flow
    runs on a temporary server of its own (ephemeral mode, `current`); a LocalCluster's workers are
    pointed at it, since they would otherwise each start another one. Workers of an existing
    cluster were started elsewhere with their own environment: they need a real server.
    """
    if configured:
        return configured
    if address:
        raise BabysitError(
            f"search.runner=dask on the scheduler at {address} needs a Prefect server that the Dask workers "
            f"report to: without PREFECT_API_URL this search runs on a temporary server that only this process "
            f"can reach. Start one (`babysit server up`, docs/scale-out.md) and export the PREFECT_API_URL it "
            f"prints here and on every Dask worker."
        )
    return current


def task_runner(runner: str, workers: int, dask_address: str | None = None, prefect_api: str | None = None) -> Any:
    """A Prefect task runner for `search.runner`; enter it (`with`) around the trials' submits.
    `prefect_api`: the API URL for a LocalCluster's workers (see dask_prefect_api)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "processes":  # each task thread waits on a worker process (tasks.trial.worker_processes)
        # one trial queued per worker: a worker that finishes takes the next trial at once, instead
        # of idling while Prefect finishes one task run and starts the next
        return ThreadPoolTaskRunner(max_workers=2 * workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # One single-threaded worker process per trial slot; scheduler, workers and dashboard on
    # loopback (the dashboard's default address would be every interface).
    # silence_logs: distributed's warnings at the cluster's close ("Worker process still alive after 4.0 seconds, killing") were ~40 lines a search
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "silence_logs": logging.ERROR,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:8787",
                                          "env": {"PREFECT_API_URL": prefect_api} if prefect_api else {}})


def dask_workers(runner: Any) -> list[str]:
    """The addresses of the workers a DaskTaskRunner's cluster has now (connects if need be)."""
    return list(runner.client.scheduler_info().get("workers", {}))
