"""Linear-probe feature cache: same training as without it, reused when valid, refused when unsafe."""

import pytest
import torch
from helpers import TinyImages, snapshot, tiny_model, training_args

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze import feature_cache as fc


def train(tmp_path, mode, policy="backbone", dataset=None, model=None, **kw):
    model = model if model is not None else tiny_model("resnet", seed=2)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / mode, num_train_epochs=3, logging_steps=50, **kw),
                            train_dataset=dataset or TinyImages(n=48), freeze_policy=policy, feature_cache=mode)
    trainer.train()
    return trainer, model


def max_diff(a, b):
    return max(((a[n].float() - b[n].float()).abs().max().item() for n in a), default=0.0)


@pytest.mark.parametrize("policy", ["backbone", "freeze=backbone;unfreeze=epoch2:1@0.5"])
def test_cached_training_matches_uncached(tmp_path, policy):
    fc._MEMORY.clear()
    off, m_off = train(tmp_path, "off", policy)
    on, m_on = train(tmp_path, "memory", policy)
    assert off.feature_cache is None and on.feature_cache_refusal is None
    # stated tolerance: 1e-6 absolute (CPU; observed: bit-identical)
    assert max_diff(snapshot(m_off), snapshot(m_on)) <= 1e-6
    if "unfreeze" in policy:
        assert on.feature_cache is None  # the cache served until the unfreeze, then real batches took over
        assert hf_freeze.freeze_report(m_on).row("stage.1").unfrozen_at == "epoch 2"
    else:
        assert set(on.feature_cache.fields) == {"pooler_output"}  # the head reads only the pooled vector


def test_cache_is_reused_and_invalidated_by_model_or_data(tmp_path):
    fc._MEMORY.clear()
    first, _ = train(tmp_path, "disk", feature_cache_dir=str(tmp_path / "fc"))
    assert not first.feature_cache.reused and len(list((tmp_path / "fc").iterdir())) == 1
    fc._MEMORY.clear()  # a new process: only the disk copy remains
    again, _ = train(tmp_path, "disk", feature_cache_dir=str(tmp_path / "fc"))
    assert again.feature_cache.reused and again.feature_cache.key == first.feature_cache.key
    other_model, _ = train(tmp_path, "disk", model=tiny_model("resnet", seed=3), feature_cache_dir=str(tmp_path / "fc"))
    other_data, _ = train(tmp_path, "disk", dataset=TinyImages(n=48, seed=9), feature_cache_dir=str(tmp_path / "fc"))
    keys = {first.feature_cache.key, other_model.feature_cache.key, other_data.feature_cache.key}
    assert len(keys) == 3 and not other_model.feature_cache.reused and not other_data.feature_cache.reused


class Augmented(TinyImages):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + 0.01 * torch.randn_like(item["pixel_values"])}


@pytest.mark.parametrize("setup,reason", [
    (dict(dataset=Augmented(n=16)), "random augmentation"),
    (dict(policy="freeze=backbone;train_bn=true"), "train_bn=True"),
    (dict(policy="freeze=stem"), "below the head are trainable"),
    (dict(model="vit_dropout"), "dropout"),
    (dict(dataloader_num_workers=1), "dataloader_num_workers"),
])
def test_unsafe_cases_refuse_with_the_reason(tmp_path, setup, reason):
    setup = dict(setup)
    if setup.get("model") == "vit_dropout":
        from transformers import ViTConfig, ViTForImageClassification

        setup["model"] = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=37, image_size=32, patch_size=8,
                                                             hidden_dropout_prob=0.1, num_labels=3))
    setup.setdefault("dataset", TinyImages(n=16))
    with pytest.raises(FreezePolicyError, match=reason):
        train(tmp_path, "memory", **setup)
    auto, _ = train(tmp_path, "auto", **setup)  # auto: falls back to normal training and says why
    assert auto.feature_cache is None and reason.split()[0] in auto.feature_cache_refusal


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(FreezePolicyError, match="valid: auto, off, memory, disk"):
        FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path), feature_cache="always")
