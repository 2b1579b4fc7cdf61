"""The real transformers Trainer with FreezeCallback / FreezeTrainer: schedule, LRs, verification, saving, resume."""

import json

import pytest
import torch
from helpers import StopAt, TinyImages, changed_names, group_tensors, identical, snapshot, tiny_model, training_args
from transformers import HfArgumentParser, Trainer, TrainerCallback

import hf_freeze
from hf_freeze import FreezeCallback, FreezePolicyError, FreezeTrainer, FreezeTrainingArguments, FrozenWeightsChanged


class Recorder(TrainerCallback):
    """Snapshots of every group after each optimizer step, and the optimizer's LRs."""

    def __init__(self, model):
        self.model, self.steps, self.lrs = model, {}, {}

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.steps[state.global_step] = {g: group_tensors(self.model, g) for g in hf_freeze.layer_groups(self.model).names}
        self.lrs[state.global_step] = [(pg.get("name"), pg["lr"], pg.get("lr_scale", 1.0)) for pg in optimizer.param_groups]


def moved(before: dict, after: dict) -> bool:
    return any(not identical(before[n], after[n]) for n in before)


def test_schedule_unfreezes_the_right_groups_at_the_right_step(tmp_path):
    # 32 images / batch 8 = 4 steps per epoch; 3 epochs = 12 steps
    callback = FreezeCallback("freeze=backbone;unfreeze=step6:1,epoch2:stage.0")
    trainer = Trainer(model=(model := tiny_model("resnet")), args=training_args(tmp_path, num_train_epochs=3),
                      train_dataset=TinyImages(), callbacks=[callback, rec := Recorder(model)])
    pretrained = snapshot(model)
    trainer.train()
    s = rec.steps
    assert sorted(s) == list(range(1, 13))
    # stage.1 (the frozen group nearest the head) unfreezes at step 6: unchanged through update 6, moves on update 7
    assert all(not moved(s[1]["stage.1"], s[k]["stage.1"]) for k in range(2, 7))
    assert not moved({n: pretrained[n] for n in s[6]["stage.1"]}, s[6]["stage.1"])
    assert moved(s[6]["stage.1"], s[7]["stage.1"])
    # stage.0 unfreezes at epoch 2 = after step 8
    assert not moved({n: pretrained[n] for n in s[8]["stage.0"]}, s[8]["stage.0"])
    assert moved(s[8]["stage.0"], s[9]["stage.0"])
    # stem never unfreezes: bit-identical to the pretrained weights, buffers included
    stem = hf_freeze.layer_groups(model)["stem"]
    assert not [n for n in changed_names({n: pretrained[n] for n in (*stem.param_names, *stem.buffer_names)}, model)]
    assert moved(s[1]["head"], s[12]["head"])
    assert [(e["step"], e["groups"]) for e in callback.events_log] == [(6, ["stage.1"]), (8, ["stage.0"])]
    # the events reach the Trainer's logs (log_history, and so TensorBoard/W&B) with the next logged step
    logged = [h for h in trainer.state.log_history if "freeze/unfrozen_groups" in h]
    assert [(e["step"], e["freeze/unfrozen_groups"]) for e in logged] == [(7, 1.0), (9, 2.0)]
    assert logged[0]["freeze/trainable_params"] < logged[1]["freeze/trainable_params"]


def test_each_group_lr_is_its_scale_times_the_schedule(tmp_path):
    model = tiny_model("resnet")
    rec = Recorder(model)
    args = training_args(tmp_path, num_train_epochs=2, lr_scheduler_type="linear", warmup_steps=2)
    trainer = FreezeTrainer(model=model, args=args, train_dataset=TinyImages(), callbacks=[rec],
                            freeze_policy="freeze=backbone;unfreeze=step3:1@0.1;layer_lr_decay=0.5")
    trainer.train()
    depth = {"stem": 0.125, "stage.0": 0.25, "stage.1": 0.5 * 0.1, "head": 1.0}
    names = {pg[0].split("/")[0] for pg in rec.lrs[1]}
    assert names == {"stage.1", "head"}  # never-unfrozen groups are not in the optimizer at all
    for step, groups in rec.lrs.items():
        schedule = trainer.lr_scheduler.lr_lambdas[0](step)
        for name, lr, scale in groups:
            assert scale == pytest.approx(depth[name.split("/")[0]])
            assert lr == pytest.approx(0.05 * scale * schedule, rel=1e-9), (step, name)
    decay = {pg["name"]: pg["weight_decay"] for pg in trainer.optimizer.param_groups}
    assert decay == {"stage.1/decay": 0.01, "stage.1/no_decay": 0.0, "head/decay": 0.01, "head/no_decay": 0.0}
    # weight decay as the plain Trainer gives it (get_decay_parameter_names): not on biases; BatchNorm weights get it
    names = {id(p): n for n, p in model.named_parameters()}
    for pg in trainer.optimizer.param_groups:
        for p in pg["params"]:
            n = names[id(p)]
            assert n.endswith(".bias") == pg["name"].endswith("/no_decay"), (n, pg["name"])
    bn_weight = model.resnet.encoder.stages[1].layers[0].layer[0].normalization.weight
    assert any(bn_weight is p for pg in trainer.optimizer.param_groups if pg["name"] == "stage.1/decay" for p in pg["params"])


