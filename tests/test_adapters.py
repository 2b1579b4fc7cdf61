"""PEFT adapters instead of unfreezing: config, target resolution by group, Trainer runs, save/reload/merge, report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FASHION_MNIST,
    StopAt,
    TinyImages,
    identical,
    model_state,
    same_state,
    snapshot,
    tiny_model,
    training_args,
)
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from shared_data import fashion_mnist, few_shot_indices
from test_multiprocess import free_port
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, Trainer, TrainerCallback

import hf_freeze
from hf_freeze import (
    AdapterConfig,
    FreezeCallback,
    FreezePolicy,
    FreezePolicyError,
    FreezeTrainer,
    FreezeTrainingArguments,
    FrozenWeightsChanged,
)
from hf_freeze.adapter_plan import resolve_adapter, skip_reason
from hf_freeze.adapters import expose_conv_geometry
from hf_freeze.names import ADAPTER, COPY, named_base_tensors, named_peft_parameters, peft_wrappers
from hf_freeze.tiny import IMAGE_SIZE


def logits(model, pixels) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def adapter_tensors(model, role=ADAPTER) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, _, r, p in named_peft_parameters(model) if r == role}


def plan_for(model, policy):
    policy = FreezePolicy.coerce(policy)
    groups = hf_freeze.layer_groups(model)
    return resolve_adapter(policy, groups, hf_freeze.resolve(policy, groups), model)


def saved_keys(folder) -> list[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


# =========================================================================== config

def test_adapter_config_round_trips_through_dict_json_and_strings():
    policy = FreezePolicy(train_bn=True, layer_lr_decay=0.8, adapter=AdapterConfig(
        "lora", r=4, alpha=8, dropout=0.1, groups=["stage.2", "stage.3"], options={"use_rslora": True}))
    text = policy.to_string()
    assert text == "freeze=backbone;train_bn=true;layer_lr_decay=0.8;adapter=lora,r=4,alpha=8,dropout=0.1,groups=stage.2+stage.3,use_rslora=true"
    assert FreezePolicy.from_string(text) == policy
    assert FreezePolicy.from_dict(json.loads(policy.to_json())) == policy
    assert FreezePolicy.from_string("adapter=loha,r=2,groups=3").adapter == AdapterConfig("loha", r=2, groups=3)
    # a policy without adapter serialises exactly as before (no "adapter" key)
    assert "adapter" not in FreezePolicy().to_dict()
    # a peft config carries its hyper-parameters; its target modules come from the groups
    from_peft = FreezePolicy(adapter=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, use_dora=True)).adapter
    assert from_peft == AdapterConfig("lora", r=16, alpha=32, dropout=0.05, options={"use_dora": True})
    config = from_peft.peft_config("^(?:a)$", ["classifier"])
    assert (config.r, config.lora_alpha, config.use_dora, config.target_modules, config.modules_to_save) == (
        16, 32, True, "^(?:a)$", ["classifier"])


BAD_CONFIGS = [
    (lambda: AdapterConfig(method="lorax"), r"expected one of \['loha', 'lokr', 'lora'\]"),
    (lambda: AdapterConfig(r=0), "r must be an integer >= 1"),
    (lambda: AdapterConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (lambda: AdapterConfig(groups=0), "must be >= 1"),
    (lambda: AdapterConfig(options={"target_modules": ["conv"]}), "resolved by hf_freeze"),
    (lambda: AdapterConfig(options={"lora_alpha": 4}), "give it as AdapterConfig r=/alpha=/dropout="),
    (lambda: AdapterConfig(options={"use_dorra": True}), "not a field of LoraConfig; valid: .*'use_dora'"),
    (lambda: AdapterConfig(options={"init_lora_weights": ["x"]}), "only scalar options"),
    (lambda: AdapterConfig.from_string("lora,r"), "expected key=value"),
    (lambda: AdapterConfig.from_string("lora,r=big"), "r='big' is not a number"),
    (lambda: FreezePolicy(adapter="lora", unfreeze=["epoch1:1"]), "no unfreeze schedule"),
    (lambda: FreezePolicy(adapter=LoraConfig(target_modules=["query"])), "leave it unset and give groups="),
    (lambda: FreezePolicy(adapter=3.5), "expected an AdapterConfig, dict, adapter string"),
]


@pytest.mark.parametrize("make,message", BAD_CONFIGS)
def test_bad_adapter_configs_say_what_is_wrong(make, message):
    with pytest.raises(FreezePolicyError, match=message):
        make()


BAD_FOR_MODEL = [
    ("adapter=lora,groups=head", "the head is trained whole"),
    ("freeze=stem;adapter=lora,groups=stage.1", r"adapter groups \['stage.1'\] are not fully frozen"),
    ("adapter=lora,groups=stage.9", "unknown group 'stage.9'; groups are"),
    ("adapter=lora,groups=4", "only 3 groups before the head"),
    ("freeze=stem,stage.0,stage.1,classifier.1.weight;adapter=lora,groups=stage.1",
     "module 'classifier.1' holds parameters this policy trains and frozen ones \\('classifier.1.weight'\\)"),
]


@pytest.mark.parametrize("policy,message", BAD_FOR_MODEL)
def test_policy_that_does_not_fit_the_model_is_refused_before_anything_changes(policy, message):
    model = tiny_model("resnet")
    before = model_state(model)
    with pytest.raises(FreezePolicyError, match=message):
        hf_freeze.add_adapter(model, policy)
    assert same_state(before, model_state(model)) and not peft_wrappers(model)


def test_apply_policy_needs_the_wrapped_model_and_a_matching_adapter():
    model = tiny_model("resnet")
    with pytest.raises(FreezePolicyError, match=r"wrap the model with hf_freeze.add_adapter"):
        hf_freeze.apply_policy(model, "adapter=lora")
    wrapped = hf_freeze.add_adapter(model, "adapter=lora,groups=1")
    with pytest.raises(FreezePolicyError, match=r"adapted layers: only in the model \[\], only in the policy"):
        hf_freeze.apply_policy(wrapped, "adapter=lora,groups=2")
    with pytest.raises(FreezePolicyError, match="carries a PEFT adapter but the policy has none"):
        hf_freeze.apply_policy(wrapped, "backbone")
    with pytest.raises(FreezePolicyError, match="already carries a PEFT adapter"):
        hf_freeze.add_adapter(wrapped, "adapter=lora,groups=1")
    with pytest.raises(FreezePolicyError, match="trains an adapter and keeps every pretrained tensor frozen"):
        hf_freeze.unfreeze_groups(wrapped, ["stage.1"])


# =========================================================================== resolution

def test_targets_are_the_named_groups_conv_layers_minus_depthwise_ones():
    model = tiny_model("mobilenet_v2")
    plan = plan_for(model, "adapter=lora,groups=stage.3+neck")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and n.startswith(("mobilenet_v2.layer.3.", "mobilenet_v2.conv_1x1."))]
    depthwise = [n for n in convs if model.get_submodule(n).groups > 1]
    assert len(depthwise) == 1 and len(convs) == 4  # expand, depthwise, reduce; the neck 1x1
    assert list(plan.targets) == [n for n in convs if n not in depthwise]
    assert [n for n, _ in plan.skipped] == depthwise
    assert "groups=" in plan.skipped[0][1] and "cannot merge" in plan.skipped[0][1]
    assert plan.modules_to_save == ("classifier",)
    # the regex PEFT receives matches exactly these names (fullmatch semantics)
    import re
    assert [n for n, _ in model.named_modules() if re.fullmatch(plan.target_regex, n)] == list(plan.targets)


def test_int_groups_count_the_last_adaptable_groups_and_linear_layers_are_targets():
    vit = tiny_model("vit")  # neck is a LayerNorm: not adaptable, so "the last group" is stage.1
    plan = plan_for(vit, "adapter=lora,groups=1")
    assert plan.groups == ("stage.1",)
    assert list(plan.targets) == [n for n, m in vit.named_modules() if isinstance(m, nn.Linear)
                                  and n.startswith("vit.layers.1.")]
    assert len(plan.targets) == 6  # q, k, v, attention output, intermediate, output


def test_layers_that_override_forward_are_skipped_with_the_reason():
    bit = tiny_model("bit")  # weight-standardised convolutions only: a merged delta would be standardised too
    with pytest.raises(FreezePolicyError, match=r"hold no layer an adapter can go on \(bit.encoder.stages.1.*"
                                                r"WeightStandardizedConv2d overrides forward\(\)"):
        plan_for(bit, "adapter=lora,groups=stage.1")
    timm = tiny_model("timm_wrapper")  # a mix: timm's plain convs get adapters, none is skipped
    assert plan_for(timm, "adapter=lora,groups=1").targets and not plan_for(timm, "adapter=lora,groups=1").skipped
    mha = nn.MultiheadAttention(8, 2)
    assert "uses its out_proj weight directly" in skip_reason(mha.out_proj, mha)


def test_train_bn_saves_frozen_batchnorm_with_the_adapter():
    model = tiny_model("resnet")
    plan = plan_for(model, "freeze=backbone;train_bn=true;adapter=lora,groups=stage.1")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(plan.modules_to_save) == {"classifier.1", *norms}


# =========================================================================== train, save, reload, merge

class AdapterStart(TrainerCallback):
    """The adapter tensors as they were when training began (after wrapping, before the first update)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = adapter_tensors(model)


