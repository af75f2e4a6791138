"""Multi-process jobs (``resources.gpus: N``, DistributedDataParallel) on the CPU: 2 gloo processes
against 1 with the same global batch, a stop that ends every rank, exact resume, and the refusals.

The worker allows CPU processes only with ``ALLOW_CPU_DDP``; on a GPU worker the same code runs
one process per GPU with NCCL.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from pathlib import Path

import httpx
import pytest
import torch

from shared.exceptions import JobFailure
from shared.records import Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from tests.conftest import wait_for_job
from tests.fixtures import fast_digits_spec
from trainq.sample_data import write_table
from worker.training import CheckpointKind, StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.training.checkpoint import load_checkpoint

EPOCHS = 5
STEPS = EPOCHS * 45  # 1,438 training rows in global batches of 32


class Recorder(TrainingCallbacks):
    """Keeps what the supervisor relays; asks to stop (worker shutdown) once progress passes ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.device: str | None = None
        self.progress: Progress | None = None
        self.checkpoints: list[str] = []
        self.deleted: list[str] = []
        self.stop_after = stop_after

    def on_start(self, *, device: str, **fields) -> None:
        self.device = device

    def on_progress(self, progress: Progress) -> None:
        self.progress = progress

    def on_checkpoint(self, uri: str, kind: CheckpointKind) -> None:
        self.checkpoints.append(uri)

    def on_checkpoint_deleted(self, uri: str) -> None:
        self.deleted.append(uri)

    def stop_requested(self) -> StopReason | None:
        if self.stop_after is not None and self.progress is not None and self.progress.step >= self.stop_after:
            return StopReason.SHUTDOWN
        return None


@pytest.fixture(scope="module")
def digits_table(stack) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.csv"
        write_table(path, "digits")
        return Storage(stack.settings).upload_file(path, "s3://trainq/tables/ddp-digits.csv")


