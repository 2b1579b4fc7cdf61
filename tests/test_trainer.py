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
    assert decay["head/decay"] == 0.01 and decay["head/no_decay"] == 0.0
    no_decay = [n for pg in trainer.optimizer.param_groups if pg["weight_decay"] == 0 for n in pg["name"]]
    assert no_decay
    bn_weight = model.resnet.encoder.stages[1].layers[0].layer[0].normalization.weight
    assert any(bn_weight is p for pg in trainer.optimizer.param_groups if pg["name"] == "stage.1/no_decay" for p in pg["params"])


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


def test_verification_on_save_names_the_tensor(tmp_path):
    model = tiny_model("resnet")
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                            train_dataset=TinyImages(), callbacks=[Tamper(model, 2)])
    with pytest.raises(FrozenWeightsChanged, match=r"resnet\.embedder\.embedder\.convolution\.weight.*|checkpoint-3"):
        trainer.train()


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