class _NoDecayOnNorms(FreezeTrainer):
    def get_decay_parameter_names(self, model):
        return [n for n in super().get_decay_parameter_names(model) if ".normalization." not in n]


def test_weight_decay_follows_the_trainers_get_decay_parameter_names(tmp_path):
    """The default rule is the Trainer's (a ViT's LayerNorms and a ResNet's biases get none), and a subclass that
    overrides get_decay_parameter_names gets its own rule in every policy group."""
    from transformers import Trainer

    from hf_freeze.param_groups import decay_parameter_names

    for kind in ("vit", "resnet"):
        model = tiny_model(kind)
        assert decay_parameter_names(model) == set(Trainer.get_decay_parameter_names(None, model))
    model = tiny_model("resnet")
    trainer = _NoDecayOnNorms(model=model, args=training_args(tmp_path), train_dataset=TinyImages(),
                              freeze_policy="freeze=stem;layer_lr_decay=0.5")
    trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for pg in trainer.optimizer.param_groups if pg["weight_decay"] > 0 for p in pg["params"]}
    trained = {n for n, p in model.named_parameters() if not n.startswith("resnet.embedder.")}
    assert decayed == {n for n in trained if not n.endswith(".bias") and ".normalization." not in n}


def test_plain_callback_refuses_per_group_lrs():
    with pytest.raises(FreezePolicyError, match="Use hf_freeze.FreezeTrainer"):
        FreezeCallback("freeze=backbone;unfreeze=epoch1:1@0.1")
    with pytest.raises(FreezePolicyError, match="FreezeTrainer"):
        FreezeCallback({"layer_lr_decay": 0.5})


class Tamper(TrainerCallback):
    def __init__(self, model, at):
        self.model, self.at = model, at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                self.model.resnet.embedder.embedder.convolution.weight[0, 0, 0, 0] += 1.0


def test_verification_on_save_names_the_tensor_and_the_checkpoint(tmp_path):
    model = tiny_model("resnet")
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                            train_dataset=TinyImages(), callbacks=[Tamper(model, 2)])
    with pytest.raises(FrozenWeightsChanged) as err:
        trainer.train()
    assert err.value.changed == ["resnet.embedder.embedder.convolution.weight"]
    assert "resnet.embedder.embedder.convolution.weight" in str(err.value) and "checkpoint-3" in str(err.value)
    assert trainer.state.global_step == 3  # caught at the first save after the change


def test_saving_records_the_policy_in_config_and_json(tmp_path):
    model = tiny_model("resnet")
    policy = "freeze=backbone;unfreeze=step2:1"
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=4, num_train_epochs=1),
                            train_dataset=TinyImages(), freeze_policy=policy)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-4"):
        assert hf_freeze.FreezePolicy.from_pretrained(folder).to_string() == policy
        assert json.loads((folder / "config.json").read_text())["freeze_policy"]["unfreeze"][0]["at_step"] == 2
    assert hf_freeze.policy_from_pretrained(tmp_path / "final").to_string() == policy
    reloaded = type(model).from_pretrained(tmp_path / "final")
    assert FreezeTrainer(model=reloaded, args=training_args(tmp_path)).freeze_policy.to_string() == policy


def test_hf_argument_parser_flags_drive_the_trainer(tmp_path):
    parser = HfArgumentParser(FreezeTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path / "o"), "--freeze", "stem:stage.0", "--unfreeze", "step2:stage.0",
        "--train_bn", "--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "8", "--max_steps", "3"])
    model = tiny_model("resnet")
    trainer = FreezeTrainer(model=model, args=args, train_dataset=TinyImages())
    assert trainer.freeze_policy.to_string() == "freeze=stem:stage.0;train_bn=true;unfreeze=step2:stage.0"
    trainer.train()
    assert hf_freeze.freeze_report(model).row("stage.0").unfrozen_at == "step 2"


