"""Real image datasets for the offline demo, built from scikit-learn's bundled digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 handwritten digits inside the
package (the test set of the UCI "Optical Recognition of Handwritten Digits" data), so
nothing is downloaded. The images are upsampled to ``size`` x ``size`` RGB and split
into two tasks:

* the **pretraining task**: digits 0-4, all their images, split into train/test;
* the **transfer task**: digits 5-9 relabelled 0-4 (class names stay "5".."9"), a
  few-shot ``train`` split with ``shots_per_class`` images per class and a disjoint
  ``validation`` split with the rest.

Every split is a deterministic function of its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

PRETRAIN_DIGITS: tuple[int, ...] = (0, 1, 2, 3, 4)
TRANSFER_DIGITS: tuple[int, ...] = (5, 6, 7, 8, 9)
IMAGE_SIZE = 32


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return sklearn's digits as ``(images, targets)``: ``(1797, 8, 8)`` floats in 0..16 and int labels 0..9."""
    from sklearn.datasets import load_digits  # optional dependency (hf_freeze[examples]): only the demo needs it

    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def to_rgb_image(digit: np.ndarray, size: int = IMAGE_SIZE) -> PILImage.Image:
    """Turn one 8x8 digit (values 0..16, ink is high) into a ``size`` x ``size`` RGB image, ink bright on black."""
    gray = np.clip(np.rint(digit * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    small = PILImage.fromarray(gray, mode="L")
    return small.resize((size, size), PILImage.Resampling.BILINEAR).convert("RGB")


def select_indices(targets: np.ndarray, digits: Sequence[int]) -> np.ndarray:
    """Indices (ascending) of the samples whose target is one of ``digits``."""
    return np.flatnonzero(np.isin(targets, list(digits)))


def stratified_split(
    targets: np.ndarray, indices: np.ndarray, per_class: int | None, fraction: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into ``(first, rest)`` class by class with a seeded shuffle.

    ``first`` takes ``per_class`` samples of each class, or else ``round(fraction * n_class)``.
    Both outputs are sorted, disjoint, and together cover ``indices``.
    """
    rng = np.random.default_rng(seed)
    first: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for cls in np.unique(targets[indices]):
        members = rng.permutation(indices[targets[indices] == cls])
        take = per_class if per_class is not None else int(round((fraction or 0.0) * len(members)))
        if not 0 < take < len(members):
            raise ValueError(f"cannot take {take} of the {len(members)} images of digit {cls}")
        first.append(members[:take])
        rest.append(members[take:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def make_features(class_names: Sequence[str]) -> Features:
    """The schema of every demo split: an ``image``, a ``label`` ClassLabel and the original ``index`` in sklearn's digits."""
    return Features({"image": Image(), "label": ClassLabel(names=list(class_names)), "index": Value("int64")})


def build_split(
    images: np.ndarray, targets: np.ndarray, indices: np.ndarray, digits: Sequence[int], size: int = IMAGE_SIZE
) -> Dataset:
    """A ``datasets.Dataset`` of the given samples, digit ``digits[i]`` labelled ``i`` with class name ``str(digits[i])``."""
    relabel = {digit: i for i, digit in enumerate(digits)}
    return Dataset.from_dict(
        {
            "image": [to_rgb_image(images[i], size) for i in indices],
            "label": [relabel[int(targets[i])] for i in indices],
            "index": [int(i) for i in indices],
        },
        features=make_features([str(d) for d in digits]),
    )


def pretraining_task(seed: int = 0, test_fraction: float = 0.2, size: int = IMAGE_SIZE) -> DatasetDict:
    """Digits 0-4 (all 901 of their images) as ``train``/``test``, stratified, ``test_fraction`` held out."""
    images, targets = load_digit_arrays()
    pool = select_indices(targets, PRETRAIN_DIGITS)
    test, train = stratified_split(targets, pool, None, test_fraction, seed)
    return DatasetDict(
        train=build_split(images, targets, train, PRETRAIN_DIGITS, size),
        test=build_split(images, targets, test, PRETRAIN_DIGITS, size),
    )


def transfer_task(
    shots_per_class: int = 10, seed: int = 0, validation_per_class: int | None = None, size: int = IMAGE_SIZE
) -> DatasetDict:
    """Digits 5-9 relabelled 0-4: ``train`` has ``shots_per_class`` images per class, ``validation`` is disjoint.

    ``validation`` holds every other image of those digits, or ``validation_per_class``
    of them per class when given (drawn from the rest with the same seed).
    """
    images, targets = load_digit_arrays()
    pool = select_indices(targets, TRANSFER_DIGITS)
    train, rest = stratified_split(targets, pool, shots_per_class, None, seed)
    if validation_per_class is not None:
        rest, _ = stratified_split(targets, rest, validation_per_class, None, seed + 1)
    return DatasetDict(
        train=build_split(images, targets, train, TRANSFER_DIGITS, size),
        validation=build_split(images, targets, rest, TRANSFER_DIGITS, size),
    )


def write_imagefolder(split: Dataset, root: str | Path) -> Path:
    """Write ``split`` as ``root/<class_name>/<index>.png`` (readable by ``load_dataset("imagefolder", data_dir=root)``).

    File names are the sample's sklearn index when the split has an ``index`` column, else its row number.
    """
    root = Path(root)
    names: list[str] = split.features["label"].names
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    has_index = "index" in split.column_names
    for row, example in enumerate(split):
        stem = example["index"] if has_index else row
        example["image"].save(root / names[example["label"]] / f"{stem}.png")
    return root
