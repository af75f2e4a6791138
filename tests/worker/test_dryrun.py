"""The dry run and the job share one preparation (engine.prepare); preparation reports its phases
and stops within its phase. Real S3 (the session stack's moto server), no Celery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from shared.exceptions import JobFailure
from shared.records import JobPhase, Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from tests.fixtures import fast_digits_spec
from trainq.sample_data import write_table
from worker.training import StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.training.checkpoint import load_checkpoint
from worker.training.data import load_data
from worker.training.dryrun import dry_run


class PhaseRecorder(TrainingCallbacks):
    """Keeps every progress report; asks to stop from the first report that ``stop_when`` accepts."""

    def __init__(self, stop_when: Callable[[Progress], bool] | None = None, reason: StopReason = StopReason.CANCELLED) -> None:
        self.reports: list[Progress] = []
        self.stop_when, self.reason = stop_when, reason
        self.stopping = False

    def on_progress(self, progress: Progress) -> None:
        self.reports.append(progress)
        if self.stop_when is not None and self.stop_when(progress):
            self.stopping = True

    def stop_requested(self) -> StopReason | None:
        return self.reason if self.stopping else None

    @property
    def phases(self) -> list[JobPhase]:
        seen: list[JobPhase] = []
        for report in self.reports:
            if not seen or seen[-1] != report.phase:
                seen.append(report.phase)
        return seen


@pytest.fixture
def settings(stack, tmp_path: Path) -> Settings:
    return stack.settings.model_copy(
        update={"data_cache_dir": tmp_path / "cache", "progress_interval_s": 0.05, "data_root": tmp_path / "data"}
    )


def write_images(folder: Path, count: int, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")


def local_spec(**overrides) -> JobSpec:
    spec = {"dataset": {"uri": "local://imgs", "image_size": 16, "channels": 3, "val_fraction": 0.2}, "model": {"arch": "small_cnn"},
            "epochs": 1, "batch_size": 8, "num_workers": 0}
    spec.update(overrides)
    return JobSpec.model_validate(spec)


def test_phases_of_a_job_in_order(storage: Storage, settings: Settings, tmp_path: Path):
    write_images(tmp_path / "upload" / "a", 30, size=8)
    write_images(tmp_path / "upload" / "b", 30, size=8)
    storage.upload_dir(tmp_path / "upload", "s3://trainq/datasets/phases/")
    spec = local_spec(dataset={"uri": "s3://trainq/datasets/phases/", "image_size": 8, "channels": 3}, epochs=1)
    recorder = PhaseRecorder()
    run_training("phases", spec, storage, settings, recorder)
    assert recorder.phases == ["downloading", "verifying", "building_model", "training", "validating", "training", "uploading"]
    downloads = [r for r in recorder.reports if r.phase == "downloading" and r.files_total]
    assert downloads[-1].files_done == downloads[-1].files_total == 60  # every image of the prefix
    assert downloads[-1].bytes_done == downloads[-1].bytes_total > 0
    verified = [r for r in recorder.reports if r.phase == "verifying"]
    assert verified[-1].files_done == verified[-1].files_total == 60
    assert recorder.reports[-1].files_total is None  # counts belong to the data phases only


def test_stop_while_downloading_cancels_the_transfers_and_leaves_no_partial_folder(storage: Storage, settings: Settings, tmp_path: Path):
    write_images(tmp_path / "upload" / "a", 150, size=8)
    write_images(tmp_path / "upload" / "b", 150, size=8)
    storage.upload_dir(tmp_path / "upload", "s3://trainq/datasets/stop-downloading/")
    spec = JobSpec.model_validate(fast_digits_spec(dataset={"uri": "s3://trainq/datasets/stop-downloading/", "channels": 3}))
    recorder = PhaseRecorder(lambda p: p.phase == JobPhase.DOWNLOADING and (p.files_done or 0) > 0)
    with pytest.raises(TrainingStopped) as stopped:
        run_training("stop-downloading", spec, storage, settings, recorder)
    assert stopped.value.reason is StopReason.CANCELLED and stopped.value.checkpoint is None
    assert recorder.phases == ["downloading"]
    assert 0 < recorder.reports[-1].files_done < 300 and recorder.reports[-1].files_total == 300
    cache = settings.data_cache_dir / "datasets"
    assert not list(cache.rglob(".complete")) and not list(cache.rglob("*.part"))  # never used half-downloaded


def test_stop_while_verifying_stops_before_the_model_is_built(storage: Storage, settings: Settings):
    write_images(settings.data_root / "imgs" / "a", 200)
    write_images(settings.data_root / "imgs" / "b", 200)
    recorder = PhaseRecorder(lambda p: p.phase == JobPhase.VERIFYING and (p.files_done or 0) > 0, StopReason.TIME_LIMIT)
    with pytest.raises(TrainingStopped) as stopped:
        run_training("stop-verifying", local_spec(), storage, settings, recorder)
    assert stopped.value.reason is StopReason.TIME_LIMIT and stopped.value.checkpoint is None
    assert recorder.phases == ["downloading", "verifying"]
    verified = [r for r in recorder.reports if r.phase == "verifying"]
    assert verified[-1].files_done < 400  # stopped within the phase, not after it


def test_stop_while_validating_saves_the_epoch_and_the_resumed_job_goes_on(storage: Storage, settings: Settings, tmp_path: Path):
    write_table(tmp_path / "digits.csv", "digits")
    uri = storage.upload_file(tmp_path / "digits.csv", "s3://trainq/tables/dry-stop-validating.csv")
    spec = JobSpec.model_validate({"dataset": {"type": "csv", "uri": uri, "target": "target", "task": "classification"},
                                   "model": {"arch": "mlp"}, "epochs": 2, "batch_size": 64})
    recorder = PhaseRecorder(lambda p: p.phase == JobPhase.VALIDATING, StopReason.SHUTDOWN)
    with pytest.raises(TrainingStopped) as stopped:
        run_training("stop-validating", spec, storage, settings, recorder)
    steps_per_epoch = -(-1438 // 64)
    assert stopped.value.step == steps_per_epoch
    assert stopped.value.checkpoint == storage.job_uri("stop-validating", "checkpoints", f"step-{steps_per_epoch:09d}.pt")
    saved = load_checkpoint(storage.download_file(stopped.value.checkpoint, tmp_path / "saved.pt"))
    assert saved["epoch"] == 1 and saved["loader"] is None  # between epochs: the next one starts afresh
    result = run_training("stop-validating", spec, storage, settings, PhaseRecorder())
    assert result.steps == 2 * steps_per_epoch and result.epochs == 2


def test_the_dry_run_prepares_as_the_job_does_and_takes_a_step(storage: Storage, settings: Settings):
    write_images(settings.data_root / "imgs" / "a", 20)
    write_images(settings.data_root / "imgs" / "b", 22)
    report = dry_run(local_spec(batch_size=8), storage, settings)
    data = load_data(local_spec(), storage, settings.data_cache_dir, settings.data_root)  # the job's seeded split
    train_labels = [data.train.base.targets[i] for i in data.train.indices]
    assert report.counts == {"a": train_labels.count(0), "b": train_labels.count(1)} and report.num_val == 8
    assert report.batch_shape == [8, 3, 16, 16] and report.last_batch_size == 34 % 8 and report.steps_per_epoch == 5
    assert report.memory.total_bytes == (
        report.memory.parameters_bytes + report.memory.gradients_bytes + report.memory.optimizer_bytes + report.memory.activations_bytes
    )
    assert 0.3 < report.loss < 1.5  # about ln(2) at random init


def test_the_dry_run_counts_every_class_in_each_split_zeros_included(storage: Storage, settings: Settings):
    # Issue 19: a class missing from a split was left out of the counts instead of showing 0.
    write_images(settings.data_root / "imgs" / "a", 20)
    write_images(settings.data_root / "imgs" / "b", 22)
    write_images(settings.data_root / "imgs" / "solo", 1)
    report = dry_run(local_spec(batch_size=8), storage, settings)
    assert report.counts == {"a": 16, "b": 17, "solo": 1}  # stratified: 9 of 43 held out, per class
    assert report.val_counts == {"a": 4, "b": 5, "solo": 0} and report.num_val == 9


def test_the_dry_run_never_passes_a_last_batch_of_one_into_batchnorm(storage: Storage, settings: Settings):
    # 42 images, 8 held out: 34 training samples in batches of 33 leave a last batch of 1, which
    # reaches resnet18's last BatchNorm as 1 value per channel (its feature map is 1x1 at 16 px).
    write_images(settings.data_root / "imgs" / "a", 20)
    write_images(settings.data_root / "imgs" / "b", 22)
    try:
        report = dry_run(local_spec(batch_size=33, model={"arch": "resnet18"}), storage, settings)
    except JobFailure as exc:
        assert exc.loc == ["body", "batch_size"]
        assert "last batch (1 sample)" in str(exc) and "Expected more than 1 value per channel" in str(exc)
    else:  # the loaders drop such a batch: then the job never meets it either
        assert report.last_batch_size > 1


def test_the_dry_run_loads_the_initial_weights(storage: Storage, settings: Settings, tmp_path: Path):
    write_images(settings.data_root / "imgs" / "a", 10)
    write_images(settings.data_root / "imgs" / "b", 10)
    missing = local_spec(model={"arch": "small_cnn", "weights_uri": "s3://trainq/weights/nothing.pt"})
    with pytest.raises(JobFailure) as error:
        dry_run(missing, storage, settings)
    assert error.value.loc == ["body", "model", "weights_uri"] and "s3://trainq/weights/nothing.pt" in str(error.value)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pt")
    uri = storage.upload_file(tmp_path / "linear.pt", "s3://trainq/weights/linear.pt")
    with pytest.raises(JobFailure) as error:
        dry_run(local_spec(model={"arch": "small_cnn", "weights_uri": uri}), storage, settings)
    assert error.value.loc == ["body", "model", "weights_uri"] and "does not fit" in str(error.value)


def test_a_data_error_names_the_field_of_the_uri_at_fault(storage: Storage, settings: Settings):
    write_images(settings.data_root / "imgs" / "a", 10)
    write_images(settings.data_root / "imgs" / "b", 10)
    (settings.data_root / "more" / "a").mkdir(parents=True)  # a class folder without images
    spec = local_spec(dataset={"uri": "local://imgs", "extra_uris": ["local://more"], "image_size": 16, "channels": 3})
    with pytest.raises(JobFailure) as error:
        dry_run(spec, storage, settings)
    assert error.value.loc == ["body", "dataset", "extra_uris", 0] and "local://more" in str(error.value)
    assert error.value.as_error()["type"] == "dataset_error"


def test_the_dry_run_steps_in_the_jobs_precision(storage: Storage, settings: Settings):
    write_images(settings.data_root / "imgs" / "a", 20)
    write_images(settings.data_root / "imgs" / "b", 22)
    bf16 = dry_run(local_spec(performance={"precision": "bf16", "channels_last": True}), storage, settings)
    assert bf16.warnings == [] and 0.3 < bf16.loss < 1.5
    if not torch.cuda.is_available():  # fp16 needs CUDA: a CPU worker checks the rest and says so
        fp16 = dry_run(local_spec(performance={"precision": "fp16"}), storage, settings)
        assert fp16.warnings == ["performance.precision 'fp16' needs a GPU: the dry run's step ran in fp32 on this worker's CPU"]
    with pytest.raises(ValidationError) as refused:  # device "cpu" with fp16: refused by the spec itself (a 422)
        local_spec(device="cpu", performance={"precision": "fp16"})
    assert [(e["loc"], "needs a CUDA device" in e["msg"]) for e in refused.value.errors()] == [(("performance",), True)]
