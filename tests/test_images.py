"""Image data, CNNs and batch-wise augmentation: on-disk formats generated here, real training."""

from __future__ import annotations

import gzip
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from babysit import tracking
from babysit.config import Config, DataConfig, PreprocessConfig, load_config
from babysit.errors import BabysitError
from flows.train import train_flow
from tasks.augment import augment_batch
from tasks.data import load_dataset, split_dataset
from tasks.images import read_idx
from tasks.preprocess import fit_preprocess


def bars(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy image of a vertical or horizontal bar at a random position (two easy classes)."""
    image = rng.uniform(0, 60, (size, size))
    where = rng.integers(1, size - 1)
    if kind == "vertical":
        image[:, where] = 255
    else:
        image[where, :] = 255
    return image.astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for kind in ("horizontal", "vertical"):
        (tmp_path / "imgs" / kind).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(bars(kind, 12, rng)).convert("RGB").save(tmp_path / "imgs" / kind / f"{i}.png")
    (tmp_path / "imgs" / "vertical" / "notes.txt").write_text("not an image: skipped")
    return tmp_path / "imgs"


def test_image_folder_reads_one_class_per_subfolder(image_folder):
    data = load_dataset(DataConfig(source="image_folder", path=image_folder, image_size=8, channels=3), seed=0)
    assert data.X.shape == (60, 3, 8, 8) and data.classes == ["horizontal", "vertical"]
    assert 0.0 <= data.X.min() and data.X.max() <= 1.0
    grey = load_dataset(DataConfig(source="image_folder", path=image_folder, image_size=10, channels=1), seed=0)
    assert grey.X.shape == (60, 1, 10, 10)
    # what a Mac or Jupyter leaves behind is neither a class nor an image
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / "vertical" / "._0.png").write_bytes(b"AppleDouble: not a png")
    again = load_dataset(DataConfig(source="image_folder", path=image_folder, image_size=8, channels=3), seed=0)
    assert again.X.shape == (60, 3, 8, 8) and again.classes == ["horizontal", "vertical"]
    # images in a symlinked folder inside a class count, as in torchvision's ImageFolder; a link back up is walked once
    elsewhere = image_folder.parent / "more"
    elsewhere.mkdir()
    for i in range(3):
        (image_folder / "vertical" / f"{i}.png").rename(elsewhere / f"{i}.png")
    (image_folder / "vertical" / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(image_folder / "vertical")
    (image_folder / "vertical" / "folder.png").mkdir()  # a folder named like an image is a folder
    linked = load_dataset(DataConfig(source="image_folder", path=image_folder, image_size=8, channels=3), seed=0)
    assert linked.X.shape == (60, 3, 8, 8)


def test_broken_image_folders_are_named(tmp_path):
    with pytest.raises(BabysitError, match="not found"):
        load_dataset(DataConfig(source="image_folder", path=tmp_path / "nope"), seed=0)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(BabysitError, match="hold no images"):
        load_dataset(DataConfig(source="image_folder", path=tmp_path / "empty"), seed=0)
    (tmp_path / "some" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "some" / "a" / "0.png")
    (tmp_path / "some" / "b").mkdir()
    (tmp_path / "some" / "b" / ".DS_Store").write_bytes(b"finder")
    with pytest.raises(BabysitError, match=r"class folder\(s\) b hold no images"):  # not a model with a class fewer than the folder shows
        load_dataset(DataConfig(source="image_folder", path=tmp_path / "some"), seed=0)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(BabysitError, match="x.png"):
        load_dataset(DataConfig(source="image_folder", path=tmp_path / "bad"), seed=0)


def test_an_image_over_pillows_pixel_limit_is_named_with_the_limit(tmp_path, monkeypatch):
    # a 15000 x 15000 scan raised Pillow's DecompressionBombError as a raw traceback (QA); the limit lowered to keep the test small
    for label in "ab":
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (8, 8)).save(tmp_path / label / f"{i}.png")
    Image.new("L", (32, 32)).save(tmp_path / "a" / "scan.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # Pillow refuses twice its limit: 1024 pixels > 800
    with pytest.raises(BabysitError, match=r"scan.png: more pixels than Pillow opens \(800, twice PIL.Image.MAX_IMAGE_PIXELS\)"):
        load_dataset(DataConfig(source="image_folder", path=tmp_path, image_size=8, channels=1), seed=0)


# 16-bit PNGs open as I;16, big-endian 16-bit TIFFs as I;16B, 32-bit int TIFFs as I, float TIFFs as F (0..1)
HIGH_BIT = {"I;16": (".png", lambda v8: (v8 * 257).astype(np.uint16)), "I;16B": (".tif", lambda v8: (v8 * 257).astype(">u2")),
            "I": (".tif", lambda v8: (v8 * 257).astype(np.int32)), "F": (".tif", lambda v8: (v8 / 255).astype(np.float32))}


@pytest.mark.parametrize("mode", HIGH_BIT)
def test_high_bit_grey_images_read_like_their_8_bit_copies(tmp_path, mode):
    suffix, widen = HIGH_BIT[mode]
    rng = np.random.default_rng(3)
    for label in ("a", "b"):
        for folder in ("8bit", "wide"):
            (tmp_path / folder / label).mkdir(parents=True)
        for i in range(3):
            v8 = rng.integers(0, 256, (10, 10))
            Image.fromarray(v8.astype(np.uint8)).save(tmp_path / "8bit" / label / f"{i}.png")
            Image.fromarray(widen(v8)).save(tmp_path / "wide" / label / f"{i}{suffix}")
    with Image.open(tmp_path / "wide" / "a" / f"0{suffix}") as image:
        assert image.mode == mode  # the mode under test is the one Pillow reads back
    for channels in (1, 3):
        reference = load_dataset(DataConfig(source="image_folder", path=tmp_path / "8bit", image_size=6, channels=channels), seed=0)
        wide = load_dataset(DataConfig(source="image_folder", path=tmp_path / "wide", image_size=6, channels=channels), seed=0)
        assert wide.X.shape == reference.X.shape == (6, channels, 6, 6)
        np.testing.assert_allclose(wide.X, reference.X, atol=1 / 255)  # the 8-bit copy is resized in whole levels


def test_16_bit_classes_keep_their_levels_instead_of_clipping_to_white(tmp_path):
    # QA's case: convert("L") clipped both classes to 255, so they read as the same all-white image
    rng = np.random.default_rng(4)
    for label, level in (("dark", 8000), ("bright", 50000)):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.fromarray((level + rng.integers(0, 100, (8, 8))).astype(np.uint16)).save(tmp_path / label / f"{i}.png")
    data = load_dataset(DataConfig(source="image_folder", path=tmp_path, image_size=8, channels=1), seed=0)
    for label, level in (("dark", 8000), ("bright", 50000)):
        pixels = data.X[data.y == data.classes.index(label)]
        assert pixels.min() >= level / 65535 and pixels.max() <= (level + 99) / 65535
    (tmp_path / "dark" / "0.png").unlink()
    Image.fromarray(np.full((8, 8), 2.0, dtype=np.float32)).save(tmp_path / "dark" / "hdr.tif")  # a float image beyond 0..1
    with pytest.raises(BabysitError, match=r"hdr.tif: 64 pixel values outside 0..1 \(found 2..2\)"):
        load_dataset(DataConfig(source="image_folder", path=tmp_path, image_size=8, channels=1), seed=0)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_mnist_style_files_in_torchvisions_layout(tmp_path, name, folder):
    rng = np.random.default_rng(1)
    raw = tmp_path / folder
    raw.mkdir(parents=True)
    images = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (12, 28, 28))}
    labels = {"train": np.arange(30) % 3, "t10k": np.arange(12) % 3}
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images[split])
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels[split])
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte.gz"), images["train"])
    data = load_dataset(DataConfig(source=name, path=tmp_path), seed=0)
    assert data.X.shape == (42, 1, 28, 28) and data.classes == ["0", "1", "2"]
    assert np.allclose(data.X[0, 0] * 255, images["train"][0])


def test_truncated_or_mismatched_idx_files_name_the_file_and_say_to_fetch_again(tmp_path):
    rng = np.random.default_rng(5)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, rows in (("train", 40), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (rows, 24, 24)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(rows) % 4)
    cfg = DataConfig(source="mnist", path=tmp_path)
    assert load_dataset(cfg, seed=0).X.shape == (50, 1, 24, 24)
    images = raw / "train-images-idx3-ubyte.gz"
    whole = gzip.decompress(images.read_bytes())
    images.unlink()
    plain = raw / "train-images-idx3-ubyte"
    plain.write_bytes(whole[: len(whole) // 2])  # half of an unpacked download
    expected = 40 * 24 * 24
    with pytest.raises(BabysitError, match=rf"{re.escape(str(plain))}: truncated or corrupt; its header says 40 x 24 x 24 = {expected} bytes of data, found {len(whole) // 2 - 16}; delete {re.escape(str(raw))}"):
        load_dataset(cfg, seed=0)
    plain.unlink()
    images.write_bytes(gzip.compress(whole)[:-100])  # a download cut off inside the gzip stream
    with pytest.raises(BabysitError, match=rf"{re.escape(str(images))}: cannot be read .* truncated or corrupt download: delete {re.escape(str(raw))}"):
        load_dataset(cfg, seed=0)
    images.write_bytes(gzip.compress(whole))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(30) % 4)  # labels of another download
    with pytest.raises(BabysitError, match=r"train-images-idx3-ubyte.gz has shape \(40, 24, 24\) and train-labels-idx1-ubyte.gz \(30,\); expected \(N, height, width\)"):
        load_dataset(cfg, seed=0)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(np.arange(20) % 10)}
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_dataset(DataConfig(source="cifar10", path=tmp_path, max_rows=30), seed=0)
    assert data.X.shape == (30, 3, 32, 32) and len(data.classes) == 10
    with pytest.raises(BabysitError, match="cifar10"):
        load_dataset(DataConfig(source="cifar10", path=tmp_path / "missing"), seed=0)
    # damaged the ways an interrupted download or a wrong file leaves it: one paragraph each, not a traceback (QA)
    whole = (folder / "data_batch_1").read_bytes()
    damaged = {"truncated": whole[:500], "text": b"not a pickle at all",
               "no labels": pickle.dumps({b"data": np.zeros((20, 3072), np.uint8)}),
               "narrow": pickle.dumps({b"data": np.zeros((30, 1024), np.uint8), b"labels": [0] * 30})}  # 30 x 1024 = 10 rows of 3072, silently
    for what, content in damaged.items():
        (folder / "data_batch_1").write_bytes(content)
        with pytest.raises(BabysitError, match=rf"{re.escape(str(folder / 'data_batch_1'))}: .*corrupt.*delete {re.escape(str(folder))}"):
            load_dataset(DataConfig(source="cifar10", path=tmp_path), seed=0)


def test_per_channel_standardisation_is_fitted_on_training_pixels():
    data = load_dataset(DataConfig(source="digits_images"), seed=0)
    splits = split_dataset(data, 0.15, 0.15, seed=0)
    prepared = fit_preprocess(splits, PreprocessConfig(method="standardize"))
    train = prepared.splits.X_train
    assert train.shape[1:] == (1, 8, 8)
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1) < 1e-4
    mean, std = splits.X_train.mean(), splits.X_train.std()
    assert np.allclose(prepared.splits.X_val, (splits.X_val - mean) / std, atol=1e-4)  # val uses train's stats


def test_cnn_needs_images_and_images_refuse_pca(tmp_path):
    with pytest.raises(BabysitError, match="model.kind 'cnn' needs image data"):
        load_config("conf/digits_mlp.yaml", ["model.kind=cnn"])
    with pytest.raises(BabysitError, match="per channel"):
        load_config("conf/digits_mlp.yaml", ["data.source=digits_images", "preprocess.method=pca"])


def test_flip_mirrors_about_half_of_the_batch():
    x = torch.arange(2 * 16.0).view(2, 1, 4, 4).repeat(200, 1, 1, 1)
    out = augment_batch(x, flip=True, translate=0, generator=torch.Generator().manual_seed(0))
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | mirrored).all()
    assert 0.4 < mirrored.float().mean() < 0.6


def test_translate_shifts_whole_pixels_and_pads_with_zeros():
    x = torch.rand(500, 1, 6, 6) + 1.0  # no zeros inside
    out = augment_batch(x, flip=False, translate=2, generator=torch.Generator().manual_seed(0))
    for original, moved in zip(x, out):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3) if shifted_equal(original[0], moved[0], dx, dy)]
        assert len(matches) == 1
    assert (out == 0).any() and (out == x).flatten(1).all(1).any()  # some images unshifted


def shifted_equal(a: torch.Tensor, b: torch.Tensor, dx: int, dy: int) -> bool:
    """b is a moved dx right and dy down, zeros where a has no pixels."""
    expected = torch.zeros_like(a)
    h, w = a.shape
    expected[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return torch.equal(expected, b)


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_cnns_train_on_an_image_folder_through_the_train_flow(prefect_harness, tracking_uri, image_folder, kind):
    summary = train_flow(
        config="conf/digits_mlp.yaml",
        overrides=[f"data.path={image_folder}", "data.source=image_folder", "data.image_size=12", f"model.kind={kind}",
                   "model.channels=[8,16]", "model.batchnorm=true", "train.epochs=4", "train.batch_size=16",
                   "optim.lr=3e-3", "train.flip=true", "train.translate=1", "train.threads=1"],
    )
    run = tracking.get_run(tracking_uri, summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.kind"] == kind
    assert summary.best_val_acc >= 0.8 and summary.test_acc >= 0.7
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{summary.run_id}/model")
    raw = load_dataset(Config(data={"source": "image_folder", "path": image_folder, "image_size": 12}).data, seed=0)
    with torch.no_grad():
        predictions = model(torch.as_tensor(raw.X)).argmax(1).numpy()
    assert (predictions == raw.y).mean() >= 0.7  # the logged model takes raw pixels


def test_cnn_on_digits_images_through_the_train_flow(prefect_harness, tracking_uri):
    summary = train_flow(config="conf/digits_mlp.yaml", overrides=["data.source=digits_images", "model.kind=cnn", "model.channels=[16,32]",
                                                                  "model.batchnorm=true", "train.epochs=6", "optim.lr=3e-3", "train.threads=1"])
    assert summary.best_val_acc > 0.85