FAMILIES = [("resnet", False), ("resnet", True), ("convnext", False), ("vit", False), ("mobilenet_v2", False),
            ("timm_wrapper", False)]


@pytest.mark.parametrize("model_type,train_bn", FAMILIES)
def test_train_save_reload_and_merge_reproduce_the_trained_model(tmp_path, model_type, train_bn):
    size = IMAGE_SIZE.get(model_type, 32)
    model = tiny_model(model_type, seed=1)
    pretrained = snapshot(model)
    policy = FreezePolicy(train_bn=train_bn, adapter=AdapterConfig(r=4, alpha=8, groups=2))
    start = AdapterStart()
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1, learning_rate=0.01),
                            train_dataset=TinyImages(n=16, size=size), freeze_policy=policy, callbacks=[start])
    trainer.train()
    wrapped = trainer.model
    assert isinstance(wrapped, PeftModel)

    # every pretrained tensor (BatchNorm statistics included) is bit-identical; the adapters trained
    base = named_base_tensors(wrapped)
    assert set(base) == set(pretrained)
    assert [n for n in pretrained if not identical(pretrained[n], base[n])] == []
    hf_freeze.verify_frozen(wrapped)
    now = adapter_tensors(wrapped)
    assert now and [n for n in now if identical(now[n], start.start[n])] == []

    pixels = TinyImages(n=6, size=size, seed=9).pixels
    trained = logits(wrapped, pixels)
    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    assert FreezePolicy.from_pretrained(folder) == policy
    assert {"adapter_config.json", "adapter_model.safetensors", "freeze_policy.json"} <= {p.name for p in folder.iterdir()}
    keys = saved_keys(folder)
    assert any(k.endswith("running_mean") for k in keys) == train_bn  # BN statistics travel only when they train

    reloaded = hf_freeze.load_adapter(tiny_model(model_type, seed=1), folder)
    assert torch.equal(logits(reloaded, pixels), trained)
    plain = PeftModel.from_pretrained(tiny_model(model_type, seed=1), str(folder))  # PEFT's own loader
    expose_conv_geometry(plain)  # needed by MobileNet's TF padding only
    assert torch.equal(logits(plain, pixels), trained)
    merged = hf_freeze.load_adapter(tiny_model(model_type, seed=1), folder).merge_and_unload()
    assert type(merged) is type(model) and not peft_wrappers(merged)
    torch.testing.assert_close(logits(merged, pixels), trained, rtol=1e-4, atol=1e-4)


