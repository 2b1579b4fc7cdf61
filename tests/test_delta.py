"""Delta checkpoints on disk: what goes in, exact rebuild, base-change detection, resume, the real MobileNetV2 size."""

import json

import pytest
import torch
from helpers import TinyImages, identical, snapshot, tiny_model, training_args
from safetensors.torch import load_file, save_file

import hf_freeze
from hf_freeze import BaseModelChanged, FreezeTrainer, FrozenWeightsChanged
from hf_freeze.delta import DeltaManifest
from hf_freeze.folder import DELTA_MANIFEST, DELTA_WEIGHTS

POLICY = "freeze=backbone;unfreeze=step3:1@0.5"


def saved_base(tmp_path, seed=0):
    """A tiny ResNet saved as a local 'pretrained' folder, and the model loaded back from it."""
    base = tmp_path / "base"
    tiny_model("resnet", seed=seed).save_pretrained(base)
    return base, type(tiny_model("resnet")).from_pretrained(base)


def logits(model, seed=0):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))).logits


def train(model, tmp_path, policy=POLICY, **kw):
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1, **kw),
                            train_dataset=TinyImages(), freeze_policy=policy)
    trainer.train()
    return trainer


def test_delta_holds_exactly_the_trained_tensors_and_rebuilds_bit_identically(tmp_path):
    base_dir, model = saved_base(tmp_path)
    before = snapshot(model)
    # stage.1 unfreezes at step 3 with unfreeze_bn: head + stage.1 (weights and BN statistics) are trained
    train(model, tmp_path, policy=POLICY + ";unfreeze_bn=true")
    manifest = hf_freeze.save_delta(model, tmp_path / "delta")

    groups = hf_freeze.layer_groups(model)
    trained = {n for g in ("stage.1", "head") for n in (*groups[g].param_names, *groups[g].buffer_names)}
    stored = load_file(tmp_path / "delta" / DELTA_WEIGHTS)
    assert set(stored) == trained & set(model.state_dict())
    after = snapshot(model)
    assert all(not identical(before[n], after[n]) for n in groups["head"].param_names)  # really trained
    assert set(manifest.frozen_digests) == {n for g in ("stem", "stage.0") for n in (*groups[g].param_names, *groups[g].buffer_names)}
    assert manifest.base_model == str(base_dir.resolve()) and manifest.base_revision is None
    assert json.loads((tmp_path / "delta" / "config.json").read_text())["freeze_policy"]["unfreeze"][0]["at_step"] == 3
    assert not (tmp_path / "delta" / "model.safetensors").exists()
    # by default (unfreeze_bn=false) the unfrozen group's BN statistics stay pretrained, stay verified, stay out
    (tmp_path / "d").mkdir()
    _, plain = saved_base(tmp_path / "d")
    train(plain, tmp_path / "d")
    default = hf_freeze.save_delta(plain, tmp_path / "d" / "delta")
    stats = {n for n in groups["stage.1"].buffer_names if "running" in n}
    assert stats <= set(default.frozen_digests)
    assert not stats & set(load_file(tmp_path / "d" / "delta" / DELTA_WEIGHTS))

    rebuilt = hf_freeze.from_pretrained(tmp_path / "delta")
    again = snapshot(rebuilt)
    assert sorted(again) == sorted(after) and [n for n in after if not identical(after[n], again[n])] == []
    assert torch.equal(logits(rebuilt), logits(model))


def test_a_changed_base_is_refused_with_the_tensor_named(tmp_path):
    base_dir, model = saved_base(tmp_path)
    train(model, tmp_path)
    hf_freeze.save_delta(model, tmp_path / "delta")
    weights = load_file(base_dir / "model.safetensors")
    name = "resnet.embedder.embedder.convolution.weight"
    weights[name][0, 0, 0, 0] += 1e-3  # someone re-uploaded the base with one weight changed
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseModelChanged, match=rf"1 of \d+ frozen tensors differ.*{name}") as err:
        hf_freeze.from_pretrained(tmp_path / "delta")
    assert err.value.changed == [name] and str(base_dir.resolve()) in str(err.value)


