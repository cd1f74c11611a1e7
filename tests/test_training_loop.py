"""The training loop's mechanics, observed on real digits training: train/eval modes, the epoch's
loss, the scheduled learning rate reaching the optimizer, the overfit check without
regularization, and transfer learning's two phases (which weights train, at what rate, which are kept)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from babysit.config import Config, load_config
from models.mlp import build_model
from tasks.check import overfit_tiny_subset
from tasks.preprocess import Prepared
from tasks.train import evaluate, fit, train_and_test


def config(*overrides: str) -> Config:
    # one torch thread and no diagnostics: small, fast models on a shared 2-core machine
    return load_config(None, ["train.device=cpu", "train.threads=1", "train.diagnostics=false", "model.hidden=[32]", *overrides])


def tensors(prepared: Prepared, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = prepared.splits
    return torch.as_tensor(getattr(s, f"X_{split}")), torch.as_tensor(getattr(s, f"y_{split}"))


# --- train mode while training, eval mode while evaluating ---------------------------------------


def test_training_runs_in_train_mode_so_batchnorm_tracks_every_step(digits):
    # BatchNorm updates its running statistics only in train mode: after one epoch it has counted
    # every training step and its running mean has moved off its initial 0
    batch = 100
    result, model = train_and_test(config("model.batchnorm=true", "train.epochs=1", f"train.batch_size={batch}"), digits, test=False)
    n = len(digits.splits.y_train)
    steps = -(-n // batch) - (1 if n % batch == 1 else 0)  # a last batch of one row joins the one before
    bn = model.blocks[0][1]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    assert result.best_epoch == 1  # the kept weights (and buffers) are those after the epoch
    assert int(bn.num_batches_tracked) == steps
    assert bn.running_mean.abs().max() > 1e-3


def test_training_runs_in_train_mode_so_dropout_is_active(digits):
    # a trained network, given dropout 0.5 and trained one more epoch at lr 1e-12 (its weights stay
    # put): with units dropped, the epoch's training loss and accuracy are clearly worse than the
    # same weights score on the same rows in eval mode. Trained in eval mode they would be equal.
    _, trained = train_and_test(config("model.hidden=[64]", "train.epochs=3", "optim.lr=3e-3"), digits, test=False)
    clean_loss, clean_acc = evaluate(trained, *tensors(digits, "train"))
    cfg = config("model.hidden=[64]", "model.dropout=0.5", "optim.lr=1e-12", "train.epochs=1")
    model = build_model(cfg.model, 64, 10, seed=0)
    model.load_state_dict(trained.state_dict())  # dropout has no parameters: the same keys
    result = fit(model, *tensors(digits, "train"), *tensors(digits, "val"), cfg.optim, cfg.train, cfg.flags.diverge_factor, cfg.seed)
    assert result.initial_loss == pytest.approx(clean_loss, rel=1e-6)  # evaluated in eval mode: no dropout
    assert result.history["train_loss"][0] > 1.3 * clean_loss, (result.history["train_loss"], clean_loss)
    assert result.history["train_acc"][0] < clean_acc - 0.04, (result.history["train_acc"], clean_acc)


def test_evaluate_switches_a_model_left_in_train_mode_to_eval_mode(digits):
    # a model with dropout 0.5 handed over in train mode: evaluate turns dropout off, so two calls
    # agree, and they match the loss and accuracy computed by hand in eval mode
    model = build_model(config("model.dropout=0.5").model, 64, 10, seed=0)
    X, y = tensors(digits, "val")
    first = evaluate(model.train(), X, y)
    second = evaluate(model.train(), X, y)
    assert first == second
    assert not model.training
    with torch.no_grad():
        logits = model.eval()(X)
    assert first[0] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert first[1] == (logits.argmax(1) == y).sum().item() / len(y)


# --- the epoch's training loss ---------------------------------------------------------------------


def test_epoch_train_loss_weights_each_batch_by_its_rows(digits):
    # the weights barely move at lr 1e-12, so the epoch's training loss is the initial loss over
    # the same rows, provided each batch's mean counts by its row count: the ragged last batch
    # (a few rows) must not count as much as a full one
    n = len(digits.splits.y_train)
    batch = next(b for b in range(200, n) if 2 <= n % b <= 8)  # a last batch of 2-8 rows
    result, _ = train_and_test(config("optim.lr=1e-12", "train.epochs=1", f"train.batch_size={batch}"), digits, test=False)
    assert result.history["train_loss"][0] == pytest.approx(result.initial_loss, rel=1e-5)


# --- the learning-rate schedule reaches the optimizer ----------------------------------------------


def test_scheduled_learning_rate_is_what_the_optimizer_steps_with(digits):
    # plain SGD, step decay ×0.1 every epoch: each epoch moves the weights about a tenth as far as
    # the one before (the gradients change little at this small rate); an optimizer left at the
    # base rate would move them about as far every epoch
    cfg = config("optim.name=sgd", "optim.lr=0.01", "optim.schedule=step", "optim.step_epochs=1", "optim.gamma=0.1", "train.epochs=3")
    model = build_model(cfg.model, 64, 10, seed=0)
    weights = [model.blocks[0][0].weight.detach().clone()]

    def record(epoch, metrics):
        weights.append(model.blocks[0][0].weight.detach().clone())

    result = fit(model, *tensors(digits, "train"), *tensors(digits, "val"), cfg.optim, cfg.train, cfg.flags.diverge_factor, cfg.seed, record)
    assert result.history["lr"] == pytest.approx([0.01, 0.001, 0.0001])
    moves = [(after - before).norm().item() for before, after in zip(weights, weights[1:])]
    assert moves[1] / moves[0] == pytest.approx(0.1, rel=0.5), moves
    assert moves[2] / moves[1] == pytest.approx(0.1, rel=0.5), moves


# --- the pre-flight overfit check turns regularization off ----------------------------------------


def test_overfit_check_ignores_the_configured_dropout(digits):
    # the lecture overfits a tiny subset with regularization off: a config with dropout 0.5 is
    # checked exactly as the same config without dropout (same curve, same verdict)
    with_dropout = overfit_tiny_subset(config("model.dropout=0.5", "optim.lr=1e-2"), digits, budget_epochs=30)
    without = overfit_tiny_subset(config("model.dropout=0.0", "optim.lr=1e-2"), digits, budget_epochs=30)
    assert with_dropout.curve == without.curve
    assert with_dropout.passed == without.passed


# --- transfer learning: the frozen phase, then fine-tuning ---------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A state-dict file for model.init_from: a random [32] MLP (its weights are what we track)."""
    path = tmp_path_factory.mktemp("source") / "source.pt"
    state = build_model(config().model, 64, 10, seed=1).state_dict()
    torch.save(state, path)
    return str(path), state


