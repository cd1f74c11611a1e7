"""Stopping poor trials early, on the epoch's validation accuracy (thread-safe: trials share one)."""

from __future__ import annotations

import statistics
import threading


class Pruner:
    """Compares each trial's val accuracy at an epoch with what its stage-mates reached there.

    median: from `warmup` epochs on, stop a trial below the median of the (≥ 2) trials that
            reported the same epoch before it (Optuna's MedianPruner rule).
    asha:   asynchronous successive halving: at rungs 1, eta, eta², ... epochs, stop a trial
            that is not in the top 1/eta of the (≥ eta − 1 earlier) trials at that rung.
    Trials share the pruner through threads; trials in worker processes share `shared(manager)`,
    whose reports live in a multiprocessing manager. A Dask worker gets a copy, which only sees its
    own reports and never prunes.
    """

    def __init__(self, rule: str, warmup: int = 1, eta: int = 3):
        if rule not in ("none", "median", "asha"):
            raise ValueError(f"unknown pruning rule '{rule}'")
        self.rule, self.warmup, self.eta = rule, warmup, eta
        self._seen: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def shared(self, manager) -> Pruner:
        """A pruner with the same rule whose reports and lock live in `manager` (a started
        multiprocessing manager), so that trials in worker processes see each other's reports."""
        twin = Pruner(self.rule, self.warmup, self.eta)
        twin._seen, twin._lock = manager.dict(), manager.Lock()
        return twin

    def __getstate__(self) -> dict:  # a thread lock does not pickle; a manager's lock proxy does
        return {k: v for k, v in self.__dict__.items() if not (k == "_lock" and isinstance(v, type(threading.Lock())))}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_lock", threading.Lock())

    def report(self, epoch: int, val_acc: float) -> str | None:
        """Record a trial's val accuracy after `epoch`; returns why it should stop, or None."""
        if self.rule == "none":
            return None
        with self._lock:  # read and write back whole lists: a manager's dict hands out copies
            peers = list(self._seen.get(epoch, []))
            self._seen[epoch] = peers + [val_acc]
        if self.rule == "median":
            if epoch >= self.warmup and len(peers) >= 2 and val_acc < (median := statistics.median(peers)):
                return f"pruned in epoch {epoch}: val acc {val_acc:.3f} below the stage median {median:.3f}"
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
