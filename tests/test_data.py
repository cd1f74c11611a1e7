"""Data stage: every source loads into X (float32) and y (0..C-1); bad files fail with the file named."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from babysit.config import DataConfig
from babysit.errors import BabysitError
from tasks.data import Dataset, load_data_task, load_dataset, split_dataset


def table(rows: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=rows), "b": rng.integers(0, 5, rows), "species": rng.choice(["setosa", "virginica", "versicolor"], rows)})


def raises_naming(cfg: DataConfig, *fragments: str) -> str:
    with pytest.raises(BabysitError) as err:
        load_dataset(cfg, seed=0)
    message = str(err.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    return message


def test_digits_is_sklearns_digits():
    data = load_dataset(DataConfig(source="digits"), seed=0)
    reference = load_digits()
    assert data.X.shape == (1797, 64) and data.X.dtype == np.float32
    np.testing.assert_array_equal(data.X, reference.data.astype(np.float32))
    np.testing.assert_array_equal(data.y, reference.target)
    assert data.y.dtype == np.int64
    assert data.classes == [str(d) for d in range(10)]


def test_spiral_shape_classes_and_seeding():
    cfg = DataConfig(source="spiral", n_samples=300, n_classes=3, noise=0.2)
    a, b, c = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    assert a.X.shape == (300, 2) and a.X.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(a.y), [100, 100, 100])
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)
    # points lie on arms of radius 0..1 (the angle noise does not change the radius)
    assert np.linalg.norm(a.X, axis=1).max() <= 1.0 + 1e-6


def test_spiral_class_count_follows_config():
    data = load_dataset(DataConfig(source="spiral", n_samples=500, n_classes=5), seed=0)
    assert len(data.classes) == 5 and data.X.shape == (500, 2)


def test_blobs_shape_classes_and_seeding():
    cfg = DataConfig(source="blobs", n_samples=400, n_classes=4)
    a, b, c = load_dataset(cfg, seed=3), load_dataset(cfg, seed=3), load_dataset(cfg, seed=4)
    assert a.X.shape == (400, 2) and sorted(set(a.y.tolist())) == [0, 1, 2, 3]
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)


def test_csv_with_string_labels(tmp_path):
    frame = table()
    path = tmp_path / "iris.csv"
    frame.to_csv(path, index=False)
    data = load_dataset(DataConfig(source="csv", path=path, target="species"), seed=0)
    np.testing.assert_allclose(data.X, frame[["a", "b"]].to_numpy(np.float32))
    assert data.classes == ["setosa", "versicolor", "virginica"]
    # y indexes `classes`: decoding it gives back the original labels
    assert [data.classes[i] for i in data.y] == frame["species"].tolist()


def test_csv_labels_that_read_alike_as_numbers_stay_apart_and_text_read_as_missing_is_explained(tmp_path):
    # '01' and '1' became one class, silently; a class named NA read as 20 missing labels, unexplained (QA)
    rng = np.random.default_rng(0)
    codes = pd.DataFrame({"a": rng.normal(size=60), "code": ["01", "1", "2"] * 20})
    codes.to_csv(tmp_path / "codes.csv", index=False)
    data = load_dataset(DataConfig(source="csv", path=tmp_path / "codes.csv", target="code"), seed=0)
    assert data.classes == ["01", "1", "2"] and np.bincount(data.y).tolist() == [20, 20, 20]
    numbers = codes.assign(code=[3, 10, 2] * 20)  # plain numbers keep their numeric order (10 after 3)
    numbers.to_csv(tmp_path / "numbers.csv", index=False)
    assert load_dataset(DataConfig(source="csv", path=tmp_path / "numbers.csv", target="code"), seed=0).classes == ["2", "3", "10"]
    codes.assign(code=["EU", "NA", "AS"] * 20).to_csv(tmp_path / "regions.csv", index=False)
    with pytest.raises(BabysitError, match=r"20 labels in column 'code' are text that pandas reads as missing \('NA'\): if that is a class's name, rename it"):
        load_dataset(DataConfig(source="csv", path=tmp_path / "regions.csv", target="code"), seed=0)


def test_data_without_a_feature_is_refused(tmp_path):
    # a CSV of labels only trained a model of 0 inputs and crashed logging it; an NPZ of X (n, 0) crashed in the scaler (QA)
    pd.DataFrame({"label": [0, 1] * 20}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(BabysitError, match="no features left once the target and data.drop_columns are taken out"):
        load_dataset(DataConfig(source="csv", path=tmp_path / "labels.csv", target="label"), seed=0)
    np.savez(tmp_path / "empty.npz", X=np.zeros((40, 0)), y=np.arange(40) % 2)
    with pytest.raises(BabysitError, match="empty.npz: no features; a model needs at least one input"):
        load_dataset(DataConfig(source="npz", path=tmp_path / "empty.npz"), seed=0)


def test_parquet_with_named_target(tmp_path):
    frame = table(seed=1)
    frame["label"] = np.arange(len(frame)) % 2 * 7 + 3  # labels 3 and 10: encoded as 0 and 1
    frame = frame.drop(columns="species")
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    data = load_dataset(DataConfig(source="parquet", path=path, target="label"), seed=0)
    np.testing.assert_allclose(data.X, frame[["a", "b"]].to_numpy(np.float32))
    assert data.classes == ["3", "10"]
    np.testing.assert_array_equal(data.y, (frame["label"] == 10).to_numpy().astype(int))


def test_npz_with_X_and_y(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 4, 50)
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=y)
    data = load_dataset(DataConfig(source="npz", path=path), seed=0)
    np.testing.assert_allclose(data.X, X.astype(np.float32))
    np.testing.assert_array_equal(data.y, np.unique(y, return_inverse=True)[1])


def test_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    raises_naming(DataConfig(source="csv", path=path, target="y"), str(path), "not found")


def test_folder_as_data_file(tmp_path):
    raises_naming(DataConfig(source="csv", path=tmp_path, target="y"), str(tmp_path), "is a folder", "image_folder")


def test_header_without_rows(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,species\n")
    raises_naming(DataConfig(source="csv", path=path, target="species"), str(path), "no rows")


def test_missing_target_column(tmp_path):
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="label"), str(path), "label", "species")


def test_nan_features(tmp_path):
    frame = table()
    frame.loc[5, "a"] = np.nan
    path = tmp_path / "nan.csv"
    frame.to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="species"), str(path), "NaN", "feature columns a)")


def test_infinite_features_in_npz(tmp_path):
    X = np.ones((20, 2))
    X[3, 1] = np.inf
    path = tmp_path / "inf.npz"
    np.savez(path, X=X, y=np.arange(20) % 2)
    raises_naming(DataConfig(source="npz", path=path), str(path), "infinite")


def test_non_numeric_feature_column(tmp_path):
    frame = table()
    frame["colour"] = np.where(frame["b"] > 2, "red", "blue")
    path = tmp_path / "text.parquet"
    frame.to_parquet(path)
    raises_naming(DataConfig(source="parquet", path=path, target="species"), str(path), "colour", "numeric")


def test_single_class(tmp_path):
    frame = table().assign(species="setosa")
    path = tmp_path / "one.csv"
    frame.to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="species"), str(path), "class")


def test_too_few_rows_to_split_names_file(tmp_path):
    # three rows, three classes: no class can have a row in each of train, val and test
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"x": [0.0, 1.0, 2.0], "y": ["a", "b", "c"]}).to_csv(path, index=False)
    cfg = DataConfig(source="csv", path=path, target="y")
    with pytest.raises(BabysitError) as err:
        load_data_task.fn(cfg, seed=0)
    assert str(path) in str(err.value)


def test_fewer_generated_points_than_classes():
    # 2 points for 3 spiral arms: not a usable dataset
    with pytest.raises(BabysitError) as err:
        load_dataset(DataConfig(source="spiral", n_samples=2, n_classes=3), seed=0)
    assert "spiral" in str(err.value)


def test_npz_missing_y(tmp_path):
    path = tmp_path / "noy.npz"
    np.savez(path, X=np.zeros((4, 2)), labels=np.arange(4))
    raises_naming(DataConfig(source="npz", path=path), str(path), "'y'", "labels")


def test_a_table_given_as_npz_is_named_not_an_npz_archive(tmp_path):
    path = tmp_path / "table.npz"
    table().to_csv(path, index=False)
    raises_naming(DataConfig(source="npz", path=path), str(path), "not an NPZ archive", "data.source: csv")


def test_npz_features_may_be_bool_but_not_complex(tmp_path):
    path = tmp_path / "bool.npz"
    np.savez(path, X=np.arange(40).reshape(20, 2) % 3 == 0, y=np.arange(20) % 2)
    assert load_dataset(DataConfig(source="npz", path=path), seed=0).X.dtype == np.float32
    np.savez(path, X=np.ones((20, 2)) * (1 + 2j), y=np.arange(20) % 2)
    raises_naming(DataConfig(source="npz", path=path), str(path), "real numbers", "complex128")


def test_a_value_beyond_float32_is_named_as_such(tmp_path):
    frame = table().astype({"b": float})
    frame.loc[2, "b"] = 1e39
    path = tmp_path / "huge.csv"
    frame.to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="species"), str(path), "beyond float32", "feature columns b)")


def test_unreadable_parquet_names_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    raises_naming(DataConfig(source="parquet", path=path, target="y"), str(path), "parquet")


def test_max_rows_fewer_than_the_classes_need_names_the_field_and_the_least_value(tmp_path):
    path = tmp_path / "fifty.csv"
    pd.DataFrame({"x": np.arange(200.0), "y": np.arange(200) % 50}).to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="y", max_rows=30), str(path), "`data.max_rows` 30", "50 classes", "at least 150")
    assert len(load_dataset(DataConfig(source="csv", path=path, target="y", max_rows=150), seed=0).y) == 150


def test_max_rows_with_a_class_of_one_row_names_the_class(tmp_path):
    path = tmp_path / "rare.csv"
    pd.DataFrame({"x": np.arange(61.0), "y": ["a"] * 30 + ["b"] * 30 + ["c"]}).to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="y", max_rows=20), str(path), "'c' (1 row)", "data.keep_classes")
    assert load_dataset(DataConfig(source="csv", path=path, target="y", max_rows=20, keep_classes=["a", "b"]), seed=0).classes == ["a", "b"]


def test_max_rows_that_would_sample_a_class_below_three_rows_says_how_many_rows_keep_it(tmp_path):
    path = tmp_path / "skewed.csv"
    pd.DataFrame({"x": np.arange(1000.0), "y": ["a"] * 495 + ["b"] * 495 + ["c"] * 10}).to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="y", max_rows=100), str(path), "`data.max_rows` 100 keeps 1 of the 10 rows of class 'c'", "at least 300")
    split = load_data_task.fn(DataConfig(source="csv", path=path, target="y", max_rows=300), seed=0)  # the advice works
    assert len(split.y_train) + len(split.y_val) + len(split.y_test) == 300


def test_max_rows_just_under_the_row_count_leaves_out_fewer_rows_than_classes(tmp_path):
    path = tmp_path / "ten.csv"
    pd.DataFrame({"x": np.arange(100.0), "y": np.arange(100) % 10}).to_csv(path, index=False)
    cfg = DataConfig(source="csv", path=path, target="y", max_rows=95)
    a, b = load_dataset(cfg, seed=0), load_dataset(cfg, seed=0)
    assert len(a.y) == 95 and len(set(a.X[:, 0].tolist())) == 95 and a.classes == [str(c) for c in range(10)]
    np.testing.assert_array_equal(a.X, b.X)  # seeded
    split = load_data_task.fn(cfg, seed=0)
    assert len(split.y_train) + len(split.y_val) + len(split.y_test) == 95


def data_of(n_rows: int, weights: list[float], seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.choice(len(weights), size=n_rows, p=weights)
    X = np.c_[np.arange(n_rows), rng.normal(size=n_rows)].astype(np.float32)  # column 0: row id
    return Dataset(X=X, y=y.astype(np.int64), classes=[str(c) for c in range(len(weights))], origin="test")


def test_split_fractions_disjoint_and_covering():
    data = data_of(1000, [0.5, 0.3, 0.2])
    s = split_dataset(data, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert len(s.y_train) == pytest.approx(700, abs=2)
    assert len(s.y_val) == pytest.approx(200, abs=2)
    assert len(s.y_test) == pytest.approx(100, abs=2)
    ids = [s.X_train[:, 0], s.X_val[:, 0], s.X_test[:, 0]]
    all_ids = np.concatenate(ids)
    assert len(all_ids) == 1000 and len(np.unique(all_ids)) == 1000  # disjoint and covering
    # each row keeps its own label
    for X_part, y_part in [(s.X_train, s.y_train), (s.X_val, s.y_val), (s.X_test, s.y_test)]:
        np.testing.assert_array_equal(y_part, data.y[X_part[:, 0].astype(int)])


def test_a_fraction_too_small_for_a_row_of_each_class_names_the_field_and_its_least_value():
    data = data_of(300, [0.5, 0.3, 0.2])
    with pytest.raises(BabysitError, match=r"data.val_fraction 0.005 leaves 1.5 of 300 rows for 3 classes; .* set data.val_fraction to at least 0.01"):
        split_dataset(data, val_fraction=0.005, test_fraction=0.2, seed=0)


def test_too_few_rows_for_any_split_says_so_instead_of_a_fraction():
    with pytest.raises(BabysitError, match=r"40 rows for 30 classes; .* at least 3 rows of each class \(90 rows\): use more rows \(data.max_rows\)"):
        split_dataset(data_of(40, [1 / 30] * 30), val_fraction=0.15, test_fraction=0.15, seed=0)


def test_split_is_stratified():
    data = data_of(2000, [0.7, 0.2, 0.1])
    overall = np.bincount(data.y) / len(data.y)
    s = split_dataset(data, val_fraction=0.15, test_fraction=0.15, seed=0)
    for y_part in (s.y_train, s.y_val, s.y_test):
        np.testing.assert_allclose(np.bincount(y_part, minlength=3) / len(y_part), overall, atol=0.01)


def test_split_is_seeded():
    data = data_of(500, [0.5, 0.5])
    a, b, c = (split_dataset(data, 0.15, 0.15, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_train[:, 0], c.X_train[:, 0])


def test_load_data_task_fn_splits_digits():
    s = load_data_task.fn(DataConfig(source="digits", val_fraction=0.2, test_fraction=0.2), seed=0)
    assert s.n_features == 64 and s.n_classes == 10
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 1797
    assert len(s.y_test) == pytest.approx(0.2 * 1797, abs=1)


def test_the_data_fingerprint_changes_when_user_data_is_rewritten_in_place(tmp_path):
    import os

    from tasks.data import data_fingerprint

    csv = tmp_path / "rows.csv"
    csv.write_text("a,label\n1,x\n2,y\n")
    as_file = DataConfig(source="csv", path=csv, target="label")
    before = data_fingerprint(as_file)
    assert before and data_fingerprint(as_file) == before  # unchanged data: the same version
    csv.write_text("a,label\n1,y\n2,x\n")  # same size
    os.utime(csv, ns=(1, 1))
    assert data_fingerprint(as_file) != before
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"x")
    elsewhere = tmp_path / "dogs"
    elsewhere.mkdir()
    (folder / "dog").symlink_to(elsewhere)  # a class folder that lives elsewhere: the loader reads it
    as_folder = DataConfig(source="image_folder", path=folder)
    first = data_fingerprint(as_folder)
    (folder / ".DS_Store").write_bytes(b"finder")  # files the loader does not read change nothing
    (folder / "cat" / "._1.png").write_bytes(b"apple double")
    (folder / "cat" / "notes.txt").write_text("n")
    assert data_fingerprint(as_folder) == first
    (elsewhere / "2.png").write_bytes(b"y")
    assert data_fingerprint(as_folder) != first
    assert data_fingerprint(DataConfig(source="digits")) == ""  # built in: nothing to version
    assert data_fingerprint(DataConfig(source="digits", path=csv)) == ""  # a path that digits does not read
    root = tmp_path / "torchvision"  # a root that holds several datasets: only MNIST's own files count for mnist
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"1")
    mnist = DataConfig(source="mnist", path=root)
    before = data_fingerprint(mnist)
    (root / "cifar-10-batches-py").mkdir()
    (root / "cifar-10-batches-py" / "readme.html").write_text("r")
    (root / "MNIST" / "raw" / ".DS_Store").write_bytes(b"finder")
    assert data_fingerprint(mnist) == before
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"2")
    assert data_fingerprint(mnist) != before


def test_keep_classes_naming_a_label_no_row_has_says_which(tmp_path):
    path = tmp_path / "animals.csv"
    pd.DataFrame({"x": np.arange(30.0), "y": ["cat", "dog", "cow "] * 10}).to_csv(path, index=False)  # 'cow ' with a space: a typo to catch
    raises_naming(DataConfig(source="csv", path=path, target="y", keep_classes=["cat", "cow"]), str(path), "`data.keep_classes` names 'cow'", "labels: cat, cow , dog")
    assert load_dataset(DataConfig(source="csv", path=path, target="y", keep_classes=["cat", "dog"]), seed=0).classes == ["cat", "dog"]


def test_the_least_fraction_advised_is_rounded_up_so_that_it_works():
    from tasks.data import Dataset, split_dataset

    data = Dataset(np.arange(12.0).reshape(6, 2), np.array([0, 1] * 3), ["0", "1"], "six rows")
    with pytest.raises(BabysitError, match=r"data.test_fraction 0.33 leaves 1.98 of 6 rows for 2 classes; .* at least 0.34\."):
        split_dataset(data, 0.34, 0.33, seed=0)


def test_a_class_of_one_or_two_rows_is_named_with_advice_that_can_work(tmp_path):
    # was "change the fractions", which cannot help, with sklearn's class number ([3]) instead of the label (QA)
    path = tmp_path / "rare.csv"
    pd.DataFrame({"x": np.arange(62.0), "y": ["a"] * 30 + ["b"] * 30 + ["nine"] * 2}).to_csv(path, index=False)
    message = raises_naming(DataConfig(source="csv", path=path, target="y"), str(path), "'nine' (2 rows)", "fewer than 3 rows", "data.keep_classes")
    assert "fractions" not in message and "[" not in message


def test_a_csv_whose_header_repeats_a_name_or_leaves_one_out_is_refused(tmp_path):
    # pandas renamed the second 'label' to 'label.1', a copy of the label among the features; a saved row index read as 'Unnamed: 0' (QA)
    frame = table()
    repeated = tmp_path / "repeated.csv"
    frame.assign(copy=frame["species"]).to_csv(repeated, index=False, header=["a", "b", "species", "species"])
    raises_naming(DataConfig(source="csv", path=repeated, target="species"), str(repeated), "'species' more than once")
    indexed = tmp_path / "indexed.csv"
    frame.to_csv(indexed)  # with its row index, whose header cell is empty
    raises_naming(DataConfig(source="csv", path=indexed, target="species"), str(indexed), "column(s) 1 have no name", "index=False")
    semicolons = tmp_path / "semicolons.csv"
    frame.to_csv(semicolons, sep=";", index=False)
    raises_naming(DataConfig(source="csv", path=semicolons, target="species"), str(semicolons), "read as one column", "commas")


def test_npz_labels_stored_as_bytes_read_as_text_and_one_hot_labels_are_named(tmp_path):
    X = np.random.default_rng(0).normal(size=(30, 3))
    path = tmp_path / "bytes.npz"
    np.savez(path, X=X, y=np.array([b"cat", b"dog", b"emu"] * 10))
    assert load_dataset(DataConfig(source="npz", path=path), seed=0).classes == ["cat", "dog", "emu"]  # was "b'cat'"
    one_hot = tmp_path / "one_hot.npz"
    np.savez(one_hot, X=X, y=np.eye(3)[np.arange(30) % 3])
    raises_naming(DataConfig(source="npz", path=one_hot), str(one_hot), "looks one-hot", "argmax")


def test_a_continuous_target_is_said_to_look_like_regression(tmp_path):
    path = tmp_path / "prices.csv"
    pd.DataFrame({"x": np.arange(50.0), "price": np.random.default_rng(0).normal(size=50)}).to_csv(path, index=False)
    raises_naming(DataConfig(source="csv", path=path, target="price"), str(path), "50 classes", "look continuous")


def test_a_data_path_with_a_tilde_is_read_from_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    table().to_csv(tmp_path / "home.csv", index=False)
    cfg = DataConfig(source="csv", path="~/home.csv", target="species")
    assert cfg.path == tmp_path / "home.csv" and len(load_dataset(cfg, seed=0).y) == 60


def test_an_image_folder_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "pictures.zip").write_bytes(b"zip")
    raises_naming(DataConfig(source="image_folder", path=tmp_path / "pictures.zip"), "a file, not a folder", "one sub-folder of images per class")


def test_a_column_that_numbers_the_rows_is_refused_until_dropped(tmp_path):
    # a named `id` column trained as a feature: "41 -> 64 -> 64 -> 3" for 40 real features (QA)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(90, 3)), columns=["a", "b", "c"]).assign(kind=np.repeat(["cat", "dog", "owl"], 30))
    path = tmp_path / "table.csv"
    frame.assign(id=np.arange(1, 91)).to_csv(path, index=False)
    with pytest.raises(BabysitError, match=r"column 'id' numbers the rows \(1, 2, 3, \.\.\.\).*List it in `data.drop_columns`"):
        load_dataset(DataConfig(source="csv", path=path, target="kind"), seed=0)
    data = load_dataset(DataConfig(source="csv", path=path, target="kind", drop_columns=["id"]), seed=0)
    assert data.X.shape == (90, 3)
    with pytest.raises(BabysitError, match=r"`data.drop_columns` names 'ID', which the file has no column of"):
        load_dataset(DataConfig(source="csv", path=path, target="kind", drop_columns=["ID"]), seed=0)
    frame.assign(note=["x"] * 90).to_csv(path, index=False)
    with pytest.raises(BabysitError, match=r"but note holds text"):  # was "note hold text"
        load_dataset(DataConfig(source="csv", path=path, target="kind"), seed=0)