def test_resume_after_an_unfreeze_equals_the_uninterrupted_run(tmp_path):
    policy = "freeze=backbone;unfreeze=step3:1@0.5,epoch2:stage.0@0.1;layer_lr_decay=0.8"
    kwargs = dict(num_train_epochs=3, save_strategy="steps", save_steps=5, lr_scheduler_type="cosine")
    full = tiny_model("resnet", seed=1)
    FreezeTrainer(model=full, args=training_args(tmp_path / "a", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train()
    interrupted = tiny_model("resnet", seed=1)  # same run, killed right after checkpoint-5
    FreezeTrainer(model=interrupted, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy, callbacks=[StopAt(5)]).train()
    resumed = tiny_model("resnet", seed=1)
    trainer = FreezeTrainer(model=resumed, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                            freeze_policy=policy)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-5"))
    report = hf_freeze.freeze_report(resumed)
    assert report.row("stage.1").unfrozen_at == "step 3" and report.row("stage.0").unfrozen_at == "epoch 2"
    assert trainer.freeze_callback.events_log[0]["resumed"] is True
    a, b = snapshot(full), snapshot(resumed)
    assert [n for n in a if not identical(a[n], b[n])] == []


def test_bf16_autocast_keeps_frozen_tensors_bit_identical(tmp_path):
    model = tiny_model("resnet")
    before = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, bf16=True), train_dataset=TinyImages(),
                            freeze_policy="freeze=stem:stage.0")
    trainer.train()
    changed = set(changed_names(before, model))
    frozen = {n for g in ("stem", "stage.0") for n in (*hf_freeze.layer_groups(model)[g].param_names,
                                                        *hf_freeze.layer_groups(model)[g].buffer_names)}
    assert changed and not (changed & frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- BatchNorm under train_bn and a schedule
class Buffer(TrainerCallback):
    """A buffer's value after every optimizer step."""

    def __init__(self, model, name):
        self.model, self.name, self.values = model, name, {}

    def on_step_end(self, args, state, control, **kw):
        self.values[state.global_step] = self.model.get_buffer(self.name).detach().clone()


@pytest.mark.parametrize("train_bn", [True, False])
def test_train_bn_batchnorm_keeps_training_after_its_group_unfreezes(tmp_path, train_bn):
    model = tiny_model("resnet")
    name = "resnet.encoder.stages.1.layers.0.layer.0.normalization.running_mean"
    pretrained = model.get_buffer(name).clone()
    rec = Buffer(model, name)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=TinyImages(), callbacks=[rec],
                            freeze_policy=f"freeze=backbone;unfreeze=step3:1;train_bn={str(train_bn).lower()}")
    trainer.train()  # 8 steps; stage.1 unfreezes after step 3; the end-of-training verification passes
    assert [e["groups"] for e in trainer.freeze_callback.events_log] == [["stage.1"]]
    moved = [not identical(rec.values[k], rec.values[k + 1]) for k in range(1, 8)]
    if train_bn:  # the statistics train while the group is frozen and go on training once it is unfrozen
        assert all(moved) and not identical(rec.values[1], pretrained)
    else:  # kept (inference mode) before and after the unfreeze, and verified
        assert not any(moved) and identical(rec.values[8], pretrained)
    assert hf_freeze.freeze_report(model).row("stage.1").norms == ("train" if train_bn else "eval (locked)")
    assert (name in hf_freeze.get_state(model).fingerprint.digests) == (not train_bn)  # verified exactly when kept


# ----------------------------------------------------------------------------- mixed step and epoch events
def test_mixed_step_and_epoch_events_fire_when_each_is_due(tmp_path):
    # 4 steps per epoch, 4 epochs; the step event is listed after the epoch event but comes first
    callback = FreezeCallback("freeze=backbone;unfreeze=epoch3:1,step2:1")
    model = tiny_model("resnet")
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=4), train_dataset=TinyImages(),
                      callbacks=[callback, rec := Recorder(model)])
    pretrained = snapshot(model)
    trainer.train()
    assert [(e["step"], e["groups"], e["when"]) for e in callback.events_log] == [
        (2, ["stage.1"], "step 2"), (12, ["stage.0"], "epoch 3")]  # counts taken in firing order: nearest the head first
    s = rec.steps
    assert not moved({n: pretrained[n] for n in s[2]["stage.1"]}, s[2]["stage.1"]) and moved(s[2]["stage.1"], s[3]["stage.1"])
    assert not moved({n: pretrained[n] for n in s[12]["stage.0"]}, s[12]["stage.0"]) and moved(s[12]["stage.0"], s[13]["stage.0"])


