#!/usr/bin/env python
"""Fine-tune any ``AutoModelForImageClassification`` with a freeze policy (hf_freeze).

A drop-in for transformers' ``examples/pytorch/image-classification/run_image_classification.py``: it
accepts every flag of that script (``--model_name_or_path``, ``--model_type``, ``--config_name``,
``--image_processor_name``, ``--dataset_name`` or ``--train_dir/--validation_dir``, ``--image_column_name``,
every ``TrainingArguments`` flag; examples/README.md lists them) plus hf_freeze's ``--freeze --unfreeze
--train_bn --layer_lr_decay --verify_frozen --freeze_policy_file --adapter ...``. Runs as ``python``,
``torchrun`` or ``accelerate launch`` (see examples/README.md).

With neither a model nor data given it runs the embedded default, offline: the small ResNet that
hf_freeze pretrains on scikit-learn's handwritten digits 0-4 (cached after the first run), fine-tuned
on digits 5-9 with ``--shots_per_class`` images per class.

Bad arguments stop it before anything is downloaded, loaded or written, with one line
(``finetune_image_classification.py: error: ...``) and exit code 2; ``HF_FREEZE_DEBUG=1`` shows the
traceback instead. Logging follows transformers' (``--log_level``): the freeze report and every unfreeze
appear on the main process.

Writes to ``--output_dir``: the model (``config.json`` with the policy, ``freeze_policy.json``), the
image processor, ``freeze_report.txt``/``.md``, ``freeze_events.json``, ``all_results.json``,
``trainer_state.json`` and a model card (``README.md``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import transformers
from datasets import ClassLabel, DatasetDict, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, set_seed
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
from transformers.trainer_utils import get_last_checkpoint

import hf_freeze
from hf_freeze import FreezeTrainer, FreezeTrainingArguments
from hf_freeze.args import DeltaArguments, FreezeArguments
from hf_freeze.checks import (
    argparse_hint,
    did_you_mean,
    flag_hint,
    imagefolder_classes,
    json_value_problems,
    model_source_problem,
    one_line,
    training_number_problems,
    unknown_choice,
)
from hf_freeze.cli import DEBUG_ENV, debug_enabled
from hf_freeze.demo import DEFAULT_POLICY
from hf_freeze.metrics import classification_metrics

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("crop", "flip")
# The embedded default: what `python -m hf_freeze.demo` runs (digits 5-9 on the digits-0-4 ResNet).
EMBEDDED_POLICY = hf_freeze.FreezePolicy.from_string(DEFAULT_POLICY)  # the same policy as `make demo`
EMBEDDED_AUGMENT = "crop"  # no flips: a mirrored digit is another symbol
EMBEDDED_MIN_CROP_SCALE = 0.85


MODEL_TYPES = tuple(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub model id or local folder. Default: the embedded digits ResNet (pretrained and cached on first use)."})
    model_type: str | None = field(default=None, metadata={
        "help": "The model's type (one of: " + ", ".join(MODEL_TYPES) + "); checked against the loaded config."})
    config_name: str | None = field(default=None, metadata={
        "help": "Config (Hub id or folder) when it differs from --model_name_or_path."})
    image_processor_name: str | None = field(default=None, metadata={
        "help": "Image processor (Hub id or folder) when it differs from --model_name_or_path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one from `hf auth login`)."})
    ignore_mismatched_sizes: bool = field(default=True, metadata={
        "help": "Give the model a new head when the dataset's labels differ from the checkpoint's (default: True)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})

    def __post_init__(self):
        problems = []
        for flag in ("model_name_or_path", "config_name", "image_processor_name"):
            value = getattr(self, flag)
            needs = ({"needs": "preprocessor_config.json", "what": "a saved image processor"}
                     if flag == "image_processor_name" else {})
            problem = model_source_problem(value, tiny=False, **needs) if value else None
            if problem:
                problems.append(f"--{flag}: {problem}")
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            problems.append(f"--model_type {self.model_type!r} is not an image-classification model type"
                            f"{did_you_mean(self.model_type, MODEL_TYPES)}; valid: {', '.join(MODEL_TYPES)}")
        if self.model_type and not (self.model_name_or_path or self.config_name):
            problems.append(f"--model_type {self.model_type} needs --model_name_or_path or --config_name (the "
                            "embedded default is a resnet)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "A dataset on the Hub with image and label columns (needs network access)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={
        "help": "Local training images, one subfolder per class (the 'imagefolder' layout)."})
    validation_dir: str | None = field(default=None, metadata={
        "help": "Local validation images, same class subfolders. Default: --train_val_split of the training data."})
    train_val_split: float = field(default=0.15, metadata={
        "help": "Fraction of the training data held out for validation when there is no validation split."})
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use only N training images (a seeded shuffle, as transformers' example)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Use only N validation images (a seeded shuffle, as transformers' example)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Train and evaluate at this size (pixels) instead of the image processor's."})
    augment: str | None = field(default=None, metadata={
        "help": "Training augmentation: comma-separated 'crop' (random resized crop) and 'flip' (horizontal), or "
                "'none'. Default: 'crop,flip' (as transformers' example); 'crop' for the embedded digits."})
    min_crop_scale: float | None = field(default=None, metadata={
        "help": "Smallest area fraction of a random resized crop. Default: 0.08 (torchvision); 0.85 for the digits."})
    shots_per_class: int = field(default=10, metadata={
        "help": "Embedded default only: training images per class of the digits 5-9 task."})

    def __post_init__(self):
        problems = []
        if self.dataset_name and (self.train_dir or self.validation_dir):
            problems.append("give either --dataset_name or --train_dir/--validation_dir, not both")
        if self.validation_dir and not self.train_dir:
            problems.append("--validation_dir needs --train_dir")
        for flag in ("train_dir", "validation_dir"):
            path = getattr(self, flag)
            if path and not Path(path).is_dir():
                problems.append(f"--{flag} {path!r} is not a folder")
        if not 0 < self.train_val_split < 1:
            problems.append(f"--train_val_split must be between 0 and 1, got {self.train_val_split}")
        try:
            parse_augment(self.augment or "none")
        except ValueError as e:
            problems.append(str(e))
        if self.min_crop_scale is not None and not 0 < self.min_crop_scale <= 1:
            problems.append(f"--min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        for flag in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                problems.append(f"--{flag} must be a number of images >= 1, got {value} (leave it out to use them all)")
        if self.image_size is not None and self.image_size < 1:
            problems.append(f"--image_size must be a positive number of pixels, got {self.image_size}")
        if problems:
            raise ValueError("invalid data arguments: " + "; ".join(problems))

    @property
    def embedded(self) -> bool:
        return not (self.dataset_name or self.train_dir)


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ``("crop", "flip")``; ``"none"`` -> ``()``. Unknown names raise ValueError."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or not names:
        raise ValueError(f"--augment {spec!r}: unknown {unknown or 'empty value'}; "
                         f"valid: 'none' or a comma-separated subset of {list(AUGMENTATIONS)}")
    return names


# ---------------------------------------------------------------------------------------------- data
def load_imagefolders(train_dir: str, validation_dir: str | None, cache_dir: str | None,
                      label_column: str = "label") -> DatasetDict:
    """``load_dataset("imagefolder")`` on each folder; each needs class subfolders (unless the labels come from
    another column, ``--label_column_name``), both the same ones."""
    folders = {"train": ("--train_dir", train_dir), "validation": ("--validation_dir", validation_dir)}
    splits = {split: load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir, split="train")
              for split, (_, folder) in folders.items() if folder}
    if label_column != "label":
        return DatasetDict(splits)
    names = [imagefolder_classes(*folders[split], data) for split, data in splits.items()]
    if validation_dir:
        if names[0] != names[1]:
            raise ValueError(f"--train_dir classes {names[0]} differ from --validation_dir classes {names[1]}: "
                             "give both folders the same class subfolders")
    return DatasetDict(splits)


def load_hub_dataset(name: str, config: str | None, cache_dir: str | None, token: str | None) -> DatasetDict:
    """``load_dataset(name)`` with a clear error when the Hub cannot be reached."""
    try:
        return load_dataset(name, config, cache_dir=cache_dir, token=token)
    except ConnectionError as e:
        raise ConnectionError(
            f"could not load --dataset_name {name!r} from the Hugging Face Hub ({e}). Without network access "
            "(or with HF_HUB_OFFLINE=1) pass local images instead: --train_dir DIR [--validation_dir DIR], "
            "one subfolder per class.") from e


def embedded_dataset(shots_per_class: int, seed: int) -> DatasetDict:
    """The offline default: digits 5-9 (relabelled 0-4), ``shots_per_class`` training images per class."""
    from hf_freeze.demo.data import transfer_task

    return transfer_task(shots_per_class=shots_per_class, seed=seed)


def standardise_columns(data: DatasetDict, image_column: str, label_column: str) -> DatasetDict:
    """Keep only ``image`` and ``label`` (renamed from the given columns); clear error when one is missing."""
    columns = data["train"].column_names
    for flag, col in (("image_column_name", image_column), ("label_column_name", label_column)):
        if col not in columns:
            raise ValueError(f"--{flag} {col!r} is not a column of the dataset; its columns are {columns}")
    data = data.select_columns([image_column, label_column])
    renames = {k: v for k, v in ((image_column, "image"), (label_column, "label")) if k != v}
    return data.rename_columns(renames) if renames else data


def as_class_labels(data: DatasetDict, flag: str = "--label_column_name") -> DatasetDict:
    """The ``label`` column as a ``ClassLabel``: integer class ids keep their value (names "0", "1", ...), class
    names (strings) are numbered in sorted order, over all splits; anything else is refused, naming the column."""
    feature = data["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return data
    dtype = getattr(feature, "dtype", None) if isinstance(feature, Value) else None
    values = set().union(*(data[split].unique("label") for split in data)) if dtype else set()
    if dtype and dtype.startswith(("int", "uint")) and min(values, default=0) >= 0:
        names = [str(i) for i in range(max(values, default=0) + 1)]
    elif dtype in ("string", "large_string"):
        names = sorted(values)
    else:
        raise ValueError(f"{flag}: the label column is {feature}; it must hold class ids (integers >= 0) or class "
                         "names (strings)")
    logger.info(f"label column: {len(names)} classes from its {dtype} values")
    return data.cast_column("label", ClassLabel(names=names))


def ensure_validation(data: DatasetDict, fraction: float, seed: int) -> DatasetDict:
    """Use the ``validation`` split, else ``test``, else hold out ``fraction`` of ``train`` (stratified when the
    data allows it, else at random as transformers' example, with a warning)."""
    if "validation" in data:
        return DatasetDict(train=data["train"], validation=data["validation"])
    if "test" in data:
        return DatasetDict(train=data["train"], validation=data["test"])
    try:
        split = data["train"].train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError as e:  # too few images per class to hold out every class
        logger.warning(f"--train_val_split {fraction}: a stratified split is impossible ({e}); holding out a random "
                       "subset instead (give --validation_dir to choose the validation images)")
        try:
            split = data["train"].train_test_split(test_size=fraction, seed=seed)
        except ValueError as e2:
            raise ValueError(f"--train_val_split {fraction} of {len(data['train'])} training images holds out "
                             f"nothing ({e2}): raise --train_val_split or give --validation_dir") from e2
    return DatasetDict(train=split["train"], validation=split["test"])


def unreadable_images(dataset, limit: int = 5) -> list[str]:
    """Files among ``dataset``'s images (a local imagefolder) that PIL cannot open: only their headers are read,
    so the check costs about as much as listing the folder did."""
    bad = []
    for item in dataset.cast_column("image", ImageFeature(decode=False))["image"]:
        try:
            with Image.open(item["path"]):
                pass
        except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
            bad.append(f"{item['path']} ({type(e).__name__})")
            if len(bad) >= limit:
                break
    return bad


def load_data(data_args: DataArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    """``train`` and ``validation`` splits with an ``image`` column and a ``label`` ClassLabel column."""
    if data_args.dataset_name:
        data = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, model_args.cache_dir,
                                model_args.token)
    elif data_args.train_dir:
        data = load_imagefolders(data_args.train_dir, data_args.validation_dir, model_args.cache_dir,
                                 data_args.label_column_name)
    else:
        data = embedded_dataset(data_args.shots_per_class, seed)
    data = standardise_columns(data, data_args.image_column_name, data_args.label_column_name)
    data = as_class_labels(data)
    data = ensure_validation(data, data_args.train_val_split, seed)
    if data_args.max_train_samples is not None:
        data["train"] = data["train"].shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(data["train"]))))
    if data_args.max_eval_samples is not None:
        n = min(data_args.max_eval_samples, len(data["validation"]))
        data["validation"] = data["validation"].shuffle(seed=seed).select(range(n))
    if data_args.train_dir:  # local files: an unreadable one would otherwise stop training midway
        bad = [path for split in data.values() for path in unreadable_images(split)]
        if bad:
            raise ValueError(f"--train_dir/--validation_dir: cannot read {'these images' if len(bad) > 1 else 'the image'}"
                             f" {', '.join(bad)}; remove or replace {'them' if len(bad) > 1 else 'it'}")
    return data


