"""Figures 4 and 5 of the suite: training samples/s against the plain loop, and step time while a
checkpoint uploads.

4. **Samples/s**: samples trained per second between the first and the last optimizer step, read
   from the job's TensorBoard ``train/loss`` wall times, ÷ the same figure of
   ``bench/plain_script.py`` on the same files: (a) digits (8×8 PNGs, ``examples/digits.json``),
   (b) ~2,000 JPEGs of ~500×375 px cut from scikit-learn's sample photos, random-resized-crop
   and flip to 64 px, ``small_cnn``. The worker's cache is warm (a job on the same data before).
5. **Step time while a checkpoint uploads**: mean step time (TensorBoard wall times) of a job
   that checkpoints a ~40 MB MLP every 25 steps ÷ the same job with no checkpoint until the end.
   On one machine with the S3 server (moto) this measures CPU contention as much as the engine
   (see bench/README.md).

    .venv/bin/python -m bench.throughput --photos 2000
    .venv/bin/python -m bench.throughput --only uploads --repeat 3   # figure 5 alone
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import httpx

from bench.common import BENCH_ENV, Table
from bench.end_to_end import run_plain_script, wait_final
from shared.storage import Storage
from tests.fixtures import DIGITS_URI, example_spec
from trainq.sample_data import write_digits, write_photo_folder, write_table
from trainq.stack import LocalStack

PHOTOS_URI = "s3://trainq/datasets/photos/"
TABLE_URI = "s3://trainq/tables/diabetes.csv"


def step_wall_times(storage: Storage, tensorboard_uri: str) -> list[float]:
    """Wall times of the job's ``train/loss`` events, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        for obj in storage.list_objects(tensorboard_uri):
            storage.download_file(f"s3://{storage.bucket}/{obj.key}", Path(tmp) / obj.key.rsplit("/", 1)[-1])
        events = EventAccumulator(tmp, size_guidance={"scalars": 0})
        events.Reload()
        return [event.wall_time for event in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def run_job(api: httpx.Client, spec: dict) -> dict:
    """POST ``spec`` and wait for it to succeed; return the record."""
    return wait_final(api, api.post("/jobs", json=spec).raise_for_status().json()["id"])


def job_samples_per_s(api: httpx.Client, storage: Storage, spec: dict) -> float:
    """Samples/s of a job between its first and last optimizer step."""
    record = run_job(api, spec)
    times = step_wall_times(storage, record["artifacts"]["tensorboard"])
    samples = record["dataset"]["num_train"] * record["progress"]["epoch"] - spec["batch_size"]
    return samples / (times[-1] - times[0])


def photo_spec(epochs: int) -> dict:
    """``small_cnn`` on the photo folder at 64 px with the Inception crop and a flip."""
    return {
        "name": "bench-photos",
        "dataset": {
            "type": "image_folder", "uri": PHOTOS_URI, "image_size": 64, "channels": 3, "val_fraction": 0.2,
            "train_transforms": [{"name": "random_resized_crop", "size": 64}, {"name": "horizontal_flip"}],
        },
        "model": {"arch": "small_cnn"},
        "epochs": epochs, "batch_size": 32, "num_workers": 2, "seed": 0,
    }


def upload_spec(every_steps: int | None) -> dict:
    """An MLP of ~3.2 M parameters (a ~40 MB checkpoint with Adam's state) on diabetes, 20 epochs."""
    return {
        "name": "bench-upload",
        "dataset": {"type": "csv", "uri": TABLE_URI, "target": "target", "task": "regression"},
        "model": {"arch": "mlp", "hidden_sizes": [1024, 1024, 1024, 1024]},
        "epochs": 20, "batch_size": 8, "seed": 0,
        "checkpoint": {"every_epochs": 1000, **({"every_steps": every_steps} if every_steps else {})},
    }


def bench(photos: int, workdir: Path) -> list[Table]:
    """Run figures 4 and 5 on one local stack."""
    samples = Table("Training samples/s: trainq ÷ the plain loop (same files, model, batch, workers)")
    uploads = Table("Step time while a checkpoint uploads ÷ without")
    digits_dir, photo_dir = workdir / "digits", workdir / "photos"
    write_digits(digits_dir)
    write_photo_folder(photo_dir, photos)
    with LocalStack(workdir / "stack", isolated=True, env=BENCH_ENV) as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        storage = Storage(stack.settings)
        storage.upload_dir(digits_dir, DIGITS_URI)
        storage.upload_dir(photo_dir, PHOTOS_URI)
        stack.seed_tables()
        cases = [
            ("(a) digits, 8 px, 3 epochs", example_spec() | {"epochs": 3}, digits_dir, ["--epochs", "3"]),
            ("(b) photos ~500×375 JPEG → 64 px, 1 epoch", photo_spec(1), photo_dir,
             ["--epochs", "1", "--image-size", "64", "--channels", "3", "--augment"]),
        ]
        for label, spec, folder, args in cases:
            run_job(api, copy.deepcopy(spec) | {"epochs": 1})  # warm the worker's cache
            trainq_rate = job_samples_per_s(api, storage, spec)
            _, script = run_plain_script(folder, 0, extra=args)
            ratio = trainq_rate / script["samples_per_s"]
            samples.add(label, f"{trainq_rate:.0f}/s", f"{script['samples_per_s']:.0f}/s", ratio, "≥ 1.0", ratio >= 1.0)
        samples.notes.append("trainq picks its torch threads (CPUs − DataLoader workers); the script runs with torch's default.")
        upload_figure(api, storage, uploads)
    return [samples, uploads]


def upload_figure(api: httpx.Client, storage: Storage, table: Table, repeat: int = 1) -> None:
    """Figure 5: mean step time of a job checkpointing every 25 steps ÷ the same job without,
    ``repeat`` times (each pair run back to back), one row each."""
    for index in range(repeat):
        with_uploads = run_job(api, upload_spec(25))
        without = run_job(api, upload_spec(None))
        steps = [statistics.mean(b - a for a, b in zip(t, t[1:])) for t in
                 (step_wall_times(storage, r["artifacts"]["tensorboard"]) for r in (with_uploads, without))]
        ratio = steps[0] / steps[1]
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        table.add(f"mean step, {len(with_uploads['artifacts']['checkpoints'])} checkpoints uploaded"
                  + (f" (run {index + 1}, load {load})" if repeat > 1 else ""),
                  f"{steps[0] * 1000:.2f} ms", f"{steps[1] * 1000:.2f} ms", ratio, "≤ 1.05", ratio <= 1.05)
    table.notes.append("The S3 server (moto) runs on the same cores here; against a remote S3 only the client side remains.")


def bench_uploads(workdir: Path, repeat: int) -> list[Table]:
    """Figure 5 alone, on its own local stack."""
    uploads = Table("Step time while a checkpoint uploads ÷ without")
    with LocalStack(workdir / "stack", isolated=True, env=BENCH_ENV) as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        stack.seed_tables()
        upload_figure(api, Storage(stack.settings), uploads, repeat)
    return [uploads]


def main() -> None:
    """Run and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--only", choices=["uploads"], help="run only figure 5 (step time while uploading)")
    parser.add_argument("--repeat", type=int, default=1, help="with --only uploads: pairs of jobs to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tables = bench_uploads(Path(tmp), args.repeat) if args.only == "uploads" else bench(args.photos, Path(tmp))
        for table in tables:
            print(table.markdown())


if __name__ == "__main__":
    main()
