"""Stopping poor trials early, on the epoch's validation accuracy (thread-safe: trials share one)."""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict


class Pruner:
    """Compares each trial's val accuracy at an epoch with what its stage-mates reached there.

    median: from `warmup` epochs on, stop a trial below the median of the (≥ 2) trials that
            reported the same epoch before it (Optuna's MedianPruner rule).
    asha:   asynchronous successive halving: at rungs 1, eta, eta², ... epochs, stop a trial
            that is not in the top 1/eta of the (≥ eta − 1 earlier) trials at that rung.
    Trials share the pruner through threads; a process-pool runner gives each trial a copy, so
    there it only sees its own reports and never prunes.
    """

    def __init__(self, rule: str, warmup: int = 1, eta: int = 3):
        if rule not in ("none", "median", "asha"):
            raise ValueError(f"unknown pruning rule '{rule}'")
        self.rule, self.warmup, self.eta = rule, warmup, eta
        self._seen: dict[int, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def report(self, epoch: int, val_acc: float) -> str | None:
        """Record a trial's val accuracy after `epoch`; returns why it should stop, or None."""
        if self.rule == "none":
            return None
        with self._lock:
            peers = list(self._seen[epoch])
            self._seen[epoch].append(val_acc)
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
