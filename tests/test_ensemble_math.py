"""An ensemble member's output and the ensemble's average, checked against softmax computed here:
the lecture averages the members' class probabilities, not their raw scores (logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from babysit.config import Config, load_config
from flows.ensemble import ensemble_probabilities, member_task
from tasks.preprocess import Prepared
from tasks.train import train_and_test


def config(*overrides: str) -> Config:
    return load_config(None, ["train.device=cpu", "train.threads=1", "train.diagnostics=false", "model.hidden=[32]", "train.epochs=2", *overrides])


def softmax_of_retrained(cfg: Config, prepared: Prepared) -> np.ndarray:
    """The member retrained here (same config and seed: the same weights) and its softmax, in float64."""
    _, model = train_and_test(cfg, prepared, test=False)
    with torch.no_grad():
        logits = model.eval()(torch.as_tensor(prepared.splits.X_test)).double()
    return torch.softmax(logits, dim=1).numpy()


def test_a_member_returns_class_probabilities_of_its_model(digits):
    cfg = config()
    test_acc, probabilities = member_task.fn(cfg, digits)
    y = digits.splits.y_test
    assert probabilities.shape == (len(y), 10)
    assert (probabilities >= 0).all() and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)  # probabilities, not logits
    assert np.allclose(probabilities, softmax_of_retrained(cfg, digits), atol=1e-5)
    assert test_acc == pytest.approx(float((probabilities.argmax(1) == y).mean()))


def test_the_ensemble_averages_its_members_probabilities(digits):
    members = [member_task.fn(config(f"seed={seed}"), digits)[1] for seed in (0, 1)]
    expected = (softmax_of_retrained(config("seed=0"), digits) + softmax_of_retrained(config("seed=1"), digits)) / 2
    averaged = ensemble_probabilities(members)
    assert np.allclose(averaged, expected, atol=1e-5)
    assert np.allclose(averaged.sum(axis=1), 1.0, atol=1e-5)
