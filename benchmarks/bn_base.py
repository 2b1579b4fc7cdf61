"""The real-BatchNorm benchmark's pretrained base: a transformers ResNet trained on Fashion-MNIST classes 0-4.

Ordinary PyTorch training (BatchNorm in training mode, momentum 0.1, nothing folded), so the result is the
kind of checkpoint most users fine-tune. Trained once and cached like the demo's base
(``hf_freeze.demo.pretrain``: ``$HF_FREEZE_CACHE`` or ``~/.cache/hf_freeze``, a folder named by a hash of the
settings and library versions, written to a staging folder and renamed into place).

    python benchmarks/bn_base.py            # train (or find) the base and print its folder and report
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from shared_data import FASHION_MNIST_CLASSES, fashion_mnist
from transformers import ResNetForImageClassification

from hf_freeze.demo.pretrain import (
    base_config,
    cache_root,
    channel_stats,
    make_image_processor,
    normalize,
    random_shift,
    torch_threads,
)

FMNIST = Path("data") / "fashion-mnist"
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
REPORT = "pretraining.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BaseSettings:
    """Everything that determines the base; its hash names the cache folder."""

    seed: int = 0
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    image_size: int = 28  # Fashion-MNIST's own size: no resampling
    embedding_size: int = 32
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)


def settings_key(settings: BaseSettings) -> str:
    payload = {"settings": dataclasses.asdict(settings), "format": FORMAT_VERSION, "torch": torch.__version__,
               "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def gray_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 3, 28, 28)`` in 0..1 (gray repeated to RGB)."""
    x = images.astype(np.float32)[:, None] / 255.0
    return np.repeat(x, 3, axis=1)


def class_subset(labels: np.ndarray, classes, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``classes`` (all of them, or ``per_class`` of each drawn with ``seed``)."""
    if per_class is None:
        return np.flatnonzero(np.isin(labels, classes))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in classes]))


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += int((model(pixel_values=pixels[i:i + batch]).logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(labels)


def train_base(settings: BaseSettings, shared: Path, progress: bool = True):
    """Plain torch loop: AdamW + one-cycle, random 2-px shifts, BatchNorm in training mode throughout."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = fashion_mnist(shared / FMNIST, "train")
    idx = class_subset(labels, SOURCE_CLASSES)
    pixels = gray_pixels(images[idx])
    mean, std = channel_stats(pixels)
    x, y = normalize(pixels, mean, std), torch.from_numpy(labels[idx])
    test_images, test_labels = fashion_mnist(shared / FMNIST, "test")
    tidx = class_subset(test_labels, SOURCE_CLASSES)
    xt, yt = normalize(gray_pixels(test_images[tidx]), mean, std), torch.from_numpy(test_labels[tidx])

    names = [FASHION_MNIST_CLASSES[c] for c in SOURCE_CLASSES]
    model = ResNetForImageClassification(base_config(settings, names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(y) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                    total_steps=settings.epochs * steps_per_epoch)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for s in range(0, len(order), settings.batch_size):
            b = order[s:s + settings.batch_size]
            loss = model(pixel_values=random_shift(x[b], settings.max_shift, generator), labels=y[b]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(b)
        if progress:
            print(f"[bn base] epoch {epoch + 1}/{settings.epochs} loss {total / len(y):.4f} "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    test_accuracy = accuracy(model, xt, yt)
    report = {"dataset": "Fashion-MNIST train split, classes 0-4", "classes": names, "train_images": len(y),
              "test_images": len(yt), "test_accuracy": round(test_accuracy, 4),
              "seconds": round(time.perf_counter() - start, 1), "image_mean": mean, "image_std": std,
              "settings": dataclasses.asdict(settings), "params": sum(p.numel() for p in model.parameters()),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    model.eval()
    return model, make_image_processor(mean, std, settings.image_size), report


def pretrained_base(shared: Path, settings: BaseSettings | None = None, cache_dir=None, progress: bool = True) -> Path:
    """The base's folder, training and caching it on first use (one torch thread, as the demo does)."""
    settings = settings or BaseSettings()
    root = cache_root(cache_dir)
    target = root / f"fmnist-resnet-base-{settings_key(settings)}"
    if (target / REPORT).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with torch_threads(1):
        model, processor, report = train_base(settings, shared, progress)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / REPORT).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    from shared_data import shared_dir

    folder = pretrained_base(shared_dir(sys.argv[1] if len(sys.argv) > 1 else None))
    print(folder)
    print((folder / REPORT).read_text())
