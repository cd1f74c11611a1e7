"""Flags on hand-made histories: each rule fires where it should and stays quiet on healthy curves."""

from __future__ import annotations

import math

import pytest

from babysit.config import FlagsConfig
from babysit.flags import diverged, lr_too_high, overfitting, run_flags

INITIAL = math.log(10)  # 2.303: a 10-class model at init

# Loss falls fast from ln(10), then keeps falling; train and val accuracy end high and close.
HEALTHY = {
    "train_loss": [1.2, 0.6, 0.35, 0.25, 0.18, 0.14],
    "val_loss": [1.25, 0.65, 0.4, 0.32, 0.28, 0.27],
    "train_acc": [0.7, 0.85, 0.91, 0.94, 0.96, 0.97],
    "val_acc": [0.68, 0.83, 0.89, 0.91, 0.92, 0.93],
}


def test_not_diverged_on_decreasing_loss():
    assert diverged(HEALTHY["train_loss"], INITIAL, 3.0) is None


def test_not_diverged_on_a_bump_below_the_factor():
    assert diverged([2.0, 5.0, 1.0], INITIAL, 3.0) is None  # 5.0 < 3 x 2.303


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_diverged_on_non_finite(bad):
    reason = diverged([2.0, 1.5, bad, 1.0], INITIAL, 3.0)
    assert reason is not None and "epoch 3" in reason


def test_diverged_above_factor_times_initial():
    reason = diverged([2.0, 1.5, 7.0], INITIAL, 3.0)  # 7.0 > 6.91
    assert reason is not None and "epoch 3" in reason
    assert diverged([2.0, 1.5, 6.9], INITIAL, 3.0) is None  # 6.9 < 6.91
    assert diverged([2.0, 1.5, 6.9], INITIAL, 2.0) is not None


def test_overfitting_on_accuracy_gap():
    history = {**HEALTHY, "train_acc": [0.5, 0.7, 0.9, 0.97, 0.99, 1.0], "val_acc": [0.48, 0.66, 0.8, 0.83, 0.84, 0.85]}
    reason = overfitting(history, gap=0.10, patience=3)
    assert reason is not None and "gap" in reason


def test_gap_is_checked_at_the_last_epoch_only():
    # a gap that closed again is not overfitting
    history = {**HEALTHY, "train_acc": [0.5, 0.9, 0.9, 0.9, 0.9, 0.9], "val_acc": [0.5, 0.7, 0.8, 0.85, 0.86, 0.86]}
    assert overfitting(history, gap=0.10, patience=3) is None
    # and the threshold is a strict "above"
    assert overfitting(history, gap=0.03, patience=3) is not None



def test_validation_above_training_accuracy_is_not_overfitting():
    # val acc 0.15 above train acc (heavy dropout, or an easy validation split): the gap that
    # signals overfitting is train above val, never the other way round
    history = {**HEALTHY, "train_acc": [0.5, 0.6, 0.65, 0.7, 0.72, 0.75], "val_acc": [0.6, 0.7, 0.8, 0.85, 0.88, 0.90]}
    assert overfitting(history, gap=0.10, patience=3) is None
    assert "overfitting" not in run_flags(history, INITIAL, FlagsConfig(overfit_gap=0.10))

def test_overfitting_on_rising_val_loss_while_train_falls():
    history = {
        "train_loss": [2.0, 1.0, 0.7, 0.5, 0.4, 0.3],
        "val_loss": [2.1, 1.1, 0.8, 0.85, 0.9, 0.95],  # rises in epochs 4, 5, 6
        "train_acc": [0.4, 0.7, 0.8, 0.85, 0.87, 0.88],
        "val_acc": [0.4, 0.68, 0.79, 0.82, 0.83, 0.83],  # gap 0.05: below threshold
    }
    reason = overfitting(history, gap=0.10, patience=3)
    assert reason is not None and "validation loss has stayed above its lowest (0.8) for 3 epochs, to 0.95 in epoch 6" in reason
    assert overfitting(history, gap=0.10, patience=4) is None


