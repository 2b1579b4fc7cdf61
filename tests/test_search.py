"""Freeze-policy search through the Trainer's hyperparameter_search (optuna): each trial trains what it sampled."""

import copy
import itertools
import json
import subprocess
import sys

import pytest
import torch
from helpers import TinyImages, identical, snapshot, tiny_model, training_args
from transformers import TrainerCallback

import hf_freeze
from hf_freeze import FreezePolicy, FreezeSearchSpace, FreezeTrainer, search_freeze_policies
from hf_freeze.metrics import classification_metrics as accuracy
from hf_freeze.search import norm_groups, schedule_events


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
    space = FreezeSearchSpace(freeze=["backbone", "1"], schedule=["none", "late"], reach=["1"], lr_scale=[1.0, 0.5])
    result = search_freeze_policies(trainer, n_trials=10, space=space)  # 8 grid points, 6 distinct policies
    seen = [s for s, _ in recorder.seen.values()]
    assert all(s == a for s, a in recorder.seen.values())
    assert sorted(seen) == sorted(r["policy"] for r in result.rows) and len(set(seen)) == len(seen) == 6
    assert "freeze=1;unfreeze=epoch1:1@0.5" in seen and "freeze=backbone" in seen
    # every trial trained to the end (optuna's default pruner would stop some after their first evaluation)
    assert [r["epoch"] for r in result.rows] == [2.0] * 6


def plan_of(policy, groups, bn, timing=None):
    """What a policy does, computed here from the resolved plan: frozen parameters, events by the step they fire at
    (or their time value), the LR scale of every group that trains at some point, BatchNorm flags where they act."""
    plan = hf_freeze.resolve(policy, groups, timing)
    later = {g for e in plan.events for g in e.groups}
    trains = {g.name for g in groups if any(n not in plan.frozen_params for n in g.param_names)} | later
    frozen = {g.name for g in groups if any(n in plan.frozen_params for n in g.param_names)}
    events = tuple(((timing.fire_step(e),) if timing else (e.at_epoch, e.at_step)) + (e.groups, e.lr_scale)
                   for e in plan.events)
    return (plan.frozen_params, events, {g: s for g, s in plan.depth_scale.items() if g in trains},
            policy.train_bn and bool(frozen & bn), policy.unfreeze_bn and not policy.train_bn and bool(later & bn))


