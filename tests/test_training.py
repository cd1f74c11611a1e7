"""The training loop on real data: it learns, records one value per epoch, keeps the best weights, stops when it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from babysit.config import Config, load_config
from babysit.flags import diverged
from models.mlp import build_model
from tasks.data import load_splits
from tasks.preprocess import Prepared
from tasks.train import HISTORY_KEYS, deployable, evaluate, train_and_test


def config(*overrides: str) -> Config:
    # one torch thread: on a small shared CPU, two spinning threads slow these tiny models down
    return load_config(None, ["train.device=cpu", "train.threads=1", *overrides])


@pytest.fixture(scope="module")
def default_run(digits):
    """The default config (256-256 ReLU MLP, He init, Adam 1e-3) for 3 epochs."""
    return train_and_test(config("train.epochs=3"), digits)


def tensors(prepared: Prepared, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = prepared.splits
    return torch.as_tensor(getattr(s, f"X_{split}")), torch.as_tensor(getattr(s, f"y_{split}"))


def test_default_config_learns_digits(default_run):
    result, _ = default_run
    assert result.best_val_acc > 0.9
    assert result.test_acc > 0.85
    assert result.stop_reason is None and result.epochs_run == 3
    # training lowered the loss well below its starting point
    assert result.history["train_loss"][-1] < 0.5 * result.initial_loss


def test_history_has_one_value_per_epoch(default_run):
    result, _ = default_run
    assert set(result.history) == set(HISTORY_KEYS) == {"train_loss", "train_acc", "val_loss", "val_acc", "lr"}
    for key in HISTORY_KEYS:
        assert len(result.history[key]) == 3, key
        assert all(math.isfinite(v) for v in result.history[key])
    assert all(0 <= a <= 1 for a in result.history["train_acc"] + result.history["val_acc"])
    assert result.history["lr"] == [pytest.approx(1e-3)] * 3  # constant schedule


def test_initial_loss_is_ln_classes(default_run, digits):
    result, _ = default_run
    assert result.initial_loss == pytest.approx(math.log(10), abs=0.1)
    # and it is the fresh model's mean cross-entropy on the training split
    fresh = build_model(config().model, 64, 10, seed=0).eval()
    X, y = tensors(digits, "train")
    with torch.no_grad():
        probs = torch.softmax(fresh(X).double(), dim=1).numpy()
    assert result.initial_loss == pytest.approx(log_loss(y.numpy(), probs, labels=list(range(10))), rel=1e-4)


def test_evaluate_matches_sklearn(default_run, digits):
    _, model = default_run
    X, y = tensors(digits, "val")
    with torch.no_grad():
        logits = model.eval()(X)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    loss, acc = evaluate(model, X, y, chunk=50)  # chunked: 270 rows in 6 chunks
    assert acc == pytest.approx(accuracy_score(y.numpy(), logits.argmax(1).numpy()))
    assert loss == pytest.approx(log_loss(y.numpy(), probs, labels=list(range(10))), rel=1e-4)


def test_test_metrics_are_of_the_kept_weights(default_run, digits):
    result, model = default_run
    test_loss, test_acc = evaluate(model, *tensors(digits, "test"))
    assert (result.test_loss, result.test_acc) == pytest.approx((test_loss, test_acc))


def test_best_validation_weights_are_restored(digits):
    # Adam at 0.05 is noisy: validation accuracy peaks before the last epoch
    result, model = train_and_test(config("model.hidden=[64]", "optim.lr=0.05", "train.epochs=8"), digits)
    val_acc = result.history["val_acc"]
    assert result.epochs_run == 8
    assert result.best_epoch == int(np.argmax(val_acc)) + 1
    assert result.best_epoch < result.epochs_run, "precondition: the last epoch is not the best one"
    assert val_acc[-1] < max(val_acc)
    assert result.best_val_acc == max(val_acc)
    _, acc_now = evaluate(model, *tensors(digits, "val"))
    assert acc_now == pytest.approx(result.best_val_acc, abs=1e-12)


def test_huge_sgd_learning_rate_diverges_and_stops(digits):
    result, _ = train_and_test(config("optim.name=sgd", "optim.lr=10", "train.epochs=6", "model.hidden=[64]"), digits)
    assert result.stop_reason is not None and "diverged" in result.stop_reason
    assert result.epochs_run < 6
    assert len(result.history["val_acc"]) == result.epochs_run
    assert diverged(result.history["train_loss"], result.initial_loss, 3.0) is not None
    # diverged in its first epoch, it kept no epoch: the model is tested as it started, not with the weights that blew up
    first, model = train_and_test(config("optim.name=sgd", "optim.lr=50", "optim.schedule=constant", "train.epochs=3", "model.hidden=[64]"), digits)
    assert first.epochs_run == 1 and first.best_epoch == 0 and math.isnan(first.best_val_acc)
    fresh = build_model(config("model.hidden=[64]").model, digits.splits.input_shape, digits.splits.n_classes, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_early_stopping_on_a_plateau(digits):
    # lr 1e-7: the weights barely move, so validation accuracy never improves after epoch 1
    result, _ = train_and_test(config("optim.lr=1e-7", "train.epochs=10", "train.early_stopping_patience=2", "model.hidden=[64]"), digits)
    assert result.stop_reason is not None and "early stopping" in result.stop_reason
    assert result.epochs_run < 10
    assert result.epochs_run == result.best_epoch + 2


def test_no_early_stopping_without_patience(digits):
    result, _ = train_and_test(config("optim.lr=1e-7", "train.epochs=4", "model.hidden=[16]"), digits)
    assert result.epochs_run == 4 and result.stop_reason is None


def test_on_epoch_sees_each_epoch_and_may_stop(digits):
    seen = []

    def on_epoch(epoch, metrics):
        seen.append((epoch, dict(metrics)))
        return "pruned by test" if epoch == 2 else None

    result, _ = train_and_test(config("model.hidden=[32]", "train.epochs=5"), digits, on_epoch)
    assert [e for e, _ in seen] == [1, 2]
    assert result.stop_reason == "pruned by test" and result.epochs_run == 2
    for key in HISTORY_KEYS:
        assert [m[key] for _, m in seen] == result.history[key]


def test_a_stop_asked_for_after_the_last_epoch_is_no_early_stop(digits):
    # a trial "pruned" in its last epoch, or early-stopped there, trained every epoch: it finished
    result, _ = train_and_test(config("model.hidden=[16]", "train.epochs=2"), digits, lambda epoch, metrics: "pruned by test" if epoch == 2 else None)
    assert result.epochs_run == 2 and result.stop_reason is None
    result, _ = train_and_test(config("optim.lr=1e-7", "train.epochs=3", "train.early_stopping_patience=2", "model.hidden=[64]"), digits)  # a plateau, as above
    assert result.epochs_run == 3 and result.stop_reason is None


def test_recorded_lr_follows_the_schedule(digits):
    # step decay every epoch by 0.5: epoch e trains at lr · 0.5^(e-1) throughout
    result, _ = train_and_test(config("model.hidden=[16]", "train.epochs=4", "optim.schedule=step", "optim.step_epochs=1", "optim.gamma=0.5", "optim.lr=0.01"), digits)
    assert result.history["lr"] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])


def test_same_seed_same_history_other_seed_other_history(digits):
    overrides = ("model.hidden=[32]", "train.epochs=3", "model.dropout=0.2")
    a, _ = train_and_test(config(*overrides), digits)
    b, _ = train_and_test(config(*overrides), digits)
    c, _ = train_and_test(config(*overrides, "seed=1"), digits)
    assert a.history == b.history and a.initial_loss == b.initial_loss
    assert a.history["train_loss"] != c.history["train_loss"]


def test_batchnorm_and_dropout_train(digits):
    result, _ = train_and_test(config("model.hidden=[64, 64]", "model.batchnorm=true", "model.dropout=0.2", "train.epochs=3", "optim.lr=1e-2"), digits)
    assert result.best_val_acc > 0.85


def test_deployable_model_takes_raw_inputs(default_run, digits):
    result, model = default_run
    cfg = Config()
    raw = load_splits(cfg.data, 0)
    with torch.no_grad():
        logits = deployable(model, digits)(torch.as_tensor(raw.X_test))
    assert accuracy_score(raw.y_test, logits.argmax(1).numpy()) == pytest.approx(result.test_acc, abs=1e-9)


def test_batchnorm_trains_when_the_last_batch_would_hold_one_row(digits):
    n = len(digits.splits.y_train)
    batch = next(b for b in range(8, n) if n % b == 1)  # the training rows leave one over
    result, _ = train_and_test(config("model.hidden=[32]", "model.batchnorm=true", f"train.batch_size={batch}", "train.epochs=2"), digits)
    assert result.epochs_run == 2 and result.best_val_acc > 0.5  # BatchNorm cannot normalise one row: it joined the batch before


def test_dropout_trials_in_threads_match_trials_alone(digits):
    """Trials training at once in threads (search.runner: threads) each give what they give alone:
    dropout's masks do not come from torch's global generator, which the threads would share."""
    from concurrent.futures import ThreadPoolExecutor

    configs = [config("train.epochs=2", "model.dropout=0.5", "model.hidden=[64]", f"seed={seed}") for seed in (1, 2)]
    alone = [train_and_test(cfg, digits, test=False)[0].history for cfg in configs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda cfg: train_and_test(cfg, digits, test=False)[0].history, configs))
    assert together == alone