def transfer(source_path: str, *overrides: str) -> Config:
    return config(f"model.init_from={source_path}", "model.freeze=1", "train.epochs=2", "train.unfreeze_epochs=2", *overrides)


def stop_after(last: int):
    """on_epoch that stops training after epoch `last`: here, the last frozen epoch (a pruned trial)."""
    return lambda epoch, metrics: "stopped by test" if epoch == last else None


def test_fine_tuning_trains_the_frozen_block_after_the_frozen_epochs(digits, source):
    path, state = source
    cfg = transfer(path, "train.epochs=1", "train.unfreeze_epochs=3", "train.unfreeze_lr_factor=1")
    # phase 1 alone (stopped after it): the frozen block is the source's, untouched
    frozen_only, model = train_and_test(cfg, digits, stop_after(1), test=False)
    assert frozen_only.epochs_run == 1
    assert torch.equal(model.blocks[0][0].weight, state["blocks.0.0.weight"])
    # both phases: training every layer from random features beats training the head alone, and the
    # kept weights of the first block have moved
    result, model = train_and_test(cfg, digits, test=False)
    assert result.epochs_run == 4
    assert result.best_epoch > 1, "precondition: a fine-tuned epoch is the best"
    assert not torch.equal(model.blocks[0][0].weight, state["blocks.0.0.weight"])


def test_fine_tuning_runs_at_lr_times_unfreeze_lr_factor(digits, source):
    path, _ = source
    result, _ = train_and_test(transfer(path, "optim.lr=2e-3", "train.unfreeze_lr_factor=0.1"), digits, test=False)
    assert result.history["lr"] == pytest.approx([2e-3, 2e-3, 2e-4, 2e-4])


def test_a_fine_tune_that_does_not_beat_the_frozen_phase_is_discarded(digits, source):
    # at 1e-6 × the rate the fine-tuned epochs change the weights a little but not the validation
    # accuracy: not better than the frozen phase, so the model is the frozen phase's best, exactly
    path, _ = source
    cfg = transfer(path, "train.unfreeze_lr_factor=1e-6")
    frozen_only, frozen_model = train_and_test(cfg, digits, stop_after(2), test=False)
    result, model = train_and_test(cfg, digits, test=False)
    assert result.epochs_run == 4 and result.stop_reason is None
    assert max(result.history["val_acc"][2:]) <= max(result.history["val_acc"][:2]), "precondition: fine-tuning did not help"
    assert result.best_epoch == frozen_only.best_epoch <= 2
    assert result.best_val_acc == frozen_only.best_val_acc
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), frozen_model.state_dict().values()))
    assert evaluate(model, *tensors(digits, "val"))[1] == pytest.approx(frozen_only.best_val_acc, abs=1e-12)