def test_an_oscillating_val_loss_is_not_overfitting():
    history = {**HEALTHY, "train_loss": [2.0, 1.5, 1.2, 1.0, 0.8, 0.6], "val_loss": [2.0, 2.1, 2.0, 2.1, 2.0, 2.1]}
    assert overfitting(history, gap=0.10, patience=2) is None


def test_a_val_loss_rise_of_noise_size_is_not_overfitting_and_a_dip_does_not_hide_a_real_one():
    # conf/digits_mlp.yaml was flagged for 0.1617 → 0.1619 → 0.1620 → 0.1622, val acc flat (QA)
    noise = {**HEALTHY, "train_loss": [0.5, 0.3, 0.2, 0.15, 0.12, 0.1], "val_loss": [0.5, 0.2, 0.1617, 0.1619, 0.1620, 0.1622]}
    assert overfitting(noise, gap=0.10, patience=3) is None
    # a rise from 0.20 to 0.55 with a small dip every third epoch was never flagged: the rises were not "in a row" (QA)
    dipping = {**HEALTHY, "train_loss": [0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05],
               "val_loss": [0.25, 0.20, 0.30, 0.28, 0.40, 0.38, 0.50, 0.48, 0.55]}
    assert "for 7 epochs, to 0.55 in epoch 9" in overfitting(dipping, gap=0.10, patience=3)
    assert overfitting(dipping, gap=0.10, patience=3, rise=2.0) is None  # 0.55 is within 3 × 0.20


def test_a_rising_val_loss_is_overfitting_also_when_dropout_keeps_training_accuracy_below_validation():
    # training accuracy is taken with dropout on: below validation's, it is no evidence against the loss rule (review)
    history = {"train_loss": [0.5, 0.2, 0.15, 0.13, 0.11, 0.1, 0.09, 0.08], "val_loss": [0.3, 0.15, 0.10, 0.12, 0.13, 0.14, 0.15, 0.16],
               "train_acc": [0.8, 0.9, 0.93, 0.95, 0.96, 0.965, 0.97, 0.972], "val_acc": [0.85, 0.93, 0.95, 0.96, 0.97, 0.975, 0.975, 0.975]}
    assert "validation loss has stayed above its lowest (0.1) for 5 epochs" in overfitting(history, gap=0.10, patience=3)


def test_underfitting_is_flagged_when_validation_scores_above_a_poor_training_accuracy():
    # QA: a linear model on spirals, train 51.9% and validation 57.8% (135 rows), was not flagged underfitting
    history = {**HEALTHY, "train_acc": [0.45, 0.5, 0.51, 0.515, 0.518, 0.519], "val_acc": [0.5, 0.55, 0.56, 0.57, 0.575, 0.578]}
    assert "training accuracy 51.9% (below 90%) is below validation 57.8%" in run_flags(history, INITIAL, FlagsConfig())["underfitting"]
    close = {**history, "val_acc": [*history["val_acc"][:-1], 0.53]}
    assert "is close to validation 53.0%" in run_flags(close, INITIAL, FlagsConfig())["underfitting"]
    # a model still learning fast: its epoch-averaged training accuracy trails the end-of-epoch validation one
    learning = {**HEALTHY, "train_acc": [0.55, 0.82], "val_acc": [0.85, 0.93], "train_loss": [1.2, 0.6], "val_loss": [0.7, 0.3]}
    assert "underfitting" not in run_flags(learning, INITIAL, FlagsConfig())
    # dropout or augmentation keep training accuracy (train mode) below a good validation one: no underfitting (review)
    for train_acc, val_acc in (([0.70, 0.86, 0.89], [0.88, 0.93, 0.95]), ([0.84, 0.86, 0.862], [0.95, 0.97, 0.97]), ([0.70, 0.86, 0.80], [0.88, 0.93, 0.90])):
        healthy = {**HEALTHY, "train_acc": train_acc, "val_acc": val_acc, "train_loss": [1.2, 0.6, 0.5], "val_loss": [0.7, 0.3, 0.25]}
        assert "underfitting" not in run_flags(healthy, INITIAL, FlagsConfig()), (train_acc, val_acc)


def test_rising_val_loss_with_rising_train_loss_is_not_overfitting():
    history = {**HEALTHY, "train_loss": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], "val_loss": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]}
    assert overfitting(history, gap=0.10, patience=3) is None


