"""Model-building stage: build the configured model and measure its activations at init.

The lecture's point about init is shown, not claimed: one forward pass of a training batch
through the fresh model gives each hidden layer's mean, std, dead and saturated fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from babysit.config import ModelConfig
from models.mlp import build_model


@dataclass(frozen=True)
class InitReport:
    n_params: int
    architecture: str
    layer_stats: dict[str, list[float]]  # per hidden layer: mean, std, frac_zero, frac_saturated


def saturated(activations: torch.Tensor, activation: str) -> torch.Tensor:
    """Where a squashing unit sits in its flat tail: |tanh| > 0.99, sigmoid < 0.01 or > 0.99."""
    if activation == "tanh":
        return activations.abs() > 0.99
    if activation == "sigmoid":
        return (activations < 0.01) | (activations > 0.99)
    return torch.zeros_like(activations, dtype=torch.bool)


@torch.no_grad()
def activation_stats(model: torch.nn.Module, X: torch.Tensor, activation: str) -> dict[str, list[float]]:
    model.eval()  # BatchNorm at init normalises with its running stats (0, 1)
    stats: dict[str, list[float]] = {"act_mean": [], "act_std": [], "act_frac_zero": [], "act_frac_saturated": []}
    for h in model.hidden_activations(X):
        stats["act_mean"].append(h.mean().item())
        stats["act_std"].append(h.std().item())
        stats["act_frac_zero"].append((h == 0).float().mean().item())
        stats["act_frac_saturated"].append(saturated(h, activation).float().mean().item())
    return stats


def inspect_init(cfg: ModelConfig, n_features: int, n_classes: int, seed: int, X_batch: np.ndarray) -> InitReport:
    model = build_model(cfg, n_features, n_classes, seed)
    return InitReport(
        n_params=sum(p.numel() for p in model.parameters()),
        architecture=" -> ".join(str(w) for w in [n_features, *cfg.hidden, n_classes]),
        layer_stats=activation_stats(model, torch.as_tensor(X_batch), cfg.activation),
    )


@task(name="build-model", cache_policy=NO_CACHE)
def build_task(cfg: ModelConfig, n_features: int, n_classes: int, seed: int, X_batch: np.ndarray) -> InitReport:
    return inspect_init(cfg, n_features, n_classes, seed, X_batch)
