"""Operate costs on this machine: servers up, a train flow with and without a Prefect server,
and the same search on threads vs a Dask LocalCluster.

    .venv/bin/python bench/operate_timing.py [--repeats 3] [--trials 8] [--epochs 5]

Everything runs on loopback with free ports, in a temporary folder (MLflow: a SQLite store created
once before timing, as the flows expect). Wall times are medians over --repeats, printed with the
load average, since other work on a 2-core machine moves them a lot.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - started


def median(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} s  (runs: {', '.join(f'{v:.1f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8, help="trials in the search's one stage")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial")
    parser.add_argument("--only", choices=["servers", "train", "search"], default=None, help="one part only")
    args = parser.parse_args()

    from babysit import servers, tracking

    scratch = tempfile.TemporaryDirectory(prefix="babysit-operate-", ignore_cleanup_errors=True)  # removed at exit
    tmp = Path(scratch.name)
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")

    # 1. babysit server up -> healthy, fresh state each time (the first start migrates Prefect's database)
    ups, prefect_health, mlflow_health = [], [], []
    for i in range(args.repeats if args.only in (None, "servers") else 0):
        state = tmp / f"state{i}"
        command = [str(BIN / "babysit"), "server", "up", "--state", str(state), "--prefect-port", str(free_port()),
                   "--mlflow-port", str(free_port()), "--backend-store-uri", f"sqlite:///{tmp}/up{i}.db",
                   "--artifacts-destination", str(tmp / "artifacts")]
        try:
            ups.append(timed(command, base))
            records = servers.load_state(state)
            prefect_health.append(records["prefect"].healthy_after_s)
            mlflow_health.append(records["mlflow"].healthy_after_s)
        finally:
            servers.down(state)
    if ups:
        print(f"babysit server up, command to exit (fresh state): {median(ups)}")
        print(f"  prefect healthy after start:                    {median(prefect_health)}")
        print(f"  mlflow healthy after start:                     {median(mlflow_health)}")
    if args.only == "servers":
        return

    # A Prefect server that stays up for the rest (its database already migrated on the 2nd start).
    state = tmp / "state-kept"
    (record,) = servers.up([servers.prefect_spec(state, port=free_port())], state)
    try:
        api = record.export["PREFECT_API_URL"]
        store = f"sqlite:///{tmp}/bench.db"
        tracking.open_store(store, "babysit")
        tracking.open_store(store, "babysit-search")
        local = {**base, "MLFLOW_TRACKING_URI": store}

        # 2. babysit train (a process per run, as a user runs it): temporary server vs a running one
        train = [str(BIN / "babysit"), "train", "conf/digits_mlp.yaml", "--set", "tracking.log_model=false"]
        if args.only in (None, "train"):
            ephemeral = [timed(train, local) for _ in range(args.repeats)]
            served = [timed(train, {**local, "PREFECT_API_URL": api}) for _ in range(args.repeats)]
            print(f"babysit train conf/digits_mlp.yaml, ephemeral Prefect:     {median(ephemeral)}")
            print(f"babysit train conf/digits_mlp.yaml, running Prefect server: {median(served)}")

        # 3. the same search on threads and on a Dask LocalCluster (2 workers each), same servers
        stage = f"search.stages=[{{name: coarse, trials: {args.trials}, epochs: {args.epochs}}}]"
        for runner in ("threads", "dask") if args.only in (None, "search") else ():
            walls = []
            for i in range(args.repeats):
                # a new search each time (resume would reuse every trial): a different seed
                command = [str(BIN / "babysit"), "search", "conf/search_digits.yaml", "--set", stage, "--set", "search.final=null",
                           "--set", "search.workers=2", "--set", f"search.runner={runner}", "--set", f"seed={1000 + i}",
                           "--set", f"name=bench_{runner}"]
                walls.append(timed(command, {**local, "PREFECT_API_URL": api}))
            per_min = [args.trials / w * 60 for w in walls]
            print(f"babysit search, {args.trials} trials x {args.epochs} epochs, runner={runner:7s}: {median(walls)}; "
                  f"{statistics.median(per_min):.1f} trials/min")
    finally:
        servers.down(state)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
