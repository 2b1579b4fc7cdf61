"""Readers for the real fixtures used by benchmarks, tests and one example (Fashion-MNIST IDX files, ImageNet samples).

The files are not part of the project: pass their folder (``shared/`` beside the checkout, or
``HF_FREEZE_SHARED``). Development code, not shipped in the package: benchmarks import it as a sibling
module, ``tests/conftest.py`` puts this folder on ``sys.path``. Plain numpy/PIL.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def shared_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` when given, else ``$HF_FREEZE_SHARED``, else ``../shared`` next to the project checkout."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("HF_FREEZE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX (optionally gzipped) file into a numpy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    return (read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
            read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def few_shot_indices(labels: np.ndarray, per_class: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``per_class`` indices of every class, drawn with ``seed`` (deterministic), optionally avoiding ``exclude``."""
    rng = np.random.default_rng(seed)
    taken = set(exclude.tolist()) if exclude is not None else set()
    out = []
    for c in np.unique(labels):
        pool = np.array([i for i in np.flatnonzero(labels == c) if i not in taken])
        out.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(out))


def imagenet_samples(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """(path, 0-based ImageNet class) of every ``imagenet_NN_K.jpg`` in ``folder``."""
    items = []
    for p in sorted(Path(folder).glob("imagenet_*_*.jpg")):
        m = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", p.name)
        if m:
            items.append((p, int(m.group(1))))
    return items


def imagenet_top1(model, processor, folder: str | os.PathLike, label_offset: int = 1) -> int:
    """How many ImageNet sample photos ``model`` classifies right (label = class + ``label_offset``)."""
    import torch
    from PIL import Image

    samples = imagenet_samples(folder)
    images = [Image.open(p).convert("RGB") for p, _ in samples]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    model.train(was_training)
    return int(sum(int(i) == k + label_offset for i, (_, k) in zip(logits.argmax(-1), samples)))
