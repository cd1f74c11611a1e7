"""Preprocessing stage: the lecture's zero-center / unit variance / PCA / whitening.

The transform is fitted on the training split only and applied to val and test. Every method
is affine (x -> x @ W + b), so the fitted transform also becomes a fixed first layer of the
logged model: predictions on raw inputs go through exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.base import TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from babysit.config import PreprocessConfig
from babysit.errors import BabysitError
from tasks.data import Splits


@dataclass(frozen=True)
class Prepared:
    splits: Splits  # transformed features
    transformer: TransformerMixin  # fitted on the training split
    # transform(x) == x @ weight + bias with weight (raw features, features) for pca and whiten; a method
    # that scales each feature alone (none, center, standardize) keeps (features,): x * weight + bias, as
    # a matrix its size grew with the square of the columns (8,000 columns: a 248-MB model, QA); images: (channels,) scales
    weight: np.ndarray
    bias: np.ndarray  # (features,); images: (channels,) shifts


def make_transformer(cfg: PreprocessConfig, n_train: int, n_features: int) -> TransformerMixin:
    if cfg.method == "none":
        return FunctionTransformer()
    if cfg.method in ("center", "standardize"):
        return StandardScaler(with_std=cfg.method == "standardize")
    components = cfg.pca_components
    if isinstance(components, int) and components > min(n_train, n_features):
        raise BabysitError(
            f"`preprocess.pca_components` is {components}, but the training split has {n_train} rows and "
            f"{n_features} features; PCA can keep at most {min(n_train, n_features)} components."
        )
    return PCA(n_components=components, whiten=cfg.method == "whiten", svd_solver="full")


FLAT_VARIANCE = 1e-12  # a component's variance below this share of the largest one is rounding error: the split is flat there


def check_whitened_directions_vary(pca: PCA) -> None:
    """Whitening divides each kept component by its standard deviation: a direction in which the
    training split does not vary (a feature constant there, or one that others determine) would
    be divided by ~1e-16, and a validation or test row that moves along it becomes ~1e15."""
    variances = pca.explained_variance_
    varying = int((variances > FLAT_VARIANCE * variances[0]).sum())
    if varying < len(variances):
        raise BabysitError(
            f"`preprocess.pca_components` keeps {len(variances)} components for method whiten, but the training split varies "
            f"in only {varying} directions (the others have no variance: constant features, or features that others determine), "
            f"and whitening would divide by their zero spread. Keep at most {varying} (`preprocess.pca_components: {varying}`), "
            "or give a share of the variance such as 0.99."
        )


def affine_parameters(transformer: TransformerMixin, n_features: int, per_feature: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Recover W, b of a fitted affine transformer by probing it with 0 and the unit vectors; with
    `per_feature` (a transformer that scales each feature alone), the diagonal of W, probed with ones."""
    bias = transformer.transform(np.zeros((1, n_features), dtype=np.float64))[0]
    probe = np.ones((1, n_features), dtype=np.float64) if per_feature else np.eye(n_features, dtype=np.float64)
    weight = transformer.transform(probe) - bias
    return (weight[0] if per_feature else weight).astype(np.float32), bias.astype(np.float32)


def fit_channel_preprocess(splits: Splits, cfg: PreprocessConfig) -> Prepared:
    """Images: the lecture's CNN recipe, a mean (and std) per channel, fitted on training pixels."""
    channels = splits.X_train.shape[1]
    scaler = StandardScaler(with_mean=cfg.method != "none", with_std=cfg.method == "standardize")
    scaler.fit(splits.X_train.transpose(0, 2, 3, 1).reshape(-1, channels).astype(np.float64))

    def apply(X: np.ndarray) -> np.ndarray:
        pixels = scaler.transform(X.transpose(0, 2, 3, 1).reshape(-1, channels).astype(np.float64))
        return pixels.reshape(X.shape[0], X.shape[2], X.shape[3], channels).transpose(0, 3, 1, 2).astype(np.float32)

    transformed = replace(splits, X_train=apply(splits.X_train), X_val=apply(splits.X_val), X_test=apply(splits.X_test))
    # per channel: x * weight[c] + bias[c]
    weight, bias = affine_parameters(scaler, channels, per_feature=True)
    return Prepared(transformed, scaler, weight, bias)


def fit_preprocess(splits: Splits, cfg: PreprocessConfig) -> Prepared:
    if splits.X_train.ndim == 4:
        return fit_channel_preprocess(splits, cfg)
    transformer = make_transformer(cfg, len(splits.X_train), splits.n_features)
    transformer.fit(splits.X_train.astype(np.float64))
    if cfg.method == "whiten":
        check_whitened_directions_vary(transformer)
    weight, bias = affine_parameters(transformer, splits.n_features, per_feature=cfg.method in ("none", "center", "standardize"))

    def apply(X: np.ndarray) -> np.ndarray:
        return transformer.transform(X.astype(np.float64)).astype(np.float32)

    transformed = replace(splits, X_train=apply(splits.X_train), X_val=apply(splits.X_val), X_test=apply(splits.X_test))
    return Prepared(transformed, transformer, weight, bias)


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(splits: Splits, cfg: PreprocessConfig) -> Prepared:
    return fit_preprocess(splits, cfg)
