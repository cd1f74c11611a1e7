"""Optimizer names map onto torch's classes with the configured hyperparameters; lr_at is its formulas."""

from __future__ import annotations

import math

import pytest
import torch

from babysit.config import OptimConfig
from babysit.optim import lr_at, make_optimizer


def params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(3, 2).parameters())


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0, "nesterov": False}),
        ("momentum", torch.optim.SGD, {"momentum": 0.8, "nesterov": False}),
        ("nesterov", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
        ("adagrad", torch.optim.Adagrad, {}),
        ("rmsprop", torch.optim.RMSprop, {"alpha": 0.95, "momentum": 0}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.9)}),
        ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.9)}),
    ],
)
def test_optimizer_class_and_hyperparameters(name, cls, expected):
    cfg = OptimConfig(name=name, lr=0.05, momentum=0.8, weight_decay=3e-4, betas=(0.8, 0.9), alpha=0.95)
    opt = make_optimizer(params(), cfg)
    assert type(opt) is cls
    weights, others = opt.param_groups
    for group in weights, others:
        assert group["lr"] == 0.05
        for key, value in expected.items():
            assert group[key] == value, key
    # L2 on the weight matrix, as the lecture's R(W); not on the bias
    assert [p.shape for p in weights["params"]] == [(2, 3)] and weights["weight_decay"] == 3e-4
    assert [p.shape for p in others["params"]] == [(2,)] and others["weight_decay"] == 0.0


def test_sgd_step_is_the_plain_update():
    # W <- W - lr * (grad + weight_decay * W), the lecture's vanilla update with L2; a bias: no L2
    w, b = torch.nn.Parameter(torch.tensor([[1.0, -2.0]])), torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer([w, b], OptimConfig(name="sgd", lr=0.1, weight_decay=0.5))
    ((w**2).sum() + (b**2).sum()).backward()  # grad = 2w, 2b
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[1.0, -2.0]]) * (1 - 0.1 * (2 + 0.5)))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 2))


def cfg(**kw) -> OptimConfig:
    return OptimConfig(lr=0.1, **kw)


@pytest.mark.parametrize("epoch", [0, 0.5, 3, 17.25, 99])
def test_constant(epoch):
    assert lr_at(epoch, cfg(schedule="constant"), 100) == pytest.approx(0.1)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.1), (4.99, 0.1), (5, 0.05), (9.5, 0.05), (10, 0.025), (17, 0.0125)])
def test_step(epoch, expected):
    c = cfg(schedule="step", step_epochs=5, gamma=0.5)
    assert lr_at(epoch, c, 20) == pytest.approx(expected)


@pytest.mark.parametrize("epoch", [0, 1, 2.5, 10])
def test_exponential(epoch):
    c = cfg(schedule="exponential", gamma=0.9)
    assert lr_at(epoch, c, 20) == pytest.approx(0.1 * 0.9**epoch)


@pytest.mark.parametrize(("epoch", "expected_fraction"), [(0, 1.0), (5, (1 + math.cos(math.pi / 4)) / 2), (10, 0.5), (20, 0.0), (30, 0.0)])
def test_cosine_to_zero(epoch, expected_fraction):
    assert lr_at(epoch, cfg(schedule="cosine"), 20) == pytest.approx(0.1 * expected_fraction, abs=1e-12)


@pytest.mark.parametrize("epoch", [0, 3, 10, 20])
def test_cosine_with_floor(epoch):
    c = cfg(schedule="cosine", min_lr_fraction=0.1)
    floor = 0.01
    expected = floor + (0.1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / 20))
    assert lr_at(epoch, c, 20) == pytest.approx(expected)
    assert lr_at(20, c, 20) == pytest.approx(floor)


@pytest.mark.parametrize("epoch", [0, 1, 4, 10.5])
def test_inverse_time(epoch):
    c = cfg(schedule="inverse_time", decay=0.5)
    assert lr_at(epoch, c, 20) == pytest.approx(0.1 / (1 + 0.5 * epoch))


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.001), (1, 0.001 + 0.099 / 4), (2, 0.0505), (3.5, 0.001 + 0.099 * 3.5 / 4)])
def test_warmup_is_linear_from_lr_over_100(epoch, expected):
    c = cfg(schedule="constant", warmup_epochs=4)
    assert lr_at(epoch, c, 20) == pytest.approx(expected)


def test_warmup_then_schedule_counts_epochs_after_warmup():
    c = cfg(schedule="exponential", gamma=0.5, warmup_epochs=2)
    assert lr_at(2, c, 10) == pytest.approx(0.1)
    assert lr_at(3, c, 10) == pytest.approx(0.05)
    assert lr_at(5, c, 10) == pytest.approx(0.0125)
    # cosine: T is the epochs left after warmup, so it reaches its floor exactly at the last epoch
    cos = cfg(schedule="cosine", warmup_epochs=2)
    assert lr_at(2, cos, 10) == pytest.approx(0.1)
    assert lr_at(6, cos, 10) == pytest.approx(0.05)
    assert lr_at(10, cos, 10) == pytest.approx(0.0, abs=1e-12)


def test_warmup_approaches_peak_continuously():
    c = cfg(schedule="step", warmup_epochs=3, step_epochs=2, gamma=0.1)
    assert lr_at(3 - 1e-9, c, 10) == pytest.approx(0.1, rel=1e-6)
    assert lr_at(3, c, 10) == pytest.approx(0.1)
