"""Optimizers and learning-rate schedules: config names mapped onto torch, and one pure `lr_at`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from babysit.config import OptimConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The lecture's update rules; all of them are torch's own implementations. The L2 penalty
    (weight_decay) falls on the weight matrices and kernels only, as the lecture's R(W) does: not
    on biases nor BatchNorm's scale and shift."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    params = [group for group in groups if group["params"]]
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, **common)
    if cfg.name in ("momentum", "nesterov"):
        return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.name == "nesterov", **common)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, **common)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, alpha=cfg.alpha, **common)
    if cfg.name == "adam":
        return torch.optim.Adam(params, betas=cfg.betas, **common)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, betas=cfg.betas, **common)
    raise ValueError(f"unknown optimizer '{cfg.name}'")


def lr_at(epoch: float, cfg: OptimConfig, total_epochs: int) -> float:
    """Learning rate after `epoch` epochs of training (fractional: updated every step).

    1) warmup: linear from lr/100 to lr over `warmup_epochs`;
    2) then, with t the epochs since warmup and T the epochs left after it:
       constant      lr
       step          lr · gamma^floor(t / step_epochs)
       exponential   lr · gamma^t
       cosine        floor + (lr − floor) · (1 + cos(π t / T)) / 2, floor = min_lr_fraction · lr
       inverse_time  lr / (1 + decay · t)          (the lecture's 1/t decay)
    """
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (0.01 + 0.99 * epoch / cfg.warmup_epochs)
    t = epoch - cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** math.floor(t / cfg.step_epochs)
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.gamma**t
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1)
        floor = cfg.min_lr_fraction * cfg.lr
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t / span, 1.0)))
    if cfg.schedule == "inverse_time":
        return cfg.lr / (1.0 + cfg.decay * t)
    raise ValueError(f"unknown schedule '{cfg.schedule}'")