@pytest.fixture(scope="module")
def settings(stack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return stack.settings.model_copy(
        update={"data_cache_dir": tmp_path_factory.mktemp("ddp-cache"), "progress_interval_s": 0.05, "allow_cpu_ddp": True}
    )


def spec_body(uri: str, processes: int) -> dict:
    return {
        "dataset": {"type": "csv", "uri": uri, "target": "target", "task": "classification"},
        "model": {"arch": "mlp", "hidden_sizes": [32]},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": EPOCHS,
        "batch_size": 32,  # global: 16 a process with 2
        "resources": {"gpus": processes},
    }


def spec(uri: str, processes: int) -> JobSpec:
    return JobSpec.model_validate(spec_body(uri, processes))


def final(storage: Storage, job_id: str, tmp: Path) -> dict:
    return load_checkpoint(storage.download_file(storage.job_uri(job_id, "checkpoints", "final.pt"), tmp / f"{job_id}.pt"))


@pytest.fixture(scope="module")
def two_processes(storage: Storage, settings: Settings, digits_table: str) -> Recorder:
    recorder = Recorder()
    result = run_training("ddp-two", spec(digits_table, 2), storage, settings, recorder)
    assert result.steps == STEPS and result.final_checkpoint.endswith("/ddp-two/checkpoints/final.pt")
    return recorder


def test_two_processes_reach_the_one_process_result_with_the_same_global_batch(
    storage: Storage, settings: Settings, digits_table: str, two_processes: Recorder, tmp_path: Path
):
    one = Recorder()
    run_training("ddp-one", spec(digits_table, 1), storage, settings, one)
    # Rank 0's reports came through the supervisor.
    assert two_processes.device == "2 × cpu" and one.device == "cpu"
    assert two_processes.progress.step == one.progress.step == STEPS
    assert two_processes.checkpoints[-1].endswith("/ddp-two/checkpoints/final.pt")
    want, got = final(storage, "ddp-one", tmp_path), final(storage, "ddp-two", tmp_path)
    assert got["world_size"] == 2 and want["world_size"] == 1
    assert list(got["model"]) == list(want["model"])  # rank 0's plain module: no "module." prefix
    for name, tensor in want["model"].items():
        # The same samples per step; only the float summation order of the gradient differs.
        torch.testing.assert_close(got["model"][name], tensor, rtol=1e-4, atol=1e-5)
    assert got["metrics"]["val_loss"] == pytest.approx(want["metrics"]["val_loss"], rel=1e-4)
    assert got["metrics"]["val_accuracy"] > 0.9


def test_a_stop_ends_every_rank_and_the_job_resumes_bit_identically(
    storage: Storage, settings: Settings, digits_table: str, two_processes: Recorder, tmp_path: Path
):
    with pytest.raises(TrainingStopped) as stopped:
        run_training("ddp-resumed", spec(digits_table, 2), storage, settings, Recorder(stop_after=20))
    assert stopped.value.reason is StopReason.SHUTDOWN and 20 <= stopped.value.step < STEPS
    assert not multiprocessing.active_children()  # no rank left training or writing
    checkpoint = load_checkpoint(storage.download_file(stopped.value.checkpoint, tmp_path / "stop.pt"))
    assert checkpoint["step"] == stopped.value.step and checkpoint["world_size"] == 2
    assert checkpoint["loader"] is not None and checkpoint["rank_states"][0]["loader"] is not None

    # Resuming on another number of processes is refused, and writes nothing.
    with pytest.raises(JobFailure, match=r"written by 2 training process\(es\) \(resources.gpus\); this run has 1"):
        run_training("ddp-resumed", spec(digits_table, 1), storage, settings, Recorder())
    assert not any(obj.key.endswith("final.pt") for obj in storage.list_objects(storage.job_uri("ddp-resumed", "checkpoints")))

    run_training("ddp-resumed", spec(digits_table, 2), storage, settings, Recorder())
    want, got = final(storage, "ddp-two", tmp_path), final(storage, "ddp-resumed", tmp_path)
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert got["optimizer"]["state"][0]["momentum_buffer"].equal(want["optimizer"]["state"][0]["momentum_buffer"])


def test_keep_last_deletions_reach_the_callbacks_through_the_supervisor(storage: Storage, settings: Settings, digits_table: str):
    """Rank 0 deletes the step checkpoints ``checkpoint.keep_last`` makes stale and the supervisor relays
    each deletion, as it relays each checkpoint (the job does not fail on the upload thread)."""
    recorder = Recorder()
    body = spec_body(digits_table, 2) | {"epochs": 3, "checkpoint": {"every_epochs": 1, "keep_last": 1}}
    run_training("ddp-keep-last", JobSpec.model_validate(body), storage, settings, recorder)
    steps = [uri for uri in recorder.checkpoints if "/checkpoints/step-" in uri]
    assert len(steps) >= 2 and sorted(recorder.deleted) == sorted(steps[:-1])
    left = [obj.key for obj in storage.list_objects(storage.job_uri("ddp-keep-last", "checkpoints"))]
    assert sorted(key.rsplit("/", 1)[-1] for key in left) == ["final.pt", steps[-1].rsplit("/", 1)[-1]]


def test_more_gpus_than_the_worker_has_fails_at_start(storage: Storage, settings: Settings, digits_table: str):
    no_cpu_processes = settings.model_copy(update={"allow_cpu_ddp": False})
    with pytest.raises(JobFailure, match="resources.gpus is 2 but this worker has no CUDA device"):
        run_training("ddp-refused", spec(digits_table, 2), storage, no_cpu_processes)
    assert not storage.list_objects(storage.job_uri("ddp-refused") + "/")


def test_a_job_asking_for_more_gpus_fails_through_the_service(api: httpx.Client):
    job = api.post("/jobs", json=fast_digits_spec(resources={"gpus": 2})).raise_for_status().json()
    record = wait_for_job(api, job["id"])
    assert record["state"] == "failed", record
    assert record["error"] == "resources.gpus is 2 but this worker has no CUDA device"


def test_a_two_process_job_runs_under_a_celery_worker(stack, api: httpx.Client, digits_table: str):
    # The worker's solo pool runs the task in its main process, which spawns the ranks.
    stack.start_worker("ddp-worker", env={"ALLOW_CPU_DDP": "true"}, queue="ddp")
    try:
        job = api.post("/jobs", json=spec_body(digits_table, 2) | {"epochs": 1, "queue": "ddp"}).raise_for_status().json()
        record = wait_for_job(api, job["id"])
    finally:
        stack.stop_process("ddp-worker")
    assert record["state"] == "succeeded", record["error"]
    assert record["device"] == "2 × cpu" and record["progress"]["step"] == 45
    assert record["artifacts"]["final_checkpoint"].endswith(f"/{job['id']}/checkpoints/final.pt")
