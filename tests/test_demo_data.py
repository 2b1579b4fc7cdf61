"""Tests for the offline demo's data (sklearn digits) and its cached pretrained base."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("datasets")

from datasets import DatasetDict, load_dataset  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402

from hf_freeze.demo import pretrain  # noqa: E402
from hf_freeze.demo.data import (  # noqa: E402
    load_digit_arrays,
    pretraining_task,
    transfer_task,
    write_imagefolder,
)


@pytest.fixture(scope="module")
def targets() -> np.ndarray:
    return load_digit_arrays()[1]


@pytest.fixture(scope="module")
def pretraining() -> DatasetDict:
    return pretraining_task(seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain.pretrained_base(cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_images_are_32x32_rgb(pretraining: DatasetDict) -> None:
    image = pretraining["train"][0]["image"]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert pixels(image).max() > 200 and pixels(image).min() == 0


def test_pretraining_split_covers_digits_0_to_4_disjointly(pretraining: DatasetDict, targets: np.ndarray) -> None:
    train, test = set(pretraining["train"]["index"]), set(pretraining["test"]["index"])
    assert not train & test
    assert train | test == set(np.flatnonzero(targets < 5).tolist())
    assert pretraining["train"].features["label"].names == ["0", "1", "2", "3", "4"]
    assert all(targets[i] == label for i, label in zip(pretraining["test"]["index"], pretraining["test"]["label"]))
    assert 0.18 < len(test) / (len(train) + len(test)) < 0.22


@pytest.mark.parametrize("shots", [1, 10, 30])
def test_transfer_task_relabels_and_honours_shots(shots: int, targets: np.ndarray) -> None:
    task = transfer_task(shots_per_class=shots, seed=3)
    train, val = task["train"], task["validation"]
    assert train.features["label"].names == ["5", "6", "7", "8", "9"]
    assert Counter(train["label"]) == {label: shots for label in range(5)}
    assert set(val["label"]) == set(range(5))
    for split in (train, val):
        assert all(targets[i] == label + 5 for i, label in zip(split["index"], split["label"]))
    assert not set(train["index"]) & set(val["index"])
    assert set(train["index"]) | set(val["index"]) == set(np.flatnonzero(targets >= 5).tolist())


def test_transfer_validation_per_class() -> None:
    val = transfer_task(shots_per_class=5, seed=0, validation_per_class=20)["validation"]
    assert Counter(val["label"]) == {label: 20 for label in range(5)}


def test_pretraining_and_transfer_images_are_disjoint(pretraining: DatasetDict) -> None:
    transfer = transfer_task(shots_per_class=10, seed=0)
    pre = set(pretraining["train"]["index"]) | set(pretraining["test"]["index"])
    assert not pre & (set(transfer["train"]["index"]) | set(transfer["validation"]["index"]))


def test_splits_are_deterministic_given_the_seed(pretraining: DatasetDict) -> None:
    a, b = transfer_task(shots_per_class=10, seed=7), transfer_task(shots_per_class=10, seed=7)
    assert a["train"]["index"] == b["train"]["index"] and a["validation"]["index"] == b["validation"]["index"]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a["train"]["image"], b["train"]["image"]))
    assert transfer_task(shots_per_class=10, seed=8)["train"]["index"] != a["train"]["index"]
    assert pretraining_task(seed=0)["test"]["index"] == pretraining["test"]["index"]
    assert pretraining_task(seed=1)["test"]["index"] != pretraining["test"]["index"]


def test_imagefolder_round_trip(tmp_path: Path) -> None:
    split = transfer_task(shots_per_class=4, seed=0)["train"]
    root = write_imagefolder(split, tmp_path / "train")
    assert sorted(p.name for p in root.iterdir()) == ["5", "6", "7", "8", "9"]
    loaded = load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.features["label"].names == split.features["label"].names
    paths = loaded.cast_column("image", ImageFeature(decode=False))["image"]
    by_index = {int(Path(p["path"]).stem): (image, label) for p, image, label in
                zip(paths, loaded["image"], loaded["label"])}
    assert sorted(by_index) == sorted(split["index"])
    for index, image, label in zip(split["index"], split["image"], split["label"]):
        loaded_image, loaded_label = by_index[index]
        assert loaded_label == label
        assert np.array_equal(pixels(loaded_image), pixels(image))


def test_pretrained_base_loads_with_auto_classes_and_is_accurate(base_dir: Path, pretraining: DatasetDict) -> None:
    model = AutoModelForImageClassification.from_pretrained(base_dir).eval()
    processor = AutoImageProcessor.from_pretrained(base_dir)
    assert model.config.model_type == "resnet" and model.config.num_labels == 5
    assert model.config.id2label == {i: str(i) for i in range(5)}
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    test = pretraining["test"]
    inputs = processor(images=list(test["image"]), return_tensors="pt")
    with torch.no_grad():
        predictions = model(**inputs).logits.argmax(-1)
    accuracy = float((predictions == torch.tensor(test["label"])).float().mean())
    assert accuracy > 0.95, accuracy


def test_processor_matches_training_normalisation(base_dir: Path, pretraining: DatasetDict) -> None:
    processor = AutoImageProcessor.from_pretrained(base_dir)
    split = pretraining["test"].select(range(8))
    ours = pretrain.normalize(pretrain.to_pixel_array(split), processor.image_mean, processor.image_std)
    theirs = processor(images=list(split["image"]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_pretraining_report(base_dir: Path) -> None:
    report = json.loads((base_dir / pretrain.REPORT_NAME).read_text())
    assert report["classes"] == ["0", "1", "2", "3", "4"]
    assert report["accuracy"] > 0.95 and 0 < report["seconds"] < 60
    assert {"dataset", "epochs", "image_mean", "image_std"} <= report.keys()


def test_second_call_reuses_the_cache(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = base_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained a cached base")

    monkeypatch.setattr(pretrain, "train_base", no_training)
    assert pretrain.pretrained_base(cache_dir=base_dir.parent, progress=False) == base_dir
    monkeypatch.setenv(pretrain.CACHE_ENV, str(base_dir.parent))
    assert pretrain.pretrained_base(progress=False) == base_dir
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in base_dir.parent.iterdir()] == [base_dir.name]  # no staging folder left


def test_cache_key_depends_on_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(pretrain.CACHE_ENV, str(tmp_path))
    assert pretrain.cache_root() == tmp_path
    assert pretrain.cache_root(tmp_path / "x") == tmp_path / "x"
    default = pretrain.settings_key(pretrain.PretrainSettings())
    assert default == pretrain.settings_key(pretrain.PretrainSettings(seed=0))
    assert default != pretrain.settings_key(pretrain.PretrainSettings(seed=1))
    assert default != pretrain.settings_key(pretrain.PretrainSettings(epochs=3))
