"""Preprocessing is fitted on the training split only, and is exactly the affine map it claims to be."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from babysit.config import PreprocessConfig
from babysit.errors import BabysitError
from tasks.data import Dataset, Splits, split_dataset
from tasks.preprocess import affine_parameters, fit_preprocess, preprocess_task

METHODS = ["none", "center", "standardize", "pca", "whiten"]


def shifted_splits(seed: int = 0, n_features: int = 5) -> Splits:
    """Correlated Gaussian features; val and test come from a distribution shifted by +3 and scaled ×2."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n_features, n_features))
    scales = np.array([5.0, 1.0, 0.3, 2.0, 10.0])[:n_features]

    def draw(n: int, shift: float, scale: float) -> np.ndarray:
        return ((rng.normal(size=(n, n_features)) @ mixing) * scales * scale + 10.0 + shift).astype(np.float32)

    y = lambda n: (np.arange(n) % 2).astype(np.int64)  # noqa: E731
    return Splits(draw(2000, 0, 1), y(2000), draw(500, 3.0, 2.0), y(500), draw(500, 3.0, 2.0), y(500), ["0", "1"])


@pytest.fixture(scope="module")
def splits() -> Splits:
    return shifted_splits()


def test_center_uses_training_mean_only(splits):
    prepared = fit_preprocess(splits, PreprocessConfig(method="center"))
    X_train = splits.X_train.astype(np.float64)
    np.testing.assert_allclose(prepared.transformer.mean_, X_train.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(prepared.splits.X_train.mean(axis=0), 0.0, atol=1e-4)
    # centering keeps the scale
    np.testing.assert_allclose(prepared.splits.X_train.std(axis=0), X_train.std(axis=0), rtol=1e-5)
    # val was drawn with a +3 shift: its transformed mean is that shift, not 0
    val_mean = prepared.splits.X_val.mean(axis=0)
    np.testing.assert_allclose(val_mean, splits.X_val.mean(axis=0) - X_train.mean(axis=0), rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(val_mean) > 1.0)


def test_standardize_uses_training_mean_and_std_only(splits):
    prepared = fit_preprocess(splits, PreprocessConfig(method="standardize"))
    X_train = splits.X_train.astype(np.float64)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    np.testing.assert_allclose(prepared.transformer.mean_, mean, rtol=1e-10)
    np.testing.assert_allclose(prepared.splits.X_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(prepared.splits.X_train.std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(prepared.splits.X_test, (splits.X_test - mean) / std, rtol=1e-4, atol=1e-4)
    # val's scale is ×2 and its mean shifted: neither is normalised away
    assert np.all(np.abs(prepared.splits.X_val.mean(axis=0)) > 0.1)
    np.testing.assert_allclose(prepared.splits.X_val.std(axis=0), 2.0, rtol=0.1)


def test_pca_keeps_requested_components_and_decorrelates_train(splits):
    prepared = fit_preprocess(splits, PreprocessConfig(method="pca", pca_components=3))
    Z = prepared.splits.X_train.astype(np.float64)
    assert Z.shape == (2000, 3) and prepared.splits.X_val.shape == (500, 3)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-3)
    cov = np.cov(Z, rowvar=False)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-3 * cov.max())
    # the variances are the top eigenvalues of the training covariance, in decreasing order
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(splits.X_train.astype(np.float64), rowvar=False)))[::-1]
    np.testing.assert_allclose(np.diag(cov), eigenvalues[:3], rtol=1e-4)


def test_pca_variance_fraction_keeps_enough_components(splits):
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(splits.X_train.astype(np.float64), rowvar=False)))[::-1]
    explained = np.cumsum(eigenvalues) / eigenvalues.sum()
    expected = int(np.searchsorted(explained, 0.9) + 1)  # fewest components explaining >= 90%
    prepared = fit_preprocess(splits, PreprocessConfig(method="pca", pca_components=0.9))
    assert prepared.splits.n_features == expected


def test_whiten_gives_identity_covariance_on_train_only(splits):
    prepared = fit_preprocess(splits, PreprocessConfig(method="whiten", pca_components=5))
    Z = prepared.splits.X_train.astype(np.float64)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(5), atol=1e-3)
    # val: shifted and scaled ×2, so neither centred nor of unit covariance
    Zv = prepared.splits.X_val.astype(np.float64)
    assert np.abs(Zv.mean(axis=0)).max() > 0.1
    np.testing.assert_allclose(np.diag(np.cov(Zv, rowvar=False)), 4.0, rtol=0.25)


