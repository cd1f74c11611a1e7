"""Stopping poor trials early, on the epoch's validation accuracy (thread-safe: trials share one)."""

from __future__ import annotations

import statistics
import threading


class Pruner:
    """Compares each trial's val accuracy at an epoch with what its stage-mates reached there.

    median: from `warmup` epochs on, stop a trial whose best so far is below the median of what
            the (≥ 2) trials that reported the same epoch before it reached there (Optuna's
            MedianPruner rule: a noisy epoch does not stop a trial that already scored well).
    asha:   asynchronous successive halving: at rungs 1, eta, eta², ... epochs, stop a trial
            that is not in the top 1/eta of the (≥ eta − 1 earlier) trials at that rung.
    Trials share the pruner through threads; trials in worker processes share `shared(reports)`,
    whose reports live in shared memory (SharedReports). A Dask worker gets a copy, which only sees
    its own reports and never prunes.
    """

    def __init__(self, rule: str, warmup: int = 1, eta: int = 3):
        if rule not in ("none", "median", "asha"):
            raise ValueError(f"unknown pruning rule '{rule}'")
        self.rule, self.warmup, self.eta = rule, warmup, eta
        self._seen: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def shared(self, reports: SharedReports) -> Pruner:
        """A pruner with the same rule whose reports and lock are `reports`, emptied for a new
        stage, so that trials in worker processes see each other's epochs. It pickles without
        them; a worker process puts back its own with `attached`."""
        reports.clear()
        return Pruner(self.rule, self.warmup, self.eta).attached(reports)

    def attached(self, reports: SharedReports) -> Pruner:
        self._seen, self._lock = reports, reports.lock
        return self

    @property
    def detached(self) -> bool:
        """Unpickled from a shared pruner: its reports are the worker process's SharedReports."""
        return self._seen is None

    def __getstate__(self) -> dict:  # neither a thread lock nor shared memory pickles
        state = dict(self.__dict__)
        if isinstance(self._seen, SharedReports):
            state["_seen"] = state["_lock"] = None
        else:
            state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_lock", threading.Lock())

    def replay(self, val_accs: list[float]) -> None:
        """Record a finished trial's validation accuracy after epochs 1, 2, ... (its MLflow
        history) without judging it: a resumed stage prunes against the trials it reuses."""
        if self.rule == "none":
            return
        for epoch, val_acc in enumerate(val_accs, start=1):
            self._record(epoch, val_acc)

    def _record(self, epoch: int, val_acc: float) -> list[float]:
        """Add a report at `epoch`; returns the reports made there before it."""
        with self._lock:  # read and write back whole lists: shared memory holds numbers, not lists
            peers = list(self._seen.get(epoch, []))
            self._seen[epoch] = peers + [val_acc]
        return peers

    def report(self, epoch: int, val_acc: float, best: float | None = None) -> str | None:
        """Record a trial's val accuracy after `epoch` (`best`: its best after any epoch so far,
        this one included; default `val_acc`); returns why it should stop, or None."""
        if self.rule == "none":
            return None
        peers = self._record(epoch, val_acc)
        if self.rule == "median":
            best = val_acc if best is None else max(best, val_acc)
            if epoch >= self.warmup and len(peers) >= 2 and best < (median := statistics.median(peers)):
                return f"pruned in epoch {epoch}: best val acc so far {best:.3f} below the stage median {median:.3f} there"
            return None
        rung = 1
        while rung < epoch:
            rung *= self.eta
        if rung != epoch or len(peers) < self.eta - 1:
            return None
        cutoff = sorted(peers + [val_acc], reverse=True)[max(len(peers) + 1, self.eta) // self.eta - 1]
        if val_acc < cutoff:
            return f"pruned at rung {epoch}: val acc {val_acc:.3f} not in the top 1/{self.eta} (cut-off {cutoff:.3f})"
        return None


class SharedReports:
    """One stage's validation accuracies per epoch in shared memory, with their lock, for trials in
    worker processes: a report reads and writes memory, where a multiprocessing manager's dict and
    lock took 3-12 ms a report (four round trips) and ~15 ms per trial to connect. Room for
    `trials` reports at each epoch up to `epochs` (a stage's trials and epochs at most). Shared
    memory passes only by inheritance: create it before the worker processes and hand it to them
    as they start."""

    def __init__(self, context, epochs: int, trials: int):
        self.trials = trials
        self.lock = context.Lock()
        self._values = context.RawArray("d", (epochs + 1) * trials)
        self._counts = context.RawArray("i", epochs + 1)

    @property
    def epochs(self) -> int:
        return len(self._counts) - 1

    def get(self, epoch: int, default: list[float] | None = None) -> list[float]:
        if not 0 <= epoch < len(self._counts):
            return list(default or [])
        start = epoch * self.trials
        return self._values[start : start + self._counts[epoch]]

    def __setitem__(self, epoch: int, values: list[float]) -> None:
        if 0 <= epoch < len(self._counts):
            kept = list(values)[: self.trials]
            start = epoch * self.trials
            self._values[start : start + len(kept)] = kept
            self._counts[epoch] = len(kept)

    def clear(self) -> None:
        self._counts[:] = [0] * len(self._counts)
