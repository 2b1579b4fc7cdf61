"""Attack on the README's "Frozen-prefix cache" section: features in combination, bad input, crashes.

Every attempt compares the cached run with the uncached one (``feature_cache='off'``) bit for bit (every parameter
and buffer), or asserts the promised refusal. Attempts that break a promise are strict xfails naming the bug.
"""

import copy
import errno
import logging

import pytest
import torch
from helpers import StopAt, TinyImages, differing, snapshot, tiny_model, training_args
from helpers import tiny_vit as vit
from torch import nn

from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze import feature_cache as fc
from hf_freeze import prefix_cache as pc

GRADUAL = "freeze=backbone;unfreeze=epoch1:1,epoch2:1,epoch3:1"


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py: every test starts with empty caches


def resnet():
    return tiny_model("resnet", seed=2)


def run(tmp_path, mode, model, policy, *, dataset=None, name=None, resume=None, callbacks=None, eval_dataset=None,
        **args):
    args = {"num_train_epochs": 2, "logging_steps": 50, "per_device_train_batch_size": 4, **args}
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / (name or mode), **args),
                            train_dataset=dataset if dataset is not None else TinyImages(n=10),
                            eval_dataset=eval_dataset, freeze_policy=policy, feature_cache=mode, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(trainer.model)


def served(trainer):
    return sum(i["served_steps"] for i in trainer.prefix_cache_info)


def same_as_off(tmp_path, make, policy, mode="memory", expect_served=True, **kw):
    off, w_off = run(tmp_path, "off", make(), policy, **kw)
    on, w_on = run(tmp_path, mode, make(), policy, **kw)
    assert differing(w_off, w_on) == []
    if expect_served:
        assert served(on) > 0, on.prefix_cache_refusal
    return off, on


# =========================================================================== schedules and optimizer features

def test_mixed_step_and_epoch_events_with_layer_lr_decay_equal_off(tmp_path):
    policy = "freeze=backbone;unfreeze=step2:1@0.5,epoch2:1,step8:1@0.1;layer_lr_decay=0.7"
    off, on = same_as_off(tmp_path, resnet, policy, num_train_epochs=4)
    assert [e["step"] for e in on.freeze_callback.events_log] == [e["step"] for e in off.freeze_callback.events_log]
    assert len(on.prefix_cache_info) >= 2  # the boundary really moved


def test_vit_three_events_bf16_equal_off(tmp_path):
    same_as_off(tmp_path, vit, "freeze=backbone;unfreeze=step1:1,epoch1:1,step5:1", num_train_epochs=3, bf16=True)


def test_gradient_accumulation_with_a_two_image_last_batch_and_step_events(tmp_path):
    """14 images in batches of 4, 4, 4, 2; accumulation 3 (the 2-image batch opens a window); events every step."""
    policy = "freeze=backbone;unfreeze=step1:1,step2:1"
    same_as_off(tmp_path, resnet, policy, dataset=TinyImages(n=14), num_train_epochs=3, gradient_accumulation_steps=3)


def test_gradient_accumulation_partial_window_bf16_vit(tmp_path):
    same_as_off(tmp_path, vit, "freeze=backbone;unfreeze=step1:1,step3:1", dataset=TinyImages(n=14),
                num_train_epochs=3, gradient_accumulation_steps=3, bf16=True)


# =========================================================================== eval, best model, delta

def eval_losses(trainer):
    return [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]


def test_eval_during_training_uses_the_real_model(tmp_path):
    """Evaluation at every step and at the end: the eval losses (the real model's forward on other images) equal the
    uncached run's bit for bit, also right after each boundary move."""
    kw = dict(eval_dataset=TinyImages(n=6, seed=5), eval_strategy="steps", eval_steps=1, num_train_epochs=4,
              per_device_eval_batch_size=5)
    off, on = same_as_off(tmp_path, resnet, GRADUAL, **kw)
    assert len(eval_losses(on)) == 12 and eval_losses(on) == eval_losses(off)
    assert on.evaluate()["eval_loss"] == off.evaluate()["eval_loss"]
    # prediction on the *training* images equals the uncached model's: nothing stale stays hooked in
    p_on, p_off = on.predict(TinyImages(n=10)), off.predict(TinyImages(n=10))
    assert torch.equal(torch.as_tensor(p_on.predictions), torch.as_tensor(p_off.predictions))


