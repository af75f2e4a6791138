"""The job's DataLoaders: a seeded, resumable training loader and a validation loader."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from shared.exceptions import JobFailure
from shared.spec import JobSpec, batch_of_one_error
from worker.training.sources import TrainingData
from worker.training.distributed import SINGLE_PROCESS, ProcessGroup

logger = logging.getLogger(__name__)


def _seed_dataloader_worker(worker_id: int) -> None:
    # Each DataLoader worker gets a distinct torch seed from the loader's generator; derive
    # numpy's and Python's from it so augmentations using them are reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer (1d/2d/3d, SyncBatchNorm): in training mode it
    needs more than one value per channel, so a batch of 1 sample fails or trains on noise."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def drop_last(spec: JobSpec, num_train: int, model: nn.Module | None, batch_size: int | None = None) -> bool:
    """Whether the training loader drops each epoch's last, incomplete batch (``spec.drop_last``).

    ``num_train`` and ``batch_size`` (default ``spec.batch_size``) are one process's share when a
    job runs on several GPUs.

    ``auto`` drops it only when it would hold exactly 1 sample and ``model`` has BatchNorm; the
    choice is a function of the spec and the data, so a resumed run counts the same steps.

    Raises:
        JobFailure: a batch of 1 sample would reach BatchNorm: ``batch_size`` 1, or
            ``drop_last: false`` with a last batch of 1.
    """
    batchnorm = model is not None and has_batchnorm(model)
    if batchnorm and spec.batch_size == 1:
        raise JobFailure(batch_of_one_error(spec.model.arch))
    last = num_train % (batch_size or spec.batch_size)
    if spec.drop_last == "auto":
        return batchnorm and last == 1
    if not spec.drop_last and batchnorm and last == 1:
        raise JobFailure(
            f"with {num_train} training samples and batch_size {spec.batch_size} the last batch of each epoch holds "
            f"1 sample, which the BatchNorm layers of model.arch {spec.model.arch!r} cannot train on: "
            'set drop_last to "auto" or true, or change batch_size'
        )
    return spec.drop_last


def build_loaders(
    data: TrainingData,
    spec: JobSpec,
    device: torch.device,
    group: ProcessGroup = SINGLE_PROCESS,
    model: nn.Module | None = None,
) -> tuple[StatefulDataLoader, DistributedSampler, DataLoader]:
    """The training loader (stateful: its position is checkpointed), its sampler, and the validation loader.

    The training loader yields this process's share of each global batch (``spec.batch_size /
    world_size`` samples); ``model`` decides ``drop_last`` (:func:`drop_last`).
    """
    performance = spec.performance
    common: dict[str, Any] = dict(
        batch_size=spec.batch_size // group.world_size,  # batch_size is the global batch
        num_workers=spec.num_workers,
        pin_memory=device.type == "cuda",  # with non_blocking copies: transfers overlap compute
        worker_init_fn=_seed_dataloader_worker,
        collate_fn=data.collate,
    )
    if spec.num_workers:
        common.update(persistent_workers=performance.persistent_workers, prefetch_factor=performance.prefetch_factor)
    # The shuffle is a function of (seed, epoch) — DistributedSampler's rule — so a resumed run
    # replays exactly the order an uninterrupted one would, and rank r of N takes positions
    # r, r + N, … of it (the union of the ranks' batches is the one-process batch). The loader
    # has its own generator so iterating it never draws from the global torch RNG.
    sampler = DistributedSampler(data.train, num_replicas=group.world_size, rank=group.rank, shuffle=True, seed=spec.seed)
    # drop_last looks at this rank's share: its samples and its part of the global batch.
    last_drop = drop_last(spec, len(sampler), model, batch_size=common["batch_size"])
    train = StatefulDataLoader(
        data.train, sampler=sampler, generator=torch.Generator().manual_seed(spec.seed), drop_last=last_drop, **common
    )
    # Validation forks its workers once per job, not once per epoch (a 20-epoch digits job spent
    # 7.5 s validating, 2.7-3.3 s with persistent workers; bench/README.md). Eval transforms draw
    # nothing random, and its own generator keeps its workers' seeds off the global RNG.
    val_options = common | ({"persistent_workers": True} if spec.num_workers else {})
    val = DataLoader(data.val, shuffle=False, generator=torch.Generator().manual_seed(spec.seed), **val_options)
    return train, sampler, val


def stop_loader_workers(*loaders: DataLoader | None) -> None:
    """End the worker processes of ``loaders`` now.

    Persistent workers (the validation loader's always; the training loader's with
    ``performance.persistent_workers``) live as long as their loader's iterator, and a job's
    loaders can outlive the job (a traceback or a reference cycle holds them until the garbage
    collector runs): each idle worker would keep ~0.5 GB resident on a long-lived Celery worker.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            try:
                iterator._shutdown_workers()
            except Exception:  # never hide the job's own outcome behind a cleanup error
                logger.exception("could not stop DataLoader workers")
            loader._iterator = None