# ---------------------------------------------------------------------------------------------- transforms
def _size_entry(size, key):
    return size.get(key) if hasattr(size, "get") else getattr(size, key, None)


def processor_sizes(processor, override: int | None) -> tuple[int | tuple[int, int], tuple[int, int]]:
    """``(resize, crop)``: evaluation resizes to ``resize`` (an int: the shorter edge) then centre-crops ``crop``;
    training crops ``crop``. ``override`` sets both. Else from the processor's ``size`` and ``crop_size``."""
    if override:
        return override, (override, override)
    found = {}
    for attr in ("size", "crop_size"):
        size = getattr(processor, attr, None)
        if isinstance(size, int):
            found[attr] = size
        elif size is not None and _size_entry(size, "height") and _size_entry(size, "width"):
            found[attr] = (_size_entry(size, "height"), _size_entry(size, "width"))
        elif size is not None and _size_entry(size, "shortest_edge"):
            found[attr] = _size_entry(size, "shortest_edge")
    if not found:
        raise ValueError(f"cannot tell the image size of {type(processor).__name__}; pass --image_size")
    resize = found.get("size", found.get("crop_size"))
    crop = found.get("crop_size", resize)
    return resize, ((crop, crop) if isinstance(crop, int) else crop)


def build_transforms(processor, resize, crop: tuple[int, int], augment: tuple[str, ...],
                     min_crop_scale: float) -> tuple[v2.Compose, v2.Compose]:
    """Train and eval torchvision pipelines that end in the processor's normalisation (as transformers' example)."""
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    normalize = [v2.Normalize(mean=mean, std=std)] if getattr(processor, "do_normalize", True) and mean else []
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    train = [v2.RandomResizedCrop(crop, scale=(min_crop_scale, 1.0), antialias=True) if "crop" in augment
             else v2.Resize(crop, antialias=True)]
    if "flip" in augment:
        train.append(v2.RandomHorizontalFlip())
    evaluation = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    return v2.Compose([*train, *to_tensor, *normalize]), v2.Compose([*evaluation, *to_tensor, *normalize])


