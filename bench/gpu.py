"""The GPU fast path, measured: ResNet-50 at 224 px in bf16 + channels_last on one GPU.

1. **Ceiling**: a plain loop on synthetic tensors already on the GPU (no data loading at all):
   ResNet-50, SGD with momentum, cross-entropy, bf16 autocast, channels_last, ``cudnn.benchmark``.
2. **Data pipeline alone**: the job's DataLoader (JPEG decode, random resized crop, flip,
   normalize in ``num_workers`` processes; pinned memory, non-blocking copies) without a model.
3. **Decode + augment on the device alone** (``dataset.decode: device``): workers hand over the
   encoded JPEGs, each batch is decoded in one ``decode_jpeg`` call on the GPU and augmented there,
   no model. Goal: ≥ 2× the ceiling, so the model, not the data, bounds the job.
4. **Through trainq**: the same model and settings as a trainq job on a folder of ~2,000 JPEGs
   around 500×375 (``trainq.sample_data.write_photo_folder``), through the engine
   (``run_training``, artifacts to a local S3 server): images/s from the end of epoch 1 to the end
   of the last epoch, validation and epoch turnover included; with ``decode: device`` (the
   default on CUDA) and ``decode: workers`` (PIL in the DataLoader workers). GPU utilization
   from ``nvidia-smi dmon`` during the ``decode: device`` run. Goal: ≥ 0.9 of the ceiling, ≥ 90%
   utilization.
5. **A plain script** beside it: torchvision ``ImageFolder`` + v2 transforms in 14 DataLoader
   workers (float tensors, as most scripts do), the same model and loop.
6. **The service path** (``bench/gpu_service.py``): a job over HTTP to the local stack with a
   Celery worker on the GPU, and a kill -9 mid-job resumed bit-identically.
7. **Checks**: bit-identical resume on the device (fp32, bf16, and on CUDA fp16 with its loss
   scaler; ``deterministic: true``; an MLP with dropout, so the CUDA RNG matters), the CUDA RNG
   state's round trip through a checkpoint file, and a GPU checkpoint resumed by a CPU worker (a
   subprocess with ``CUDA_VISIBLE_DEVICES=""``).

    bench/gpu.sh            # on a GPU machine; < 5 min on one H200; writes bench/gpu-results.md
    bench/gpu.sh --smoke    # the same code on a CPU with tiny sizes; prints only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from pydantic import SecretStr
from torch import nn
from torch.utils.data import DataLoader

from bench.common import Table, write_results
from bench.gpu_service import service_path
from shared.records import Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from trainq.sample_data import write_photo_folder, write_table
from trainq.stack import LocalStack
from worker.training import StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from worker.training.cpu import usable_cpus
from worker.training.data import load_data
from worker.training.device_data import on_device
from worker.training.fastpath import FastPath

RESULTS = Path(__file__).resolve().parent / "gpu-results.md"
STARTED = time.monotonic()


def log(message: str) -> None:
    """Print ``message`` with the seconds since the bench started."""
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(arch: str, batch: int, size: int, classes: int, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of the plain bf16 + channels_last loop on one synthetic batch kept on ``device``."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # cuDNN benchmarks its algorithms here
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def photo_spec(args: argparse.Namespace, decode: str = "auto", epochs: int | None = None) -> JobSpec:
    """The trainq job: ResNet-50 on the photo folder, bf16 + channels_last + the loader settings."""
    return JobSpec.model_validate(
        {
            "dataset": {
                "type": "image_folder",
                "uri": "local://photos/",
                "val_fraction": 0.05,
                "image_size": args.image_size,
                "train_transforms": [{"name": "random_resized_crop", "size": args.image_size}, {"name": "horizontal_flip"}],
                "eval_transforms": [{"name": "resize", "size": args.image_size * 8 // 7}, {"name": "center_crop", "size": args.image_size}],
                "normalize": {"preset": "imagenet"},
                "decode": decode,
            },
            "model": {"arch": args.arch},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "epochs": epochs or args.epochs,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "checkpoint": {"every_epochs": epochs or args.epochs},  # the final checkpoint only
            "performance": {
                "precision": "bf16",
                "channels_last": True,
                "cudnn_benchmark": True,
                "persistent_workers": True,
                "prefetch_factor": 2,  # batches in flight: workers × 2 × 154 MB (float32 256×3×224²) of shared memory
            },
        }
    )


def data_alone(spec: JobSpec, storage: Storage, settings: Settings, device: torch.device, epochs: int) -> float:
    """Images/s of the job's training DataLoader alone (with the copy to ``device`` and the data's
    ``finish`` there: with ``decode: device`` the decode and the transforms), after one warm-up epoch."""
    data = on_device(load_data(spec, storage, settings.data_cache_dir / "datasets", settings.data_root), spec.dataset, device)
    fast = FastPath(device, channels_last=True, finish=data.finish)
    loader = DataLoader(
        data.train, batch_size=spec.batch_size, shuffle=True, num_workers=spec.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=True, prefetch_factor=spec.performance.prefetch_factor, collate_fn=data.collate,
    )
    started, samples = 0.0, 0
    for epoch in range(epochs + 1):
        data.set_epoch(epoch)
        if epoch == 1:
            sync(device)
            started, samples = time.perf_counter(), 0
        for inputs, targets in loader:
            fast.to_device(inputs, targets)
            samples += len(targets)
    sync(device)
    return samples / (time.perf_counter() - started)


def per_image_ms(spec: JobSpec, storage: Storage, settings: Settings, count: int = 200) -> tuple[float, float]:
    """Milliseconds per training image in one thread: (decode alone, decode + the workers'
    transforms; the scaling and normalize run on the device, see ``build_finish``).

    Their inverse × DataLoader workers is the most the data pipeline can feed, whatever the GPU.
    """
    data = load_data(spec, storage, settings.data_cache_dir / "datasets", settings.data_root)
    train, count = data.train, min(count, len(data.train))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 thread there)
    for position in range(min(10, count)):  # warm the page cache and PIL's plugins
        train[position]
    started = time.perf_counter()
    for position in range(count):
        train.base[train.indices[position]]
    decode = time.perf_counter() - started
    started = time.perf_counter()
    for position in range(count):
        train[position]
    full = time.perf_counter() - started
    torch.set_num_threads(threads)
    return 1e3 * decode / count, 1e3 * full / count


def plain_script(root: Path, args: argparse.Namespace, device: torch.device, epochs: int) -> float:
    """Images/s of the script most people write: torchvision ``ImageFolder`` with v2 transforms to
    normalized float in the DataLoader workers, pinned memory, the ceiling's model and loop; from
    the end of epoch 1 to the end of the last (no validation)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    size = args.image_size
    transform = v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(
        ImageFolder(str(root), transform=transform), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=True, prefetch_factor=2, drop_last=True,
    )
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, num_classes=2).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    started, samples = 0.0, 0
    for epoch in range(epochs):
        if epoch == 1:
            sync(device)
            started, samples = time.perf_counter(), 0
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(targets)
    sync(device)
    return samples / (time.perf_counter() - started)