def test_load_best_model_at_end_and_save_delta_with_a_moving_boundary(tmp_path):
    base = tmp_path / "base"
    resnet().save_pretrained(base)

    def make():
        model = resnet()
        model.config._name_or_path = str(base)
        return model
    kw = dict(eval_dataset=TinyImages(n=6, seed=5), eval_strategy="steps", eval_steps=2, save_strategy="steps",
              save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", num_train_epochs=4,
              save_delta=True)
    off, on = same_as_off(tmp_path, make, GRADUAL, **kw)
    assert on.state.best_model_checkpoint.rsplit("-", 1)[1] == off.state.best_model_checkpoint.rsplit("-", 1)[1]


# =========================================================================== randomness, BatchNorm, adapters, heads

def test_dropout_in_the_suffix_equals_off(tmp_path):
    def make():
        model = resnet()
        model.resnet.encoder.stages[1].layers.append(nn.Dropout(0.3))
        return model
    same_as_off(tmp_path, make, "freeze=stem:stage.0;unfreeze=epoch1:1")


def test_convnext_stochastic_depth_after_the_stem(tmp_path):
    """drop_path in the ConvNeXt layers: the boundary stops before the first one that draws random numbers."""
    def make():
        from transformers import ConvNextForImageClassification

        from hf_freeze.tiny import tiny_config
        torch.manual_seed(2)
        cfg = tiny_config("convnext")
        cfg.drop_path_rate = 0.3
        return ConvNextForImageClassification(cfg)
    # HF ConvNeXt's drop-path rates rise linearly from 0: stage.0's layer has none, stage.1's draws random numbers
    off, on = same_as_off(tmp_path, make, "freeze=stem:stage.1;unfreeze=step2:1", num_train_epochs=1)
    assert on.prefix_cache_info[0]["boundary"] == "convnext.encoder.stages.0"


def test_vit_attention_dropout_in_the_prefix_stops_the_boundary_at_the_embeddings(tmp_path):
    """Attention dropout in every ViT layer: the embeddings draw none, so the boundary is the embeddings."""
    make = lambda: vit(attention_probs_dropout_prob=0.2)  # noqa: E731
    off, on = same_as_off(tmp_path, make, "freeze=stem:stage.0", num_train_epochs=1)
    assert on.prefix_cache_info[0]["boundary"] == "vit.embeddings"


def test_unfreeze_bn_with_a_gradual_schedule_equals_off(tmp_path):
    same_as_off(tmp_path, resnet, "freeze=backbone;unfreeze=epoch1:1,epoch2:1;unfreeze_bn=true", num_train_epochs=3)


def test_train_bn_auto_equals_off(tmp_path):
    off, on = same_as_off(tmp_path, resnet, "freeze=stem:stage.0;train_bn=true", mode="auto", expect_served=False)
    assert "train_bn=True" in on.prefix_cache_refusal


def test_lora_adapter_auto_equals_off(tmp_path):
    off, on = same_as_off(tmp_path, resnet, "freeze=backbone;adapter=lora,r=2", mode="auto",
                          expect_served=False, num_train_epochs=1)
    assert "adapters" in on.prefix_cache_refusal


def test_mlp_head_with_dropout_and_a_gradual_schedule(tmp_path):
    same_as_off(tmp_path, resnet, "freeze=backbone;head=mlp:16,relu,dropout=0.3;unfreeze=epoch1:1,epoch2:1",
                num_train_epochs=3)


def test_user_frozen_parameters_in_the_suffix(tmp_path):
    """The user froze stage.1's shortcut by hand before training; the policy freezes stem and stage.0."""
    def make():
        model = resnet()
        for p in model.resnet.encoder.stages[1].layers[0].shortcut.parameters():
            p.requires_grad_(False)
        return model
    same_as_off(tmp_path, make, "freeze=stem:stage.0")


# =========================================================================== datasets

