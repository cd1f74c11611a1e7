"""Lecture 7's toolbox on the default digits MLP: every optimizer and LR schedule trains it."""

from __future__ import annotations

import pytest

from babysit.config import DEFAULT_LR, load_config
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess
from tasks.train import train_and_test


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("conf/digits_mlp.yaml")
    return fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)


def short_run(prepared, overrides):
    cfg = load_config("conf/digits_mlp.yaml", ["train.epochs=8", "train.threads=1", "train.diagnostics=false", *overrides])
    result, _ = train_and_test(cfg, prepared)
    return cfg, result


@pytest.mark.parametrize("name", list(DEFAULT_LR))
def test_each_optimizer_trains_digits_with_its_default_lr(digits, name):
    # lr=null: the optimizer's sensible default from DEFAULT_LR
    cfg, result = short_run(digits, [f"optim.name={name}", "optim.lr=null"])
    assert cfg.optim.lr == DEFAULT_LR[name]
    assert result.test_acc >= 0.93, f"{name} at lr {cfg.optim.lr}: test acc {result.test_acc:.3f}"


@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "cosine", "inverse_time"])
def test_each_schedule_trains_digits_and_logs_its_lr(digits, schedule):
    cfg, result = short_run(digits, [f"optim.schedule={schedule}", "optim.step_epochs=3", "optim.gamma=0.7", "optim.warmup_epochs=1"])
    assert result.test_acc >= 0.93
    lrs = result.history["lr"]
    assert len(lrs) == 8 and max(lrs) <= cfg.optim.lr
    if schedule != "constant":
        assert lrs[-1] < lrs[1]  # decayed after warmup
