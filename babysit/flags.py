"""Flags: pure functions from per-epoch histories to named findings.

A history is a dict of equal-length lists: train_loss, train_acc, val_loss, val_acc (one value
per finished epoch). Each function states its rule; thresholds come from `FlagsConfig`.

Three families, as in the CS231n lecture:
  at init       initial_loss_off, vanishing_activations, exploding_activations, saturated, dead_relu
  the lr        diverged, lr_too_high, lr_too_low, plateau
  the fit       overfitting, underfitting
Each returns a one-line reason with the measured numbers, or None.
"""

from __future__ import annotations

import math
import statistics

from babysit.config import FlagsConfig


def diverged(train_loss: list[float], initial_loss: float, factor: float) -> str | None:
    """Diverged when an epoch's training loss is NaN/Inf or above `factor` × the loss at init.

    Returns the reason, or None. Checked after every epoch, so a diverging run stops early.
    """
    for epoch, loss in enumerate(train_loss, start=1):
        if not math.isfinite(loss):
            return f"training loss became {loss} in epoch {epoch}"
        if loss > factor * initial_loss:
            return f"training loss {loss:.3g} in epoch {epoch} exceeds {factor:g} x the initial loss {initial_loss:.3g}"
    return None


def overfitting(history: dict[str, list[float]], gap: float, patience: int, rise: float = 0.05) -> str | None:
    """Overfitting when, at the last epoch, train acc − val acc > `gap`; or when validation loss has
    stayed more than `rise` (a fraction) above its lowest for the last `patience` epochs, while
    training loss fell below where it was then. A rise of a few thousandths is noise, not a
    trend, and one dip in a real rise does not hide it. Training accuracy (train mode: dropout on,
    averaged over the epoch) below validation's is no evidence against it: with dropout this rule
    is the one overfitting signal left.
    """
    train_acc, val_acc = history["train_acc"], history["val_acc"]
    if train_acc and train_acc[-1] - val_acc[-1] > gap:
        return f"train accuracy {train_acc[-1]:.3f} is {train_acc[-1] - val_acc[-1]:.3f} above validation {val_acc[-1]:.3f} (gap > {gap:g})"
    val_loss, train_loss = history["val_loss"], history["train_loss"]
    finite = [v for v in val_loss if math.isfinite(v)]
    if not finite:
        return None
    lowest = min(finite)
    near = max(i for i, v in enumerate(val_loss) if v <= (1 + rise) * lowest)  # the last epoch at (about) its lowest
    since = len(val_loss) - 1 - near
    if since >= patience and train_loss[-1] < train_loss[near]:
        return (f"validation loss has stayed above its lowest ({lowest:.3g}) for {since} epochs, to {val_loss[-1]:.3g} in epoch {len(val_loss)}, "
                f"while training loss fell from {train_loss[near]:.3g} to {train_loss[-1]:.3g}")
    return None


BALANCED = 1.15  # a largest class under this × 1/classes: the classes are about balanced (binary: 57.5% at most)


def majority_class(val_acc: list[float], majority_share: float, margin: float, n_classes: int | None = None) -> str | None:
    """No better than chance, where chance is the most common class: the best validation accuracy is
    not `margin` above the share of validation rows in that class. With 95% of rows in one class,
    0.94 is what a model that always predicts it scores (QA: such a model passed as healthy). With
    `n_classes`, the reason says when the classes are about balanced (then balancing them is no cure)."""
    scored = [a for a in val_acc if math.isfinite(a)]
    if scored and max(scored) <= majority_share + margin:
        balanced = "; the classes are balanced" if n_classes and majority_share <= BALANCED / n_classes else ""
        return (f"best validation accuracy {max(scored):.1%} is no better than always predicting the most common class "
                f"({majority_share:.1%} of validation rows{balanced})")
    return None


def initial_loss_off(initial_loss: float, n_classes: int, tolerance: float) -> str | None:
    """Off when |initial loss − ln(n_classes)| > `tolerance` × ln(n_classes).

    With small logits the softmax is uniform, so the cross-entropy before any update is
    ln(classes) (ln 10 ≈ 2.303). Regularization is not part of this loss (L2 lives in the
    optimizer, dropout is off in eval mode), so this is the lecture's check with reg off.
    """
    expected = math.log(n_classes)
    if not math.isfinite(initial_loss) or abs(initial_loss - expected) > tolerance * expected:
        return f"initial loss {initial_loss:.3f}, expected ln({n_classes}) = {expected:.3f} (tolerance {tolerance:.0%})"
    return None


