"""What to do next: pure functions from flags and histories to short markdown, in the lecture's words.

`run_report` turns one run's flags (babysit.flags) and per-epoch histories into a report
(logged as report.md, printed by `babysit report`); `search_advice` reads a search's trials
table and says which ranges to move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from babysit.space import top_count

History = dict[str, list[float]]

# Order of the advice: problems at init first (nothing after them is meaningful), then the
# learning rate, then the fit (the lecture's babysitting order).
ORDER = (
    "initial_loss_off", "vanishing_activations", "exploding_activations", "saturated", "dead_relu",
    "diverged", "lr_too_high", "lr_too_low", "majority_class", "plateau", "underfitting", "overfitting",
)


def _accuracies(history: History) -> str:
    if not history.get("train_acc") or not history.get("val_acc"):
        return "accuracies not recorded"
    return f"training accuracy {history['train_acc'][-1]:.0%}, validation {history['val_acc'][-1]:.0%}"


def _underfitting(history: History, rate_too_high: bool = False) -> str:
    """The cure for underfitting; not "raise the learning rate" beside a flag that says it is too high (QA)."""
    return (f"{_accuracies(history)}: underfitting — the model is too weak or not trained enough: make it bigger (`model.hidden`; "
            f"`model.channels` for a CNN or ResNet), train longer{'' if rate_too_high else ', raise the learning rate'} or lower regularization.")


def _plateau(why: str, history: History) -> str:
    """A stalled loss wants a decay of a constant rate. Under a schedule it does not: a rate already
    cut to almost nothing where the loss stopped falling was decayed too soon or too fast (QA:
    exponential at gamma 0.1 was told to add a decay); one still high enough points at the model."""
    lr, loss = history.get("lr") or [], history["train_loss"]
    finite = [value for value in loss if math.isfinite(value)]
    if len(lr) != len(loss) or not finite or min(lr) == max(lr):
        return f"{why}: decay the learning rate (`optim.schedule: step` or `cosine`) once progress stalls; if accuracy is still low, the model may be too small."
    stalled = next(i for i, value in enumerate(loss) if math.isfinite(value) and value <= 1.01 * min(finite))  # within 1% of its lowest from here on
    peak = max(lr[: stalled + 1])
    if lr[stalled] < 0.05 * peak:
        return (f"{why}, and by epoch {stalled + 1}, where the loss stopped falling, the schedule had cut the learning rate to {lr[stalled]:.2g} "
                f"from {peak:.2g}: it decayed too soon or too fast — decay later or slower (a larger `optim.gamma` or `optim.step_epochs`, or cosine).")
    return (f"{why} while the schedule still ran the learning rate at {lr[stalled]:.2g} (from {peak:.2g}): the rate is not what stalled it — "
            "if accuracy is still low, the model may be too small (`model.hidden`), or the data too hard for it.")


ADVICE: dict[str, Callable[[str, History], str]] = {
    "initial_loss_off": lambda why, h: f"{why}: fix this before training — the logits at init should be small "
    "(`model.head_init_scale`), the labels right and the loss the softmax cross-entropy.",
    "vanishing_activations": lambda why, h: f"{why}: the activations (and with them the gradients) vanish layer by layer — "
    "use Xavier init for tanh (`model.init: xavier`) or He for ReLU (`model.init: he`), or add batch norm (`model.batchnorm: true`).",
    "exploding_activations": lambda why, h: f"{why}: the weights at init are too large — use Xavier/He init, or add batch norm.",
    "saturated": lambda why, h: f"{why}: saturated units pass almost no gradient — use a smaller init (Xavier), ReLU, or batch norm.",
    "dead_relu": lambda why, h: f"{why}: a dead ReLU never updates again — lower the learning rate, "
    "use He init, or try leaky ReLU (`model.activation: leaky_relu`).",
    "diverged": lambda why, h: f"loss exploded ({why}): lower the learning rate (3–10×); "
    "a NaN or exploding loss in the first epochs almost always means the learning rate is too high.",
    "lr_too_high": lambda why, h: f"{why}: the learning rate is too high — lower it (3–10×).",
    "lr_too_low": lambda why, h: f"{why}: the loss is barely changing — raise the learning rate (3–10×).",
    "majority_class": lambda why, h: f"{why}: the model has learned nothing yet — the flags on the learning rate and the init say why; "
    "with none of them, check that the labels belong to their rows." if "the classes are balanced" in why else
    f"{why}: the model may be predicting that class for every row — check the labels, "
    "balance the classes (resample the rare ones, or weigh them) and judge it by per-class recall, not accuracy alone.",
    "plateau": _plateau,
    "underfitting": lambda why, h: _underfitting(h),
    "overfitting": lambda why, h: f"{_accuracies(h)}: overfitting — increase L2 (`optim.weight_decay`) or dropout "
    "(`model.dropout`), or add data; early stopping (`train.early_stopping_patience`) keeps the best-validation weights.",
}


def run_report(
    name: str, flags: dict[str, str], history: History, initial_loss: float,
    diagnostics: History | None = None, stop_reason: str | None = None, run_id: str | None = None, finished: bool = True,
    search_run: str | None = None,
) -> str:
    """A run's markdown report: what happened (from the histories), its flags, what to do next.

    `history` holds train_loss/train_acc/val_loss/val_acc per epoch; `diagnostics` may hold
    `update_ratio` per epoch. Flags without advice (other modules may add some) are listed as is.
    `search_run`: the run is a trial of that search's parent run, whose report says what to search next.
    """
    lines = [f"# babysit report: {name}", ""]
    epochs = len(history.get("train_loss", []))
    if epochs and len(history.get("val_acc", [])) == epochs and history.get("train_acc"):
        kept = epochs - 1 if stop_reason and stop_reason.startswith("diverged") else epochs  # the epoch that diverged is never kept
        best = max(range(kept), key=lambda i: history["val_acc"][i] if math.isfinite(history["val_acc"][i]) else -1.0) if kept else None
        lines.append(
            f"{'Run `' + run_id + '`: ' if run_id else ''}{epochs} epoch(s); {_accuracies(history)} at the end "
            + (f"(best validation {history['val_acc'][best]:.1%} in epoch {best + 1}); " if best is not None else "(no epoch kept: the loss diverged in the first; the initial weights were kept); ")
            + f"training loss {f'{initial_loss:.3g}' if math.isfinite(initial_loss) else 'not recorded'} at init → {history['train_loss'][-1]:.3g}."
        )
    measured = (diagnostics or {}).get("update_ratio", [])
    ratio = [r for r in measured if math.isfinite(r)]
    if ratio:
        # not measured while every hidden layer was frozen (transfer learning's first phase): those epochs come first
        first = max(1, epochs - len(measured) + 1)
        lines.append(f"Update/weight ratio {ratio[0]:.1e} in epoch {first} → {ratio[-1]:.1e} at the end (rule of thumb: about 1e-3).")
    if stop_reason and stop_reason != "completed":
        lines.append(f"Stopped early: {stop_reason}.")
    ordered = sorted(flags, key=lambda flag: ORDER.index(flag) if flag in ORDER else len(ORDER))
    lines += ["", "## Flags", ""]
    lines += [f"- **{flag}**: {flags[flag]}" for flag in ordered] or ["- none"]
    lines += ["", "## What to do next", ""]
    advice = [ADVICE[flag](flags[flag], history) if flag in ADVICE else f"{flag}: {flags[flag]}." for flag in ordered]
    if "underfitting" in flags and {"lr_too_high", "dead_relu"} & set(flags):
        advice[ordered.index("underfitting")] = _underfitting(history, rate_too_high=True)
    if "lr_too_low" in flags and {"vanishing_activations", "saturated"} & set(flags):
        i = ordered.index("lr_too_low")  # a loss that does not move may be the init's fault
        advice[i] += " But fix the init first: with vanishing or saturated activations the gradients, not the learning rate, are too small."
    if not advice and not finished:
        advice = ["No flags in the epochs it ran, but the run did not finish (its curves may stop early, or its model and artifacts be missing); "
                  "run it again before judging it."]
    if not advice and search_run:  # QA: a search's trial was told to start a search
        advice = [f"No flags: the trial looks healthy. What to search next is in its search's report: `babysit report {search_run}`."]
    if not advice:
        advice = ["No flags: the run looks healthy. Next, tune the learning rate and regularization with a "
                  "coarse-to-fine random search (log-uniform ranges, a few epochs per trial first)."]
    lines += [f"{i}. {text}" for i, text in enumerate(advice, start=1)]
    return "\n".join(lines) + "\n"


# search_advice: a range is blamed for a problem when at least this share of the trials beyond
# a threshold show it (and at least 2 trials show it)
BLAME_PURITY = 0.75


def _flag_sets(trials: pd.DataFrame) -> pd.Series:
    raw = trials["flags"] if "flags" in trials else pd.Series([""] * len(trials), index=trials.index)
    return raw.map(lambda text: {f.strip() for f in str(text).split(",") if f.strip() and f.strip() not in ("none", "nan", "None")} if isinstance(text, str) else set())


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "null" if math.isnan(value) else f"{value:.4g}"  # a None option became NaN in the trials table; 4 digits, as ranges: 0.9976 is not 1
    return "null" if value is None else str(value)


def blame(trials: pd.DataFrame, bad: pd.Series, params: list[str], never: tuple[str, str] | None = None, prefer: str | None = None,
          keep: pd.Series | None = None) -> tuple[str, str, str] | None:
    """The parameter range that holds the `bad` trials: (field, 'above'|'below'|'is', threshold).

    For a numeric column: every bad trial has field ≥ t (t = the smallest bad value), and at
    least BLAME_PURITY of the trials with field ≥ t are bad (or the mirror image, ≤). For a
    categorical column: every bad trial has the same value. The purest range wins. A range needs
    good trials to stand against: when every trial is bad, or a column has one value, it blames nothing.
    `never` = (field, side) is a range the problem cannot come from (lr_too_low at the highest
    learning rates: the cure, a higher rate, would point the wrong way). A range of `prefer` (the
    learning rate, for a learning-rate flag) that is pure enough wins over purer ranges of other
    fields, which the few trials of a stage can make pure by chance; else the purest range, then
    the first field's. A range that holds a `keep` trial (the stage's best, see clearly_best) is
    never blamed: cutting it off would cut off the best trial.
    """
    if bad.sum() < 2 or bad.all():
        return None
    best: tuple[tuple[bool, float], tuple[str, str, str]] | None = None
    for column in params:
        values = trials[column]
        field = column.removeprefix("param.")
        if values.astype(str).nunique() < 2:  # e.g. a choice narrowed to one option
            continue
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            candidates = [("above", values >= values[bad].min(), values[bad].min()), ("below", values <= values[bad].max(), values[bad].max())]
        else:
            shared = values[bad].unique()
            candidates = [("is", values == shared[0], shared[0])] if len(shared) == 1 else []
        for side, inside, threshold in candidates:
            if (field, side) == never or bad[inside].mean() < BLAME_PURITY or keep is not None and (inside & keep).any():
                continue
            rank = (field == prefer, bad[inside].mean())
            if best is None or rank > best[0]:
                best = (rank, (field, side, _fmt(threshold)))
    return best[1] if best else None


# a best trial this much validation accuracy above every flagged one learned something they did not
CLEARLY_BETTER = 0.1


def clearly_best(trials: pd.DataFrame, bad: pd.Series) -> pd.Series | None:
    """The stage's best trial, if its settings are evidence that no advice should cut off: a
    `bad` one (flagged, it still scored best: QA saw "lower the upper bound of optim.lr" below the
    winner's rate), or one that scored CLEARLY_BETTER than every bad trial. A good best trial
    barely above the flagged ones (a stage that is bad everywhere) is no such evidence."""
    scores = trials["val_acc"].astype(float) if "val_acc" in trials else None
    if scores is None or scores.isna().all():
        return None
    top = scores == scores.max()
    if (top & bad).any():
        return top & bad
    best, flagged_best = top & ~bad, scores[bad].max()  # NaN: the flagged trials scored nothing (exploded)
    return best if best.any() and (pd.isna(flagged_best) or scores.max() - flagged_best >= CLEARLY_BETTER) else None


def top_trials(trials: pd.DataFrame, flag_sets: pd.Series, top_k: int | float | None) -> pd.Series | None:
    """The stage's top trials as narrowing picks them (babysit.space.narrow): the `top_k` best that
    scored and did not diverge, ties at the cut included, and without the lr_too_low ones when the
    best trial learned. The next stage's ranges keep them: advice that cut them off would disagree
    with what the search did next (QA). None without `top_k`."""
    scores = trials["val_acc"].astype(float)
    scored = scores[scores.notna() & (trials["status"].astype(str) != "diverged")]
    if top_k is None or scored.empty:
        return None
    ranked = scored.sort_values(ascending=False, kind="stable")
    top = scores >= ranked.iloc[min(top_count(top_k, len(scored)), len(scored)) - 1]
    slow = flag_sets.map(lambda flags: "lr_too_low" in flags)
    return top & ~slow if not slow[ranked.index[0]] else top


def _problem_line(what: str, stage: str, trials: pd.DataFrame, bad: pd.Series, params: list[str], everywhere: str, never: tuple[str, str] | None = None,
                  prefer: str | None = None, top: pd.Series | None = None) -> str:
    """One line on the `bad` trials of a stage: the range that holds them, to be cut off, or, when
    every trial shares the problem, `everywhere` (what to do with the learning rate). No range that
    holds one of the `top` trials (top_trials) is cut off."""
    found = f"{what} in {int(bad.sum())} of {len(trials)} {stage} trials"
    if bad.all():
        return f"{what} in {f'all {len(trials)} {stage} trials' if len(trials) > 1 else f'the one {stage} trial'}: {everywhere}."
    best = clearly_best(trials, bad)
    keep = best if top is None else top if best is None else best | top
    culprit = blame(trials, bad, params, never, prefer, keep)
    if culprit is None and best is not None and (best & bad).any():
        return f"{found}, the stage's best trial among them: no range to cut off."
    if culprit is None and top is not None and (top & bad).any():
        return f"{found}, {int((top & bad).sum())} of them among the stage's top trials: no range to cut off without cutting those off."
    if culprit is None:
        return f"{found}, with no single parameter range to blame."
    field, side, threshold = culprit
    if side == "is":
        return f"{found}, all with {field} = {threshold}: drop that choice or search it separately."
    symbol, fix = (">=", "lower the upper bound") if side == "above" else ("<=", "raise the lower bound")
    return f"{found}, all with {field} {symbol} {threshold}: {fix} of {field}."


def search_advice(trials: pd.DataFrame, edges: list[tuple[str, str]], unmoved: dict[str, str] | None = None, causes: dict[tuple[str, str], str] | None = None,
                  narrowed: dict[str, tuple[str, str]] | None = None, reads: Callable[[str, dict[str, Any]], bool] | None = None,
                  moved_after: dict[tuple[str, str], str] | None = None, top_k: int | float | None = None) -> str:
    """Markdown advice on a search from its trials and the fields whose best value sat at an edge.

    `trials` has columns stage, status (finished|failed|diverged|pruned), val_acc, flags
    (comma-separated flag names) and param.<field> per searched field; `edges`, the (field, side)
    pairs, e.g. ('optim.lr', 'high'), whose edge a stage moved the next stage's range past (a field
    can have both sides, moved by different stages); `unmoved` maps a field to the side where the
    last stage's best value sat, an edge that nothing moved; `causes`, (field, side) -> why its range moved (the
    search log's words; default: its best value sat at that edge); `narrowed`, for the fields of
    `unmoved` whose edge narrowing set inside the file's range: (the last stage's range, the file's); `reads(field, values)`,
    whether a trial with these sampled values trains with `field` (the best trial is named by those it read); `moved_after`, (field, side) ->
    the stage whose trials moved that edge (the last time); `top_k`, the search's (babysit.space.top_count): a range that holds one of a
    stage's top trials, which the next stage's ranges keep, is never to be cut off. Per stage, in order of appearance: what happened to
    the trials; which range holds the exploded (status diverged or flag diverged) and the
    lr_too_low trials (see `blame`); the most common flag among finished trials. Then the edges
    and the best trial.
    """
    if trials.empty:
        return "No trials ran: nothing to advise.\n"
    defaults = {"stage": "all", "status": "finished", "val_acc": math.nan}  # what a frame without these columns means
    trials = trials.reset_index(drop=True).assign(**{column: value for column, value in defaults.items() if column not in trials})
    flag_sets = _flag_sets(trials)
    params = [c for c in trials.columns if c.startswith("param.")]
    lines = []
    for stage in trials["stage"].astype(str).unique():
        in_stage = trials["stage"].astype(str) == stage
        lines += _stage_lines(stage, trials[in_stage], flag_sets[in_stage], params, top_k)
    lines += _edge_lines(edges, unmoved or {}, causes or {}, narrowed or {}, moved_after or {})
    lines += _best_trial_line(trials, params, reads)
    return "\n".join(f"- {line}" for line in lines) + "\n"


def _stage_lines(stage: str, group: pd.DataFrame, group_flags: pd.Series, params: list[str], top_k: int | float | None = None) -> list[str]:
    """A stage's trials: what happened to them, which range holds the exploded and the too slow ones, the common flags."""
    group_status = group["status"].astype(str)
    counts = group_status.value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in ("finished", "diverged", "pruned", "failed") if s in counts)
    best_acc = group["val_acc"].max()
    lines = [f"{stage}: {len(group)} trial{'s' if len(group) > 1 else ''} ({summary})" + (f"; best validation accuracy {best_acc:.1%}." if pd.notna(best_acc) else ".")]
    # a learning rate that every trial shares is the file's, not a searched range
    lr_is, both = ("the learning-rate range is", "both bounds, ") if "param.optim.lr" in params else ("the learning rate (`optim.lr`, not searched) is", "")
    # a trial that failed with an error (a batch of 1 row under batch norm) says nothing of the rate: the flags are weighed among those that trained
    trained = group_status != "failed"
    group, group_flags, group_status = group[trained], group_flags[trained], group_status[trained]
    exploded = (group_status == "diverged") | group_flags.map(lambda f: "diverged" in f)
    top = top_trials(group, group_flags, top_k)
    if exploded.any():
        lines.append(_problem_line("loss exploded", stage, group, exploded, params, everywhere=f"{lr_is} too high: lower it ({both}10×)",
                                   never=("optim.lr", "below"), prefer="optim.lr", top=top))
    fast = group_flags.map(lambda f: "lr_too_high" in f)
    if fast.any():  # with the exploded trials: together they can be every trial, the rate too high everywhere
        lines.append(_problem_line("lr_too_high" + (" or loss exploded" if (exploded & ~fast).any() else ""), stage, group, fast | exploded, params,
                                   everywhere=f"{lr_is} too high: lower it ({both}3–10×)", never=("optim.lr", "below"), prefer="optim.lr", top=top))
    slow = group_flags.map(lambda f: "lr_too_low" in f)
    if slow.any():
        lines.append(_problem_line("lr_too_low", stage, group, slow, params, everywhere=f"the loss barely moved anywhere, so {lr_is} too low: raise it (10×)",
                                   never=("optim.lr", "above"), prefer="optim.lr", top=top))
    if (failed := int((~trained).sum())):
        lines.append(f"{failed} {stage} trial(s) failed with an error: see the `babysit.failure` tag of their MLflow runs.")
    if (pruned := int((group_status == "pruned").sum())):
        lines.append(f"{pruned} of {len(group)} {stage} trials {'was' if pruned == 1 else 'were'} pruned early for poor validation accuracy.")
    finished_flags = group_flags[group_status == "finished"]
    for flag in ("overfitting", "underfitting", "plateau", "dead_relu"):
        if (n := int(finished_flags.map(lambda f: flag in f).sum())) * 2 > max(len(finished_flags), 1):
            lines.append(f"{flag} in {n} of {len(finished_flags)} finished {stage} trials: " + {
                "overfitting": "search stronger regularization (larger `optim.weight_decay`, `model.dropout`).",
                # a stage whose rates were too high (or exploded) is not told to raise them too (QA)
                "underfitting": "search bigger models or train longer." if (fast | exploded).any() else "search bigger models or a higher learning rate, or train longer.",
                "plateau": "add a learning-rate decay (`optim.schedule`), or, where one already cut the rate early, decay later or slower.",
                "dead_relu": "lower the learning rate or try leaky ReLU.",
            }[flag])
    return lines


