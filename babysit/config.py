"""The experiment config: one pydantic model per YAML section, validated once at the edge.

`load_config(path, overrides)` is the only way a run gets its config. Everything below the
flow takes the validated sections as explicit arguments.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from babysit.errors import BabysitError

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"]
InitScheme = Literal["small", "xavier", "he", "lecun", "orthogonal"]
DataSource = Literal["digits", "spiral", "blobs", "csv", "parquet", "npz", "digits_images", "image_folder", "cifar10", "mnist", "fashion_mnist"]
IMAGE_SOURCES = ("digits_images", "image_folder", "cifar10", "mnist", "fashion_mnist")
PATH_SOURCES = ("csv", "parquet", "npz", "image_folder", "cifar10", "mnist", "fashion_mnist")  # the sources that read `data.path`
Preprocess = Literal["none", "center", "standardize", "pca", "whiten"]
Optimizer = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
Schedule = Literal["constant", "step", "exponential", "cosine", "inverse_time"]


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; assignment is validated so that
    # search trials (which set fields on a copy) cannot smuggle in bad values.
    # and no number is infinite or NaN: an lr of .inf trained to NaN before anything said why
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic reads YAML's true as the number 1: `workers: true` is a slip, not one worker
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        many = isinstance(value, (list, tuple))  # model.hidden: [64, true] too
        if any(isinstance(item, bool) for item in (value if many else [value])) and kinds & {int, float} and not kinds & {bool, Any}:
            raise ValueError(f"expected numbers, got {value}" if many else f"expected a number, got {str(value).lower()}")
        return value


def _kinds(annotation: Any) -> set:
    """The plain types an annotation admits, looking inside ... | None, Annotated and Literal."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_kinds(arg) if get_args(arg) or isinstance(arg, type) or arg is Any else {type(arg)} for arg in args))


class DataConfig(Section):
    source: DataSource = "digits"
    path: Path | None = None  # csv / parquet / npz file; image folder; torchvision dataset root
    target: str | None = None  # label column of a csv / parquet file
    drop_columns: list[str] = []  # columns of a csv / parquet file that are no features (an id, a row number)
    n_samples: int = Field(900, ge=2)  # generated data (spiral, blobs): points in all
    n_classes: int = Field(3, ge=2)  # generated data
    noise: float = Field(0.2, ge=0)  # generated data: std of the added Gaussian noise
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    image_size: int = Field(32, ge=4)  # image_folder: every image resized to this many pixels a side
    channels: Literal[1, 3] = 3  # image_folder: grey or RGB
    download: bool = False  # cifar10 / mnist / fashion_mnist: fetch with torchvision if missing
    max_rows: int | None = Field(None, ge=6)  # a stratified subsample of this many rows (big sets on a CPU)
    keep_classes: list[str] | None = None  # only rows of these labels (as text, e.g. ['5', '6'])
    train_fraction: float = Field(1.0, gt=0, le=1)  # use this stratified share of the training split (val/test stay whole)

    @field_validator("keep_classes", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) < 2:  # one class is no classifier; none, a run on no rows
                raise ValueError(f"keep_classes {value} keeps {len(value)} class(es); list at least 2 labels, or leave it out for all")
            # labels are compared as text: YAML's [5, 6] means the labels '5' and '6' (QA: it was refused)
            return [str(label) if isinstance(label, (int, float)) and not isinstance(label, bool) else label for label in value]
        return value

    @field_validator("path")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None  # ~/data.csv, as a shell would read it

    @property
    def images(self) -> bool:
        return self.source in IMAGE_SOURCES

    def unread(self) -> set[str]:
        """The fields this source does not read (a digits run has no use for n_classes)."""
        generated, table, torchvision = {"n_samples", "n_classes", "noise"}, {"path", "target", "drop_columns"}, {"path", "download"}
        reads = {"spiral": generated, "blobs": generated, "csv": table, "parquet": table, "npz": {"path"}, "image_folder": {"path", "image_size", "channels"},
                 "cifar10": torchvision, "mnist": torchvision, "fashion_mnist": torchvision}.get(self.source, set())
        return {"path", "target", "drop_columns", "n_samples", "n_classes", "noise", "image_size", "channels", "download"} - reads

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 so that rows are left for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if self.source in PATH_SOURCES and self.path is None:
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
    kind: Literal["mlp", "cnn", "resnet"] = "mlp"  # cnn / resnet need image data
    channels: list[int] = Field(default_factory=lambda: [32, 64])  # cnn / resnet: width per stage
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
    # transfer learning: start from a trained model (an MLflow model URI such as runs:/<id>/model,
    # or a torch.save(state_dict) file); every layer whose shape fits is copied, the head is new
    init_from: str | None = None
    freeze: Literal["all", "none"] | int = "none"  # with init_from: freeze all hidden blocks, none, or the first n

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        if any(width < 1 for width in hidden):
            raise ValueError(f"every hidden layer needs at least 1 unit (got {hidden})")
        return hidden

    @field_validator("freeze")
    @classmethod
    def _freeze_transferred_blocks(cls, freeze: str | int, info: Any) -> str | int:
        # A count is a number of first blocks: -1 would slice blocks[:-1]. Freezing needs weights
        # worth keeping: without init_from the blocks are random and would stay random.
        if isinstance(freeze, int) and freeze < 0:
            raise ValueError(f"expected all, none or a number of first hidden blocks >= 0 (got {freeze})")
        if freeze not in ("none", 0) and not info.data.get("init_from"):
            raise ValueError(f"freeze {freeze} keeps blocks fixed at their initial weights, which without `model.init_from` are random; "
                             "set model.init_from to a trained model (runs:/<run id>/model or a state-dict file), or freeze: none")
        return freeze

    @model_validator(mode="after")
    def _freeze_existing_blocks(self) -> ModelConfig:
        widths = "hidden" if self.kind == "mlp" else "channels"  # a block per width (a ResNet's stem goes with its first)
        blocks = len(getattr(self, widths))
        if isinstance(self.freeze, int) and self.freeze > blocks:
            raise ValueError(f"`model.freeze` {self.freeze}: this model has {blocks} hidden blocks (`model.{widths}` {getattr(self, widths)}), "
                             f"so freeze takes 0 to {blocks}, all or none")
        return self


