"""Training stage: the loop (`fit`), evaluation, and the thin Prefect task around them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from torch import nn

from babysit import tracking
from babysit.config import Config, OptimConfig, TrainConfig, untrainable
from babysit.diagnostics import dead_unit_metrics, dead_unit_probe, snapshot, step_diagnostics
from babysit.errors import BabysitError
from babysit.optim import lr_at, make_optimizer
from models.mlp import Affine, build_model
from models.transfer import check_frozen_were_copied, freeze, load_source, transfer_tags, transfer_weights, unfreeze
from tasks.augment import augment_batch
from tasks.preprocess import Prepared

HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@dataclass
class TrainResult:
    history: dict[str, list[float]]  # HISTORY_KEYS -> one value per finished epoch
    initial_loss: float  # training-set loss before any update
    best_epoch: int  # epoch whose weights were kept (0: the initial weights)
    stop_reason: str | None  # why training ended before `epochs`, if it did
    test_loss: float = math.nan  # computed once, after training, with the kept weights
    test_acc: float = math.nan
    seconds: float = 0.0  # wall time of `fit`
    # grad_norm/…, update_ratio/…, dead_frac/… (babysit.diagnostics) -> one value per epoch
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    transfer: dict[str, str] = field(default_factory=dict)  # with model.init_from: models.transfer.transfer_tags

    @property
    def epochs_run(self) -> int:
        return len(self.history["train_loss"])

    @property
    def best_val_acc(self) -> float:
        return self.history["val_acc"][self.best_epoch - 1] if self.best_epoch else math.nan


def training_device(cfg: Config) -> torch.device:
    """The device `cfg` trains on. A config this machine or PyTorch cannot train is a
    BabysitError, raised before anything is created or trained."""
    if why := untrainable(cfg):
        raise BabysitError(why)
    return pick_device(cfg.train.device)


def pick_device(name: str) -> torch.device:
    """`train.device` as a torch device; one this machine lacks is a BabysitError, before anything trains."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = "this PyTorch build has no CUDA support or sees no GPU"
    elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        missing = f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        missing = "MPS needs Apple silicon and a PyTorch build with MPS support"
    else:
        return device
    raise BabysitError(f"train.device '{name}' is not available here: {missing}. Use train.device: auto (the GPU when there is one, else the CPU) or cpu.")


def mixed_precision(device: torch.device):
    """bf16 autocast on CUDA; on the CPU not even a disabled autocast context, which costs ~10 µs a step."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` (eval mode) on X, y."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), chunk):
        with mixed_precision(X.device):
            logits = model(X[start : start + chunk]).float()
        loss_sum += F.cross_entropy(logits, y[start : start + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[start : start + chunk]).sum().item()
    return loss_sum / len(y), correct / len(y)


@torch.no_grad()
def starting_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The mean loss training starts from, as its first steps see it: trainable BatchNorm layers
    normalise each mini-batch by its own statistics (a fresh layer's running ones are mean 0,
    variance 1: in eval mode unnormalised data gave a loss of 178 for a true 2.3), dropout is off,
    and the running statistics are left as they were."""
    norms = batchnorms(model, trainable=True)
    if not norms:
        return evaluate(model, X, y)[0]
    kept = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.eval()
    for norm in norms:
        norm.train()
    loss_sum = 0.0
    for start, end in batch_bounds(len(y), batch_size):
        with mixed_precision(X.device):
            logits = model(X[start:end]).float()
        loss_sum += F.cross_entropy(logits, y[start:end], reduction="sum").item()
    for name, buffer in model.named_buffers():
        buffer.copy_(kept[name])
    model.eval()
    return loss_sum / len(y)


