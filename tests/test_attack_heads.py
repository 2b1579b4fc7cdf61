"""Attack on README "Task-specific heads": the head with the other features, bad input, crashes, odd models.

Each test asserts the promised behaviour; ``xfail(strict=True, reason="BUG: ...")`` marks a break found by the
attack (remove the mark once fixed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import StopAt, TinyImages, head_phase_served, identical, snapshot, tiny_model, training_args
from transformers import AutoModelForImageClassification

import hf_freeze
from hf_freeze import FreezePolicy, FreezePolicyError, FreezeTrainer
from hf_freeze._head_module import MLPHead
from hf_freeze.folder import HEAD_MODELING_CODE
from hf_freeze.head_config import HeadConfig
from hf_freeze.heads import installed_head
from hf_freeze.tiny import tiny_config

SPEC = "mlp:16,relu,dropout=0.2"
POLICY = f"freeze=backbone;head={SPEC}"
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def logits(model, pixels=X32):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def trainer_for(tmp_path, policy=POLICY, model=None, callbacks=(), **args):
    return FreezeTrainer(model=model if model is not None else tiny_model("resnet"),
                         args=training_args(tmp_path, **args), train_dataset=TinyImages(16),
                         eval_dataset=TinyImages(8, seed=1), freeze_policy=policy, callbacks=list(callbacks))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)


def plain_refuses_without_trust(folder) -> str:
    """What transformers does with the folder without trust_remote_code: it must refuse, never load."""
    try:
        AutoModelForImageClassification.from_pretrained(folder)
    except ValueError as e:
        return str(e)
    return "loaded"


# --------------------------------------------------------------------------- it travels: every way of saving
def test_apply_policy_then_save_pretrained_travels_to_plain_transformers(tmp_path):
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, POLICY)
    model.save_pretrained(tmp_path / "f")
    assert "trust_remote_code=True" in plain_refuses_without_trust(tmp_path / "f")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "f", trust_remote_code=True)
    # the same tensors; logits compared with hf_freeze's reload (a freshly built Linear and a loaded one may take
    # different CPU kernels: 3e-8 apart on the same weights, measured here)
    assert same_tensors(snapshot(plain), snapshot(model))
    assert torch.equal(logits(plain), logits(hf_freeze.from_pretrained(tmp_path / "f")))


def test_reloaded_head_model_saved_again_with_save_pretrained_still_travels(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "first"))
    reloaded = hf_freeze.from_pretrained(tmp_path / "first")
    reloaded.save_pretrained(tmp_path / "second")
    assert "trust_remote_code=True" in plain_refuses_without_trust(tmp_path / "second")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "second", trust_remote_code=True)
    assert torch.equal(logits(plain), logits(trainer.model))


def test_a_model_with_a_head_pickles_deep_copies_and_still_travels(tmp_path):
    import copy
    import pickle

    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, POLICY)
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(twin) is type(model) and same_tensors(snapshot(twin), snapshot(model))
        assert torch.equal(logits(twin), logits(model))
    twin.save_pretrained(tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["model_type"] == "hf_freeze_head-resnet"
    assert (tmp_path / "f" / HEAD_MODELING_CODE).is_file()


def _fail_writing_head_code(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if HEAD_MODELING_CODE in self.name:  # the file itself or a temporary copy of it: the disk is full
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_save_failing_while_writing_the_head_code_never_leaves_a_silently_wrong_folder(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.train()
    with monkeypatch.context() as m:
        _fail_writing_head_code(m)
        with pytest.raises(OSError):
            trainer.save_model(str(tmp_path / "f"))
    assert plain_refuses_without_trust(tmp_path / "f") != "loaded"


def test_second_save_into_the_same_folder_failing_keeps_the_folder_loadable_or_refused(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.train()
    folder = tmp_path / "f"
    trainer.save_model(str(folder))
    with monkeypatch.context() as m:
        _fail_writing_head_code(m)
        with pytest.raises(OSError):
            trainer.save_model(str(folder))
    result = plain_refuses_without_trust(folder)
    assert result != "loaded", result


def test_checkpoint_folders_carry_the_head_code_and_resume_equals_an_uninterrupted_run(tmp_path):
    full = trainer_for(tmp_path / "full", save_strategy="steps", save_steps=2, max_steps=4)
    full.train()
    cut = trainer_for(tmp_path / "cut", save_strategy="steps", save_steps=2, max_steps=4, callbacks=[StopAt(2)])
    cut.train()
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    assert (checkpoint / HEAD_MODELING_CODE).is_file()
    plain = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(plain).__name__ == "HFFreezeHeadForImageClassification"
    assert torch.equal(logits(plain), logits(hf_freeze.from_pretrained(checkpoint)))
    resumed = trainer_for(tmp_path / "cut", save_strategy="steps", save_steps=2, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert same_tensors(snapshot(resumed.model), snapshot(full.model))


@pytest.mark.parametrize("policy", ["freeze=backbone;head=mlp:8", "freeze=backbone"])
def test_resume_with_a_different_or_no_head_is_refused(tmp_path, policy):
    cut = trainer_for(tmp_path, save_strategy="steps", save_steps=2, max_steps=4, callbacks=[StopAt(2)])
    cut.train()
    again = trainer_for(tmp_path, policy=policy, save_strategy="steps", save_steps=2, max_steps=4)
    before = snapshot(again.model)
    with pytest.raises(FreezePolicyError, match="cannot resume"):
        again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert same_tensors(before, snapshot(again.model))


@pytest.mark.parametrize("delta", [False, True])
def test_load_best_model_at_end_with_a_head_restores_the_best_checkpoint(tmp_path, delta):
    extra = {}
    if delta:
        tiny_model("resnet").save_pretrained(tmp_path / "base")
        extra = dict(save_delta=True, delta_base_model=str(tmp_path / "base"))
    trainer = trainer_for(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                          max_steps=3, load_best_model_at_end=True, metric_for_best_model="loss",
                          greater_is_better=False, learning_rate=0.5, **extra)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert same_tensors(snapshot(trainer.model), snapshot(hf_freeze.from_pretrained(best)))
    hf_freeze.verify_frozen(trainer.model)


def test_save_twice_into_one_folder_full_then_delta_then_full(tmp_path):
    tiny_model("resnet").save_pretrained(tmp_path / "base")
    folder = tmp_path / "same"
    full = trainer_for(tmp_path / "a", max_steps=2)
    full.train()
    full.save_model(str(folder))
    delta = trainer_for(tmp_path / "b", max_steps=2, seed=1, save_delta=True, delta_base_model=str(tmp_path / "base"))
    delta.train()
    delta.save_model(str(folder))
    assert not (folder / HEAD_MODELING_CODE).exists() and not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "resnet"
    assert torch.equal(logits(hf_freeze.from_pretrained(folder)), logits(delta.model))
    full.save_model(str(folder))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "hf_freeze_head-resnet"
    assert not (folder / "freeze_delta.json").exists()
    assert torch.equal(logits(hf_freeze.from_pretrained(folder)), logits(full.model))
    assert torch.equal(logits(AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)),
                       logits(full.model))


# --------------------------------------------------------------------------- reload and train again
def test_reloaded_head_folder_trained_with_another_head_is_refused_before_anything(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "f"))
    reloaded = hf_freeze.from_pretrained(tmp_path / "f")
    before = snapshot(reloaded)
    with pytest.raises(FreezePolicyError, match="installed once"):
        trainer_for(tmp_path / "again", policy="freeze=backbone;head=mlp:8", model=reloaded)
    assert not (tmp_path / "again" / "out").exists() and same_tensors(before, snapshot(reloaded))
    with pytest.raises(FreezePolicyError, match="already carries head"):
        trainer_for(tmp_path / "again", policy="freeze=backbone", model=reloaded)


def test_reloaded_head_folder_trains_on_with_a_delta_on_that_folder(tmp_path):
    first = trainer_for(tmp_path / "a", max_steps=2)
    first.train()
    first.save_model(str(tmp_path / "f"))
    reloaded = hf_freeze.from_pretrained(tmp_path / "f")
    before = snapshot(reloaded)
    second = trainer_for(tmp_path / "b", policy=f"freeze=stem;head={SPEC}", model=reloaded, max_steps=2,
                         save_delta=True, delta_base_model=str(tmp_path / "f"))
    second.train()
    assert all(identical(before[n], t) for n, t in snapshot(second.model).items() if n.startswith("resnet.embedder."))
    second.save_model(str(tmp_path / "d"))
    assert torch.equal(logits(hf_freeze.from_pretrained(tmp_path / "d")), logits(second.model))


def test_from_pretrained_with_new_num_labels_like_plain_transformers(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "f"))
    model = hf_freeze.from_pretrained(tmp_path / "f", num_labels=5, ignore_mismatched_sizes=True)
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "f", trust_remote_code=True, num_labels=5,
                                                            ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5 and logits(model).shape == (2, 5)
    assert installed_head(model) == HeadConfig.from_string(SPEC)
    ours, theirs, trained = snapshot(model), snapshot(plain), snapshot(trainer.model)
    kept = [n for n in ours if not n.startswith("classifier.1.layers.3.")]  # all but the new last Linear
    assert all(identical(ours[n], trained[n]) and identical(theirs[n], trained[n]) for n in kept)


def test_num_labels_zero_model_is_refused_with_the_reason_and_untouched():
    model = tiny_model("resnet", num_labels=0)
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match="num_labels >= 1"):
        hf_freeze.apply_policy(model, POLICY)
    assert same_tensors(before, snapshot(model)) and hf_freeze.get_state(model) is None


# --------------------------------------------------------------------------- odd models
@pytest.mark.parametrize("model_type, cls", [("deit", "DeiTForImageClassificationWithTeacher"),
                                             ("levit", "LevitForImageClassificationWithTeacher")])
def test_distillation_model_with_head_travels_through_the_trainer_save(tmp_path, model_type, cls):
    torch.manual_seed(0)
    model = getattr(transformers, cls)(tiny_config(model_type))
    pixels = X64 if model_type == "levit" else X32
    hf_freeze.apply_policy(model, POLICY)
    folder = tmp_path / "f"
    model.save_pretrained(folder)
    hf_freeze.FreezePolicy.coerce(POLICY).save_pretrained(folder)  # what the Trainer's save adds
    reloaded = hf_freeze.from_pretrained(folder)
    assert type(reloaded).__name__ == cls and torch.equal(logits(reloaded, pixels), logits(model, pixels))
    plain = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    assert torch.equal(logits(plain, pixels), logits(model, pixels))


def test_timm_model_with_head_travels_to_a_process_without_hf_freeze(tmp_path):
    model = tiny_model("timm_wrapper")
    trainer = trainer_for(tmp_path, model=model, max_steps=2)
    trainer.train()
    folder = tmp_path / "f"
    trainer.save_model(str(folder))
    assert isinstance(model.get_submodule(hf_freeze.heads.classifier_paths(model)[0]), MLPHead)
    assert torch.equal(logits(hf_freeze.from_pretrained(folder)), logits(model))
    block = tmp_path / "block" / "hf_freeze"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text('raise ImportError("not here")\n')
    torch.save(X32, tmp_path / "x.pt")
    script = ("import sys, torch\nfrom transformers import AutoModelForImageClassification as A\n"
              "try:\n    import hf_freeze\nexcept ImportError:\n    pass\nelse:\n    sys.exit('importable')\n"
              f"m = A.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
              f"with torch.no_grad():\n    torch.save(m(pixel_values=torch.load({str(tmp_path / 'x.pt')!r})).logits, "
              f"{str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "block", capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(tmp_path / "block")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(model))


def test_swiftformer_two_classifiers_travel_through_the_trainer_save(tmp_path):
    trainer = trainer_for(tmp_path, model=tiny_model("swiftformer"), max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "f"))
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "f", trust_remote_code=True)
    assert torch.equal(logits(plain), logits(trainer.model))
    assert torch.equal(logits(hf_freeze.from_pretrained(tmp_path / "f")), logits(trainer.model))


def test_head_none_flag_on_a_model_carrying_a_head_is_refused_before_the_output_folder(tmp_path):
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, POLICY)
    before = snapshot(model)
    args = training_args(tmp_path / "x", max_steps=1, head="none", freeze="backbone")
    with pytest.raises(FreezePolicyError, match="already carries head"):
        FreezeTrainer(model=model, args=args, train_dataset=TinyImages(8))
    assert not (tmp_path / "x" / "out").exists() and same_tensors(before, snapshot(model))


def test_head_on_a_bf16_model_is_built_in_bf16():
    model = tiny_model("resnet").to(torch.bfloat16)
    hf_freeze.apply_policy(model, POLICY)
    assert {p.dtype for p in model.classifier.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- with the other features
def test_bf16_autocast_with_a_head_keeps_the_backbone_and_saves_the_trained_weights(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=2, bf16=True)
    base = snapshot(tiny_model("resnet"))
    trainer.train()
    now = snapshot(trainer.model)
    assert all(identical(base[n], now[n]) for n in base if not n.startswith("classifier."))
    trainer.save_model(str(tmp_path / "f"))
    assert same_tensors(snapshot(hf_freeze.from_pretrained(tmp_path / "f")), now)


def test_feature_cache_with_a_deep_normed_head_and_gradual_unfreezing_equals_cache_off(tmp_path):
    policy = "freeze=backbone;unfreeze=step2:1;layer_lr_decay=0.5;head=mlp:16,8,gelu,dropout=0.3,norm=true"
    runs = {}
    for mode in ("auto", "off"):
        trainer = trainer_for(tmp_path / mode, policy=policy, max_steps=4, feature_cache=mode)
        trainer.train()
        runs[mode] = trainer
    assert head_phase_served(runs["auto"]) > 0, runs["auto"].feature_cache_info
    assert same_tensors(snapshot(runs["auto"].model), snapshot(runs["off"].model))


def test_adapter_with_head_and_save_delta_rebuilds_the_same_logits(tmp_path):
    pytest.importorskip("peft")
    tiny_model("resnet").save_pretrained(tmp_path / "base")
    trainer = trainer_for(tmp_path, policy=f"freeze=backbone;adapter=lora,r=2,groups=1;head={SPEC}", max_steps=2,
                          save_delta=True, delta_base_model=str(tmp_path / "base"))
    trainer.train()
    trainer.save_model(str(tmp_path / "f"))
    assert not (tmp_path / "f" / HEAD_MODELING_CODE).exists()
    assert torch.equal(logits(hf_freeze.from_pretrained(tmp_path / "f")), logits(trainer.model))


def test_delta_folder_with_head_is_not_loaded_by_plain_transformers(tmp_path):
    tiny_model("resnet").save_pretrained(tmp_path / "base")
    trainer = trainer_for(tmp_path, max_steps=2, save_delta=True, delta_base_model=str(tmp_path / "base"))
    trainer.train()
    trainer.save_model(str(tmp_path / "d"))
    with pytest.raises(OSError):
        AutoModelForImageClassification.from_pretrained(tmp_path / "d")


def test_policy_file_with_a_head_installs_it_on_a_fresh_model(tmp_path):
    FreezePolicy.coerce(POLICY).save_pretrained(tmp_path / "p")
    args = training_args(tmp_path, max_steps=1, freeze_policy_file=str(tmp_path / "p"))
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=args, train_dataset=TinyImages(8))
    assert trainer.freeze_policy.head == HeadConfig.from_string(SPEC)
    trainer.train()
    assert isinstance(trainer.model.classifier[1], MLPHead)


def test_search_over_candidates_that_differ_only_in_the_head(tmp_path):
    pytest.importorskip("optuna")
    from hf_freeze import search_freeze_policies

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    args = training_args(tmp_path, max_steps=2, eval_strategy="no", logging_steps=100)
    trainer = FreezeTrainer(model_init=lambda: tiny_model("resnet", seed=1), args=args, train_dataset=TinyImages(16),
                            eval_dataset=TinyImages(8, seed=5), compute_metrics=accuracy)
    candidates = ["freeze=backbone", "freeze=backbone;head=mlp:8", "freeze=backbone;head=mlp:16,gelu"]
    result = search_freeze_policies(trainer, policies=candidates)
    assert sorted(r["policy"] for r in result.rows) == sorted(FreezePolicy.from_string(c).to_string()
                                                              for c in candidates)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec, says", [
    ("mlp:16,relu,gelu", "twice"), ("mlp:16,dropout=0.1,dropout=0.2", "twice"), ("mlp:16.0", "hidden"),
    ("mlp:16,kind=mlp", "valid fields"), ("mlp:16,dropout=nan", "[0, 1)"), ("mlp:16;relu", "hidden"),
])
def test_more_bad_specs_are_refused_before_the_output_folder_exists(tmp_path, spec, says):
    with pytest.raises(FreezePolicyError) as err:
        hf_freeze.FreezeTrainingArguments(output_dir=str(tmp_path / "never"), head=spec)
    assert says in str(err.value) and not (tmp_path / "never").exists()


def test_a_tampered_head_spec_in_config_json_is_refused_naming_the_choices(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=1)
    trainer.train()
    folder = tmp_path / "f"
    trainer.save_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["hf_freeze_head"]["activation"] = "swish"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FreezePolicyError, match="valid: relu, gelu, silu, tanh"):
        hf_freeze.from_pretrained(folder)


def test_head_config_accepts_a_list_and_json_round_trips_with_every_field():
    policy = FreezePolicy.from_string("head=mlp:32,8,tanh,dropout=0.5,norm=true;freeze=backbone;layer_lr_decay=0.7")
    assert policy.head == HeadConfig(hidden=[32, 8], activation="tanh", dropout=0.5, norm=True)
    assert FreezePolicy.from_dict(json.loads(policy.to_json())) == policy
    assert FreezePolicy.from_string(policy.to_string()) == policy