def test_naive_lora_lets_batchnorm_drift_so_its_reload_differs(tmp_path):
    """The failure hf_freeze prevents: plain PEFT training updates BN statistics that the adapter does not save."""
    model = get_peft_model(tiny_model("resnet", seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["convolution"],
                                                                     modules_to_save=["classifier"]))
    Trainer(model=model, args=training_args(tmp_path, num_train_epochs=1, learning_rate=0.01),
            train_dataset=TinyImages(n=16)).train()
    pixels = TinyImages(n=6, seed=9).pixels
    model.save_pretrained(str(tmp_path / "naive"))
    reloaded = PeftModel.from_pretrained(tiny_model("resnet", seed=1), str(tmp_path / "naive"))
    assert not torch.allclose(logits(reloaded, pixels), logits(model, pixels), atol=1e-3)


def test_train_bn_updates_only_the_saved_copies_of_batchnorm(tmp_path):
    model = tiny_model("resnet", seed=1)
    pretrained = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1, learning_rate=0.01),
                            train_dataset=TinyImages(n=16), freeze_policy="train_bn=true;adapter=lora,r=4,groups=1")
    trainer.train()
    copies = {base: p.detach() for _, base, role, p in named_peft_parameters(model) if role == COPY}
    stats = {n: b for n, b in model.named_buffers() if ".modules_to_save.default." in n and n.endswith("running_mean")}
    assert stats and all(not identical(b, pretrained[n.replace(".modules_to_save.default", "")]) for n, b in stats.items())
    # the copies' affine weights stay frozen (train_bn trains statistics only); the head copy trains
    bn_weights = [n for n in copies if ".normalization." in n]
    assert bn_weights and all(identical(copies[n], pretrained[n]) for n in bn_weights)
    assert not identical(copies["classifier.1.weight"], pretrained["classifier.1.weight"])
    assert hf_freeze.changed_frozen_tensors(model) == []


