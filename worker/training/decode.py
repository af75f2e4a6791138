"""How an image file becomes a tensor: the one decoding contract of the CPU and device paths.

Every image a job trains on, validates on or predicts on goes through :func:`image_to_tensor`
(a PIL image, decoded on the CPU) or :func:`decode_images` (a batch of encoded files decoded in
one call on the training device, with the files its decoder refuses decoded by
:func:`image_to_tensor`). Both give the same tensor for the same file:

- ``(channels, H, W)``, ``uint8`` for 8-bit images, float in [0, 1] for 16-bit and float ones
  (:func:`to_mode`: alpha dropped, palettes looked up, CMYK/YCbCr/LAB/HSV to RGB, grayscale by
  Pillow's ITU-R 601-2 luma);
- **EXIF orientation applied** (:func:`orient`), so an image trains as a photo viewer shows it.
  The tag is read from the file's header (:func:`read_header`) on both paths: nvJPEG ignores it;
- an image with more pixels than ``MAX_IMAGE_PIXELS`` is refused from its header, before any
  decode (a decompression bomb must not take the worker's memory);
- a file neither decoder can read raises :class:`DecodeError`, whose caller names the S3 key.

On the CPU, torchvision's ``decode_jpeg`` and Pillow decode JPEGs with the same libjpeg-turbo
settings (islow IDCT, fancy upsampling): the two paths give equal tensors bit for bit (tested).
On CUDA, nvJPEG's IDCT rounds differently: values differ by a few levels, shapes and orientation
do not (tested when a GPU is present).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

#: torchvision 0.29 deprecates its decoders for TorchCodec (not in the device image, which has
#: torchvision 0.26); the call stays the same until then, so its per-call warning is muted.
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"

#: The EXIF tag holding the orientation (1..8; 1 is upright).
ORIENTATION_TAG = 0x0112

#: Pillow modes of one channel with more than 8 bits, and the value that maps to 1.0: 16-bit
#: unsigned (any byte order) and 32-bit signed ``I``. ``I`` holds what 16-bit PNGs and TIFFs
#: opened as in older Pillow versions, so it is read as 16-bit: values must lie in 0..65535.
HIGH_BIT_MODES: dict[str, float] = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}

#: JPEG pixel modes the device decoder takes; others (CMYK, YCCK) decode on the CPU.
DEVICE_JPEG_MODES = ("L", "RGB")


class DecodeError(ValueError):
    """A file that cannot become a tensor; the message says why (the caller names the file)."""


class ImageModeError(DecodeError):
    """An image whose pixel mode or values cannot be scaled to [0, 1]; the message names the mode."""


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels.

    Attributes:
        format: Pillow's format name (``"JPEG"``, ``"PNG"``…).
        mode: Pillow's pixel mode (``"RGB"``, ``"CMYK"``, ``"I;16"``…).
        width, height: pixels, before orientation.
        orientation: the EXIF orientation, 1 (upright) when absent or invalid.
    """

    format: str
    mode: str
    width: int
    height: int
    orientation: int = 1

    @property
    def device_decodable(self) -> bool:
        """Whether :func:`decode_images` decodes this file on the device (an 8-bit gray or colour JPEG)."""
        return self.format == "JPEG" and self.mode in DEVICE_JPEG_MODES


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` (width × height, from its header).

    Raises:
        DecodeError: naming the size and the ``MAX_IMAGE_PIXELS`` limit.
    """
    if width * height > max_pixels:
        raise DecodeError(f"{width}x{height} = {width * height:,} pixels is more than MAX_IMAGE_PIXELS ({max_pixels:,})")


def read_header(image: Image.Image, max_pixels: int | None = None) -> ImageHeader:
    """The header of an opened (not yet decoded) PIL image; refuses a decompression bomb first.

    Raises:
        DecodeError: more than ``max_pixels`` pixels.
    """
    if max_pixels is not None:
        check_pixels(image.width, image.height, max_pixels)
    try:
        orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: the pixels may still be fine, trained as stored
        orientation = 1
    return ImageHeader(image.format or "", image.mode, image.width, image.height, orientation if 1 <= orientation <= 8 else 1)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` ``(..., H, W)`` turned as EXIF ``orientation`` says, as Pillow's
    ``ImageOps.exif_transpose`` does (tested equal): 2 mirror, 3 turn 180°, 4 flip, 5 transpose,
    6 turn 90° clockwise, 7 transverse, 8 turn 90° counter-clockwise; 1 (or other) as is."""
    match orientation:
        case 2:
            return image.flip(-1)
        case 3:
            return image.flip(-1, -2)
        case 4:
            return image.flip(-2)
        case 5:
            return image.transpose(-1, -2)
        case 6:
            return image.rot90(-1, dims=(-2, -1))
        case 7:
            return image.transpose(-1, -2).flip(-1, -2)
        case 8:
            return image.rot90(1, dims=(-2, -1))
    return image


def to_mode(image: Image.Image, mode: str) -> Image.Image | torch.Tensor:
    """``image`` in ``mode`` (``"L"`` or ``"RGB"``): a PIL image for 8-bit modes, a float tensor
    ``(channels, H, W)`` in [0, 1] for more bits.

    8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV…) are converted by Pillow:
    alpha is dropped, a palette (with or without transparency) is looked up, CMYK/YCbCr/LAB/HSV
    become RGB, and grayscale is Pillow's ITU-R 601-2 luma. 16-bit (``I;16``, ``I;16B``, and
    ``I``) is divided by 65535, 32-bit float ``F`` taken as is.

    Raises:
        ImageModeError: ``I`` with values outside 0..65535, ``F`` with values outside [0, 1]
            (or NaN), or a mode Pillow cannot convert (e.g. premultiplied ``La``); the message
            names the mode (the caller names the file).
    """
    channels = 1 if mode == "L" else 3
    if image.mode in HIGH_BIT_MODES or image.mode == "F":
        pixels = np.asarray(image)
        values = pixels.astype(np.float32) / HIGH_BIT_MODES.get(image.mode, 1.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ImageModeError(
                f"mode {image.mode!r} pixel values span {float(pixels.min()):g}..{float(pixels.max()):g}; "
                f"expected {'0..65535' if image.mode == 'I' else '0..1'}: rescale the file to 8 or 16 bits"
            )
        return torch.from_numpy(values).unsqueeze(0).expand(channels, -1, -1).contiguous()
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        image = image.convert("RGBA")  # as Pillow recommends, so the palette is not mangled
    elif image.mode in ("LAB",) and mode == "L":
        image = image.convert("RGB")  # Pillow has no LAB → L
    try:
        return image.convert(mode)
    except ValueError as exc:
        raise ImageModeError(f"mode {image.mode!r} cannot be converted to {mode} ({exc})") from exc


def image_to_tensor(image: Image.Image, mode: str, max_pixels: int | None = None) -> torch.Tensor:
    """An opened PIL image as the contract's tensor ``(channels, H, W)`` (see the module): header
    checked before decoding, converted by :func:`to_mode`, turned by its EXIF orientation.

    Raises:
        DecodeError: too many pixels, an unreadable or truncated file, or a mode that cannot be
            scaled (:class:`ImageModeError`).
    """
    header = read_header(image, max_pixels)
    try:
        converted = to_mode(image, mode)
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises several types for truncated or non-image files
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
    tensor = converted if isinstance(converted, torch.Tensor) else F.pil_to_tensor(converted)
    return orient(tensor, header.orientation)


def decode_file(source: str | Path | bytes, mode: str, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`image_to_tensor` of a file (a path, or its bytes), decoded on the CPU.

    Raises:
        DecodeError: as :func:`image_to_tensor`, or not an image at all.
    """
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source)
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
    with opened as image:
        return image_to_tensor(image, mode, max_pixels)