def batch_transform(pipeline: v2.Compose):
    """A ``datasets.with_transform`` function: PIL images -> ``pixel_values`` tensors, ``label`` -> ``labels``."""
    def apply(batch):
        pixels = [pipeline(image.convert("RGB")) for image in batch["image"]]
        return {"pixel_values": pixels, "labels": batch["label"]}
    return apply


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


# ---------------------------------------------------------------------------------------------- metrics
# accuracy (+ top-5 beyond 5 classes) through `evaluate` modules shipped with hf_freeze (offline; the Hub's
# evaluate.load("accuracy") gives the same accuracy where the Hub is reachable)
compute_metrics = classification_metrics


# ---------------------------------------------------------------------------------------------- model
def resolve_model_path(model_args: ModelArguments, training_args, seed: int) -> str:
    """``--model_name_or_path``, or the embedded digits ResNet (pretrained once, on the main process first)."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    from hf_freeze.demo.pretrain import pretrained_base

    with training_args.main_process_first(desc="pretraining the embedded base"):
        return str(pretrained_base(seed=seed))


def load_model(path: str, model_args: ModelArguments, labels: list[str]):
    """The model with a head for ``labels`` (a new head when they differ from the checkpoint's)."""
    config = AutoConfig.from_pretrained(
        model_args.config_name or path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, finetuning_task="image-classification",
        cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code)
    if model_args.model_type and config.model_type != model_args.model_type:
        raise ValueError(f"--model_type {model_args.model_type} but {model_args.config_name or path} is a "
                         f"{config.model_type!r} model")
    return AutoModelForImageClassification.from_pretrained(
        path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)


def default_augment(data_args: DataArguments) -> str:
    """The augmentation when ``--augment`` is not given: the digits' own, else transformers' example's."""
    return EMBEDDED_AUGMENT if data_args.embedded else "crop,flip"


def apply_embedded_defaults(data_args: DataArguments, training_args: FreezeTrainingArguments) -> None:
    """The digits task's own defaults for what the command line left unset (policy, augmentation)."""
    if data_args.embedded and training_args.freeze_policy() is None:
        training_args.freeze = EMBEDDED_POLICY.freeze
        training_args.unfreeze = ",".join(u.to_string() for u in EMBEDDED_POLICY.unfreeze)
        training_args.layer_lr_decay = EMBEDDED_POLICY.layer_lr_decay
    if data_args.augment is None:
        data_args.augment = default_augment(data_args)
    if data_args.min_crop_scale is None:
        data_args.min_crop_scale = EMBEDDED_MIN_CROP_SCALE if data_args.embedded else 0.08


# ---------------------------------------------------------------------------------------------- outputs
def write_freeze_outputs(trainer: FreezeTrainer, output_dir: str) -> hf_freeze.FreezeReport:
    """``freeze_report.txt``/``.md`` and ``freeze_events.json`` (the unfreeze events as they happened)."""
    report = hf_freeze.freeze_report(trainer.model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "freeze_report.txt").write_text(str(report) + "\n")
    (out / "freeze_report.md").write_text(report.to_markdown() + "\n")
    (out / "freeze_events.json").write_text(json.dumps(trainer.freeze_callback.events_log, indent=2) + "\n")
    return report


def card_kwargs(model_args: ModelArguments, data_args: DataArguments, model_path: str) -> dict:
    """Arguments for ``trainer.create_model_card`` / ``trainer.push_to_hub``."""
    display = data_args.dataset_name or ("a local imagefolder" if data_args.train_dir
                                         else "scikit-learn digits 5-9 (hf_freeze's embedded task)")
    kwargs = {"finetuned_from": model_path, "tasks": "image-classification", "tags": ["image-classification", "hf_freeze"],
              "dataset_tags": data_args.dataset_name}
    # ---- MODEL CARD HOOK (issue 5) ---------------------------------------------------------------
    # With hf_freeze's card (hf_freeze.write_model_card, hf_freeze/model_card.py), FreezeTrainer.create_model_card
    # renders it: freeze report, unfreeze events and the training-curve plot; its CardConfig takes the display
    # name as ``dataset_name`` and only a Hub id as ``dataset``. Without it, transformers' card is written.
    if hasattr(hf_freeze, "write_model_card"):
        kwargs["dataset_name"] = display
    else:
        kwargs["dataset"] = display
    return kwargs


# ---------------------------------------------------------------------------------------------- main
class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line, ``prog: error: message``, exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}{argparse_hint(message)}\n")

    def unknown_flags(self, remaining: list[str]) -> str:
        known = list(self._option_string_actions)  # argparse's table of flags
        hints = "".join(flag_hint(f, known) for f in remaining if f.startswith("--"))
        return f"unrecognized arguments: {' '.join(remaining)}{hints}"


