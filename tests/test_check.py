"""Pre-flight checks (tasks/check.py) and `babysit check`, on real models and data."""

from __future__ import annotations

import math

import pytest

from babysit.cli import main
from babysit.config import load_config
from tasks.check import check_activations, check_initial_loss, overfit_tiny_subset
from tasks.data import load_splits
from tasks.preprocess import fit_preprocess


def prepared_for(cfg):
    splits = load_splits(cfg.data, cfg.seed)
    return fit_preprocess(splits, cfg.preprocess)


def test_babysit_check_passes_the_default_config_in_a_few_lines(capsys, one_thread):
    assert main(["check", "conf/digits_mlp.yaml"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    text = " ".join(lines)
    assert len(lines) <= 12
    for name in ("initial loss", "tiny-subset overfit", "activations at init"):
        assert f"PASS  {name}" in text
    assert "FAIL" not in text and "all 3 checks passed" in text


def test_babysit_check_fails_on_deep_tanh_small_init_with_reasons(capsys, one_thread, tmp_path):
    assert main(["check", "conf/deep_tanh_small_init.yaml", "--budget", "5", "--plots", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "FAIL  activations at init: vanishing_activations" in text
    assert "FAIL  tiny-subset overfit" in text and "PASS  initial loss" in text
    assert (tmp_path / "init_activations.png").stat().st_size > 0 and (tmp_path / "overfit_curve.png").stat().st_size > 0


def test_babysit_check_on_batch_norm_with_one_row_batches_is_one_paragraph(capsys, one_thread):
    assert main(["check", "conf/digits_mlp.yaml", "--set", "model.batchnorm=true", "--set", "train.batch_size=1"]) == 2
    said = capsys.readouterr()
    text = said.out + said.err
    assert "train.batch_size 1 with model.batchnorm: true" in text and "at least 2 rows" in text and "Traceback" not in text


def test_initial_loss_is_ln_classes_with_the_scaled_head():
    cfg = load_config("conf/digits_mlp.yaml")
    result = check_initial_loss(cfg, prepared_for(cfg))
    assert result.passed and result.data["expected"] == pytest.approx(math.log(10))
    assert abs(result.data["initial_loss"] - math.log(10)) < 0.1 * math.log(10)


def test_initial_loss_check_fails_when_the_logits_start_large():
    # a 3-class problem whose head is not scaled down and whose activations are large (lecun on
    # unstandardized pixels 0..16): confident random logits, loss far above ln 3
    cfg = load_config("conf/digits_mlp.yaml", ["preprocess.method=none", "model.head_init_scale=1.0", "model.init=lecun"])
    result = check_initial_loss(cfg, prepared_for(cfg))
    assert not result.passed and "initial_loss_off" in result.flags
    assert f"expected ln(10) = {math.log(10):.3f}" in result.reason


def test_overfit_tiny_subset_reaches_100_percent_with_regularization_off(one_thread):
    cfg = load_config("conf/digits_mlp.yaml", ["model.dropout=0.5", "optim.weight_decay=0.1"])  # turned off by the check
    result = overfit_tiny_subset(cfg, prepared_for(cfg), n=20, budget_epochs=200)
    assert result.passed and result.data["accuracy"] == 1.0
    assert result.data["epochs"] == len(result.curve) < 200
    assert result.curve[-1] < result.curve[0]


def test_overfit_check_fails_with_the_loss_curve_attached(one_thread):
    cfg = load_config("conf/digits_mlp.yaml", ["optim.lr=1e-7"])
    result = overfit_tiny_subset(cfg, prepared_for(cfg), n=20, budget_epochs=15)
    assert not result.passed
    assert len(result.curve) == 15 and "after 15 epochs (the budget)" in result.reason
    assert result.curve[-1] == pytest.approx(result.curve[0], rel=1e-3)  # lr 1e-7: nothing moves


def test_activation_check_reports_per_layer_numbers():
    cfg = load_config("conf/digits_mlp.yaml")
    result = check_activations(cfg, prepared_for(cfg))
    assert result.passed and "over 2 hidden layers" in result.reason
    stats = result.data["report"].layer_stats
    assert len(stats["act_std"]) == 2 and stats["act_frac_dead"] == [0.0, 0.0]


def test_the_overfit_check_of_a_frozen_transfer_tells_frozen_features_from_a_broken_setup(one_thread, tmp_path):
    # QA: freeze all failed the check ("check the loss, labels and learning rate") while every layer trainable fit the 20 examples
    import torch

    from models.mlp import build_model

    base = ["model.hidden=[4]", "train.diagnostics=false", "optim.lr=0.03"]
    torch.save(build_model(load_config("conf/digits_mlp.yaml", base).model, 64, 10, seed=1).state_dict(), tmp_path / "source.pt")
    cfg = load_config("conf/digits_mlp.yaml", [*base, f"model.init_from={tmp_path / 'source.pt'}", "model.freeze=all"])
    source = torch.load(tmp_path / "source.pt")
    result = overfit_tiny_subset(cfg, prepared_for(cfg), source=source)
    assert result.passed, result.reason
    assert result.reason.startswith("with model.freeze all (only the layers after the frozen blocks train) 20 examples reach only")
    assert "with every layer trainable they fit in" in result.reason and "check the loss, labels" not in result.reason
    unfrozen = load_config("conf/digits_mlp.yaml", [*base, f"model.init_from={tmp_path / 'source.pt'}", "model.freeze=none"])
    assert overfit_tiny_subset(unfrozen, prepared_for(unfrozen), source=source).data["epochs"] == result.data["epochs"]  # the same training