class AugmentRare(TinyImages):
    """Random flips, only for the rare class (label 2), which the first examples do not include: a usual
    class-balancing augmentation."""

    def __init__(self, n=20):
        super().__init__(n=n)
        self.labels[:8] %= 2  # the first batch (the probe's) has no rare example
        self.labels[8:12] = 2

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if int(self.labels[i]) == 2 and torch.rand(()) < 0.5:
            item = {**item, "pixel_values": item["pixel_values"].flip(-1)}
        return item


def test_augmentation_of_a_rare_class_is_refused_or_equals_off(tmp_path):
    torch.manual_seed(0)
    off, w_off = run(tmp_path, "off", resnet(), "freeze=stem:stage.0", dataset=AugmentRare(),
                     per_device_train_batch_size=8)
    torch.manual_seed(0)
    auto, w_auto = run(tmp_path, "auto", resnet(), "freeze=stem:stage.0", dataset=AugmentRare(),
                       per_device_train_batch_size=8)
    assert differing(w_off, w_auto) == []
    # caught by the shared read pass (a random draw while reading) or by the build's reseeded second read
    refusal = auto.prefix_cache_refusal or ""
    assert served(auto) == 0 and ("random augmentation" in refusal or "different pixels" in refusal), refusal


class AugmentAll(TinyImages):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + 0.01 * torch.randn(item["pixel_values"].shape)}


def test_random_augmentation_refused_by_memory_and_auto_equals_off(tmp_path):
    model = resnet()
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match="random augmentation"):
        run(tmp_path, "memory", model, GRADUAL, dataset=AugmentAll(n=10), name="refused", num_train_epochs=4)
    assert differing(before, snapshot(model)) == []
    torch.manual_seed(0)
    off, w_off = run(tmp_path, "off", resnet(), GRADUAL, dataset=AugmentAll(n=10), num_train_epochs=4)
    torch.manual_seed(0)
    auto, w_auto = run(tmp_path, "auto", resnet(), GRADUAL, dataset=AugmentAll(n=10), num_train_epochs=4)
    assert served(auto) == 0 and differing(w_off, w_auto) == []


# =========================================================================== memory limit and disk

def test_tiny_memory_limit_with_a_gradual_schedule_spills_to_disk(tmp_path):
    cache = tmp_path / "fc"
    off, on = same_as_off(tmp_path, resnet, GRADUAL, mode="auto", num_train_epochs=4, feature_cache_max_memory="1KB",
                          feature_cache_dir=str(cache))
    assert all(i["storage"] == "disk" for i in on.prefix_cache_info)
    assert list(cache.rglob("*.safetensors*")) == [] or all("spill" not in str(p) for p in cache.rglob("*"))


def test_memory_mode_refuses_up_front_when_the_prefix_cache_cannot_fit(tmp_path):
    """feature_cache='memory' with a limit no prefix cache fits and a schedule whose first phase trains the head
    only: the README promises `memory` refuses before the first step."""
    model = resnet()
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match="feature_cache_max_memory"):
        run(tmp_path, "memory", model, GRADUAL, num_train_epochs=4, feature_cache_max_memory="1KB")
    assert differing(before, snapshot(model)) == []


def test_disk_cache_reused_after_the_prefix_weights_changed_is_recomputed(tmp_path):
    cache = tmp_path / "fc"
    kw = dict(feature_cache_dir=str(cache), num_train_epochs=1)
    first, _ = run(tmp_path, "disk", resnet(), "freeze=stem:stage.0", name="first", **kw)

    def changed():
        model = resnet()
        with torch.no_grad():
            model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight.mul_(1.5)
        return model
    off, on = same_as_off(tmp_path, changed, "freeze=stem:stage.0", mode="disk", **kw)
    assert on.prefix_cache_info[0]["source"] == "computed"
    assert on.prefix_cache_info[0]["key"] != first.prefix_cache_info[0]["key"]


class Scaled(nn.Module):
    """A parameter-free module with a buffer (a fixed normalisation constant), appended to the stem."""

    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x):
        return x * self.scale