#: flags naming a path, a model, a policy value...: an empty value (``--train_dir "$DATA"`` with DATA unset) is
#: refused rather than read as "not given", which would silently run the embedded default task/base/policy
NON_EMPTY_FLAGS = frozenset({f.name for cls in (ModelArguments, DataArguments, FreezeArguments, DeltaArguments)
                             for f in fields(cls)} | {"output_dir", "resume_from_checkpoint", "logging_dir"})


def read_args_file(path: str, parser: HfArgumentParser) -> dict:
    """The values of an ``args.json``, with unknown keys and wrongly typed values refused (ValueError naming them):
    ``HfArgumentParser.parse_json_file`` would pass ``"3"`` or ``"abc"`` for a number to the dataclasses unchecked."""
    values = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of argument names and values, got {type(values).__name__}")
    problems = json_value_problems(parser.dataclass_types, values)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return values


def report_to_problems(report_to) -> list[str]:
    """``--report_to`` names transformers knows and whose package is installed (the Trainer would refuse an unknown
    one only after loading the data and the model, and a missing package with a traceback)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    problems, available = [], get_available_reporting_integrations()
    for name in report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(unknown_choice("--report_to", name, ["all", "none", *INTEGRATION_TO_CALLBACK]))
        elif name not in available:
            try:  # not found installed: the callback's constructor says which package it needs (and does nothing else)
                INTEGRATION_TO_CALLBACK[name]()
            except (RuntimeError, ImportError) as e:
                problems.append(f"--report_to {name}: {one_line(e)}")
    return problems


def feature_cache_problems(data_args: DataArguments, training_args) -> list[str]:
    """A forced feature cache (``memory``/``disk``) computes each training image's features once, so it cannot
    follow this script's random augmentation (on by default); ``auto`` turns itself off where it would differ."""
    problems = []
    if training_args.feature_cache in ("memory", "disk"):
        augment = data_args.augment if data_args.augment is not None else default_augment(data_args)
        if parse_augment(augment):
            default = "" if data_args.augment is not None else " (the default)"
            problems.append(f"--feature_cache {training_args.feature_cache} computes each training image's features "
                            f"once, but --augment {augment!r}{default} changes the images every epoch: add --augment "
                            "none, or use --feature_cache auto (it is used only where it gives the same training)")
    folder = training_args.feature_cache_dir
    if folder and Path(folder).exists() and not Path(folder).is_dir():
        problems.append(f"--feature_cache_dir {folder!r} is a file; give a folder")
    return problems


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args)``; every check that needs no model runs here (ValueError)."""
    parser = ArgumentParser((ModelArguments, DataArguments, FreezeTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        values = read_args_file(os.path.abspath(sys.argv[1]), parser)
        model_args, data_args, training_args = parser.parse_dict(values)
        given = set(values)
    else:
        argv = sys.argv[1:] if argv is None else argv
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if remaining:
            raise ValueError(parser.unknown_flags(remaining))
        model_args, data_args, training_args = parsed
        given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if not given & {"do_train", "do_eval", "do_predict"}:  # none given: train, and evaluate (as before)
        training_args.do_train = training_args.do_eval = True
    problems = [f"--{name} is empty (an unset shell variable?): give a value or leave the flag out"
                for name in sorted(given & NON_EMPTY_FLAGS)
                if any(getattr(args, name, None) == "" for args in (model_args, data_args, training_args))]
    resume = training_args.resume_from_checkpoint
    if resume and not Path(resume).is_dir():
        problems.append(f"--resume_from_checkpoint {resume!r} is not a folder (give a checkpoint-N folder)")
    problems += training_number_problems(training_args)
    problems += report_to_problems(training_args.report_to)
    problems += feature_cache_problems(data_args, training_args)
    if problems:
        raise ValueError("; ".join(problems))
    return model_args, data_args, training_args


def setup_logging(training_args) -> None:
    """As transformers' example: INFO on the main process (``--log_level`` to change), WARNING on the others;
    with ``TRANSFORMERS_VERBOSITY`` set (and ``--log_level`` not given) the main process keeps that level."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log and not os.environ.get("TRANSFORMERS_VERBOSITY"):
        transformers.utils.logging.set_verbosity_info()  # log_level "passive" means INFO here, as upstream
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)  # hf_freeze's messages follow it
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # transformers lets its records reach the root logger too when the CI variable is set (CI=true on most CI
    # machines): with the root handler above, every line would print twice
    transformers.utils.logging.disable_propagation()