# A learning rate each update rule trains the default digits MLP well with (used when `lr` is unset).
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.03, "nesterov": 0.03, "adagrad": 0.03, "rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3}


class OptimConfig(Section):
    name: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0)  # peak learning rate; unset: DEFAULT_LR of the optimizer
    momentum: float = Field(0.9, ge=0, lt=1)  # momentum / nesterov; rmsprop's momentum is 0
    weight_decay: float = Field(0.0, ge=0)  # L2 strength (decoupled for adamw)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)  # adam / adamw; as torch checks them
    alpha: float = Field(0.99, gt=0, lt=1)  # rmsprop's decay rate of the squared-gradient average
    schedule: Schedule = "constant"
    warmup_epochs: int = Field(0, ge=0)  # linear warmup from lr/100
    step_epochs: int = Field(10, ge=1)  # step: decay every this many epochs
    gamma: float = Field(0.1, gt=0, le=1)  # step: factor per step; exponential: factor per epoch
    decay: float = Field(0.1, ge=0)  # inverse_time: lr / (1 + decay * epoch)
    min_lr_fraction: float = Field(0.0, ge=0, le=1)  # cosine: floor as a fraction of lr

    _lr_unset: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _default_lr(cls, data: Any, handler: Any) -> OptimConfig:
        unset = isinstance(data, dict) and data.get("lr") is None
        if unset:
            data = {**data, "lr": DEFAULT_LR.get(data.get("name", "adam"), 1e-3)}
        optim = handler(data)
        optim._lr_unset = unset
        return optim

    @model_validator(mode="after")
    def _rules_that_torch_refuses_or_a_default_would_break(self) -> OptimConfig:
        if self.name == "nesterov" and self.momentum == 0:  # torch refused it mid-run, with a traceback and a FAILED run (QA)
            raise ValueError("optim.name nesterov looks ahead along the momentum, and optim.momentum is 0: set a momentum (e.g. 0.9), or use sgd")
        if self.schedule == "exponential" and "gamma" not in self.model_fields_set:
            # as torch's ExponentialLR, it needs its own: the default 0.1 is step's, and per epoch it left 1e-12 of the rate by epoch 10 (QA)
            raise ValueError("optim.schedule exponential multiplies the learning rate by optim.gamma after every epoch, and optim.gamma is not set "
                             "(its default, 0.1, is step's cut every step_epochs): set it, e.g. optim.gamma: 0.95 (the rate halves every ~14 epochs); "
                             "a search that searches it needs one in the file too, for its base config")
        return self

    @property
    def lr_follows_name(self) -> bool:
        """lr was left unset (or null): it is the optimizer's DEFAULT_LR, and changes with `name`."""
        return self._lr_unset


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without a better val acc
    flip: bool = False  # images: mirror a random half of each batch left-right (on the device)
    translate: int = Field(0, ge=0)  # images: shift each image by up to this many pixels (on the device)
    unfreeze_epochs: int = Field(0, ge=0)  # transfer: after `epochs` frozen, this many more with all layers trainable
    unfreeze_lr_factor: float = Field(0.1, gt=0, le=1)  # ... at this fraction of optim.lr
    # Per-epoch gradient norms, update/weight ratios and dead units, measured on each epoch's
    # last step only (babysit.diagnostics); they feed the lr_too_high / lr_too_low / dead_relu flags.
    diagnostics: bool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps (got '{device}')")
        return device


