"""Freeze-policy search through the Trainer's hyperparameter_search (optuna): each trial trains what it sampled."""

import itertools
import json
import subprocess
import sys

import pytest
from helpers import TinyImages, tiny_model, training_args
from transformers import TrainerCallback

import hf_freeze
from hf_freeze import FreezePolicy, FreezeSearchSpace, FreezeTrainer, search_freeze_policies
from hf_freeze.metrics import classification_metrics as accuracy
from hf_freeze.search import norm_groups, schedule_string


class AppliedPolicies(TrainerCallback):
    """Per trial: the policy the trial sampled and the policy actually applied to the model that trains."""

    def __init__(self):
        self.trainer, self.seen = None, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        trial = self.trainer._trial
        self.seen[trial.number] = (trial.params["policy"], hf_freeze.get_state(model).policy.to_string())


def search_trainer(tmp_path, recorder=None, **kw):
    args = training_args(tmp_path, **{"num_train_epochs": 2, "eval_strategy": "epoch", "logging_steps": 100, **kw})
    trainer = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1), args=args, train_dataset=TinyImages(n=32),
                            eval_dataset=TinyImages(n=24, seed=5), compute_metrics=accuracy,
                            callbacks=[recorder] if recorder else None)
    if recorder:
        recorder.trainer = trainer
    return trainer


def test_every_trial_trains_the_policy_it_sampled_and_is_scored_for_it(tmp_path):
    recorder = AppliedPolicies()
    trainer = search_trainer(tmp_path, recorder)
    # 'freeze=backbone' (the trainer's default policy) is not among the candidates: a trial that trained the
    # default or the previous trial's policy would show up in the recorder
    candidates = ["freeze=1", "freeze=2;unfreeze=epoch1:1@0.5", "freeze=2", "freeze=backbone;unfreeze=epoch1:2"]
    result = search_freeze_policies(trainer, n_trials=4, policies=candidates)
    assert sorted(recorder.seen) == [0, 1, 2, 3]
    assert all(sampled == applied for sampled, applied in recorder.seen.values()), recorder.seen
    assert sorted(sampled for sampled, _ in recorder.seen.values()) == sorted(candidates)  # no repeats, none skipped
    assert {r["trial"]: r["policy"] for r in result.rows} == {t: s for t, (s, _) in recorder.seen.items()}
    scores = [r["eval_accuracy"] for r in result.rows]
    assert scores == sorted(scores, reverse=True)

    out = result.save(tmp_path / "search")
    saved = json.loads((out / "search_results.json").read_text())["rows"]
    assert saved == json.loads(json.dumps(result.rows))
    assert FreezePolicy.from_pretrained(out).to_string() == result.rows[0]["policy"] == result.best_policy.to_string()
    assert (out / "search_results.png").stat().st_size > 1000 and "| 1 |" in (out / "search_results.md").read_text()

    # the score of each of two trials is the score of its policy trained on its own, outside the search
    for row in (result.rows[0], result.rows[-1]):
        alone = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1),
                              args=training_args(tmp_path / f"alone{row['trial']}", num_train_epochs=2,
                                                 eval_strategy="epoch", logging_steps=100),
                              train_dataset=TinyImages(n=32), eval_dataset=TinyImages(n=24, seed=5),
                              compute_metrics=accuracy, freeze_policy=row["policy"])
        alone.train()
        assert alone.evaluate()["eval_loss"] == row["eval_loss"], row["policy"]
    # the saved best policy is ready to train with
    again = FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=TinyImages(n=32),
                          args=training_args(tmp_path / "again", freeze_policy_file=str(out)))
    assert again.freeze_policy == result.best_policy


def test_default_space_search_runs_each_distinct_policy_once(tmp_path):
    recorder = AppliedPolicies()
    trainer = search_trainer(tmp_path, recorder, num_train_epochs=2)
    space = FreezeSearchSpace(freeze=["backbone", "1"], schedule=["none", "late"], lr_scale=[1.0, 0.5])
    result = search_freeze_policies(trainer, n_trials=10, space=space)  # 8 grid points, 6 distinct policies
    seen = [s for s, _ in recorder.seen.values()]
    assert all(s == a for s, a in recorder.seen.values())
    assert sorted(seen) == sorted(r["policy"] for r in result.rows) and len(set(seen)) == len(seen) == 6
    assert "freeze=1;unfreeze=epoch1:1@0.5" in seen and "freeze=backbone" in seen
    # every trial trained to the end (optuna's default pruner would stop some after their first evaluation)
    assert [r["epoch"] for r in result.rows] == [2.0] * 6


def plan_of(policy, groups):
    plan = hf_freeze.resolve(policy, groups)
    return plan.frozen_params, tuple((e.at_epoch, e.at_step, e.groups, e.lr_scale) for e in plan.events)


@pytest.mark.parametrize("model_type", ["resnet", "vit"])
def test_default_grid_holds_distinct_policies_and_covers_every_combination(model_type):
    model = tiny_model(model_type)
    groups = hf_freeze.layer_groups(model)
    bn = norm_groups(model, groups)
    assert bool(bn) == (model_type == "resnet")
    space = FreezeSearchSpace(train_bn=[False, True])
    policies = space.policies(groups, epochs=3, bn_groups=bn)
    plans = [(plan_of(p, groups), p.train_bn) for p in policies]
    assert len(set(plans)) == len(plans), [p.to_string() for p in policies]
    if not bn:  # train_bn changes nothing on a model without BatchNorm
        assert not any(p.train_bn for p in policies)
    # every combination of the grid trains like one of the candidates
    n = len(groups)
    for freeze, kind, scale, train_bn in itertools.product(space.freeze, space.schedule, space.lr_scale, space.train_bn):
        depth = n - 1 if freeze == "backbone" else max(1, (n - 1) // 2)
        events = schedule_string(kind, 3, scale, depth)
        policy = FreezePolicy.from_string(f"freeze={'backbone' if freeze == 'backbone' else depth};unfreeze={events};"
                                          f"train_bn={train_bn}")
        assert (plan_of(policy, groups), train_bn and bool(bn)) in plans, policy.to_string()


def test_search_needs_model_init_and_refuses_a_fixed_policy_file(tmp_path):
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path), train_dataset=TinyImages(n=8))
    with pytest.raises(ValueError, match="model_init"):
        search_freeze_policies(trainer, n_trials=1)
    FreezePolicy().save_pretrained(tmp_path / "p")
    fixed = FreezeTrainer(model_init=lambda: tiny_model("resnet"), train_dataset=TinyImages(n=8),
                          args=training_args(tmp_path, freeze_policy_file=str(tmp_path / "p")))
    with pytest.raises(ValueError, match="freeze_policy_file"):
        search_freeze_policies(fixed, n_trials=1)
    with pytest.raises(hf_freeze.FreezePolicyError, match="unknown schedule 'sudden'"):
        FreezeSearchSpace(schedule=["sudden"]).policies(hf_freeze.layer_groups(tiny_model("resnet")), 3)


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