def test_verification_names_a_changed_pretrained_tensor(tmp_path):
    wrapped = hf_freeze.add_adapter(tiny_model("resnet"), "adapter=lora,r=4,groups=1")
    layer = wrapped.base_model.model.resnet.encoder.stages[1].layers[0].layer[0]
    with torch.no_grad():
        layer.convolution.base_layer.weight[0, 0, 0, 0] += 1  # an adapted layer's pretrained weight
        wrapped.base_model.model.classifier[1].original_module.bias[0] += 1  # the pretrained head under its copy
    with pytest.raises(FrozenWeightsChanged) as err:
        hf_freeze.verify_frozen(wrapped)
    assert sorted(err.value.changed) == ["classifier.1.bias", "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"]


def test_report_shows_adapter_parameters_per_group():
    model = tiny_model("resnet")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".stages.1." in n}
    wrapped = hf_freeze.add_adapter(model, "adapter=lora,r=4,groups=stage.1")
    report = hf_freeze.freeze_report(wrapped)
    lora = sum(4 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 4 for m in convs.values())
    head = model.config.hidden_sizes[-1] * 3 + 3
    rows = {r.name: (r.adapter, r.trainable, r.state) for r in report.rows}
    assert rows == {"stem": (0, 0, "frozen"), "stage.0": (0, 0, "frozen"), "stage.1": (lora, lora, "adapter"),
                    "head": (head, head, "trainable")}
    assert report.trainable_params == lora + head == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert report.frozen_params == report.total_params == sum(p.numel() for p in tiny_model("resnet").parameters())
    text = str(report)
    assert text.splitlines()[3].split()[:4] == ["group", "params", "trainable", "adapter"]
    assert f"Adapter: lora,r=4,alpha=16,groups=stage.1 on {len(convs)} layer(s)" in text
    assert f"| stage.1 | {report.row('stage.1').params:,} | {lora:,} | {lora:,} | adapter |" in report.to_markdown()
    mnv2 = hf_freeze.freeze_report(hf_freeze.add_adapter(tiny_model("mobilenet_v2"), "adapter=lora,groups=stage.15"))
    assert "No adapter on 1 layer(s) (mobilenet_v2.layer.15.conv_3x3.convolution): grouped/depthwise" in str(mnv2)


# =========================================================================== Trainer paths

def test_command_line_flags_build_the_adapter_and_its_optimizer_groups(tmp_path):
    parser = HfArgumentParser(FreezeTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path / "o"), "--adapter", "lora", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.1", "--adapter_groups", "stage.0,stage.1", "--layer_lr_decay", "0.5", "--report_to",
        "none", "--use_cpu", "--per_device_train_batch_size", "8", "--max_steps", "2", "--learning_rate", "0.01"])
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=args, train_dataset=TinyImages(n=16))
    assert trainer.freeze_policy.adapter == AdapterConfig(r=4, alpha=8.0, dropout=0.1, groups=["stage.0", "stage.1"])
    trainer.train()
    in_optimizer = [p for pg in trainer.optimizer.param_groups for p in pg["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(in_optimizer) == len(trainable) and {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    scales = {pg["name"].split("/")[0]: pg["lr_scale"] for pg in trainer.optimizer.param_groups}
    assert scales == {"stage.0": 0.25, "stage.1": 0.5, "head": 1.0}
    with pytest.raises(FreezePolicyError, match="--lora_r given without --adapter"):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--lora_r", "4"])[0].freeze_policy()
    with pytest.raises(FreezePolicyError, match=r"already sets \['r'\]"):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--adapter", "lora,r=2", "--lora_r", "4"])[0].freeze_policy()


def test_plain_trainer_with_freeze_callback_trains_and_checkpoints_the_adapter(tmp_path):
    policy = FreezePolicy(adapter="lora,r=4,groups=1")
    wrapped = hf_freeze.add_adapter(tiny_model("resnet", seed=1), policy)
    trainer = Trainer(model=wrapped, args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                                                        learning_rate=0.01),
                      train_dataset=TinyImages(n=16), callbacks=[FreezeCallback(policy)])
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert FreezePolicy.from_pretrained(checkpoint) == policy
    pixels = TinyImages(n=4, seed=9).pixels
    assert torch.equal(logits(hf_freeze.load_adapter(tiny_model("resnet", seed=1), checkpoint), pixels),
                       logits(wrapped, pixels))
    with pytest.raises(FreezePolicyError, match="hf_freeze.add_adapter"):
        Trainer(model=tiny_model("resnet"), args=training_args(tmp_path), callbacks=[FreezeCallback(policy)])


def test_resumed_adapter_run_equals_the_uninterrupted_one(tmp_path):
    policy = "train_bn=true;layer_lr_decay=0.5;adapter=lora,r=4,alpha=8,groups=2"
    kwargs = dict(num_train_epochs=2, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", learning_rate=0.01)
    full = FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "a", **kwargs),
                         train_dataset=TinyImages(n=16), freeze_policy=policy)
    full.train()
    FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "b", **kwargs),
                  train_dataset=TinyImages(n=16), freeze_policy=policy, callbacks=[StopAt(2)]).train()
    resumed = FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "b", **kwargs),
                            train_dataset=TinyImages(n=16), freeze_policy=policy)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and [n for n in a if not identical(a[n], b[n])] == []


