"""Searches that recur (a nightly deployment, `babysit serve --cron`): naming, warm start, what changed.

Everything here is pure: it reads runs that `babysit.tracking` already fetched (MLflow `Run`
objects, or anything with the same `.info` / `.data` shape) and returns data. The search flow
calls it before its first stage (identity, warm start) and after its last (changes).

- A scheduled run of a deployment gets its own parent run, named and tagged by its deployment
  and scheduled time, so tonight's search does not resume last night's (a retry of the same
  flow run keeps its scheduled time, and so resumes).
- `search.warm_start: latest` makes the first stage sample from the last ranges of the latest
  finished run of the same search (its `range.<stage>.<field>` tags) instead of the file's
  coarse ranges. Fields that are new, changed kind or no longer valid keep the file's range.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from babysit.space import Dist, Space, parse_dist


@dataclass(frozen=True)
class PastSearch:
    """A finished earlier run of a search, as the next run needs it."""

    run_id: str
    run_name: str
    started: datetime | None  # UTC
    best_val_acc: float | None
    ranges: dict[str, dict[str, str]]  # stage -> field -> 'loguniform(1e-05, 0.1)', in stage order
    search_hash: str = ""  # its file's, as flows.search.search_hash: another base config or space, another hash
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # its parent run's (flows.search.parent_params), as MLflow keeps them: text
    data_version: str = ""  # its babysit.data_version tag (tasks.data.data_fingerprint)


def schedule_identity(deployment: str | None, scheduled: datetime | None) -> dict[str, str]:
    """Tags that make each scheduled run of a deployment its own search (empty outside deployments)."""
    if not deployment or scheduled is None:
        return {}
    when = scheduled.astimezone(timezone.utc) if scheduled.tzinfo else scheduled.replace(tzinfo=timezone.utc)
    # to the microsecond: two runs started by hand in the same minute are two searches
    return {"babysit.schedule": deployment, "babysit.scheduled_for": when.isoformat(timespec="microseconds" if when.microsecond else "seconds").replace("+00:00", "Z")}


def run_name(base: str, identity: dict[str, str]) -> str:
    """'search_digits' or, for a scheduled run, 'search_digits nightly 2026-11-28 03:00Z' (with the
    seconds when they are not 0: runs every 40 s would share names by the minute)."""
    if "babysit.schedule" not in identity:
        return base
    when = identity["babysit.scheduled_for"]  # 2026-11-28T03:00:00Z
    return f"{base} {identity['babysit.schedule']} {when[:16 if when[17:19] in ('', '00') else 19].replace('T', ' ')}Z"


def stage_ranges(tags: dict[str, str], fields: list[str], stage_order: list[str]) -> dict[str, dict[str, str]]:
    """{stage: {field: text}} from tags 'range.<stage>.<field>' (fields hold dots, so they are
    matched against the known `fields`), ordered by `stage_order`, unknown stages last."""
    found: dict[str, dict[str, str]] = {}
    for key, text in tags.items():
        if not key.startswith("range."):
            continue
        rest = key.removeprefix("range.")
        field = max((f for f in fields if rest.endswith("." + f)), key=len, default=None)
        if field is not None:
            found.setdefault(rest[: -len(field) - 1], {})[field] = text
    rank = {stage: i for i, stage in enumerate(stage_order)}
    return {stage: found[stage] for stage in sorted(found, key=lambda s: rank.get(s, len(rank)))}


def stage_order(params: dict[str, str], fallback: list[str]) -> list[str]:
    """Stage names in order from a parent run's `search.stages` param (the repr of a list of dicts)."""
    try:
        stages = ast.literal_eval(params.get("search.stages", ""))
        return [str(s["name"]) for s in stages]
    except (ValueError, SyntaxError, TypeError, KeyError):
        return fallback


def latest_before(past: list[Any], run: Any | None) -> Any | None:
    """The newest of `past` (finished runs, newest first) that started before `run`, a run that a
    resumed search reopened: it compares itself with what came before it, never with a later run
    of the same name. With no run (a new one, started after all of them), the newest."""
    if run is None:
        return past[0] if past else None
    return next((r for r in past if r.info.run_id != run.info.run_id and r.info.start_time < run.info.start_time), None)


def past_search(run: Any, fields: list[str], fallback_order: list[str]) -> PastSearch:
    """A search parent run (as fetched from MLflow) to a PastSearch over the searched `fields`."""
    tags, params, metrics = dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc) if run.info.start_time else None
    searched_then = [key.removeprefix("search.space.") for key in params if key.startswith("search.space.")]  # its file's space, as logged
    return PastSearch(
        run.info.run_id, tags.get("mlflow.runName", run.info.run_id), started, metrics.get("best_val_acc"),
        stage_ranges(tags, list(dict.fromkeys([*fields, *searched_then])), stage_order(params, fallback_order)), tags.get("babysit.search_hash", ""),
        params, tags.get("babysit.data_version", ""),
    )


def final_ranges(past: PastSearch) -> dict[str, str]:
    """Each field's range in the last stage that sampled it."""
    last: dict[str, str] = {}
    for space in past.ranges.values():
        last.update(space)
    return last