@pytest.mark.parametrize("batch,expected", [
    (8, [(3, ["stage.1"], 0.5), (4, ["stage.0"], 0.1)]),   # 4 steps per epoch: step 3 comes before epoch 1
    (16, [(2, ["stage.1"], 0.1), (3, ["stage.0"], 0.5)]),  # 2 steps per epoch: epoch 1 (step 2) comes first
])
def test_event_order_that_depends_on_the_epoch_length_is_resolved_when_training_starts(tmp_path, batch, expected):
    policy = "freeze=backbone;unfreeze=step3:1@0.5,epoch1:1@0.1"
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, policy)
    assert hf_freeze.get_state(model).plan.provisional
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=batch),
                            train_dataset=TinyImages(), freeze_policy=policy)
    trainer.train()
    assert [(e["step"], e["groups"], e["lr_scale"]) for e in trainer.freeze_callback.events_log] == expected
    scales = {pg["name"].split("/")[0]: pg["lr_scale"] for pg in trainer.optimizer.param_groups}
    assert {g: scales[g] for g in ("stage.0", "stage.1")} == {groups[0]: s for _, groups, s in expected}


def test_plain_trainer_resolves_the_event_order_from_its_dataloader(tmp_path):
    callback = FreezeCallback("freeze=backbone;unfreeze=step3:stage.0,epoch1:1")  # 2 steps per epoch: epoch 1 first
    Trainer(model=tiny_model("resnet"), args=training_args(tmp_path, per_device_train_batch_size=16),
            train_dataset=TinyImages(), callbacks=[callback]).train()
    assert [(e["step"], e["groups"]) for e in callback.events_log] == [(2, ["stage.1"]), (3, ["stage.0"])]
    assert callback.timing == hf_freeze.plan.Timing(2, 2, 1)


def test_event_order_that_makes_the_policy_invalid_for_this_run_is_refused_before_training(tmp_path):
    policy = "freeze=backbone;unfreeze=step3:stage.1,epoch1:1"  # valid when epoch 1 ends after step 3
    model = tiny_model("resnet")
    before = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=16),
                            train_dataset=TinyImages(), freeze_policy=policy)
    with pytest.raises(FreezePolicyError, match=r"unfreeze 'step3:stage.1'.*not frozen at that point"):
        trainer.train()  # 2 steps per epoch: epoch 1 fires first and takes stage.1
    assert changed_names(before, model) == [] and trainer.state.global_step == 0
    ok = FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path / "ok"), train_dataset=TinyImages(),
                       freeze_policy=policy)
    ok.train()  # 4 steps per epoch
    assert [(e["step"], e["groups"]) for e in ok.freeze_callback.events_log] == [(3, ["stage.1"]), (4, ["stage.0"])]


# ----------------------------------------------------------------------------- parameters frozen by the user
def test_a_parameter_the_user_froze_never_trains(tmp_path):
    model = tiny_model("resnet")
    conv = model.resnet.encoder.stages[1].layers[0].layer[0].convolution.weight  # stage.1 unfreezes at step 2
    conv.requires_grad_(False)
    model.classifier[1].bias.requires_grad_(False)
    before = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=TinyImages(),
                            freeze_policy="freeze=backbone;unfreeze=step2:1")
    trainer.train()
    changed = set(changed_names(before, model))
    user = {"resnet.encoder.stages.1.layers.0.layer.0.convolution.weight", "classifier.1.bias"}
    assert not changed & user and "classifier.1.weight" in changed
    assert {n for n in changed if n.startswith("resnet.encoder.stages.1.")}  # the rest of stage.1 trained
    assert not any(p is conv for pg in trainer.optimizer.param_groups for p in pg["params"])
    report = hf_freeze.freeze_report(model)
    assert report.row("stage.1").user_frozen == conv.numel() and report.row("head").state == "partial"


