"""Bad input as a user meets it: one line (argparse style), exit code 2, no traceback, nothing created.

The command-line cases run in a subprocess, as a user runs them. What needs no model is refused while the
arguments are parsed: no dataset is read (its ``--cache_dir`` stays absent), no model is loaded or pretrained
(``HF_FREEZE_CACHE`` stays absent) and no ``--output_dir`` is created. What needs the model (a group it does
not have) is refused by ``FreezeTrainer.__init__`` / ``FreezeCallback.__init__`` before the Trainer creates
``output_dir``, or the Trainer's new, empty ``output_dir`` is removed again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TinyImages, training_args
from PIL import Image
from transformers import Trainer, TrainingArguments

import hf_freeze
from hf_freeze.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_image_classification.py"
PROG = "finetune_image_classification.py: error: "


def env(tmp_path: Path, **extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "HF_FREEZE_DEBUG"}
    return {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_FREEZE_CACHE": str(tmp_path / "hf_freeze_cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


#: lines other packages print while transformers.trainer is imported, whatever the command line: bitsandbytes
#: (imported by peft, which transformers.trainer imports) logs this on CPUs with AVX512-BF16 without `kernels`
THIRD_PARTY_NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The single stderr line of a refused command (asserting exit code 2 and no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(THIRD_PARTY_NOISE)]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny imagefolder (two classes, two PNGs each): real input the script would load if it got that far."""
    root = tmp_path_factory.mktemp("images")
    for label, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (root / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(root / label / f"{i}.png")
    return root


# ------------------------------------------------------------------ the example script, in a subprocess
@pytest.mark.parametrize("argv, words", [
    (["--freeze", "backbon"], "freeze selector 'backbon' is neither a keyword (backbone, none) nor a group name "
                              "(did you mean 'backbone'?)"),
    (["--unfreeze", "epoch-1"], "cannot parse unfreeze event 'epoch-1'"),
    (["--adapter", "lorra"], "method='lorra': expected one of ['loha', 'lokr', 'lora'] (did you mean 'lora'?)"),
    (["--learning_rate", "abc"], "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
    (["--frezee", "backbone"], "unrecognized arguments: --frezee backbone (did you mean '--freeze'?)"),
])
def test_example_refuses_bad_flags_in_one_line_before_loading_anything(tmp_path, images, argv, words):
    out, data_cache = tmp_path / "out", tmp_path / "datasets_cache"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--train_dir", str(images), "--cache_dir", str(data_cache),
                           "--output_dir", str(out), "--use_cpu", "--report_to", "none", *argv],
                          capture_output=True, text=True, timeout=600, env=env(tmp_path), cwd=tmp_path)
    line = one_error_line(proc, PROG)
    assert words in line, line
    assert not out.exists() and not data_cache.exists() and not (tmp_path / "hf_freeze_cache").exists()


def test_example_debug_variable_shows_the_traceback(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out), "--adapter", "lorra"],
                          capture_output=True, text=True, timeout=600, env=env(tmp_path, HF_FREEZE_DEBUG="1"),
                          cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "FreezePolicyError: invalid AdapterConfig: method='lorra'" in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------ the example's checks, in process (same code path)
@pytest.fixture(scope="module")
def example():
    from test_example_script import load_example

    return load_example()