class Utilization:
    """``nvidia-smi dmon -s u -d 1`` in the background: the GPU's SM utilization, one sample a second."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.samples: list[int] = []

    def __enter__(self) -> Utilization:
        try:
            self.process = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", "0"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:  # no NVIDIA driver tools (a CPU machine)
            self.process = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        for line in out.splitlines():
            fields = line.split()
            if fields and not line.startswith("#") and len(fields) > 1 and fields[1].isdigit():
                self.samples.append(int(fields[1]))  # columns: gpu sm mem enc dec ...

    def describe(self) -> str:
        """Median utilization and the share of samples at ≥ 90%, or why there is none."""
        if not self.samples:
            return "no nvidia-smi samples"
        busy = sum(sample >= 90 for sample in self.samples) / len(self.samples)
        return f"median {sorted(self.samples)[len(self.samples) // 2]}%, {busy:.0%} of {len(self.samples)} samples ≥ 90%"

    @property
    def busy_share(self) -> float | None:
        """Share of samples at ≥ 90% utilization; None without samples."""
        return sum(sample >= 90 for sample in self.samples) / len(self.samples) if self.samples else None


class Clock(TrainingCallbacks):
    """Keeps every progress report with the time it arrived (reports follow a device sync)."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, Progress]] = []
        self.device = ""

    def on_start(self, *, device: str, **fields) -> None:
        self.device = device

    def on_progress(self, progress: Progress) -> None:
        self.reports.append((time.perf_counter(), progress))

    def epoch_end(self, epoch: int) -> float:
        """When the report closing ``epoch`` (after its validation) arrived."""
        return next(at for at, progress in self.reports if progress.epoch == epoch)


