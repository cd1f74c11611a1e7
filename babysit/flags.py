"""Flags: pure functions from per-epoch histories to named findings.

A history is a dict of equal-length lists: train_loss, train_acc, val_loss, val_acc (one value
per finished epoch). Each function states its rule; thresholds come from `FlagsConfig`.
"""

from __future__ import annotations

import math

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


def overfitting(history: dict[str, list[float]], gap: float, patience: int) -> str | None:
    """Overfitting when, at the last epoch, train acc − val acc > `gap`; or when validation loss
    rose for `patience` epochs in a row while training loss fell in each of them.
    """
    train_acc, val_acc = history["train_acc"], history["val_acc"]
    if train_acc and train_acc[-1] - val_acc[-1] > gap:
        return f"train accuracy {train_acc[-1]:.3f} is {train_acc[-1] - val_acc[-1]:.3f} above validation {val_acc[-1]:.3f} (gap > {gap:g})"
    val_loss, train_loss = history["val_loss"], history["train_loss"]
    rising = 0
    for epoch in range(1, len(val_loss)):
        if val_loss[epoch] > val_loss[epoch - 1] and train_loss[epoch] < train_loss[epoch - 1]:
            rising += 1
            if rising >= patience:
                return f"validation loss rose for {rising} epochs in a row (to epoch {epoch + 1}) while training loss fell"
        else:
            rising = 0
    return None


def run_flags(history: dict[str, list[float]], initial_loss: float, cfg: FlagsConfig) -> dict[str, str]:
    """All flags that fire for a finished run: {flag name: reason}."""
    found = {
        "diverged": diverged(history["train_loss"], initial_loss, cfg.diverge_factor),
        "overfitting": overfitting(history, cfg.overfit_gap, cfg.overfit_patience),
    }
    return {name: reason for name, reason in found.items() if reason}
