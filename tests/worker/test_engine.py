"""The training engine on its own (no Celery), against the real S3 server: the recipes a spec
can name, resume of every piece of state, early stopping, best checkpoint, CSV regression."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.records import Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from tests.fixtures import DIGITS_URI, fast_digits_spec
from trainq.sample_data import write_table
from worker.training import CheckpointKind, StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.training.checkpoint import CheckpointError, load_checkpoint
from worker.training.data import load_data


class Recorder(TrainingCallbacks):
    """Keeps the last progress report and stops once, at ``stop_at_step``, if asked to."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.progress: Progress | None = None
        self.checkpoints: list[str] = []
        self.stop_at_step = stop_at_step
        self.step = 0

    def on_progress(self, progress: Progress) -> None:
        self.progress = progress

    def on_checkpoint(self, uri: str, kind: CheckpointKind) -> None:
        self.checkpoints.append(uri)

    def stop_requested(self) -> StopReason | None:
        if self.progress is None or self.progress.phase != "training":
            return None  # also asked while preparing and validating; count optimizer steps only
        self.step += 1
        return StopReason.SHUTDOWN if self.step == self.stop_at_step else None


@pytest.fixture
def settings(stack, tmp_path: Path) -> Settings:
    return stack.settings.model_copy(update={"data_cache_dir": tmp_path / "cache", "progress_interval_s": 0.1})


@pytest.fixture(scope="module")
def tables(stack) -> dict[str, str]:
    storage = Storage(stack.settings)
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("diabetes", "digits"):
            path = Path(tmp) / f"{name}.csv"
            write_table(path, name)
            uris[name] = storage.upload_file(path, f"s3://trainq/tables/{name}.csv")
    return uris


def final_checkpoint(storage: Storage, job_id: str, tmp_path: Path) -> dict:
    return load_checkpoint(storage.download_file(storage.job_uri(job_id, "checkpoints", "final.pt"), tmp_path / f"{job_id}.pt"))