def test_disk_cache_reused_after_a_prefix_buffer_changed_is_recomputed(tmp_path):
    cache = tmp_path / "fc"
    kw = dict(feature_cache_dir=str(cache), num_train_epochs=1)

    def make(scale):
        def build():
            model = resnet()
            model.resnet.embedder.pooler = nn.Sequential(model.resnet.embedder.pooler, Scaled(scale))
            return model
        return build
    run(tmp_path, "disk", make(1.0)(), "freeze=stem:stage.0", name="first", **kw)
    off, on = same_as_off(tmp_path, make(2.0), "freeze=stem:stage.0", mode="disk", **kw)
    assert on.prefix_cache_info[0]["source"] == "computed"


def test_same_model_object_trained_twice_does_not_reuse_stale_memory_rows(tmp_path):
    """First train() unfreezes everything (stem included); the second, on the same model object, freezes stem and
    stage.0 again: the in-memory cache of the first run must not serve (the stem's weights changed)."""
    a, b = resnet(), resnet()
    run(tmp_path, "memory", a, GRADUAL, name="a1", num_train_epochs=4)
    run(tmp_path, "off", b, GRADUAL, name="b1", num_train_epochs=4)
    assert differing(snapshot(a), snapshot(b)) == []
    on, w_on = run(tmp_path, "memory", a, "freeze=stem:stage.0", name="a2")
    off, w_off = run(tmp_path, "off", b, "freeze=stem:stage.0", name="b2")
    assert differing(w_off, w_on) == [] and served(on) > 0


def test_truncated_disk_file_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / "fc"
    kw = dict(feature_cache_dir=str(cache), num_train_epochs=1)
    first, w_first = run(tmp_path, "disk", resnet(), "freeze=stem:stage.0", name="first", **kw)
    path = cache / f"{first.prefix_cache_info[0]['key']}.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    pc._MEMORY.clear()
    with caplog.at_level(logging.WARNING, logger="hf_freeze.prefix_cache"):
        again, w_again = run(tmp_path, "disk", resnet(), "freeze=stem:stage.0", name="again", **kw)
    assert "not usable" in caplog.text
    assert again.prefix_cache_info[0]["source"] == "computed" and differing(w_first, w_again) == []


def test_ctrl_c_during_a_rebuild_then_train_again(tmp_path, monkeypatch):
    """KeyboardInterrupt while the second boundary's cache is being written (disk); then a new run with the same
    cache folder equals the uncached run and no partial file is left or reused."""
    cache = tmp_path / "fc"
    kw = dict(feature_cache_dir=str(cache), num_train_epochs=4)
    append, calls = pc.DiskSink.append, {"n": 0}

    def interrupted(self, name, rows):
        calls["n"] += 1
        if calls["n"] == 9:  # 2 blocks of the first boundary file (leaf + labels x 3 batches = 6), then the second
            raise KeyboardInterrupt
        return append(self, name, rows)

    monkeypatch.setattr(pc.DiskSink, "append", interrupted)
    model = resnet()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "disk", model, GRADUAL, name="cut", **kw)
    monkeypatch.setattr(pc.DiskSink, "append", append)
    assert [p for p in cache.rglob("*") if "building" in p.name or p.name.endswith(".tmp")] == []
    # nothing of the cache stays hooked into the interrupted model
    assert all("forward" not in m.__dict__ for m in model.modules())
    fc._MEMORY.clear()
    pc._MEMORY.clear()
    off, on = same_as_off(tmp_path, resnet, GRADUAL, mode="disk", **kw)