@pytest.mark.parametrize("model_type", ["resnet", "vit"])
def test_default_grid_holds_distinct_policies_and_covers_every_combination(model_type):
    model = tiny_model(model_type)
    groups = hf_freeze.layer_groups(model)
    bn = norm_groups(model, groups)
    assert bool(bn) == (model_type == "resnet")
    space = FreezeSearchSpace(freeze=["backbone", "half", "none"], reach=["1", "half", "all"],
                              layer_lr_decay=[None, 0.5, 1.0], unfreeze_bn=[False, True], train_bn=[False, True])
    policies = space.policies(groups, epochs=3, bn_groups=bn)
    plans = [plan_of(p, groups, bn) for p in policies]
    assert all(plans.count(p) == 1 for p in plans), [p.to_string() for p in policies]
    if not bn:  # train_bn / unfreeze_bn change nothing on a model without BatchNorm
        assert not any(p.train_bn or p.unfreeze_bn for p in policies)
    assert not any(p.layer_lr_decay == 1.0 for p in policies)  # 1.0 = no decay: the same as None
    assert any(p.freeze == "none" and p.layer_lr_decay == 0.5 for p in policies)
    # every combination of the grid trains like one of the candidates
    n = len(groups)
    for freeze, kind, reach, scale, decay, unfreeze_bn, train_bn in itertools.product(
            space.freeze, space.schedule, space.reach, space.lr_scale, space.layer_lr_decay, space.unfreeze_bn,
            space.train_bn):
        depth = {"backbone": n - 1, "half": max(1, (n - 1) // 2), "none": 0}[freeze]
        events = ",".join(e.to_string() for e in schedule_events(kind, depth, reach, scale, epochs=3))
        value = freeze if freeze != "half" else depth
        policy = FreezePolicy.from_string(f"freeze={value};unfreeze={events};train_bn={train_bn};"
                                          f"unfreeze_bn={unfreeze_bn};layer_lr_decay={decay}")
        assert plan_of(policy, groups, bn) in plans, policy.to_string()


def test_schedules_reach_and_events_that_fire_at_the_same_step():
    assert [e.to_string() for e in schedule_events("gradual", 5, "all", 0.1, epochs=12)] == ["epoch4:2@0.1",
                                                                                              "epoch8:3@0.1"]
    assert [e.to_string() for e in schedule_events("late", 5, "half", 1.0, epochs=12)] == ["epoch6:2"]
    assert [e.to_string() for e in schedule_events("at:0.25+0.5", 3, "all", 1.0, total_steps=40)] == ["step10:1",
                                                                                                     "step20:2"]
    assert [e.to_string() for e in schedule_events("gradual", 4, "1", 1.0, epochs=3)] == ["epoch1:1"]
    assert schedule_events("none", 4, "all", 0.1, epochs=3) == [] == schedule_events("late", 0, "all", 1.0, epochs=3)
    # one optimizer step per epoch: 'late' (epoch 1.5) and 'at:0.6' (epoch 1.8) both fire after step 2
    model = tiny_model("resnet")
    groups = hf_freeze.layer_groups(model)
    space = FreezeSearchSpace(freeze=["backbone"], schedule=["late", "at:0.6"], reach=["1"], lr_scale=[1.0])
    assert len(space.policies(groups, epochs=3)) == 2
    one_step = hf_freeze.policy.Timing(steps_per_epoch=1, batches_per_epoch=1)
    assert [p.to_string() for p in space.policies(groups, epochs=3, timing=one_step)] == [
        "freeze=backbone;unfreeze=epoch1.5:1"]
    two_steps = hf_freeze.policy.Timing(steps_per_epoch=2, batches_per_epoch=2)
    assert len(space.policies(groups, epochs=3, timing=two_steps)) == 2  # steps 3 and 4
    # a one-epoch run of one step: every event fires after the last update, so every policy trains the head alone
    every = FreezeSearchSpace(schedule=["none", "early", "late", "gradual"], lr_scale=[1.0, 0.1])
    assert [p.to_string() for p in every.policies(groups, epochs=1, timing=one_step)] == ["freeze=backbone",
                                                                                         "freeze=1"]
    assert len(every.policies(groups, epochs=1)) > 2


@pytest.mark.parametrize("bad, message", [
    (dict(schedule=["at:0.7+0.2"]), "unknown schedule 'at:0.7\\+0.2'"),
    (dict(reach=["most"]), "reach choice 'most'"),
    (dict(layer_lr_decay=[1.5]), "layer_lr_decay choice 1.5"),
    (dict(learning_rate=[0.0]), "learning_rate choice 0.0"),
    (dict(freeze=["all"]), "freeze choice 'all'"),
    (dict(lr_scale=[]), "lr_scale has no choice"),
])
def test_a_bad_space_is_refused_with_the_reason(bad, message):
    with pytest.raises(hf_freeze.FreezePolicyError, match=message):
        FreezeSearchSpace(**bad).policies(hf_freeze.layer_groups(tiny_model("resnet")), epochs=3)


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


# ---------------------------------------------------------------------------------------------- LR, decay, budget
class OptimizerLRs(TrainerCallback):
    """Per trial, in order: the sampled learning rate and decay, and the LR of every parameter's optimizer group."""

    def __init__(self):
        self.trainer, self.seen = None, []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        trial = self.trainer._trial
        group_lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.seen.append((trial.params, hf_freeze.get_state(model).policy.layer_lr_decay,
                          {n: group_lr[id(p)] for n, p in model.named_parameters() if p.requires_grad}))


def test_learning_rate_and_layer_lr_decay_are_trial_parameters_each_trial_trains_with_its_own(tmp_path):
    recorder = OptimizerLRs()
    trainer = search_trainer(tmp_path, recorder, num_train_epochs=1)
    model = tiny_model("resnet")
    depth = {n: i for i, g in enumerate(hf_freeze.layer_groups(model)) for n in g.param_names}
    top = max(depth.values())
    space = FreezeSearchSpace(learning_rate=[None, 0.01])  # None: the Trainer's own learning_rate (0.05)
    candidates = ["freeze=none;layer_lr_decay=0.5", "freeze=none", "freeze=none;layer_lr_decay=0.25"]
    result = search_freeze_policies(trainer, policies=candidates, space=space, seed=3)
    assert result.candidates == 6 and len(recorder.seen) == 6
    assert sorted((r["policy"], r["learning_rate"]) for r in result.rows) == sorted(
        itertools.product(candidates, [0.05, 0.01]))
    for params, decay, lrs in recorder.seen:
        expected_decay = hf_freeze.FreezePolicy.from_string(params["policy"]).layer_lr_decay
        assert decay == expected_decay
        for name, lr in lrs.items():  # every parameter: the sampled LR x the sampled decay per group below the head
            assert lr == pytest.approx(params["learning_rate"] * (expected_decay or 1.0) ** (top - depth[name])), name
    # a trial without decay right after one with decay: the Trainer's per-field type cast must not fail on None
    decays = [d for _, d, _ in recorder.seen]
    assert any(a is not None and b is None for a, b in zip(decays, decays[1:])), decays
    assert trainer.args.learning_rate == 0.05 and trainer.args.layer_lr_decay is None  # restored after the search


def test_max_steps_budget_limits_the_trials_and_every_trial_takes_the_predicted_steps(tmp_path):
    trainer = search_trainer(tmp_path, num_train_epochs=2)  # 32 images, batch 8: 8 optimizer steps per trial
    space = FreezeSearchSpace(freeze=["backbone", "1"], schedule=["none", "late"], reach=["1"], lr_scale=[1.0])
    result = search_freeze_policies(trainer, space=space, max_steps=20)
    assert result.steps_per_trial == 8 and result.candidates == 4
    assert len(result.rows) == 2 and result.total_steps == 16 <= 20
    assert all(r["step"] == 8 for r in result.rows)
    with pytest.raises(ValueError, match="max_steps=7 is less than one trial \\(8 optimizer steps\\)"):
        search_freeze_policies(trainer, space=space, max_steps=7)


@pytest.mark.parametrize("strategy", [dict(eval_strategy="no"), dict(eval_strategy="steps", eval_steps=3)])
def test_a_trial_is_scored_at_the_end_of_training_whatever_the_eval_strategy(tmp_path, strategy):
    trainer = search_trainer(tmp_path, **strategy)
    result = search_freeze_policies(trainer, policies=["freeze=1"])
    assert result.rows[0]["step"] == 8 and result.rows[0]["epoch"] == 2.0
    alone = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1), freeze_policy="freeze=1",
                          args=training_args(tmp_path / "alone", num_train_epochs=2), train_dataset=TinyImages(n=32),
                          eval_dataset=TinyImages(n=24, seed=5), compute_metrics=accuracy)
    alone.train()
    assert alone.evaluate()["eval_loss"] == result.rows[0]["eval_loss"]


