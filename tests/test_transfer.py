"""Transfer learning: weights copied into a new network, frozen blocks, and a real benefit."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch

from babysit.config import load_config
from babysit.errors import BabysitError
from models.mlp import build_model
from models.transfer import freeze, load_source, transfer_tags, transfer_weights
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess
from tasks.train import deployable, train_and_test


ROOT = Path(__file__).resolve().parents[1]


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
        load_source(str(tmp_path / "junk.pt"), f"sqlite:///{tmp_path}/unused.db")  # a file: the store is not asked
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(BabysitError, match=r"tensor.pt: expected a state dict .*got Tensor"):
        load_source(str(tmp_path / "tensor.pt"), f"sqlite:///{tmp_path}/unused.db")


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
    state = load_source(f"runs:/{source.run_id}/model", tracking_uri)
    assert any(key.startswith("1.blocks.") for key in state)  # the logged model: preprocessing, then network
    target = train_flow(config="conf/digits_5to9_transfer.yaml", overrides=[f"model.init_from=runs:/{source.run_id}/model", "model.freeze=all",
                                                                          "train.epochs=2", "train.unfreeze_epochs=2", "train.threads=1"])
    run = tracking.get_run(tracking_uri, target.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.init_from"] == f"runs:/{source.run_id}/model"
    assert len(tracking.metric_history(tracking_uri, target.run_id, "val_acc")) == 4  # 2 frozen + 2 unfrozen epochs
    with pytest.raises(BabysitError, match="init_from"):
        load_source("runs:/0123456789abcdef0123456789abcdef/model", tracking_uri)


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


@pytest.fixture
def fresh_process(monkeypatch):
    """MLflow as a new `babysit train` process finds it: no $MLFLOW_TRACKING_URI and no
    process-wide tracking URI (both restored after the test). Call it again to start afresh."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-test")  # so that teardown puts back what was there
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)

    def afresh():
        mlflow.set_tracking_uri(None)  # forgets the URI log_torch_model set, as a new process would
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    afresh()
    return afresh


