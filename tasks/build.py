"""Model-building stage: build the configured model and measure its activations at init.

The lecture's point about init is shown, not claimed: one forward pass of a training batch
through the fresh model gives each hidden layer's mean, std, dead and saturated fractions, as
the first training step sees them.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from babysit.config import ModelConfig
from babysit.diagnostics import dead_fractions
from models.mlp import build_model
from models.transfer import transfer_weights


@dataclass(frozen=True)
class InitReport:
    n_params: int
    architecture: str
    layer_stats: dict[str, list[float]]  # per hidden layer: mean, std, frac_zero, frac_saturated, frac_dead
    # per hidden layer: (counts, bin edges) of its activations, for the lecture's histogram plot
    histograms: list[tuple[list[int], list[float]]] = ()


def saturated_mask(activations: torch.Tensor, activation: str) -> torch.Tensor:
    """Where a squashing unit sits in its flat tail: |tanh| > 0.99, sigmoid < 0.01 or > 0.99."""
    if activation == "tanh":
        return activations.abs() > 0.99
    if activation == "sigmoid":
        return (activations < 0.01) | (activations > 0.99)
    return torch.zeros_like(activations, dtype=torch.bool)


@torch.no_grad()
def activations_at_init(model: torch.nn.Module, X: torch.Tensor) -> list[torch.Tensor]:
    """Each hidden layer's output for the batch `X` as the first training step computes it:
    BatchNorm normalises with the batch's own statistics (in eval mode its running statistics
    are still 0 and 1 at init, so it would do nothing, and a bad init that it rescues would look
    unrescued), dropout is off (its zeros say nothing about the init). Updates the running
    statistics of `model`: pass one built to be inspected."""
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    return model.hidden_activations(X)


def activation_stats(hidden: list[torch.Tensor], activation: str) -> dict[str, list[float]]:
    stats: dict[str, list[float]] = {"act_mean": [], "act_std": [], "act_frac_zero": [], "act_frac_saturated": []}
    for h in hidden:
        stats["act_mean"].append(h.mean().item())
        stats["act_std"].append(h.std().item())
        stats["act_frac_zero"].append((h == 0).float().mean().item())
        stats["act_frac_saturated"].append(saturated_mask(h, activation).float().mean().item())
    return stats


def activation_histograms(hidden: list[torch.Tensor], bins: int = 50) -> list[tuple[list[int], list[float]]]:
    """Each hidden layer's activations, binned on bins shared by all layers (as in the lecture's
    figure: vanishing layers collapse onto the bin at 0): small data to pass and plot."""
    layers = [h.float().cpu().numpy().ravel() for h in hidden]
    layers = [values[np.isfinite(values)] for values in layers]  # an exploded net has inf
    finite = [values for values in layers if values.size]
    if not finite:
        return []
    edges = np.histogram_bin_edges(np.concatenate(finite), bins=bins)
    return [(np.histogram(values, bins=edges)[0].tolist(), edges.tolist()) for values in layers]


def inspect_init(cfg: ModelConfig, inputs: int | tuple[int, ...], n_classes: int, seed: int, X_batch: np.ndarray,
                 source: dict[str, torch.Tensor] | None = None) -> InitReport:
    """`inputs`: the feature count or one row's shape, as for models.mlp.build_model. `source`:
    model.init_from's weights, copied in where they fit: a transferred model starts from them, and
    its random init said nothing of it (QA: a trained deep tanh net flagged vanishing_activations)."""
    model = build_model(cfg, inputs, n_classes, seed)
    if source is not None:
        transfer_weights(model, source, cfg.init_from or "model.init_from")
    widths = cfg.hidden if cfg.kind == "mlp" else cfg.channels
    hidden = activations_at_init(model, torch.as_tensor(X_batch))
    return InitReport(
        n_params=sum(p.numel() for p in model.parameters()),
        architecture=(" -> ".join(str(w) for w in [math.prod(np.atleast_1d(inputs)), *widths, n_classes]) if cfg.kind == "mlp"
                      else f"{cfg.kind} on {tuple(inputs)}: " + " -> ".join(str(w) for w in [*widths, n_classes])),
        # act_frac_dead: units that output 0 for every row of the batch (dead ReLUs)
        layer_stats={**activation_stats(hidden, cfg.activation), "act_frac_dead": dead_fractions(hidden)},
        histograms=activation_histograms(hidden),
    )


@task(name="build-model", cache_policy=NO_CACHE)
def build_task(cfg: ModelConfig, inputs: int | tuple[int, ...], n_classes: int, seed: int, X_batch: np.ndarray,
               source: dict[str, torch.Tensor] | None = None) -> InitReport:
    return inspect_init(cfg, inputs, n_classes, seed, X_batch, source)