def prepare(model_args: ModelArguments, data_args: DataArguments, training_args: FreezeTrainingArguments):
    """Data, model, policy check and the FreezeTrainer: everything before training. Returns (trainer, model_path)."""
    apply_embedded_defaults(data_args, training_args)
    training_args.remove_unused_columns = False  # the transforms need the raw image column
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading the dataset"):
        data = load_data(data_args, model_args, training_args.seed)
    labels: list[str] = data["train"].features["label"].names
    model_path = resolve_model_path(model_args, training_args, training_args.seed)
    processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_path, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code)
    model = load_model(model_path, model_args, labels)  # FreezeTrainer checks the policy against it first

    resize, crop = processor_sizes(processor, data_args.image_size)
    train_tf, eval_tf = build_transforms(processor, resize, crop, parse_augment(data_args.augment),
                                         data_args.min_crop_scale)
    train_set = data["train"].with_transform(batch_transform(train_tf))
    eval_set = data["validation"].with_transform(batch_transform(eval_tf))
    logger.info(f"Model: {model_path} -> {len(labels)} labels; data: {len(train_set)} train / {len(eval_set)} "
                f"validation images at {crop[0]}x{crop[1]} px; augmentation: {data_args.augment}")
    trainer = FreezeTrainer(model=model, args=training_args, train_dataset=train_set if training_args.do_train else None,
                            eval_dataset=eval_set if training_args.do_eval else None, data_collator=collate,
                            compute_metrics=compute_metrics, processing_class=processor)
    return trainer, model_path