@pytest.mark.parametrize("store", ["default", "configured"])
def test_init_from_a_runs_uri_reads_the_runs_own_store_not_mlflows_default(prefect_harness, fresh_process, tmp_path, monkeypatch, store):
    # QA: the README's two transfer commands, each a fresh process, failed with "Run ... not found":
    # the model was looked up in MLflow's default ./mlflow.db, which the lookup then left behind
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from babysit import tracking
    from flows.train import train_flow

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    overrides = [] if store == "default" else [f"tracking.uri=sqlite:///{tmp_path}/elsewhere/mlflow.db"]  # as --set tracking.uri=sqlite:////tmp/x.db
    uri = tracking.DEFAULT_URI if store == "default" else overrides[0].removeprefix("tracking.uri=")
    source = train_flow(config=str(ROOT / "conf/digits_0to4_cnn.yaml"), overrides=[*overrides, "train.epochs=1", "train.threads=1", "train.diagnostics=false"])
    fresh_process()  # the second command of the README
    target = train_flow(config=str(ROOT / "conf/digits_5to9_transfer.yaml"),
                        overrides=[*overrides, f"model.init_from=runs:/{source.run_id}/model", "train.epochs=1", "train.threads=1", "train.diagnostics=false"])
    assert source.tracking_uri == target.tracking_uri == uri
    transferred = tracking.get_run(uri, target.run_id)
    assert transferred.info.status == "FINISHED"
    copied, of = transferred.data.tags["babysit.transfer.copied"].removesuffix(" tensors").split(" of ")  # what came from init_from, on the run
    assert 0 < int(copied) < int(of) and "head." in transferred.data.tags["babysit.transfer.fresh"]
    fresh_process()
    state = load_source(f"runs:/{source.run_id}/model", uri)
    assert torch.equal(state["1.blocks.0.0.weight"], logged_state(uri, source.run_id)["1.blocks.0.0.weight"])
    assert "MLFLOW_TRACKING_URI" not in os.environ and tracking_utils._tracking_uri is None  # loading set nothing process-wide
    assert not (work / "mlflow.db").exists(), "a stray MLflow store appeared in the working directory"
    with pytest.raises(BabysitError, match=r"init_from.*does not exist yet"):  # a store never made: asking it does not create it
        load_source(f"runs:/{source.run_id}/model", f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    assert not (tmp_path / "nowhere").exists()


def logged_state(uri: str, run_id: str) -> dict[str, torch.Tensor]:
    """The run's logged model, found through MLflow's client on `uri` and loaded from its artifact
    folder: the reference the transfer's source is compared with."""
    import mlflow.pytorch
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (logged,) = client.search_logged_models([client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return mlflow.pytorch.load_model(logged.artifact_location, map_location="cpu").state_dict()


def test_a_batchnorm_cnn_of_other_widths_is_refused_not_trained_from_scratch(tmp_path):
    # QA: BatchNorm's shape-less num_batches_tracked counters "fitted" any widths, so channels
    # [8, 16] from a [16, 32] CNN trained from scratch without a word
    (_, source), prepared = trained("conf/digits_0to4_cnn.yaml", ["train.epochs=2"])
    checkpoint = tmp_path / "digits_0to4.pt"
    torch.save(deployable(source, prepared).state_dict(), checkpoint)
    with pytest.raises(BabysitError, match=r"`model.init_from` .*digits_0to4.pt: no layer of it fits .*blocks.0.0.weight \(16, 1, 3, 3\)"):
        trained("conf/digits_5to9_transfer.yaml", [f"model.init_from={checkpoint}", "model.channels=[8, 16]", "train.epochs=1"])
    # the first stage fits, the second does not: its weights and running statistics come across, no counter does
    cfg = load_config("conf/digits_5to9_transfer.yaml", [f"model.init_from={checkpoint}", "model.channels=[16, 24]"]).model
    target = build_model(cfg, (1, 8, 8), 5, seed=3)
    copied = transfer_weights(target, torch.load(checkpoint, weights_only=True), str(checkpoint))
    reference = source.state_dict()
    assert copied == sorted(k for k, v in reference.items() if k.startswith("blocks.0.") and v.is_floating_point())
    assert "blocks.0.1.running_var" in copied and torch.equal(target.state_dict()["blocks.0.1.running_var"], reference["blocks.0.1.running_var"])
    assert not any(k.endswith("num_batches_tracked") for k in copied)
    tags = transfer_tags(target, copied)
    fresh = tags["babysit.transfer.fresh"].split(",")
    assert tags["babysit.transfer.copied"] == f"{len(copied)} of {len(copied) + len(fresh)} tensors"
    assert {"head.weight", "head.bias", "blocks.1.0.weight", "blocks.1.1.running_mean"} <= set(fresh)
    # freezing the block that did not fit would keep it random for the whole run: refused; the one that fit may freeze
    with pytest.raises(BabysitError, match=r"`model.freeze` 2 block\(s\): blocks.1.0.weight, .* did not fit any tensor .*freeze fewer blocks"):
        trained("conf/digits_5to9_transfer.yaml", [f"model.init_from={checkpoint}", "model.channels=[16, 24]", "model.freeze=all", "train.epochs=1"])
    result, _ = trained("conf/digits_5to9_transfer.yaml", [f"model.init_from={checkpoint}", "model.channels=[16, 24]", "model.freeze=1", "train.epochs=1"])[0]
    assert result.transfer["babysit.transfer.copied"] == tags["babysit.transfer.copied"]


def test_an_init_from_file_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(BabysitError, match=rf"`model.init_from` {tmp_path}/missing.pt: no such file"):  # not MLflow's "No such artifact" from /tmp
        load_source(str(tmp_path / "missing.pt"), f"sqlite:///{tmp_path}/mlflow.db")


def test_an_init_from_in_storage_this_machine_cannot_read_is_one_paragraph(tmp_path):
    from babysit import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri, "transfer")
    with pytest.raises(BabysitError, match=r"`model.init_from` s3://bucket/x/model: "):  # was ModuleNotFoundError: botocore, three tracebacks
        load_source("s3://bucket/x/model", uri)


def test_freeze_must_be_a_count_of_existing_blocks_of_a_transferred_model(tmp_path):
    checkpoint = tmp_path / "source.pt"
    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32, 16]"])
    torch.save(build_model(cfg.model, 64, 10, seed=1).state_dict(), checkpoint)
    with pytest.raises(BabysitError, match=r"`model.freeze`: expected all, none or a number of first hidden blocks >= 0 \(got -1\)"):
        load_config("conf/digits_mlp.yaml", [f"model.init_from={checkpoint}", "model.freeze=-1"])
    for spec in ("1", "all"):  # freezing random weights: nothing to keep
        with pytest.raises(BabysitError, match=rf"`model.freeze`: freeze {spec} .*without `model.init_from`"):
            load_config("conf/digits_mlp.yaml", [f"model.freeze={spec}"])
    assert load_config("conf/digits_mlp.yaml", ["model.freeze=0"]).model.freeze == 0  # freezing nothing needs no source
    # more blocks than the config builds: refused at load, before any run (it was refused mid-flow, leaving a FAILED run)
    with pytest.raises(BabysitError, match=r"`model.freeze` 5: this model has 2 hidden blocks \(`model.hidden` \[32, 16\]\), so freeze takes 0 to 2"):
        load_config("conf/digits_mlp.yaml", ["model.hidden=[32, 16]", f"model.init_from={checkpoint}", "model.freeze=5"])
    with pytest.raises(BabysitError, match=r"`model.freeze` 3: this model has 2 hidden blocks \(`model.channels` \[16, 32\]\)"):
        load_config("conf/digits_5to9_transfer.yaml", [f"model.init_from={checkpoint}", "model.freeze=3"])
    cnn = build_model(load_config("conf/digits_0to4_cnn.yaml", []).model, (1, 8, 8), 5, seed=0)
    with pytest.raises(BabysitError, match=r"`model.freeze` 3: this model has 2 hidden blocks"):
        freeze(cnn, 3)
    assert freeze(cnn, 2) == 2 and not any(p.requires_grad for p in cnn.blocks.parameters()) and cnn.head.weight.requires_grad


def test_the_epoch_log_counts_the_fine_tuning_epochs_and_says_when_every_layer_trains(tmp_path, caplog):
    from babysit import tracking
    from tasks.train import train_task

    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32]", "train.diagnostics=false", "train.threads=1"])
    checkpoint = tmp_path / "source.pt"
    torch.save(build_model(cfg.model, 64, 10, seed=1).state_dict(), checkpoint)
    cfg = load_config("conf/digits_mlp.yaml", ["model.hidden=[32]", "train.diagnostics=false", "train.threads=1", f"model.init_from={checkpoint}",
                                               "model.freeze=all", "train.epochs=2", "train.unfreeze_epochs=2", "train.unfreeze_lr_factor=0.1"])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, "t", None, {}, {})
    with caplog.at_level("INFO", logger="babysit.train"):
        train_task.fn(cfg, prepared, run)
    lines = [r.getMessage() for r in caplog.records if r.name == "babysit.train"]
    assert [line.split()[1] for line in lines if line.startswith("epoch") and "/" in line.split()[1]] == ["1/4", "2/4", "3/4", "4/4"]  # was 3/2, 4/2 (QA)
    assert "epoch 3 on: every layer trains (train.unfreeze_epochs 2, at 0.1 × the learning rate)" in lines