def test_healthy_curves_raise_no_flags():
    assert overfitting(HEALTHY, gap=0.10, patience=3) is None
    assert run_flags(HEALTHY, INITIAL, FlagsConfig()) == {}


def test_empty_history_raises_no_flags():
    empty = {key: [] for key in HEALTHY}
    assert run_flags(empty, INITIAL, FlagsConfig()) == {}


def test_run_flags_judge_a_diverged_run_by_its_divergence_not_by_the_accuracies_of_its_last_epoch():
    history = {
        "train_loss": [2.0, 1.0, math.nan],
        "val_loss": [2.0, 1.5, 1.6],
        "train_acc": [0.5, 0.9, 0.95],
        "val_acc": [0.5, 0.6, 0.6],
    }
    flags = run_flags(history, INITIAL, FlagsConfig(overfit_gap=0.2))
    assert "diverged" in flags and "overfitting" not in flags  # the last epoch's accuracies are the diverging model's
    assert all(isinstance(reason, str) and reason for reason in flags.values())


def test_lr_too_high_needs_large_update_ratios_in_most_early_epochs_not_one_spike():
    # the rule reads the median of the early epochs' update ratios: one spiky epoch among healthy
    # ones (≈ 1e-3) is noise, two of three large ones are a rate too high
    falling = [2.0, 1.5, 1.2]
    assert lr_too_high(falling, INITIAL, [1e-3, 0.5, 1e-3], 3, 0.05, 0.03) is None
    reason = lr_too_high(falling, INITIAL, [1e-3, 0.5, 0.2], 3, 0.05, 0.03)
    assert reason is not None and "2.0e-01" in reason  # the median, 0.2, is what it reports


# --- flags that agree with each other (QA: cures that pointed opposite ways) --------------------


def test_a_diverged_run_is_not_also_overfitting_or_dead_after_training():
    # lr 50: one epoch, NaN loss, val acc 0.10 — it was also flagged overfitting (train 0.264 vs val 0.100) and dead_relu
    history = {"train_loss": [float("nan")], "val_loss": [float("nan")], "train_acc": [0.264], "val_acc": [0.100]}
    found = run_flags(history, 1.1, FlagsConfig(), {"dead_frac/layer1": [0.9]})
    assert set(found) == {"diverged", "lr_too_high"}


def test_with_vanishing_activations_at_init_the_update_ratio_judges_no_learning_rate():
    # small init on a deep tanh net: tiny weights make ‖ΔW‖/‖W‖ large at Adam's ordinary 1e-3, which was called lr_too_high
    stats = {"act_std": [0.064, 1e-3, 1e-5, 1.6e-8]}
    found = run_flags(HEALTHY, INITIAL, FlagsConfig(), {"update_ratio": [2.7e-2] * 6}, init_stats=stats)
    assert "vanishing_activations" in found and "lr_too_high" not in found
    assert "lr_too_high" in run_flags(HEALTHY, INITIAL, FlagsConfig(), {"update_ratio": [2.7e-2] * 6})  # with a sound init it does


def test_a_transferred_model_is_judged_on_its_update_ratio_not_on_its_starting_loss():
    # a trained head barely lowers an already low loss (1.025 → 0.953): that was lr_too_low, and 1.025 initial_loss_off
    slow = {**HEALTHY, "train_loss": [1.0, 0.98, 0.96, 0.95, 0.95, 0.94]}
    assert {"lr_too_low", "initial_loss_off"} <= set(run_flags(slow, 1.025, FlagsConfig(), n_classes=10))
    assert not {"lr_too_low", "initial_loss_off"} & set(run_flags(slow, 1.025, FlagsConfig(), n_classes=10, transferred=True))
    assert "lr_too_low" in run_flags(slow, 1.025, FlagsConfig(), {"update_ratio": [1e-7] * 6}, transferred=True)  # its weights barely move


