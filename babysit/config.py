"""The experiment config: one pydantic model per YAML section, validated once at the edge.

`load_config(path, overrides)` is the only way a run gets its config. Everything below the
flow takes the validated sections as explicit arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from babysit.errors import BabysitError

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"]
InitScheme = Literal["small", "xavier", "he", "lecun", "orthogonal"]
DataSource = Literal["digits", "spiral", "blobs", "csv", "parquet", "npz"]
Preprocess = Literal["none", "center", "standardize", "pca", "whiten"]
Optimizer = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
Schedule = Literal["constant", "step", "exponential", "cosine", "inverse_time"]


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; assignment is validated so that
    # search trials (which set fields on a copy) cannot smuggle in bad values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: DataSource = "digits"
    path: Path | None = None  # csv / parquet / npz file
    target: str | None = None  # label column of a csv / parquet file
    n_samples: int = Field(900, ge=2)  # generated data (spiral, blobs): points in all
    n_classes: int = Field(3, ge=2)  # generated data
    noise: float = Field(0.2, ge=0)  # generated data: std of the added Gaussian noise
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 so that rows are left for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if self.source in ("csv", "parquet", "npz") and self.path is None:
            raise ValueError(f"source '{self.source}' needs `data.path`, the file to read")
        if self.source in ("csv", "parquet") and not self.target:
            raise ValueError(f"source '{self.source}' needs `data.target`, the label column's name")
        return self


class PreprocessConfig(Section):
    method: Preprocess = "standardize"
    # pca / whiten: an int keeps that many components, a float in (0, 1) keeps enough of them to
    # explain that fraction of the variance (near-zero-variance directions would explode whitening)
    pca_components: int | float = 0.99

    @field_validator("pca_components")
    @classmethod
    def _components(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0 < value < 1 or isinstance(value, int) and value < 1:
            raise ValueError(f"expected a component count >= 1 or a variance fraction in (0, 1), got {value}")
        return value


class ModelConfig(Section):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])  # units per hidden layer
    activation: Activation = "relu"
    leaky_slope: float = Field(0.01, ge=0, lt=1)  # leaky_relu only
    init: InitScheme = "he"
    init_distribution: Literal["normal", "uniform"] = "normal"  # xavier / he / lecun
    # The classifier head's initial weights are the scheme's times this, so that the initial
    # logits are small and the initial loss is ≈ ln(classes), the lecture's first sanity check.
    head_init_scale: float = Field(0.1, gt=0, le=1)
    batchnorm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)  # probability of zeroing a hidden unit

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        if any(width < 1 for width in hidden):
            raise ValueError(f"every hidden layer needs at least 1 unit (got {hidden})")
        return hidden


class OptimConfig(Section):
    name: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)  # momentum / nesterov; rmsprop's momentum is 0
    weight_decay: float = Field(0.0, ge=0)  # L2 strength (decoupled for adamw)
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    alpha: float = Field(0.99, gt=0, lt=1)  # rmsprop's decay rate of the squared-gradient average
    schedule: Schedule = "constant"
    warmup_epochs: int = Field(0, ge=0)  # linear warmup from lr/100
    step_epochs: int = Field(10, ge=1)  # step: decay every this many epochs
    gamma: float = Field(0.1, gt=0, le=1)  # step: factor per step; exponential: factor per epoch
    decay: float = Field(0.1, ge=0)  # inverse_time: lr / (1 + decay * epoch)
    min_lr_fraction: float = Field(0.0, ge=0, le=1)  # cosine: floor as a fraction of lr


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without a better val acc

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps (got '{device}')")
        return device


class FlagsConfig(Section):
    overfit_gap: float = Field(0.10, gt=0, lt=1)  # train acc - val acc above this: overfitting
    overfit_patience: int = Field(3, ge=2)  # epochs of rising val loss while train loss falls
    diverge_factor: float = Field(3.0, gt=1)  # loss above this × the initial loss: diverged


class TrackingConfig(Section):
    experiment: str = Field("babysit", min_length=1)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    run_name: str | None = None
    log_model: bool = True


class Config(Section):
    """One training run, exactly as it is logged to MLflow."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    flags: FlagsConfig = Field(default_factory=FlagsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys, e.g. {'optim.lr': 0.001}: MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BabysitError(f"{path}: config file not found (expected a YAML experiment file such as conf/digits_mlp.yaml).")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BabysitError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from None
    if not isinstance(tree, dict):
        raise BabysitError(f"{path}: expected a mapping of sections (data, model, optim, ...) at the top, got {type(tree).__name__}.")
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Return a copy of `tree` with each 'a.b.c=value' applied; values are parsed as YAML."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BabysitError(f"{source} '{item}': expected FIELD=VALUE, e.g. optim.lr=3e-3.")
        *parents, leaf = key.strip().split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BabysitError(f"{source} '{item}': '{part}' is a value, not a section.")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def validate(model: type[BaseModel], tree: dict[str, Any], source: str) -> Any:
    """Validate `tree` into `model`, turning pydantic's errors into one readable paragraph."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise BabysitError(f"{source}: invalid config: " + "; ".join(_describe(e, model) for e in err.errors()) + ".") from None


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _known_fields(model, error["loc"][:-1])
        return f"unknown field `{field}` (expected one of: {', '.join(known)})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" or error["type"].startswith("missing"):
        return f"`{field}`: {message}"
    return f"`{field}`: {message} (got {error['input']!r})"


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, model: type[BaseModel] = Config) -> Any:
    """Read a YAML experiment file, apply `--set` overrides, validate. Raises BabysitError."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides or []))
    return validate(model, tree, str(path) if path is not None else "config")
