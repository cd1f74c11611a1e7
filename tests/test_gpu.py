"""The CUDA path: run with `pytest -m gpu` on a machine with a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from babysit.config import load_config
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess
from tasks.train import pick_device, train_and_test

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("extra", [[], ["data.source=digits_images", "model.kind=cnn", "model.batchnorm=true", "train.flip=true", "train.translate=1"]])
def test_auto_device_trains_on_cuda_with_bf16_autocast(extra):
    cfg = load_config("conf/digits_mlp.yaml", ["train.epochs=5", *extra])
    assert pick_device(cfg.train.device).type == "cuda"
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    result, model = train_and_test(cfg, prepared)
    assert next(model.parameters()).is_cuda
    assert result.best_val_acc > 0.9 and result.test_acc > 0.85