def train_and_save(trainer: FreezeTrainer, model_args, data_args, training_args, model_path: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)  # as transformers' example: resume
            if checkpoint:
                logger.info(f"Checkpoint detected, resuming training at {checkpoint}.")
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_predict:
        logger.warning("--do_predict: this script has no test split to predict on (as transformers' example); ignored")

    if training_args.should_save:
        report = write_freeze_outputs(trainer, training_args.output_dir)
        logger.info(f"hf_freeze: freeze policy at the end of training:\n{report}")
        trainer.create_model_card(**card_kwargs(model_args, data_args, model_path))
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs(model_args, data_args, model_path))
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """The whole run; bad input raises (ValueError, OSError, FreezePolicyError) before anything is written."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    trainer, model_path = prepare(model_args, data_args, training_args)
    return train_and_save(trainer, model_args, data_args, training_args, model_path)


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: bad input (found before training starts) is one line on stderr, exit code 2;
    ``HF_FREEZE_DEBUG=1`` shows the traceback instead."""
    prog = os.path.basename(sys.argv[0]) or "finetune_image_classification.py"
    try:
        model_args, data_args, training_args = parse_args(argv)
        setup_logging(training_args)
        trainer, model_path = prepare(model_args, data_args, training_args)
    except (ValueError, OSError) as e:  # FreezePolicyError, UnsupportedModelError, missing files, Hub errors
        if debug_enabled():
            raise
        print(f"{prog}: error: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    train_and_save(trainer, model_args, data_args, training_args, model_path)
    return 0


def close_process_group() -> None:
    """Under torchrun/accelerate: sync and close the process group (gloo can abort at exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    code = cli()
    close_process_group()
    sys.exit(code)