def test_saving_a_delta_refuses_a_model_whose_frozen_weights_moved(tmp_path):
    _, model = saved_base(tmp_path)
    hf_freeze.apply_policy(model, "backbone")
    with torch.no_grad():
        model.resnet.embedder.embedder.convolution.weight[0, 0, 0, 0] += 1.0
    with pytest.raises(FrozenWeightsChanged, match="embedder.convolution.weight"):
        hf_freeze.save_delta(model, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_a_delta_replaces_stale_full_weights_and_vice_versa(tmp_path):
    _, model = saved_base(tmp_path)
    trainer = train(model, tmp_path)
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").is_file() and not (out / DELTA_MANIFEST).exists()
    trainer.args.save_delta = True
    trainer.save_model(str(out))
    assert (out / DELTA_MANIFEST).is_file() and not (out / "model.safetensors").exists()
    assert (out / "training_args.bin").is_file() and (out / "freeze_policy.json").is_file()
    trainer.args.save_delta = False
    trainer.save_model(str(out))
    assert (out / "model.safetensors").is_file() and not (out / DELTA_MANIFEST).exists()


def test_frozen_tensors_the_base_checkpoint_lacks_go_into_the_delta(tmp_path):
    """Left out of a delta are only frozen tensors the base checkpoint holds: a frozen new head (resized, newly
    initialised), a weight missing from the checkpoint, and tensors a reloaded delta wrote all travel in it."""
    base_dir, _ = saved_base(tmp_path)
    cls = type(tiny_model("resnet"))
    conv = "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"  # stage.0: frozen below
    sd = load_file(base_dir / "model.safetensors")
    del sd[conv]
    save_file(sd, base_dir / "model.safetensors", metadata={"format": "pt"})
    model = cls.from_pretrained(base_dir, num_labels=5, ignore_mismatched_sizes=True)
    model.classifier[1].bias.requires_grad_(False)  # the user froze part of the new head
    hf_freeze.apply_policy(model, "freeze=stem,stage.0")
    stage1 = hf_freeze.layer_groups(model)["stage.1"]
    with torch.no_grad():
        model.get_parameter(stage1.param_names[0]).add_(0.5)  # "trained"
    manifest = hf_freeze.save_delta(model, tmp_path / "delta")
    stored = load_file(tmp_path / "delta" / DELTA_WEIGHTS)
    trained = {*stage1.param_names, *stage1.buffer_names, "classifier.1.weight"} & set(model.state_dict())
    assert set(stored) == trained | {"classifier.1.bias", conv}
    assert set(manifest.frozen_digests) == set(model.state_dict()) - set(stored)
    reloaded = hf_freeze.from_pretrained(tmp_path / "delta")
    assert all(identical(t, model.state_dict()[n]) for n, t in reloaded.state_dict().items())
    # the reloaded model with stage.1 frozen: its values are the delta's, not the base's, so it stays in the delta
    hf_freeze.apply_policy(reloaded, "freeze=stem:stage.1")
    again = hf_freeze.save_delta(reloaded, tmp_path / "again")
    assert set(again.trained_tensors) == set(stored)
    assert all(identical(t, model.state_dict()[n]) for n, t in hf_freeze.from_pretrained(tmp_path / "again").state_dict().items())


def test_a_failed_delta_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import errno

    import hf_freeze.delta as delta

    _, model = saved_base(tmp_path)
    hf_freeze.apply_policy(model, "backbone")
    hf_freeze.save_delta(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with torch.no_grad():
        model.classifier[1].weight.add_(1.0)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(delta.DeltaManifest, "save", no_space)  # after the weights were written
    with pytest.raises(OSError, match="No space"):
        hf_freeze.save_delta(model, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # no temp folder left either


def test_manifest_round_trip_and_corruption_is_detected(tmp_path):
    m = DeltaManifest("org/base", "a" * 40, {"x": "1" * 32, "y": "2" * 32}, ["head.weight"])
    m.save(tmp_path)
    assert DeltaManifest.load(tmp_path) == m
    d = json.loads((tmp_path / DELTA_MANIFEST).read_text())
    d["frozen_digests"]["x"] = "3" * 32
    (tmp_path / DELTA_MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ValueError, match="corrupt"):
        DeltaManifest.load(tmp_path)
    with pytest.raises(ValueError, match="not a hf_freeze delta"):
        DeltaManifest.from_dict({"format": "something else"})


def test_resume_from_delta_checkpoints_equals_the_uninterrupted_run(tmp_path):
    from test_trainer import StopAt

    policy = POLICY
    kwargs = dict(num_train_epochs=2, save_strategy="steps", save_steps=5, save_delta=True)
    base_dir, full = saved_base(tmp_path)
    FreezeTrainer(model=full, args=training_args(tmp_path / "a", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train()
    _, interrupted = saved_base(tmp_path)
    FreezeTrainer(model=interrupted, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy, callbacks=[StopAt(5)]).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-5"
    assert (checkpoint / DELTA_WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()
    _, resumed = saved_base(tmp_path)
    FreezeTrainer(model=resumed, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train(resume_from_checkpoint=str(checkpoint))
    a, b = snapshot(full), snapshot(resumed)
    assert [n for n in a if not identical(a[n], b[n])] == []


@pytest.mark.slow
def test_head_only_mobilenet_v2_delta_is_under_one_percent(mobilenet_v2_path, tmp_path):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(mobilenet_v2_path, num_labels=10, ignore_mismatched_sizes=True)
    hf_freeze.apply_policy(model, "backbone")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two real head-only steps on random 224 px images
        out = model(pixel_values=torch.randn(2, 3, 224, 224, generator=g), labels=torch.randint(0, 10, (2,), generator=g))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    hf_freeze.save_delta(model, tmp_path / "delta")
    model.save_pretrained(tmp_path / "full")
    # what a delta push adds beyond config/card: the trained tensors and the manifest (fingerprints of 300+ tensors)
    delta = sum((tmp_path / "delta" / f).stat().st_size for f in (DELTA_WEIGHTS, DELTA_MANIFEST))
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert delta / full <= 0.01, (delta, full)
    rebuilt = hf_freeze.from_pretrained(tmp_path / "delta")
    x = torch.randn(2, 3, 224, 224, generator=g)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(pixel_values=x).logits, model(pixel_values=x).logits)


def test_load_best_model_at_end_reads_a_delta_checkpoint(tmp_path):
    scores = iter([0.9, 0.1, 0.5])  # epoch 1 is the best by construction

    def fake_metric(pred):
        return {"fake": next(scores)}

    base_dir, model = saved_base(tmp_path)
    args = training_args(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", save_delta=True,
                         load_best_model_at_end=True, metric_for_best_model="fake", greater_is_better=True)
    trainer = FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=16), eval_dataset=TinyImages(n=8, seed=1),
                            compute_metrics=fake_metric, freeze_policy="freeze=backbone;unfreeze=step1:1")
    trainer.train()  # 2 steps per epoch
    best = tmp_path / "out" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best) and (best / DELTA_WEIGHTS).is_file()
    expected = hf_freeze.from_pretrained(best)
    a, b = snapshot(expected), snapshot(model)
    assert [n for n in a if not identical(a[n], b[n])] == []
    last = hf_freeze.from_pretrained(tmp_path / "out" / "checkpoint-6")
    assert not torch.equal(logits(last), logits(model))  # the final weights were really replaced



def test_delta_flags_parse_with_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(hf_freeze.FreezeTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--save_delta", "--delta_base_model", "org/base", "--delta_base_revision", "abc"])
    assert (args.save_delta, args.delta_base_model, args.delta_base_revision) == (True, "org/base", "abc")
    assert args.freeze_policy() is None  # saving flags are not freeze flags


def test_adapter_run_with_save_delta_saves_a_loadable_adapter_delta(tmp_path):
    """An adapter run's delta is its adapter folder, plus the base it applies to and the base's fingerprint."""
    from hf_freeze.folder import ADAPTER_BASE

    base_dir, model = saved_base(tmp_path)
    policy = "train_bn=true;adapter=lora,r=4,groups=1"  # BatchNorm statistics travel as saved copies
    trainer = train(model, tmp_path, policy=policy, save_delta=True, save_strategy="steps", save_steps=2)
    trained = logits(trainer.model)
    trainer.save_model(str(tmp_path / "final"))
    hf_freeze.save_delta(trainer.model, tmp_path / "direct")  # the same, without the Trainer
    for folder in (tmp_path / "final", tmp_path / "direct", tmp_path / "out" / "checkpoint-2"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "freeze_policy.json", "config.json", ADAPTER_BASE} <= files
        assert not files & {"model.safetensors", DELTA_WEIGHTS, DELTA_MANIFEST}
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    for folder in (tmp_path / "final", tmp_path / "direct"):
        reloaded = hf_freeze.from_pretrained(folder)
        assert torch.equal(logits(reloaded), trained)
        assert hf_freeze.get_state(reloaded).policy == hf_freeze.FreezePolicy.from_string(policy)
    # the base it was trained on changed: refused, naming the tensor
    weights = load_file(base_dir / "model.safetensors")
    name = "resnet.embedder.embedder.convolution.weight"
    weights[name][0, 0, 0, 0] += 1e-3
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseModelChanged, match=name):
        hf_freeze.from_pretrained(tmp_path / "final")
