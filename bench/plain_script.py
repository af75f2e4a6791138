"""The baseline: the plain PyTorch script a trainq job replaces, written as users write it.

``ImageFolder`` over local PNGs, the same ``SmallCNN``, ``CrossEntropyLoss``, Adam, a seeded
80/20 split, a validation pass and ``torch.save`` after every epoch; torch's default threads.
Prints one JSON line: ``{"train_s": ..., "val_s": ..., "samples_per_s": ..., "val_accuracy": ...}`` (``val_s``:
the validation passes, part of ``train_s``); samples/s counts
the samples after the first optimizer step over the time from it to the last step.

    python -m bench.plain_script DATA_DIR --epochs 20 --batch-size 32 --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

from worker.training.models import SmallCNN


def main() -> None:
    """Train and print the timings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--augment", action="store_true", help="RandomResizedCrop + horizontal flip (photos)")
    args = parser.parse_args()

    torch.manual_seed(0)
    steps = [transforms.Grayscale()] if args.channels == 1 else []
    if args.augment:
        steps += [transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip()]
    tf = transforms.Compose([*steps, transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor()])
    full = datasets.ImageFolder(str(args.data), transform=tf)
    num_val = round(len(full) * 0.2)
    train_set, val_set = random_split(full, [len(full) - num_val, num_val], generator=torch.Generator().manual_seed(0))
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    val = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers)
    if args.arch == "small_cnn":
        model = SmallCNN(args.channels, len(full.classes))
    else:
        import torchvision

        model = torchvision.models.get_model(args.arch, num_classes=len(full.classes))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started, samples, first_step, last_step, val_s = time.perf_counter(), 0, None, None, 0.0
    with tempfile.TemporaryDirectory() as out:
        for epoch in range(args.epochs):
            model.train()
            for inputs, targets in train:
                optimizer.zero_grad()
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                last_step = time.time()
                if first_step is None:
                    first_step, samples = last_step, 0  # samples after the first step, as trainq's figure
                else:
                    samples += len(targets)
            model.eval()
            val_started = time.perf_counter()
            correct = 0
            with torch.no_grad():
                for inputs, targets in val:
                    correct += (model(inputs).argmax(1) == targets).sum().item()
            val_s += time.perf_counter() - val_started
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, Path(out) / f"epoch-{epoch}.pt")
    train_s = time.perf_counter() - started
    print(json.dumps({
        "train_s": train_s,
        "val_s": val_s,
        "samples_per_s": samples / (last_step - first_step),
        "val_accuracy": correct / num_val,
    }))


if __name__ == "__main__":
    main()
