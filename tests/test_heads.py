"""Task-specific heads (issue 12): the spec, the table's classifier paths, training with it, and a saved folder
that reloads to the same logits with hf_freeze and with plain transformers (custom code, hf_freeze not importable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSIFIERS, TinyImages, model_inputs, snapshot, tiny_model, training_args
from transformers import HfArgumentParser, ViTImageProcessor

import hf_freeze
from hf_freeze import FreezePolicy, FreezePolicyError, FreezeTrainer, FreezeTrainingArguments
from hf_freeze._head_module import ACTIVATIONS as MODULE_ACTIVATIONS
from hf_freeze._head_module import MLPHead
from hf_freeze.architectures import ARCHITECTURES
from hf_freeze.folder import HEAD_CONFIG_CODE, HEAD_MODELING_CODE
from hf_freeze.head_config import ACTIVATIONS, HeadConfig
from hf_freeze.heads import classifier_paths, install_head, installed_head

ROOT = Path(__file__).resolve().parents[1]
SPEC = "mlp:16,relu,dropout=0.2"
POLICY = f"freeze=backbone;head={SPEC}"
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def logits(model, pixels=IMAGES):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


# --------------------------------------------------------------------------- the spec
def test_string_dict_json_and_flag_round_trip():
    head = HeadConfig.from_string("mlp:512,256,gelu,dropout=0.1,norm=true")
    assert head == HeadConfig(hidden=(512, 256), activation="gelu", dropout=0.1, norm=True)
    assert HeadConfig.from_string(head.to_string()) == head and HeadConfig.from_dict(head.to_dict()) == head
    policy = FreezePolicy.from_string(POLICY)
    assert policy.head == HeadConfig(hidden=(16,), dropout=0.2)
    assert FreezePolicy.from_dict(json.loads(policy.to_json())) == policy
    assert FreezePolicy.from_string(policy.to_string()) == policy
    assert "head" not in FreezePolicy().to_dict()  # policies written before heads existed read back the same
    (args,) = HfArgumentParser(FreezeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--head", SPEC, "--freeze", "backbone"])
    assert args.freeze_policy() == policy
    assert set(ACTIVATIONS) == set(MODULE_ACTIVATIONS)  # the spec's choices are the module's


@pytest.mark.parametrize("spec, says", [
    ("mlp:64,relux", "valid: relu, gelu, silu, tanh"), ("mlp:0", "must be > 0"), ("mlp:-3", "must be > 0"),
    ("mlp:64,dropout=1", "[0, 1)"), ("mlp:64,dropout=-0.1", "[0, 1)"), ("mlp:", "non-empty"),
    ("dense:64", "head kinds: mlp"), ("mlp:64,norm=maybe", "expected true or false"), ("mlp:64,depth=2", "valid fields"),
])
def test_bad_spec_is_refused_naming_the_valid_choices(spec, says, tmp_path):
    with pytest.raises(FreezePolicyError, match=None) as err:
        FreezePolicy.from_string(f"head={spec}")
    assert says in str(err.value)
    with pytest.raises(FreezePolicyError) as err:  # the flag fails while parsing: no output folder yet
        FreezeTrainingArguments(output_dir=str(tmp_path / "never"), head=spec)
    assert says in str(err.value) and not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- the table: where, how wide
@pytest.mark.parametrize("model_type", CLASSIFIERS)
def test_every_table_type_knows_its_classifier_and_width_or_refuses(model_type):
    model = tiny_model(model_type)
    layout = ARCHITECTURES.get(model_type)
    if layout is not None and not layout.classifier:  # types that cannot take the standard path: a clear refusal
        before = snapshot(model)
        with pytest.raises(FreezePolicyError, match="leave head unset"):
            hf_freeze.apply_policy(model, f"head={SPEC}")
        assert snapshot(model).keys() == before.keys() and hf_freeze.get_state(model) is None
        return
    paths = classifier_paths(model)
    linears = {p: model.get_submodule(p) for p in paths}
    assert all(isinstance(m, torch.nn.Linear) and m.out_features == 3 for m in linears.values())
    # every Linear producing the logits is covered (two for SwiftFormer's head + dist_head)
    assert set(paths) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3}
    widths = {p: m.in_features for p, m in linears.items()}
    report = hf_freeze.apply_policy(model, f"head={SPEC}")
    for p in paths:
        head = model.get_submodule(p)
        assert isinstance(head, MLPHead) and head.in_features == widths[p] and head.out_features == 3
        assert head.layers[0].in_features == widths[p] and head.layers[0].out_features == 16
    head_params = {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in paths)}
    state = hf_freeze.get_state(model)
    assert head_params <= set(state.groups["head"].param_names)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in head_params)
    assert report.trainable_params >= sum(p.numel() for n, p in model.named_parameters() if n in head_params)
    inputs = model_inputs(model_type, model)
    model.train()
    out = model(**inputs)
    assert out.logits.shape == (len(inputs["labels"]), 3)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in head_params)


def test_head_on_a_type_the_table_does_not_know_is_refused_before_anything_changes():
    model = tiny_model("vit")
    model.config.model_type = "my_vit"  # not in the table: groups are discovered, the classifier is not known
    before = snapshot(model)
    with pytest.raises(FreezePolicyError) as err:
        hf_freeze.apply_policy(model, f"head={SPEC}")
    assert "does not know where its classifier lives" in str(err.value) and "resnet" in str(err.value)
    assert isinstance(model.classifier, torch.nn.Linear) and hf_freeze.get_state(model) is None
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_a_frozen_new_head_and_a_second_different_head_are_refused():
    model = tiny_model("resnet")
    with pytest.raises(FreezePolicyError, match="trained from random weights"):
        hf_freeze.apply_policy(model, f"freeze=stem,head;head={SPEC}")
    assert isinstance(model.classifier[1], torch.nn.Linear)
    hf_freeze.apply_policy(model, POLICY)
    trained = snapshot(model)
    with pytest.raises(FreezePolicyError, match="installed once"):
        hf_freeze.apply_policy(model, "head=mlp:8")
    hf_freeze.apply_policy(model, POLICY)  # the same head again: kept, not rebuilt
    assert all(torch.equal(trained[k], v) for k, v in snapshot(model).items())


# --------------------------------------------------------------------------- training with it
def train(tmp_path, policy=POLICY, model_type="resnet", **args):
    model = tiny_model(model_type)
    base = snapshot(model)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=False)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, **args), train_dataset=TinyImages(16),
                            processing_class=processor, freeze_policy=policy)
    trainer.train()
    return trainer, base


def test_trainer_trains_the_head_and_keeps_the_backbone_bit_identical(tmp_path):
    trainer, base = train(tmp_path)
    model = trainer.model
    assert isinstance(model.classifier[1], MLPHead)
    for name, tensor in snapshot(model).items():
        if name.startswith("classifier."):
            continue
        assert torch.equal(tensor, base[name]), name  # BatchNorm statistics included
    card_dir = tmp_path / "card"
    trainer.save_model(str(card_dir))
    trainer.args.output_dir = str(card_dir)
    trainer.create_model_card()
    card = (card_dir / "README.md").read_text()
    n = sum(p.numel() for p in model.classifier[1].parameters())
    assert "Task-specific head" in card and f"({n:,} parameters)" in card and "Linear(32->16) -> ReLU -> Dropout" in card
    assert "trust_remote_code=True" in card


def run_plain(source: str, tmp_path: Path, inputs: dict, env: dict | None = None) -> dict:
    """tests/scripts/plain_transformers_load.py in a process where ``import hf_freeze`` fails."""
    block = tmp_path / "block" / "hf_freeze"
    block.mkdir(parents=True, exist_ok=True)
    (block / "__init__.py").write_text('raise ImportError("hf_freeze is not importable in this process")\n')
    torch.save(inputs, tmp_path / "inputs.pt")
    clean = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "plain_transformers_load.py"), source,
                           str(tmp_path / "inputs.pt"), str(tmp_path / "plain.pt")], cwd=tmp_path / "block",
                          env={**clean, "PYTHONPATH": str(tmp_path / "block")}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "plain.pt")


def image_inputs(folder):
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    processor = ViTImageProcessor.from_pretrained(folder)
    return {"image": torch.from_numpy(image), "pixel_values": processor(image, return_tensors="pt")["pixel_values"]}


def check_travelled(result: dict, reference_model, inputs: dict):
    ref = logits(reference_model, inputs["pixel_values"])
    assert result["blocked"] and result["hf_freeze_modules"] == []
    assert result["model_class"] == result["pipe_model_class"] == "HFFreezeHeadForImageClassification"
    assert torch.equal(result["logits"], ref)  # bit for bit the model hf_freeze trained
    probs = ref.softmax(-1)[0]
    labels = reference_model.config.id2label
    assert result["scores"] == pytest.approx({labels[i]: float(probs[i]) for i in range(len(probs))}, abs=1e-6)
    for refusal in result["refusals"].values():  # never a silently re-initialised head
        assert refusal.startswith("ValueError") and "trust_remote_code=True" in refusal


def test_saved_folder_reloads_same_logits_with_hf_freeze_and_plain_transformers(tmp_path):
    trainer, _ = train(tmp_path)
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "hf_freeze_head-resnet" and set(config["auto_map"]) == {
        "AutoConfig", "AutoModelForImageClassification"}
    assert (folder / HEAD_CONFIG_CODE).is_file() and (folder / HEAD_MODELING_CODE).is_file()
    assert (ROOT / "hf_freeze" / "_head_module.py").read_text() in (folder / HEAD_MODELING_CODE).read_text()
    reloaded = hf_freeze.from_pretrained(folder)
    assert installed_head(reloaded) == HeadConfig.from_string(SPEC)
    assert torch.equal(logits(reloaded), logits(trainer.model))
    assert FreezePolicy.from_pretrained(folder) == trainer.freeze_policy
    # FreezeTrainer takes the reloaded model on under the recorded policy: the head is kept, not rebuilt
    again = FreezeTrainer(model=reloaded, args=training_args(tmp_path / "again", max_steps=1), train_dataset=TinyImages(8))
    assert again.freeze_policy == trainer.freeze_policy and torch.equal(logits(reloaded), logits(trainer.model))
    check_travelled(run_plain(str(folder), tmp_path, image_inputs(folder)), trainer.model, image_inputs(folder))


def test_pushed_to_the_loopback_hub_the_repo_loads_in_plain_transformers(local_hub, tmp_path):
    trainer, _ = train(tmp_path, hub_model_id="tiny-head")
    trainer.push_to_hub()
    repo = f"{local_hub.user}/tiny-head"
    remote = local_hub.files(repo)
    assert {HEAD_CONFIG_CODE, HEAD_MODELING_CODE, "config.json", "model.safetensors"} <= set(remote)
    assert torch.equal(logits(hf_freeze.from_pretrained(repo)), logits(trainer.model))
    inputs = image_inputs(tmp_path / "out")
    check_travelled(run_plain(repo, tmp_path, inputs, env=dict(os.environ)), trainer.model, inputs)


# --------------------------------------------------------------------------- combinations
def test_gradual_unfreezing_and_layer_decay_with_a_head(tmp_path):
    trainer, base = train(tmp_path, "freeze=backbone;unfreeze=step2:1@0.5;layer_lr_decay=0.5;head=mlp:16,gelu,norm=true",
                          max_steps=4)
    model = trainer.model
    state = hf_freeze.get_state(model)
    assert list(state.unfrozen) == ["stage.1"]
    params = dict(model.named_parameters())
    head = {id(params[n]) for n in state.groups["head"].param_names}
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.classifier[1].modules())
    by_name = {g["name"]: g for g in trainer.optimizer.param_groups}
    # the new head: its own optimizer groups at the base LR; stage.1 decayed once, unfrozen at 0.5
    assert {id(p) for k in ("head/decay", "head/no_decay") for p in by_name[k]["params"]} == head
    assert by_name["head/decay"]["lr_scale"] == 1.0 and by_name["stage.1/decay"]["lr_scale"] == 0.25
    changed = [n for n, t in snapshot(model).items() if n not in base or not torch.equal(t, base[n])]
    assert any(n.startswith("resnet.encoder.stages.1.") for n in changed)  # unfrozen and trained
    assert not any(n.startswith(("resnet.embedder.", "resnet.encoder.stages.0.")) for n in changed)
    hf_freeze.verify_frozen(model)


def test_adapter_saves_the_head_whole_and_reloads_same_logits(tmp_path):
    pytest.importorskip("peft")
    trainer, _ = train(tmp_path, f"freeze=backbone;adapter=lora,r=2,groups=1;head={SPEC}", max_steps=2)
    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    assert not (folder / HEAD_MODELING_CODE).exists()  # an adapter folder is loaded by hf_freeze/peft on its base
    base_dir = tmp_path / "base"
    tiny_model("resnet").save_pretrained(base_dir)
    reloaded = hf_freeze.from_pretrained(folder, base_model=str(base_dir))
    assert torch.equal(logits(reloaded), logits(trainer.model))
    saved = json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    assert any("classifier" in m for m in saved)


def test_feature_cache_serves_the_new_head_and_equals_cache_off(tmp_path):
    runs = {}
    for mode in ("memory", "off"):
        trainer, _ = train(tmp_path / mode, "freeze=backbone;head=mlp:16,relu", feature_cache=mode)
        runs[mode] = trainer
    info = runs["memory"].feature_cache_info  # memory mode refuses rather than run without the cache
    assert runs["memory"].feature_cache_refusal is None and info.get("served_steps", 0) > 0, info
    a, b = snapshot(runs["memory"].model), snapshot(runs["off"].model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_delta_holds_the_head_tensors_and_rebuilds_the_same_logits(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("resnet").save_pretrained(base_dir)
    trainer, _ = train(tmp_path, POLICY, save_delta=True, delta_base_model=str(base_dir))
    folder = tmp_path / "delta"
    trainer.save_model(str(folder))
    manifest = json.loads((folder / "freeze_delta.json").read_text())
    head = {n for n, _ in trainer.model.named_parameters() if n.startswith("classifier.1.")}
    assert head and head <= set(manifest["trained_tensors"])
    assert not (folder / HEAD_MODELING_CODE).exists()
    reloaded = hf_freeze.from_pretrained(folder)
    assert torch.equal(logits(reloaded), logits(trainer.model))


@pytest.mark.parametrize("model_type, cls, paths", [
    ("deit", "DeiTForImageClassificationWithTeacher", ("cls_classifier", "distillation_classifier")),
    ("levit", "LevitForImageClassificationWithTeacher", ("classifier.linear", "classifier_distill.linear")),
])
def test_distillation_variants_get_the_spec_on_each_classifier(model_type, cls, paths):
    import transformers

    from hf_freeze.tiny import tiny_config

    torch.manual_seed(0)
    model = getattr(transformers, cls)(tiny_config(model_type))
    assert classifier_paths(model) == paths
    install_head(model, HeadConfig.from_string(SPEC))
    assert all(isinstance(model.get_submodule(p), MLPHead) for p in paths)
    size = 64 if model_type == "levit" else 32
    assert model(pixel_values=torch.randn(2, 3, size, size)).logits.shape == (2, 3)
