"""The babysitter: flags on hand-made curves and on real small trainings, diagnostics against
formulas, advice, and `babysit report` on real MLflow runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from babysit import flags as F
from babysit import tracking
from babysit.advice import run_report, search_advice
from babysit.cli import main
from babysit.config import FlagsConfig, load_config
from babysit.diagnostics import dead_fractions, param_labels, snapshot, step_diagnostics
from tasks.build import inspect_init
from tasks.data import load_splits
from tasks.preprocess import fit_preprocess
from tasks.train import HISTORY_KEYS, fit, to_device, train_and_test

CFG = FlagsConfig()


def prepared_for(cfg):
    splits = load_splits(cfg.data, cfg.seed)
    return fit_preprocess(splits, cfg.preprocess)


def history(train_loss, train_acc=None, val_loss=None, val_acc=None):
    n = len(train_loss)
    return {
        "train_loss": list(train_loss),
        "train_acc": list(train_acc or [0.5] * n),
        "val_loss": list(val_loss or train_loss),
        "val_acc": list(val_acc or [0.5] * n),
    }


# Flags on hand-made histories: each rule at and beyond its threshold


def test_initial_loss_off_compares_with_ln_classes():
    assert F.initial_loss_off(math.log(10) * 1.05, 10, 0.1) is None
    reason = F.initial_loss_off(4.0, 10, 0.1)
    assert "4.000" in reason and "ln(10) = 2.303" in reason
    assert F.initial_loss_off(float("nan"), 3, 0.1)


def test_activation_flags_on_hand_made_stats():
    assert "layer 3" in F.vanishing_activations([0.5, 0.1, 0.01], 0.1)
    assert F.vanishing_activations([0.5, 0.3, 0.06], 0.1) is None
    assert F.vanishing_activations([1e-9], 0.1) is None  # one layer: nothing to compare
    assert F.exploding_activations([0.5, 2.0, 6.0], 10.0) is not None
    assert F.exploding_activations([0.5, float("inf")], 10.0) is not None
    assert F.exploding_activations([0.5, 0.6], 10.0) is None
    assert "layer 2" in F.saturated([0.0, 0.6], 0.25)
    assert F.saturated([0.1, 0.2], 0.25) is None
    assert "50% of layer 2" in F.dead_relu([0.1, 0.5], 0.25, "at init")
    assert F.dead_relu([0.1, 0.2], 0.25, "at init") is None
    assert F.dead_relu([], 0.25, "at init") is None


def test_lr_too_high_on_rising_loss_and_on_large_update_ratios():
    assert "epoch 2" in F.lr_too_high([2.0, 2.6, 1.0], 2.3, [], 3, 0.05, 0.03)
    assert F.lr_too_high([float("nan")], 2.3, [], 3, 0.05, 0.03) is not None
    assert F.lr_too_high([2.2, 2.0, 1.9], 2.3, [0.1, 0.08, 0.05], 3, 0.05, 0.03) is not None
    assert F.lr_too_high([2.2, 2.0, 1.9], 2.3, [1e-3, 1e-3, 1e-3], 3, 0.05, 0.03) is None
    assert F.lr_too_high([2.0, 1.0, 0.5, 5.0], 2.3, [], 3, 0.05, 0.03) is None  # only the first epochs count


def test_lr_too_low_on_flat_loss_and_on_tiny_update_ratios():
    assert "after 3 epoch(s)" in F.lr_too_low([2.30, 2.29, 2.28, 1.0], 2.3, [], 3, 0.1, 1e-5)
    assert F.lr_too_low([2.0, 1.5, 1.0], 2.3, [1e-7, 1e-7, 1e-7], 3, 0.1, 1e-5) is not None
    assert F.lr_too_low([2.0, 1.5, 1.0], 2.3, [1e-3, 1e-3, 1e-3], 3, 0.1, 1e-5) is None
    assert F.lr_too_low([2.2], 2.3, [], 3, 0.1, 1e-5) is not None  # one epoch ran: judged on it
    # stuck at the initial loss, a hair above it (a deep sigmoid net at chance): not learning, yet not a loss that rose
    assert "no lower than the initial 2.30257: the network is not learning" in F.lr_too_low([2.3169, 2.30271, 2.30262], 2.30257, [], 3, 0.1, 1e-5, 0.05)
    assert F.lr_too_low([2.45], 2.30257, [], 3, 0.1, 1e-5, 0.05) is None  # 6% above: it rose, lr_too_high's
    # a slow loss with weights that move at the rule of thumb or faster: a few steps an epoch, not a rate too low (QA: the README's CNN)
    assert F.lr_too_low([1.55, 1.5, 1.47], 1.63, [4e-3] * 3, 3, 0.1, 1e-5) is None
    assert F.lr_too_low([1.55, 1.5, 1.47], 1.63, [3e-4] * 3, 3, 0.1, 1e-5) is not None


def test_update_ratios_measured_where_a_schedule_ran_far_below_the_rate_are_not_judged():
    # 1 epoch of cosine: the ratio is measured on the last step, at lr ≈ 0, while the loss fell from 2.33 to 0.55
    learned = history([0.548], [0.85], val_acc=[0.95])
    learned["lr"] = [1.19e-6]
    assert "lr_too_low" in F.run_flags(learned, 2.33, CFG, {"update_ratio": [2.2e-6]})  # judged raw
    assert "lr_too_low" not in F.run_flags(learned, 2.33, CFG, {"update_ratio": [2.2e-6]}, base_lr=3e-3)
    learned["lr"] = [3e-3]  # the same ratio at the full rate is a rate too low
    assert "update/weight ratio 2.2e-06" in F.run_flags(learned, 2.33, CFG, {"update_ratio": [2.2e-6]}, base_lr=3e-3)["lr_too_low"]
    ratios = F.ratios_at_full_rate(1e-2, [1e-3, 2e-3, 3e-3], [1e-2, 9e-4, 1e-3])  # the second ran below a tenth of the rate
    assert ratios[0] == 1e-3 and math.isnan(ratios[1]) and ratios[2] == 3e-3


def test_update_ratios_of_fine_tuning_are_judged_at_the_rate_they_ran_at():
    # freeze: all for 3 epochs at lr 1e-2, then 3 fine-tuning epochs at 1% of it: only those measure a ratio.
    # Paired with the frozen epochs' full rate, ratios taken at 1e-4 read as lr_too_low (QA)
    tuned = history([0.50, 0.45, 0.42, 0.40, 0.39, 0.38], [0.85, 0.86, 0.87, 0.88, 0.88, 0.89], val_acc=[0.84, 0.85, 0.86, 0.86, 0.87, 0.87])
    tuned["lr"] = [1e-2] * 3 + [1e-4] * 3
    assert F.ratios_at_full_rate(1e-2, [3.5e-6] * 3, tuned["lr"]) == pytest.approx([math.nan] * 3, nan_ok=True)
    assert "lr_too_low" not in F.run_flags(tuned, 0.6, CFG, {"update_ratio": [3.5e-6] * 3}, base_lr=1e-2, transferred=True)
    tuned["lr"] = [1e-2] * 6  # fine-tuning at the full rate: the same ratios are a rate too low
    assert "lr_too_low" in F.run_flags(tuned, 0.6, CFG, {"update_ratio": [3.5e-6] * 3}, base_lr=1e-2, transferred=True)


def test_plateau_and_underfitting_rules():
    stalled = [2.0, 1.5, 1.2, 1.0, 1.0, 0.999, 1.0, 0.998, 0.999]
    assert F.plateau(stalled, [0.6] * 9, 5, 0.01, 0.99) is not None
    assert F.plateau(stalled, [1.0] * 9, 5, 0.01, 0.99) is None  # fits the training set: converged
    assert F.plateau([2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], [0.6] * 9, 5, 0.01, 0.99) is None
    assert F.plateau(stalled[:5], [0.6] * 5, 5, 0.01, 0.99) is None  # too short to tell
    assert "62.0%" in F.underfitting(history([1.0], [0.62], val_acc=[0.60]), 0.9, 0.05)
    assert F.underfitting(history([1.0], [0.62], val_acc=[0.40]), 0.9, 0.05) is None
    assert F.underfitting(history([1.0], [0.95], val_acc=[0.94]), 0.9, 0.05) is None


def test_run_flags_collects_and_orders_by_cause():
    exploded = history([float("nan")])
    found = F.run_flags(exploded, 2.3, CFG, n_classes=10)
    assert set(found) == {"diverged", "lr_too_high"}  # not also lr_too_low / underfitting
    flat = history([2.3] * 9, [0.1] * 9, val_acc=[0.1] * 9)
    found = F.run_flags(flat, 2.3, CFG, {"update_ratio": [1e-7] * 9}, n_classes=10)
    assert "lr_too_low" in found and "plateau" not in found and "underfitting" in found
    stats = {"act_std": [0.5, 1e-6], "act_frac_saturated": [0, 0], "act_frac_dead": [0, 0]}
    assert "vanishing_activations" in F.run_flags(history([1.0, 0.5, 0.2]), 2.3, CFG, init_stats=stats)
    dead_later = {"dead_frac/layer1": [0.0, 0.1], "dead_frac/layer2": [0.1, 0.7]}
    assert "after epoch 2" in F.run_flags(history([1.0, 0.5]), 2.3, CFG, dead_later)["dead_relu"]


# Diagnostics against formulas


def test_step_diagnostics_match_the_sgd_update_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 5)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    w0, g0 = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    before = snapshot(model)
    optimizer.step()
    found = step_diagnostics(model, before)
    # plain SGD: Δw = −lr·g, so ‖Δw‖/‖w‖ = lr·‖g‖/‖w‖
    assert found["grad_norm/0.weight"] == pytest.approx(g0.norm().item(), rel=1e-5)
    assert found["update_ratio/0.weight"] == pytest.approx(0.1 * g0.norm().item() / w0.norm().item(), rel=1e-4)
    total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
    assert found["grad_norm"] == pytest.approx(total, rel=1e-5)


def test_no_update_ratio_verdict_while_every_hidden_layer_is_frozen():
    # transfer with freeze all: only the small-started head moves, and its ratio alone flagged lr_too_high on a loss that barely moved (QA)
    from models.mlp import build_model

    model = build_model(load_config(None, ["model.hidden=[8]"]).model, 4, 3, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_step() -> dict[str, float]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
        before = snapshot(model)
        optimizer.step()
        return step_diagnostics(model, before)

    assert "update_ratio" in one_step()
    model.blocks.requires_grad_(False)
    frozen = one_step()
    assert "update_ratio" not in frozen and "update_ratio/head.weight" in frozen  # the head's own ratio is still logged
    linear = build_model(load_config(None, ["model.hidden=[]"]).model, 4, 3, seed=0)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3)
    model = linear
    assert "update_ratio" in one_step()  # a linear model has only its head: that is its ratio


def test_metric_names_follow_the_layers():
    from models.mlp import build_model

    mlp = build_model(load_config(None, ["model.hidden=[8, 8, 8]", "model.batchnorm=true"]).model, 4, 3, seed=0)
    labels = param_labels(mlp)
    assert labels["blocks.2.0.weight"] == "fc3.weight" and labels["blocks.0.1.bias"] == "bn1.bias"
    assert labels["head.weight"] == "head.weight" and len(labels) == len(list(mlp.parameters()))


def test_dead_units_are_units_zero_for_every_row():
    from models.mlp import build_model

    mlp = build_model(load_config(None, ["model.hidden=[4]"]).model, 3, 2, seed=0)
    with torch.no_grad():
        mlp.blocks[0][0].weight.copy_(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 0]]))
        mlp.blocks[0][0].bias.copy_(torch.tensor([0.0, 0.0, -10.0, 0.0]))
    X = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    # unit 1 is positive on row 1, unit 2 on row 2; unit 3 is always < 0 and unit 4 always 0: 2 of 4 dead
    assert dead_fractions(mlp.hidden_activations(X)) == [0.5]


def test_diagnostics_are_logged_per_epoch_and_do_not_change_training(one_thread):
    cfg = load_config("conf/digits_mlp.yaml", ["train.epochs=3", "train.device=cpu"])
    prepared = prepared_for(cfg)
    s = prepared.splits
    X, y, Xv, yv = to_device(s.X_train, s.y_train, s.X_val, s.y_val, device=torch.device("cpu"))
    from models.mlp import build_model

    runs = []
    for diagnose in (False, True):
        model = build_model(cfg.model, s.n_features, s.n_classes, cfg.seed)
        seen = []
        runs.append(fit(model, X, y, Xv, yv, cfg.optim, cfg.train, 3.0, cfg.seed, lambda e, m: seen.append(m) and None, diagnose))
    plain, diagnosed = runs
    assert plain.diagnostics == {}
    assert diagnosed.history == plain.history  # measuring does not perturb the run
    assert set(diagnosed.history) == set(HISTORY_KEYS)
    for key in ("grad_norm", "update_ratio", "dead_frac", "update_ratio/fc1.weight", "grad_norm/head.weight", "dead_frac/layer2"):
        assert len(diagnosed.diagnostics[key]) == 3, key
    assert set(diagnosed.diagnostics) <= set(seen[-1])  # the same numbers go to on_epoch (MLflow)
    assert 1e-4 < diagnosed.diagnostics["update_ratio"][0] < 3e-2  # Adam 1e-3 on digits: near the 1e-3 rule


# Flags on real small trainings


@pytest.mark.parametrize("overrides, vanishes", [
    ([], True),
    (["model.init=xavier"], False),
    (["model.activation=relu", "model.init=he"], False),
    (["model.batchnorm=true"], False),  # batch norm rescues the bad init: its batch statistics, not its running ones at init (0, 1)
])
def test_vanishing_activations_at_init_of_a_10_layer_mlp(overrides, vanishes):
    cfg = load_config("conf/deep_tanh_small_init.yaml", overrides)
    assert len(cfg.model.hidden) == 10
    prepared = prepared_for(cfg)
    s = prepared.splits
    report = inspect_init(cfg.model, s.n_features, s.n_classes, cfg.seed, s.X_train[:256])
    found = F.init_flags(report.layer_stats, cfg.flags)
    assert ("vanishing_activations" in found) == vanishes, found
    assert len(report.histograms) == 10 and sum(report.histograms[0][0]) == 256 * 256


def test_lr_1e_minus_7_flags_lr_too_low(one_thread):
    cfg = load_config("conf/digits_mlp.yaml", ["optim.lr=1e-7", "train.epochs=3", "train.device=cpu"])
    prepared = prepared_for(cfg)
    result, _ = train_and_test(cfg, prepared)
    found = F.run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, n_classes=prepared.splits.n_classes)
    assert "lr_too_low" in found and "lr_too_high" not in found and "diverged" not in found
    assert max(result.diagnostics["update_ratio"]) < 1e-5


@pytest.mark.parametrize("overrides, too_high", [
    (["optim.lr=3e-2"], True),  # Adam: update ratio ~2.3e-2, 2/3 of the ReLUs die
    (["optim.name=sgd", "optim.lr=1"], True),  # ~2.9e-2, the validation loss rises
    (["optim.lr=1e-2"], False),  # ~1.5e-2: high for Adam, yet its best validation accuracy here
])
def test_update_ratio_far_above_the_rule_of_thumb_flags_lr_too_high(one_thread, overrides, too_high):
    cfg = load_config("conf/digits_mlp.yaml", [*overrides, "optim.schedule=constant", "train.epochs=3", "train.device=cpu"])
    prepared = prepared_for(cfg)
    result, _ = train_and_test(cfg, prepared)
    found = F.run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, n_classes=prepared.splits.n_classes, base_lr=cfg.optim.lr)
    assert ("lr_too_high" in found) == too_high, (found, result.diagnostics["update_ratio"])


def test_wide_mlp_without_regularization_on_a_small_split_overfits(one_thread):
    cfg = load_config("conf/digits_mlp.yaml", [
        "data.val_fraction=0.9", "data.test_fraction=0.07",  # ~53 training images
        "model.hidden=[1024]", "optim.weight_decay=0", "model.dropout=0", "train.epochs=30", "train.batch_size=32", "train.device=cpu",
    ])
    prepared = prepared_for(cfg)
    result, _ = train_and_test(cfg, prepared)
    found = F.run_flags(result.history, result.initial_loss, cfg.flags, result.diagnostics, n_classes=prepared.splits.n_classes)
    assert "overfitting" in found and "underfitting" not in found
    assert result.history["train_acc"][-1] == 1.0
    assert "overfitting — increase L2" in run_report(cfg.name, found, result.history, result.initial_loss)


# Advice


def test_run_report_speaks_the_lectures_language():
    h = history([1.0, 0.2], [0.8, 1.0], val_acc=[0.8, 0.86])
    text = run_report("demo", {"overfitting": "gap 0.14", "diverged": "loss nan"}, h, 2.3, {"update_ratio": [2e-3, 5e-4]}, "diverged in epoch 2", "abc123")
    assert "training accuracy 100%, validation 86%: overfitting — increase L2" in text
    assert text.index("loss exploded") < text.index("overfitting —")  # causes before symptoms
    assert "lower the learning rate" in text and "abc123" in text and "2.0e-03" in text
    assert "No flags" in run_report("ok", {}, h, 2.3)
    stopped = run_report("cut", {}, h, float("nan"), finished=False)  # Ctrl-C'd before its first flag, initial loss never logged
    assert "the run did not finish" in stopped and "looks healthy" not in stopped and "not recorded at init" in stopped


def test_a_plateau_under_a_rate_already_decayed_to_nothing_is_not_told_to_decay_it():
    # exponential at gamma 0.1: the loss stalled from epoch 3 at lr ~1e-5 and the report said "decay the learning rate" (QA)
    stalled = history([0.9, 0.75, 0.7357, 0.7357, 0.7357, 0.7357], [0.5] * 6)
    stalled["lr"] = [1e-2 * 0.1**t for t in range(1, 7)]
    said = run_report("cut", {"plateau": "training loss stalled"}, stalled, 1.1)
    assert "by epoch 3, where the loss stopped falling, the schedule had cut the learning rate to 1e-05 from 0.001" in said
    assert "decay later or slower" in said and "decay the learning rate (" not in said
    stalled["lr"] = [1e-2] * 6  # at its full rate: decay it
    assert "decay the learning rate (`optim.schedule: step` or `cosine`)" in run_report("flat", {"plateau": "training loss stalled"}, stalled, 1.1)
    # cosine's last steps run at ~0 by design: a stall halfway, at half the rate, is not the schedule's doing (review)
    stalled["lr"] = [1e-3 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(1, 7)]
    said = run_report("cosine", {"plateau": "training loss stalled"}, stalled, 1.1)
    assert "the rate is not what stalled it" in said and "decay later" not in said and "decay the learning rate (" not in said


def test_search_advice_blames_the_range_and_reports_edges():
    lrs = [1e-4 * 1.5**i for i in range(20)]  # 1e-4 .. 2.2e-1
    trials = pd.DataFrame({
        "stage": "coarse",
        "status": ["diverged" if lr > 3e-2 else "finished" for lr in lrs],
        "val_acc": [None if lr > 3e-2 else 0.9 + i / 1000 for i, lr in enumerate(lrs)],
        "flags": ["diverged,lr_too_high" if lr > 3e-2 else "" for lr in lrs],
        "param.optim.lr": lrs,
        "param.optim.weight_decay": [1e-5, 1e-3] * 10,
    })
    text = search_advice(trials, [("optim.lr", "high")])
    # the 5 trials above 3e-2 exploded; the smallest of them has lr = 1e-4 · 1.5^15 ≈ 0.04379
    assert "loss exploded in 5 of 20 coarse trials, all with optim.lr >= 0.04379: lower the upper bound of optim.lr" in text
    assert "optim.lr: the next stage's range moved past its upper edge (the best value sat at that edge)" in text
    slow_cause = "most of the best trials barely learned (lr_too_low), the best at 0.0001: the learning rate is too low"
    moved_for_slowness = search_advice(trials, [], {"optim.lr": "high"}, {("optim.lr", "high"): slow_cause})
    assert f"optim.lr: the last stage's range should move past its upper edge ({slow_cause}): raise its upper bound in the file" in moved_for_slowness
    assert "at the upper edge" not in moved_for_slowness  # the best lr was not at the edge
    # an edge that narrowing set inside the file's range: the file's range is not what to change
    cut_short = search_advice(trials, [], {"optim.weight_decay": "high"}, {}, {"optim.weight_decay": ("loguniform(0.0002, 0.0026)", "loguniform(1e-06, 0.01)")})
    assert ("optim.weight_decay: the last stage's range should move past its upper edge (the best value sat at that edge), which narrowing set inside "
            "the file's range (loguniform(0.0002, 0.0026) of loguniform(1e-06, 0.01)): add a stage") in cut_short
    assert "in the file and search again" not in cut_short
    assert "best trial: validation accuracy" in text
    # one stage moved the range down, a later one up: both are said, each with its own cause
    down_cause = "every trial diverged: the learning rate is too high"
    both = search_advice(trials, [("optim.lr", "low"), ("optim.lr", "high")], {}, {("optim.lr", "low"): down_cause})
    assert f"optim.lr: the next stage's range moved past its lower edge ({down_cause})" in both
    assert "optim.lr: the next stage's range moved past its upper edge (the best value sat at that edge)" in both
    mixed = trials.assign(status=["diverged" if i < 2 or lr > 3e-2 else "finished" for i, lr in enumerate(lrs)])  # both ends
    assert "no single parameter range to blame" in search_advice(mixed, [])
    assert search_advice(trials.iloc[0:0], []).startswith("No trials")


def test_search_advice_blames_no_range_when_every_trial_shares_the_problem():
    slow = pd.DataFrame({
        "stage": "fine", "status": "finished", "val_acc": [0.35, 0.42, 0.33, 0.4], "flags": "lr_too_low,underfitting",
        "param.optim.lr": [2e-6, 8e-6, 3e-5, 6e-5], "param.model.activation": "tanh",  # narrowed to one choice
    })
    text = search_advice(slow, [])
    assert "lr_too_low in all 4 fine trials: the loss barely moved anywhere, so the learning-rate range is too low: raise it" in text
    assert "lower the upper bound" not in text and "drop that choice" not in text
    some = slow.assign(flags=["lr_too_low", "lr_too_low", "", ""], val_acc=[0.35, 0.33, 0.42, 0.4], **{"param.model.activation": ["tanh", "tanh", "relu", "relu"]})
    assert "lr_too_low in 2 of 4 fine trials, all with optim.lr <= 8e-06: raise the lower bound of optim.lr" in search_advice(some, [])
    # too slow at the highest rates: "lower the upper bound" would contradict the flag's own cure
    top = slow.assign(flags=["", "", "lr_too_low", "lr_too_low"])
    assert "optim.lr >=" not in search_advice(top, []) and "lower the upper bound" not in search_advice(top, [])


def test_search_advice_on_the_learning_rate_names_the_files_rate_when_it_is_not_searched():
    slow = pd.DataFrame({"stage": "c", "status": "finished", "val_acc": [0.1, 0.12], "flags": "lr_too_low", "param.optim.warmup_epochs": [0, 1]})
    text = search_advice(slow, [])
    assert "lr_too_low in all 2 c trials: the loss barely moved anywhere, so the learning rate (`optim.lr`, not searched) is too low: raise it" in text
    assert "range" not in text.split("best trial")[0]
    one = search_advice(slow[:1], [])  # a stage of one trial: the same advice, in words for one
    assert "c: 1 trial (" in one and "lr_too_low in the one c trial: the loss barely moved anywhere" in one


def test_search_advice_says_the_rate_is_too_high_when_every_trial_that_did_not_explode_has_lr_too_high():
    trials = pd.DataFrame({"stage": "c", "status": ["finished"] * 3 + ["diverged"] * 2, "val_acc": [0.3, 0.25, 0.2, None, None],
                           "flags": ["lr_too_high"] * 3 + ["diverged"] * 2, "param.optim.lr": [0.1, 0.2, 0.4, 1.0, 2.0]})
    text = search_advice(trials, [])
    assert "lr_too_high or loss exploded in all 5 c trials: the learning-rate range is too high: lower it (both bounds, 3–10×)" in text
    some = trials.assign(flags=["", "lr_too_high", "lr_too_high", "diverged", "diverged"])
    assert "lr_too_high or loss exploded in 4 of 5 c trials, all with optim.lr >= 0.2: lower the upper bound of optim.lr" in search_advice(some, [])
    # underfitting beside it: not also "a higher learning rate" (QA: the report said lower it, then raise it)
    underfit = search_advice(trials.assign(flags=["lr_too_high,underfitting"] * 3 + ["diverged"] * 2), [])
    assert "underfitting in 3 of 3 finished c trials: search bigger models or train longer." in underfit and "higher learning rate" not in underfit


def test_search_advice_weighs_flags_among_the_trials_that_trained_not_those_that_failed():
    # batch norm on batches of 1 row: the batch-1 trials failed with an error, the others barely learned (QA)
    trials = pd.DataFrame({"stage": "coarse", "status": ["failed", "finished", "failed", "finished"], "val_acc": [None, 0.12, None, 0.11],
                           "flags": ["", "lr_too_low", "", "lr_too_low"], "param.train.batch_size": [1, 2, 1, 2], "param.optim.lr": [1e-5, 2e-5, 3e-5, 4e-5]})
    text = search_advice(trials, [])
    assert "train.batch_size" not in text.split("best trial")[0]  # cutting batch sizes >= 2 off would leave only trials that fail
    assert "lr_too_low in all 2 coarse trials: the loss barely moved anywhere" in text and "2 coarse trial(s) failed with an error" in text


def test_search_advice_names_the_best_trial_as_the_search_does_pruned_or_tied():
    trials = pd.DataFrame({"stage": ["coarse", "coarse", "fine", "fine"], "status": ["finished", "pruned", "finished", "finished"],
                           "val_acc": [0.90, 0.95, 0.93, 0.93], "flags": "", "param.optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]})
    assert "best trial: validation accuracy 95.0% (coarse stage) with optim.lr = 0.002." in search_advice(trials, [])  # pruned, yet the best
    assert "1 of 2 coarse trials was pruned early" in search_advice(trials, [])
    tied = trials.assign(val_acc=[0.93, 0.90, 0.93, 0.93])
    assert "best trial: validation accuracy 93.0% (fine stage) with optim.lr = 0.004." in search_advice(tied, [])  # the latest of the tied


def test_search_advice_blames_the_learning_rate_for_a_learning_rate_flag_over_an_equally_pure_field():
    trials = pd.DataFrame({"stage": "c", "status": "finished", "val_acc": [0.1, 0.1, 0.1, 0.9], "flags": ["lr_too_low"] * 3 + [""],
                           "param.train.translate": [1, 2, 1, 0], "param.optim.lr": [1e-4, 2e-3, 5e-3, 1e-2]})
    assert "all with optim.lr <= 0.005: raise the lower bound of optim.lr" in search_advice(trials, [])


def test_search_advice_blames_the_learning_rate_for_lr_too_low_even_when_another_field_separates_the_trials_better():
    # a stage whose whole lr range is too low: 3 of 4 barely learned. Their weight decays happen to be
    # the 3 highest (a pure range by chance); their rates are the 3 lowest but one (3 of 4 trials: pure enough)
    trials = pd.DataFrame({"stage": "s2", "status": "finished", "val_acc": [0.12, 0.11, 0.13, 0.17], "flags": ["lr_too_low"] * 3 + [""],
                           "param.optim.lr": [2e-6, 9e-6, 4e-5, 5e-6], "param.optim.weight_decay": [5e-5, 1e-4, 3e-3, 1e-6]})
    text = search_advice(trials, [])
    assert "lr_too_low in 3 of 4 s2 trials, all with optim.lr <= 4e-05: raise the lower bound of optim.lr" in text
    assert "bound of optim.weight_decay" not in text


def test_search_advice_never_blames_a_range_that_holds_the_best_trial():
    # the best trial (xavier, lr 3e-5) sits among the low rates: raising lr's floor past it would cut it off; the init is to blame
    trials = pd.DataFrame({"stage": "coarse", "status": "finished", "val_acc": [0.2, 0.2, 0.97, 0.2, 0.9, 0.9, 0.85, 0.8],
                           "flags": ["lr_too_low", "lr_too_low", "", "lr_too_low", "", "", "", ""],
                           "param.optim.lr": [1e-5, 2e-5, 3e-5, 4e-5, 1e-3, 2e-3, 5e-3, 1e-2],
                           "param.model.init": ["small", "small", "xavier", "small", "xavier", "xavier", "xavier", "xavier"]})
    text = search_advice(trials, [])
    assert "lr_too_low in 3 of 8 coarse trials, all with model.init = small: drop that choice" in text
    assert "bound of optim.lr" not in text


def test_search_advice_never_cuts_off_a_best_trial_that_was_flagged_itself():
    # QA: the fine stage's winner (lr 0.025, 97%) had lr_too_high too; "lower the upper bound of optim.lr" below it would cut it off
    trials = pd.DataFrame({"stage": "fine", "status": "finished", "val_acc": [0.97, 0.30, 0.93, 0.90],
                           "flags": ["lr_too_high", "lr_too_high", "lr_too_high", ""], "param.optim.lr": [0.025, 0.0047, 0.012, 0.001],
                           "param.model.dropout": [0.49, 0.97, 0.3, 0.4]})
    text = search_advice(trials, [])
    assert "lr_too_high in 3 of 4 fine trials, the stage's best trial among them: no range to cut off." in text
    assert "bound of" not in text
    slow = trials.assign(flags=["lr_too_low", "lr_too_low", "", ""], **{"param.optim.lr": [1e-5, 2e-5, 1e-3, 1e-2]})
    assert "lr_too_low in 2 of 4 fine trials, the stage's best trial among them: no range to cut off." in search_advice(slow, [])


def test_a_loss_that_rose_is_a_rate_too_high_never_too_low():
    assert F.lr_too_low([3.47], 2.31, [], 3, 0.1, 1e-5) is None  # after 1 epoch, 50% above the initial loss
    flags = F.run_flags(history([3.47], [0.1]), 2.31, CFG)
    assert "lr_too_high" in flags and "lr_too_low" not in flags


# Real runs through the train flow, then `babysit report`


def test_sgd_lr_10_diverges_in_epoch_1_and_the_run_records_it(prefect_harness, tracking_uri, capsys):
    from flows.train import train_flow

    summary = train_flow(config="conf/digits_mlp.yaml", overrides=["optim.name=sgd", "optim.lr=10", "tracking.log_model=false"])
    assert summary.epochs_run == 1 and "diverged" in summary.flags
    run = tracking.get_run(tracking_uri, summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["babysit.status"] == "diverged"
    assert run.data.tags["babysit.stop_reason"].startswith("diverged in epoch 1")
    assert main(["report", summary.run_id]) == 0
    out = capsys.readouterr().out
    assert "**diverged**" in out and "lower the learning rate" in out and "Stopped early: diverged in epoch 1" in out


def test_deep_tanh_small_init_flags_vanishing_and_babysit_report_prints_it(prefect_harness, tracking_uri, capsys, one_thread):
    from flows.train import train_flow

    summary = train_flow(config="conf/deep_tanh_small_init.yaml", overrides=["train.epochs=2", "tracking.log_model=false"])
    assert "vanishing_activations" in summary.flags
    run = tracking.get_run(tracking_uri, summary.run_id)
    assert "vanishing_activations" in run.data.tags["babysit.flags"]
    artifacts = {a.path for a in tracking._client(tracking_uri).list_artifacts(summary.run_id)}
    assert {"report.md", "init_activations.png", "curves.png"} <= artifacts
    assert "update_ratio" in run.data.metrics and "grad_norm/fc10.weight" in run.data.metrics
    assert len(tracking.metric_history(tracking_uri, summary.run_id, "update_ratio")) == 2
    capsys.readouterr()
    assert main(["report", summary.run_id]) == 0
    out = capsys.readouterr().out
    assert "# babysit report: deep_tanh_small_init" in out
    assert "**vanishing_activations**" in out and "use Xavier init for tanh" in out


def test_babysit_report_on_an_unknown_run_exits_2_without_traceback(tracking_uri, capsys):
    assert main(["report", "0123456789abcdef"]) == 2  # no store yet
    assert "no MLflow store" in capsys.readouterr().out
    tracking.open_store(tracking_uri, "babysit")
    assert main(["report", "0123456789abcdef"]) == 2
    out = capsys.readouterr().out
    assert "no MLflow run '0123456789abcdef'" in out and "Traceback" not in out


def test_the_report_of_a_run_that_diverged_names_no_epoch_it_did_not_keep():
    blew_up = history([float("nan")], [0.47], val_acc=[0.47])
    text = run_report("x", {"diverged": "training loss became nan in epoch 1"}, blew_up, 2.3, stop_reason="diverged in epoch 1: training loss nan (initial 2.3)")
    assert "no epoch kept" in text and "best validation 47.0%" not in text
    later = history([1.0, float("nan")], [0.8, 0.3], val_acc=[0.8, 0.9])  # the epoch that blew up scored higher, yet was not kept
    assert "best validation 80.0% in epoch 1" in run_report("y", {}, later, 2.3, stop_reason="diverged in epoch 2: training loss nan (initial 2.3)")


def test_the_report_does_not_advise_raising_a_learning_rate_it_calls_too_high_and_dates_the_update_ratio():
    history = {"train_loss": [1.0, 0.9, 0.85, 0.8], "val_loss": [1.0, 0.9, 0.9, 0.9], "train_acc": [0.5, 0.55, 0.6, 0.6], "val_acc": [0.5, 0.55, 0.58, 0.6]}
    text = run_report("demo", {"lr_too_high": "update/weight ratio 7e-02", "underfitting": "training accuracy 60%"}, history, 2.3,
                      {"update_ratio": [7e-2, 6e-2]})  # measured in epochs 3-4 only: the first two trained a frozen network's head
    assert "raise the learning rate" not in text and "train longer or lower regularization" in text
    assert "Update/weight ratio 7.0e-02 in epoch 3" in text


def test_a_transferred_networks_activations_are_measured_on_the_weights_it_starts_from():
    # a trained deep tanh net put under `model.init: small` was flagged vanishing_activations from its random init (QA)
    from babysit.config import load_config
    from models.mlp import build_model
    from tasks.build import inspect_init

    deep = ["model.hidden=[64, 64, 64, 64, 64, 64]", "model.activation=tanh"]
    small, xavier = (load_config(None, [*deep, f"model.init={init}"]).model for init in ("small", "xavier"))
    source = build_model(xavier, 64, 10, seed=1).state_dict()
    X = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    assert "vanishing_activations" in F.init_flags(inspect_init(small, 64, 10, 0, X).layer_stats, CFG)
    assert "vanishing_activations" not in F.init_flags(inspect_init(small, 64, 10, 0, X, source).layer_stats, CFG)


def test_search_advice_never_cuts_off_a_range_that_holds_one_of_the_stages_top_trials():
    # QA: "lower the upper bound of optim.lr" below a flagged trial that narrowing kept among the top, where the search's best was found next
    trials = pd.DataFrame({"stage": "a", "status": "finished", "val_acc": [0.90, 0.85, 0.70, 0.60, 0.80, 0.50],
                           "flags": ["", "lr_too_high", "lr_too_high", "lr_too_high", "", ""], "param.optim.lr": [0.005, 0.03, 0.019, 0.08, 0.002, 0.0005]})
    assert "all with optim.lr >= 0.019: lower the upper bound of optim.lr" in search_advice(trials, [])  # the best trial alone is kept
    kept = search_advice(trials, [], top_k=0.25)  # the best 2 of 6, as babysit.space.narrow picks them
    assert "lr_too_high in 3 of 6 a trials, 1 of them among the stage's top trials: no range to cut off" in kept and "lower the upper bound" not in kept
    below_the_top = trials.assign(val_acc=[0.90, 0.60, 0.70, 0.55, 0.85, 0.50])  # the flagged ones all outside the top 2
    assert "all with optim.lr >= 0.019: lower the upper bound of optim.lr" in search_advice(below_the_top, [], top_k=0.25)


def test_search_advice_names_the_stage_that_moved_an_edge():
    trials = pd.DataFrame({"stage": ["g1", "g1", "g2", "g2"], "status": "finished", "val_acc": [0.5, 0.6, 0.7, 0.8], "flags": "",
                           "param.optim.lr": [1e-3, 1e-2, 1e-2, 1e-1]})
    text = search_advice(trials, [("optim.lr", "high")], moved_after={("optim.lr", "high"): "g1"})
    assert "optim.lr: after stage g1, the next stage's range moved past its upper edge" in text