def vanishing_activations(act_std: list[float], ratio: float) -> str | None:
    """Vanishing when the last hidden layer's activation std at init is below `ratio` × the first's.

    Needs at least two hidden layers. The lecture's demo: tanh with N(0, 0.01²) weights shrinks
    the std by ~6× per 256-wide layer, so deep layers output ~0 and their gradients vanish.
    """
    if len(act_std) < 2:
        return None
    first, last = act_std[0], act_std[-1]
    if last < ratio * first:
        return f"activation std falls from {first:.2g} (layer 1) to {last:.2g} (layer {len(act_std)}) at init, below {ratio:g} x the first layer's"
    return None


def exploding_activations(act_std: list[float], ratio: float) -> str | None:
    """Exploding when some hidden layer's activation std at init is NaN/Inf, or the last layer's is
    above `ratio` × the first's (needs at least two hidden layers for the second rule)."""
    for layer, std in enumerate(act_std, start=1):
        if not math.isfinite(std):
            return f"activation std of layer {layer} is {std} at init"
    if len(act_std) >= 2 and act_std[-1] > ratio * act_std[0]:
        return f"activation std grows from {act_std[0]:.3g} (layer 1) to {act_std[-1]:.3g} (layer {len(act_std)}) at init, above {ratio:g} x the first layer's"
    return None


def saturated(frac_saturated: list[float], limit: float) -> str | None:
    """Saturated when more than `limit` of some hidden layer's outputs at init sit in a squashing
    unit's flat tail (|tanh| > 0.99, sigmoid < 0.01 or > 0.99), where its gradient is ~0."""
    for layer, fraction in enumerate(frac_saturated, start=1):
        if fraction > limit:
            return f"{fraction:.0%} of layer {layer}'s activations are saturated at init (above {limit:.0%})"
    return None


def dead_relu(frac_dead: list[float], limit: float, when: str) -> str | None:
    """Dead ReLUs when more than `limit` of some hidden layer's units output 0 for every example of
    the probe batch (256 training rows). Such a unit gets no gradient and never recovers.
    `when` names the measurement in the reason ("at init", "after epoch 12")."""
    worst = max(range(len(frac_dead)), key=lambda i: frac_dead[i], default=None)
    if worst is not None and frac_dead[worst] > limit:
        return f"{frac_dead[worst]:.0%} of layer {worst + 1}'s units are dead {when} (output 0 for every example; above {limit:.0%})"
    return None


def lr_too_high(train_loss: list[float], initial_loss: float, update_ratio: list[float], early_epochs: int, loss_rise: float, ratio_high: float,
                first_ratio_epoch: int = 1) -> str | None:
    """Too high when, in the first `early_epochs` epochs, an epoch's mean training loss is NaN/Inf or
    above (1 + `loss_rise`) × the initial loss (the loss rose or exploded); or when the median over
    those epochs of the update ratio (median over weight matrices of ‖Δw‖/‖w‖ on an epoch's last
    step; rule of thumb ≈ 1e-3) is above `ratio_high`. `first_ratio_epoch`: the epoch of
    `update_ratio`'s first value (none is measured while every hidden layer is frozen).
    """
    for epoch, loss in enumerate(train_loss[:early_epochs], start=1):
        if not math.isfinite(loss) or loss > (1 + loss_rise) * initial_loss:
            return f"training loss rose to {loss:.3g} in epoch {epoch} from {initial_loss:.3g} at init"
    early = [r for r in update_ratio[:early_epochs] if math.isfinite(r)]
    if early and (ratio := statistics.median(early)) > ratio_high:
        return f"update/weight ratio {ratio:.1e} in {_measured_in(first_ratio_epoch, len(early))}, above {ratio_high:.0e} (rule of thumb: about 1e-3)"
    return None


def _measured_in(first: int, judged: int) -> str:
    """'the first 3 epoch(s)'; after a frozen phase (QA: fine-tuning's ratios read as the run's
    first epochs), 'epochs 7-9, the first measured (every hidden layer was frozen before)'."""
    if first <= 1:
        return f"the first {judged} epoch(s)"
    return f"epoch{'s' if judged > 1 else ''} {first}{f'-{first + judged - 1}' if judged > 1 else ''}, the first measured (every hidden layer was frozen before)"


RULE_OF_THUMB = 1e-3  # CS231n: an update/weight ratio of about 1e-3 is healthy


