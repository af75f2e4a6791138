"""Batches on the device before the loop asks: the standard CUDA prefetcher, resume-exact.

While step n runs, batch n+1 is copied (and, with ``dataset.decode: device``, decoded and
augmented) on a side stream, so the copy and the decode overlap the step instead of preceding
it (NVIDIA's Apex ImageNet example's ``data_prefetcher``, timm's ``PrefetchLoader``). The main
stream waits on the side stream's work before using a batch (an event, no host sync) and the
batch's memory is marked used by the main stream (``record_stream``) so the caching allocator
does not hand it out again too early.

Pulling batch n+1 ahead would move the DataLoader's position one batch past the loop's: a
mid-epoch checkpoint would then skip a batch on resume. :meth:`DevicePrefetcher.state_dict`
answers the position taken just before batch n+1 was pulled — the loop's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from worker.training.fastpath import FastPath

Batch = tuple[torch.Tensor, torch.Tensor]


class DevicePrefetcher:
    """The training loader, yielding ``(inputs, targets)`` already on the device (``fast.to_device``).

    On CUDA (or with ``ahead=True``) it stages one batch ahead on a side stream; else it moves
    each batch when asked. Every other attribute (``batch_sampler``, ``collate_fn``, ``len``…) is
    the loader's.

    Args:
        loader: the training ``StatefulDataLoader``.
        fast: the run's fast path (device, ``non_blocking`` copies, NHWC, the data's finish).
        ahead: stage a batch ahead; default: on CUDA only (on a CPU nothing runs beside the loop).
    """

    def __init__(self, loader: StatefulDataLoader, fast: FastPath, ahead: bool | None = None) -> None:
        self.__dict__.update(loader=loader, fast=fast, ahead=fast.device.type == "cuda" if ahead is None else ahead)
        self.__dict__["_position"] = None  # the loop's position while a batch is staged ahead

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.loader, name, value)  # e.g. ``_iterator = None`` to stop persistent workers

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The loader's position after the batches the loop has been given (not the one staged)."""
        return self._position if self._position is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the loader at ``state`` (of :meth:`state_dict`)."""
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        if not self.ahead:
            for inputs, targets in self.loader:
                yield self.fast.to_device(inputs, targets)
            return
        cuda = self.fast.device.type == "cuda"
        side = torch.cuda.Stream(self.fast.device) if cuda else None
        batches = iter(self.loader)

        def stage() -> tuple[dict[str, Any], Batch | None, Any]:
            position = self.loader.state_dict()  # before the pull: the loop's position once it has the batch before
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return position, None, None
            with torch.cuda.stream(side) if cuda else nullcontext():
                batch = self.fast.to_device(inputs, targets)
                done = torch.cuda.Event() if cuda else None
                if done is not None:
                    done.record(side)
            return position, batch, done

        try:
            _, batch, done = stage()
            while batch is not None:
                position, upcoming, upcoming_done = stage()  # queued on the side stream before step n: they overlap
                self.__dict__["_position"] = position
                if done is not None:
                    main = torch.cuda.current_stream(self.fast.device)
                    main.wait_event(done)  # no host sync: the main stream waits on the device
                    for tensor in batch:
                        tensor.record_stream(main)
                yield batch
                batch, done = upcoming, upcoming_done
        finally:
            self.__dict__["_position"] = None