class FlagsConfig(Section):
    overfit_gap: float = Field(0.10, gt=0, lt=1)  # train acc - val acc above this: overfitting
    overfit_patience: int = Field(3, ge=2)  # epochs that val loss has stayed above its lowest while train loss fell
    overfit_loss_rise: float = Field(0.05, ge=0)  # ... by more than this fraction of it (a rise of 0.3% is noise)
    majority_margin: float = Field(0.01, ge=0)  # best val acc not this far above the majority class's share: majority_class
    diverge_factor: float = Field(3.0, gt=1)  # loss above this × the initial loss: diverged
    # Initial loss: softmax over C classes with small logits starts at ln(C) (ln 10 ≈ 2.303).
    initial_loss_tolerance: float = Field(0.1, gt=0)  # |loss − ln C| above this fraction of ln C: initial_loss_off
    # Activations at init (one forward pass of a training batch through the fresh model)
    vanishing_ratio: float = Field(0.1, gt=0, lt=1)  # last hidden layer's std below this × the first's: vanishing
    exploding_ratio: float = Field(10.0, gt=1)  # last hidden layer's std above this × the first's: exploding
    saturated_fraction: float = Field(0.25, gt=0, le=1)  # share of a layer's tanh/sigmoid outputs in the flat tails
    # Share of a layer's units that output 0 for every example (256 training rows at init; the
    # validation set after the last epoch). CS231n: with a too-high learning rate "as much as 40%
    # of your network can be dead".
    dead_fraction: float = Field(0.25, gt=0, le=1)
    # Learning rate, judged on the first `early_epochs` epochs (update ratio: median over the hidden
    # layers' weight matrices of ‖ΔW‖/‖W‖ on an epoch's last step; CS231n's rule of thumb is ≈ 1e-3)
    early_epochs: int = Field(3, ge=1)
    min_loss_drop: float = Field(0.1, gt=0, lt=1)  # training loss not below (1 − this) × initial by then: lr_too_low
    early_loss_rise: float = Field(0.05, ge=0)  # an early epoch's training loss above (1 + this) × initial: lr_too_high
    # Medians of epochs 1-3 on digits (MLP 256-256, constant rate): Adam 1e-3 ≈ 3.3e-3, 1e-2 ≈ 1.5e-2
    # (still its best val acc), 3e-2 ≈ 2.3e-2 with 2/3 of the ReLUs dead; SGD 1 ≈ 2.9e-2 with the val
    # loss rising 0.6 → 2; SGD 1e-2 ≈ 2e-4; SGD 1e-3 ≈ 1e-5; SGD 1e-4 ≈ 1e-6. conf/spiral_mlp.yaml ≈ 1.2e-2.
    update_ratio_high: float = Field(0.02, gt=0)  # median update ratio above this (20× the rule of thumb): lr_too_high
    update_ratio_low: float = Field(1e-5, gt=0)  # median update ratio below this (≪ 1e-4): lr_too_low
    # Plateau: the best training loss of the last `plateau_epochs` epochs is not `plateau_min_drop`
    # (a fraction) below the best before them, while training accuracy is under `plateau_max_acc`.
    plateau_epochs: int = Field(5, ge=2)
    plateau_min_drop: float = Field(0.01, gt=0, lt=1)
    plateau_max_acc: float = Field(0.99, gt=0, le=1)
    # Underfitting: final training accuracy below `underfit_acc` and within `underfit_gap` of validation
    # (or, once it has levelled off, further below a validation accuracy that is itself below `underfit_acc`)
    underfit_acc: float = Field(0.9, gt=0, le=1)
    underfit_gap: float = Field(0.05, gt=0, lt=1)


class TrackingConfig(Section):
    experiment: str = Field("babysit", min_length=1)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    run_name: str | None = None
    log_model: bool = True
    # Epoch metrics are written at most once per this many seconds (each write costs ~10 ms on
    # SQLite, a whole epoch of a small model); epochs longer than this are written as they end.
    flush_seconds: float = Field(1.0, ge=0)


