"""examples/finetune_image_classification.py end to end: real imagefolder data, a real pretrained base, a freeze
policy with an unfreeze, evaluation, the saved model + policy + card; one and two processes (accelerate launch).
Also a script shaped like transformers' run_image_classification.py with FreezeTrainer swapped in: its logging
shows the freeze report and the unfreeze events, and a bad policy fails before any output folder exists."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import identical
from transformers import AutoImageProcessor, AutoModelForImageClassification, EvalPrediction

import hf_freeze
from hf_freeze.demo import DEFAULT_POLICY
from hf_freeze.demo.data import transfer_task, write_imagefolder
from hf_freeze.demo.pretrain import pretrained_base, torch_threads

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_image_classification.py"
TRAIN_IMAGES, BATCH, EPOCHS = 50, 10, 4  # 5 classes x 10 shots; 5 steps per epoch in one process
POLICY = "epoch2:1@0.5"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_freeze_cache")


@pytest.fixture(scope="module")
def base(cache) -> Path:
    """The demo's real pretrained ResNet (digits 0-4), trained into a temporary cache (~5 s)."""
    return pretrained_base(cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Digits 5-9 as imagefolder PNGs: 10 training and 20 validation images per class."""
    root = tmp_path_factory.mktemp("digits")
    task = transfer_task(shots_per_class=10, seed=0, validation_per_class=20)
    return write_imagefolder(task["train"], root / "train"), write_imagefolder(task["validation"], root / "validation")


def cli_args(base: Path, folders, out: Path, *extra: str) -> list[str]:
    train, validation = folders
    return ["--model_name_or_path", str(base), "--train_dir", str(train), "--validation_dir", str(validation),
            "--output_dir", str(out), "--freeze", "backbone", "--unfreeze", POLICY,
            "--num_train_epochs", str(EPOCHS), "--per_device_train_batch_size", str(BATCH), "--learning_rate", "1e-2",
            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1", "--logging_steps", "1",
            "--augment", "crop", "--min_crop_scale", "0.85", "--report_to", "none", "--seed", "0", "--use_cpu",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra]


def env(cache: Path) -> dict:
    # CI=true (set on CI machines) makes transformers propagate its records to the root logger: the example script
    # must still log each line once, so its runs see it set whatever the machine
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "HF_FREEZE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForImageClassification.from_pretrained(path)
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def group_tensor_names(path: Path, group: str) -> list[str]:
    g = hf_freeze.layer_groups(AutoModelForImageClassification.from_pretrained(path))[group]
    return [*g.param_names, *g.buffer_names]


def check_saved_run(out: Path, base: Path) -> dict:
    """What every run must leave behind; returns all_results.json."""
    for name in ("model.safetensors", "config.json", "freeze_policy.json", "preprocessor_config.json", "README.md",
                 "freeze_report.txt", "freeze_report.md", "freeze_events.json", "all_results.json", "trainer_state.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    policy = hf_freeze.FreezePolicy.from_pretrained(out)
    assert policy == hf_freeze.FreezePolicy.from_string(f"freeze=backbone;unfreeze={POLICY}")
    assert json.loads((out / "config.json").read_text())["freeze_policy"] == policy.to_dict()
    assert [json.loads((c / "freeze_policy.json").read_text()) for c in out.glob("checkpoint-*")] == [policy.to_dict()]
    events = json.loads((out / "freeze_events.json").read_text())
    assert [(e["groups"], e["when"]) for e in events] == [(["stage.2"], "epoch 2")]
    # still-frozen groups are bit-identical to the pretrained base (BatchNorm buffers included); the rest trained
    before, after = state_of(base), state_of(out)
    for group in ("stem", "stage.0", "stage.1"):
        names = group_tensor_names(out, group)
        assert names and [n for n in names if not identical(before[n], after[n])] == [], group
    for group in ("stage.2",):
        assert any(not identical(before[n], after[n]) for n in group_tensor_names(out, group)), group
    assert after["classifier.1.weight"].shape == (5, before["classifier.1.weight"].shape[1])
    card = (out / "README.md").read_text()
    assert "hf_freeze" in card and base.name in card
    if hasattr(hf_freeze, "write_model_card"):  # hf_freeze's own card (issue 5): freeze report and plot
        assert (out / "training_curves.png").is_file() and "stage.2" in card
    return json.loads((out / "all_results.json").read_text())


def evaluate_saved(out: Path, validation: Path) -> float:
    """Accuracy of the saved model + processor on the validation folder, recomputed from the files alone."""
    from datasets import load_dataset

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    data = load_dataset("imagefolder", data_dir=str(validation), split="train")
    resize, crop = example.processor_sizes(processor, None)
    _, eval_tf = example.build_transforms(processor, resize, crop, (), 1.0)
    pixels = torch.stack([eval_tf(im.convert("RGB")) for im in data["image"]])
    with torch.no_grad(), torch_threads(1):
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert names == data.features["label"].names
    return float((predicted == torch.tensor(data["label"])).float().mean())


@pytest.mark.slow
def test_single_process_run_trains_evaluates_and_saves(tmp_path, base, folders, cache):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), *cli_args(base, folders, out)], capture_output=True,
                          text=True, timeout=900, env=env(cache), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = check_saved_run(out, base)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == EPOCHS * TRAIN_IMAGES // BATCH
    assert "top5_accuracy" not in json.dumps(results)  # 5 classes: top-5 would always be 1
    assert results["eval_accuracy"] > 0.4  # 5 classes: chance is 0.2
    # the reported accuracy is the saved model's: reload it from the files and evaluate again
    assert evaluate_saved(out, folders[1]) == pytest.approx(results["eval_accuracy"], abs=1e-6)
    check_freeze_logs(proc.stdout + proc.stderr)


def check_freeze_logs(output: str) -> None:
    """transformers' logging (INFO on the main process, as the example sets it up) shows the freeze report table
    once at the start of training and one line per unfreeze event."""
    start = output.split("hf_freeze: freeze policy at the start of training:")
    assert len(start) == 2, output[-3000:]
    table = start[1]
    assert "Freeze policy: freeze=backbone;unfreeze=epoch2:1@0.5" in table
    assert "group" in table and "trainable" in table and "frozen (until epoch 2)" in table
    assert output.count("hf_freeze: unfroze ") == 1
    assert "hf_freeze: unfroze stage.2 at epoch 2 (step 10, lr x0.5)" in output or \
        "hf_freeze: unfroze stage.2 at epoch 2 (step 6, lr x0.5)" in output  # two processes: 3 steps per epoch


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tmp_path, base, folders, cache):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(free_port()), str(SCRIPT), *cli_args(base, folders, out)]
    for _attempt in range(2):  # gloo occasionally aborts at process exit after the work is done
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(cache), cwd=tmp_path)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = check_saved_run(out, base)
    # two replicas share each epoch: ceil(50 / (10 x 2)) = 3 steps per epoch instead of 5
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == EPOCHS * math.ceil(TRAIN_IMAGES / 20)
    assert results["eval_accuracy"] > 0.3
    assert evaluate_saved(out, folders[1]) == pytest.approx(results["eval_accuracy"], abs=1e-6)
    check_freeze_logs(proc.stdout + proc.stderr)  # once: the main process logs, the other stays at WARNING


def test_embedded_default_runs_without_model_or_data(tmp_path, base, cache, monkeypatch):
    monkeypatch.setenv("HF_FREEZE_CACHE", str(cache))  # the fixture's base is the embedded default's
    out = tmp_path / "embedded"
    with torch_threads(1):
        # 7 epochs: the default policy's last unfreeze is at epoch 6 (a run too short for it is refused)
        metrics = example.main(["--output_dir", str(out), "--num_train_epochs", "7", "--learning_rate", "3e-3",
                                "--per_device_train_batch_size", "16", "--report_to", "none", "--use_cpu",
                                "--disable_tqdm", "true", "--save_strategy", "no", "--shots_per_class", "5"])
    policy = hf_freeze.FreezePolicy.from_pretrained(out)
    assert policy.to_string() == DEFAULT_POLICY
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["5", "6", "7", "8", "9"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["epoch"] == 7.0


@pytest.mark.parametrize("argv, message", [
    (["--augment", "crop,rotate"], r"--augment 'crop,rotate': unknown \['rotate'\]; valid: 'none' or"),
    (["--dataset_name", "beans", "--train_dir", "."], "give either --dataset_name or --train_dir"),
    (["--validation_dir", "."], "--validation_dir needs --train_dir"),
    (["--train_dir", "/nonexistent/folder"], "'/nonexistent/folder' is not a folder"),
    (["--train_val_split", "1.5"], "--train_val_split must be between 0 and 1"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, argv, message):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        example.main(["--output_dir", str(out), "--use_cpu", "--report_to", "none", *argv])
    assert not out.exists()


def test_hub_dataset_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    out = tmp_path / "never"
    with pytest.raises(ConnectionError, match=r"could not load --dataset_name 'beans' .* --train_dir DIR"):
        example.main(["--dataset_name", "beans", "--output_dir", str(out), "--use_cpu", "--report_to", "none"])
    assert not out.exists()


def test_unknown_columns_and_groups_are_named(tmp_path, folders, base):
    train, validation = folders
    common = ["--model_name_or_path", str(base), "--train_dir", str(train), "--validation_dir", str(validation),
              "--use_cpu", "--report_to", "none"]
    with pytest.raises(ValueError, match=r"--label_column_name 'labels' is not a column .*\['image', 'label'\]"):
        example.main([*common, "--output_dir", str(tmp_path / "a"), "--label_column_name", "labels"])
    with pytest.raises(hf_freeze.FreezePolicyError, match="stage.9"):
        example.main([*common, "--output_dir", str(tmp_path / "b"), "--freeze", "stem,stage.9"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_metrics_accuracy_and_top5():
    labels = np.array([0, 1, 2, 3])
    logits = np.zeros((4, 7), dtype=np.float32)
    logits[0, 0] = 9                            # right
    logits[1, [0, 2, 3, 4, 1]] = [9, 8, 7, 6, 5]  # label 1 ranks 5th: in the top 5, not top 1
    logits[2, [0, 1, 3, 4, 5]] = [9, 8, 7, 6, 5]  # label 2 ranks 6th: outside the top 5
    logits[3, 3] = 9                            # right
    got = example.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert got == {"accuracy": 0.5, "top5_accuracy": 0.75}
    five = example.compute_metrics(EvalPrediction(predictions=logits[:, :5], label_ids=labels))
    assert five == {"accuracy": 0.5}


def test_processor_sizes_follow_transformers_example():
    from transformers import MobileNetV2ImageProcessor, ViTImageProcessor

    mobilenet = MobileNetV2ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    assert example.processor_sizes(mobilenet, None) == (256, (224, 224))
    assert example.processor_sizes(ViTImageProcessor(size={"height": 32, "width": 48}), None) == ((32, 48), (32, 48))
    assert example.processor_sizes(mobilenet, 96) == (96, (96, 96))
    train_tf, eval_tf = example.build_transforms(mobilenet, 256, (224, 224), ("crop", "flip"), 0.08)
    from PIL import Image

    image = Image.new("RGB", (300, 260), (255, 0, 0))
    for tf in (train_tf, eval_tf):
        x = tf(image)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert torch.allclose(x[0], torch.ones(224, 224)) and torch.allclose(x[1], -torch.ones(224, 224))  # (v-.5)/.5


def test_unknown_group_is_one_line_and_leaves_no_output_dir(tmp_path, base, folders, cache):
    """A group the model lacks needs the model: refused after loading it, before FreezeTrainer creates --output_dir."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), *cli_args(base, folders, out), "--freeze", "stem,stag.1"],
                          capture_output=True, text=True, timeout=900, env=env(cache), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("finetune_image_classification.py: error: freeze selector "
                                                          "'stag.1' matches no group and no parameter (did you mean "
                                                          "'stage.1'?); groups are ['stem', 'stage.0',"), errors
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- upstream's shape
# transformers' examples/pytorch/image-classification/run_image_classification.py is not in the pip package; this
# is its structure cut down (argument dataclasses + HfArgumentParser, its logging set-up, imagefolder data, torchvision
# transforms, an `evaluate` accuracy), with hf_freeze's three-line change: import FreezeTrainer and
# FreezeTrainingArguments, parse FreezeTrainingArguments, build a FreezeTrainer.
UPSTREAM_SHAPED = """
import logging, os, sys
from dataclasses import dataclass

import evaluate
import numpy as np
import torch
import transformers
from datasets import load_dataset
from torchvision.transforms import CenterCrop, Compose, Normalize, RandomResizedCrop, Resize, ToTensor
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

from hf_freeze import FreezeTrainer, FreezeTrainingArguments  # hf_freeze: 1. the imports
from hf_freeze.metrics import ACCURACY

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    train_dir: str | None = None
    validation_dir: str | None = None
    image_column_name: str = "image"
    label_column_name: str = "label"


@dataclass
class ModelArguments:
    model_name_or_path: str = "google/vit-base-patch16-224-in21k"
    ignore_mismatched_sizes: bool = False


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FreezeTrainingArguments))  # 2. the arguments
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    files = {"train": os.path.join(data_args.train_dir, "**"), "validation": os.path.join(data_args.validation_dir, "**")}
    dataset = load_dataset("imagefolder", data_files=files)
    labels = dataset["train"].features[data_args.label_column_name].names
    metric = evaluate.load(ACCURACY)  # upstream: evaluate.load("accuracy"), which needs the Hub

    def compute_metrics(p):
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(labels),
                                        label2id={l: str(i) for i, l in enumerate(labels)},
                                        id2label={str(i): l for i, l in enumerate(labels)},
                                        finetuning_task="image-classification")
    model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    size = image_processor.size
    size = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_tf = Compose([RandomResizedCrop(size, scale=(0.85, 1.0)), ToTensor(), normalize])
    val_tf = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transforms(tf):
        def apply(batch):
            batch["pixel_values"] = [tf(im.convert("RGB")) for im in batch[data_args.image_column_name]]
            return batch
        return apply

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e[data_args.label_column_name] for e in examples])}

    dataset["train"].set_transform(transforms(train_tf))
    dataset["validation"].set_transform(transforms(val_tf))
    trainer = FreezeTrainer(model=model, args=training_args, train_dataset=dataset["train"],  # 3. the Trainer
                            eval_dataset=dataset["validation"], compute_metrics=compute_metrics,
                            processing_class=image_processor, data_collator=collate_fn)
    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
"""


def upstream_args(base: Path, folders, out: Path, *extra: str) -> list[str]:
    train, validation = folders
    return ["--model_name_or_path", str(base), "--train_dir", str(train), "--validation_dir", str(validation),
            "--output_dir", str(out), "--remove_unused_columns", "False", "--do_train", "--do_eval",
            "--learning_rate", "1e-2", "--num_train_epochs", str(EPOCHS), "--per_device_train_batch_size", str(BATCH),
            "--eval_strategy", "epoch", "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--use_cpu",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra]


@pytest.mark.slow
def test_upstream_shaped_script_logs_the_policy_and_refuses_bad_groups_early(tmp_path, base, folders, cache):
    script = tmp_path / "run_image_classification.py"
    script.write_text(UPSTREAM_SHAPED)
    data_cache = tmp_path / "datasets_cache"
    # upstream's logging set-up prints every transformers line twice when CI=true (transformers propagates to the
    # root handler the script adds): that is upstream's behaviour, not hf_freeze's, so this run goes without it
    run_env = {**env(cache), "HF_DATASETS_CACHE": str(data_cache), "CI": ""}

    def run(out, *extra):
        return subprocess.run([sys.executable, str(script), *upstream_args(base, folders, out, *extra)],
                              capture_output=True, text=True, timeout=900, env=run_env, cwd=tmp_path)

    # a typo of a keyword: refused while parsing, before the dataset is read or a folder is made
    proc = run(tmp_path / "typo", "--freeze", "backbon")
    assert proc.returncode == 1 and proc.stderr.rstrip().splitlines()[-1] == (
        "hf_freeze.errors.FreezePolicyError: freeze selector 'backbon' is neither a keyword (backbone, none) nor a "
        "group name (did you mean 'backbone'?)")
    assert not (tmp_path / "typo").exists() and not data_cache.exists()
    # a group this model lacks: FreezeTrainer.__init__ raises before the Trainer creates --output_dir
    proc = run(tmp_path / "missing", "--freeze", "stem,stage.9")
    assert proc.returncode == 1 and "FreezePolicyError: freeze selector 'stage.9' matches no group" in proc.stderr
    assert "_check_before_init" in proc.stderr and "on_init_end" not in proc.stderr and "call_event" not in proc.stderr
    assert not (tmp_path / "missing").exists()
    # default flags (no --log_level): the freeze report and the unfreeze event are logged on the main process
    proc = run(tmp_path / "ok", "--freeze", "backbone", "--unfreeze", POLICY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_freeze_logs(proc.stdout + proc.stderr)
    assert "eval_accuracy" in json.loads((tmp_path / "ok" / "eval_results.json").read_text())


#: the flags of transformers' run_image_classification.py besides TrainingArguments' (its ModelArguments and
#: DataTrainingArguments), with values that parse offline
UPSTREAM_FLAGS = {
    "model": ["--model_type", "resnet", "--config_name", "{base}", "--cache_dir", "{tmp}/cache", "--model_revision",
              "main", "--image_processor_name", "{base}", "--token", "hf_dummy", "--trust_remote_code", "False",
              "--ignore_mismatched_sizes", "True"],
    "data": ["--train_val_split", "0.2", "--max_train_samples", "8", "--max_eval_samples", "4",
             "--image_column_name", "image", "--label_column_name", "label"],
}


def test_accepts_every_flag_of_run_image_classification(tmp_path, base, folders):
    train, validation = folders
    common = [a.format(base=base, tmp=tmp_path) for a in UPSTREAM_FLAGS["model"] + UPSTREAM_FLAGS["data"]]
    training = ["--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--remove_unused_columns", "False",
                "--eval_strategy", "epoch", "--use_cpu", "--report_to", "none"]
    local = ["--model_name_or_path", str(base), "--train_dir", str(train), "--validation_dir", str(validation)]
    model_args, data_args, training_args = example.parse_args([*local, *common, *training])
    assert (model_args.model_type, model_args.config_name, data_args.max_eval_samples) == ("resnet", str(base), 4)
    assert training_args.do_train and training_args.do_eval and not training_args.remove_unused_columns
    hub = ["--model_name_or_path", "google/vit-base-patch16-224-in21k", "--dataset_name", "beans",
           "--dataset_config_name", "default"]
    model_args, data_args, _ = example.parse_args([*hub, *common, *training])  # parsing loads nothing
    assert (data_args.dataset_name, data_args.dataset_config_name) == ("beans", "default")
    # --do_eval alone evaluates without training, as upstream; no do_* flag at all: train and evaluate
    _, _, only_eval = example.parse_args([*local, "--output_dir", str(tmp_path / "o"), "--do_eval"])
    assert only_eval.do_eval and not only_eval.do_train
    _, _, default = example.parse_args([*local, "--output_dir", str(tmp_path / "o")])
    assert default.do_train and default.do_eval
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
