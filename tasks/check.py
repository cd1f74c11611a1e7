"""Pre-flight checks, the lecture's "before you train" list, on the configured model and data.

1. initial loss: before any update, the loss is ≈ ln(classes) (regularization off);
2. tiny-subset overfit: with regularization off, the model fits ~20 examples to 100% training
   accuracy within a budget; if it cannot, something is broken (loss, labels, lr, model);
3. activations at init: no vanishing, exploding, saturated or dead hidden layers.

Each is a pure function returning a `CheckResult`; `preflight` runs all three. `babysit check`
calls them directly (no Prefect server), and a search runs the overfit check before its first stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from babysit.config import Config
from babysit.flags import init_flags, initial_loss_off
from models.mlp import build_model
from tasks.build import inspect_init
from tasks.preprocess import Prepared
from tasks.train import fit, start_from, starting_loss, to_device, training_device

REACHED = "reached the target accuracy"  # fit's stop reason when the overfit check succeeds


@dataclass(frozen=True)
class CheckResult:
    name: str  # "initial loss" | "tiny-subset overfit" | "activations at init"
    passed: bool
    reason: str  # one line: what was measured, against what
    flags: dict[str, str] = field(default_factory=dict)  # the flags behind a failure
    curve: list[float] = field(default_factory=list)  # tiny-subset overfit: training loss per epoch
    data: dict[str, Any] = field(default_factory=dict)  # measured values (for plots and reports)


def without_regularization(cfg: Config) -> Config:
    """The config with weight decay 0 and dropout 0: the lecture runs both checks with reg off."""
    return cfg.model_copy(update={
        "optim": cfg.optim.model_copy(update={"weight_decay": 0.0}),
        "model": cfg.model.model_copy(update={"dropout": 0.0}),
    })


def starting_model(cfg: Config, prepared: Prepared, source: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model training starts from: fresh, or with `source` (model.init_from's weights) copied in and its blocks frozen."""
    s = prepared.splits
    model = build_model(cfg.model, s.input_shape, s.n_classes, cfg.seed)
    if source is not None:
        start_from(model, cfg, source)
    return model


def check_initial_loss(cfg: Config, prepared: Prepared, source: dict[str, torch.Tensor] | None = None) -> CheckResult:
    """The fresh model's mean loss on the training split vs ln(classes), as training's first steps
    see it (tasks.train.starting_loss: BatchNorm normalising each mini-batch). A transferred model
    (`source`) starts from what it learned: its loss is reported, not held to ln(classes).

    The data loss has no regularization in it (L2 lives in the optimizer, dropout is off); the L2
    term 0.5·λ·‖W‖² that the weight decay corresponds to is reported beside it.
    """
    s = prepared.splits
    model = starting_model(cfg, prepared, source)
    X, y = to_device(s.X_train, s.y_train, device=torch.device("cpu"))
    loss = starting_loss(model, X, y, cfg.train.batch_size)
    expected = math.log(s.n_classes)
    if source is not None:
        return CheckResult("initial loss", True, f"{loss:.3f} from the transferred weights (ln({s.n_classes}) = {expected:.3f} is random weights' loss: not checked)",
                           data={"initial_loss": loss, "expected": expected})
    off = initial_loss_off(loss, s.n_classes, cfg.flags.initial_loss_tolerance)
    reason = off or f"{loss:.3f} vs ln({s.n_classes}) = {expected:.3f} expected (within {cfg.flags.initial_loss_tolerance:.0%})"
    if cfg.optim.weight_decay > 0 and cfg.optim.name != "adamw":  # adamw's decay is not a loss term
        l2 = 0.5 * cfg.optim.weight_decay * sum(float(p.detach().pow(2).sum()) for p in model.parameters() if p.ndim >= 2)
        reason += f"; with L2 (weight_decay {cfg.optim.weight_decay:g}) the loss would be {loss + l2:.3f}"
    return CheckResult("initial loss", off is None, reason, {"initial_loss_off": off} if off else {},
                       data={"initial_loss": loss, "expected": expected})


