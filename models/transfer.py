"""Transfer learning: copy a trained network's layers into a new one, then freeze some of them.

The source is a torch state dict: from an MLflow model (babysit logs `Sequential(preprocessing,
network)`, so keys carry a '1.' prefix) or from a file saved with torch.save(model.state_dict()).
Every learned tensor (weights, biases, BatchNorm's running statistics) whose name and shape match
is copied; the classifier head is always new, since the new task has its own classes.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from babysit.errors import BabysitError


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own keys: drop the logged model's preprocessing layer ('0.') and prefix ('1.')."""
    if any(key.startswith("1.") for key in state):
        return {key[2:]: value for key, value in state.items() if key.startswith("1.")}
    return dict(state)


def transferable(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry carries values worth transferring: weights, biases and running
    statistics (floating point), not the head, and not counters. BatchNorm's `num_batches_tracked`
    is an int64 of shape (): it has the same shape in a BatchNorm layer of any width, so counting
    it let a source none of whose layers fit pass as transferred (QA: channels [8, 16] from a
    [16, 32] CNN trained from scratch in silence). Counters stay at the new model's own values."""
    return tensor.is_floating_point() and not name.startswith("head.")


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Copy the learned tensors of `source` whose name and shape match into `model` (never the
    head); returns the copied names. Raises BabysitError when none fits."""
    target = model.state_dict()
    copied = {k: v for k, v in network_state(source).items() if transferable(k, v) and k in target and transferable(k, target[k]) and target[k].shape == v.shape}
    if not copied:
        raise BabysitError(
            f"`model.init_from` {origin}: no layer of it fits this model (a different model.kind, or other model.hidden / model.channels "
            f"widths?); the source has {_shapes(network_state(source))}, this model needs {_shapes(target)}."
        )
    model.load_state_dict(copied, strict=False)
    return sorted(copied)


def _shapes(state: dict[str, torch.Tensor], limit: int = 4) -> str:
    """The first `limit` transferable tensors as 'name (shape)': enough to see the widths that differ."""
    shown = [f"{k} {tuple(v.shape)}" for k, v in state.items() if transferable(k, v)]
    return ", ".join(shown[:limit]) + (", ..." if len(shown) > limit else "") if shown else "no learned tensors"


def transfer_tags(model: nn.Module, copied: list[str]) -> dict[str, str]:
    """What a transfer did, as MLflow tags: how many of the model's learned tensors came from
    `model.init_from`, and which (the head among them) start from their fresh initialisation."""
    kept = set(copied)
    fresh = [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in kept]
    return {"babysit.transfer.copied": f"{len(copied)} of {len(copied) + len(fresh)} tensors", "babysit.transfer.fresh": ",".join(fresh) or "none"}


def freeze(model: nn.Module, spec: str | int) -> int:
    """Stop gradients in all hidden blocks ('all'), none, or the first n (a ResNet's stem counts
    with its first block); returns the number of blocks frozen. Raises BabysitError when n is
    more than the model has (a config is checked at load: babysit.config.ModelConfig)."""
    blocks = list(model.blocks)
    count = len(blocks) if spec == "all" else 0 if spec == "none" else int(spec)
    if not 0 <= count <= len(blocks):
        raise BabysitError(f"`model.freeze` {spec}: this model has {len(blocks)} hidden blocks, so freeze takes 0 to {len(blocks)}, all or none.")
    if hasattr(model, "stem") and count:
        model.stem.requires_grad_(False)
    for block in blocks[:count]:
        block.requires_grad_(False)
    return count


def check_frozen_were_copied(model: nn.Module, frozen: int, copied: list[str], origin: str) -> None:
    """A frozen block must hold transferred weights: one that `model.init_from` did not fill would
    stay at its random initialisation for the whole run (a source of other widths, partly fitting)."""
    prefixes = tuple(f"blocks.{i}." for i in range(frozen)) + (("stem.",) if frozen and hasattr(model, "stem") else ())
    kept = set(copied)
    random = [k for k, v in model.state_dict().items() if k.startswith(prefixes) and transferable(k, v) and k not in kept]
    if random:
        raise BabysitError(f"`model.freeze` {frozen} block(s): {', '.join(random[:4])}{', ...' if len(random) > 4 else ''} did not fit any tensor of "
                           f"`model.init_from` {origin}, and frozen would stay random; freeze fewer blocks, or match the source's widths.")


def load_source(init_from: str, tracking_uri: str) -> dict[str, torch.Tensor]:
    """The state dict behind `model.init_from`: a local torch.save file, else an MLflow model URI
    (runs:/, models:/), looked up in `tracking_uri`, the run's own store."""
    from babysit import tracking

    if urlparse(init_from).scheme in ("http", "https"):  # MLflow took it for an artifact server, and failed with a traceback (QA)
        raise BabysitError(f"`model.init_from` {init_from}: a web address; download the file first and give its path, "
                           "or give an MLflow model URI such as runs:/<run id>/model.")
    if Path(init_from).expanduser().is_file():
        try:
            state = torch.load(Path(init_from).expanduser(), map_location="cpu", weights_only=True)
        except Exception as err:  # torch's message can hold terminal colours and run for pages: plain, and short
            said = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(err).split()))
            raise BabysitError(f"`model.init_from` {init_from}: not a torch state dict (torch.save(model.state_dict(), path)); "
                               f"torch says: {textwrap.shorten(said, 300, placeholder=' ...')}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BabysitError(f"`model.init_from` {init_from}: expected a state dict (torch.save(model.state_dict(), path)), got {type(state).__name__}.")
        return state
    if urlparse(init_from).scheme in ("", "file") and not Path(init_from.removeprefix("file://")).exists():  # a path (a model folder MLflow loads), not a model URI
        raise BabysitError(f"`model.init_from` {init_from}: no such file (a relative path is read from the working folder, {Path.cwd()}); "
                           "expected a torch.save(model.state_dict()) file, or an MLflow model URI such as runs:/<run id>/model.")
    return tracking.load_torch_model(init_from, tracking_uri).state_dict()


def unfreeze(model: nn.Module) -> None:
    model.requires_grad_(True)
