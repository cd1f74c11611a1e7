"""Transfer learning: weights copied into a new network, frozen blocks, and a real benefit."""

from __future__ import annotations

import statistics

import pytest
import torch

from babysit.config import load_config
from babysit.errors import BabysitError
from models.mlp import build_model
from models.transfer import freeze, load_source, transfer_weights
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess
from tasks.train import deployable, train_and_test


def trained(config: str, overrides: list[str]):
    cfg = load_config(config, ["train.diagnostics=false", "train.threads=1", *overrides])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    return train_and_test(cfg, prepared), prepared


def test_matching_layers_are_copied_and_the_head_is_new(tmp_path):
    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32, 16]"]).model
    source, target = build_model(cfg, 64, 5, seed=1), build_model(cfg, 64, 10, seed=2)
    copied = transfer_weights(target, source.state_dict(), "source")
    assert "head.weight" not in copied and "blocks.0.0.weight" in copied
    assert torch.equal(target.blocks[0][0].weight, source.blocks[0][0].weight) and target.head.out_features == 10
    assert freeze(target, 1) == 1
    assert not target.blocks[0][0].weight.requires_grad and target.blocks[1][0].weight.requires_grad and target.head.weight.requires_grad
    with pytest.raises(BabysitError, match="no layer of it fits"):
        transfer_weights(build_model(cfg.model_copy(update={"hidden": [7]}), 3, 2, seed=0), source.state_dict(), "source")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(BabysitError, match="junk.pt"):
        load_source(str(tmp_path / "junk.pt"))


def test_transfer_from_digits_0_to_4_beats_scratch_on_a_tenth_of_5_to_9(tmp_path):
    (_, source), prepared = trained("conf/digits_0to4_cnn.yaml", [])
    checkpoint = tmp_path / "digits_0to4.pt"
    torch.save(deployable(source, prepared).state_dict(), checkpoint)  # what babysit logs: preprocessing + network
    scratch, transfer = [], []
    for seed in range(3):
        (result, _), small = trained("conf/digits_5to9_transfer.yaml", [f"seed={seed}"])
        scratch.append(result.test_acc)
        (result, _), _ = trained("conf/digits_5to9_transfer.yaml", [f"seed={seed}", f"model.init_from={checkpoint}"])
        transfer.append(result.test_acc)
    assert len(small.splits.y_train) < 0.12 * 900  # a tenth of the 5-9 training rows
    assert statistics.mean(transfer) > statistics.mean(scratch), (transfer, scratch)


def test_init_from_a_logged_mlflow_model_through_the_train_flow(prefect_harness, tracking_uri):
    from babysit import tracking
    from flows.train import train_flow

    source = train_flow(config="conf/digits_0to4_cnn.yaml", overrides=["train.epochs=2", "train.threads=1"])
    state = load_source(f"runs:/{source.run_id}/model")
    assert any(key.startswith("1.blocks.") for key in state)  # the logged model: preprocessing, then network
    target = train_flow(config="conf/digits_5to9_transfer.yaml", overrides=[f"model.init_from=runs:/{source.run_id}/model", "model.freeze=all",
                                                                          "train.epochs=2", "train.unfreeze_epochs=2", "train.threads=1"])
    run = tracking.get_run(tracking_uri, target.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.init_from"] == f"runs:/{source.run_id}/model"
    assert len(tracking.metric_history(tracking_uri, target.run_id, "val_acc")) == 4  # 2 frozen + 2 unfrozen epochs
    with pytest.raises(BabysitError, match="init_from"):
        load_source("runs:/0123456789abcdef0123456789abcdef/model")


def test_a_trial_pruned_in_the_last_frozen_epoch_stops_before_fine_tuning(tmp_path):
    # the frozen phase's last epoch is not the training's last: the pruner's verdict there stands
    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32]", "train.diagnostics=false", "train.threads=1"])
    checkpoint = tmp_path / "source.pt"
    torch.save(build_model(cfg.model, 64, 10, seed=1).state_dict(), checkpoint)
    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32]", "train.diagnostics=false", "train.threads=1", f"model.init_from={checkpoint}",
                                               "model.freeze=1", "train.epochs=2", "train.unfreeze_epochs=2"])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    epochs = []

    def prune_at_two(epoch, metrics):
        epochs.append(epoch)
        return "pruned by test" if epoch == 2 else None

    result, _ = train_and_test(cfg, prepared, prune_at_two)
    assert epochs == [1, 2] and result.epochs_run == 2 and result.stop_reason == "pruned by test"
    result, _ = train_and_test(cfg, prepared, lambda epoch, metrics: "pruned by test" if epoch == 4 else None)
    assert result.epochs_run == 4 and result.stop_reason is None  # the last epoch of all: trained in full