# ---------------------------------------------------------------------------------------------- retention proxy
def transfer_setup(tmp_path, recorder=None, **kw):
    """A 'pretrained' tiny ResNet (its own 3-class head) and a model_init giving its backbone under a new head."""
    base = tiny_model("resnet", seed=1)

    def model_init():
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        model.classifier[-1].reset_parameters()
        return model

    args = training_args(tmp_path, **{"num_train_epochs": 2, "eval_strategy": "epoch", "logging_steps": 100, **kw})
    trainer = FreezeTrainer(model_init=model_init, args=args, train_dataset=TinyImages(n=32),
                            eval_dataset=TinyImages(n=24, seed=5), compute_metrics=accuracy,
                            callbacks=[recorder] if recorder else None)
    source_images = TinyImages(n=48, seed=9).pixels  # unlabeled images of the 'source task'
    return base, model_init, trainer, source_images


def agreement_by_hand(model, base, images):
    """The proxy computed here: base's predictions vs base's head on the model's backbone (a fresh copy)."""
    probe = copy.deepcopy(base).eval()
    head = set(hf_freeze.layer_groups(base)["head"].param_names)
    probe.load_state_dict({k: v for k, v in model.state_dict().items() if k not in head}, strict=False)
    with torch.no_grad():
        return (probe(pixel_values=images).logits.argmax(-1) == base.eval()(pixel_values=images).logits.argmax(-1)
                ).float().mean().item()


def test_retention_proxy_scores_each_trial_and_tolerance_picks_the_most_retentive_near_best(tmp_path):
    base, model_init, trainer, images = transfer_setup(tmp_path)
    before = snapshot(base)
    candidates = ["freeze=backbone", "freeze=none", "freeze=backbone;unfreeze=epoch1:3@0.1", "freeze=1"]
    tol = 0.05
    result = search_freeze_policies(trainer, policies=candidates, retention_images=images, reference_model=base,
                                    tolerance=tol)
    now = snapshot(base)
    assert all(identical(now[k], v) for k, v in before.items())  # the reference is not changed
    by_policy = {r["policy"]: r for r in result.rows}
    assert by_policy["freeze=backbone"]["retention_proxy"] == 1.0  # bit-identical backbone: the same predictions
    assert by_policy["freeze=none"]["retention_proxy"] < 1.0
    # the proxy of a trial is the agreement of that policy's model trained alone, computed by hand
    for policy in ("freeze=none", "freeze=1"):
        alone = FreezeTrainer(model_init=model_init, freeze_policy=policy, train_dataset=TinyImages(n=32),
                              args=training_args(tmp_path / "alone", num_train_epochs=2))
        alone.train()
        assert by_policy[policy]["retention_proxy"] == pytest.approx(agreement_by_hand(alone.model, base, images))
    # with the tolerance: the most retentive trial among those within it of the best accuracy
    accs = [r["eval_accuracy"] for r in result.rows]
    near = [r for r in result.rows if r["eval_accuracy"] >= max(accs) - tol]
    assert result.best["retention_proxy"] == max(r["retention_proxy"] for r in near) and result.best in near
    out = result.save(tmp_path / "s")
    assert FreezePolicy.from_pretrained(out).to_string() == result.best["policy"]
    assert "retention proxy" in (out / "search_results.md").read_text()
    # re-ranked without training: by accuracy alone, or with everything within the tolerance
    by_accuracy = result.select(None)
    assert [r["eval_accuracy"] for r in by_accuracy.rows] == sorted(accs, reverse=True)
    everything = result.select(1.0)
    assert everything.best["retention_proxy"] == max(r["retention_proxy"] for r in result.rows)
    # the Pareto front: the best of each axis is on it, every other row is beaten on both axes by a front row
    front = result.pareto
    assert by_accuracy.best["policy"] in {r["policy"] for r in front}
    assert everything.best["policy"] in {r["policy"] for r in front}
    for r in result.rows:
        if not r["pareto"]:
            assert any(f["eval_accuracy"] >= r["eval_accuracy"] and f["retention_proxy"] >= r["retention_proxy"]
                       for f in front)


