"""Datasets from a spec, downloaded once per content: image folders and CSV tables from S3.

:func:`load_data` picks the loader: :mod:`worker.training.images` or :mod:`worker.training.tables`
(their common part: :mod:`worker.training.sources`; transforms: :mod:`worker.training.transforms`).

Image folders have torchvision's ``ImageFolder`` layout, ``<uri>/<class_name>/<image>``:
classes are the sub-folder names in sorted order, hidden folders and files are skipped
(``.ipynb_checkpoints``, ``.DS_Store``; pytorch/vision#2831), an empty class folder or an
unreadable image fails the job naming it (pytorch/vision#4925, #138).

Augmentations are seeded per sample from ``(seed, epoch, index)``, not by whichever DataLoader
worker happens to load the sample, so a resumed run sees exactly the images an uninterrupted
one would.
"""

from __future__ import annotations

from pathlib import Path

from shared.spec import CsvDataset, JobSpec
from shared.storage import Storage
from worker.faults import in_stage
from worker.training.images import load_image_folder
from worker.training.sources import LoadOptions, TrainingData, blaming
from worker.training.tables import load_csv


@in_stage("read data")
def load_data(
    spec: JobSpec, storage: Storage, cache_dir: Path, data_root: Path | None = None, options: LoadOptions | None = None
) -> TrainingData:
    """Download (or find under ``data_root``) and build the job's datasets.

    Raises:
        DatasetError: a prefix or file is missing or empty, a class has no image, an image or
            a row cannot be read, or the validation set does not match the training set.
        Interrupted: ``options.should_stop`` said so.
    """
    options = options or LoadOptions()
    with blaming("dataset.uri"):  # an error no part below ties to a field of its own
        if isinstance(spec.dataset, CsvDataset):
            return load_csv(spec.dataset, storage, cache_dir, spec.seed, data_root, options)
        return load_image_folder(spec.dataset, storage, cache_dir, spec.seed, data_root, options)