def test_batch_bounds_cover_every_row_once_and_never_leave_a_batch_of_one():
    from tasks.train import batch_bounds

    assert batch_bounds(64, 32) == [(0, 32), (32, 64)]
    assert batch_bounds(65, 32) == [(0, 32), (32, 65)]  # BatchNorm cannot normalise one row: it joins the batch before
    assert batch_bounds(66, 32) == [(0, 32), (32, 64), (64, 66)]
    assert batch_bounds(1, 32) == [(0, 1)]  # a single batch stays, whatever its size


# --- the loss training starts from; transfer learning's phases ----------------------------------


def test_the_starting_loss_of_a_batchnorm_net_is_its_first_steps_loss_and_leaves_its_statistics(digits):
    # unpreprocessed-scale inputs: in eval mode a fresh BatchNorm (running mean 0, variance 1) passes
    # them through unnormalised and the loss was 178 for a true 2.3, hiding a divergence to 140 (QA)
    from tasks.train import starting_loss

    cfg = config("model.batchnorm=true")
    model = build_model(cfg.model, digits.splits.input_shape, digits.splits.n_classes, cfg.seed)
    X, y = tensors(digits, "train")
    X = X * 100
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert evaluate(model, X, y)[0] > 10
    assert starting_loss(model, X, y, cfg.train.batch_size) == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=0.1)
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert not model.training


def source_weights(digits, *overrides: str) -> dict[str, torch.Tensor]:
    """A network trained on digits: what model.init_from would read."""
    _, model = train_and_test(config("train.epochs=8", *overrides), digits, test=False)  # the later train.epochs wins
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fine_tuning_with_dropout_is_not_called_diverged_against_the_trained_models_loss(digits):
    # fine-tuning judged divergence against the trained model's loss in eval mode (0.02); its training
    # loss with dropout on (0.15) was "diverged in epoch 1" and 9 of 10 fine-tuning epochs never ran (QA)
    source = source_weights(digits, "model.hidden=[256, 256]", "train.epochs=10")
    cfg = config("model.hidden=[256, 256]", "model.dropout=0.7", "model.init_from=source.pt", "model.freeze=all", "train.epochs=3", "train.unfreeze_epochs=4")
    result, _ = train_and_test(cfg, digits, test=False, source=source)
    assert result.stop_reason is None and result.epochs_run == 7


def test_early_stopping_in_the_frozen_phase_goes_on_to_fine_tuning(digits):
    # the frozen phase's early stop ended the whole run: fine-tuning never ran (QA)
    source = source_weights(digits, "model.hidden=[64]")
    cfg = config("model.hidden=[64]", "model.init_from=source.pt", "model.freeze=all", "train.epochs=40", "train.early_stopping_patience=2",
                 "train.unfreeze_epochs=3", "train.unfreeze_lr_factor=0.1")
    result, _ = train_and_test(cfg, digits, test=False, source=source)
    frozen_epochs = result.epochs_run - 3
    assert frozen_epochs < 40  # it stopped early ...
    assert result.history["lr"][frozen_epochs:] == pytest.approx([0.1 * cfg.optim.lr] * 3)  # ... and fine-tuned after


def test_frozen_batchnorm_layers_keep_the_sources_running_statistics(digits):
    # freezing stopped the gradients, but the frozen BatchNorm layers went on updating their running
    # statistics on the new data (up to 0.34 off the source's): frozen features moved (QA)
    source = source_weights(digits, "model.hidden=[64, 32]", "model.batchnorm=true")
    cfg = config("model.hidden=[64, 32]", "model.batchnorm=true", "model.init_from=source.pt", "model.freeze=1", "train.epochs=2")
    _, model = train_and_test(cfg, digits, test=False, source=source)
    frozen, trained = model.blocks[0][1], model.blocks[1][1]
    assert torch.equal(frozen.running_mean, source["blocks.0.1.running_mean"]) and torch.equal(frozen.running_var, source["blocks.0.1.running_var"])
    assert not torch.equal(trained.running_mean, source["blocks.1.1.running_mean"])  # the block that trains tracks the new data


def test_a_pruners_verdict_in_the_frozen_phase_stands_when_early_stopping_fires_in_the_same_epoch(digits):
    # early stopping ended the frozen phase first and dropped the verdict: the pruned trial went on to fine-tune (review)
    source = source_weights(digits, "model.hidden=[64]")
    cfg = config("model.hidden=[64]", "model.init_from=source.pt", "model.freeze=all", "train.epochs=6", "train.unfreeze_epochs=3",
                 "train.early_stopping_patience=1", "optim.lr=1e-12")  # nothing improves after epoch 1: early stopping fires in epoch 2
    seen = []

    def prune_at_two(epoch, metrics):
        seen.append(epoch)
        return "pruned: below the median" if epoch == 2 else None

    result, _ = train_and_test(cfg, digits, prune_at_two, test=False, source=source)
    assert seen == [1, 2] and result.stop_reason == "pruned: below the median"