def test_full_disk_while_spilling_falls_back_or_refuses(tmp_path, monkeypatch, caplog):
    """auto with a cache over the memory limit writes a spill file; the disk is full (ENOSPC on write). The promise:
    the same training as off (trained on the real examples with a logged reason), never a crash mid-run."""
    def full(self, name, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = tmp_path / "fc"
    off, w_off = run(tmp_path, "off", resnet(), GRADUAL, num_train_epochs=4)
    monkeypatch.setattr(pc.DiskWriter, "append", full)
    with caplog.at_level(logging.INFO, logger="hf_freeze"):
        auto, w_auto = run(tmp_path, "auto", resnet(), GRADUAL, num_train_epochs=4, feature_cache_max_memory="1KB",
                           feature_cache_dir=str(cache))
    assert differing(w_off, w_auto) == []
    assert "No space left" in caplog.text
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_cache_dir_that_is_a_file_is_refused_before_anything_changes(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("my notes")
    model = resnet()
    before = snapshot(model)
    with pytest.raises((FreezePolicyError, OSError)):
        run(tmp_path, "disk", model, "freeze=stem:stage.0", feature_cache_dir=str(target))
    assert differing(before, snapshot(model)) == [] and target.read_text() == "my notes"


# =========================================================================== resume

def test_resume_at_an_event_step_with_mixed_events_in_memory(tmp_path):
    """Checkpoints at every step; resumed exactly at the step of each event (step and epoch events mixed)."""
    policy = "freeze=backbone;unfreeze=step2:1,epoch1:1,step5:1"
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=1)
    full, w_full = run(tmp_path, "memory", resnet(), policy, name="full", **kw)
    off, w_off = run(tmp_path, "off", resnet(), policy, name="off", **kw)
    assert differing(w_off, w_full) == []
    out = tmp_path / "full" / "out"
    for step in (3, 5):
        fc._MEMORY.clear()
        pc._MEMORY.clear()
        resumed, w_resumed = run(tmp_path, "memory", resnet(), policy, name="full", resume=str(out / f"checkpoint-{step}"),
                                 **kw)
        assert differing(w_full, w_resumed) == [], step


def test_resume_with_a_changed_batch_size_in_disk_mode(tmp_path):
    """A second run with another batch size reuses the folder: rows are per example, the result equals off."""
    cache = tmp_path / "fc"
    run(tmp_path, "disk", resnet(), "freeze=stem:stage.0", name="b8", feature_cache_dir=str(cache))
    same_as_off(tmp_path, resnet, "freeze=stem:stage.0", mode="disk", per_device_train_batch_size=3,
                feature_cache_dir=str(cache))


# =========================================================================== other architectures

@pytest.mark.parametrize("arch,policy", [
    ("mobilenet_v2", "freeze=backbone;unfreeze=step1:8,step2:4"),
    ("mobilenet_v1", "freeze=backbone;unfreeze=step1:2,step2:2"),
    ("convnext", "freeze=backbone;unfreeze=step1:1,epoch1:1"),
    ("timm_wrapper", "freeze=backbone;unfreeze=step1:2,epoch1:1"),
])
def test_other_tiny_architectures_with_mixed_events(tmp_path, arch, policy):
    same_as_off(tmp_path, lambda: tiny_model(arch, seed=2), policy, num_train_epochs=2)  # epoch1 fires after epoch 1


def test_timm_wrapper_static_bf16(tmp_path):
    same_as_off(tmp_path, lambda: tiny_model("timm_wrapper", seed=2), "freeze=stem:stage.1", bf16=True,
                num_train_epochs=1)


def test_copy_of_a_served_trainer_model_is_clean(tmp_path):
    """The trained model, deep-copied after a cached run, computes the same logits as the uncached run's model."""
    off, _ = run(tmp_path, "off", resnet(), GRADUAL, num_train_epochs=4)
    on, _ = run(tmp_path, "memory", resnet(), GRADUAL, num_train_epochs=4)
    x = TinyImages(n=4, seed=9).pixels
    a, b = copy.deepcopy(on.model).eval(), copy.deepcopy(off.model).eval()
    with torch.no_grad():
        assert torch.equal(a(pixel_values=x).logits, b(pixel_values=x).logits)


def test_stop_and_resume_with_a_stopat_callback(tmp_path):
    kw = dict(num_train_epochs=4, save_strategy="steps", save_steps=2)
    full, w_full = run(tmp_path, "memory", resnet(), GRADUAL, name="full", **kw)
    run(tmp_path, "memory", resnet(), GRADUAL, name="cut", callbacks=[StopAt(7)], **kw)
    pc._MEMORY.clear()
    resumed, w = run(tmp_path, "memory", resnet(), GRADUAL, name="cut", resume=True, **kw)
    assert differing(w_full, w) == []
