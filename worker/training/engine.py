"""The training engine's entry point: spec in; checkpoints and TensorBoard events out to S3; resumable.

The standard PyTorch flow, in nanoGPT's order (:mod:`worker.training.loop`): Dataset/DataLoader
→ model → loss → optimizer ``zero_grad``/``backward``/``step``, validation and checkpoint after
each epoch. The engine knows nothing of Celery, FastAPI or Redis: it reports and asks whether to
stop through :class:`~worker.training.contract.TrainingCallbacks`. The README's "How the engine
is laid out" names each module's part.
"""

from __future__ import annotations

import torch

from shared.exceptions import JobFailure
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.training.contract import TrainingCallbacks, TrainResult
from worker.training.distributed import launch
from worker.training.loop import run_rank
from worker.training.prepare import resolve_device


def run_training(
    job_id: str,
    spec: JobSpec,
    storage: Storage,
    settings: Settings,
    callbacks: TrainingCallbacks | None = None,
) -> TrainResult:
    """Train ``spec`` (resuming from the job's newest checkpoint) and upload its artifacts.

    Artifacts go under ``<prefix>/<job_id>/``: ``tensorboard/`` (every epoch, every
    ``tensorboard_upload_interval_s`` seconds, and at the end — also when training fails),
    ``checkpoints/step-<step>.pt`` every ``spec.checkpoint`` interval, ``best.pt`` when
    ``checkpoint.best_metric`` improves, and ``final.pt``. Uploads run in the background; the
    function returns only once every artifact is in S3.

    Raises:
        TrainingStopped: cancelled, time limit, worker shutdown (a checkpoint was saved) or lease
            lost (nothing written).
        JobFailure: a fault of the job (its data, e.g. :class:`shared.exceptions.DatasetError`,
            or its spec, e.g. more ``resources.gpus`` than the worker has). Anything else is an
            infrastructure or programming error.

    With ``resources.gpus`` > 1 the job trains in that many processes, one per GPU
    (:mod:`worker.training.distributed`); this function then supervises them.
    """
    callbacks = callbacks or TrainingCallbacks()
    if spec.resources.gpus > 1:
        return launch(job_id, spec, settings, callbacks, spec.resources.gpus, _distributed_backend(spec, settings), run_rank)
    return run_rank(job_id, spec, storage, settings, callbacks)


def _distributed_backend(spec: JobSpec, settings: Settings) -> str:
    """``nccl`` for a job on several GPUs, ``gloo`` for CPU processes where the worker allows them.

    Raises:
        JobFailure: the worker has fewer GPUs than ``resources.gpus`` (and no CPU processes are allowed).
    """
    gpus = spec.resources.gpus
    device = resolve_device(spec.device)
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if gpus > available:
            raise JobFailure(f"resources.gpus is {gpus} but this worker has {available} CUDA device(s)")
        return "nccl"
    if not settings.allow_cpu_ddp:
        where = "spec.device is 'cpu'" if spec.device == "cpu" else "this worker has no CUDA device"
        raise JobFailure(f"resources.gpus is {gpus} but {where}")
    return "gloo"
