"""Per-layer diagnostics of a model being trained: the lecture's numbers for babysitting.

Measured once per epoch, on the epoch's last step only (a snapshot of the weights before that
step's update and the gradients it used) and on the validation pass that follows it (forward
hooks note which hidden units are ever non-zero), so their cost does not grow with the number
of steps. Every function returns plain floats.

    grad_norm/<weight>     ‖∇W‖ of each weight matrix; `grad_norm` is the norm over all parameters
    update_ratio/<weight>  ‖ΔW‖ / ‖W‖ of that step's update; CS231n's rule of thumb is ≈ 1e-3.
                           `update_ratio` is the median over the hidden layers' weight matrices
                           (the head's weights start scaled down by model.head_init_scale, which
                           inflates its early ratio); none while every hidden layer is frozen
    dead_frac/layer<i>     share of hidden layer i's units that output exactly 0 for every
                           validation example (dead ReLUs); `dead_frac` is the worst layer

Biases and BatchNorm parameters count in `grad_norm` but get no metrics of their own: biases
start at 0, so their update ratio says nothing, and each metric costs ~0.2 ms per epoch on SQLite.
"""

from __future__ import annotations

import re
import statistics
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


# metric names by layer type: blocks.0.0 (a Linear) → fc1, a Conv → conv1, a BatchNorm → bn1
KINDS = ((nn.Linear, "fc"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.modules.batchnorm._BatchNorm, "bn"))


def param_labels(model: nn.Module) -> dict[str, str]:
    """Short metric names for parameters: blocks.0.0.weight → fc1.weight, blocks.1.1.bias → bn2.bias.

    A block of models.mlp.MLP (or models.cnn.ConvNet) is a Sequential [Linear or Conv,
    (BatchNorm), activation, ...]; its layers are named by type and block number. Other
    parameters (the head, a ResNet's nested blocks) keep their names.
    """
    labels = {}
    for module_name, module in model.named_modules():
        match = re.fullmatch(r"blocks\.(\d+)\.\d+", module_name)
        kind = next((label for cls, label in KINDS if isinstance(module, cls)), None)
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            labels[full] = f"{kind}{int(match[1]) + 1}.{name}" if match and kind else full
    return labels


_labels: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()  # per model: walking its modules costs ~0.3 ms an epoch


@torch.no_grad()
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weight matrices, taken just before an optimizer step."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim >= 2}


@torch.no_grad()
def step_diagnostics(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient norms and update-to-weight ratios of the step that followed `snapshot(model)`.

    Call it after `optimizer.step()` and before the next `zero_grad`: `p.grad` still holds that
    step's gradient. The norms are computed with torch's multi-tensor `_foreach` kernels (as
    clip_grad_norm_ does) and fetched in one transfer.
    """
    params = dict(model.named_parameters())
    grads = [p.grad for p in params.values() if p.grad is not None]
    names = [name for name in before if params[name].grad is not None]
    if not grads or not names:
        return {}
    weights = [params[name] for name in names]
    grad_norms = torch._foreach_norm([w.grad for w in weights])
    deltas = torch._foreach_sub([w.detach() for w in weights], [before[name] for name in names])
    ratios = torch._foreach_div(torch._foreach_norm(deltas), torch._foreach_clamp_min(torch._foreach_norm([before[n] for n in names]), 1e-12))
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    fetched = torch.stack([*grad_norms, *ratios, total]).tolist()
    label_of = _labels.get(model) or _labels.setdefault(model, param_labels(model))
    labels = [label_of[name] for name in names]
    out = {f"grad_norm/{label}": value for label, value in zip(labels, fetched)}
    out |= {f"update_ratio/{label}": value for label, value in zip(labels, fetched[len(names) :])}
    out["grad_norm"] = fetched[-1]
    hidden = [fetched[len(names) + i] for i, label in enumerate(labels) if not label.startswith("head.")]
    if hidden:
        out["update_ratio"] = statistics.median(hidden)
    elif all(label_of[name].startswith("head.") for name in before):  # a linear model: the head's
        out["update_ratio"] = statistics.median(fetched[len(names) : 2 * len(names)])
    # else every hidden layer is frozen (transfer): the head's ratio alone, inflated by its small
    # start, flagged a rate as too high whose loss barely moved (QA)
    return out


@contextmanager
def dead_unit_probe(model: nn.Module) -> Iterator[list[float]]:
    """While open, forward hooks on `model.blocks` note which hidden units are ever non-zero; on
    exit the yielded list gets, per hidden layer, the share of units that were 0 for every row
    seen. Wrap the validation pass in it: the dead units come at the cost of a few reductions.
    Models without `blocks` (see models.mlp.MLP) leave the list empty.
    """
    blocks = list(getattr(model, "blocks", []))
    alive: list[torch.Tensor | None] = [None] * len(blocks)

    def recorder(layer: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen = output.detach().abs().amax(dim=0) > 0  # 6× faster than (output != 0).any(dim=0) on CPU
            alive[layer] = seen if alive[layer] is None else alive[layer] | seen

        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    fractions: list[float] = []
    try:
        yield fractions
    finally:
        for handle in handles:
            handle.remove()
    if all(a is not None for a in alive) and alive:
        fractions.extend((1.0 - torch.stack([a.float().mean() for a in alive])).tolist())


def dead_fractions(hidden: list[torch.Tensor]) -> list[float]:
    """Per hidden layer's output (batch first), the share of its units that are exactly 0 for every row."""
    return [(h.abs().amax(dim=0) == 0).float().mean().item() for h in hidden]


def dead_unit_metrics(fractions: list[float]) -> dict[str, float]:
    """Per-layer dead fractions as metrics: dead_frac/layer<i> and `dead_frac`, the worst layer."""
    if not fractions:
        return {}
    return {**{f"dead_frac/layer{i}": f for i, f in enumerate(fractions, start=1)}, "dead_frac": max(fractions)}
