"""The training spec: the single source of truth for what a job trains.

The API validates ``POST /jobs`` bodies with :class:`JobSpec`; the worker validates the stored JSON
again with the same class before it spends any GPU time. Every model forbids unknown keys and
non-finite numbers, so a typo (``learnig_rate``) or an ``lr`` of ``NaN`` is a 422 naming the field.

This module imports neither torch nor torchvision: the API stays light. The worker checks at
start-up (and a test checks in CI) that every architecture named here exists in torchvision.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationInfo, field_validator, model_validator

#: A field's JSON path in a spec, e.g. ``("dataset", "extra_uris", 1)``.
Loc = tuple[str | int, ...]

#: ``[\s\S]`` rather than ``.``: a key with LF must reach the control-character check (one message
#: for every control character), not fail the pattern with a regex dump.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[\s\S]*)?$"
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"

#: torchvision classification architectures a spec may name (built with random weights and
#: ``num_classes``; see ``torchvision.models.get_model``). ``tests/worker`` checks each exists.
TORCHVISION_ARCHS: tuple[str, ...] = (
    "alexnet",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "densenet121",
    "densenet169",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_s",
    "mnasnet0_5",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "vgg11",
    "vgg16",
    "vit_b_16",
    "wide_resnet50_2",
)

#: Architectures with BatchNorm layers, which cannot train on a batch of 1 sample (``small_cnn``
#: and torchvision's; ``tests/worker`` checks this list against the built models).
BATCHNORM_ARCHS: frozenset[str] = frozenset(
    {"small_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
     "densenet169", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s",
     "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "regnet_y_400mf",
     "shufflenet_v2_x1_0"}
)


def batch_of_one_error(arch: str) -> str:
    """Why ``batch_size`` 1 cannot train ``arch`` (one with BatchNorm): said by the spec and the worker alike."""
    return f"batch_size 1 cannot train model.arch {arch!r}: its BatchNorm layers need at least 2 samples per batch"

S3Uri = Annotated[
    str,
    Field(
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="An S3 URI, `s3://<bucket>/<prefix>/`, on the endpoint in `S3_ENDPOINT_URL`.",
        examples=["s3://trainq/datasets/digits/"],
    ),
]


LOCAL_URI_PATTERN = r"^local://[^/.][^\\]*$"
DataUri = Annotated[
    str,
    Field(
        pattern=f"{S3_URI_PATTERN}|{LOCAL_URI_PATTERN}",
        max_length=1024,
        description="`s3://<bucket>/<prefix>/` on the endpoint in `S3_ENDPOINT_URL`, or `local://<path>` "
        "relative to the worker's `DATA_ROOT` (never outside it).",
        examples=["s3://trainq/datasets/digits/", "local://digits/"],
    ),
]


#: C0 and C1 control characters and DEL (ESC, CR, LF, NUL, tab…): refused in every string of a spec.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(value: object) -> object:
    is_list = isinstance(value, list | tuple)
    for index, text in enumerate(value if is_list else (value,)):
        if isinstance(text, str) and (found := CONTROL_CHARS.search(text)):
            raise ValueError(
                f"{f'item {index} ' if is_list else ''}contains the control character {found.group()!r} at position "
                f"{found.start()}; URIs, names and columns must be printable"
            )
    return value


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys and NaN/Infinity are refused at every level.

    Numbers are strict: ``"epochs": "3"`` or ``true`` is a type error, not 3 or 1 (an int is
    still accepted where a float is expected). Strings (URIs, names, columns) may not hold
    control characters such as ESC, CR or LF: they end up in logs and terminals. A lone
    surrogate (``"\\ud800"``) is not valid Unicode and is refused too (by pydantic).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        return _printable(value)


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


Side = Annotated[int, Strict(), Field(ge=1, le=4096)]


class Resize(SpecModel):
    """``v2.Resize(size)``: the shorter side to ``size`` px (or exactly ``[h, w]``)."""

    name: Literal["resize"]
    size: Side | tuple[Side, Side] = Field(description="Pixels: one side, or `[height, width]`.")


class CenterCrop(SpecModel):
    """``v2.CenterCrop(size)``."""

    name: Literal["center_crop"]
    size: Int = Field(ge=1, le=4096)


class RandomCrop(SpecModel):
    """``v2.RandomCrop(size, padding)``: a random ``size`` crop after zero-padding each side."""

    name: Literal["random_crop"]
    size: Int = Field(ge=1, le=4096)
    padding: Int = Field(0, ge=0, le=1024)


class RandomResizedCrop(SpecModel):
    """``v2.RandomResizedCrop(size, scale)`` (Szegedy et al., 2015, the Inception crop)."""

    name: Literal["random_resized_crop"]
    size: Int = Field(ge=1, le=4096)
    scale: tuple[Float, Float] = Field((0.08, 1.0), description="Range of the crop's area fraction.")


class HorizontalFlip(SpecModel):
    """``v2.RandomHorizontalFlip(p)``."""

    name: Literal["horizontal_flip"]
    p: Float = Field(0.5, ge=0.0, le=1.0)


class ColorJitter(SpecModel):
    """``v2.ColorJitter``: random brightness, contrast, saturation (factors) and hue (≤ 0.5)."""

    name: Literal["color_jitter"]
    brightness: Float = Field(0.0, ge=0.0, le=10.0)
    contrast: Float = Field(0.0, ge=0.0, le=10.0)
    saturation: Float = Field(0.0, ge=0.0, le=10.0)
    hue: Float = Field(0.0, ge=0.0, le=0.5)


Transform = Annotated[
    Resize | CenterCrop | RandomCrop | RandomResizedCrop | HorizontalFlip | ColorJitter,
    Field(discriminator="name"),
]

#: Per-channel mean and std of ImageNet's training set (torchvision's classification references).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(SpecModel):
    """``v2.Normalize(mean, std)`` after scaling to [0, 1]; ``preset: imagenet`` uses ImageNet's."""

    preset: Literal["imagenet"] | None = None
    mean: list[Float] | None = Field(None, min_length=1, max_length=3)
    std: list[Annotated[float, Strict(), Field(gt=0.0)]] | None = Field(None, min_length=1, max_length=3)

    @model_validator(mode="after")
    def _preset_or_values(self) -> Normalize:
        if (self.preset is None) == (self.mean is None or self.std is None):
            raise ValueError("give either preset 'imagenet' or both mean and std")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel each")
        return self

    def values(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per channel."""
        if self.preset == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return tuple(self.mean or ()), tuple(self.std or ())


class ImageFolderDataset(SpecModel):
    """Images in class folders: ``<uri>/<class_name>/*.png|jpg`` (task: classification).

    The layout of torchvision's ``ImageFolder`` (and the classic ants/bees set). Classes are the
    sub-folder names in sorted order; hidden folders and files (``.ipynb_checkpoints``,
    ``.DS_Store``) are ignored. Each image becomes a float tensor of shape
    ``(channels, image_size, image_size)`` with values in [0, 1] (then `normalize`). Train
    images go through `train_transforms`, validation images through `eval_transforms`; a
    resize to `image_size` always ends both.
    """

    type: Literal["image_folder"] = "image_folder"
    uri: DataUri = Field(description="Prefix holding the training images, one sub-folder per class.")
    extra_uris: list[DataUri] = Field(
        default_factory=list,
        max_length=64,
        description="More prefixes with the same layout, concatenated with `uri` (e.g. ants/ and bees/ "
        "kept apart). Classes are the union of their folders.",
    )
    val_uri: DataUri | None = Field(
        None,
        description="Prefix of a separate validation set with the same class folders. "
        "When set, `val_fraction` is ignored.",
    )
    val_fraction: Float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of the images held out for validation, per class, chosen with `seed` "
        "(used when `val_uri` is not set): every class of 2 or more images has one in each split.",
    )
    image_size: Int = Field(32, ge=4, le=1024, description="Images are resized to a square of this side, in pixels.")
    channels: Literal[1, 3] = Field(3, description="1 converts images to grayscale, 3 to RGB.")
    train_transforms: list[Transform] = Field(
        default_factory=list, max_length=32, description="Augmentations for training images, in order."
    )
    eval_transforms: list[Transform] = Field(
        default_factory=list, max_length=32, description="Transforms for validation images, in order (the kinds of `train_transforms`)."
    )
    normalize: Normalize | None = Field(None, description="Per-channel normalization after scaling to [0, 1].")
    decode: Literal["auto", "workers", "device"] = Field(
        "auto",
        description="Where images are decoded and augmented. `workers`: in the DataLoader workers (Pillow "
        "on the CPU), which send uint8 batches. `device`: the workers send the encoded files and the "
        "training process decodes each batch in one call on the training device (nvJPEG on a CUDA GPU, "
        "libjpeg-turbo on a CPU), then runs the transforms there per image with parameters drawn from "
        "(seed, epoch, index); files that decoder refuses (CMYK, non-JPEG) are decoded on the CPU. "
        "`auto`: `device` when the job trains on a CUDA GPU and every image is a JPEG, else `workers`. "
        "Both give the same images (the one decoding contract: modes, EXIF orientation); on a CPU bit "
        "for bit, on a GPU within nvJPEG's rounding.",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _no_bool_channels(cls, value: object) -> object:
        if isinstance(value, bool):  # True == 1 would pass the Literal
            raise ValueError("channels must be the number 1 or 3")
        return value

    @model_validator(mode="after")
    def _normalize_fits_channels(self) -> ImageFolderDataset:
        if self.normalize is not None:
            mean, _ = self.normalize.values()
            if len(mean) not in (1, self.channels):
                raise ValueError(f"normalize has {len(mean)} values per statistic; channels is {self.channels}")
        return self

    @property
    def task(self) -> Literal["classification"]:
        """Image folders are always classification."""
        return "classification"

    def training_uris(self) -> list[tuple[Loc, str]]:
        """The training folders with their JSON paths: ``dataset.uri``, then each of ``dataset.extra_uris``."""
        return [(("dataset", "uri"), self.uri), *((("dataset", "extra_uris", i), uri) for i, uri in enumerate(self.extra_uris))]


class CsvDataset(SpecModel):
    """A table in one CSV file with a header row: feature columns and a target column.

    Features are parsed as numbers and standardized with the training split's mean and std
    (stored in every checkpoint). For ``task: classification`` the target's distinct values
    are the classes (sorted); for ``regression`` it must be numeric. Each row becomes a float
    tensor ``(num_features,)`` and a target: a class index, or a float ``(1,)``.
    """

    type: Literal["csv"]
    uri: DataUri = Field(description="The CSV object, e.g. `s3://bucket/tables/diabetes.csv`.")
    target: str = Field(min_length=1, max_length=256, description="Column to predict.")
    features: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=10_000, description="Feature columns; default: every column but `target`."
    )
    task: Literal["classification", "regression"] = Field(description="What the target is.")
    val_uri: DataUri | None = Field(None, description="A separate validation CSV with the same columns.")
    val_fraction: Float = Field(0.2, gt=0.0, lt=1.0, description="Rows held out for validation, chosen with `seed` (per class for classification).")

    @field_validator("uri", "val_uri")
    @classmethod
    def _names_an_object(cls, uri: str | None) -> str | None:
        # s3://bucket/key needs a key; local://file.csv may sit at the top of DATA_ROOT.
        too_short = uri is not None and uri.startswith("s3://") and uri.count("/") < 3
        if uri is not None and (uri.endswith("/") or too_short):
            raise ValueError("must name a CSV file, e.g. s3://bucket/tables/data.csv, not a prefix")
        return uri

    @model_validator(mode="after")
    def _target_is_not_a_feature(self) -> CsvDataset:
        if self.features is not None and self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed in features")
        return self


def _dataset_type(value: object) -> str | None:
    # `type` may be left out for an image folder (the first dataset kind, and the common one).
    if isinstance(value, dict):
        return value.get("type", "image_folder")
    return getattr(value, "type", None)


Dataset = Annotated[
    Annotated[ImageFolderDataset, Tag("image_folder")] | Annotated[CsvDataset, Tag("csv")],
    Discriminator(_dataset_type),
]


class ModelSpec(SpecModel):
    """The network: ``small_cnn``, ``mlp`` or a torchvision classification architecture by name.

    Weights are random unless ``weights_uri`` names a checkpoint of ours or a ``state_dict``
    saved with ``torch.save`` (loaded with ``weights_only=True``); nothing is downloaded.
    ``num_classes`` may be left out; it is then the number of classes in the dataset.
    """

    arch: Literal[("small_cnn", "mlp") + TORCHVISION_ARCHS] = Field(
        "small_cnn",
        description="`small_cnn` (4 conv layers, for small images), `mlp` (for `csv` data) or a torchvision architecture.",
    )
    num_classes: Int | None = Field(
        None, ge=2, le=100_000, description="Output classes; defaults to the dataset's class count."
    )
    # Input channels follow `dataset.channels`: a torchvision model's first convolution is rebuilt
    # for 1-channel (grayscale) input.
    hidden_sizes: list[Annotated[int, Strict(), Field(ge=1, le=65_536)]] = Field(
        [128, 64], max_length=16, description="`mlp` only: widths of the hidden layers."
    )
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="`mlp` only: dropout after each hidden layer.")
    weights_uri: S3Uri | None = Field(None, description="Initial weights: a trainq checkpoint or a state_dict file.")
    pretrained: bool = Field(
        False,
        description="Start from pretrained weights. They are never downloaded: requires `weights_uri`.",
    )

    @model_validator(mode="after")
    def _pretrained_needs_weights(self) -> ModelSpec:
        if self.pretrained and self.weights_uri is None:
            raise ValueError(
                "pretrained weights cannot be downloaded here: upload them and set weights_uri "
                "(a state_dict saved with torch.save)"
            )
        return self


def _named(default: str):
    """Discriminator on ``name``, which may be left out (then ``default``)."""

    def tag(value: object) -> str | None:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", None)

    return Discriminator(tag)


class CrossEntropyLoss(SpecModel):
    """``torch.nn.CrossEntropyLoss`` on logits ``(batch, num_classes)`` and class indices ``(batch,)``."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: Float = Field(0.0, ge=0.0, lt=1.0, description="As in `torch.nn.CrossEntropyLoss`.")
    class_weights: list[Annotated[float, Strict(), Field(ge=0.0)]] | None = Field(
        None, min_length=2, max_length=100_000, description="One weight per class, in class-index order."
    )


class BCEWithLogitsLoss(SpecModel):
    """``torch.nn.BCEWithLogitsLoss`` on logits ``(batch, num_classes)`` against one-hot targets."""

    name: Literal["bce_with_logits"]
    pos_weight: Float | None = Field(None, gt=0.0, description="Weight of positive targets.")


class MSELoss(SpecModel):
    """``torch.nn.MSELoss``: mean squared error, for regression."""

    name: Literal["mse"]


class L1Loss(SpecModel):
    """``torch.nn.L1Loss``: mean absolute error, for regression."""

    name: Literal["l1"]


class SmoothL1Loss(SpecModel):
    """``torch.nn.SmoothL1Loss`` (Girshick, 2015, Fast R-CNN), for regression."""

    name: Literal["smooth_l1"]
    beta: Float = Field(1.0, ge=0.0, le=1e6)


class HuberLoss(SpecModel):
    """``torch.nn.HuberLoss`` (Huber, 1964), for regression."""

    name: Literal["huber"]
    delta: Float = Field(1.0, gt=0.0, le=1e6)


Loss = Annotated[
    Annotated[CrossEntropyLoss, Tag("cross_entropy")]
    | Annotated[BCEWithLogitsLoss, Tag("bce_with_logits")]
    | Annotated[MSELoss, Tag("mse")]
    | Annotated[L1Loss, Tag("l1")]
    | Annotated[SmoothL1Loss, Tag("smooth_l1")]
    | Annotated[HuberLoss, Tag("huber")],
    _named("cross_entropy"),
]
CLASSIFICATION_LOSSES = frozenset({"cross_entropy", "bce_with_logits"})
REGRESSION_LOSSES = frozenset({"mse", "l1", "smooth_l1", "huber"})

Beta = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]


class AdamOptimizer(SpecModel):
    """``torch.optim.Adam`` (Kingma & Ba, 2015, arXiv:1412.6980)."""

    name: Literal["adam"] = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0, description="Learning rate.")
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.999), description="Coefficients of the running averages of the gradient and its square."
    )
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0, description="L2 penalty added to the gradient.")


class AdamWOptimizer(SpecModel):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (Loshchilov & Hutter, 2019, arXiv:1711.05101)."""

    name: Literal["adamw"]
    lr: Float = Field(1e-3, gt=0.0, le=10.0, description="Learning rate.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="As in Adam.")
    weight_decay: Float = Field(0.01, ge=0.0, le=1.0, description="Decoupled weight decay.")


class SGDOptimizer(SpecModel):
    """``torch.optim.SGD`` with optional (Nesterov) momentum (Sutskever et al., 2013)."""

    name: Literal["sgd"]
    lr: Float = Field(0.01, gt=0.0, le=10.0, description="Learning rate.")
    momentum: Float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = Field(False, description="Nesterov momentum; needs `momentum` > 0.")
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDOptimizer:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self




Optimizer = Annotated[
    Annotated[AdamOptimizer, Tag("adam")] | Annotated[AdamWOptimizer, Tag("adamw")] | Annotated[SGDOptimizer, Tag("sgd")],
    _named("adam"),
]


class StepSchedule(SpecModel):
    """``StepLR``: multiply the lr by ``gamma`` every ``step_epochs`` epochs."""

    name: Literal["step"]
    step_epochs: Int = Field(ge=1, le=100_000)
    gamma: Float = Field(0.1, gt=0.0, le=1.0)
    warmup_steps: Int = Field(0, ge=0, le=10**9, description="Linear warmup from lr/100 over these optimizer steps.")


class CosineSchedule(SpecModel):
    """``CosineAnnealingLR`` over the whole run, down to ``min_lr`` (Loshchilov & Hutter, 2017, SGDR)."""

    name: Literal["cosine"]
    min_lr: Float = Field(0.0, ge=0.0, le=10.0)
    warmup_steps: Int = Field(0, ge=0, le=10**9, description="Linear warmup from lr/100 over these optimizer steps.")


class OneCycleSchedule(SpecModel):
    """``OneCycleLR`` up to ``max_lr`` and down over the whole run (Smith & Topin, 2017, arXiv:1708.07120)."""

    name: Literal["one_cycle"]
    max_lr: Float = Field(gt=0.0, le=10.0)
    pct_start: Float = Field(0.3, gt=0.0, lt=1.0, description="Fraction of the run spent increasing the lr.")


class WarmupSchedule(SpecModel):
    """Linear warmup from lr/100 to lr over ``warmup_steps`` optimizer steps, then constant."""

    name: Literal["warmup"]
    warmup_steps: Int = Field(ge=1, le=10**9)


LRSchedule = Annotated[
    StepSchedule | CosineSchedule | OneCycleSchedule | WarmupSchedule, Field(discriminator="name")
]

Metric = Literal["val_loss", "val_accuracy", "val_top5_accuracy", "val_mae", "val_rmse", "val_r2"]
CLASSIFICATION_METRICS = frozenset({"val_loss", "val_accuracy", "val_top5_accuracy"})
REGRESSION_METRICS = frozenset({"val_loss", "val_mae", "val_rmse", "val_r2"})


#: A spec's ``priority`` when it names none (the middle of 0–100).
DEFAULT_PRIORITY = 50
#: The highest spec ``priority``.
MAX_PRIORITY = 100


class CheckpointSpec(SpecModel):
    """How often a checkpoint is written and uploaded. A final checkpoint is always written."""

    every_epochs: Int = Field(1, ge=1, le=100_000, description="Save after every N epochs.")
    every_steps: Int | None = Field(
        None, ge=1, le=10**9, description="Also save every N optimizer steps (bounds the work lost to a crash)."
    )
    best_metric: Metric | None = Field(
        None, description="Also keep `best.pt`: the epoch with the best value of this validation metric."
    )
    keep_last: Int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Keep only the newest N step checkpoints (`step-*.pt`, written by `every_steps` and `every_epochs`): "
        "an older one is deleted from S3 once a newer one is uploaded. `best.pt` and `final.pt` are always kept. "
        "Default: keep every checkpoint.",
    )


class EarlyStopping(SpecModel):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` epochs; the job succeeds."""

    metric: Metric = "val_loss"
    patience: Int = Field(5, ge=1, le=100_000, description="Epochs without improvement before stopping.")
    min_delta: Float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


Bool = Annotated[bool, Strict()]


class PerformanceSpec(SpecModel):
    """Speed settings of the training loop; the defaults are safe and change nothing on a CPU.

    On a CPU worker the defaults train exactly as plain fp32 PyTorch. On CUDA, ``precision: auto``
    trains under bf16 autocast (fp16 with a gradient scaler where the GPU has no bf16) and image
    models use ``channels_last``. Which settings keep a resumed job bit-identical to an
    uninterrupted one is in the README ("Performance").
    """

    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed precision of forward and loss (`torch.autocast`). `auto`: `bf16` on a CUDA device that "
        "supports it, else `fp16` on CUDA, `fp32` on a CPU. `fp16` also scales the loss "
        "(`torch.amp.GradScaler`, state kept in checkpoints) and needs CUDA; `bf16` runs on CPU and CUDA. "
        "Weights and optimizer state stay fp32.",
    )
    channels_last: Literal["auto"] | Bool = Field(
        "auto",
        description="Keep image models and batches in NHWC memory order (faster convolutions on tensor cores). "
        "`auto`: on for image folders on CUDA, off on a CPU.",
    )
    cudnn_benchmark: Bool = Field(
        False,
        description="Let cuDNN time its algorithms on the first batches and keep the fastest "
        "(`torch.backends.cudnn.benchmark`). Faster for fixed input sizes, but the choice may differ "
        "between runs, so a resumed job is no longer bit-identical.",
    )
    deterministic: Bool = Field(
        False,
        description="Use deterministic CUDA kernels only (`torch.use_deterministic_algorithms`, "
        "`cudnn.deterministic`): needed for a bit-identical resume on a GPU; somewhat slower. "
        "No effect on a CPU.",
    )
    compile: Bool = Field(
        False,
        description="`torch.compile` the model (opt-in): the first steps compile (seconds to minutes), later "
        "ones may run faster. Checkpoints hold the plain model's `state_dict`.",
    )
    persistent_workers: Bool = Field(
        False,
        description="Keep the DataLoader's worker processes between epochs (needs `num_workers` > 0).",
    )
    prefetch_factor: Int | None = Field(
        None,
        ge=1,
        le=64,
        description="Batches each DataLoader worker loads ahead (needs `num_workers` > 0); null: torch's default, 2.",
    )


class ResourcesSpec(SpecModel):
    """What a job needs of its worker."""

    gpus: Int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs of one worker to train on. More than 1 runs DistributedDataParallel, one process per GPU "
        "(NCCL); `batch_size` is then the global batch, split evenly over the GPUs. A worker with fewer "
        "GPUs fails the job at start.",
    )


class JobSpec(SpecModel):
    """A training job: data, model, loss, optimizer and the loop's settings.

    The loop is the standard one: DataLoader → model → loss → ``zero_grad``/``backward``/``step``,
    validation after every epoch. The task follows the dataset (image folders: classification;
    CSV: as its `task` says) and must fit the loss: cross-entropy or BCE for classification,
    MSE/L1/smooth L1/Huber for regression.
    """

    name: str | None = Field(
        None, min_length=1, max_length=128, description="A label for people; not unique.", examples=["digits-cnn"]
    )
    dataset: Dataset
    model: ModelSpec = Field(ModelSpec(), validate_default=True, description="Default: `small_cnn` for images, `mlp` for csv.")
    loss: Loss = Field(
        CrossEntropyLoss(), validate_default=True, description="Default: `cross_entropy` for classification, `mse` for regression."
    )
    optimizer: Optimizer = AdamOptimizer()
    lr_schedule: LRSchedule | None = Field(None, description="How the lr changes; stepped after every optimizer step.")
    epochs: Int = Field(10, ge=1, le=100_000, description="Passes over the training set.")
    batch_size: Int = Field(
        32,
        ge=1,
        le=65_536,
        description="Samples per forward pass (micro-batch), over all of the job's GPUs: each of "
        "`resources.gpus` processes takes batch_size / gpus.",
    )
    drop_last: Literal["auto"] | Annotated[bool, Strict()] = Field(
        "auto",
        description="Drop each epoch's last training batch when it is smaller than `batch_size`. `auto` drops it "
        "only when it would hold 1 sample and the model has BatchNorm (which cannot train on one sample); "
        "`false` with such a batch fails the job before training.",
    )
    grad_accumulation_steps: Int = Field(
        1, ge=1, le=4096, description="Micro-batches per optimizer step (effective batch = batch_size × this)."
    )
    grad_clip_norm: Float | None = Field(None, gt=0.0, description="Clip the gradients' total L2 norm to this.")
    seed: Int = Field(0, ge=0, lt=2**32, description="Seeds torch, numpy, Python, the split and augmentations.")
    num_workers: Int = Field(
        0, ge=0, le=64, description="DataLoader worker processes (0 loads in the training process)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when the worker has it, else the CPU; `cuda` fails on a CPU worker."
    )
    checkpoint: CheckpointSpec = Field(CheckpointSpec(), validate_default=True)
    early_stopping: EarlyStopping | None = None
    performance: PerformanceSpec = Field(PerformanceSpec(), validate_default=True)
    resources: ResourcesSpec = Field(ResourcesSpec(), validate_default=True)
    max_runtime_s: Float | None = Field(
        None,
        gt=0,
        description="Time limit in seconds on the job's run on workers, summed over attempts: every phase counts "
        "(data download and checks, model build, training, validation, uploads), time queued does not, nor an "
        "attempt's time after its last checkpoint if its worker died. At the limit the job stops in whatever phase "
        "it is (saving a checkpoint once training has begun) and fails with reason `time limit`. Capped by the "
        "server's `MAX_RUNTIME_S`.",
    )
    queue: str | None = Field(
        None,
        pattern=QUEUE_PATTERN,
        description="Celery queue to run on (workers started with `-Q <queue>`); defaults to `DEFAULT_QUEUE`.",
    )
    priority: Int = Field(
        DEFAULT_PRIORITY,
        ge=0,
        le=MAX_PRIORITY,
        description="Dispatch order on the queue, higher first (0–100, default 50): a waiting job of higher priority "
        "goes to the next free worker before any lower one, and may preempt a running lower one. An owner may give "
        "at most `PRIORITY_CEILING` (or their `PRIORITY_CEILING_BY_OWNER`; an admin token up to 100). Equal priorities go by the owners' "
        "fair-share deficit, then by age.",
    )
    preemptible: Annotated[bool, Strict()] = Field(
        True,
        description="A waiting job of higher priority may stop this one: it checkpoints, goes back to the queue "
        "(state `preempted`) and later resumes exactly where it stopped. `false` is allowed only at priority "
        "`NON_PREEMPTIBLE_MIN_PRIORITY` or above.",
    )

    @property
    def task(self) -> Literal["classification", "regression"]:
        """``classification`` or ``regression``, from the dataset."""
        return self.dataset.task

    def data_uris(self) -> list[tuple[Loc, str]]:
        """Every URI the spec reads, with its JSON path: ``dataset.uri``, each of ``dataset.extra_uris``,
        ``dataset.val_uri`` and ``model.weights_uri`` (those set)."""
        dataset = self.dataset
        uris = dataset.training_uris() if isinstance(dataset, ImageFolderDataset) else [(("dataset", "uri"), dataset.uri)]
        uris += [(("dataset", "val_uri"), dataset.val_uri), (("model", "weights_uri"), self.model.weights_uri)]
        return [(loc, uri) for loc, uri in uris if uri is not None]

    def time_limit_s(self, server_max_runtime_s: float) -> float:
        """The job's effective time limit in seconds: ``max_runtime_s`` capped by the server's ``MAX_RUNTIME_S``."""
        return min(server_max_runtime_s, self.max_runtime_s or server_max_runtime_s)

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_dataset(cls, data: object) -> object:
        # Defaults that follow the data: an MLP for tables, and the seed's rule for the loss
        # (CrossEntropyLoss for classification, MSELoss for regression).
        if not isinstance(data, dict) or not isinstance(data.get("dataset"), dict):
            return data
        dataset, data = data["dataset"], dict(data)
        if dataset.get("type") == "csv":
            model = data.get("model", {})
            if isinstance(model, dict) and "arch" not in model:
                data["model"] = {**model, "arch": "mlp"}
        if "loss" not in data and dataset.get("task") == "regression":
            data["loss"] = {"name": "mse"}
        return data

    @field_validator("model")
    @classmethod
    def _model_fits_dataset(cls, model: ModelSpec, info: ValidationInfo) -> ModelSpec:
        dataset = info.data.get("dataset")
        if dataset is None:
            return model
        if isinstance(dataset, CsvDataset) != (model.arch == "mlp"):
            kind = "csv" if isinstance(dataset, CsvDataset) else "image_folder"
            raise ValueError(f"model.arch {model.arch!r} does not take a {kind} dataset: use 'mlp' for csv, an image model for image_folder")
        if isinstance(dataset, CsvDataset):
            if dataset.task == "regression" and model.num_classes is not None:
                raise ValueError("model.num_classes is for classification; this dataset's task is regression")
            return model
        if model.arch.startswith("vit_") and dataset.image_size != 224:
            raise ValueError(f"model.arch {model.arch!r} takes 224x224 images: set dataset.image_size to 224")
        return model

    @field_validator("drop_last", mode="before")
    @classmethod
    def _drop_last_choice(cls, value: object) -> object:
        if not (value == "auto" or isinstance(value, bool)):  # one error, not one per union member
            raise ValueError('drop_last must be "auto", true or false')
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_fits_model(cls, batch_size: int, info: ValidationInfo) -> int:
        model = info.data.get("model")
        if batch_size == 1 and model is not None and model.arch in BATCHNORM_ARCHS:
            raise ValueError(batch_of_one_error(model.arch))
        return batch_size

    @field_validator("loss")
    @classmethod
    def _loss_fits_task(cls, loss: BaseModel, info: ValidationInfo) -> BaseModel:
        dataset = info.data.get("dataset")
        if dataset is None:
            return loss
        allowed = CLASSIFICATION_LOSSES if dataset.task == "classification" else REGRESSION_LOSSES
        if loss.name not in allowed:
            raise ValueError(
                f"loss {loss.name!r} does not fit a {dataset.task} target: use one of {sorted(allowed)} "
                "(CrossEntropyLoss for classification, MSELoss for regression)"
            )
        model = info.data.get("model")
        weights = getattr(loss, "class_weights", None)
        if weights is not None and model is not None and model.num_classes is not None and len(weights) != model.num_classes:
            raise ValueError(f"loss.class_weights has {len(weights)} values; model.num_classes is {model.num_classes}")
        return loss

    # Field validators on the later field (not a model validator), so a 422 names the section:
    # ["body", "performance"] rather than ["body"].
    @field_validator("performance")
    @classmethod
    def _performance_fits(cls, performance: PerformanceSpec, info: ValidationInfo) -> PerformanceSpec:
        if performance.precision == "fp16" and info.data.get("device") == "cpu":  # known at submit, not just on the worker
            raise ValueError("performance.precision 'fp16' needs a CUDA device; with device 'cpu' use 'bf16' or 'fp32'")
        if info.data.get("num_workers") == 0:
            for name in ("persistent_workers", "prefetch_factor"):
                if getattr(performance, name) not in (None, False):
                    raise ValueError(f"performance.{name} needs num_workers > 0 (DataLoader worker processes)")
        return performance

    @field_validator("resources")
    @classmethod
    def _batch_divides_over_gpus(cls, resources: BaseModel, info: ValidationInfo) -> BaseModel:
        batch_size, gpus = info.data.get("batch_size"), resources.gpus
        if batch_size is not None and batch_size % gpus:
            raise ValueError(f"batch_size {batch_size} is the global batch and must divide evenly over resources.gpus {gpus}")
        return resources

    @field_validator("checkpoint", "early_stopping")
    @classmethod
    def _metrics_fit_task(cls, section: BaseModel | None, info: ValidationInfo) -> BaseModel | None:
        dataset = info.data.get("dataset")
        metric = getattr(section, "best_metric", None) or getattr(section, "metric", None)
        if dataset is None or metric is None:
            return section
        allowed = CLASSIFICATION_METRICS if dataset.task == "classification" else REGRESSION_METRICS
        if metric not in allowed:
            raise ValueError(f"metric {metric!r} does not exist for {dataset.task}: use one of {sorted(allowed)}")
        return section


#: Whether a larger value of the metric is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "val_loss": False,
    "val_accuracy": True,
    "val_top5_accuracy": True,
    "val_mae": False,
    "val_rmse": False,
    "val_r2": True,
}


#: Names pydantic puts into an error's ``loc`` to say which member of a union it tried: the
#: ``type``/``name`` of every dataset, transform, loss, optimizer and schedule.
_UNION_TAGS = frozenset(
    get_args(model.model_fields[field].annotation)[0]
    for model in (
        ImageFolderDataset, CsvDataset, Resize, CenterCrop, RandomCrop, RandomResizedCrop, HorizontalFlip,
        ColorJitter, CrossEntropyLoss, BCEWithLogitsLoss, MSELoss, L1Loss, SmoothL1Loss, HuberLoss, AdamOptimizer,
        AdamWOptimizer, SGDOptimizer, StepSchedule, CosineSchedule, OneCycleSchedule, WarmupSchedule,
    )
    for field in ("type", "name")
    if field in model.model_fields
) | {"int", "float", "str", "bool"}
_TYPE_TAG_PREFIXES = ("constrained-", "tuple[", "list[", "function-", "literal[")


def json_path(loc: tuple | list, data: object) -> list:
    """The JSON path of a validation error: pydantic's ``loc`` without the union tags it inserts.

    ``("optimizer", "adam", "lr")`` for the body ``{"optimizer": {"lr": -1}}`` becomes
    ``["optimizer", "lr"]``: the path a user can find in what they sent.
    """
    path, current = [], data
    for part in loc:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
        elif isinstance(part, str) and (part in _UNION_TAGS or part.startswith(_TYPE_TAG_PREFIXES)):
            continue
        else:
            current = None
        path.append(part)
    return path
