"""The training spec: the single source of truth for what a job trains.

The API validates ``POST /jobs`` bodies with :class:`JobSpec`; the worker validates the stored JSON
again with the same class before it spends any GPU time. Every model forbids unknown keys and
non-finite numbers, so a typo (``learnig_rate``) or an ``lr`` of ``NaN`` is a 422 naming the field.

This module imports neither torch nor torchvision: the API stays light. The worker checks at
start-up (and a test checks in CI) that every architecture named here exists in torchvision.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
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

S3Uri = Annotated[
    str,
    Field(
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="An S3 URI, `s3://<bucket>/<prefix>/`, on the endpoint in `S3_ENDPOINT_URL`.",
        examples=["s3://trainq/datasets/digits/"],
    ),
]


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys and NaN/Infinity are refused at every level.

    Numbers are strict: ``"epochs": "3"`` or ``true`` is a type error, not 3 or 1 (an int is
    still accepted where a float is expected).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class ImageFolderDataset(SpecModel):
    """Images in class folders under an S3 prefix: ``<uri>/<class_name>/*.png|jpg``.

    The layout of torchvision's ``ImageFolder`` (and the classic ants/bees set). Classes are the
    sub-folder names in sorted order; hidden folders and files (``.ipynb_checkpoints``,
    ``.DS_Store``) are ignored. Each image becomes a float tensor of shape
    ``(channels, image_size, image_size)`` with values in [0, 1].
    """

    type: Literal["image_folder"] = "image_folder"
    uri: S3Uri = Field(description="Prefix holding the training images, one sub-folder per class.")
    val_uri: S3Uri | None = Field(
        None,
        description="Prefix of a separate validation set with the same class folders. "
        "When set, `val_fraction` is ignored.",
    )
    val_fraction: Float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of `uri`'s images held out for validation, chosen with `seed` "
        "(used when `val_uri` is not set).",
    )
    image_size: Int = Field(32, ge=4, le=1024, description="Images are resized to a square of this side, in pixels.")
    channels: Literal[1, 3] = Field(3, description="1 converts images to grayscale, 3 to RGB.")


    @field_validator("channels", mode="before")
    @classmethod
    def _no_bool_channels(cls, value: object) -> object:
        if isinstance(value, bool):  # True == 1 would pass the Literal
            raise ValueError("channels must be the number 1 or 3")
        return value


class ModelSpec(SpecModel):
    """The network: trainq's ``small_cnn`` or a torchvision classification architecture by name.

    Weights are initialised at random (no weights are downloaded). ``num_classes`` may be left
    out; it is then the number of class folders in the dataset. When given, it must match them.
    """

    arch: Literal[("small_cnn",) + TORCHVISION_ARCHS] = Field(
        "small_cnn", description="`small_cnn` (4 conv layers, for small images) or a torchvision architecture."
    )
    num_classes: Int | None = Field(
        None, ge=2, le=100_000, description="Output classes; defaults to the dataset's class count."
    )


class CrossEntropyLoss(SpecModel):
    """``torch.nn.CrossEntropyLoss`` on the model's logits, shape ``(batch, num_classes)``."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: Float = Field(0.0, ge=0.0, lt=1.0, description="As in `torch.nn.CrossEntropyLoss`.")


class AdamOptimizer(SpecModel):
    """``torch.optim.Adam`` (Kingma & Ba, 2015, arXiv:1412.6980)."""

    name: Literal["adam"] = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0, description="Learning rate.")
    betas: tuple[
        Annotated[float, Strict(), Field(ge=0.0, lt=1.0)],
        Annotated[float, Strict(), Field(ge=0.0, lt=1.0)],
    ] = Field((0.9, 0.999), description="Coefficients of the running averages of the gradient and its square.")
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0, description="L2 penalty added to the gradient.")


class CheckpointSpec(SpecModel):
    """How often a checkpoint is written and uploaded. A final checkpoint is always written."""

    every_epochs: Int = Field(1, ge=1, le=100_000, description="Save after every N epochs.")
    every_steps: Int | None = Field(
        None, ge=1, le=10**9, description="Also save every N optimizer steps (bounds the work lost to a crash)."
    )


class JobSpec(SpecModel):
    """A training job: data, model, loss, optimizer and the loop's settings.

    The loop is the standard one: DataLoader → model → loss → ``zero_grad``/``backward``/``step``,
    validation after every epoch.
    """

    name: str | None = Field(
        None, min_length=1, max_length=128, description="A label for people; not unique.", examples=["digits-cnn"]
    )
    dataset: ImageFolderDataset
    model: ModelSpec = ModelSpec()
    loss: CrossEntropyLoss = CrossEntropyLoss()
    optimizer: AdamOptimizer = AdamOptimizer()
    epochs: Int = Field(10, ge=1, le=100_000, description="Passes over the training set.")
    batch_size: Int = Field(32, ge=1, le=65_536, description="Samples per optimizer step.")
    seed: Int = Field(0, ge=0, lt=2**32, description="Seeds torch, numpy, Python and the validation split.")
    num_workers: Int = Field(
        0, ge=0, le=64, description="DataLoader worker processes (0 loads in the training process)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when the worker has it, else the CPU; `cuda` fails on a CPU worker."
    )
    checkpoint: CheckpointSpec = CheckpointSpec()
    max_runtime_s: Float | None = Field(
        None,
        gt=0,
        description="Training time limit in seconds, summed over attempts. At the limit the job saves a "
        "checkpoint and fails with reason `time limit`. Capped by the server's `MAX_RUNTIME_S`.",
    )
    queue: str | None = Field(
        None,
        pattern=QUEUE_PATTERN,
        description="Celery queue to run on (workers started with `-Q <queue>`); defaults to `DEFAULT_QUEUE`.",
    )

    @field_validator("model")
    @classmethod
    def _model_fits_dataset(cls, model: ModelSpec, info: ValidationInfo) -> ModelSpec:
        dataset = info.data.get("dataset")
        if dataset is None or model.arch == "small_cnn":
            return model
        if dataset.channels != 3:
            raise ValueError(f"model.arch {model.arch!r} takes 3-channel input: set dataset.channels to 3")
        if model.arch.startswith("vit_") and dataset.image_size != 224:
            raise ValueError(f"model.arch {model.arch!r} takes 224x224 images: set dataset.image_size to 224")
        return model
