"""Transfer learning: copy a trained network's layers into a new one, then freeze some of them.

The source is a torch state dict: from an MLflow model (babysit logs `Sequential(preprocessing,
network)`, so keys carry a '1.' prefix) or from a file saved with torch.save(model.state_dict()).
Every tensor whose name and shape match is copied; the classifier head is always new, since the
new task has its own classes.
"""

from __future__ import annotations

import torch
from torch import nn

from babysit.errors import BabysitError


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own keys: drop the logged model's preprocessing layer ('0.') and prefix ('1.')."""
    if any(key.startswith("1.") for key in state):
        return {key[2:]: value for key, value in state.items() if key.startswith("1.")}
    return dict(state)


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Copy matching tensors (not the head) from `source` into `model`; returns the copied names."""
    target = model.state_dict()
    copied = {k: v for k, v in network_state(source).items() if not k.startswith("head.") and k in target and target[k].shape == v.shape}
    if not copied:
        raise BabysitError(f"`model.init_from` {origin}: no layer of it fits this model (different kind or widths?); the source has {sorted(source)[:6]}...")
    model.load_state_dict(copied, strict=False)
    return sorted(copied)


def freeze(model: nn.Module, spec: str | int) -> int:
    """Stop gradients in all hidden blocks ('all'), none, or the first n (a ResNet's stem counts
    with its first block); returns the number of blocks frozen."""
    blocks = list(model.blocks)
    count = len(blocks) if spec == "all" else 0 if spec == "none" else min(int(spec), len(blocks))
    if hasattr(model, "stem") and count:
        model.stem.requires_grad_(False)
    for block in blocks[:count]:
        block.requires_grad_(False)
    return count


def load_source(init_from: str) -> dict[str, torch.Tensor]:
    """The state dict behind `model.init_from`: a local torch.save file, else an MLflow model URI."""
    from pathlib import Path

    from babysit import tracking

    if Path(init_from).is_file():
        try:
            return torch.load(init_from, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BabysitError(f"`model.init_from` {init_from}: not a torch state dict ({' '.join(str(err).split())[:200]}).") from None
    return tracking.load_torch_model(init_from).state_dict()


def unfreeze(model: nn.Module) -> None:
    model.requires_grad_(True)