# ----------------------------------------------------------------------------- saving with a plain Trainer
def test_plain_trainer_save_model_writes_the_policy(tmp_path):
    policy = "freeze=backbone;unfreeze=step2:1"
    trainer = Trainer(model=tiny_model("resnet"), args=training_args(tmp_path, max_steps=3),
                      train_dataset=TinyImages(), callbacks=[FreezeCallback(policy)])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert hf_freeze.FreezePolicy.from_pretrained(tmp_path / "final").to_string() == policy
    assert json.loads((tmp_path / "final" / "config.json").read_text())["freeze_policy"]["unfreeze"][0]["at_step"] == 2
    hf_freeze.remove_policy(trainer.model)
    assert "save_pretrained" not in vars(trainer.model)


# ----------------------------------------------------------------------------- resume after a crash
def test_resume_true_skips_incomplete_checkpoints_and_names_them(tmp_path, caplog):
    policy = "freeze=backbone;unfreeze=step3:1"
    kwargs = dict(num_train_epochs=2, save_strategy="steps", save_steps=2)
    full = tiny_model("resnet", seed=1)
    FreezeTrainer(model=full, args=training_args(tmp_path / "a", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train()
    FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "b", **kwargs),
                  train_dataset=TinyImages(), freeze_policy=policy, callbacks=[StopAt(6)]).train()
    out = tmp_path / "b" / "out"
    (out / "checkpoint-6" / "trainer_state.json").write_text("")  # killed while writing
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    resumed = tiny_model("resnet", seed=1)
    trainer = FreezeTrainer(model=resumed, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                            freeze_policy=policy)
    with caplog.at_level("WARNING", logger="hf_freeze"):
        trainer.train(resume_from_checkpoint=True)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("hf_freeze")]
    assert any("checkpoint-6" in m and "trainer_state.json is empty" in m and m.endswith("checkpoint-2") for m in messages)
    assert any("checkpoint-4" in m and "model.safetensors is unreadable" in m for m in messages)
    a, b = snapshot(full), snapshot(resumed)
    assert [n for n in a if not identical(a[n], b[n])] == []  # resumed from checkpoint-2: the same run


def test_resume_true_with_no_complete_checkpoint_names_the_broken_folders(tmp_path):
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    FreezeTrainer(model=tiny_model("resnet"), args=args, train_dataset=TinyImages()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / "optimizer.pt").unlink()
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=args, train_dataset=TinyImages())
    with pytest.raises(ValueError, match=rf"no complete checkpoint.*{checkpoint}: no optimizer.pt"):
        trainer.train(resume_from_checkpoint=True)
    (checkpoint / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"checkpoint-2: trainer_state.json is not valid JSON"):
        trainer.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- load_best_model_at_end
def first_eval_is_best():
    """An evaluation metric that is highest at the first evaluation (so the best checkpoint is the first one)."""
    calls = []

    def metrics(pred):
        calls.append(1)
        return {"score": -float(len(calls))}

    return metrics


@pytest.mark.parametrize("save_delta", [False, True], ids=["full", "delta"])
def test_best_checkpoint_from_before_an_unfreeze_is_described_and_verified_as_frozen(tmp_path, save_delta):
    base = tmp_path / "base"
    tiny_model("resnet", seed=1).save_pretrained(base)
    model = type(tiny_model("resnet")).from_pretrained(base)
    pretrained = snapshot(model)
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                         load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                         save_delta=save_delta)
    trainer = FreezeTrainer(model=model, args=args, train_dataset=TinyImages(), eval_dataset=TinyImages(n=8, seed=3),
                            compute_metrics=first_eval_is_best(), freeze_policy="freeze=backbone;unfreeze=step4:1")
    trainer.train()  # stage.1 trains from step 5 on; the best checkpoint is checkpoint-2; verification passes
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert [e["step"] for e in trainer.freeze_callback.events_log] == [4]
    stage1 = hf_freeze.layer_groups(model)["stage.1"]
    now = snapshot(model)
    assert [n for n in (*stage1.param_names, *stage1.buffer_names) if not identical(now[n], pretrained[n])] == []
    report = hf_freeze.freeze_report(model)
    assert (report.row("stage.1").state, report.row("stage.1").trainable, report.row("stage.1").unfrozen_at) == ("frozen", 0, "")
    assert set(stage1.param_names) <= set(hf_freeze.get_state(model).fingerprint.digests)
    assert hf_freeze.changed_frozen_tensors(model) == []
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| stage.1 |"))
    assert "| 0 | frozen" in row
    assert "These weights are the best checkpoint (step 2" in card and "unfroze stage.1 at step 4" in card
    assert "No group was unfrozen before these weights were saved." in card
    reloaded = hf_freeze.from_pretrained(tmp_path / "out")
    again = snapshot(reloaded)
    assert [n for n in now if not identical(now[n], again[n])] == []
