"""The multi-layer perceptron: [Linear → (BatchNorm) → activation → (Dropout)] × depth → Linear."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from babysit.config import ModelConfig
from models.activations import make_activation
from models.dropout import Dropout, seed_masks
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
                layers.append(Dropout(cfg.dropout))
            blocks.append(nn.Sequential(*layers))
            width_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # images arrive as (batch, channels, height, width)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each hidden block's output for input `x`: the lecture's per-layer activation plots."""
        outputs, x = [], x.flatten(1)
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class Affine(nn.Module):
    """A fixed x @ weight + bias, or with a vector weight x · weight + bias per feature (images:
    x · weight[c] + bias[c] per channel): the fitted preprocessing, carried inside the logged model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return x @ self.weight + self.bias
        if x.dim() == 4:
            return x * self.weight[:, None, None] + self.bias[:, None, None]
        return x * self.weight + self.bias


def build_model(cfg: ModelConfig, inputs: int | tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """A freshly initialised network; the same seed gives the same weights.

    `inputs` is the feature count, or one row's shape: (features,) or (channels, height, width).
    """
    from models.cnn import ConvNet, ResNet  # the MLP module stays importable on its own

    shape = (inputs,) if isinstance(inputs, int) else tuple(inputs)
    if cfg.kind == "mlp":
        model = MLP(math.prod(shape), n_classes, cfg)
    else:
        model = (ConvNet if cfg.kind == "cnn" else ResNet)(shape[0], n_classes, cfg)
    weights = torch.Generator().manual_seed(seed)  # its own: trials in other threads draw from the global one meanwhile
    model.apply(partial(init_layer, scheme=cfg.init, activation=cfg.activation, distribution=cfg.init_distribution, leaky_slope=cfg.leaky_slope, generator=weights))
    seed_masks(model, seed)
    with torch.no_grad():
        model.head.weight.mul_(cfg.head_init_scale)
    return model
