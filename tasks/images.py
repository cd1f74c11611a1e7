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
import math
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits

from babysit.errors import BabysitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# The value that means white in Pillow's high-bit-depth grey modes, which convert("L") would clip at
# 255 (all white): 16-bit PNGs and TIFFs open as I;16 (I;16B big-endian), or as I (32-bit ints holding
# the 16-bit values); 32-bit float TIFFs open as F, which by the usual convention hold 0..1.
HIGH_BIT_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 65535.0, "F": 1.0}
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
        raise BabysitError(f"{root}: " + ("a file, not a folder" if root.exists() else "image folder not found") + " (`data.path` of source image_folder: "
                           "a folder with one sub-folder of images per class).")
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
                images.append(read_pixels(image, size, channels, path))
        except (UnidentifiedImageError, OSError) as err:
            raise BabysitError(f"{path}: not a readable image ({err}).") from None
        except Image.DecompressionBombError:  # a large scan or tile, refused by Pillow's guard against decompression bombs
            raise BabysitError(f"{path}: more pixels than Pillow opens ({2 * Image.MAX_IMAGE_PIXELS:,}, twice PIL.Image.MAX_IMAGE_PIXELS); "
                               "resize or tile it first: the images are scaled to data.image_size anyway.") from None
        labels.append(label)
    if not images:
        raise BabysitError(f"{root}: the class folders hold no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return np.stack(images), np.array(labels)


def read_pixels(image: Image.Image, size: int, channels: int, path: Path) -> np.ndarray:
    """One image as (channels, size, size) float32 in [0, 1]. 8-bit values are divided by 255 and
    16-bit ones by 65535 (= /257 then /255), so an 8-bit and a 16-bit copy of a picture read alike;
    a high-bit grey image is replicated into 3 channels when `channels` is 3."""
    if image.mode not in HIGH_BIT_WHITE:
        image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    white = HIGH_BIT_WHITE[image.mode]
    values = np.asarray(image, dtype=np.float32)
    outside = ~np.isfinite(values) | (values < 0) | (values > white)
    if outside.any():
        raise BabysitError(f"{path}: {int(outside.sum())} pixel values outside 0..{white:g} (found {values.min():g}..{values.max():g}); "
                           f"babysit reads a mode {image.mode} image with 0 as black and {white:g} as white; rescale it to that range "
                           f"or save it as an 8- or 16-bit PNG.")
    grey = Image.fromarray(values / white).resize((size, size), Image.BILINEAR)  # mode F: resized as floats, no levels lost
    return np.repeat(np.asarray(grey)[None], channels, axis=0)


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
    X, y = zip(*(read_cifar10_batch(path) for path in files))
    return np.concatenate(X).astype(np.float32) / 255.0, np.concatenate(y)


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: (rows × 3 × 32 × 32 uint8, labels). A file cut short or damaged (an interrupted
    download) is a BabysitError naming it, as MNIST's are."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")  # the format CIFAR-10 ships in
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except Exception as err:  # unpickling damaged bytes fails in many ways; a dict without its keys too
        raise BabysitError(f"{path}: not a CIFAR-10 batch (a pickled dict with b'data' and b'labels'; reading it said {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:120]}), as happens to a truncated or corrupt download: {refetch_advice(path.parent)}.") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise BabysitError(f"{path}: its b'data' has shape {data.shape} and b'labels' {labels.shape}; expected (N, 3072) pixels (3 x 32 x 32) and N labels, "
                           f"so it is corrupt or not CIFAR-10: {refetch_advice(path.parent)}.")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic (2 zero bytes, dtype 0x08, ndim), big-endian dims, uint8 data.
    A file cut short or damaged (an interrupted download) is a BabysitError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip's complaints about a cut-off or damaged .gz
        raise BabysitError(f"{path}: cannot be read ({err}), as happens to a truncated or corrupt download: {refetch_advice(path.parent)}.") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise BabysitError(f"{path}: not an IDX file of bytes (MNIST's format, which starts 0x00 0x00 0x08, then the number and sizes of the dimensions); "
                           f"it is corrupt: {refetch_advice(path.parent)}.")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    expected, found = math.prod(int(d) for d in dims), len(raw) - 4 - 4 * ndim
    if found != expected:
        raise BabysitError(f"{path}: truncated or corrupt; its header says {' x '.join(map(str, dims))} = {expected} bytes of data, found {found}; "
                           f"{refetch_advice(path.parent)}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    X, y = [], []
    for split in ("train", "t10k"):
        images_file = _one(folder, f"{split}-images-idx3-ubyte")
        labels_file = _one(folder, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):  # each file whole, but not a pair
            raise BabysitError(f"{folder}: {images_file.name} has shape {images.shape} and {labels_file.name} {labels.shape}; expected (N, height, width) "
                               f"images and (N,) labels, so one of them is truncated, corrupt or from another download: "
                               f"{refetch_advice(folder)}.")
        X.append(images[:, None].astype(np.float32) / 255.0)
        y.append(labels)
    return np.concatenate(X), np.concatenate(y)


def refetch_advice(folder: Path) -> str:
    # read_torchvision fetches only when the folder is missing, and torchvision skips files that exist
    return f"delete {folder} and load again with `data.download: true` (or copy the files there again)"


def _one(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise BabysitError(f"{folder}: missing {stem} (or {stem}.gz).")