def overfit_tiny_subset(cfg: Config, prepared: Prepared, n: int = 20, budget_epochs: int = 200, target_acc: float = 1.0,
                        source: dict[str, torch.Tensor] | None = None) -> CheckResult:
    """Train on the first `n` training rows, regularization off, for at most `budget_epochs` epochs.

    Passes when the accuracy on those rows (eval mode) reaches `target_acc`; fails with the
    training-loss curve attached (`CheckResult.curve`) when the budget runs out or the loss
    diverges. Uses the configured model, optimizer, lr, schedule and batch size.
    """
    cfg = without_regularization(cfg)
    s = prepared.splits
    n = min(n, len(s.y_train))
    device = training_device(cfg)
    X, y = to_device(s.X_train[:n], s.y_train[:n], device=device)
    model = starting_model(cfg, prepared, source).to(device)
    train_cfg = cfg.train.model_copy(update={"epochs": budget_epochs, "early_stopping_patience": None})

    def reached(epoch: int, metrics: dict[str, float]) -> str | None:
        return REACHED if metrics["val_acc"] >= target_acc else None  # "validation" is the subset itself

    result = fit(model, X, y, X, y, cfg.optim, train_cfg, cfg.flags.diverge_factor, cfg.seed, reached)
    curve, acc = result.history["train_loss"], result.history["val_acc"][-1]
    passed = result.stop_reason == REACHED or (result.stop_reason is None and acc >= target_acc)  # reached in the budget's last epoch
    shown = " → ".join(f"{curve[i]:.3g}" for i in sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1}))
    setting = f"weight decay 0, dropout 0, {cfg.optim.name} lr {cfg.optim.lr:g}"
    if passed:
        reason = f"{n} examples fit to {acc:.0%} training accuracy in {len(curve)} epochs (loss {curve[0]:.3g} → {curve[-1]:.3g}; {setting})"
    else:
        why = result.stop_reason if result.stop_reason else f"after {len(curve)} epochs (the budget)"
        reason = f"{n} examples reach only {acc:.0%} training accuracy, {why}; loss over its {len(curve)} epochs {shown} ({setting}): check the loss, labels and learning rate"
        if source is not None and cfg.model.freeze not in ("none", 0):
            # QA: a transfer with freeze all failed here, told to check the loss, labels and lr, while every layer trainable fit them
            unfrozen = overfit_tiny_subset(cfg.model_copy(update={"model": cfg.model.model_copy(update={"freeze": "none"})}), prepared, n, budget_epochs,
                                           target_acc, source)
            frozen_part = f"with model.freeze {cfg.model.freeze} (only the layers after the frozen blocks train) {n} examples reach only {acc:.0%} training accuracy, {why}"
            if unfrozen.passed:
                return replace(unfrozen, reason=f"{frozen_part}; with every layer trainable they fit in {unfrozen.data['epochs']} epochs: the loss, labels "
                                                f"and learning rate work, the frozen features limit what the rest can fit (train.unfreeze_epochs fine-tunes them)")
            return replace(unfrozen, reason=f"{frozen_part}; with every layer trainable too: {unfrozen.reason}")
    return CheckResult("tiny-subset overfit", passed, reason, curve=curve,
                       data={"n": n, "epochs": len(curve), "accuracy": acc, "stop_reason": result.stop_reason})


def check_activations(cfg: Config, prepared: Prepared, source: dict[str, torch.Tensor] | None = None) -> CheckResult:
    """Per-layer activation statistics of the model training starts from (fresh, or with `source`'s
    weights) on 256 training rows, and their flags."""
    s = prepared.splits
    report = inspect_init(cfg.model, s.input_shape, s.n_classes, cfg.seed, s.X_train[:256], source)
    stats = report.layer_stats
    flags = init_flags(stats, cfg.flags)
    if not stats["act_std"]:
        return CheckResult("activations at init", True, "no hidden layers (a linear classifier)", data={"report": report})
    summary = (
        f"std {stats['act_std'][0]:.2g} → {stats['act_std'][-1]:.2g} over {len(stats['act_std'])} hidden layers; "
        f"at most {max(stats['act_frac_saturated']):.0%} saturated, {max(stats['act_frac_dead']):.0%} of units dead"
    )
    reason = "; ".join(f"{name}: {why}" for name, why in flags.items()) if flags else summary
    return CheckResult("activations at init", not flags, reason, flags, data={"report": report})


def preflight(cfg: Config, prepared: Prepared, n: int = 20, budget_epochs: int = 200, source: dict[str, torch.Tensor] | None = None) -> list[CheckResult]:
    """The three checks, cheapest first, on the model training starts from (`source`: model.init_from's
    weights, see tasks.train.transfer_source); a config that cannot train here (a BabysitError) none of them."""
    training_device(cfg)
    return [check_initial_loss(cfg, prepared, source), check_activations(cfg, prepared, source),
            overfit_tiny_subset(cfg, prepared, n, budget_epochs, source=source)]