def test_bf16_autocast_trains_the_adapter_and_keeps_the_base(tmp_path):
    model = tiny_model("resnet", seed=1)
    pretrained = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, bf16=True, num_train_epochs=1, learning_rate=0.01),
                            train_dataset=TinyImages(n=16), freeze_policy="adapter=lora,r=4,groups=2")
    trainer.train()
    base = named_base_tensors(model)
    assert [n for n in pretrained if not identical(pretrained[n], base[n])] == []
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.save_model(str(tmp_path / "a"))
    pixels = TinyImages(n=4, seed=9).pixels
    reloaded = hf_freeze.load_adapter(tiny_model("resnet", seed=1), tmp_path / "a")
    # accelerate left the trained model's forward under bf16 autocast: compare in the same precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(reloaded, pixels), logits(trainer.model, pixels))


@pytest.mark.parametrize("adapter", ["loha,r=4,alpha=4", "lokr,r=4,alpha=4", "lora,r=4,use_dora=true"])
def test_lora_relatives_save_reload_and_merge(tmp_path, adapter):
    wrapped = hf_freeze.add_adapter(tiny_model("resnet", seed=1), f"adapter={adapter},groups=1")
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.01)
    data = TinyImages(n=16)
    for _ in range(3):
        wrapped.train()
        wrapped(pixel_values=data.pixels, labels=data.labels).loss.backward()
        opt.step()
        opt.zero_grad()
    hf_freeze.verify_frozen(wrapped)
    hf_freeze.save_adapter(wrapped, tmp_path / "a")
    pixels = TinyImages(n=4, seed=9).pixels
    trained = logits(wrapped, pixels)
    assert torch.equal(logits(hf_freeze.load_adapter(tiny_model("resnet", seed=1), tmp_path / "a"), pixels), trained)
    merged = hf_freeze.load_adapter(tiny_model("resnet", seed=1), tmp_path / "a").merge_and_unload()
    torch.testing.assert_close(logits(merged, pixels), trained, rtol=1e-4, atol=1e-4)


# =========================================================================== depth: the real MobileNetV2