def test_an_underfitting_run_is_not_also_overfitting_by_its_validation_loss():
    history = {"train_loss": [1.0, 0.9, 0.85, 0.8, 0.78, 0.76], "val_loss": [1.0, 0.9, 1.0, 1.1, 1.2, 1.3],
               "train_acc": [0.5, 0.55, 0.6, 0.62, 0.63, 0.64], "val_acc": [0.5, 0.55, 0.58, 0.6, 0.6, 0.6]}
    found = run_flags(history, INITIAL, FlagsConfig())
    assert "underfitting" in found and "overfitting" not in found
    assert overfitting(history, gap=0.10, patience=3) is not None  # alone, the rule would fire


def test_a_model_no_better_than_the_majority_class_is_flagged():
    # 95% of rows "ok": val acc 0.942 from a model that predicted "ok" for all 800 rows passed as healthy (QA)
    stuck = {**HEALTHY, "val_acc": [0.90, 0.93, 0.942, 0.942, 0.942, 0.942]}
    reason = run_flags(stuck, INITIAL, FlagsConfig(), majority_share=0.942)["majority_class"]
    assert reason == "best validation accuracy 94.2% is no better than always predicting the most common class (94.2% of validation rows)"
    assert "majority_class" not in run_flags(stuck, INITIAL, FlagsConfig(), majority_share=0.5)
    assert "majority_class" not in run_flags(HEALTHY, INITIAL, FlagsConfig(), majority_share=0.1)


def test_a_model_at_chance_on_balanced_classes_is_not_told_to_balance_them():
    # QA: digits at lr 1e-5 (largest class 10.4%) was told to "balance the classes (resample the rare ones...)"
    from babysit.advice import run_report

    stuck = {**HEALTHY, "val_acc": [0.09, 0.1, 0.1, 0.104, 0.1, 0.1]}
    flags = run_flags(stuck, INITIAL, FlagsConfig(), n_classes=10, majority_share=0.104)
    assert flags["majority_class"].endswith("(10.4% of validation rows; the classes are balanced)")
    report = run_report("digits", {"majority_class": flags["majority_class"]}, stuck, INITIAL)
    assert "the model has learned nothing yet" in report and "balance the classes" not in report
    for n_classes, share in ((2, 0.942), (2, 0.72), (3, 0.45)):  # 72/28 is no balance (review)
        skewed = run_flags(stuck, INITIAL, FlagsConfig(), n_classes=n_classes, majority_share=share)["majority_class"]
        assert "balance the classes" in run_report("ok", {"majority_class": skewed}, stuck, INITIAL), (n_classes, share)
    assert "the classes are balanced" in run_flags(stuck, INITIAL, FlagsConfig(), n_classes=2, majority_share=0.55)["majority_class"]


def test_the_majority_share_is_that_of_the_most_common_validation_class():
    import numpy as np

    from tasks.data import Splits

    empty = np.zeros((0, 2))
    splits = Splits(empty, np.array([], dtype=int), np.zeros((4, 2)), np.array([1, 1, 1, 0]), empty, np.array([], dtype=int), ["a", "b"])
    assert splits.majority_share == 0.75


def test_lr_flags_from_update_ratios_name_the_epochs_they_were_measured_in_after_a_frozen_phase():
    # QA: fine-tuning's ratios (epochs 7-9) were reported as "in the first 3 epoch(s)" of the run
    losses = [1.0, 0.9, 0.85, 0.8, 0.78, 0.77, 0.7, 0.65, 0.6]
    history = {"train_loss": losses, "val_loss": losses, "train_acc": [0.6] * 9, "val_acc": [0.6] * 9}
    flags = run_flags(history, 1.1, FlagsConfig(), {"update_ratio": [0.052, 0.042, 0.037]}, transferred=True)
    assert "update/weight ratio 4.2e-02 in epochs 7-9, the first measured (every hidden layer was frozen before), above 2e-02" in flags["lr_too_high"]
    fresh = run_flags(history, 1.1, FlagsConfig(), {"update_ratio": [0.052] * 9})
    assert "in the first 3 epoch(s), above" in fresh["lr_too_high"]
    slow = run_flags(history, 1.1, FlagsConfig(), {"update_ratio": [1e-7]}, transferred=True)
    assert "update/weight ratio 1.0e-07 in epoch 9, the first measured" in slow["lr_too_low"]
