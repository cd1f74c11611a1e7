"""Where a run came from: its config's name and seed, the Prefect flow run and the git commit."""

from __future__ import annotations

import subprocess

from prefect import runtime

from babysit.config import Config


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance_tags(cfg: Config) -> dict[str, str]:
    tags = {"babysit.config_name": cfg.name, "babysit.seed": str(cfg.seed)}
    if (flow_run_id := runtime.flow_run.id) is not None:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags
