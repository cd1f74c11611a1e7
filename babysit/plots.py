"""Figures logged with runs (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: flows run headless, in threads
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curves(history: dict[str, list[float]], title: str = "") -> Figure:
    """Loss and accuracy per epoch, train vs validation: the lecture's babysitting plots."""
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, history["train_loss"], label="train")
    loss_ax.plot(epochs, history["val_loss"], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.plot(epochs, history["train_acc"], label="train")
    acc_ax.plot(epochs, history["val_acc"], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