def warm_space(space: Space, past: PastSearch, is_valid: Any = None) -> tuple[Space, dict[str, str]]:
    """The first stage's space warm-started from `past`, and a note per field on what was done.

    A field takes the past range when it parses, has the same kind as the file's (loguniform
    stays loguniform; a choice's options must be among the file's), and `is_valid(field, value)`
    accepts its bounds; otherwise it keeps the file's range.
    """
    previous = final_ranges(past)
    warmed: Space = {}
    notes: dict[str, str] = {}
    for field, dist in space.items():
        text = previous.get(field)
        candidate, why = _candidate(field, dist, text, is_valid)
        warmed[field] = candidate or dist
        notes[field] = f"{candidate.describe()} (from {past.run_name})" if candidate else f"{dist.describe()} (file's range: {why})"
    return warmed, notes


def _candidate(field: str, dist: Dist, text: str | None, is_valid: Any) -> tuple[Dist | None, str]:
    if text is None:
        return None, "not searched before"
    try:
        old = parse_dist(field, text, narrowed=True)
    except ValueError:
        return None, f"cannot read {text!r}"
    if old.kind != dist.kind:
        return None, f"was {old.kind}, now {dist.kind}"
    if not old.numeric:
        options = tuple(o for o in old.options if o in dist.options)
        return (replace(dist, options=options), "") if options else (None, "no option left in the file's choice")
    bounds = (int(old.low), int(old.high)) if old.kind == "int" else (old.low, old.high)
    if is_valid is not None and not all(is_valid(field, b) for b in bounds):
        return None, f"{text} is no longer a valid range"
    return old, ""


# a search's settings that change none of its results (flows.search.search_hash leaves them out)
NOT_IN_SEARCH_HASH = ("search.workers", "search.runner", "search.dask_address")


def changed_settings(past: dict[str, str], now: dict[str, Any], shown: int = 4) -> str:
    """The settings whose values differ between two parent runs' params ('' when none does):
    'search.final.epochs 30 -> 4, ...', a setting one of them lacks as 'unset'."""
    changed = [key for key in sorted(past.keys() | now.keys())
               if key not in NOT_IN_SEARCH_HASH and past.get(key, "unset") != (str(now[key]) if key in now else "unset")]
    said = [f"{key} {past.get(key, 'unset')} -> {now[key] if key in now else 'unset'}" for key in changed[:shown]]
    return ", ".join(said) + (f" and {len(changed) - shown} more" if len(changed) > shown else "")


def changes_since(past: PastSearch | None, best_val_acc: float | None, ranges: dict[str, dict[str, str]], search_hash: str = "",
                  params: dict[str, Any] | None = None, data_version: str = "") -> list[str]:
    """What changed since `past`: whether the search file did (`search_hash`, this run's; which
    settings, from this run's parent `params`) or its data (`data_version`), best validation
    accuracy, then each stage's ranges that moved (compared stage by stage and field by field;
    pairs that `past` did not search are listed as such)."""
    if past is None:
        return []
    when = f" ({past.started:%Y-%m-%d %H:%M}Z)" if past.started else ""
    lines = [f"since {past.run_name}{when}, run {past.run_id}:"]
    if search_hash and past.search_hash and search_hash != past.search_hash:  # QA: a batch-norm search compared with one without, unsaid
        # QA: said of a rerun that changed only search.final, or only touched its data file
        settings = changed_settings(past.params, params) if params is not None and past.params else ""
        if settings:
            lines.append(f"the search file changed since ({settings}): the two searches differ in more than their luck")
        elif params is not None and past.params and data_version != past.data_version:
            lines.append("the data changed since (its file was rewritten, or its modification time changed): "
                         "its trials trained again on this version")
        else:
            lines.append("the search file changed since (its base config, space or stages): the two searches differ in more than their luck")
    if best_val_acc is not None and past.best_val_acc is not None:
        lines.append(f"best val acc {past.best_val_acc:.4f} -> {best_val_acc:.4f} ({best_val_acc - past.best_val_acc:+.4f})")
    now = [(stage, field, text) for stage, space in ranges.items() for field, text in space.items()]
    compared = [(stage, field, text) for stage, field, text in now if field in past.ranges.get(stage, {})]
    moved = [f"{stage} {field}: {past.ranges[stage][field]} -> {text}" for stage, field, text in compared if past.ranges[stage][field] != text]
    dropped = [f"{stage} {field}" for stage, space in past.ranges.items() for field in space if field not in ranges.get(stage, {})]
    lines += moved or ([f"ranges{' searched both times' if dropped else ''}: unchanged"] if compared else [])
    new = [f"{stage} {field}" for stage, field, _ in now if field not in past.ranges.get(stage, {})]
    if new:  # a renamed or added stage, a newly searched field: nothing to compare them with
        lines.append("not searched then: " + ", ".join(new))
    if dropped:  # QA: a field taken out of the space left "ranges: unchanged" alone
        lines.append("searched then, not now: " + ", ".join(dropped))
    return lines
