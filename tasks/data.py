"""Data stage: load a dataset from its source and split it (seeded, stratified).

Sources: scikit-learn's bundled digits, generated 2-D toy data (the lecture's spiral, blobs),
and user files (CSV / Parquet with a target column, NPZ with `X` and `y`).
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.datasets import load_digits, make_blobs
from sklearn.model_selection import train_test_split

from babysit.config import PATH_SOURCES, DataConfig
from babysit.errors import BabysitError
from tasks.images import TORCHVISION_FOLDERS, digits_images, image_files, read_image_folder, read_torchvision


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # (rows, features) float32
    y: np.ndarray  # (rows,) int64 class indices 0..C-1
    classes: list[str]  # class index -> original label
    origin: str  # where it came from, for error messages and tags


@dataclass(frozen=True)
class Splits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]

    @property
    def n_features(self) -> int:
        """Features per row (for images: channels × height × width)."""
        return int(np.prod(self.X_train.shape[1:]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row's shape: (features,) or (channels, height, width)."""
        return tuple(self.X_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def majority_share(self) -> float:
        """The share of validation rows in their most common class: the accuracy of always predicting it."""
        return float(np.bincount(self.y_val).max() / len(self.y_val)) if len(self.y_val) else 0.0


def make_spiral(n_samples: int, n_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The CS231n spiral: `n_classes` arms, each a radius 0→1 sweep of 4 radians plus angle noise."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for label in range(n_classes):
        per_class = n_samples // n_classes + (label < n_samples % n_classes)  # n_samples in all
        radius = np.linspace(0.0, 1.0, per_class)
        angle = np.linspace(label * 4.0, (label + 1) * 4.0, per_class) + rng.normal(0.0, noise, per_class)
        X.append(np.c_[radius * np.sin(angle), radius * np.cos(angle)])
        y.append(np.full(per_class, label))
    return np.concatenate(X), np.concatenate(y)


def read_table(path: Path, target: str, kind: str, drop: list[str] = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    if kind == "csv" and len(frame.columns) == 1 and any(mark in str(frame.columns[0]) for mark in ";\t|"):
        raise BabysitError(f"{path}: read as one column ('{frame.columns[0]}'): babysit reads CSV separated by commas; "
                           "save it with commas (pandas: to_csv(path, index=False)).")
    if target not in frame.columns:
        raise BabysitError(f"{path}: no target column '{target}' (columns: {', '.join(map(str, frame.columns))}); set `data.target` to the label column.")
    if frame.empty:  # a header and no rows: every column reads as text
        raise BabysitError(f"{path}: has columns ({', '.join(map(str, frame.columns))}) but no rows of data.")
    if kind == "csv":  # pandas renames a repeated name 'a' to 'a.1', and calls an empty header cell 'Unnamed: 0': a copied label, a saved row index
        header = ["" if pd.isna(name) else str(name) for name in pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0]]  # as written
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise BabysitError(f"{path}: the header names column(s) {', '.join(repr(n) for n in repeated)} more than once; a repeated target would "
                               "train on a copy of the label. Rename or drop the repeats.")
        if unnamed := [i + 1 for i, name in enumerate(header) if not name.strip()]:
            raise BabysitError(f"{path}: column(s) {', '.join(map(str, unnamed))} have no name in the header, as a saved row index has "
                               "(pandas' to_csv without index=False); ordered rows would let it give the class away. Drop it, or name it.")
    if unknown := [name for name in drop if name not in frame.columns]:
        raise BabysitError(f"{path}: `data.drop_columns` names {', '.join(map(repr, unknown))}, which the file has no column of (columns: {', '.join(map(str, frame.columns))}).")
    if target in drop:
        raise BabysitError(f"{path}: `data.drop_columns` lists the target '{target}': the labels cannot be dropped.")
    features = frame.drop(columns=[target, *drop])
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise BabysitError(f"{path}: feature columns must be numeric, but {', '.join(non_numeric)} {'holds' if len(non_numeric) == 1 else 'hold'} "
                           "text or mixed values; encode them as numbers or list them in `data.drop_columns`.")
    for name in features.columns:  # QA: a named `id` column trained as a feature
        values = features[name].to_numpy()
        if len(values) > 2 and pd.api.types.is_integer_dtype(features[name]) and (np.diff(values) == 1).all() and values[0] in (0, 1):
            raise BabysitError(f"{path}: column '{name}' numbers the rows ({values[0]}, {values[0] + 1}, {values[0] + 2}, ...): as a feature it tells the model "
                               "where a row sits in the file, which an ordered file ties to its class. List it in `data.drop_columns`.")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which validate_dataset names
        X = features.to_numpy(dtype=np.float32)
    return X, table_labels(path, frame[target], kind), [str(c) for c in features.columns]


def table_labels(path: Path, parsed: pd.Series, kind: str) -> np.ndarray:
    """The target column as pandas parsed it, unless parsing merged labels the file writes apart
    (QA: class '01' joined class '1', silently): then as written, text. Text that pandas reads as
    missing ('NA', 'null', ...) is refused by name: a class called NA read as 20 missing labels (QA)."""
    if kind != "csv" or (parsed.dtype == object and parsed.notna().all()):  # text kept as written, none missing: nothing to read again
        return parsed.to_numpy()
    written = pd.read_csv(path, usecols=[parsed.name], dtype=str, keep_default_na=False)[parsed.name]
    given = parsed.notna()
    if (read_missing := ~given & (written.str.strip() != "")).any():
        texts = sorted(set(written[read_missing]))
        raise BabysitError(f"{path}: {int(read_missing.sum())} labels in column '{parsed.name}' are text that pandas reads as missing "
                           f"({', '.join(map(repr, texts[:5]))}): if that is a class's name, rename it in the file; rows without a class, drop.")
    if parsed[given].nunique() < written[given].nunique():
        return written.where(given, None).to_numpy()
    return parsed.to_numpy()


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):  # numpy would take it for a pickle, and suggest loading it unsafely
        raise BabysitError(f"{path}: not an NPZ archive (what numpy.savez writes: a zip of .npy arrays 'X' and 'y'); for a table use data.source: csv or parquet.")
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in ("X", "y") if key not in archive.files]
        if missing:
            raise BabysitError(f"{path}: an NPZ dataset needs arrays 'X' (rows × features) and 'y' (labels); missing {', '.join(missing)} (found: {', '.join(archive.files) or 'nothing'}).")
        X, y = archive["X"], archive["y"]
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        one_hot = y.ndim == 2 and y.shape[1] > 1 and len(y) == len(X) and np.isin(y, (0, 1)).all()
        raise BabysitError(f"{path}: expected 'X' of shape (rows, features) and 'y' of shape (rows,), got {X.shape} and {y.shape}"
                           + ("; 'y' looks one-hot: save its class indices, y.argmax(axis=1)." if one_hot else "."))
    if X.dtype.kind not in "biuf":  # bool columns of a table are features too; complex ones would lose their imaginary part
        raise BabysitError(f"{path}: 'X' must hold real numbers (bool, integer or float), got dtype {X.dtype}.")
    if y.dtype.kind == "S":  # numpy's bytes strings: class names as text, not as "b'cat'"
        y = np.char.decode(y, "utf-8", errors="replace")
    return X.astype(np.float32), y


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the configured source into a validated `Dataset`. Raises BabysitError on bad data."""
    check_data_path(cfg)
    columns = None  # the features' names: a table's header
    if cfg.source == "digits":
        digits = load_digits()
        X, labels, origin = digits.data, digits.target, "sklearn digits"
    elif cfg.source == "spiral":
        X, labels = make_spiral(cfg.n_samples, cfg.n_classes, cfg.noise, seed)
        origin = "generated spiral"
    elif cfg.source == "digits_images":
        (X, labels), origin = digits_images(), "sklearn digits as 1x8x8 images"
    elif cfg.source == "image_folder":
        (X, labels), origin = read_image_folder(Path(cfg.path), cfg.image_size, cfg.channels), str(cfg.path)
    elif cfg.source in TORCHVISION_FOLDERS:
        (X, labels), origin = read_torchvision(cfg.source, Path(cfg.path), cfg.download), f"{cfg.source} under {cfg.path}"
    elif cfg.source == "blobs":
        X, labels = make_blobs(cfg.n_samples, n_features=2, centers=cfg.n_classes, cluster_std=1.0 + cfg.noise, random_state=seed)
        origin = "generated blobs"
    else:
        path = Path(cfg.path)
        if path.is_dir():
            raise BabysitError(f"{path}: is a folder; `data.path` with source '{cfg.source}' names one {cfg.source} file (a folder of images: source image_folder).")
        try:
            if cfg.source == "npz":
                X, labels = read_npz(path)
            else:
                X, labels, columns = read_table(path, cfg.target, cfg.source, cfg.drop_columns)
        except BabysitError:
            raise
        except Exception as err:  # a parser's own complaint, e.g. a truncated Parquet file
            raise BabysitError(f"{path}: could not be read as {cfg.source} ({' '.join(str(err).split())}).") from None
        origin = str(path)
    X, labels = np.asarray(X, dtype=np.float32), np.asarray(labels)
    if cfg.keep_classes is not None:
        keep, present = np.isin(labels.astype(str), cfg.keep_classes), sorted(set(labels.astype(str).tolist()))
        if missing := [c for c in cfg.keep_classes if c not in present]:  # a typo would quietly train on fewer classes
            raise BabysitError(f"{origin}: `data.keep_classes` names {', '.join(repr(c) for c in missing)}, which no row has as its label "
                               f"(labels: {', '.join(present[:20])}{', ...' if len(present) > 20 else ''}).")
        X, labels, origin = X[keep], labels[keep], f"{origin} (classes {', '.join(cfg.keep_classes)})"
    data = validate_dataset(X, labels, origin, columns)
    return subsample(data, cfg.max_rows, seed) if cfg.max_rows and cfg.max_rows < len(data.y) else data


def subsample(data: Dataset, rows: int, seed: int) -> Dataset:
    """A stratified random subset of `rows` rows (to train on a slice of a big set on a CPU). The
    stratified train/val/test split that follows needs 3 rows of each class, so a sample that cannot
    keep them is a BabysitError naming `data.max_rows`, as is a class too rare to sample at all."""
    counts, n_classes = np.bincount(data.y), len(data.classes)
    rare = [f"'{data.classes[c]}' ({counts[c]} row{'s' if counts[c] > 1 else ''})" for c in np.flatnonzero(counts < 3)]
    if rare:  # sklearn cannot stratify a class of one row, and the split needs 3 of each in any case
        raise BabysitError(f"{data.origin}: `data.max_rows` {rows} cannot sample class(es) {', '.join(rare)}: a stratified sample and the train/val/test split "
                           f"after it need at least 3 rows of each class. Add rows of them, merge them into another class, or leave them out with data.keep_classes.")
    if rows < 3 * n_classes:
        raise BabysitError(f"{data.origin}: `data.max_rows` {rows} is too few rows for {n_classes} classes; a stratified train/val/test split needs at least 3 rows of each class "
                           f"({3 * n_classes} rows): raise data.max_rows to at least {3 * n_classes} or keep fewer classes (data.keep_classes).")
    if len(data.y) - rows < n_classes:  # sklearn stratifies the rows left out too; leaving out fewer rows than classes, a plain random pick is as good
        keep = np.random.default_rng(seed).choice(len(data.y), size=rows, replace=False)
    else:
        keep, _ = train_test_split(np.arange(len(data.y)), train_size=rows, stratify=data.y, random_state=seed)
    keep = np.sort(keep)
    kept = np.bincount(data.y[keep], minlength=n_classes)
    if kept.min() < 3:  # a class kept in proportion to its share, rounded down to under 3 rows
        short, enough = int(kept.argmin()), int(np.ceil(3 * len(data.y) / counts.min()))  # enough: 3 rows of the rarest class's share
        advice = f"raise data.max_rows to at least {enough} or leave it unset" if enough < len(data.y) else "leave data.max_rows unset"
        raise BabysitError(f"{data.origin}: `data.max_rows` {rows} keeps {kept[short]} of the {counts[short]} rows of class '{data.classes[short]}' "
                           f"(a stratified sample keeps each class's share), but the train/val/test split needs at least 3 rows of each class: {advice}.")
    return Dataset(data.X[keep], data.y[keep], data.classes, f"{data.origin} ({rows} rows)")


def validate_dataset(X: np.ndarray, labels: np.ndarray, origin: str, columns: list[str] | None = None) -> Dataset:
    """Check what training needs of any dataset and encode labels as 0..C-1. `columns`: the
    features' names, where the file has them (a table's header), for the messages."""
    if len(labels) == 0:
        raise BabysitError(f"{origin}: no rows.")
    bad = ~np.isfinite(X)
    if bad.any():
        where = sorted(set(np.nonzero(bad)[1].tolist()))[:10]
        named = ", ".join(columns[i] for i in where) if columns is not None else str(where)
        raise BabysitError(f"{origin}: {int(bad.sum())} feature values are NaN (missing), infinite or beyond float32's ±3.4e38 (feature columns {named}); impute or drop them before training.")
    if X.shape[0] and math.prod(X.shape[1:]) == 0:  # QA: trained 0 inputs, then crashed logging the model
        raise BabysitError(f"{origin}: no features{' left once the target and data.drop_columns are taken out' if columns is not None else ''}; "
                           "a model needs at least one input column.")
    if len(labels) and pd.isna(labels).any():
        raise BabysitError(f"{origin}: {int(pd.isna(labels).sum())} labels are missing; every row needs a class.")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise BabysitError(f"{origin}: found {len(classes)} class(es); a classifier needs at least 2 distinct labels.")
    if len(y) < 3 * len(classes):
        continuous = np.issubdtype(classes.dtype, np.floating) and len(classes) > len(y) / 2
        raise BabysitError(f"{origin}: {len(y)} rows for {len(classes)} classes; a stratified train/val/test split needs at least 3 rows per class"
                           + (": the labels look continuous (a regression target?); babysit trains classifiers, so bin them into classes." if continuous else "."))
    counts = np.bincount(y)
    if counts.min() < 3:  # train, val and test each need a row of every class; no fractions help
        rare = [f"'{classes[i]}' ({counts[i]} row{'s' if counts[i] > 1 else ''})" for i in np.flatnonzero(counts < 3)]
        raise BabysitError(f"{origin}: class(es) {', '.join(rare[:10])}{', ...' if len(rare) > 10 else ''} have fewer than 3 rows; a stratified "
                           "train/val/test split needs a row of each class in each part. Add rows of them, merge them into another class, "
                           "or leave them out (data.keep_classes: the others).")
    return Dataset(X=X, y=y.astype(np.int64), classes=[str(c) for c in classes], origin=origin)


def split_dataset(data: Dataset, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Stratified train/val/test split; the same seed always gives the same rows."""
    try:
        X_rest, X_test, y_rest, y_test = train_test_split(data.X, data.y, test_size=test_fraction, stratify=data.y, random_state=seed)
        val_share = val_fraction / (1.0 - test_fraction)
        X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=val_share, stratify=y_rest, random_state=seed)
    except ValueError as err:
        rows, classes = len(data.y), len(data.classes)
        if rows < 3 * classes:  # no fractions can work: train, val and test each need a row of every class
            raise BabysitError(f"{data.origin}: {rows} rows for {classes} classes; a stratified train/val/test split needs at least 3 rows of each class "
                               f"({3 * classes} rows): use more rows (data.max_rows) or fewer classes (data.keep_classes).") from None
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if fraction * rows < classes:  # stratified: each split holds every class at least once
                least = math.ceil(classes / rows * 100) / 100  # rounded up: 1.98 rows is fewer than 2
                raise BabysitError(f"{data.origin}: data.{name} {fraction} leaves {fraction * rows:.3g} of {rows} rows for {classes} classes; "
                                   f"a stratified split needs a row of each class: set data.{name} to at least {least:g}.") from None
        counts = np.bincount(data.y)
        rarest = data.classes[int(counts.argmin())]
        raise BabysitError(
            f"{data.origin}: cannot split {len(data.y)} rows into stratified train/val/test "
            f"(val {val_fraction}, test {test_fraction}); the rarest class '{rarest}' has {counts.min()} rows. "
            f"Add rows or change the fractions ({' '.join(str(err).split())})."
        ) from None
    return Splits(X_train, y_train, X_val, y_val, X_test, y_test, data.classes)


