"""``hf-freeze inspect`` as a user runs it: a real subprocess through the installed console script or module."""

import json
import subprocess
import sys

import pytest
from helpers import MOBILENET_V2


def run(*args):
    return subprocess.run([sys.executable, "-m", "hf_freeze.cli", *args], capture_output=True, text=True, timeout=600)


def test_inspect_tiny_type_previews_a_policy():
    out = run("inspect", "tiny:swin", "--policy", "freeze=stem:stage.0;unfreeze=epoch2:stage.0@0.1")
    assert out.returncode == 0, out.stderr
    assert "SwinForImageClassification, 5 groups (from table)" in out.stdout
    assert "frozen (until epoch 2)" in out.stdout and "Trainable params:" in out.stdout


def test_inspect_json_lists_groups():
    out = run("inspect", "tiny:resnet", "--freeze", "2", "--json")
    data = json.loads(out.stdout)
    assert [g["name"] for g in data["groups"]] == ["stem", "stage.0", "stage.1", "head"]
    assert [r["state"] for r in data["report"]["rows"]] == ["frozen", "frozen", "trainable", "trainable"]


def test_inspect_local_folder_reads_only_the_config():
    if not MOBILENET_V2.is_dir():
        pytest.skip(f"{MOBILENET_V2} absent")
    out = run("inspect", str(MOBILENET_V2))
    assert out.returncode == 0, out.stderr
    assert "28 groups" not in out.stdout and "19 groups (from table)" in out.stdout
    assert "Total params: 3,506,153" in out.stdout


@pytest.mark.parametrize("args,words", [
    (("inspect", "tiny:deit", "--freeze", "stage.9"), "matches no group"),
    (("inspect", "tiny:nosuchtype"), "unknown tiny model type 'nosuchtype'; known: beit, bit, clip,"),
    (("inspect", "tiny:shieldgemma2"), "not a pixel_values -> labels classifier"),
])
def test_inspect_errors_are_one_clear_line(args, words):
    out = run(*args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("hf-freeze inspect: error: ")


LAZY = ("peft", "datasets", "optuna", "matplotlib", "timm", "evaluate")


@pytest.mark.parametrize("code", [
    "import hf_freeze",
    "import sys; sys.argv = ['hf-freeze', '--help']\nimport runpy\ntry:\n    runpy.run_module('hf_freeze.cli', run_name='__main__')\nexcept SystemExit:\n    pass",
    "from hf_freeze import FreezePolicy, FreezeReport, layer_groups, apply_policy",
])
def test_optional_heavy_packages_stay_lazy(code):
    """``import hf_freeze``, ``hf-freeze --help`` and the core API load none of the optional packages
    (benchmarks/import_time.py measures the time)."""
    report = f"\nimport sys; print(sorted(m for m in {LAZY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