class CountTrials(TrainerCallback):
    def __init__(self):
        self.started = 0

    def on_train_begin(self, *a, **kw):
        self.started += 1


def test_bad_search_calls_are_refused_before_any_trial(tmp_path):
    counter = CountTrials()
    base, _, trainer, images = transfer_setup(tmp_path, counter)
    with pytest.raises(ValueError, match="retention_images needs reference_model"):
        search_freeze_policies(trainer, retention_images=images)
    with pytest.raises(ValueError, match="tolerance picks the most retentive.*give retention_images"):
        search_freeze_policies(trainer, tolerance=0.01)
    with pytest.raises(hf_freeze.FreezePolicyError, match="backbones differ"):
        search_freeze_policies(trainer, retention_images=torch.randn(4, 3, 32, 32), reference_model=tiny_model("vit"))
    with pytest.raises(hf_freeze.FreezePolicyError, match="'freeze=2' and 'freeze=stem,stage.0' train the same way"):
        search_freeze_policies(trainer, policies=["freeze=2", "freeze=1", "freeze=stem,stage.0"])
    with pytest.raises(hf_freeze.FreezePolicyError, match="no adapter"):
        search_freeze_policies(trainer, policies=["freeze=backbone;adapter=lora"])
    with pytest.raises(ValueError, match="n_trials=0"):
        search_freeze_policies(trainer, n_trials=0)
    late = FreezeTrainer(model_init=lambda: base, train_dataset=TinyImages(n=8), eval_dataset=TinyImages(n=8),
                         args=training_args(tmp_path / "b", eval_strategy="epoch", save_strategy="epoch",
                                            load_best_model_at_end=True), callbacks=[counter])
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        search_freeze_policies(late)
    assert counter.started == 0


@pytest.mark.slow
def test_cli_search_with_a_budget_learning_rates_and_the_retention_proxy(tmp_path):
    from hf_freeze.demo.data import pretraining_task, write_imagefolder

    source = write_imagefolder(pretraining_task()["test"].select(range(30)), tmp_path / "digits0-4")
    out = subprocess.run([sys.executable, "-m", "hf_freeze.cli", "search", "--demo", "--shots", "5",
                          "--validation_per_class", "10", "--epochs", "1", "--schedules", "none,early",
                          "--reach", "all", "--lr_scales", "1.0", "--learning_rates", "0.003,0.0003",
                          "--budget_steps", "6", "--retention_dir", str(source), "--tolerance", "0.05",
                          "--output_dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / "s" / "search_results.json").read_text())
    rows = saved["rows"]  # 25 images at batch 16: 2 steps per trial, so 3 trials fit the 6-step budget
    assert saved["steps_per_trial"] == 2 and saved["max_steps"] == 6 and len(rows) == 3
    assert saved["tolerance"] == 0.05 and all(0.0 <= r["retention_proxy"] <= 1.0 for r in rows)
    assert {r["learning_rate"] for r in rows} <= {0.003, 0.0003}
    assert f"at learning rate {rows[0]['learning_rate']:g}" in out.stdout
    assert hf_freeze.FreezePolicy.from_pretrained(tmp_path / "s").to_string() == rows[0]["policy"]


@pytest.mark.parametrize("given", [dict(freeze="backbone"), dict(layer_lr_decay=0.8), dict(adapter="lora"),
                                   dict(unfreeze="epoch1:1")])
def test_policy_fields_in_the_training_arguments_are_refused_before_any_trial(tmp_path, given):
    """Every trial sets its own policy: a field the arguments set would be mixed into or dropped from each trial."""
    trainer = search_trainer(tmp_path, **given)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(hf_freeze.FreezePolicyError, match=f"the training arguments set {next(iter(given))}="):
        search_freeze_policies(trainer, policies=["freeze=1"])
    assert trainer.state.global_step == 0 and sorted(tmp_path.rglob("*")) == before
