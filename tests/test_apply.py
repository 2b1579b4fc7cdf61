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


def norm_claims(model) -> tuple[set[str], set[str], set[str]]:
    """(buffers of BatchNorm layers locked in inference mode, buffers of the others, fingerprinted tensor names)."""
    from hf_freeze import batchnorm

    locked, free = set(), set()
    for name, module in batchnorm.stat_norms(model).items():
        (locked if batchnorm.is_locked(module) else free).update(f"{name}.{b}" for b, _ in module.named_buffers(recurse=False))
    return locked, free, set(hf_freeze.get_state(model).fingerprint.digests)


@pytest.mark.parametrize("policy,stage1_norms", [
    ("freeze=backbone;unfreeze=epoch1:1", "eval (locked)"),  # default: statistics kept, still verified
    ("freeze=backbone;unfreeze=epoch1:1;unfreeze_bn=true", "train"),
    ("freeze=backbone;unfreeze=epoch1:1;train_bn=true", "train"),  # train_bn: they kept training while frozen
    ("freeze=backbone;unfreeze=epoch1:1;train_bn=true;unfreeze_bn=true", "train"),
])
def test_batchnorm_of_an_unfrozen_group_and_what_is_claimed_verified(policy, stage1_norms):
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, policy)
    hf_freeze.unfreeze_groups(model, ["stage.1"], when="epoch 1")
    report = hf_freeze.freeze_report(model)
    assert report.row("stage.1").norms == stage1_norms
    assert report.row("stem").norms == ("train" if "train_bn" in policy else "eval (locked)")
    locked, free, fingerprinted = norm_claims(model)
    assert locked <= fingerprinted and not free & fingerprinted  # verified exactly when kept
    stage1_stats = {n for n in locked | free if n.startswith("resnet.encoder.stages.1.") and "running_mean" in n}
    assert stage1_stats and stage1_stats <= (free if stage1_norms == "train" else locked)
    before = snapshot(model)
    train_steps(model)
    changed = set(changed_names(before, model))
    assert bool(stage1_stats & changed) == (stage1_norms == "train")
    assert not changed & fingerprinted and hf_freeze.changed_frozen_tensors(model) == []
    if stage1_norms != "train":  # a kept statistic that changes is caught
        name = sorted(stage1_stats)[0]
        with torch.no_grad():
            model.get_buffer(name).add_(1e-3)
        assert hf_freeze.changed_frozen_tensors(model) == [name]


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


def test_a_parameter_the_user_froze_stays_frozen_through_the_policy_and_its_events():
    model = tiny_model("resnet")
    bias = model.classifier[1].bias  # in the head, which the policy trains
    conv = model.resnet.encoder.stages[1].layers[0].layer[0].convolution.weight  # in stage.1, which it unfreezes
    bias.requires_grad_(False)
    conv.requires_grad_(False)
    report = hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch1:1")
    assert not bias.requires_grad and model.classifier[1].weight.requires_grad
    head = report.row("head")
    assert (head.state, head.trainable, head.user_frozen) == ("partial", model.classifier[1].weight.numel(), bias.numel())
    assert f"partial ({bias.numel():,} frozen by the user)" in str(report)
    assert report.row("stage.1").user_frozen == conv.numel() and "frozen by the user" in report.to_markdown()
    hf_freeze.unfreeze_groups(model, ["stage.1"], when="epoch 1")
    stage1 = hf_freeze.freeze_report(model).row("stage.1")
    assert not conv.requires_grad and stage1.state == "partial" and stage1.trainable == stage1.params - conv.numel()
    before = snapshot(model)
    train_steps(model)
    changed = set(changed_names(before, model))
    assert "classifier.1.weight" in changed and {"classifier.1.bias", "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"}.isdisjoint(changed)
    fingerprinted = hf_freeze.get_state(model).fingerprint.digests
    assert {"classifier.1.bias", "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"} <= set(fingerprinted)
    with torch.no_grad():
        bias.add_(1.0)
    assert hf_freeze.changed_frozen_tensors(model) == ["classifier.1.bias"]
    hf_freeze.remove_policy(model)
    assert not bias.requires_grad and not conv.requires_grad and model.resnet.embedder.embedder.convolution.weight.requires_grad


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


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, torch.compile], ids=["DataParallel", "torch.compile"])
def test_wrapped_models_are_unwrapped(wrap):
    model = tiny_model("resnet")
    wrapped = wrap(model)
    assert wrapped is not model
    hf_freeze.apply_policy(wrapped, "backbone")
    assert hf_freeze.get_state(model) is not None and hf_freeze.get_state(wrapped) is hf_freeze.get_state(model)
    assert not model.resnet.embedder.embedder.convolution.weight.requires_grad and model.classifier[1].weight.requires_grad