def peek_header(data: bytes, max_pixels: int | None = None) -> ImageHeader:
    """:func:`read_header` of a file's bytes (Pillow reads the header only).

    Raises:
        DecodeError: not an image Pillow knows, or too many pixels.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
    with opened as image:
        return read_header(image, max_pixels)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A decoded 8-bit ``(1 or 3, H, W)`` image with ``channels`` channels, as Pillow converts:
    gray → RGB repeats the channel; RGB → gray is Pillow's integer luma
    ``(19595 R + 38470 G + 7471 B + 2**15) >> 16`` (ITU-R 601-2), so the result equals
    ``Image.convert("L")`` bit for bit."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1)
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=image.device).view(3, 1, 1)
    return ((image.to(torch.int32) * weights).sum(0, keepdim=True) + (1 << 15)).bitwise_right_shift(16).to(torch.uint8)


def decode_images(
    files: list[torch.Tensor], headers: list[ImageHeader], mode: str, device: torch.device
) -> list[torch.Tensor | DecodeError]:
    """Decode a batch of encoded files on ``device``: the contract's tensors, in order.

    The JPEGs ``device`` can decode (:attr:`ImageHeader.device_decodable`) go to torchvision's
    ``decode_jpeg`` in one call (nvJPEG on CUDA, batched; libjpeg-turbo on the CPU); a batch it
    refuses is retried file by file, and a file it still refuses, like every other file (CMYK,
    PNG, 16-bit…), is decoded on the CPU by :func:`decode_file` and copied to ``device``. A file
    no decoder can read comes back as its :class:`DecodeError` (the caller names the file).

    Args:
        files: 1-D uint8 CPU tensors, each a whole file (pinned for a faster copy on CUDA).
        headers: each file's :func:`peek_header` (headers were checked against
            ``MAX_IMAGE_PIXELS`` there).
        mode: ``"L"`` or ``"RGB"``.
    """
    channels = 1 if mode == "L" else 3
    out: list[torch.Tensor | DecodeError | None] = [None] * len(files)
    jpegs = [i for i, header in enumerate(headers) if header.device_decodable]
    for i, image in zip(jpegs, _decode_jpegs([files[i] for i in jpegs], device), strict=True):
        if image is not None:
            out[i] = orient(match_channels(image, channels), headers[i].orientation)
    for i, image in enumerate(out):
        if image is None:
            try:
                out[i] = decode_file(files[i].numpy().tobytes(), mode).to(device, non_blocking=True)
            except DecodeError as exc:
                out[i] = exc
    return out  # type: ignore[return-value]


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_jpeg`` of ``files`` to RGB in one call, else one by one; None where it fails.

    Always RGB, nvJPEG's most used output: a gray JPEG comes back with its channel repeated,
    which :func:`match_channels` turns back into exactly that channel (the luma of ``(y, y, y)``
    is ``y``)."""
    if not files:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        return _decode_jpegs_loudly(files, device)


def _decode_jpegs_loudly(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | None] = []
    for data in files:
        try:
            decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of one shape as a batch ``(batch, channels, H, W)``.

    A batch mixing uint8 (8-bit files) and float (16-bit files) images is scaled to float32 in
    [0, 1] first (what ``build_finish`` does to each), so no uint8 value is ever stacked unscaled
    beside floats. In a DataLoader worker the batch lands in shared memory (``default_collate``).
    """
    if len({image.dtype for image in images}) > 1:
        images = [F.to_dtype(image, torch.float32, scale=True) for image in images]
    return default_collate([image.as_subclass(torch.Tensor) for image in images])