class Config(Section):
    """One training run, exactly as it is logged to MLflow."""

    name: str = "experiment"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and scikit-learn's seeds
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    flags: FlagsConfig = Field(default_factory=FlagsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _model_fits_data(self) -> Config:
        if self.model.kind != "mlp" and not self.data.images:
            raise ValueError(f"model.kind '{self.model.kind}' needs image data (data.source one of {', '.join(IMAGE_SOURCES)}), got '{self.data.source}'")
        if (self.train.flip or self.train.translate) and not self.data.images:  # QA: accepted, logged, and ignored
            raise ValueError(f"train.flip and train.translate augment images; data.source '{self.data.source}' gives feature vectors: set them off")
        if self.data.images and self.preprocess.method in ("pca", "whiten"):
            raise ValueError(f"preprocess.method '{self.preprocess.method}' works on feature vectors; for images use none, center or standardize (per channel)")
        if self.train.unfreeze_epochs and not self.model.init_from:  # it would be ignored: there is nothing frozen to unfreeze
            raise ValueError(f"train.unfreeze_epochs {self.train.unfreeze_epochs} fine-tunes a transferred model after its frozen epochs; "
                             "set model.init_from (and model.freeze), or unfreeze_epochs: 0")
        if self.train.unfreeze_epochs and self.model.freeze in ("none", 0):  # QA: ran on, every layer training already, at a tenth of the rate
            raise ValueError(f"train.unfreeze_epochs {self.train.unfreeze_epochs} unfreezes the blocks model.freeze keeps fixed, and model.freeze is "
                             f"{self.model.freeze}: every layer trains already, so it would only add epochs at unfreeze_lr_factor × the learning rate; "
                             "set model.freeze (all, or the first n blocks), or unfreeze_epochs: 0")
        return self

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys, e.g. {'optim.lr': 0.001}: MLflow params; without the data
        fields its source does not read (a digits run listed data.n_classes=3 beside its 10, QA)."""
        unread = {f"data.{name}" for name in self.data.unread()}
        return {key: value for key, value in flatten(self.model_dump(mode="json")).items() if key not in unread}

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping: PyYAML would keep the
    last silently, and a config would run with a value other than the one its reader sees first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):  # a list or mapping as a key: unhashable, and no config field
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice in the same section", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise BabysitError(f"{path}: a folder, not a config file (expected a YAML experiment file such as conf/digits_mlp.yaml).")
    if not path.is_file():
        raise BabysitError(f"{path}: config file not found (expected a YAML experiment file such as conf/digits_mlp.yaml).")
    try:
        text = _utf8_text(path)
    except OSError as err:  # no permission to read it, for one
        raise BabysitError(f"{path}: the config file cannot be read ({err.strerror or err}).") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise BabysitError(f"{path}: not valid YAML ({' '.join(str(err).split())}){_flow_hint(err, text)}.") from None
    if not isinstance(tree, dict):
        raise BabysitError(f"{path}: expected a mapping of sections (data, model, optim, ...) at the top, got {type(tree).__name__}.")
    return tree


def _utf8_text(path: Path) -> str:
    """The file's text, read as UTF-8 whatever the locale says (YAML files are UTF-8)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise BabysitError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}, byte offset {err.start}); "
            "a config file must be UTF-8: save it again as UTF-8, or remove that byte."
        ) from None


# inside {..} or [..] a comma ends the value: loguniform(1e-4, 1e-1) splits in two (babysit.space says it too)
QUOTE_DISTRIBUTIONS = "inside {...} or [...] quote a distribution, e.g. {optim.lr: 'loguniform(1e-4, 1e-1)'}"


def _flow_hint(err: yaml.YAMLError, text: str) -> str:
    """The quoting hint, for a flow-style error in text that writes a distribution: a typo such as [128, 64 needs none."""
    return f"; {QUOTE_DISTRIBUTIONS}" if "flow" in str(err) and re.search(r"\b(loguniform|uniform|int|choice)\(", text) else ""


