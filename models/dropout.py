"""Dropout whose masks come from a generator of the layer's own.

torch's nn.Dropout draws its masks from the process's one global generator. Trials that train at
once in threads (`search.runner: threads`) take turns drawing from it, in an order that differs
from run to run, and so do their results. Here each layer draws from its own generator, seeded by
build_model from the model's seed (seed_masks): the same config and seed give the same masks
wherever and beside whatever the trial trains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class OwnMasks:
    """The forward pass of Dropout and Dropout2d below; `mask_shape` tells them apart."""

    seed = 0
    p: float
    training: bool

    def mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        generators = self.__dict__.setdefault("generators", {})
        if x.device not in generators:  # made where the data is: CUDA tensors need a CUDA generator
            generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        keep = torch.rand(self.mask_shape(x), generator=generators[x.device], device=x.device, dtype=x.dtype)
        return x * keep.ge_(self.p).div_(1 - self.p)  # kept units scaled by 1/(1-p), as nn.Dropout does

    def __getstate__(self) -> dict:
        # generators stay out of pickles (a logged model): a loaded model's masks start again from its seed
        return {k: v for k, v in self.__dict__.items() if k != "generators"}


class Dropout(OwnMasks, nn.Dropout):
    """nn.Dropout: each unit zeroed with probability p."""


class Dropout2d(OwnMasks, nn.Dropout2d):
    """nn.Dropout2d: whole channels zeroed with probability p."""

    def mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (*x.shape[:2], *[1] * (x.dim() - 2))


def seed_masks(model: nn.Module, seed: int) -> None:
    """Give each dropout layer of `model` its own seed, drawn from the model's: layers with one
    seed would drop the same units in step."""
    layers = [m for m in model.modules() if isinstance(m, OwnMasks)]
    for layer, state in zip(layers, np.random.SeedSequence(seed % 2**64).generate_state(len(layers), dtype=np.uint64)):
        layer.seed = int(state)
        layer.__dict__.pop("generators", None)
