"""A bound on an initial weights file before ``torch.load`` reads it (issue 17).

``torch.save`` writes a zip archive whose entries are stored uncompressed; ``torch.load`` reads
each entry into memory at the size the archive's directory declares. A 195 KB file whose entries
were deflate-compressed grew the worker by 190 MB before the shape check could refuse it. The
zip directory says what loading would cost without reading any entry, so that is checked first.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from torch import nn

from shared.exceptions import JobFailure

#: Declared bytes allowed per byte of the model's parameters and buffers: a trainq checkpoint holds
#: the model and its optimizer state (Adam: two more copies), in up to 64-bit floats.
WEIGHTS_BYTES_PER_MODEL_BYTE = 8
#: Declared bytes allowed on top (the pickle, RNG states, a scheduler, trackers).
WEIGHTS_SLACK_BYTES = 16 * 1024 * 1024


def check_weights_size(path: Path, uri: str, model: nn.Module) -> None:
    """Refuse ``path`` when loading it would take more memory than weights for ``model`` can need.

    The bound is :data:`WEIGHTS_BYTES_PER_MODEL_BYTE` × the bytes of ``model``'s parameters and
    buffers + :data:`WEIGHTS_SLACK_BYTES`, compared with the uncompressed sizes the zip directory
    declares (or the file's size, for the legacy format, which is not compressed).

    Raises:
        JobFailure: over the bound, naming ``uri`` and both sizes in bytes.
    """
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    limit = WEIGHTS_BYTES_PER_MODEL_BYTE * model_bytes + WEIGHTS_SLACK_BYTES
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile:
        declared = path.stat().st_size
    if declared > limit:
        raise JobFailure(
            f"model.weights_uri {uri} would load {declared:,} bytes (uncompressed); weights for this model need at "
            f"most {limit:,} ({WEIGHTS_BYTES_PER_MODEL_BYTE}x its {model_bytes:,} bytes of parameters and buffers + "
            f"{WEIGHTS_SLACK_BYTES // 2**20} MiB)"
        )