def apply_overrides(tree: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Return a copy of `tree` with each 'a.b.c=value' applied; values are parsed as YAML."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BabysitError(f"{source} '{item}': expected FIELD=VALUE, e.g. optim.lr=3e-3.")
        *parents, leaf = key.strip().split(".")
        if parents[:2] == ["search", "space"] and len(parents) > 2:  # the space's keys are dotted fields: search.space.optim.lr
            parents, leaf = parents[:2], ".".join([*parents[2:], leaf])
        node = tree
        for part in parents:
            node = _child(node, part, item, source)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise BabysitError(f"{source} '{item}': the value is not valid YAML ({' '.join(str(err).split())}){_flow_hint(err, raw)}.") from None
        if isinstance(node, list):
            node[_index(node, leaf, item, source)] = value
        else:
            node[leaf] = value
    return tree


def _child(node: Any, part: str, item: str, source: str) -> Any:
    """Step into a section, or into a list by position ('search.stages.0.trials')."""
    if isinstance(node, list):
        child = node[_index(node, part, item, source)]
    else:
        child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise BabysitError(f"{source} '{item}': '{part}' is a value, not a section.")
    return child


def _index(node: list, part: str, item: str, source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise BabysitError(f"{source} '{item}': '{part}' is not a position in a list of {len(node)} entries (0..{len(node) - 1}).")
    return int(part)


def validate(model: type[BaseModel], tree: dict[str, Any], source: str, overridden: frozenset[str] = frozenset()) -> Any:
    """Validate `tree` into `model`, turning pydantic's errors into one readable paragraph; a field
    that `overridden` (the fields of --set overrides) set is said to come from --set."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise BabysitError(f"{source}: invalid config: " + "; ".join(_describe(e, model, source, overridden) for e in err.errors()) + ".") from None


def _describe(error: dict[str, Any], model: type[BaseModel], source: str, overridden: frozenset[str] = frozenset()) -> str:
    if not error["loc"]:  # a check across sections, e.g. the search space: its message names the fields
        message = error["msg"].removeprefix("Value error, ")
        searched = (o.removeprefix("search.space.") for o in overridden if o.startswith("search.space."))
        return message + (", from --set" if any(f"`{field}`" in message for field in searched) else "")
    field = ".".join(str(part) for part in error["loc"])
    if any(field == o or field.startswith(o + ".") or o.startswith(field + ".") for o in overridden):
        if error["loc"] == ("search",) and error["type"] == "extra_forbidden":
            return "`search` (from --set): `babysit train` and `check` read a training config; search settings go with `babysit search` and a search file"
        return _describe(error, model, source) + ", from --set"
    if error["type"] == "extra_forbidden" and error["loc"] == ("search",):  # a search file given to `babysit train` or `check`
        return (f"unknown field `search`: this is a search file (a training config plus a `search` section); "
                f"run it with `babysit search {source}`, or drop the `search` section to train or check this config once")
    if error["type"] == "extra_forbidden":
        known = _known_fields(model, error["loc"][:-1])
        return f"unknown field `{field}` (expected one of: {', '.join(known)})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing" and error["loc"] == ("search",):  # a training file given to `babysit search`
        return ("no `search` section: a search file is a training config plus `search: {space: ..., stages: [...]}` "
                "(see conf/search_digits.yaml); to train this config once, run `babysit train`")
    if error["type"] == "value_error" or error["type"].startswith("missing"):
        return f"`{field}`: {message}"
    return f"`{field}`: {message} (got {error['input']!r})"


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):  # a position in a list (search.stages.0): the list's model is already in hand
            continue
        section = _section_model(model.model_fields[str(part)].annotation)
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model an annotation holds, looking inside list[...] and ... | None
    (search.stages is list[StageConfig], search.final is FinalStageConfig | None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _section_model(arg)) is not None), None)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, model: type[BaseModel] = Config) -> Any:
    """Read a YAML experiment file, apply `--set` overrides, validate. Raises BabysitError."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides or []))
    overridden = frozenset(item.split("=", 1)[0].strip() for item in overrides or [])
    return validate(model, tree, str(path) if path is not None else "config", overridden)


class StageConfig(Section):
    name: str
    trials: int = Field(ge=1)
    epochs: int = Field(ge=1)
    prune: Literal["none", "median", "asha"] = "none"  # stop poor trials on their val accuracy
    prune_warmup_epochs: int = Field(1, ge=1)  # median: no trial is stopped before this epoch
    asha_eta: int = Field(3, ge=2)  # asha: keep the top 1/eta at each rung (epochs 1, eta, eta², ...)

    @field_validator("name")
    @classmethod
    def _a_name_for_runs_tags_and_artifacts(cls, name: str) -> str:  # coarse-003, range.coarse.optim.lr
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"a stage name names its runs, tags and Prefect artifacts: use letters, digits, - and _ (got {name!r})")
        return name


class FinalStageConfig(Section):
    epochs: int = Field(30, ge=1)  # the best config retrained longer; the test set is read here, once


class SearchConfig(Section):
    """Coarse-to-fine random search: stages sample from `space`, each narrowing it for the next."""

    space: dict[str, Any] = Field(min_length=1)  # field -> 'loguniform(lo, hi)' | 'uniform(..)' | 'int(..)' | 'choice([..])'
    stages: list[StageConfig] = Field(min_length=1)
    final: FinalStageConfig | None = Field(default_factory=FinalStageConfig)
    sampler: Literal["random", "sobol", "lhs", "grid"] = "random"
    workers: int = Field(2, ge=1)  # trials at a time
    # processes | threads on this machine (small-model training holds the GIL: threads do not run
    # trials in parallel); dask: prefect-dask's DaskTaskRunner on a LocalCluster of `workers`
    # processes, or on the running scheduler at `dask_address` (docs/scale-out.md)
    runner: Literal["threads", "processes", "dask"] = "processes"
    dask_address: str | None = None  # e.g. tcp://10.0.0.5:8786; its workers need a shared tracking server
    # latest: the first stage samples from the last ranges of the latest finished run of this
    # search (same name) instead of `space`; each run is then a new parent run (babysit.recurring)
    warm_start: Literal["none", "latest"] = "none"
    # the trials that set the next stage's ranges: a count, or a share of the stage's finished
    # trials (0.25: the best quarter, at least 2), which keeps stages of any size equally selective
    top_k: int | float = 0.25
    pad: float = Field(0.1, ge=0)  # padding around the top-k span, as a fraction of the range
    edge: float = Field(0.10, gt=0, lt=0.5)  # best within this fraction of a bound: "at the edge"
    widen: float = Field(10.0, gt=1)  # an edge moves by ×widen in log space (one decade by default)
    sanity_check: bool = False  # overfit a tiny subset before the first stage; stop if it cannot
    resume: bool = True  # reuse the finished trials of the latest run of this same search

    @field_validator("top_k", mode="before")  # before: pydantic would read `true` as the count 1
    @classmethod
    def _count_or_share(cls, value: Any) -> Any:
        expected = "expected a count of trials (an integer ≥ 1) or a share of them (a number between 0 and 1)"
        if isinstance(value, str):  # one message, not one per member of the union (QA: `search.top_k.int`, `search.top_k.float`)
            try:
                value = int(value) if value.strip().isdigit() else float(value)
            except ValueError:
                raise ValueError(f"{expected}, got {value!r}") from None
        if isinstance(value, bool) or isinstance(value, float) and not 0 < value < 1 or isinstance(value, int) and value < 1:
            raise ValueError(f"{expected}, got {value}")
        return value

    @field_validator("stages")
    @classmethod
    def _distinct_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [stage.name for stage in stages]
        if "final" in names or len(set(names)) < len(names):
            raise ValueError(f"stage names must differ from each other and from 'final' (the retrain's), got {names}")
        return stages

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> SearchConfig:
        if self.dask_address and self.runner != "dask":
            raise ValueError(f"`dask_address` is only used by `runner: dask` (got runner '{self.runner}'); set search.runner=dask or drop the address")
        return self


class SearchExperiment(Config):
    """A search file: a base training config plus its `search` section."""

    search: SearchConfig

    @model_validator(mode="after")
    def _check_space(self) -> SearchExperiment:
        from babysit.space import parse_dist  # the space's grammar lives with the samplers

        base = self.model_dump(exclude={"search"})
        for field, spec in self.search.space.items():
            dist = parse_dist(field, spec)
            values = dist.options if not dist.numeric else (int(dist.low), int(dist.high)) if dist.kind == "int" else (dist.low, dist.high)
            if dist.kind in ("uniform", "loguniform"):  # they sample fractions: an integer field needs int(low, high)
                values = (*values, dist.low + (dist.high - dist.low) * 0.381966)  # a fraction no whole bounds turn whole
            for number, value in enumerate(values):
                problem = field_problem(base, field, value)
                if problem:
                    hint = (f"; {field} takes whole numbers: use int({dist.low:g}, {dist.high:g})" if "integer" in problem
                            else f", a value {spec} samples between its bounds" if number == 2 and dist.numeric else "")
                    raise ValueError(f"search.space: {problem}{hint}")
        for field in self.search.space:
            if problem := never_read(field, self.search.space, base):
                raise ValueError(f"search.space: {problem}")
        searched_warmup = parse_dist("optim.warmup_epochs", self.search.space["optim.warmup_epochs"]) if "optim.warmup_epochs" in self.search.space else None
        longest = (int(searched_warmup.high) if searched_warmup.numeric else max(searched_warmup.options)) if searched_warmup else self.optim.warmup_epochs
        for stage in every_stage(self.search):
            if problem := warmup_outlasts(longest, stage.epochs, f"stage {getattr(stage, 'name', 'final')}"):
                if searched_warmup:  # QA: a range was accepted, and trials sampled past it never reached their rate
                    raise ValueError(f"search.space: optim.warmup_epochs {self.search.space['optim.warmup_epochs']} samples up to {longest}, and {problem}; "
                                     f"keep its upper bound below {shortest_stage(self.search)}")
                raise ValueError(f"search: {problem}")
        schedules = parse_dist("optim.schedule", self.search.space["optim.schedule"]).options if "optim.schedule" in self.search.space else ()
        if "exponential" in schedules and "gamma" not in self.optim.model_fields_set and "optim.gamma" not in self.search.space:
            raise ValueError("search.space: optim.schedule may be exponential, which multiplies the learning rate by optim.gamma after every epoch, "
                             "and optim.gamma is neither set nor searched (its default, 0.1, is step's): set it, e.g. optim.gamma: 0.95, or search it")
        return self

    def base_config(self) -> Config:
        return Config.model_validate(self.model_dump(exclude={"search"}))


PLACEMENT_FIELDS = ("train.threads", "train.device")  # where a config trains, not what it learns


# Fields added after searches were first keyed, with their defaults: at the default they leave trial
# keys and search hashes as they were, so a search started by an earlier babysit still resumes.
ADDED_LATER = {"flags.overfit_loss_rise": 0.05, "flags.majority_margin": 0.01, "data.drop_columns": []}


def result_identity(tree: dict[str, Any], data_version: str = "") -> dict[str, Any]:
    """What of a config tree decides its training's result, for trial keys and search hashes: not
    its tracking, nor where it trains (a resumed search on other hardware finds its trials), nor,
    with a `data_version` (tasks.data.data_fingerprint), the path that named the data (one file by a
    relative and an absolute path, or a moved project, is the same data), nor a later field at its
    default (ADDED_LATER)."""
    kept = {section: values for section, values in tree.items() if section != "tracking"}
    kept["train"] = {k: v for k, v in tree["train"].items() if f"train.{k}" not in PLACEMENT_FIELDS}
    if data_version:
        kept["data"] = {k: v for k, v in tree["data"].items() if k != "path"}
    for dotted, default in ADDED_LATER.items():
        section, name = dotted.split(".")
        if section in kept and kept[section].get(name, default) == default:
            kept[section] = {k: v for k, v in kept[section].items() if k != name}
    return kept


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree with dotted fields set, e.g. {'optim.lr': 0.01}."""
    tree = copy.deepcopy(tree)
    for field, value in values.items():
        *parents, leaf = field.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return tree


# A search loads and preprocesses the data once, from the base config, and sets each stage's
# epochs and each trial's threads itself; these would be logged as searched and change nothing.
SET_ONCE_PER_SEARCH = {
    "data": "a search loads the data once, from the base config",
    "preprocess": "a search preprocesses the data once, from the base config: compare preprocessing with one search per method (`--set preprocess.method=pca`)",
    "flags": "flag thresholds judge trials; they do not train them",
    "tracking": "every trial of a search is tracked under its parent run",
    "train.epochs": "each stage sets its trials' epochs (search.stages[].epochs)",
    "train.threads": "the search sets each trial's threads from search.workers",
}


# Fields that a trial reads only when another field has one of some values: momentum is SGD
# momentum's, betas Adam's, gamma a decaying schedule's. Narrowing a range on trials that never
# read the field would follow noise (babysit.space.narrow).
READ_ONLY_WHEN: dict[str, tuple[str, frozenset[str]]] = {
    "optim.momentum": ("optim.name", frozenset({"momentum", "nesterov"})),
    "optim.alpha": ("optim.name", frozenset({"rmsprop"})),
    "optim.betas": ("optim.name", frozenset({"adam", "adamw"})),
    "optim.step_epochs": ("optim.schedule", frozenset({"step"})),
    "optim.gamma": ("optim.schedule", frozenset({"step", "exponential"})),
    "optim.decay": ("optim.schedule", frozenset({"inverse_time"})),
    "optim.min_lr_fraction": ("optim.schedule", frozenset({"cosine"})),
    "model.leaky_slope": ("model.activation", frozenset({"leaky_relu"})),
    "model.hidden": ("model.kind", frozenset({"mlp"})),
    "model.channels": ("model.kind", frozenset({"cnn", "resnet"})),
}


def never_read(field: str, space: dict[str, str], base: dict[str, Any]) -> str | None:
    """Why no trial of `space` on config tree `base` could train with searched `field`, or None:
    its switch (READ_ONLY_WHEN) is set, or searched, to values that never read it."""
    if field not in READ_ONLY_WHEN:
        return None
    from babysit.space import parse_dist

    switch, readers = READ_ONLY_WHEN[field]
    searched = parse_dist(switch, space[switch]) if switch in space else None
    possible = list(searched.options) if searched is not None else [reads_switch(switch, base)]
    if any(value in readers for value in possible):
        return None
    now = f"searched over {', '.join(map(str, possible))}" if searched is not None else f"'{possible[0]}'"
    return (f"`{field}` is read only when `{switch}` is {' or '.join(sorted(readers))}, and it is {now} here, so searching `{field}` "
            f"would train the same model again and again; set `{switch}` (--set {switch}={sorted(readers)[0]}), search it too, or drop `{field}`")


def reads_switch(switch: str, base: dict[str, Any]) -> Any:
    section, name = switch.split(".")
    return base.get(section, {}).get(name)


def reads_field(field: str, values: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a trial with these sampled `values` (dotted field -> value) on the `base` config tree trains with `field`."""
    if field not in READ_ONLY_WHEN:
        return True
    switch, readers = READ_ONLY_WHEN[field]
    return values.get(switch, reads_switch(switch, base)) in readers


def every_stage(search: SearchConfig) -> list[StageConfig | FinalStageConfig]:
    """The stages of `search`, then its final retrain if it has one."""
    return [*search.stages, *([search.final] if search.final else [])]


def shortest_stage(search: SearchConfig) -> int:
    """The fewest epochs any stage of `search` (the final retrain included) trains for."""
    return min(stage.epochs for stage in every_stage(search))


def warmup_outlasts(warmup_epochs: int, epochs: int, where: str) -> str | None:
    """Why a warmup of `warmup_epochs` cannot precede `epochs` of training (`where` names them), or None."""
    if warmup_epochs and warmup_epochs >= epochs:  # QA: accepted, and the rate never reached optim.lr, nor did a schedule decay it
        return (f"optim.warmup_epochs {warmup_epochs} lasts as long as {where} ({epochs} epochs) or longer: the learning rate would never "
                f"reach optim.lr, nor a schedule decay it; warm up for fewer epochs (a few, or none: 0)")
    return None


def untrainable(cfg: Config) -> str | None:
    """Why a valid config still cannot train, or None. Not a validation error: a search may sample
    it from two fields that are each fine alone (its trial then fails, and the search goes on)."""
    if cfg.model.batchnorm and cfg.train.batch_size < 2:  # BatchNorm's training statistics need 2 rows
        return (f"train.batch_size {cfg.train.batch_size} with model.batchnorm: true: batch norm normalizes each batch by its own "
                "mean and variance, which needs at least 2 rows; raise train.batch_size or set model.batchnorm: false.")
    return None


def field_problem(base: dict[str, Any], field: str, value: Any) -> str | None:
    """Why `field = value` is not a legal training config, or one that cannot train; None if it is."""
    problem = _unsearchable(field)
    if problem:
        return problem
    shown = f"{value:.10g}" if isinstance(value, float) else repr(list(value)) if isinstance(value, tuple) else repr(value)  # a choice's lists are kept as tuples
    try:
        cfg = Config.model_validate(with_values(base, {field: value}))
    except (ValidationError, AttributeError, TypeError) as err:
        detail = err.errors()[0] if isinstance(err, ValidationError) else {"msg": str(err), "loc": ()}
        where = ".".join(map(str, detail["loc"])) or field
        hint = ""
        if detail.get("type") == "list_type" and not isinstance(value, (list, tuple)):  # QA: model.hidden: int(8, 64)
            hint = f"; `{field}` is a list: search whole lists, e.g. choice([[64], [128, 64], [256, 256]])"
        return f"`{field}` cannot take {shown} (`{where}`: {detail['msg']}){hint}"
    if why := untrainable(cfg):  # a searched batch size of 1 beside the file's batch norm (QA)
        return f"`{field}` cannot take {shown}: {why.rstrip('.')}"
    return None


def _unsearchable(field: str) -> str | None:
    parts = field.split(".")
    if parts[0] not in Config.model_fields or field in ("name", "seed"):
        return f"unknown or unsearchable field `{field}` (expected a dotted field such as optim.lr or model.dropout)"
    section: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        if section is None:
            return f"unknown field `{field}` (`{'.'.join(parts[:depth])}` is a value, not a section)"
        if part not in section.model_fields:
            return f"unknown field `{field}` (expected one of {'.'.join(parts[:depth])}'s fields: {', '.join(section.model_fields)})"
        annotation = section.model_fields[part].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if section is not None:
        return f"`{field}` is a section, not a field: search one of its fields ({', '.join(section.model_fields)})"
    fixed = next((why for prefix, why in SET_ONCE_PER_SEARCH.items() if field == prefix or field.startswith(prefix + ".")), None)
    return f"`{field}` cannot be searched: {fixed}" if fixed else None