def lr_too_low(train_loss: list[float], initial_loss: float, update_ratio: list[float], early_epochs: int, min_drop: float, ratio_low: float,
               loss_rise: float = 0.05, first_ratio_epoch: int = 1) -> str | None:
    """Too low when the training loss of epoch `early_epochs` (or of the last epoch, if fewer ran)
    is not below (1 − `min_drop`) × the initial loss: barely lower, or as high or a little higher
    (up to (1 + `loss_rise`) ×; beyond that it rose, which is lr_too_high's), unless the update ratio
    says the weights move at the rule of thumb or faster (a healthy rate; epochs of a few steps each
    drop the loss slowly); or when the median over the first `early_epochs` epochs of the update
    ratio is below `ratio_low`.
    """
    early = [r for r in update_ratio[:early_epochs] if math.isfinite(r)]
    if early and (ratio := statistics.median(early)) < ratio_low:
        return f"update/weight ratio {ratio:.1e} in {_measured_in(first_ratio_epoch, len(early))}, below {ratio_low:.0e} (rule of thumb: about 1e-3)"
    if not train_loss or not math.isfinite(initial_loss):  # no loss to judge (none given: only the ratio speaks)
        return None
    if early and statistics.median(early) >= RULE_OF_THUMB:  # the weights move as fast as they should: a slow loss has another cause (few steps, capacity, init)
        return None
    epoch = min(early_epochs, len(train_loss))
    loss = train_loss[epoch - 1]
    if not (math.isfinite(loss) and (1 - min_drop) * initial_loss < loss <= (1 + loss_rise) * initial_loss):
        return None
    if loss <= initial_loss:
        return f"training loss {loss:.3g} after {epoch} epoch(s) is only {1 - loss / initial_loss:.1%} below the initial {initial_loss:.3g} (expected a drop of at least {min_drop:.0%})"
    return f"training loss {loss:.6g} after {epoch} epoch(s) is no lower than the initial {initial_loss:.6g}: the network is not learning (expected a drop of at least {min_drop:.0%})"


def plateau(train_loss: list[float], train_acc: list[float], window: int, min_drop: float, max_acc: float) -> str | None:
    """Plateau when the best training loss of the last `window` epochs is not at least `min_drop`
    (a fraction) below the best loss before them, while the last training accuracy is below
    `max_acc` (a model that fits its training set has converged, not stalled). Needs more than
    `window` epochs.
    """
    if len(train_loss) <= window or train_acc[-1] >= max_acc:
        return None
    before, recent = min(train_loss[:-window]), min(train_loss[-window:])
    if recent > (1 - min_drop) * before:
        return f"training loss stalled: best {recent:.4g} in the last {window} epochs vs {before:.4g} before (less than {min_drop:.0%} lower), training accuracy {train_acc[-1]:.1%}"
    return None


def underfitting(history: dict[str, list[float]], max_acc: float, gap: float) -> str | None:
    """Underfitting when, at the last epoch, training accuracy is below `max_acc` and within `gap`
    of validation accuracy: the model cannot fit even the data it sees. Once training accuracy has
    levelled off (it rose less than `gap` in the last epoch), a validation accuracy further above
    it but below `max_acc` too (a small, lucky validation split) is no fit either (QA: a linear
    model at 52% on spirals went unflagged beside 58% on validation). Training accuracy is taken
    in train mode (dropout, augmentation) and averaged over an epoch of learning, so it trails a
    good validation accuracy in healthy runs: those are not underfitting."""
    train_acc, val_acc = history["train_acc"], history["val_acc"]
    if not train_acc or train_acc[-1] >= max_acc:
        return None
    below = train_acc[-1] - val_acc[-1]
    levelled = len(train_acc) >= 2 and train_acc[-1] - train_acc[-2] < gap
    if abs(below) <= gap or below < 0 and levelled and val_acc[-1] < max_acc:
        closeness = "close to" if abs(below) <= gap else "below"
        return f"training accuracy {train_acc[-1]:.1%} (below {max_acc:.0%}) is {closeness} validation {val_acc[-1]:.1%}"
    return None


def init_flags(layer_stats: dict[str, list[float]], cfg: FlagsConfig) -> dict[str, str]:
    """Flags on the activation statistics at init (tasks.build.InitReport.layer_stats)."""
    found = {
        "vanishing_activations": vanishing_activations(layer_stats.get("act_std", []), cfg.vanishing_ratio),
        "exploding_activations": exploding_activations(layer_stats.get("act_std", []), cfg.exploding_ratio),
        "saturated": saturated(layer_stats.get("act_frac_saturated", []), cfg.saturated_fraction),
        "dead_relu": dead_relu(layer_stats.get("act_frac_dead", []), cfg.dead_fraction, "at init"),
    }
    return {name: reason for name, reason in found.items() if reason}


def layer_series(diagnostics: dict[str, list[float]], prefix: str) -> list[list[float]]:
    """Per-layer histories, e.g. prefix 'dead_frac/layer' → [[layer 1 per epoch], [layer 2 ...], ...]."""
    layers = sorted((int(key.removeprefix(prefix)), values) for key, values in diagnostics.items() if key.startswith(prefix) and key.removeprefix(prefix).isdigit())
    return [values for _, values in layers]