def through_trainq(spec: JobSpec, storage: Storage, settings: Settings) -> tuple[float, Clock, int]:
    """Run the job; return images/s from the end of epoch 1 to the end of the last, the clock, and num_train."""
    clock = Clock()
    run_training(f"gpu-bench-{spec.dataset.decode}", spec, storage, settings, clock)
    total = sum(1 for _ in (settings.data_root / "photos").rglob("*.jpg"))
    num_train = total - max(1, round(total * spec.dataset.val_fraction))  # the engine's split rule
    first, last = clock.epoch_end(1), clock.epoch_end(spec.epochs)
    return (spec.epochs - 1) * num_train / (last - first), clock, num_train


# -- checks -------------------------------------------------------------------------------------


class StopAt(TrainingCallbacks):
    """Asks the run to stop (worker shutdown) after optimizer step ``step``; remembers the device."""

    def __init__(self, step: int | None = None) -> None:
        self.step, self.polls = step, 0
        self.device, self.resumed_from = "", None

    def on_start(self, *, device: str, resumed_from: str | None, **fields) -> None:
        self.device, self.resumed_from = device, resumed_from

    def stop_requested(self) -> StopReason | None:
        self.polls += 1
        return StopReason.SHUTDOWN if self.polls == self.step else None


def mlp_spec(uri: str, precision: str) -> JobSpec:
    """2 epochs (90 steps) of an MLP with dropout on the digits table, deterministic kernels."""
    return JobSpec.model_validate(
        {
            "dataset": {"type": "csv", "uri": uri, "target": "target", "task": "classification"},
            "model": {"arch": "mlp", "hidden_sizes": [256, 256], "dropout": 0.2},
            "epochs": 2,
            "batch_size": 32,
            "performance": {"precision": precision, "deterministic": True},
        }
    )


def final_model(storage: Storage, job_id: str, tmp: Path) -> dict:
    return load_checkpoint(storage.download_file(storage.job_uri(job_id, "checkpoints", "final.pt"), tmp / f"{job_id}.pt"))


def exact_resume(storage: Storage, settings: Settings, uri: str, precision: str, tmp: Path) -> tuple[bool, str]:
    """An uninterrupted run against one stopped at step 30 and resumed: equal final weights?"""
    spec = mlp_spec(uri, precision)
    run_training(f"exact-{precision}-reference", spec, storage, settings, StopAt())
    try:
        run_training(f"exact-{precision}-resumed", spec, storage, settings, StopAt(30))
        raise RuntimeError("the run did not stop")
    except TrainingStopped as stopped:
        stop = load_checkpoint(storage.download_file(stopped.checkpoint, tmp / f"stop-{precision}.pt"))
    run_training(f"exact-{precision}-resumed", spec, storage, settings, StopAt())
    want, got = final_model(storage, f"exact-{precision}-reference", tmp), final_model(storage, f"exact-{precision}-resumed", tmp)
    equal = all(torch.equal(got["model"][name], tensor) for name, tensor in want["model"].items())
    detail = f"stopped at step {stop['step']} of {got['step']}"
    if stop.get("scaler"):
        detail += f"; loss scale {stop['scaler']['scale']:g} saved and restored"
        equal = equal and got["scaler"] == want["scaler"]
    return equal, detail


def compiled_matches_eager(storage: Storage, settings: Settings, uri: str) -> tuple[bool, str]:
    """The MLP job in bf16 with ``compile: true`` against the same job eager: does it run, and land
    near the same validation accuracy (within 0.03)?

    Not the loss to a tight tolerance: inductor draws dropout masks from its own Philox stream, so
    the compiled run sees other masks than the eager one and its loss differs by more than rounding
    (0.164 vs 0.187 on an H200, 2026-11-29).
    """
    results = {}
    for compiled in (False, True):
        raw = mlp_spec(uri, "bf16").model_dump(mode="json")
        raw["performance"] |= {"deterministic": False, "compile": compiled}
        spec = JobSpec.model_validate(raw)
        started = time.perf_counter()
        result = run_training(f"compile-{compiled}", spec, storage, settings, StopAt())
        results[compiled] = (result, time.perf_counter() - started)
    (eager, eager_s), (compiled, compiled_s) = results[False], results[True]
    ok = abs(compiled.val_accuracy - eager.val_accuracy) <= 0.03 and compiled.steps == eager.steps
    detail = (f"val_accuracy {compiled.val_accuracy:.3f} compiled vs {eager.val_accuracy:.3f} eager "
              f"(val_loss {compiled.val_loss:.4f} vs {eager.val_loss:.4f}); "
              f"job {compiled_s:.1f} s compiled (compilation included) vs {eager_s:.1f} s eager")
    return ok, detail


