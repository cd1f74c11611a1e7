"""Image sources, as (rows, channels, height, width) float arrays in [0, 1] plus labels.

- digits as 1×8×8 images (scikit-learn's bundled set);
- a local image folder, one sub-folder per class (torchvision's ImageFolder layout), read with Pillow;
- CIFAR-10, MNIST and Fashion-MNIST from a local root in the layout torchvision writes
  (cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/). With `download: true` torchvision fetches
  them first; nothing is fetched otherwise.
The predefined train/test files are pooled; babysit makes its own seeded stratified split.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits

from babysit.errors import BabysitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return (digits.images[:, None] / 16.0).astype(np.float32), digits.target


def image_classes(root: Path) -> list[str]:
    """An image folder's classes: its sub-folders, but hidden ones (.ipynb_checkpoints)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(root: Path) -> list[tuple[str, Path]]:
    """(class, file) for every image of an image folder: the files with an image suffix anywhere
    under root/<class>/ (symlinked folders followed, as torchvision's ImageFolder does), in order.
    Hidden files and folders are left out (.DS_Store, macOS's ._x.png, .ipynb_checkpoints)."""
    found = []
    for label in image_classes(root):
        seen = set()  # the real folders walked: a symlink back up the tree is walked once
        for folder, subfolders, files in os.walk(root / label, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                subfolders[:] = []
                continue
            seen.add(real)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found += [(label, Path(folder) / f) for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def read_image_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image under root/<class>/ resized to size×size, grey (1 channel) or RGB (3)."""
    if not root.is_dir():
        raise BabysitError(f"{root}: image folder not found (`data.path`; expected one sub-folder per class).")
    classes = image_classes(root)
    if not classes:
        raise BabysitError(f"{root}: no class sub-folders; an image folder holds one sub-folder of images per class.")
    files = image_files(root)
    if empty := sorted(set(classes) - {label for label, _ in files}):
        raise BabysitError(f"{root}: class folder(s) {', '.join(empty)} hold no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; "
                           f"hidden files do not count); add images or remove the folder(s), so that the model has the classes the folder shows.")
    images, labels = [], []
    for label, path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise BabysitError(f"{path}: not a readable image ({err}).") from None
        images.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
        labels.append(label)
    if not images:
        raise BabysitError(f"{root}: the class folders hold no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return np.stack(images), np.array(labels)


def read_torchvision(name: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = root / TORCHVISION_FOLDERS[name]
    if download and not folder.exists():
        fetch_with_torchvision(name, root)
    if not folder.exists():
        raise BabysitError(f"{folder}: {name} files not found; put torchvision's on-disk copy under `data.path` ({root}) or set `data.download: true`.")
    return read_cifar10(folder) if name == "cifar10" else read_idx_pair(folder)


def fetch_with_torchvision(name: str, root: Path) -> None:
    try:
        import torchvision.datasets as tv
    except Exception as err:  # not installed, or built for another torch
        raise BabysitError(f"`data.download: true` needs torchvision, which is not importable here ({err}); download {name} elsewhere and copy it under {root}.") from None
    dataset = {"cifar10": tv.CIFAR10, "mnist": tv.MNIST, "fashion_mnist": tv.FashionMNIST}[name]
    for train in (True, False):
        dataset(str(root), train=train, download=True)


def read_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 'python version' batches: pickled dicts with b'data' (rows × 3072 uint8) and b'labels'."""
    files = sorted(folder.glob("data_batch_*")) + sorted(folder.glob("test_batch"))
    if not files:
        raise BabysitError(f"{folder}: no CIFAR-10 batches (data_batch_1..5, test_batch).")
    X, y = [], []
    for path in files:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")  # the format CIFAR-10 ships in
        X.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        y.append(np.asarray(batch[b"labels"]))
    return np.concatenate(X).astype(np.float32) / 255.0, np.concatenate(y)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic (2 zero bytes, dtype 0x08, ndim), big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    X, y = [], []
    for split in ("train", "t10k"):
        images = _one(folder, f"{split}-images-idx3-ubyte")
        labels = _one(folder, f"{split}-labels-idx1-ubyte")
        X.append(read_idx(images)[:, None].astype(np.float32) / 255.0)
        y.append(read_idx(labels))
    return np.concatenate(X), np.concatenate(y)


def _one(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise BabysitError(f"{folder}: missing {stem} (or {stem}.gz).")