def ratios_at_full_rate(base_lr: float, update_ratio: list[float], step_lr: list[float]) -> list[float]:
    """The epochs' update ratios, NaN (not judged) where the epoch's last step, on which it was
    measured, ran below a tenth of `base_lr`: a schedule that has decayed there (cosine's last step
    ≈ 0) says nothing about the rate chosen. Judged anyway, a 1-epoch cosine run that learned well
    read as lr_too_low. Fewer ratios than epochs are the last epochs': none is measured while every
    hidden layer is frozen (transfer learning's first phase), and fine-tuning runs at its own rate."""
    measured_in = step_lr[max(len(step_lr) - len(update_ratio), 0) :]
    return [r if lr >= 0.1 * base_lr else math.nan for r, lr in zip(update_ratio, measured_in)]


def run_flags(
    history: dict[str, list[float]], initial_loss: float, cfg: FlagsConfig,
    diagnostics: dict[str, list[float]] | None = None, init_stats: dict[str, list[float]] | None = None, n_classes: int | None = None,
    base_lr: float | None = None, transferred: bool = False, majority_share: float | None = None,
) -> dict[str, str]:
    """All flags that fire for a finished run: {flag name: reason}.

    `diagnostics` (TrainResult.diagnostics), `init_stats` (InitReport.layer_stats), `n_classes` and
    `majority_share` (Splits.majority_share) enable the flags that need them. The flags agree with each other, so that their cures do not
    point opposite ways (QA):
    - a diverged run is not also called lr_too_low, plateau, underfitting or overfitting, nor
      dead_relu after training (its curves and units are garbage; its accuracies a NaN model's);
    - with vanishing, exploding or saturated activations at init, the update ratio measures the
      init's tiny or huge weights, not the rate: it judges no lr flag;
    - a run with lr_too_low is not also a plateau; an underfitting one not overfitting by its
      validation loss (the gap rule and underfitting exclude each other);
    - a `transferred` model (model.init_from) starts from learned weights: its loss is not ln(classes)
      and need not drop 10% in its first epochs, so only its update ratio says lr_too_low.
    dead_relu is judged at init and, if it did not fire there, after the last epoch. With `base_lr`
    (optim.lr), update ratios measured while a schedule ran far below it are not judged.
    """
    diagnostics = diagnostics or {}
    found = init_flags(init_stats or {}, cfg)
    if n_classes is not None and not transferred:
        found["initial_loss_off"] = initial_loss_off(initial_loss, n_classes, cfg.initial_loss_tolerance)
    ratio = diagnostics.get("update_ratio", [])
    if base_lr and history.get("lr"):
        ratio = ratios_at_full_rate(base_lr, ratio, history["lr"])
    if {"vanishing_activations", "exploding_activations", "saturated"} & found.keys():
        ratio = []
    found["diverged"] = diverged(history["train_loss"], initial_loss, cfg.diverge_factor)
    first_ratio_epoch = max(len(history["train_loss"]) - len(ratio), 0) + 1  # ratios are the last epochs': none while every hidden layer is frozen
    found["lr_too_high"] = lr_too_high(history["train_loss"], initial_loss, ratio, cfg.early_epochs, cfg.early_loss_rise, cfg.update_ratio_high, first_ratio_epoch)
    if found["diverged"]:
        return {name: reason for name, reason in found.items() if reason}
    # a loss that rose is a rate too high, never one too low (the cures point opposite ways)
    found["lr_too_low"] = None if found["lr_too_high"] else lr_too_low(
        [] if transferred else history["train_loss"], initial_loss, ratio, cfg.early_epochs, cfg.min_loss_drop, cfg.update_ratio_low, cfg.early_loss_rise,
        first_ratio_epoch)
    if not found["lr_too_low"]:
        found["plateau"] = plateau(history["train_loss"], history["train_acc"], cfg.plateau_epochs, cfg.plateau_min_drop, cfg.plateau_max_acc)
    found["underfitting"] = underfitting(history, cfg.underfit_acc, cfg.underfit_gap)
    if majority_share is not None:
        found["majority_class"] = majority_class(history["val_acc"], majority_share, cfg.majority_margin, n_classes)
    if not found["underfitting"]:
        found["overfitting"] = overfitting(history, cfg.overfit_gap, cfg.overfit_patience, cfg.overfit_loss_rise)
    if (dead_now := [layer[-1] for layer in layer_series(diagnostics, "dead_frac/layer") if layer]) and not found.get("dead_relu"):
        found["dead_relu"] = dead_relu(dead_now, cfg.dead_fraction, f"after epoch {len(history['train_loss'])}")
    return {name: reason for name, reason in found.items() if reason}
