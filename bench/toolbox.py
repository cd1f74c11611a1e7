"""Lecture 7's toolbox on digits: the figures issue 5 asks for, from one script.

1. test accuracy of the default digits MLP (20 epochs) with every optimizer at its DEFAULT_LR,
   and with every LR schedule (Adam);
2. CNN and ResNet (digits as 1×8×8 images) vs the MLP;
3. an ensemble of the top 3 of 8 random configs (by validation accuracy) vs its best single model;
4. transfer (CNN pretrained on digits 0–4) vs scratch on 10% of the 5–9 training rows, 3 seeds.

    .venv/bin/python bench/toolbox.py
"""

from __future__ import annotations

import statistics
import tempfile

import numpy as np
import torch

from babysit.config import DEFAULT_LR, load_config
from babysit.space import parse_dist, sample
from flows.ensemble import ensemble_probabilities
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess
from tasks.train import deployable, train_and_test


def run(config: str, overrides: list[str]):
    cfg = load_config(config, ["train.diagnostics=false", *overrides])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    result, model = train_and_test(cfg, prepared)
    return cfg, result, model, prepared


def probabilities(model, X) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(X)), dim=1).numpy()


def main() -> None:
    torch.set_num_threads(2)
    print("1) optimizers (default lr) and schedules, digits MLP, 20 epochs: test accuracy")
    for name, lr in DEFAULT_LR.items():
        print(f"   {name:9s} lr {lr:<6g} {run('conf/digits_mlp.yaml', [f'optim.name={name}', f'optim.lr={lr}'])[1].test_acc:.4f}")
    for schedule in ["step", "exponential", "cosine", "inverse_time"]:
        extra = [f"optim.schedule={schedule}", "optim.step_epochs=7", "optim.gamma=0.9", "optim.warmup_epochs=1"]
        print(f"   adam + {schedule:12s} {run('conf/digits_mlp.yaml', extra)[1].test_acc:.4f}")

    print("2) architecture on digits (same split, 20 epochs, BatchNorm on): test accuracy")
    for label, extra in [("MLP 256-256", []), ("CNN 16-32", ["model.kind=cnn", "model.channels=[16,32]"]), ("ResNet 16-32", ["model.kind=resnet", "model.channels=[16,32]"])]:
        print(f"   {label:13s} {run('conf/digits_mlp.yaml', ['data.source=digits_images', 'model.batchnorm=true', *extra])[1].test_acc:.4f}")

    print("3) ensemble of the top 3 of 8 random configs vs the best single model")
    space = {"optim.lr": parse_dist("optim.lr", "loguniform(3e-4, 3e-3)"), "model.dropout": parse_dist("model.dropout", "uniform(0, 0.5)")}
    members = []
    for i, params in enumerate(sample(space, 8, "random", seed=0)):
        overrides = [f"{k}={v}" for k, v in params.items()]  # one seed: members share the split
        cfg, result, model, prepared = run("conf/digits_mlp.yaml", overrides)
        members.append((result.best_val_acc, result.test_acc, probabilities(model, prepared.splits.X_test), prepared.splits.y_test))
    top = sorted(members, key=lambda m: -m[0])[:3]
    y_test = top[0][3]
    ensemble = (ensemble_probabilities([m[2] for m in top]).argmax(1) == y_test).mean()
    print(f"   best single (by val) test {top[0][1]:.4f}; members {[round(m[1], 4) for m in top]}; ensemble test {ensemble:.4f}")

    print("4) transfer (CNN on 0-4) vs scratch on 10% of the 5-9 training rows, test accuracy over seeds 0-2")
    _, _, source, prepared = run("conf/digits_0to4_cnn.yaml", [])
    checkpoint = tempfile.mktemp(suffix=".pt")
    torch.save(deployable(source, prepared).state_dict(), checkpoint)
    scratch = [run("conf/digits_5to9_transfer.yaml", [f"seed={s}"])[1].test_acc for s in range(3)]
    transfer = [run("conf/digits_5to9_transfer.yaml", [f"seed={s}", f"model.init_from={checkpoint}"])[1].test_acc for s in range(3)]
    print(f"   scratch  {statistics.mean(scratch):.4f} ± {statistics.stdev(scratch):.4f}  {[round(a, 4) for a in scratch]}")
    print(f"   transfer {statistics.mean(transfer):.4f} ± {statistics.stdev(transfer):.4f}  {[round(a, 4) for a in transfer]}")


if __name__ == "__main__":
    main()