def cuda_rng_round_trip(tmp: Path) -> bool:
    """Capture the CUDA RNG into a file, draw, scramble, restore from the file: the same draws?"""
    torch.cuda.manual_seed_all(7)
    torch.rand(3, device="cuda")
    torch.save(capture_rng_state(), tmp / "rng.pt")
    want = torch.rand(1000, device="cuda")
    torch.cuda.manual_seed_all(12345)
    restore_rng_state(torch.load(tmp / "rng.pt", map_location="cpu", weights_only=True))
    return torch.equal(torch.rand(1000, device="cuda"), want)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the environment variables that recreate it in a child process."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list | dict):
                value = json.dumps(value)  # list settings (QUEUES…) read JSON; str() of a list is not JSON
            env[name.upper()] = str(value)
    return env


def resume_on_cpu(storage: Storage, settings: Settings, uri: str, tmp: Path) -> tuple[bool, str]:
    """Stop a bf16 job on this device at step 30; resume it in a process that sees no GPU."""
    spec, job_id = mlp_spec(uri, "bf16"), "device-to-cpu"
    first = StopAt(30)
    try:
        run_training(job_id, spec, storage, settings, first)
        raise RuntimeError("the run did not stop")
    except TrainingStopped as stopped:
        checkpoint_uri = stopped.checkpoint
    saved = load_checkpoint(storage.download_file(checkpoint_uri, tmp / "device-stop.pt"))
    env = os.environ | settings_env(settings) | {"CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--resume-job", job_id, "--spec", spec.model_dump_json()],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if out.returncode:
        return False, f"exit {out.returncode}: {out.stderr[-2000:]}"
    child = json.loads(out.stdout.strip().splitlines()[-1])
    ok = child["device"] == "cpu" and child["resumed_from"] == checkpoint_uri and child["steps"] == 90 and not child["cuda"]
    detail = (
        f"saved on {first.device} ({len(saved['rng']['cuda'])} CUDA RNG state(s)) at step {saved['step']}; "
        f"resumed on {child['device']} to step {child['steps']}, val_accuracy {child['val_accuracy']:.3f}"
    )
    return ok, detail


def resume_job_here(job_id: str, spec_json: str) -> None:
    """Child of :func:`resume_on_cpu`: resume ``job_id`` with this process's settings; print JSON."""
    settings = Settings()
    callbacks = StopAt()
    result = run_training(job_id, JobSpec.model_validate_json(spec_json), Storage(settings), settings, callbacks)
    print(json.dumps({
        "device": callbacks.device, "resumed_from": callbacks.resumed_from, "steps": result.steps,
        "val_accuracy": result.val_accuracy, "cuda": torch.cuda.is_available(),
    }))


# -- the bench ----------------------------------------------------------------------------------


def guarded(table: Table, name: str, check) -> None:
    """Run ``check`` (→ ``(ok, detail)``) and add its row; one failing check must not lose the
    others' figures (the GPU lease is short)."""
    log(name)
    try:
        ok, detail = check()
    except Exception as exc:
        logging.getLogger(__name__).exception("check failed: %s", name)
        ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
    table.add(name, "yes" if ok else "no", detail, None, "yes", ok)


