"""Kill a running search with SIGKILL mid-stage, run it again, and check the store.

Expected: the second run reuses every trial the first one finished, re-runs the rest, and the
store ends with exactly one FINISHED run per trial key and no run left RUNNING.

    .venv/bin/python bench/resume_after_kill.py [--config conf/search_digits.yaml] [--kill-after 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from babysit import tracking

SEARCH = ["--set", "search.stages=[{name: coarse, trials: 12, epochs: 2}, {name: fine, trials: 6, epochs: 4}]", "--set", "search.final.epochs=5"]


def child_runs(uri: str) -> list:
    client = tracking._client(uri)
    experiments = client.search_experiments()
    runs = []
    for experiment in experiments:
        runs += [r for r in tracking.find_runs(uri, experiment.experiment_id, {}) if "mlflow.parentRunId" in r.data.tags]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/search_digits.yaml")
    parser.add_argument("--kill-after", type=int, default=4, help="finished trials before the kill")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="bench-resume-", ignore_cleanup_errors=True)  # removed at exit
    uri = f"sqlite:///{scratch.name}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [str(Path(sys.executable).parent / "babysit"), "search", args.config, *SEARCH]

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            done = [r for r in child_runs(uri) if r.info.status == "FINISHED"]
        except Exception:  # the store may not exist yet
            continue
        if len(done) >= args.kill_after:
            break
    os.killpg(first.pid, signal.SIGKILL)  # the search and its Prefect server, no clean-up
    first.wait()
    before = Counter(r.info.status for r in child_runs(uri))
    print(f"killed after {sum(before.values())} trial runs: {dict(before)}")

    started = time.perf_counter()
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    print(f"second run: exit {second.returncode} in {time.perf_counter() - started:.1f} s")
    print("\n".join(line for line in second.stdout.splitlines() if "reused" in line or "trials" in line))
    runs = child_runs(uri)
    statuses = Counter(r.info.status for r in runs)
    finished_keys = Counter(r.data.tags.get("babysit.trial_key") for r in runs if r.info.status == "FINISHED")
    print(f"after: {dict(statuses)}; trial keys with exactly one FINISHED run: {sum(c == 1 for c in finished_keys.values())}/{len(finished_keys)}")
    ok = second.returncode == 0 and statuses.get("RUNNING", 0) == 0 and all(c == 1 for c in finished_keys.values())
    print("RESUME OK" if ok else "RESUME BROKEN")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
