"""The decoding contract (worker/training/decode.py): one answer for the CPU and device paths.

The contract tests run everywhere on the CPU; the ``cuda`` tests compare nvJPEG with the CPU
path when a GPU is present.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from worker.training.decode import (
    DecodeError,
    ORIENTATION_TAG,
    decode_file,
    decode_images,
    orient,
    peek_header,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def photo(width: int = 40, height: int = 24, seed: int = 0, noise: int = 30) -> Image.Image:
    """A smooth RGB picture with noise (JPEG keeps its structure), not symmetric in any axis."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx * 3 + yy * 7) % 256], -1)
    return Image.fromarray((pixels + rng.integers(0, noise + 1, pixels.shape)).clip(0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "JPEG", orientation: int | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        options["exif"] = exif
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def on_device(files: list[bytes], mode: str, device: str = "cpu") -> list:
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    return decode_images(tensors, [peek_header(data) for data in files], mode, torch.device(device))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_pillows_exif_transpose(orientation: int):
    image = photo()
    image.getexif()[ORIENTATION_TAG] = orientation
    want = F.pil_to_tensor(ImageOps.exif_transpose(image))
    assert torch.equal(orient(F.pil_to_tensor(image), orientation), want)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_phone_photo_trains_as_a_viewer_shows_it_on_both_paths(orientation: int):
    # A camera stores the sensor's pixels and says in EXIF how to turn them (nvJPEG ignores the tag).
    upright = photo(40, 24, noise=0)
    stored = upright.transpose({1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation]) if orientation != 1 else upright
    data = encoded(stored, orientation=orientation, quality=95)
    cpu = decode_file(data, "RGB")
    assert cpu.shape == (3, 24, 40)  # upright again, whatever the storage
    error = (cpu.float() - F.pil_to_tensor(upright).float()).abs().mean()
    assert error < 3, error  # JPEG's loss only (mirrored, it would be ~80)
    [device] = on_device([data], "RGB")
    assert torch.equal(device, cpu)


def test_device_path_equals_the_cpu_path_bit_for_bit_on_the_cpu():
    # Every mode the contract names; JPEGs go through decode_jpeg, the others fall back to Pillow.
    color, gray = photo(), photo().convert("L")
    files = {
        "rgb 4:2:0": encoded(color, quality=90),
        "rgb 4:4:4 progressive": encoded(color, quality=90, subsampling=0, progressive=True),
        "gray jpeg": encoded(gray),
        "cmyk jpeg": encoded(color.convert("CMYK")),
        "rotated jpeg": encoded(color, orientation=6),
        "png rgba": encoded(color.convert("RGBA"), "PNG"),
        "png palette": encoded(color.convert("P"), "PNG"),
        "png 16-bit": encoded(Image.fromarray((np.arange(960, dtype=np.uint16).reshape(24, 40) * 60)), "PNG"),
    }
    headers = {name: peek_header(data) for name, data in files.items()}
    assert [name for name, header in headers.items() if header.device_decodable] == [
        "rgb 4:2:0", "rgb 4:4:4 progressive", "gray jpeg", "rotated jpeg"
    ]
    for mode in ("RGB", "L"):
        decoded = on_device(list(files.values()), mode)
        for (name, data), tensor in zip(files.items(), decoded, strict=True):
            want = decode_file(data, mode)
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), f"{name} as {mode}"


def test_a_corrupt_file_is_an_error_for_that_file_only():
    good = encoded(photo(200, 120))
    garbled = good[:600] + bytes(len(good) - 600)  # the header intact, the entropy-coded data zeros
    decoded = on_device([good, garbled], "RGB")
    assert isinstance(decoded[0], torch.Tensor) and decoded[0].shape == (3, 120, 200)
    assert isinstance(decoded[1], DecodeError), decoded[1]
    with pytest.raises(DecodeError):
        decode_file(b"not an image", "RGB")


def test_the_decompression_bomb_guard_reads_only_the_header():
    # A PNG whose header claims 10,000 × 5,000 pixels and holds no pixel data: decoding it would
    # fail (or take 150 MB); the guard refuses it from the header.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 5_000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    for call in (lambda: peek_header(bomb, max_pixels=10**6), lambda: decode_file(bomb, "RGB", max_pixels=10**6)):
        with pytest.raises(DecodeError, match=r"10000x5000 = 50,000,000 pixels is more than MAX_IMAGE_PIXELS \(1,000,000\)"):
            call()


@cuda
def test_nvjpeg_matches_the_cpu_contract_within_rounding():
    files = [encoded(photo(seed=s), orientation=o) for s, o in ((0, 1), (1, 6), (2, 3))] + [encoded(photo().convert("CMYK"))]
    for mode in ("RGB", "L"):
        for data, tensor in zip(files, on_device(files, mode, "cuda"), strict=True):
            want = decode_file(data, mode)
            assert tensor.device.type == "cuda" and tensor.shape == want.shape and tensor.dtype == want.dtype
            assert (tensor.cpu().int() - want.int()).abs().float().mean() < 2  # nvJPEG's IDCT rounds differently