def _edge_lines(edges: list[tuple[str, str]], unmoved: dict[str, str], causes: dict[tuple[str, str], str], narrowed: dict[str, tuple[str, str]],
                moved_after: dict[tuple[str, str], str]) -> list[str]:
    """The edges the stages moved past, then those the last stage left for the file to move."""
    lines = []
    for field, side in edges:
        where = "upper" if side == "high" else "lower"
        after = f"after stage {moved_after[field, side]}, " if (field, side) in moved_after else ""  # said after the last stage's lines (QA)
        lines.append(f"{field}: {after}the next stage's range moved past its {where} edge ({causes.get((field, side), 'the best value sat at that edge')}), and searched beyond it.")
    for field, side in unmoved.items():
        where, bound = ("upper", "raise its upper bound") if side == "high" else ("lower", "lower its lower bound")
        said = f"{field}: the last stage's range should move past its {where} edge ({causes.get((field, side), 'the best value sat at that edge')})"
        if field in narrowed:  # the file's range already goes past it: the stages stopped too soon
            last_range, declared = narrowed[field]
            lines.append(f"{said}, which narrowing set inside the file's range ({last_range} of {declared}): "
                         f"add a stage, whose range would move past that edge, or narrow less (a larger `search.pad`).")
        else:
            lines.append(f"{said}: {bound} in the file and search again.")
    return lines


def _best_trial_line(trials: pd.DataFrame, params: list[str], reads: Callable[[str, dict[str, Any]], bool] | None = None) -> list[str]:
    """The best trial, chosen as the search chooses it: a pruned trial's score counts too, a tie goes to the latest;
    named by the values it trained with (QA: Adam's best was listed with the momentum it never read)."""
    scored = trials[trials["status"].astype(str).isin(["finished", "pruned"]) & trials["val_acc"].notna()]
    if scored.empty:
        return []
    top = scored.loc[scored["val_acc"].iloc[::-1].idxmax()]
    values = {c.removeprefix("param."): top[c] for c in params}
    setting = ", ".join(f"{field} = {_fmt(value)}" for field, value in values.items() if reads is None or reads(field, values))
    stage = f" ({top['stage']} stage)" if top["stage"] != "all" else ""
    return [f"best trial: validation accuracy {top['val_acc']:.1%}{stage}" + (f" with {setting}." if setting else ".")]