def bench(args: argparse.Namespace, workdir: Path, tables: list[Table]) -> None:
    """Every figure and check, appended to ``tables`` as they are measured (a timeout keeps the done ones)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    speed = Table(f"GPU fast path: {args.arch} at {args.image_size} px, bf16 + channels_last, batch {args.batch_size}")
    service = Table("The service path on the GPU: HTTP → Celery worker on CUDA → S3, kill -9 and resume")
    checks = Table("GPU checks: exact resume, CUDA RNG, GPU checkpoint on a CPU worker")
    tables += [speed, service, checks]
    log(f"writing {args.images} JPEGs")
    write_photo_folder(workdir / "data" / "photos", count=args.images)
    stack = LocalStack(workdir / "stack", isolated=True)
    try:
        stack.start_s3()  # S3 only: the engine needs no Redis, API or Celery worker
        settings = stack.settings.model_copy(update={
            "data_root": workdir / "data", "data_cache_dir": workdir / "cache",
            "progress_interval_s": 1.0, "tensorboard_upload_interval_s": 3600.0,
        })
        storage = Storage(settings)
        on_gpu = photo_spec(args, "device")

        log("ceiling: synthetic tensors")
        top = ceiling(args.arch, args.batch_size, args.image_size, 2, args.warmup_steps, args.ceiling_steps, device)
        log(f"ceiling {top:.0f} images/s")
        log("decode + augment on the device alone")
        stage_rate = data_alone(on_gpu, storage, settings, device, epochs=2)
        speed.add("decode + augment on the device alone (decode: device) ÷ ceiling", f"{stage_rate:.0f}/s", f"{top:.0f}/s",
                  stage_rate / top, "≥ 2", stage_rate / top >= 2)
        log(f"through trainq, decode: device: {args.epochs} epochs")
        with Utilization() as busy:
            rate, clock, num_train = through_trainq(on_gpu, storage, settings)
        speed.add("images/s through trainq (decode: device) ÷ synthetic ceiling", f"{rate:.0f}/s", f"{top:.0f}/s",
                  rate / top, "≥ 0.9", rate / top >= 0.9)
        share = busy.busy_share
        speed.add("GPU utilization during that run (nvidia-smi dmon, 1 s samples)", busy.describe(), "", share, "≥ 90% of samples",
                  None if share is None else share >= 0.9)

        if not args.skip_service:
            log("the service path")
            for name, ok, detail in service_path(workdir, args.service_images, args.service_image_size, args.service_epochs, log):
                service.add(name, "yes" if ok else "no", detail, None, "yes", ok)

        log(f"plain script: {args.baseline_epochs} epochs")
        plain = plain_script(workdir / "data" / "photos", args, device, args.baseline_epochs)
        speed.add("images/s through trainq (decode: device) ÷ the plain script", f"{rate:.0f}/s", f"{plain:.0f}/s", rate / plain, "", None)
        log("data pipeline alone, decode: workers")
        workers = photo_spec(args, "workers")
        loader_rate = data_alone(workers, storage, settings, device, epochs=2)
        decode_ms, image_ms = per_image_ms(workers, storage, settings)
        log(f"through trainq, decode: workers: {args.baseline_epochs} epochs")
        old_rate, _, _ = through_trainq(photo_spec(args, "workers", args.baseline_epochs), storage, settings)
        speed.add("images/s through trainq (decode: workers, PIL in the DataLoader) ÷ ceiling", f"{old_rate:.0f}/s", f"{top:.0f}/s",
                  old_rate / top, "", None)
        speed.add(f"data pipeline alone, decode: workers ({args.workers} workers) ÷ ceiling", f"{loader_rate:.0f}/s", f"{top:.0f}/s",
                  loader_rate / top, "", None)
        capacity = args.workers * 1e3 / image_ms
        speed.add("data pipeline alone, decode: workers ÷ what its workers can decode (workers ÷ ms an image)",
                  f"{loader_rate:.0f}/s", f"{capacity:.0f}/s", loader_rate / capacity, "", None)
        speed.add("one worker: ms an image, decode alone / decode + transforms", f"{image_ms:.2f} ms", f"{decode_ms:.2f} ms",
                  image_ms / decode_ms, "", None)
        speed.notes += [
            f"device {clock.device}; {args.images} JPEGs around 500×375 ({num_train} train), "
            f"random_resized_crop + flip + ImageNet normalize, {args.workers} DataLoader workers, prefetch 2, persistent; "
            f"SGD momentum; cudnn.benchmark; no torch.compile. trainq's decode: device figure spans epochs 2–{args.epochs}, "
            f"decode: workers and the plain script epochs 2–{args.baseline_epochs} (trainq's with validation of 5% and epoch "
            f"turnover included); the ceiling runs {args.ceiling_steps} steps after {args.warmup_steps} warm-up steps on one "
            "batch already on the device.",
        ]

        table_path = Path(tempfile.mkdtemp(dir=workdir)) / "digits.csv"
        write_table(table_path, "digits")
        uri = storage.upload_file(table_path, "s3://trainq/tables/digits.csv")
        precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
        for precision in precisions:
            guarded(checks, f"bit-identical resume on {device.type}, {precision}, deterministic",
                    lambda precision=precision: exact_resume(storage, settings, uri, precision, workdir))
        if device.type == "cuda":
            guarded(checks, "CUDA RNG state restored from a checkpoint file", lambda: (cuda_rng_round_trip(workdir), ""))
        guarded(checks, f"compile: true runs on {device.type} and matches eager", lambda: compiled_matches_eager(storage, settings, uri))
        guarded(checks, f"{device.type} checkpoint resumes on a CPU worker", lambda: resume_on_cpu(storage, settings, uri, workdir))
    finally:
        stack.stop()
    log("done")


def feed(args: argparse.Namespace, workdir: Path) -> Table:
    """The data pipeline alone on this machine's device (a CPU too): ``decode: workers`` against its
    workers' measured per-image capacity, and ``decode: device`` (the training process decodes)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = Table(f"Data pipeline alone on {device.type}: {args.images} JPEGs → {args.image_size} px, batch {args.batch_size}, "
                  f"{args.workers} workers")
    write_photo_folder(workdir / "data" / "photos", count=args.images)
    settings = Settings(data_root=workdir / "data", data_cache_dir=workdir / "cache")
    workers = photo_spec(args, "workers")
    loader_rate = data_alone(workers, None, settings, device, epochs=args.epochs)
    decode_ms, image_ms = per_image_ms(workers, None, settings)
    capacity = args.workers * 1e3 / image_ms
    table.add("decode: workers, images/s ÷ its workers' capacity (workers ÷ ms an image in one process)",
              f"{loader_rate:.0f}/s", f"{capacity:.0f}/s", loader_rate / capacity, "≥ 0.8", loader_rate / capacity >= 0.8)
    table.add("one worker: ms an image, decode + transforms / decode alone", f"{image_ms:.2f} ms", f"{decode_ms:.2f} ms",
              image_ms / decode_ms, "", None)
    device_rate = data_alone(photo_spec(args, "device"), None, settings, device, epochs=args.epochs)
    table.add("decode: device (decoded in the training process) ÷ decode: workers", f"{device_rate:.0f}/s", f"{loader_rate:.0f}/s",
              device_rate / loader_rate, "", None)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on a CPU (checks the code, not the speed)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--baseline-epochs", type=int, default=6, help="epochs of the plain script and of decode: workers")
    parser.add_argument("--service-images", type=int, default=640)
    parser.add_argument("--service-image-size", type=int, default=64)
    parser.add_argument("--service-epochs", type=int, default=20, help="long enough on a GPU for the kill to land mid-job")
    parser.add_argument("--skip-service", action="store_true", help="skip the HTTP + Celery service path")
    parser.add_argument("--feed", action="store_true", help="only the data pipeline's figures, on any device (prints)")
    parser.add_argument("--workers", type=int, default=max(1, usable_cpus() - 2))
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--ceiling-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.name} on a GPU, none with --smoke)")
    parser.add_argument("--resume-job", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resume_job:
        resume_job_here(args.resume_job, args.spec)
        return
    if args.feed:
        with tempfile.TemporaryDirectory() as tmp:
            print(feed(args, Path(tmp)).markdown())
        return
    if args.smoke:
        args.images, args.image_size, args.batch_size, args.epochs, args.baseline_epochs = 48, 64, 8, 3, 2
        args.workers, args.warmup_steps, args.ceiling_steps = 1, 1, 2
        args.arch, args.service_images, args.service_image_size, args.service_epochs = "resnet18", 96, 32, 3
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench/gpu.sh measures a GPU; --smoke runs its code on a CPU with tiny sizes")
    # bench/gpu.sh's timeout sends SIGTERM: end through the finally below, so the figures
    # measured so far are written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped by SIGTERM after {time.monotonic() - STARTED:.0f} s"))
    tables: list[Table] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench(args, Path(tmp), tables)
    finally:
        out = args.out or (None if args.smoke else RESULTS)
        if out is not None and tables:
            write_results(tables, out)
        for table in tables:
            print(table.markdown())
    failed = [row[0] for table in tables[1:] for row in table.rows if row[-1] == "**missed**"]
    if failed:
        raise SystemExit(f"a check failed (see the table): {failed}")


if __name__ == "__main__":
    main()
