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
    (("inspect", "tiny:nosuchtype"), "no tiny config for 'nosuchtype'"),
    (("inspect", "tiny:shieldgemma2"), "not a pixel_values -> labels classifier"),
])
def test_inspect_errors_are_one_clear_line(args, words):
    out = run(*args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