def test_whitening_a_direction_without_variance_is_a_user_error(splits):
    """Digits: pixels that are blank in every training image. Whitened with all 64 components they
    were divided by ~1e-15, and a test image with ink there became ~1e15."""
    def blank(X: np.ndarray) -> np.ndarray:
        return np.column_stack([X, np.zeros(len(X), np.float32)])

    flat = replace(splits, X_train=blank(splits.X_train), X_val=blank(splits.X_val), X_test=blank(splits.X_test))
    flat.X_test[0, 5] = 16.0  # the test split has it
    with pytest.raises(BabysitError) as err:
        fit_preprocess(flat, PreprocessConfig(method="whiten", pca_components=6))
    assert "pca_components" in str(err.value) and "only 5 directions" in str(err.value) and "at most 5" in str(err.value)
    prepared = fit_preprocess(flat, PreprocessConfig(method="whiten", pca_components=5))
    assert np.abs(prepared.splits.X_test).max() < 100
    fit_preprocess(flat, PreprocessConfig(method="pca", pca_components=6))  # PCA divides by nothing: all components are fine


def affine(X: np.ndarray, prepared) -> np.ndarray:
    weight = prepared.weight.astype(np.float64)
    return (X @ weight if weight.ndim == 2 else X * weight) + prepared.bias


@pytest.mark.parametrize("method", METHODS)
def test_affine_parameters_reproduce_transform(splits, method):
    prepared = fit_preprocess(splits, PreprocessConfig(method=method, pca_components=4))
    X = np.random.default_rng(1).normal(5.0, 20.0, size=(64, splits.n_features))
    expected = prepared.transformer.transform(X)
    np.testing.assert_allclose(affine(X, prepared), expected, rtol=1e-4, atol=1e-3)
    W, b = affine_parameters(prepared.transformer, splits.n_features)
    np.testing.assert_allclose(W, np.diag(prepared.weight) if prepared.weight.ndim == 1 else prepared.weight)  # the full matrix's diagonal
    np.testing.assert_array_equal(b, prepared.bias)


def test_per_feature_methods_keep_a_vector_not_a_matrix():
    # 8,000 columns standardized kept an 8,000 x 8,000 first layer in the logged model: 248 MB, and 1.5 GB of memory (QA)
    X = np.random.default_rng(1).normal(size=(40, 3000)).astype(np.float32)
    wide = split_dataset(Dataset(X, np.arange(40) % 2, ["0", "1"], "wide"), 0.2, 0.2, seed=0)
    for method in ("none", "center", "standardize"):
        prepared = fit_preprocess(wide, PreprocessConfig(method=method))
        assert prepared.weight.shape == (3000,)
        np.testing.assert_allclose(affine(wide.X_val.astype(np.float64), prepared), prepared.splits.X_val, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_splits_are_the_transform_of_the_raw_splits(splits, method):
    prepared = fit_preprocess(splits, PreprocessConfig(method=method, pca_components=4))
    for raw, done in [(splits.X_train, prepared.splits.X_train), (splits.X_val, prepared.splits.X_val), (splits.X_test, prepared.splits.X_test)]:
        assert done.dtype == np.float32
        np.testing.assert_allclose(done, affine(raw.astype(np.float64), prepared), rtol=1e-4, atol=1e-3)
    # labels pass through untouched
    np.testing.assert_array_equal(prepared.splits.y_val, splits.y_val)


def test_none_is_identity(splits):
    prepared = fit_preprocess(splits, PreprocessConfig(method="none"))
    np.testing.assert_array_equal(prepared.splits.X_val, splits.X_val)
    np.testing.assert_array_equal(prepared.weight, np.ones(splits.n_features, dtype=np.float32))
    np.testing.assert_array_equal(prepared.bias, 0.0)


def test_too_many_pca_components_is_a_user_error(splits):
    with pytest.raises(BabysitError) as err:
        fit_preprocess(splits, PreprocessConfig(method="pca", pca_components=9))
    assert "pca_components" in str(err.value)


def test_preprocess_task_fn_fits(splits):
    prepared = preprocess_task.fn(splits, PreprocessConfig(method="standardize"))
    np.testing.assert_allclose(prepared.splits.X_train.mean(axis=0), 0.0, atol=1e-4)
