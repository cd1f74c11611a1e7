"""Figures logged with runs (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Collection

import matplotlib

matplotlib.use("Agg")  # files only: flows run headless, in threads
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import pandas as pd  # noqa: E402


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
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # no "epoch 2.5"
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.86, wspace=0.25)  # tight_layout would draw it once more
    return fig


def activation_histograms(histograms: list[tuple[list[int], list[float]]], layer_stats: dict[str, list[float]], title: str = "") -> Figure:
    """One histogram of activations per hidden layer at init, mean and std above each: the
    lecture's init figure (with tanh and N(0, 0.01²) weights the deep layers collapse onto 0)."""
    n = max(len(histograms), 1)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.3 * rows + 0.5), squeeze=False, sharex=True)
    for ax in axes.flat[len(histograms):]:
        ax.set_visible(False)
    for layer, (ax, (counts, edges)) in enumerate(zip(axes.flat, histograms), start=1):
        ax.stairs(counts, edges, fill=True)
        mean, std = layer_stats["act_mean"][layer - 1], layer_stats["act_std"][layer - 1]
        ax.set_title(f"layer {layer}: mean {mean:.2g}, std {std:.2g}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    fig.suptitle(f"{title}: hidden activations at init" if title else "hidden activations at init")
    fig.tight_layout()
    return fig


def loss_curve(losses: list[float], title: str = "") -> Figure:
    """Training loss per epoch on a log scale (the tiny-subset overfit check's curve)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title=title, yscale="log")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)


PANELS_PER_ROW = 2  # the search figure's: rows of two, drawn at once by worker processes (flows.search)


def overview_rows(fields: list[str]) -> int:
    """Rows of the search figure: a panel per field and one for the best so far."""
    return -(-(len(fields) + 1) // PANELS_PER_ROW)


def search_overview(trials, fields: list[str], row: int | None = None, linear: Collection[str] = ()) -> Figure:
    """One panel per searched field (validation accuracy against the field's value, coloured by
    stage, log x-axis for values over more than 20×: the lecture's coarse/fine scatter), and a last
    panel with the best validation accuracy found after each trial. `trials` has columns stage,
    val_acc and param.<field>, rows in the order the trials ran. Fields in `linear` were sampled on
    a linear scale (uniform, int): their axes stay linear, e.g. a dropout of 0.01 beside 0.5. A
    boolean column `read.<field>`, where present, leaves out of a field's panel the trials that did
    not train with it (QA: Adam's trials placed at the momentum they never read).

    Drawing the figure costs ~0.3 s here, paid by every search, so `row` draws one row of
    panels only, as a figure of its own: rows drawn at once in worker processes and stacked
    (`pixels`, np.vstack) make the same picture sooner."""
    panels = [*fields, None]  # None: the best-so-far panel
    cols = min(len(panels), PANELS_PER_ROW)
    if row is not None:
        panels = panels[row * cols : (row + 1) * cols]
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, field in zip(axes.flat, panels):
        if field is None:
            best = trials["val_acc"].astype(float).fillna(0.0).cummax()
            ax.plot(range(1, len(best) + 1), best, drawstyle="steps-post")
            ax.set(xlabel="trials", ylabel="best val acc so far")
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # no "2.5 trials"
            ax.grid(alpha=0.3)
            continue
        read = trials[f"read.{field}"].astype(bool) if f"read.{field}" in trials else pd.Series(True, index=trials.index)
        values = trials.loc[read, f"param.{field}"]
        # a null option (a choice with None) became NaN in the table: such a field is categorical, with a "null" category
        numeric = values.notna().all() and values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()
        for colour, (stage, group) in enumerate(trials.groupby("stage", sort=False)):
            group = group[group["val_acc"].notna() & read[group.index]]  # diverged and failed trials have no score to place (QA: a stage of them crashed the figure)
            x = group[f"param.{field}"] if numeric else group[f"param.{field}"].map(category)
            ax.scatter(x, group["val_acc"].astype(float), label=stage, color=f"C{colour}", alpha=0.7, s=18)
        if numeric and field not in linear and (values > 0).all() and values.max() / values.min() > 20:
            ax.set_xscale("log")
            ax.minorticks_off()  # their tick objects were a fifth of the figure's drawing time
            ax.xaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=True))  # "1e-03": 10^-3 goes through mathtext, ~0.1 s a figure
        if not numeric:  # option names side by side (nesterov, rmsprop, adam, ...) overlap in a panel's width
            ax.tick_params(axis="x", labelsize="x-small")
        ax.set(xlabel=field, ylabel="best val acc")
        ax.grid(alpha=0.3)
        if field == fields[0]:
            ax.legend(fontsize=8)  # one for all: every panel colours the stages alike
    # margins in inches, alike for a whole figure and for a row (tight_layout would draw the figure once more)
    height = 3.5 * rows
    fig.subplots_adjust(left=0.8 / (4.5 * cols), right=0.98, bottom=0.7 / height, top=1 - 0.35 / height, wspace=0.3, hspace=0.35)
    return fig


def category(value: object) -> str:
    """A choice's option as an axis label: null for None (NaN in a table), 1 for a whole float."""
    if value is None or isinstance(value, float) and value != value:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pixels(fig: Figure):
    """The figure drawn, as an RGBA array (height × width × 4)."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()