def test_the_epoch_log_says_when_every_layer_trains_after_a_frozen_phase_that_stopped_early(tmp_path, caplog):
    # the line was due at epoch `train.epochs + 1`: after an early stop it came late, or never (review)
    from babysit import tracking
    from tasks.train import train_task

    base = ["model.hidden=[32]", "train.diagnostics=false", "train.threads=1"]
    cfg = load_config("conf/digits_mlp.yaml", base)
    checkpoint = tmp_path / "source.pt"
    torch.save(build_model(cfg.model, 64, 10, seed=1).state_dict(), checkpoint)
    cfg = load_config("conf/digits_mlp.yaml", [*base, f"model.init_from={checkpoint}", "model.freeze=all", "train.epochs=30",
                                               "train.early_stopping_patience=1", "optim.lr=1e-12", "train.unfreeze_epochs=2"])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    run = tracking.start_run(f"sqlite:///{tmp_path}/mlflow.db", "t", None, {}, {})
    with caplog.at_level("INFO", logger="babysit.train"):
        result, _ = train_task.fn(cfg, prepared, run)
    lines = [r.getMessage() for r in caplog.records if r.name == "babysit.train"]
    frozen = result.epochs_run - 2
    assert frozen < 30 and f"epoch {frozen + 1} on: every layer trains (train.unfreeze_epochs 2, at 0.1 × the learning rate)" in lines


def test_an_init_from_web_address_home_path_or_pickled_module_is_said_plainly(tmp_path, monkeypatch):
    # a URL went to MLflow as an artifact server (two tracebacks); ~ was not expanded; a pickled module's
    # refusal came with terminal colours, cut mid-word (QA)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(BabysitError, match="a web address; download the file first"):
        load_source("https://example.com/model.pt", uri)
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    assert load_source("~/weights.pt", uri)["w"].tolist() == [1.0, 1.0]
    torch.save(torch.nn.Linear(3, 2), tmp_path / "module.pt")
    with pytest.raises(BabysitError, match=r"not a torch state dict \(torch.save\(model.state_dict\(\), path\)\); torch says: ") as refused:
        load_source(str(tmp_path / "module.pt"), uri)
    assert "\x1b[" not in str(refused.value) and len(str(refused.value)) < 600