def test_csv_regression_with_mse_learns_diabetes(storage: Storage, settings: Settings, tables: dict[str, str], tmp_path: Path):
    spec = JobSpec.model_validate(
        {
            "dataset": {"type": "csv", "uri": tables["diabetes"], "target": "target", "task": "regression"},
            "model": {"arch": "mlp", "hidden_sizes": [32]},
            "optimizer": {"lr": 0.01},
            "epochs": 40,
        }
    )
    assert spec.loss.name == "mse"  # the seed's rule: MSELoss for regression
    recorder = Recorder()
    run_training("csv-regression", spec, storage, settings, recorder)
    metrics = recorder.progress.val_metrics
    assert set(metrics) == {"val_loss", "val_mae", "val_rmse", "val_r2"}
    assert metrics["val_r2"] > 0.3  # ordinary least squares reaches about 0.45 on this data
    assert metrics["val_rmse"] == pytest.approx(metrics["val_loss"] ** 0.5, rel=1e-6)
    checkpoint = final_checkpoint(storage, "csv-regression", tmp_path)
    assert checkpoint["data"]["features"] == ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    assert len(checkpoint["data"]["feature_mean"]) == 10 and checkpoint["classes"] == []

    # The public helper rebuilds model and preprocessing from the checkpoint; raw CSV rows in.
    import csv

    from worker.training.inference import load_for_inference

    model, preprocess, classes = load_for_inference(tmp_path / "csv-regression.pt")
    data = load_data(spec, storage, tmp_path / "data")
    with open(storage.download_file(tables["diabetes"], tmp_path / "raw.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    val_rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(spec.seed)).tolist()[: len(data.val)]]
    inputs = torch.stack([preprocess(row) for row in val_rows])
    assert classes == [] and torch.allclose(inputs, data.val.tensors[0], atol=1e-5)
    with torch.no_grad():
        predicted = model(inputs)
    mse = ((predicted - data.val.tensors[1]) ** 2).mean().item()
    assert mse == pytest.approx(metrics["val_loss"], rel=1e-4)


def test_csv_classification_with_adamw_and_one_cycle(storage: Storage, settings: Settings, tables: dict[str, str]):
    spec = JobSpec.model_validate(
        {
            "dataset": {"type": "csv", "uri": tables["digits"], "target": "target", "task": "classification"},
            "model": {"arch": "mlp", "hidden_sizes": [64], "dropout": 0.1},
            "optimizer": {"name": "adamw", "lr": 0.001},
            "lr_schedule": {"name": "one_cycle", "max_lr": 0.01},
            "loss": {"name": "cross_entropy", "label_smoothing": 0.05},
            "epochs": 5,
            "batch_size": 64,
        }
    )
    recorder = Recorder()
    run_training("csv-classification", spec, storage, settings, recorder)
    metrics = recorder.progress.val_metrics
    assert metrics["val_accuracy"] > 0.9 and metrics["val_top5_accuracy"] >= metrics["val_accuracy"]


RECIPE = {
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "lr_schedule": {"name": "cosine", "warmup_steps": 10, "min_lr": 0.001},
    "grad_accumulation_steps": 2,
    "grad_clip_norm": 1.0,
    "checkpoint": {"every_epochs": 1, "best_metric": "val_accuracy"},
    "num_workers": 2,
}


def augmented_spec() -> JobSpec:
    spec = fast_digits_spec(epochs=2, batch_size=64, **RECIPE)
    spec["dataset"] |= {
        "image_size": 10,
        "train_transforms": [{"name": "random_crop", "size": 8, "padding": 1}, {"name": "horizontal_flip", "p": 0.5}],
        "normalize": {"mean": [0.5], "std": [0.25]},
    }
    return JobSpec.model_validate(spec)


def test_resume_restores_schedule_accumulation_and_augmentation_bit_identically(storage: Storage, settings: Settings, tmp_path: Path):
    spec = augmented_spec()
    reference = Recorder()
    run_training("recipe-reference", spec, storage, settings, reference)
    # 23 micro-batches an epoch in groups of 2: 12 optimizer steps; stop mid-epoch at step 7.
    assert reference.progress.steps_per_epoch == 12 and reference.progress.step == 24
    with pytest.raises(TrainingStopped) as stopped:
        run_training("recipe-resumed", spec, storage, settings, Recorder(stop_at_step=7))
    assert stopped.value.checkpoint.endswith("step-000000007.pt")
    resumed = Recorder()
    run_training("recipe-resumed", spec, storage, settings, resumed)
    want, got = final_checkpoint(storage, "recipe-reference", tmp_path), final_checkpoint(storage, "recipe-resumed", tmp_path)
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert got["scheduler"] == want["scheduler"] and got["scheduler"]["_last_lr"][0] < 0.05
    assert got["trackers"] == want["trackers"]
    best = storage.job_uri("recipe-reference", "checkpoints", "best.pt")
    assert best in reference.checkpoints
    best_epoch = load_checkpoint(storage.download_file(best, tmp_path / "best.pt"))["metrics"]["val_accuracy"]
    assert best_epoch == want["trackers"]["best"]["best"]


def test_early_stopping_ends_the_job_after_patience_epochs(storage: Storage, settings: Settings):
    # No epoch can improve accuracy by more than 1.0: the job stops after epoch 1 + patience 2.
    spec = JobSpec.model_validate(fast_digits_spec(epochs=10, early_stopping={"metric": "val_accuracy", "patience": 2, "min_delta": 1.0}))
    recorder = Recorder()
    result = run_training("early-stop", spec, storage, settings, recorder)
    assert result.epochs == 3 and recorder.progress.early_stopped
    assert recorder.checkpoints[-1].endswith("final.pt")


def test_several_folders_are_concatenated_like_ants_plus_bees(storage: Storage, settings: Settings, tmp_path: Path):
    for cls, shade in (("ants", 30), ("bees", 220)):
        folder = tmp_path / cls / cls
        folder.mkdir(parents=True)
        for index in range(12):
            Image.new("L", (8, 8), shade + index).save(folder / f"{index}.png")
        storage.upload_dir(tmp_path / cls, f"s3://trainq/tests/{cls}/")
    spec = fast_digits_spec(epochs=3, batch_size=4, num_workers=0)
    spec["dataset"] |= {"uri": "s3://trainq/tests/ants/", "extra_uris": ["s3://trainq/tests/bees/"], "val_fraction": 0.25}
    spec["model"]["num_classes"] = 2
    spec = JobSpec.model_validate(spec)
    data = load_data(spec, storage, tmp_path / "data")
    assert data.classes == ["ants", "bees"] and len(data.train) + len(data.val) == 24
    pixels_by_label = {}
    for index in range(len(data.train)):
        image, label = data.train[index]
        pixels_by_label.setdefault(label, []).append(data.finish(image).mean().item())
    assert max(pixels_by_label[0]) < 0.25 < 0.75 < min(pixels_by_label[1])  # dark ants, bright bees
    run_training("ants-bees", spec, storage, settings)
    assert final_checkpoint(storage, "ants-bees", tmp_path)["classes"] == ["ants", "bees"]


def test_initial_weights_from_a_checkpoint_or_a_state_dict(storage: Storage, settings: Settings, tmp_path: Path):
    from shared.exceptions import JobFailure
    from worker.training.models import SmallCNN

    model = SmallCNN(1, 10)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    uri = storage.upload_file(tmp_path / "weights.pt", "s3://trainq/tests/weights.pt")
    spec = JobSpec.model_validate(fast_digits_spec(epochs=1, optimizer={"lr": 1e-12}, model={"arch": "small_cnn", "weights_uri": uri}))
    run_training("from-weights", spec, storage, settings)
    trained = final_checkpoint(storage, "from-weights", tmp_path)["model"]
    conv = "features.0.weight"  # lr 1e-12: the weights are (almost exactly) the uploaded ones
    assert torch.allclose(trained[conv], model.state_dict()[conv], atol=1e-9)
    wrong = JobSpec.model_validate(fast_digits_spec(epochs=1, model={"arch": "small_cnn", "num_classes": 10, "weights_uri": uri}))
    wrong = wrong.model_copy(update={"dataset": wrong.dataset.model_copy(update={"channels": 3})})
    with pytest.raises(JobFailure, match="model.weights_uri s3://trainq/tests/weights.pt does not fit model.arch"):
        run_training("wrong-weights", wrong, storage, settings)


@pytest.mark.parametrize("outcome", ["succeeded", "stopped"])
def test_a_job_leaves_no_dataloader_worker_behind(storage: Storage, settings: Settings, outcome: str):
    # A Celery worker runs job after job: each job's DataLoader workers (the validation loader's are
    # persistent) must end with the job, not when the garbage collector finds the job's loaders.
    import gc
    import multiprocessing

    gc.disable()  # as a busy worker between collections: only an explicit stop ends them
    try:
        spec = JobSpec.model_validate(fast_digits_spec(epochs=1, performance={"persistent_workers": True}))
        if outcome == "succeeded":
            run_training(f"no-orphans-{outcome}", spec, storage, settings)
        else:
            with pytest.raises(TrainingStopped):
                run_training(f"no-orphans-{outcome}", spec, storage, settings, _StopAfter(5))
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()


class _StopAfter(TrainingCallbacks):
    def __init__(self, polls: int) -> None:
        self.polls, self.limit = 0, polls

    def stop_requested(self) -> StopReason | None:
        self.polls += 1
        return StopReason.CANCELLED if self.polls >= self.limit else None


def test_a_job_aborts_the_multipart_upload_an_earlier_attempt_left_open(storage: Storage, settings: Settings):
    # kill -9 during a checkpoint's multipart upload leaves the upload open: stored, billed, invisible.
    bucket, key = storage.bucket, storage.job_uri("left-open", "checkpoints", "step-000000120.pt").split("/", 3)[3]
    upload = storage.client.create_multipart_upload(Bucket=bucket, Key=key)
    storage.client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    other = storage.client.create_multipart_upload(Bucket=bucket, Key="elsewhere/file.bin")  # not this job's
    spec = JobSpec.model_validate(fast_digits_spec(epochs=1, num_workers=0))
    run_training("left-open", spec, storage, settings)
    open_keys = [u["Key"] for u in storage.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert key not in open_keys and "elsewhere/file.bin" in open_keys
    storage.client.abort_multipart_upload(Bucket=bucket, Key="elsewhere/file.bin", UploadId=other["UploadId"])


#: What the engine wrote into every checkpoint before the registry (commit 88e7cbf).
KEYS_BEFORE_THE_REGISTRY = {
    "format_version", "job_id", "model", "optimizer", "epoch", "step", "metrics", "spec", "classes", "runtime_s",
    "loader", "rng", "torch_version", "scheduler", "trackers", "batch_in_epoch", "data", "scaler", "world_size",
    "torch_threads", "rank_states", "epoch_loss",
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda payload: payload.update(extra_state=1), "unknown key(s) 'extra_state'"),
        (lambda payload: payload.pop("trackers"), "missing key(s) 'trackers'"),
        (lambda payload: payload.update(format_version=0), "checkpoint format 0, this worker reads 1"),
    ],
    ids=["extra-key", "missing-key", "old-format"],
)
def test_a_checkpoint_the_worker_cannot_read_fails_the_resume_naming_why(
    storage: Storage, settings: Settings, tmp_path: Path, change, named: str, request: pytest.FixtureRequest
):
    # Checkpoints written before the registry (format 1) resume: they hold exactly the keys the
    # registry writes (asserted below). One of another format, or with keys the parts do not
    # match, fails the job with a job error naming the key or the versions (no KeyError, no default).
    spec = JobSpec.model_validate(fast_digits_spec(epochs=1, num_workers=0))
    job_id = f"unreadable-{request.node.callspec.id}"
    with pytest.raises(TrainingStopped) as stopped:
        run_training(job_id, spec, storage, settings, Recorder(stop_at_step=3))
    uri = stopped.value.checkpoint
    payload = load_checkpoint(storage.download_file(uri, tmp_path / "c.pt"))
    assert set(payload) == KEYS_BEFORE_THE_REGISTRY
    change(payload)
    torch.save(payload, tmp_path / "changed.pt")
    storage.upload_file(tmp_path / "changed.pt", uri)
    with pytest.raises(CheckpointError, match=re.escape(named)) as failed:
        run_training(job_id, spec, storage, settings, Recorder())
    assert uri in str(failed.value)