def batchnorms(model: nn.Module, trainable: bool) -> list[nn.Module]:
    """BatchNorm layers whose scale and shift train (`trainable`), or are frozen. A frozen one
    (transfer learning) keeps its running statistics too: it normalises as in the source model."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters()) == trainable]


def train_mode(model: nn.Module) -> None:
    """Training mode, but for frozen BatchNorm layers."""
    model.train()
    for norm in batchnorms(model, trainable=False):
        norm.eval()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each mini-batch over `n` rows. BatchNorm cannot normalise a batch of one
    row: a last batch of one joins the one before."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and buffers, detached from later updates."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Phase:
    """Where a fit stands in a run of several (transfer learning: the frozen phase, then fine-tuning)."""

    epochs_before: int = 0  # the epochs of the phases before: this one's are numbered after them
    last: bool = True  # False: another phase follows, so early stopping ends this one only and a verdict in its last epoch is heeded
    start_loss: float | None = None  # the run's starting loss, which divergence is judged against (default: this phase's)


def fit(
    model: nn.Module,
    X_train: torch.Tensor, y_train: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor,
    optim_cfg: OptimConfig, train_cfg: TrainConfig, diverge_factor: float, seed: int,
    on_epoch: Callable[[int, dict[str, float]], str | None] | None = None, diagnose: bool = False,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None, phase: Phase = Phase(),
) -> TrainResult:
    """Mini-batch training with per-epoch validation; keeps the best-validation weights.

    Batches are index slices of a per-epoch permutation of tensors already on the device.
    Stops early when the loss diverges (NaN/Inf or > diverge_factor × the starting loss) or when
    validation accuracy has not improved for `early_stopping_patience` epochs. `on_epoch` gets
    each epoch's metrics and may return a reason to stop (a search pruning a poor trial). `phase`:
    see Phase; frozen BatchNorm layers stay in eval mode (train_mode).
    `augment` transforms each training batch on the device. `diagnose` adds per-layer gradient
    norms, update ratios and dead units, measured on each epoch's last step, to the metrics and
    to `TrainResult.diagnostics`.
    """
    started, device = time.perf_counter(), X_train.device
    optimizer = make_optimizer(model.parameters(), optim_cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    n, epochs = len(y_train), train_cfg.epochs
    bounds = batch_bounds(n, train_cfg.batch_size)
    steps_per_epoch = len(bounds)
    batch_sizes = torch.tensor([end - start for start, end in bounds], dtype=torch.float32, device=device)
    initial_loss = starting_loss(model, X_train, y_train, train_cfg.batch_size)
    reference = initial_loss if phase.start_loss is None else phase.start_loss
    history, diagnostics = {key: [] for key in HISTORY_KEYS}, {}
    # best_epoch 0 keeps the initial weights: a run that diverged in its first epoch is tested, and logged, as it started
    best_acc, best_epoch, best_state, stop_reason = -1.0, 0, copy_state(model), None
    for epoch in range(1, epochs + 1):
        # 1) one pass over the training set in a fresh random order
        train_mode(model)
        order = torch.randperm(n, device=device, generator=generator)
        losses, predictions = [], []  # reduced once per epoch: a few kernels fewer per step
        for step, (start, end) in enumerate(bounds):
            lr = lr_at(epoch - 1 + step / steps_per_epoch, optim_cfg, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[start:end]
            with mixed_precision(device):
                logits = model(augment(X_train[idx]) if augment else X_train[idx]).float()
            loss = F.cross_entropy(logits, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            before = snapshot(model) if diagnose and end == n else None  # the epoch's last step
            optimizer.step()
            losses.append(loss.detach())
            predictions.append(logits.detach().argmax(1))
        train_loss = (torch.stack(losses) @ batch_sizes).item() / n  # each loss is its batch's mean
        train_acc = (torch.cat(predictions) == y_train[order]).sum().item() / n
        # 2) validation (watching for dead units when diagnosing), and the epoch's record
        with dead_unit_probe(model) if before is not None else nullcontext([]) as dead:
            val_loss, val_acc = evaluate(model, X_val, y_val)
        metrics = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": lr}
        if before is not None:
            metrics |= step_diagnostics(model, before) | dead_unit_metrics(dead)
        for key, value in metrics.items():
            (history if key in HISTORY_KEYS else diagnostics).setdefault(key, []).append(value)
        at = phase.epochs_before + epoch  # as the run numbers its epochs
        verdict = on_epoch(at, metrics) if on_epoch is not None else None
        # 3) stop on divergence, keep the best weights, stop when validation stalls or when told
        if not math.isfinite(train_loss) or train_loss > diverge_factor * reference:
            stop_reason = f"diverged in epoch {at}: training loss {train_loss:.3g} (initial {reference:.3g})"
            break
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy_state(model)
        if verdict and (epoch < epochs or not phase.last):  # after the last epoch of all nothing is left to stop: a trial pruned there trained in full
            stop_reason = verdict  # before early stopping's: a pruned trial is pruned, also in a phase that another follows
            break
        if train_cfg.early_stopping_patience and epoch - best_epoch >= train_cfg.early_stopping_patience and epoch < epochs:
            # a phase that another follows ends here: the run goes on to it (fine-tuning)
            stop_reason = f"early stopping in epoch {at}: no better validation accuracy since epoch {phase.epochs_before + best_epoch}" if phase.last else None
            break
    model.load_state_dict(best_state)
    return TrainResult(history, initial_loss, best_epoch, stop_reason, seconds=time.perf_counter() - started, diagnostics=diagnostics)


def to_device(*arrays: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    return [torch.as_tensor(a).to(device) for a in arrays]


def transfer_source(cfg: Config, input_shape: tuple[int, ...], n_classes: int) -> dict[str, torch.Tensor] | None:
    """`model.init_from`'s weights, checked against the model they initialize. A source that is
    missing or unreadable, of which no layer fits, or that leaves frozen blocks random stops the
    command here, before MLflow has a run for it (flows call this first). None without init_from."""
    if not cfg.model.init_from:
        return None
    source = load_source(cfg.model.init_from, tracking.resolve_uri(cfg.tracking.uri))
    start_from(build_model(cfg.model, input_shape, n_classes, cfg.seed), cfg, source)
    return source


def start_from(model: nn.Module, cfg: Config, source: dict[str, torch.Tensor]) -> list[str]:
    """Freeze `model`'s first blocks (model.freeze) and copy into it what fits of `source`; the
    copied names. A frozen block left at its random weights is a BabysitError."""
    frozen = freeze(model, cfg.model.freeze)
    copied = transfer_weights(model, source, cfg.model.init_from)
    check_frozen_were_copied(model, frozen, copied, cfg.model.init_from)
    return copied


def train_and_test(
    cfg: Config, prepared: Prepared, on_epoch: Callable[[int, dict[str, float]], str | None] | None = None, test: bool = True,
    source: dict[str, torch.Tensor] | None = None, on_unfreeze: Callable[[int], None] | None = None,
) -> tuple[TrainResult, nn.Module]:
    """Build, train and (unless `test` is False: search trials) test one model. `source`:
    `model.init_from`'s weights when the caller has them (transfer_source), else read here.

    The test split is read here, once, after training, with the kept best-validation weights.
    """
    device = training_device(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    s = prepared.splits
    X_train, X_val, X_test = to_device(s.X_train, s.X_val, s.X_test, device=device)
    y_train, y_val, y_test = to_device(s.y_train, s.y_val, s.y_test, device=device)
    model = build_model(cfg.model, s.input_shape, s.n_classes, cfg.seed)
    transfer = {}
    if cfg.model.init_from:
        if source is None:
            source = load_source(cfg.model.init_from, tracking.resolve_uri(cfg.tracking.uri))
        transfer = transfer_tags(model, start_from(model, cfg, source))
    model = model.to(device)
    augment = None
    if X_train.dim() == 4:
        if device.type == "cuda":  # convolutions run faster with channels last on recent GPUs
            model = model.to(memory_format=torch.channels_last)
            X_train, X_val, X_test = (x.contiguous(memory_format=torch.channels_last) for x in (X_train, X_val, X_test))
        if cfg.train.flip or cfg.train.translate:
            generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
            augment = partial(augment_batch, flip=cfg.train.flip, translate=cfg.train.translate, generator=generator)
    fine_tuning = bool(cfg.model.init_from and cfg.train.unfreeze_epochs)
    result = fit(model, X_train, y_train, X_val, y_val, cfg.optim, cfg.train, cfg.flags.diverge_factor, cfg.seed, on_epoch, cfg.train.diagnostics, augment,
                 Phase(last=not fine_tuning))
    if fine_tuning and not result.stop_reason:
        if on_unfreeze is not None:  # the frozen phase may have stopped early: fine-tuning starts after the epochs it ran
            on_unfreeze(result.epochs_run + 1)
        result = fine_tune(model, result, cfg, (X_train, y_train, X_val, y_val), on_epoch, augment)
    if test:
        result.test_loss, result.test_acc = evaluate(model, X_test, y_test)
    result.transfer = transfer
    return result, model


def fine_tune(model: nn.Module, frozen: TrainResult, cfg: Config, data: tuple, on_epoch, augment) -> TrainResult:
    """Transfer learning's second phase: every layer trainable, at unfreeze_lr_factor × lr, for
    unfreeze_epochs more epochs (numbered after the first phase's). Keeps the better phase's weights."""
    kept = copy_state(model)
    unfreeze(model)
    offset = frozen.epochs_run
    optim = cfg.optim.model_copy(update={"lr": cfg.optim.lr * cfg.train.unfreeze_lr_factor, "warmup_epochs": 0})
    train = cfg.train.model_copy(update={"epochs": cfg.train.unfreeze_epochs})
    # diverged: judged against the loss the run started from, not the trained model's (with dropout on, its training loss is above that)
    tuned = fit(model, *data, optim, train, cfg.flags.diverge_factor, cfg.seed + 1, on_epoch, cfg.train.diagnostics, augment,
                Phase(epochs_before=offset, start_loss=frozen.initial_loss))
    better = tuned.best_val_acc > frozen.best_val_acc
    if not better:
        model.load_state_dict(kept)
    return TrainResult(
        history={k: frozen.history[k] + tuned.history[k] for k in HISTORY_KEYS},
        initial_loss=frozen.initial_loss,
        best_epoch=offset + tuned.best_epoch if better else frozen.best_epoch,
        stop_reason=tuned.stop_reason,
        seconds=frozen.seconds + tuned.seconds,
        diagnostics={k: frozen.diagnostics.get(k, []) + tuned.diagnostics.get(k, []) for k in frozen.diagnostics.keys() | tuned.diagnostics.keys()},
    )


def deployable(model: nn.Module, prepared: Prepared) -> nn.Module:
    """The trained model behind its fitted preprocessing: raw features in, class logits out."""
    preprocessing = Affine(torch.from_numpy(prepared.weight), torch.from_numpy(prepared.bias))
    return nn.Sequential(preprocessing, model.cpu()).eval()


def run_logger(fallback: str = "babysit") -> logging.Logger:
    """The Prefect run's logger; outside a flow or task run (tests, scripts, benchmarks) the logger `fallback`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: Config, prepared: Prepared, run: tracking.RunRef, source: dict[str, torch.Tensor] | None = None) -> tuple[TrainResult, nn.Module]:
    """Train and test, with per-epoch metrics in MLflow (batched writes, see tracking.MetricBuffer).
    The run's artifacts, the model among them, are the tracking stage's (tasks.track). `source`:
    model.init_from's weights (transfer_source)."""
    logger = run_logger("babysit.train")

    metrics_out = tracking.MetricBuffer(run, cfg.tracking.flush_seconds)
    total = cfg.train.epochs + (cfg.train.unfreeze_epochs if cfg.model.init_from else 0)  # at most: early stopping may end either phase

    def on_unfreeze(epoch: int) -> None:
        logger.info("epoch %d on: every layer trains (train.unfreeze_epochs %d, at %g × the learning rate)", epoch, cfg.train.unfreeze_epochs, cfg.train.unfreeze_lr_factor)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:  # never asks to stop
        metrics_out.log(metrics, step=epoch)
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f | lr %.2e",
            epoch, total, metrics["train_loss"], metrics["train_acc"], metrics["val_loss"], metrics["val_acc"], metrics["lr"],
        )

    try:
        return train_and_test(cfg, prepared, on_epoch, source=source, on_unfreeze=on_unfreeze)
    finally:  # the epochs that did finish are kept, also when training fails
        metrics_out.flush()