@pytest.mark.slow
def test_real_mobilenet_v2_adapter_run_reloads_and_merges_exactly(tmp_path, mobilenet_v2_path):
    def base(seed):  # a new 10-class head, initialised differently each time
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_pretrained(mobilenet_v2_path, num_labels=10,
                                                               ignore_mismatched_sizes=True)

    processor = AutoImageProcessor.from_pretrained(mobilenet_v2_path)
    images, labels = fashion_mnist(FASHION_MNIST, "train")
    idx = few_shot_indices(labels, 2, seed=0)
    pixels = processor([Image.fromarray(images[i]).convert("RGB") for i in idx], size={"shortest_edge": 128},
                       crop_size={"height": 128, "width": 128}, return_tensors="pt")["pixel_values"]
    data = [{"pixel_values": x, "labels": int(y)} for x, y in zip(pixels, labels[idx])]

    model = base(0)
    pretrained = {n: t for n, t in snapshot(model).items() if not n.startswith("classifier.")}
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, max_steps=3, per_device_train_batch_size=10,
                                                            learning_rate=0.01),
                            train_dataset=data, freeze_policy="adapter=lora,r=8,alpha=16,groups=2")
    trainer.train()
    report = hf_freeze.freeze_report(trainer.model)
    assert [r.name for r in report.rows if r.adapter] == ["stage.15", "neck", "head"]
    assert report.adapter_skipped == (("mobilenet_v2.layer.15.conv_3x3.convolution", report.adapter_skipped[0][1]),)
    base_now = named_base_tensors(trainer.model)  # 314 pretrained tensors, folded BN statistics included
    assert [n for n in pretrained if not identical(pretrained[n], base_now[n])] == []
    assert report.fingerprinted == 314 and hf_freeze.changed_frozen_tensors(trainer.model) == []

    trained = logits(trainer.model, pixels[:6])
    trainer.save_model(str(tmp_path / "adapter"))
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < (mobilenet_v2_path / "model.safetensors").stat().st_size / 20
    assert torch.equal(logits(hf_freeze.load_adapter(base(1), tmp_path / "adapter"), pixels[:6]), trained)
    merged = hf_freeze.load_adapter(base(2), tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(merged, pixels[:6]), trained, rtol=1e-4, atol=1e-4)
    assert (logits(merged, pixels[:6]).argmax(-1) == trained.argmax(-1)).all()


# =========================================================================== two processes

@pytest.mark.slow
def test_two_processes_train_identical_adapters_and_keep_the_base(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_adapter.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for _attempt in range(2):  # gloo occasionally aborts at process exit after the work is done
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)],
                              capture_output=True, text=True, timeout=900, env=env)
        if all((tmp_path / f"rank{r}.pt").is_file() for r in (0, 1)):
            break
    assert all((tmp_path / f"rank{r}.pt").is_file() for r in (0, 1)), proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2 and r0["first_batch"] != r1["first_batch"]  # each rank saw different data
    # adapters and head copy trained, identically on both ranks (so gradients were all-reduced)
    assert [n for n in r0["adapter"] if not identical(r0["adapter"][n], r1["adapter"][n])] == []
    assert [n for n in r0["adapter"] if identical(r0["adapter"][n], r0["adapter_start"][n])] == []
    for r in (r0, r1):  # the pretrained tensors are bit-identical on both ranks
        assert [n for n in r["pretrained"] if not identical(r["pretrained"][n], r["base"][n])] == []
    reloaded = hf_freeze.load_adapter(tiny_model("resnet", seed=1), tmp_path / "adapter")
    saved = {n: p for n, _, _, p in named_peft_parameters(reloaded)}
    assert saved.keys() == r0["adapter"].keys() and all(identical(saved[n], r0["adapter"][n]) for n in saved)


def test_inspect_previews_the_adapter_layers(capsys):
    from hf_freeze.cli import main

    assert main(["inspect", "tiny:mobilenet_v2", "--policy", "adapter=lora,r=4,groups=2"]) == 0
    out = capsys.readouterr().out
    assert "Adapter: lora,r=4,alpha=16,groups=2 on 3 layer(s)" in out
    assert "No adapter on 1 layer(s) (mobilenet_v2.layer.15.conv_3x3.convolution): grouped/depthwise" in out
    assert main(["inspect", "tiny:resnet", "--policy", "adapter=lora,groups=head"]) == 2
    assert "the head is trained whole" in capsys.readouterr().err


def test_a_named_group_without_adaptable_layers_is_refused_but_a_range_may_span_one():
    vit = tiny_model("vit")  # neck = the final LayerNorm
    with pytest.raises(FreezePolicyError, match=r"adapter groups \['neck'\] hold no layer an adapter can go on"):
        plan_for(vit, "adapter=lora,groups=stage.1+neck")
    assert plan_for(vit, "adapter=lora,groups=stage.1:neck").groups == ("stage.1",)


def test_model_init_models_are_wrapped_too(tmp_path):
    trainer = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1), args=training_args(tmp_path, max_steps=2),
                            train_dataset=TinyImages(n=16), freeze_policy="adapter=lora,r=4,groups=1")
    trainer.train()
    assert isinstance(trainer.model, PeftModel) and hf_freeze.freeze_report(trainer.model).row("stage.1").adapter > 0
    pretrained = snapshot(tiny_model("resnet", seed=1))
    base = named_base_tensors(trainer.model)
    assert [n for n in pretrained if not identical(pretrained[n], base[n])] == []