@pytest.mark.parametrize("argv, words", [
    (["--unfreeze", "epoch2:stag.1"], "'stag.1' is not a layer-group name (did you mean 'stage.1'?)"),
    (["--unfreeze", "epoch5:1", "--num_train_epochs", "3"], "unfreeze 'epoch5:1' would never happen: training "
                                                            "stops after num_train_epochs=3"),
    (["--unfreeze", "step50:1", "--max_steps", "50"], "unfreeze 'step50:1' would never happen"),
    (["--feature_cache", "memroy"], "--feature_cache 'memroy' is not valid (did you mean 'memory'?); valid: auto, "
                                    "off, memory, disk"),
    (["--freeze", "stem,none"], "freeze selector 'none' is a keyword and stands alone"),
    (["--freeze_policy_file", "/no/such/freeze_policy.json"], "no freeze_policy.json at /no/such/freeze_policy.json"),
    (["--lora_r", "4"], "--lora_r given without --adapter"),
    (["--model_name_or_path", "./no/such/model"], "--model_name_or_path: no such folder: './no/such/model'"),
    (["--model_type", "vitt", "--model_name_or_path", "org/model"], "--model_type 'vitt' is not an "
                                                                    "image-classification model type (did you mean 'vit'?)"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-5"], "--resume_from_checkpoint '/no/such/checkpoint-5' is "
                                                            "not a folder"),
    (["--augment", "rotate"], "--augment 'rotate': unknown ['rotate']"),
])
def test_example_checks_what_needs_no_model_while_parsing(tmp_path, example, argv, words):
    with pytest.raises(ValueError) as err:
        example.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", *argv])
    assert words in str(err.value)
    assert not (tmp_path / "out").exists()


def test_policy_file_and_policy_flags_together_are_refused(tmp_path, example):
    hf_freeze.FreezePolicy(freeze=1).save_pretrained(tmp_path / "policy")
    with pytest.raises(hf_freeze.FreezePolicyError, match="--freeze_policy_file sets the whole policy, so --freeze, "
                                                          "--train_bn would be ignored"):
        example.parse_args(["--output_dir", str(tmp_path / "out"), "--freeze_policy_file", str(tmp_path / "policy"),
                            "--freeze", "2", "--train_bn"])


# ------------------------------------------------------------------ hf-freeze, in a subprocess
def hf_freeze_cli(tmp_path, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_freeze.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env(tmp_path, **extra_env), cwd=tmp_path)


def test_inspect_bad_models_are_one_line(tmp_path):
    (tmp_path / "no_config").mkdir()
    cases = {
        ("inspect", str(tmp_path / "missing")): f"no such folder: '{tmp_path / 'missing'}'",
        ("inspect", str(tmp_path / "no_config")): "is a folder without config.json, not a saved model",
        ("inspect", "tiny:vitt"): "unknown tiny model type 'vitt' (did you mean 'vit'?); known: beit, bit, clip,",
        ("inspect", "tiny:resnet", "--freeze", "backbon"): "freeze selector 'backbon' is neither a keyword (backbone, "
                                                           "none) nor a group name (did you mean 'backbone'?)",
        ("inspect", "tiny:resnet", "--policy", "freeze=backbone;unfreeze=epoch2:stage.7"):
            "unknown group(s) ['stage.7']; groups are ['stem', 'stage.0', 'stage.1', 'head']",
        ("inspect", "tiny:resnet", "--jsn"): "unrecognized arguments: --jsn (did you mean '--json'?)",
    }
    for args, words in cases.items():
        line = one_error_line(hf_freeze_cli(tmp_path, *args), "hf-freeze")
        assert words in line and "\"" not in line, line  # no stray quotes around the valid names


