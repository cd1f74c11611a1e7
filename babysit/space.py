"""Search spaces as data: distributions over config fields, samplers, and coarse-to-fine narrowing.

A space maps a dotted config field to a distribution, written in YAML as
`optim.lr: loguniform(1e-5, 1e-1)`, `model.dropout: uniform(0, 0.5)`, `train.batch_size: int(16, 128)`
or `model.init: choice([he, xavier])`. Everything here is pure: tests drive it with synthetic
objectives, the search flow with real trainings.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import yaml
from scipy.stats import qmc

from babysit.config import QUOTE_DISTRIBUTIONS

Kind = Literal["loguniform", "uniform", "int", "choice"]


@dataclass(frozen=True)
class Dist:
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    options: tuple = ()

    @property
    def numeric(self) -> bool:
        return self.kind != "choice"

    def to_unit(self, value: float) -> float:
        """Position of `value` in [0, 1] along the range (log scale for loguniform)."""
        lo, hi, v = self._scaled(self.low), self._scaled(self.high), self._scaled(value)
        return (v - lo) / (hi - lo) if hi > lo else 0.5  # a one-value range (int(46, 46)): no edge to sit at

    def from_unit(self, u: float) -> Any:
        """The value at position u in [0, 1) of the range; a choice picks option floor(u · n)."""
        if self.kind == "choice":
            return self.options[min(int(u * len(self.options)), len(self.options) - 1)]
        if self.kind == "int":  # every integer low..high gets an equal share of [0, 1)
            return int(min(math.floor(self.low + u * (self.high - self.low + 1)), self.high))
        lo, hi = self._scaled(self.low), self._scaled(self.high)
        value = lo + u * (hi - lo)
        return float(math.exp(value) if self.kind == "loguniform" else value)

    def _scaled(self, value: float) -> float:
        return math.log(value) if self.kind == "loguniform" else float(value)

    def describe(self) -> str:
        """The distribution as a search file writes it (parse_dist reads it back: range tags, warm starts)."""
        if self.kind == "choice":
            options = [list(o) if isinstance(o, tuple) else o for o in self.options]
            return f"choice({yaml.safe_dump(options, default_flow_style=True, width=1_000_000).strip()})"  # [64, 64], null, true
        if self.kind == "int":
            return f"int({int(self.low)}, {int(self.high)})"
        low, high = _inward(self.low, up=True), _inward(self.high, up=False)
        if float(low) >= float(high):  # a sliver: 4 digits would close it
            low, high = repr(self.low), repr(self.high)
        return f"{self.kind}({low}, {high})"


def _inward(value: float, up: bool) -> str:
    """`value` in 4 significant digits, rounded into its range (low bounds up, high bounds down): the
    text reads back as a range inside the field's limits (0.9999999 is not written as 1, which a
    momentum or a dropout cannot take)."""
    text = f"{value:.4g}"
    rounded = float(text)
    if rounded == value or (rounded > value if up else rounded < value):
        return text
    step = 10.0 ** (math.floor(math.log10(abs(value))) - 3)  # one unit in the 4th digit
    return f"{rounded + step if up else rounded - step:.4g}"


Space = dict[str, Dist]

_SPEC = re.compile(r"^\s*(loguniform|uniform|int|choice)\s*\((.*)\)\s*$", re.S)


def parse_dist(field: str, spec: Any, narrowed: bool = False) -> Dist:
    """Parse 'loguniform(1e-5, 1e-1)' & co. Raises ValueError with what was expected. `narrowed`:
    a range a search wrote (a range tag), where int(n, n) is an int range narrowed to one value
    (search.pad 0); a file's range must have room."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if not match:
        unclosed = isinstance(spec, str) and spec.count("(") > spec.count(")")
        # YAML split an unquoted distribution at its first comma inside {...}: the value ends there
        split = unclosed and "," not in spec.partition("(")[2]
        hint = f"; {QUOTE_DISTRIBUTIONS}" if split else "; a ')' is missing" if unclosed else ""
        if isinstance(spec, dict):  # `optim: {lr: ...}` nests what the space keys by dotted name
            inner = next(iter(spec), "lr")
            hint = f"; the space names each field in full, with dots, not as a nested section: `{field}.{inner}: ...`, and {QUOTE_DISTRIBUTIONS}"
        raise ValueError(f"`{field}`: expected loguniform(low, high), uniform(low, high), int(low, high) or choice([a, b, ...]), got {spec!r}{hint}")
    kind, raw_args = match.groups()
    try:
        args = yaml.safe_load(f"[{raw_args}]")
    except yaml.YAMLError:
        raise ValueError(f"`{field}`: cannot read the arguments of {spec!r}") from None
    if kind == "choice":
        options = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        # YAML 1.1 reads 1e-4 (no dot) as text: a number written that way is still a number
        options = [float(o) if isinstance(o, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", o) else o for o in options]
        if len(options) < 1:
            raise ValueError(f"`{field}`: choice needs at least one option")
        return Dist("choice", options=tuple(tuple(o) if isinstance(o, list) else o for o in options))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in _floats(args)):
        raise ValueError(f"`{field}`: {kind} needs two numbers (low, high), got {spec!r}; use choice([...]) for categories")
    low, high = _floats(args)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"`{field}`: bounds must be finite numbers, got {spec!r}")
    if low > high or (low == high and not (narrowed and kind == "int")):
        raise ValueError(f"`{field}`: low must be below high in {spec!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"`{field}`: loguniform needs 0 < low (a log scale has no 0), got {spec!r}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ValueError(f"`{field}`: int needs whole-number bounds, got {spec!r}")
    return Dist(kind, float(low), float(high))


def _floats(args: list) -> list:
    return [float(a) if isinstance(a, str) and _is_number(a) else a for a in args]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- samplers: each maps (space, n, seed) to n parameter dicts ------------------------------


def unit_points(n: int, dims: int, sampler: str, seed: int) -> np.ndarray:
    """n points in [0, 1)^dims: independent uniform (random), Sobol or Latin-hypercube."""
    if sampler == "random":
        return np.random.default_rng(seed).random((n, dims))
    if sampler == "sobol":
        with warnings.catch_warnings():  # scipy warns per call when n is not a power of 2; the README says it once
            warnings.filterwarnings("ignore", "The balance properties of Sobol", UserWarning)
            return qmc.Sobol(dims, scramble=True, seed=seed).random(n)
    if sampler == "lhs":
        return qmc.LatinHypercube(dims, seed=seed).random(n)
    raise ValueError(f"unknown sampler '{sampler}'")


def grid_levels(space: Space, n: int) -> tuple[int, int]:
    """(combinations of the choices, levels per numeric field) of the grid that n trials allow."""
    choices = math.prod(len(d.options) for d in space.values() if not d.numeric)
    numeric = sum(d.numeric for d in space.values())
    budget = max(n // choices, 1)
    return choices, (max(int(math.floor(budget ** (1 / numeric) + 1e-9)), 1) if numeric else 1)


def grid_shortfall(space: Space, n: int) -> str | None:
    """What a grid of n trials leaves out, in words; None when it runs n points that cover every choice."""
    choices, levels = grid_levels(space, n)
    numeric = sum(d.numeric for d in space.values())
    full = choices * levels**numeric
    if choices > n:
        return (f"the choices alone make {choices} combinations, more than the {n} trials: only the first {n} run"
                + (", with every numeric field at the middle of its range" if numeric else "") + "; raise the stage's trials or use a random sampler")
    if full < n and not numeric:  # every combination runs: the space has no more configs to give
        return f"the choices make {choices} combination(s), all of which run: {n - full} of the {n} trials would repeat one, and are not run"
    if full < n:
        middle = " (1 level: the middle of each range)" if levels == 1 else ""
        return (f"a full grid of {choices} choice combination(s) × {levels} level(s) per numeric field{middle} is {full} points: "
                f"{n - full} of the {n} trials are not run; random sampling would use all {n}")
    return None


def grid_points(space: Space, n: int) -> list[dict[str, Any]]:
    """A full grid with at most n points: every option of each choice, and k evenly spaced cell
    centres per numeric field, k as large as the budget allows. The lecture's foil to random search."""
    fields = list(space)
    _, levels = grid_levels(space, n)
    axes = []
    for f in fields:
        d = space[f]
        count = len(d.options) if not d.numeric else levels
        axes.append([d.from_unit((i + 0.5) / count) for i in range(count)])
    points = [dict(zip(fields, values)) for values in itertools.product(*axes)]
    return points[:n]


def sample(space: Space, n: int, sampler: str, seed: int) -> list[dict[str, Any]]:
    if sampler == "grid":
        return grid_points(space, n)
    fields = list(space)
    points = unit_points(n, len(fields), sampler, seed)
    return [{f: space[f].from_unit(u) for f, u in zip(fields, row)} for row in points]


# ---- narrowing and edges --------------------------------------------------------------------


@dataclass(frozen=True)
class Narrowing:
    top_k: int | float = 0.25  # trials that define the next stage's ranges: a count, or a share (≥ 2 trials)
    pad: float = 0.1  # of the current width, added on each side of the top-k span
    edge: float = 0.10  # best value within this fraction of the width from a bound: at the edge
    widen: float = 10.0  # edge moves: ×widen (loguniform) or + (widen/10) × width (uniform, int)
    learning_rate: str = "optim.lr"  # the field that trials whose loss barely moved ('too_slow') blame


def top_count(top_k: int | float, scored: int) -> int:
    """How many of `scored` trials count as the top: `top_k` itself, or a share of them (at least 2)."""
    return top_k if isinstance(top_k, int) else max(2, round(top_k * scored))


def narrow(space: Space, trials: list[dict[str, Any]], cfg: Narrowing, is_valid: Any = None, reads: Any = None) -> tuple[Space, dict[str, str]]:
    """The next stage's space from this stage's trials, and the fields whose best value sat at an edge.

    `trials`: dicts with 'params' (field -> value), 'score' (higher is better; None if the trial
    failed), 'diverged' (bool) and optionally 'too_slow' (bool: the loss barely moved, the
    lr_too_low flag) and 'too_fast' (bool: the lr_too_high flag). Numeric ranges shrink to the
    top-k span plus padding (in log space for loguniform); if the best trial lies within `edge` of a bound, that bound moves outwards
    instead (by `widen`), unless a diverged trial already lies beyond it — diverged trials cap the
    upper bound (too-high values) from above: the learning rate's, when theirs was above every top
    trial's (_divergence_explained_by_lr), else every field's. The learning rate (`cfg.learning_rate`) has the
    mirror image: too-slow trials below the top trials raise its lower bound, and too-fast ones (lr_too_high)
    above them lower its upper bound, as report.md's advice says. Too-slow trials tied
    into the top-k below a best trial that learned do not count among the top. When most of the
    top trials were too slow themselves (the best too), or every trial diverged, only the learning
    rate's range moves (up or down, past the edge; with the learning rate not searched, nothing does); see _above_what_barely_learned and _below_what_diverged, which
    also moves it down when every trial that finished learned too fast.
    `is_valid(field, value)` says whether a moved bound is still a legal config value: a bound
    moved past the field's limit stops at it, and one already there stays put and is not reported
    as an edge. Choices keep the options that appear among the top-k, and those no trial tried.
    Trials tied with the k-th best count among the top too; when every trial scored the same (all at chance), only diverged and
    barely-learning trials narrow anything. A numeric field at which every trial had one value stays as it was.
    `reads(field, params)` says whether a trial trained with `field` at all (momentum only with
    SGD momentum, see babysit.config.READ_ONLY_WHEN): a field narrows on the top-k trials that
    read it, and stays as it was when none did.
    """
    scored = sorted((t for t in trials if t["score"] is not None and not t.get("diverged")), key=lambda t: -t["score"])
    if not scored or (all(t.get("too_fast") for t in scored) and cfg.learning_rate in space and space[cfg.learning_rate].numeric):
        return _below_what_diverged(space, trials, cfg, is_valid)  # or every trial that finished learned too fast
    cut = scored[min(top_count(cfg.top_k, len(scored)), len(scored)) - 1]["score"]
    top = [t for t in scored if t["score"] >= cut]  # every trial tied at the cut: which of them ran first is no evidence
    if not top[0].get("too_slow"):  # the best learned: trials that barely did are in the top by a tie at chance, not by their values
        top = [t for t in top if not t.get("too_slow")]
    learning_rate = space.get(cfg.learning_rate)
    if 2 * sum(bool(t.get("too_slow")) for t in top) > len(top):  # their scores are noise: nothing narrows on them
        if learning_rate is not None and learning_rate.numeric:
            return _above_what_barely_learned(space, trials, cfg, is_valid)
        return space, {}
    tied = scored[0]["score"] == scored[-1]["score"] and len(scored) > 1  # no score tells the trials apart
    lr_explains = _divergence_explained_by_lr(learning_rate, cfg.learning_rate, top)
    new_space, edges = {}, {}
    for field, dist in space.items():
        field_top = [t for t in top if reads is None or reads(field, t["params"])]
        tried = [t["params"][field] for t in trials if field in t["params"] and (reads is None or reads(field, t["params"]))]
        if not field_top or tied and not dist.numeric:  # no evidence either way
            new_space[field] = dist
            continue
        if not dist.numeric:  # an option no trial tried is no evidence either way: it stays
            kept = [o for o in dist.options if any(_same(t["params"][field], o) for t in field_top) or not any(_same(v, o) for v in tried)]
            new_space[field] = replace(dist, options=tuple(kept) or dist.options)
            continue
        if len(tried) > 1 and len(set(tried)) == 1:  # every trial at one value (a grid short of its choices' combinations): no evidence (QA)
            new_space[field] = dist
            continue
        positions = [dist.to_unit(t["params"][field]) for t in field_top]
        lo, hi = (0.0, 1.0) if tied else (min(positions) - cfg.pad, max(positions) + cfg.pad)  # tied: only what diverged or barely learned cuts
        best = [t for t in field_top if t["score"] == field_top[0]["score"]]
        sides = {edge_side(dist, t["params"][field], cfg.edge) for t in best}
        side = sides.pop() if len(sides) == 1 and not tied else None  # the best trials (tied or one) agree on an edge
        if field == cfg.learning_rate and side == "low" and any(t.get("too_slow") for t in best):
            side = None  # a best trial that barely learned asks for a higher rate, not a lower one
        if field == cfg.learning_rate and side == "high" and any(t.get("too_fast") for t in best):
            side = None  # and one that learned too fast, for a lower one, not a higher one
        if side is not None:
            edges[field] = side
        if side == "low":
            lo = -_edge_shift(dist, cfg.widen)
        if side == "high":
            hi = 1 + _edge_shift(dist, cfg.widen)
        if field == cfg.learning_rate:  # trials too slow to learn, below the top ones, raise the floor; too fast, above them, lower the ceiling
            slow_below = [u for t in trials if t.get("too_slow") and (u := dist.to_unit(t["params"][field])) < min(positions)]
            fast_above = [u for t in trials if t.get("too_fast") and (u := dist.to_unit(t["params"][field])) > max(positions)]
            lo, hi = max([lo, *slow_below]), min([hi, *fast_above])
        diverged_above = [u for t in trials if t.get("diverged") and (reads is None or reads(field, t["params"])) and (u := dist.to_unit(t["params"][field])) > max(positions)
                          and (field == cfg.learning_rate or not lr_explains(t))]
        if diverged_above:
            hi = min(hi, min(diverged_above))
        # without an edge, narrowing stays inside the current range
        lo = lo if field in edges and edges[field] == "low" else max(lo, 0.0)
        hi = hi if field in edges and edges[field] == "high" else min(hi, 1.0)
        new_space[field] = _rebuild(field, dist, lo, hi, is_valid)
        moved = new_space[field].low < dist.low if edges.get(field) == "low" else new_space[field].high > dist.high
        if field in edges and not moved:  # at a hard limit of the field (e.g. dropout 0): nothing moved
            del edges[field]
    return new_space, edges


def _divergence_explained_by_lr(learning_rate: Dist | None, field: str, top: list[dict[str, Any]]) -> Any:
    """Whether a diverged trial's learning rate was higher than every top trial's: the lecture's
    first suspect, and then the only range it caps (a dropout it happened to have is no evidence).
    Without a searched numeric learning rate, nothing explains it, and it caps every field."""
    if learning_rate is None or not learning_rate.numeric:
        return lambda trial: False
    highest = max(learning_rate.to_unit(t["params"][field]) for t in top)
    return lambda trial: learning_rate.to_unit(trial["params"][field]) > highest


def edge_band(sampler: str, space: Space, n: int, edge: float) -> float:
    """The band (a share of each range's width) within which a stage's best value counts as at an
    edge: `edge`, or for a grid of n trials wide enough to hold its outermost levels. A grid of k
    levels samples cell centres, 1/(2k) in from each bound: with 3 levels at 1/6, 1/2 and 5/6,
    none ever lay within 10% of a bound, and no grid search ever moved a range. With 2 levels or
    1, no level lies inside the others: they tell no edge."""
    if sampler != "grid":
        return edge
    _, levels = grid_levels(space, n)
    return max(edge, 0.5 / levels + 1e-9) if levels > 2 else edge


def edge_side(dist: Dist, value: Any, edge: float) -> str | None:
    """'low' or 'high' when `value` lies within `edge` (a fraction of the range's width, on its
    scale) of that bound of numeric `dist`; else None."""
    position = dist.to_unit(value)
    return "low" if position <= edge else "high" if position >= 1 - edge else None


def inside_declared(dist: Dist, declared: Dist, side: str) -> bool:
    """Whether numeric `dist`'s `side` bound (low | high) lies inside the `declared` range: a bound
    that narrowing set, with more of the file's range beyond it."""
    position = declared.to_unit(dist.low if side == "low" else dist.high)
    return position > 1e-9 if side == "low" else position < 1 - 1e-9


def _edge_shift(dist: Dist, widen: float) -> float:
    """How far, in units of the current range, an edge moves: ×widen (log) or widen/10 of the width."""
    if dist.kind != "loguniform":
        return widen / 10
    width = dist._scaled(dist.high) - dist._scaled(dist.low)
    return math.log(widen) / width if width > 0 else 0.0


def _above_what_barely_learned(space: Space, trials: list[dict[str, Any]], cfg: Narrowing, is_valid: Any) -> tuple[Space, dict[str, str]]:
    """Most of the top trials barely learned (the lecture: a loss that hardly moves means the learning
    rate is too low), so the scores rank noise: no field narrows on them. The learning rate's range
    moves past its high edge, from the highest too-slow value up (not past a diverged one)."""
    field, dist = cfg.learning_rate, space[cfg.learning_rate]
    slow = [dist.to_unit(t["params"][field]) for t in trials if t.get("too_slow")]
    diverged_above = [u for t in trials if t.get("diverged") and (u := dist.to_unit(t["params"][field])) > max(slow)]
    moved = _rebuild(field, dist, max(slow), min([1 + _edge_shift(dist, cfg.widen), *diverged_above]), is_valid)
    return {**space, field: moved}, ({field: "high"} if moved.high > dist.high else {})


def _below_what_diverged(space: Space, trials: list[dict[str, Any]], cfg: Narrowing, is_valid: Any) -> tuple[Space, dict[str, str]]:
    """No trial finished, or every one that did learned too fast (lr_too_high: its loss rose, or its
    updates were large for its weights): the learning rate's range moves below the lowest of
    them, past its low edge (the lecture: a loss that rises or explodes means the rate is too high),
    but keeps the best trial's rate: a flag on the update ratio alone is no reason to leave behind
    the best score (QA: 0.756 scored 95.6%, and a range below 0.348 found nothing as good)."""
    field, dist = cfg.learning_rate, space.get(cfg.learning_rate)
    too_high = [t for t in trials if t.get("diverged") or t.get("too_fast")]
    diverged = [dist.to_unit(t["params"][field]) for t in too_high] if dist is not None and dist.numeric else []
    if not diverged:
        return space, {}
    scored = [t for t in trials if t["score"] is not None and not t.get("diverged")]
    best = [dist.to_unit(max(scored, key=lambda t: t["score"])["params"][field])] if scored else []
    moved = _rebuild(field, dist, -_edge_shift(dist, cfg.widen), max([min(diverged), *best]), is_valid)
    return {**space, field: moved}, ({field: "low"} if moved.low < dist.low else {})


# A range moved past its edge stops at its field's limit; these fields stop short of theirs, where
# a config may still go: nearly every value near the limit is degenerate (QA: a dropout range moved
# up to 0.9999, whose trials dropped nearly every unit and scored 0.3).
MOVE_LIMITS = {"model.dropout": (0.0, 0.9), "optim.momentum": (0.0, 0.999)}


def _rebuild(field: str, dist: Dist, lo_u: float, hi_u: float, is_valid: Any) -> Dist:
    lo_s, hi_s = dist._scaled(dist.low), dist._scaled(dist.high)

    def value(u: float) -> float:
        v = lo_s + u * (hi_s - lo_s)
        return math.exp(v) if dist.kind == "loguniform" else v

    low, high = value(lo_u), value(hi_u)
    if dist.kind == "int":
        low, high = math.floor(low + 1e-9), math.ceil(high - 1e-9)
    # a bound moved past a hard limit of its field (dropout below 0, a batch of 0 rows) stops at the limit
    if low < dist.low and is_valid is not None and not is_valid(field, low):
        low = _furthest_valid(field, dist.low, low, dist.kind == "int", is_valid)
    if high > dist.high and is_valid is not None and not is_valid(field, high):
        high = _furthest_valid(field, dist.high, high, dist.kind == "int", is_valid)
    lowest, highest = MOVE_LIMITS.get(field, (-math.inf, math.inf))
    low = max(low, min(lowest, dist.low)) if low < dist.low else low
    high = min(high, max(highest, dist.high)) if high > dist.high else high
    if high <= low and dist.kind != "int":  # all top trials at one value: keep some room around it, within the field's limits
        value, room = low, 0.05 * (dist.high - dist.low)  # not a sliver: any value in one would sit "at its edge"
        low, high = (value / 1.5, value * 1.5) if dist.kind == "loguniform" else (value - room, value + room)
        if is_valid is not None and not is_valid(field, low):
            low = value
        if is_valid is not None and not is_valid(field, high):
            high = value
    return replace(dist, low=float(low), high=float(max(high, low)))


def _furthest_valid(field: str, start: float, target: float, whole: bool, is_valid: Any) -> float:
    """The value nearest `target`, from valid `start` toward invalid `target`, that is still valid:
    the field's limit (a bisection; `whole`: integers only). A real value stops within 1e-4 of the
    way there, rounded to that precision when the rounded value is valid: the limit 0 of dropout is
    0, and a learning rate (> 0) moved down from 0.5 by 4.5 stops at 0.0003, not at 1e-19."""
    good, bad = start, target
    close_enough = 1 if whole else abs(target - start) * 1e-4
    while abs(good - bad) > close_enough:
        middle = (good + bad) // 2 if whole else (good + bad) / 2
        if middle in (good, bad):
            break
        good, bad = (middle, bad) if is_valid(field, int(middle) if whole else middle) else (good, middle)
    if whole:
        return good
    snapped = round(good, -math.ceil(math.log10(close_enough)))
    return snapped if abs(snapped - bad) <= abs(good - bad) and is_valid(field, snapped) else good


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def describe(space: Space) -> dict[str, str]:
    return {field: dist.describe() for field, dist in space.items()}
