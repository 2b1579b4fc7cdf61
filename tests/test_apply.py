"""apply_policy / unfreeze_groups / remove_policy / verification on real modules."""

import copy
import pickle

import pytest
import torch
from helpers import changed_names, loss_of, model_inputs, model_state, same_state, snapshot, tiny_model

import hf_freeze
from hf_freeze import FreezePolicy, FrozenWeightsChanged


def train_steps(model, steps=2, model_type="resnet", lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        model.train()
        loss_of(model, model_inputs(model_type, model, seed=i)).backward()
        opt.step()
        opt.zero_grad()


def test_frozen_bn_stays_in_eval_through_train_calls_and_copies():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    bn = model.resnet.embedder.embedder.normalization
    model.train()
    assert bn.training is False and model.training is True
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert clone.resnet.embedder.embedder.normalization.training is False
        assert hf_freeze.get_state(clone) is not None


def test_without_the_lock_bn_statistics_drift():
    """The failure hf_freeze exists to prevent: requires_grad=False alone lets running stats move."""
    model = tiny_model("resnet")
    head = set(hf_freeze.layer_groups(model)["head"].param_names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    before = snapshot(model)
    train_steps(model)
    assert any(n.endswith("running_mean") for n in changed_names(before, model))


def test_train_bn_lets_frozen_bn_update_its_statistics_only():
    model = tiny_model("resnet")
    report = hf_freeze.apply_policy(model, FreezePolicy(train_bn=True))
    assert report.row("stem").norms == "train"
    before = snapshot(model)
    train_steps(model)
    changed = set(changed_names(before, model))
    assert any(n.endswith("running_mean") for n in changed)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in changed and "head" not in n and not n.startswith("classifier"))
    assert hf_freeze.changed_frozen_tensors(model) == []  # BN stats are not claimed frozen under train_bn


def test_verification_names_a_changed_tensor():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    with torch.no_grad():
        model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight[0, 0, 0, 0] += 1e-7
        model.resnet.embedder.embedder.normalization.running_var.mul_(1.0000001)
    with pytest.raises(FrozenWeightsChanged) as err:
        hf_freeze.verify_frozen(model, "at the end of training")
    assert set(err.value.changed) == {"resnet.encoder.stages.0.layers.0.layer.0.convolution.weight",
                                      "resnet.embedder.embedder.normalization.running_var"}
    assert "at the end of training" in str(err.value) and "running_var" in str(err.value)


def test_unfreeze_groups_trains_them_from_then_on():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch1:1@0.1")
    stage1 = set(hf_freeze.layer_groups(model)["stage.1"].param_names)
    unfrozen = hf_freeze.unfreeze_groups(model, ["stage.1"], when="epoch 1", lr_scale=0.1)
    assert set(unfrozen) == stage1
    report = hf_freeze.freeze_report(model)
    assert report.row("stage.1").state == "trainable" and report.row("stage.1").unfrozen_at == "epoch 1"
    # by default an unfrozen group's BatchNorm keeps its pretrained statistics (inference mode), weights train
    assert report.row("stage.1").norms == "eval (locked)" and report.row("stage.0").norms == "eval (locked)"
    before = snapshot(model)
    train_steps(model)
    changed = set(changed_names(before, model))
    assert stage1 & changed and any(".normalization.weight" in n for n in stage1 & changed)
    assert not any(n.endswith(("running_mean", "running_var")) for n in changed)
    assert hf_freeze.changed_frozen_tensors(model) == []
    with pytest.raises(hf_freeze.FreezePolicyError, match="unknown group"):
        hf_freeze.unfreeze_groups(model, ["stage.8"])


def test_unfreeze_bn_lets_unfrozen_batchnorm_use_batch_statistics():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch1:1;unfreeze_bn=true")
    hf_freeze.unfreeze_groups(model, ["stage.1"], when="epoch 1")
    assert hf_freeze.freeze_report(model).row("stage.1").norms == "train"
    before = snapshot(model)
    train_steps(model)
    changed = set(changed_names(before, model))
    assert any(n.startswith("resnet.encoder.stages.1.") and n.endswith("running_mean") for n in changed)
    assert not any(n.startswith(("resnet.encoder.stages.0.", "resnet.embedder.")) for n in changed)
    assert hf_freeze.changed_frozen_tensors(model) == []


def test_unfreeze_does_not_hide_an_earlier_violation():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    with torch.no_grad():
        model.resnet.embedder.embedder.convolution.weight.add_(1)
    hf_freeze.unfreeze_groups(model, ["stage.1"])
    assert hf_freeze.changed_frozen_tensors(model) == ["resnet.embedder.embedder.convolution.weight"]


def test_reapply_and_remove_restore_normal_behaviour():
    model = tiny_model("resnet")
    fresh = model_state(model)
    hf_freeze.apply_policy(model, "backbone")
    r2 = hf_freeze.apply_policy(model, FreezePolicy(freeze=1))
    assert [r.state for r in r2.rows] == ["frozen", "trainable", "trainable", "trainable"]
    assert r2.row("stage.0").norms == "train"
    hf_freeze.remove_policy(model)
    assert same_state(fresh, model_state(model))
    hf_freeze.remove_policy(model)  # idempotent


def test_remove_keeps_user_requires_grad_choices():
    model = tiny_model("resnet")
    model.classifier[1].bias.requires_grad_(False)
    hf_freeze.apply_policy(model, "none")
    assert model.classifier[1].bias.requires_grad
    hf_freeze.remove_policy(model)
    assert not model.classifier[1].bias.requires_grad


def test_partial_glob_freeze_locks_only_fully_frozen_norms():
    model = tiny_model("resnet")
    report = hf_freeze.apply_policy(model, FreezePolicy(freeze=["*.normalization.*"]))
    assert report.row("stem").state == "partial"
    before = snapshot(model)
    train_steps(model)
    assert not [n for n in changed_names(before, model) if ".normalization." in n]
    assert [n for n in changed_names(before, model) if n.endswith("convolution.weight")]


def test_report_table_and_totals():
    model = tiny_model("resnet")
    text = str(hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch2:1@0.1;layer_lr_decay=0.5"))
    total = sum(p.numel() for p in model.parameters())
    trainable = model.classifier[1].weight.numel() + model.classifier[1].bias.numel()
    assert f"Total params: {total:,}" in text and f"Trainable params: {trainable:,}" in text
    assert "frozen (until epoch 2)" in text and "eval (locked)" in text
    for group in ("stem", "stage.0", "stage.1", "head"):
        assert f"\n{group} " in text
    md = hf_freeze.freeze_report(model).to_markdown()
    assert md.count("\n") == 5 and "| head |" in md


def test_wrapped_models_are_unwrapped():
    model = tiny_model("resnet")
    compiled = torch.nn.DataParallel(model)
    hf_freeze.apply_policy(compiled, "backbone")
    assert hf_freeze.get_state(model) is not None and hf_freeze.get_state(compiled) is hf_freeze.get_state(model)