def thin_training(splits: Splits, fraction: float, seed: int) -> Splits:
    """Keep a stratified `fraction` of the training rows (transfer learning with little data)."""
    if fraction >= 1.0:
        return splits
    try:
        keep, _ = train_test_split(np.arange(len(splits.y_train)), train_size=fraction, stratify=splits.y_train, random_state=seed)
    except ValueError:
        raise BabysitError(f"`data.train_fraction` {fraction} leaves fewer training rows than classes ({len(splits.y_train)} rows, {splits.n_classes} classes).") from None
    keep = np.sort(keep)
    return replace(splits, X_train=splits.X_train[keep], y_train=splits.y_train[keep])


def check_data_path(cfg: DataConfig) -> None:
    """A `data.path` that does not exist is a BabysitError, said before anything is read (and by
    the CLI before a Prefect server starts)."""
    if cfg.source not in PATH_SOURCES or cfg.path is None or cfg.path.exists() or cfg.source in TORCHVISION_FOLDERS and cfg.download:
        return
    what = "image folder" if cfg.source == "image_folder" else "dataset root" if cfg.source in TORCHVISION_FOLDERS else "data file"
    raise BabysitError(f"{cfg.path}: {what} not found (`data.path`, source '{cfg.source}').")


def data_fingerprint(cfg: DataConfig) -> str:
    """The version of the user's data that `data.path` names: a hash of the names, sizes and
    modification times of the files the source reads (a table, or an image folder's images; a
    symlink's target), which change when the data is rewritten in place. '' for data that reads
    no path (built-in, generated). A search's trial keys include it, so a rerun after the data
    changed trains again instead of reusing results of the old data."""
    if cfg.source not in PATH_SOURCES or cfg.path is None or not cfg.path.exists():
        return ""
    if cfg.source == "image_folder":
        files = [path for _, path in image_files(cfg.path)] if cfg.path.is_dir() else []
    elif cfg.source in TORCHVISION_FOLDERS:  # the dataset's own folder under the root, which may hold others
        folder = cfg.path / TORCHVISION_FOLDERS[cfg.source]
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    else:
        files = [cfg.path]
    digest = hashlib.sha1()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(cfg.path) if file != cfg.path else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """The dataset `cfg` names, split into train / val / test, its training split thinned to `train_fraction`."""
    splits = split_dataset(load_dataset(cfg, seed), cfg.val_fraction, cfg.test_fraction, seed)
    return thin_training(splits, cfg.train_fraction, seed)


_LOADED_AHEAD: dict[tuple, Splits] = {}  # load_ahead's splits, until the flow's load_data_task takes them


def load_ahead(cfg: DataConfig, seed: int) -> None:
    """Load the data before Prefect's server starts (15-25 s), so that data a run cannot use (a
    missing label column, a class of one row) is said at once; the flow's load_data_task takes
    the splits over, once, instead of reading the files again."""
    _LOADED_AHEAD.clear()
    _LOADED_AHEAD[_load_key(cfg, seed)] = load_splits(cfg, seed)


def _load_key(cfg: DataConfig, seed: int) -> tuple:
    return cfg.model_dump_json(), seed, data_fingerprint(cfg)  # files rewritten in between are read again


@task(name="load-data", cache_policy=NO_CACHE)
def load_data_task(cfg: DataConfig, seed: int) -> Splits:
    if _LOADED_AHEAD and (ahead := _LOADED_AHEAD.pop(_load_key(cfg, seed), None)) is not None:
        return ahead
    return load_splits(cfg, seed)
