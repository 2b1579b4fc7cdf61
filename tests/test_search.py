"""Freeze-depth search through the Trainer's hyperparameter_search (optuna)."""

import json
import subprocess
import sys

import pytest
from helpers import TinyImages, tiny_model, training_args

import hf_freeze
from hf_freeze import FreezeSearchSpace, FreezeTrainer, search_freeze_policies
from hf_freeze.metrics import classification_metrics as accuracy


def test_search_over_four_policies_ranks_them_and_saves_the_best(tmp_path):
    args = training_args(tmp_path, num_train_epochs=2, eval_strategy="epoch", logging_steps=100)
    trainer = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1), args=args, train_dataset=TinyImages(n=32),
                            eval_dataset=TinyImages(n=24, seed=5), compute_metrics=accuracy)
    space = FreezeSearchSpace(freeze=["backbone", "1"], schedule=["none", "late"], lr_scale=[0.5])
    result = search_freeze_policies(trainer, n_trials=4, space=space)
    policies = [r["policy"] for r in result.rows]
    assert sorted(policies) == sorted(["freeze=backbone", "freeze=1", "freeze=backbone;unfreeze=epoch1:1@0.5",
                                       "freeze=1;unfreeze=epoch1:1@0.5"])
    scores = [r["eval_accuracy"] for r in result.rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    out = result.save(tmp_path / "search")
    best = hf_freeze.FreezePolicy.from_pretrained(out)
    assert best.to_string() == policies[0]
    assert json.loads((out / "search_results.json").read_text())["rows"][0]["policy"] == policies[0]
    assert (out / "search_results.png").stat().st_size > 1000 and "| 1 |" in (out / "search_results.md").read_text()
    # the saved policy is ready to train with
    again = FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "again", freeze_policy_file=str(out)),
                          train_dataset=TinyImages(n=32))
    assert again.freeze_policy == best


def test_search_needs_model_init(tmp_path):
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path), train_dataset=TinyImages(n=8))
    with pytest.raises(ValueError, match="model_init"):
        search_freeze_policies(trainer, n_trials=1)


@pytest.mark.slow
def test_cli_search_on_the_embedded_digits_task(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hf_freeze.cli", "search", "--demo", "--shots", "5",
                          "--validation_per_class", "10", "--epochs", "1", "--n_trials", "4", "--schedules", "none,late",
                          "--lr_scales", "1.0", "--output_dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best policy:" in out.stdout
    rows = json.loads((tmp_path / "s" / "search_results.json").read_text())["rows"]
    assert len({r["policy"] for r in rows}) == 4
    assert hf_freeze.FreezePolicy.from_pretrained(tmp_path / "s").to_string() == rows[0]["policy"]