def test_inspect_debug_shows_the_traceback(tmp_path, monkeypatch):
    proc = hf_freeze_cli(tmp_path, "inspect", "tiny:resnet", "--freeze", "stage.9", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "FreezePolicyError: freeze selector 'stage.9' matches no group" in proc.stderr
    from hf_freeze import cli

    args = cli.build_parser().parse_args(["--debug", "inspect", "tiny:resnet"])  # before or after the command
    assert args.debug and cli.debug_enabled(args)
    args = cli.build_parser().parse_args(["inspect", "tiny:resnet"])
    assert not args.debug and not cli.debug_enabled(args)
    monkeypatch.setenv("HF_FREEZE_DEBUG", "1")
    assert cli.debug_enabled(args)


def test_search_refuses_bad_choices_before_creating_anything(tmp_path):
    out = tmp_path / "search_out"
    cases = {
        ("--demo", "--schedules", "none,lat"): "argument --schedules: schedule 'lat' is not valid (did you mean "
                                               "'late'?); valid: none, early, late, gradual, at:F1+F2",
        ("--demo", "--schedules", "at:0.7+0.2"): "unknown schedule 'at:0.7+0.2'; valid: none, early, late, gradual, "
                                                 "or 'at:F1+F2+...'",
        ("--demo", "--freeze_choices", "backbon"): "freeze choice 'backbon' is not valid (did you mean 'backbone'?); "
                                                   "valid: backbone, half, none, N (a group count)",
        ("--demo", "--reach", "most"): "reach 'most' is not valid; valid: half, all, N (a group count)",
        ("--demo", "--layer_lr_decays", "none,1.5"): "layer_lr_decay must be in (0, 1] or none, got '1.5'",
        ("--demo", "--budget_steps", "0"): "argument --budget_steps: must be >= 1, got '0'",
        ("--demo", "--tolerance", "0.01"): "--tolerance picks the most retentive trial among the near-best ones: "
                                           "give --retention_dir",
        ("--demo", "--lr_scales", "1,-0.1"): "argument --lr_scales: must be > 0, got '-0.1'",
        ("--demo", "--n_trials", "0"): "argument --n_trials: must be >= 1, got '0'",
        ("--demo", "--train_dir", str(tmp_path)): "--demo trains on the embedded digits task; drop --train_dir",
        ("--model", "tiny:resnet", "--train_dir", str(tmp_path), "--validation_dir", str(tmp_path)):
            "'tiny:resnet' is a random tiny model; this needs pretrained weights",
        ("--train_dir", str(tmp_path),): "give --model, --train_dir and --validation_dir, or --demo",
    }
    for args, words in cases.items():
        line = one_error_line(hf_freeze_cli(tmp_path, "search", *args, "--output_dir", str(out)), "hf-freeze search: error:")
        assert words in line, line
    assert not out.exists() and not (tmp_path / "hf_freeze_cache").exists()


# ------------------------------------------------------------------ through the Trainer, in process
def test_freeze_trainer_refuses_an_unknown_group_before_creating_output_dir(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(hf_freeze.FreezePolicyError, match=r"freeze selector 'stag.1' matches no group and no "
                                                          r"parameter \(did you mean 'stage.1'\?\)") as err:
        hf_freeze.FreezeTrainer(model=tiny_model("resnet"), args=args, train_dataset=TinyImages(8),
                                freeze_policy="stem,stag.1")
    frames = [entry.name for entry in err.traceback]
    assert "_check_before_init" in frames and "call_event" not in frames  # from __init__, not via the callbacks
    assert not Path(args.output_dir).exists()


def test_freeze_callback_with_the_model_refuses_in_init(tmp_path):
    with pytest.raises(hf_freeze.FreezePolicyError, match="unknown group"):
        hf_freeze.FreezeCallback("freeze=backbone;unfreeze=epoch1:stage.5", model=tiny_model("resnet"))


def test_freeze_callback_alone_removes_only_the_output_dir_the_trainer_just_created(tmp_path):
    model = tiny_model("resnet")
    new = TrainingArguments(output_dir=str(tmp_path / "new"), use_cpu=True, report_to=[])
    with pytest.raises(hf_freeze.FreezePolicyError, match="matches no group"):
        Trainer(model=model, args=new, train_dataset=TinyImages(8), callbacks=[hf_freeze.FreezeCallback("stage.9")])
    assert not Path(new.output_dir).exists()  # the Trainer made it in __init__; it is gone again
    (tmp_path / "existing").mkdir()  # an empty folder the user made beforehand stays
    time.sleep(0.2)  # "beforehand": the callback tells the folders apart by their creation time
    callback = hf_freeze.FreezeCallback("stage.9")
    old = TrainingArguments(output_dir=str(tmp_path / "existing"), use_cpu=True, report_to=[])
    with pytest.raises(hf_freeze.FreezePolicyError):
        Trainer(model=model, args=old, train_dataset=TinyImages(8), callbacks=[callback])
    assert (tmp_path / "existing").is_dir()
