"""Pruner rules at their boundaries: the median rule's warmup and its strict "below", and the
size of ASHA's top 1/eta at a rung."""

from __future__ import annotations

from babysit.pruning import Pruner


def test_median_pruner_judges_no_epoch_before_its_warmup():
    # warmup 3: epochs 1 and 2 are too early to tell (a slow starter may catch up), epoch 3 is judged
    pruner = Pruner("median", warmup=3)
    pruner.replay([0.9, 0.9, 0.9])  # two peers at each epoch
    pruner.replay([0.8, 0.8, 0.8])
    assert pruner.report(1, 0.1) is None  # far below the median 0.85, but before the warmup
    assert pruner.report(2, 0.1) is None
    verdict = pruner.report(3, 0.1)
    assert verdict is not None and verdict.startswith("pruned in epoch 3")


def test_median_pruner_keeps_a_trial_exactly_at_the_median():
    # the rule is "below the median": a trial level with it is as good as half its peers
    pruner = Pruner("median", warmup=1)
    pruner.replay([0.4])
    pruner.replay([0.6])
    assert pruner.report(1, 0.5) is None  # median(0.4, 0.6) = 0.5
    assert pruner.report(1, 0.75) is None
    pruner = Pruner("median", warmup=1)
    pruner.replay([0.4])
    pruner.replay([0.6])
    assert pruner.report(1, 0.4999) is not None


def test_asha_keeps_exactly_the_top_third_at_a_rung():
    # eta 3: of 3 trials at a rung only the best goes on, of 6 the best 2 (pruned trials still count)
    pruner = Pruner("asha", eta=3)
    assert pruner.report(1, 0.9) is None and pruner.report(1, 0.5) is None  # the first eta − 1 pass
    verdict = pruner.report(1, 0.7)  # second of {0.9, 0.5, 0.7}: not the top one
    assert verdict is not None and "cut-off 0.900" in verdict
    assert pruner.report(1, 0.95) is None  # the best of 4: kept
    assert pruner.report(1, 0.3) is not None  # 5 trials: still only the best (5 // 3 = 1)
    verdict = pruner.report(1, 0.8)  # third of {0.95, 0.9, 0.8, 0.7, 0.5, 0.3}: the top 2 go on, not it
    assert verdict is not None and "cut-off 0.900" in verdict
    assert pruner.report(1, 0.92) is None  # second of 7 (7 // 3 = 2): kept


def test_median_pruner_judges_a_trial_by_its_best_so_far():
    # QA: a fine trial tied for the stage's best score was pruned in epoch 26 for one noisy epoch
    # below the median; Optuna's MedianPruner compares the trial's best intermediate value
    pruner = Pruner("median", warmup=1)
    pruner.replay([0.90, 0.95])
    pruner.replay([0.92, 0.96])
    assert pruner.report(2, 0.90, best=0.99) is None  # this epoch 0.90 < median 0.955, but it reached 0.99
    verdict = pruner.report(2, 0.90, best=0.93)  # its best is below the median too
    assert verdict is not None and "best val acc so far 0.930" in verdict
    assert pruner.report(2, 0.50) is not None  # without a best: this epoch's
