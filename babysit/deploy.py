"""`babysit serve`: a config's flow served on a schedule with `flow.serve`, no worker or work pool.

The served deployment's parameters are the same as prefect.yaml's: a config path plus `--set`
overrides, validated by the flow on every run (a bad file fails the run with the CLI's message).
Search files (those with a `search` section) serve `search_flow`, other configs `train_flow`.
"""

from __future__ import annotations

from typing import Any

from babysit.config import Config, SearchExperiment, load_config, read_yaml
from babysit.errors import BabysitError


def is_search_file(path: str) -> bool:
    return "search" in read_yaml(path)


def schedule_for(cron: str | None, interval: float | None, timezone: str = "UTC") -> Any:
    """A Prefect schedule from `--cron EXPR` or `--interval SECONDS` (exactly one), checked now
    rather than by the server."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron, Interval

    if (cron is None) == (interval is None):
        raise BabysitError("give exactly one schedule: --cron EXPR (e.g. '0 3 * * *', nightly at 03:00) or --interval SECONDS.")
    if interval is not None:
        if interval <= 0:
            raise BabysitError(f"--interval {interval}: expected a positive number of seconds.")
        return Interval(interval, timezone=timezone)
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as err:
        problem = err.errors()[0]
        # Prefect's own message says what a time zone looks like; a cron string gets the five fields
        hint = "" if problem["loc"] and problem["loc"][-1] == "timezone" else " (expected five fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *')"
        raise BabysitError(f"--cron '{cron}' --timezone {timezone}: {problem['msg'].removeprefix('Value error, ')}{hint}.") from None
    return Cron(cron, timezone=timezone)


def check_config(config: str, overrides: list[str]) -> tuple[bool, str]:
    """Validate the config now (exit 2 on a bad one): (is it a search file, its `name`)."""
    search = is_search_file(config)
    cfg = load_config(config, overrides, model=SearchExperiment if search else Config)
    return search, cfg.name


def check_name(name: str, given_by: str) -> None:
    """Prefect refuses deployment names with '/' or '%' (they are path separators in its API)."""
    if bad := [c for c in "/%" if c in name]:
        raise BabysitError(f"deployment name '{name}' ({given_by}) contains {' and '.join(repr(c) for c in bad)}, which Prefect does not allow "
                           "in a deployment's name; choose another with --name NAME.")


def flow_of(search: bool) -> Any:
    """The flow that runs a search file or a training config (imports torch, Prefect, MLflow)."""
    if search:
        from flows.search import search_flow

        return search_flow
    from flows.train import train_flow

    return train_flow


def serve(flow: Any, config: str, overrides: list[str], schedule: Any, name: str) -> None:
    """Serve `flow` for this config with `schedule` until interrupted (Ctrl-C pauses the schedule,
    as flow.serve does)."""
    flow.serve(
        name=name,
        schedule=schedule,
        parameters={"config": config, "overrides": list(overrides)},
        description=f"babysit serve {config}" + "".join(f" --set {o}" for o in overrides),
        tags=["babysit", "served"],
    )
