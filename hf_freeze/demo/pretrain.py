"""Train (once) and cache the demo's pretrained base: a tiny transformers ResNet on digits 0-4.

The result is an ordinary Hugging Face checkpoint folder (``config.json``,
``model.safetensors``, ``preprocessor_config.json``) that loads offline with
``AutoModelForImageClassification.from_pretrained(path)`` and
``AutoImageProcessor.from_pretrained(path)``, plus ``pretraining.json`` with the
held-out accuracy and the time training took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor
from transformers.utils import logging as hf_logging

from hf_freeze.demo.data import IMAGE_SIZE, PRETRAIN_DIGITS, pretraining_task

CACHE_ENV = "HF_FREEZE_CACHE"
FORMAT_VERSION = 2  # bump when the recipe below changes in a way the settings do not capture
REPORT_NAME = "pretraining.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the pretrained base; its hash names the cache folder."""

    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    test_fraction: float = 0.2
    image_size: int = IMAGE_SIZE
    embedding_size: int = 32
    hidden_sizes: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding cached bases: ``cache_dir``, else ``$HF_FREEZE_CACHE``, else ``~/.cache/hf_freeze``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "hf_freeze"


def settings_key(settings: PretrainSettings) -> str:
    """A short hash of the settings and of the library versions that shape the result."""
    import sklearn  # optional dependency (hf_freeze[examples]): only the demo needs it

    payload = {
        "settings": dataclasses.asdict(settings),
        "format": FORMAT_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sklearn": sklearn.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def base_config(settings: PretrainSettings, class_names: Sequence[str]) -> ResNetConfig:
    """A small BatchNorm ResNet config with basic blocks and one label per class name."""
    return ResNetConfig(
        num_channels=3,
        embedding_size=settings.embedding_size,
        hidden_sizes=list(settings.hidden_sizes),
        depths=list(settings.depths),
        layer_type="basic",
        hidden_act="relu",
        num_labels=len(class_names),
        id2label={i: name for i, name in enumerate(class_names)},
        label2id={name: i for i, name in enumerate(class_names)},
    )


def to_pixel_array(split: Dataset) -> np.ndarray:
    """The split's images as a ``(N, 3, H, W)`` float32 array scaled to 0..1."""
    stacked = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in split["image"]])
    return stacked.transpose(0, 3, 1, 2) / 255.0


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` pixels, rounded to 4 decimals."""
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel, as a float32 tensor."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy((pixels - m) / s)


def make_image_processor(mean: Sequence[float], std: Sequence[float], size: int) -> ViTImageProcessor:
    """An ``AutoImageProcessor``-compatible processor: resize to ``size``, rescale by 1/255, normalise."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding of the normalised background)."""
    if max_shift == 0:
        return batch
    n, _, h, w = batch.shape
    background = batch[:, :, :1, :1].amin().item()
    padded = nn.functional.pad(batch, [max_shift] * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on already-normalised pixels."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixel_values=pixel_values[start : start + batch_size]).logits
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def train_base(
    settings: PretrainSettings, progress: bool = True
) -> tuple[ResNetForImageClassification, ViTImageProcessor, dict[str, Any]]:
    """Train the base on the pretraining task with a plain torch loop; return model, processor and report."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    task = pretraining_task(seed=settings.seed, test_fraction=settings.test_fraction, size=settings.image_size)
    class_names: list[str] = task["train"].features["label"].names
    train_pixels = to_pixel_array(task["train"])
    mean, std = channel_stats(train_pixels)
    x_train = normalize(train_pixels, mean, std)
    y_train = torch.tensor(task["train"]["label"])
    x_test = normalize(to_pixel_array(task["test"]), mean, std)
    y_test = torch.tensor(task["test"]["label"])

    model = ResNetForImageClassification(base_config(settings, class_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(y_train) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch
    )
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total = 0.0
        for start_idx in range(0, len(order), settings.batch_size):
            idx = order[start_idx : start_idx + settings.batch_size]
            batch = random_shift(x_train[idx], settings.max_shift, generator)
            loss = model(pixel_values=batch, labels=y_train[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if progress:
            print(f"[hf_freeze demo] pretrain epoch {epoch + 1}/{settings.epochs} loss {total / len(y_train):.4f}",
                  file=sys.stderr)

    test_accuracy = accuracy(model, x_test, y_test)
    seconds = time.perf_counter() - start
    report = {
        "dataset": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test set)",
        "classes": class_names,
        "digits": list(PRETRAIN_DIGITS),
        "train_images": len(y_train),
        "test_images": len(y_test),
        "epochs": settings.epochs,
        "accuracy": round(test_accuracy, 4),
        "seconds": round(seconds, 2),
        "image_mean": mean,
        "image_std": std,
        "settings": dataclasses.asdict(settings),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if progress:
        print(f"[hf_freeze demo] pretrained base: held-out accuracy {test_accuracy:.4f} in {seconds:.1f}s",
              file=sys.stderr)
    model.eval()
    return model, make_image_processor(mean, std, settings.image_size), report


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, then restore the previous number.

    One thread makes the tiny model's training reproducible across machines (results differ
    slightly with the thread count) and avoids a 10-20x slowdown when the cores are shared.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars off inside the block unless ``enabled``; restore them after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def pretrained_base(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    settings: PretrainSettings | None = None,
) -> Path:
    """Return the folder of the demo's pretrained base, training and caching it on first use.

    The folder is ``<cache root>/demo-base-<hash>`` where the hash covers the settings and
    library versions; a finished folder is reused as is. Training writes to a temporary
    folder that is renamed into place, so concurrent callers never see a partial one.
    """
    settings = settings or PretrainSettings(seed=seed)
    root = cache_root(cache_dir)
    target = root / f"demo-base-{settings_key(settings)}"
    if (target / REPORT_NAME).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with torch_threads(1):
        model, processor, report = train_base(settings, progress)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        with progress_bars(progress):
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / REPORT_NAME).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
