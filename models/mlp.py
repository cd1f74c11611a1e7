"""The multi-layer perceptron: [Linear → (BatchNorm) → activation → (Dropout)] × depth → Linear."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from babysit.config import ModelConfig
from models.activations import make_activation
from models.init import init_layer


class MLP(nn.Module):
    def __init__(self, n_inputs: int, n_classes: int, cfg: ModelConfig):
        super().__init__()
        blocks, width_in = [], n_inputs
        for width in cfg.hidden:
            # A bias before BatchNorm is cancelled by its mean subtraction; BN's shift replaces it.
            layers = [nn.Linear(width_in, width, bias=not cfg.batchnorm)]
            if cfg.batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(cfg.activation, cfg.leaky_slope))
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            blocks.append(nn.Sequential(*layers))
            width_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each hidden block's output for input `x`: the lecture's per-layer activation plots."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class Affine(nn.Module):
    """A fixed x @ weight + bias: the fitted preprocessing, carried inside the logged model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def build_model(cfg: ModelConfig, n_inputs: int, n_classes: int, seed: int) -> MLP:
    """A freshly initialised MLP; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = MLP(n_inputs, n_classes, cfg)
    model.apply(partial(init_layer, scheme=cfg.init, activation=cfg.activation, distribution=cfg.init_distribution, leaky_slope=cfg.leaky_slope))
    with torch.no_grad():
        model.head.weight.mul_(cfg.head_init_scale)
    return model
