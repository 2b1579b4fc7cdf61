"""Linear-probe feature cache: the same training as without it (bit for bit on CPU), refused where it cannot be."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, StopAt, TinyImages, identical, snapshot, tiny_model, training_args
from helpers import tiny_vit as vit
from torch import nn
from transformers import TrainerCallback

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer, prefix_cache
from hf_freeze import feature_cache as fc

UNFREEZE = "freeze=backbone;unfreeze=epoch1:1"  # head only for epoch 0, then stage.1 trains too


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py: every test starts with empty caches


def train(tmp_path, mode, model=None, policy="backbone", dataset=None, trainer_cls=FreezeTrainer, name=None,
          resume=None, callbacks=None, data_collator=None, **args):
    """One FreezeTrainer run on 20 images (batches of 8, 8, 4), 2 epochs; returns the trainer and the weights."""
    model = model if model is not None else tiny_model("resnet", seed=2)
    args = {"num_train_epochs": 2, "logging_steps": 50, **args}
    trainer = trainer_cls(model=model, args=training_args(tmp_path / (name or mode), **args),
                          train_dataset=dataset if dataset is not None else TinyImages(n=20),
                          freeze_policy=policy, feature_cache=mode, callbacks=callbacks, data_collator=data_collator)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(model)


def differing(a, b):
    return [n for n in a if not identical(a[n], b[n])]


# =========================================================================== same training

@pytest.mark.parametrize("policy", ["backbone", UNFREEZE])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_cached_training_is_bit_identical_to_uncached(tmp_path, arch, precision, policy):
    make = (lambda: tiny_model("resnet", seed=2)) if arch == "resnet" else vit
    extra = {"bf16": True} if precision == "bf16" else {}
    off, w_off = train(tmp_path, "off", make(), policy, **extra)
    on, w_on = train(tmp_path, "memory", make(), policy, **extra)
    # stated tolerance: none. Every parameter and buffer is bit-identical (CPU, fp32 and bf16 autocast)
    assert differing(w_off, w_on) == []
    info = on.feature_cache_info
    assert on.feature_cache_refusal is None and info["source"] == "computed" and info["rows"] == 20
    assert info["dtype"] == ("torch.bfloat16" if precision == "bf16" and arch == "resnet" else "torch.float32")
    assert info["fields"] == (["pooler_output"] if arch == "resnet" else ["last_hidden_state"])
    assert set(info["batch_sizes"]) == {8, 4}  # the epoch's last batch (4 images) is checked separately
    if policy == UNFREEZE:  # served epoch 0 (3 steps), real examples from the unfreeze on
        assert info["served_steps"] == 3 and info["stopped_at_step"] == 3 and on.feature_cache is None
        assert [e["step"] for e in on.freeze_callback.events_log] == [3]
    else:
        assert info["served_steps"] == 6


def test_model_loaded_in_bfloat16_trains_the_same_cached(tmp_path):
    """A model loaded with torch_dtype=bfloat16 gets float32 pixel_values (item 11): the cache handles them as
    the model's own forward does."""
    off, w_off = train(tmp_path, "off", vit().to(torch.bfloat16))
    on, w_on = train(tmp_path, "auto", vit().to(torch.bfloat16))
    assert on.feature_cache_refusal is None and on.feature_cache_info["dtype"] == "torch.bfloat16"
    assert differing(w_off, w_on) == []


# =========================================================================== the probe and the other conditions

def resnet_with(module_after_pool):
    """A tiny ResNet with a parameter-free module after the stem's max-pool (inside the backbone)."""
    model = tiny_model("resnet", seed=2)
    model.resnet.embedder.pooler = nn.Sequential(model.resnet.embedder.pooler, module_after_pool)
    return model


def stochastic_depth():
    from torchvision.ops import StochasticDepth

    return resnet_with(StochasticDepth(0.2, "row"))


def timm_drop_path():
    from timm.layers import DropPath

    return resnet_with(DropPath(0.2))


class Augmented(TinyImages):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"] + 0.01 * torch.randn_like(item["pixel_values"])}


class OwnLoss(FreezeTrainer):
    def compute_loss(self, model, inputs, **kw):
        return super().compute_loss(model, inputs, **kw)


class OwnPrepare(FreezeTrainer):
    def _prepare_input(self, data):
        return super()._prepare_input(data)


class OneAugmented(TinyImages):
    """Random flips of example 17 only, which the cheap check before the probe does not read (``spread(20)``)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == 17 and torch.rand(()) < 0.5:
            item = {**item, "pixel_values": item["pixel_values"].flip(-1)}
        return item


class PrivatelyAugmented(TinyImages):
    """Noise on example 17 from the dataset's own generator: no global generator moves, only the bits differ."""

    def __init__(self, n):
        super().__init__(n=n)
        self.gen = torch.Generator().manual_seed(1)

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == 17:
            item = {**item, "pixel_values": item["pixel_values"] + torch.randn(item["pixel_values"].shape,
                                                                                generator=self.gen)}
        return item


class PerEpoch(TinyImages):
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch


class Mixed(TinyImages):
    """Example 11 is larger than the others (48x48): a padding collator pads its batch mates."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": torch.zeros(3, 48, 48) + 0.5} if i == 11 else item


def pad_collate(items):
    size = max(it["pixel_values"].shape[-1] for it in items)
    pixels = torch.zeros(len(items), 3, size, size)
    for k, it in enumerate(items):
        p = it["pixel_values"]
        pixels[k, :, :p.shape[1], :p.shape[2]] = p
    return {"pixel_values": pixels, "labels": torch.stack([it["labels"] for it in items])}


PROBED = {  # the probe runs the real training forward and sees these
    "vit_attention_dropout": (lambda: vit(attention_probs_dropout_prob=0.1), "draws random numbers"),
    "vit_hidden_dropout": (lambda: vit(hidden_dropout_prob=0.1), "draws random numbers"),
    "dropout2d": (lambda: resnet_with(nn.Dropout2d(0.1)), "draws random numbers"),
    "dropout3d": (lambda: resnet_with(nn.Dropout3d(0.1)), "draws random numbers"),
    "torchvision_stochastic_depth": (stochastic_depth, "draws random numbers"),
    "timm_drop_path": (timm_drop_path, "draws random numbers"),
    "batchnorm_without_running_stats": (lambda: resnet_with(nn.BatchNorm2d(16, affine=False, track_running_stats=False)),
                                        "other examples in it"),
}
STATIC = {  # policy, arguments, dataset, Trainer
    "train_bn": (dict(policy="freeze=backbone;train_bn=true"), "train_bn=True"),
    "adapter": (dict(policy="freeze=backbone;adapter=lora,r=2"), "adapters"),
    "trainable_group": (dict(policy="freeze=stem"), "below the head are trainable"),
    "augmentation": (dict(dataset=Augmented(n=20)), "random augmentation"),
    "workers": (dict(dataloader_num_workers=1), "dataloader_num_workers"),
    "torch_compile": (dict(torch_compile=True), "torch.compile"),
    "compute_loss_func": (dict(compute_loss_func=True), "compute_loss_func"),
    "compute_loss_override": (dict(trainer_cls=OwnLoss), "overrides compute_loss"),
    "prepare_input_override": (dict(trainer_cls=OwnPrepare), "overrides _prepare_input"),
    "set_epoch": (dict(dataset=PerEpoch(n=20)), "set_epoch"),
    "padding_collator": (dict(dataset=Mixed(n=20), data_collator=pad_collate), "depends on the other examples"),
    "augmentation_of_one_example": (dict(dataset=OneAugmented(n=20)), "draws random numbers"),
}


#: refused by the linear-probe cache, served by the frozen-prefix cache (tests/test_prefix_cache.py) up to this module
PREFIX_SERVES = {"vit_attention_dropout": "vit.embeddings", "trainable_group": "resnet.embedder"}


@pytest.mark.parametrize("case", [c for c in [*PROBED, *STATIC] if c not in PREFIX_SERVES])
def test_unsafe_cases_are_refused_before_anything_changes(tmp_path, case):
    if case in PROBED:
        make, reason = PROBED[case]
        setup = {"model": make()}
    else:
        setup, reason = STATIC[case]
        setup = {**setup, "model": tiny_model("resnet", seed=2)}
    model = setup["model"]
    before = snapshot(model)
    kwargs = dict(setup)
    if kwargs.pop("compute_loss_func", None):
        kwargs["trainer_cls"] = lambda **kw: FreezeTrainer(**kw, compute_loss_func=lambda out, labels, **_: out.loss)
    with pytest.raises(FreezePolicyError, match=reason) as err:
        train(tmp_path, "memory", **kwargs)
    assert "feature_cache='off'" in str(err.value)
    after = snapshot(model)  # refused before the first step (an adapter renames the wrapped layers' tensors)
    assert differing({n: t for n, t in before.items() if n in after}, after) == []


@pytest.mark.parametrize("case", list(PREFIX_SERVES))
def test_where_the_head_cache_is_refused_a_frozen_prefix_may_serve(tmp_path, case):
    """``memory`` asks for a cache: the linear-probe cache is refused (and says why), the prefix cache serves."""
    setup = {"model": PROBED[case][0]()} if case in PROBED else {**STATIC[case][0], "model": tiny_model("resnet", seed=2)}
    reason = (PROBED.get(case) or STATIC[case])[1]
    on, _ = train(tmp_path, "memory", **setup)
    assert on.feature_cache_info == {} and reason in on.feature_cache_refusal
    assert [i["boundary"] for i in on.prefix_cache_info] == [PREFIX_SERVES[case]]


@pytest.mark.parametrize("case", ["vit_attention_dropout", "augmentation", "augmentation_of_one_example"])
def test_auto_falls_back_to_exactly_the_uncached_run(tmp_path, case):
    def setup():
        if case in PROBED:
            return {"model": PROBED[case][0]()}
        return {**STATIC[case][0], "model": tiny_model("resnet", seed=2)}

    torch.manual_seed(0)
    off, w_off = train(tmp_path, "off", **setup())
    torch.manual_seed(0)
    auto, w_auto = train(tmp_path, "auto", **setup())
    reason = (PROBED.get(case) or STATIC[case])[1]
    assert auto.feature_cache is None and auto.feature_cache_info == {} and reason in auto.feature_cache_refusal
    assert differing(w_off, w_auto) == []


def test_dropout_with_p0_is_deterministic_and_cached(tmp_path):
    """The rule is positive: a Dropout2d(p=0) draws nothing and changes nothing, so the cache serves."""
    on, _ = train(tmp_path, "memory", resnet_with(nn.Dropout2d(0.0)))
    assert on.feature_cache_refusal is None and on.feature_cache_info["served_steps"] == 6


def test_bad_mode_is_refused_before_anything_changes(tmp_path):
    model = tiny_model("resnet")
    with pytest.raises(FreezePolicyError, match="valid: auto, off, memory, disk"):
        FreezeTrainer(model=model, args=training_args(tmp_path), feature_cache="always")
    assert hf_freeze.get_state(model) is None


def test_augmentation_with_a_private_generator_is_seen_by_the_second_read(tmp_path):
    """No global generator moves and the cheap check misses example 17: the read before training and the build's
    read disagree, so a forced cache is refused at the first step, before the first update."""
    assert 17 not in fc.safety.spread(20)
    model = tiny_model("resnet", seed=2)
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match="different pixels"):
        train(tmp_path, "memory", model, dataset=PrivatelyAugmented(n=20))
    assert differing(before, snapshot(model)) == []
    auto, _ = train(tmp_path, "auto", dataset=PrivatelyAugmented(n=20))
    assert "different pixels" in auto.feature_cache_refusal and auto.feature_cache is None


def test_collator_check_compares_each_row_with_the_example_collated_alone():
    from transformers import default_data_collator

    from hf_freeze.cache_safety import collator_refusal

    same = [TinyImages(n=4)[i] for i in range(4)]
    mixed = [Mixed(n=20)[i] for i in (10, 11, 12)]
    assert collator_refusal(default_data_collator, same) is None
    assert collator_refusal(pad_collate, same) is None  # nothing to pad: the rows are the examples' own
    assert "example 10 depends on the other examples" in collator_refusal(pad_collate, mixed, indices=[10, 11, 12])

    def mixup(items):
        batch = default_data_collator(items)
        return {**batch, "pixel_values": 0.5 * (batch["pixel_values"] + batch["pixel_values"].flip(0))}

    assert "depends on the other examples" in collator_refusal(mixup, same)


def test_overrides_that_would_see_index_batches_are_named():
    from hf_freeze.cache_safety import override_refusal

    class Batches(FreezeTrainer):
        def get_batch_samples(self, *a, **kw):
            return super().get_batch_samples(*a, **kw)

    assert override_refusal(FreezeTrainer) is None
    assert "OwnPrepare overrides _prepare_input" in override_refusal(OwnPrepare)
    assert "Batches overrides get_batch_samples" in override_refusal(Batches)


def test_the_key_covers_the_backbone_modules_not_only_its_tensors(tmp_path):
    """Same tensors and config, another computation: the modules' digest (part of the cache key) changes."""
    from hf_freeze.cache_safety import modules_digest

    model = tiny_model("resnet", seed=2)
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m")
    digest = modules_digest(model.resnet)
    assert modules_digest(reloaded.resnet) == digest  # loading bookkeeping (name_or_path) is left out
    reloaded.resnet.pooler = nn.AdaptiveMaxPool2d((1, 1))
    assert modules_digest(reloaded.resnet) != digest
    conv = model.resnet.embedder.embedder.convolution
    conv.stride = (1, 1)
    assert modules_digest(model.resnet) != digest
    conv.stride = (2, 2)
    assert modules_digest(model.resnet) == digest
    handle = conv.register_forward_hook(lambda m, a, out: out * 2)
    assert modules_digest(model.resnet) != digest
    handle.remove()
    # end to end: the in-memory cache of the average-pooled model is not served to a max-pooled one
    first, _ = train(tmp_path, "memory", tiny_model("resnet", seed=2), name="avg")
    maxed = tiny_model("resnet", seed=2)
    maxed.resnet.pooler = nn.AdaptiveMaxPool2d((1, 1))
    second, _ = train(tmp_path, "memory", maxed, name="max")
    assert first.feature_cache_info["source"] == second.feature_cache_info["source"] == "computed"
    assert first.feature_cache_info["key"] != second.feature_cache_info["key"]


@pytest.mark.parametrize("where", ["file", "inside_a_file"])
def test_a_cache_dir_that_cannot_be_a_folder_is_refused_before_anything_changes(tmp_path, where):
    (tmp_path / "afile").write_text("not a folder")
    folder = str(tmp_path / "afile") if where == "file" else str(tmp_path / "afile" / "features")
    with pytest.raises(FreezePolicyError, match="--feature_cache_dir .* a file, not a folder"):
        training_args(tmp_path, feature_cache="disk", feature_cache_dir=folder)
    args = training_args(tmp_path, feature_cache="off", feature_cache_dir=folder)  # off: the folder is never used
    model = tiny_model("resnet")
    with pytest.raises(FreezePolicyError, match="feature_cache_dir .* a file, not a folder"):
        FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=20), freeze_policy="backbone",
                      feature_cache="disk")
    assert hf_freeze.get_state(model) is None and not (tmp_path / "out").exists()


# =========================================================================== resume, disk

def test_resumed_run_equals_the_uninterrupted_one_and_never_poisons_the_disk_cache(tmp_path):
    """Checkpoints at step 2 (head-only phase) and step 4 (after the epoch-1 unfreeze), one disk cache for all runs."""
    cache = tmp_path / "fc"
    kw = dict(policy=UNFREEZE, save_strategy="steps", save_steps=2, feature_cache_dir=str(cache))
    full, w_full = train(tmp_path, "disk", name="full", **kw)
    files = sorted(cache.glob("*.safetensors"))
    # the linear-probe cache's file, and the frozen-prefix cache's after the unfreeze (tests/test_prefix_cache.py)
    assert len(files) == 2 and full.feature_cache_info["key"] in {f.name.removesuffix(".safetensors") for f in files}
    train(tmp_path, "disk", name="cut", callbacks=[StopAt(4)], **kw)
    out = tmp_path / "cut" / "out"
    for step, served in ((2, 1), (4, None)):
        fc._MEMORY.clear()  # a new process
        prefix_cache._MEMORY.clear()
        resumed, w_resumed = train(tmp_path, "disk", name="cut", resume=str(out / f"checkpoint-{step}"), **kw)
        assert differing(w_full, w_resumed) == []
        if served:  # head-only phase: the same features, read back from disk under the same key
            assert resumed.feature_cache_info["source"] == "disk"
            assert resumed.feature_cache_info["key"] == full.feature_cache_info["key"]
            assert resumed.feature_cache_info["served_steps"] == served
        else:  # the unfreeze is re-applied in on_train_begin: no cache is built for a phase that is over
            assert resumed.feature_cache_info == {} and resumed.freeze_callback.events_log[0]["resumed"]
        assert sorted(cache.glob("*")) == files


def test_disk_cache_is_reused_in_bf16_and_invalidated_by_model_data_or_precision(tmp_path):
    cache = tmp_path / "fc"
    first, w_first = train(tmp_path, "disk", bf16=True, feature_cache_dir=str(cache))
    fc._MEMORY.clear()
    again, w_again = train(tmp_path, "disk", bf16=True, feature_cache_dir=str(cache))
    assert first.feature_cache_info["source"] == "computed" and again.feature_cache_info["source"] == "disk"
    assert again.feature_cache_info["dtype"] == "torch.bfloat16" and again.feature_cache_info["device"] == "cpu"
    assert differing(w_first, w_again) == []
    keys = {first.feature_cache_info["key"]}
    for change in (dict(model=tiny_model("resnet", seed=3)), dict(dataset=TinyImages(n=20, seed=9)), dict()):
        other, _ = train(tmp_path, "disk", feature_cache_dir=str(cache), **({"bf16": True} if change else {}), **change)
        assert other.feature_cache_info["source"] == "computed"
        keys.add(other.feature_cache_info["key"])
    assert len(keys) == 4 and len(list(cache.glob("*.safetensors"))) == 4


def test_a_modified_or_truncated_disk_cache_is_detected_and_rebuilt(tmp_path, caplog):
    cache = tmp_path / "fc"
    clean, w_clean = train(tmp_path, "disk", feature_cache_dir=str(cache))
    (path,) = cache.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    size = len(data)
    data[-600:-400] = os.urandom(200)  # rows of the stored features/labels, same file size
    path.write_bytes(bytes(data))
    for damage, message in (("overwritten", "fail their checksum"), ("truncated", "cannot be read")):
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: size // 2])
        fc._MEMORY.clear()
        with caplog.at_level(logging.WARNING, logger="hf_freeze.feature_cache"):
            again, w_again = train(tmp_path, "disk", feature_cache_dir=str(cache))
        assert message in caplog.text and str(path) in caplog.text
        assert again.feature_cache_info["source"] == "computed" and differing(w_clean, w_again) == []
        assert path.stat().st_size == size and sorted(cache.iterdir()) == [path]  # rewritten whole
        caplog.clear()


class Interrupt(TinyImages):
    """Raises KeyboardInterrupt on the 5th read once training has started: a Ctrl-C while the cache is built."""

    armed, reads = False, 0

    def __getitem__(self, i):
        self.reads += self.armed
        if self.reads == 5:
            raise KeyboardInterrupt
        return super().__getitem__(i)


class Arm(TrainerCallback):
    def __init__(self, dataset):
        self.dataset = dataset

    def on_step_begin(self, args, state, control, **kw):
        self.dataset.armed = True


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    cache = tmp_path / "fc"
    data = Interrupt(n=20)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "disk", dataset=data, callbacks=[Arm(data)], feature_cache_dir=str(cache))
    assert data.reads == 5 and (not cache.exists() or list(cache.iterdir()) == [])

    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, "disk", feature_cache_dir=str(cache))
    assert list(cache.iterdir()) == []
    monkeypatch.undo()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale = cache / f"resnet-x.safetensors.tmp.{socket.gethostname()}.{int(dead.stdout)}"
    alive = cache / f"resnet-y.safetensors.tmp.{socket.gethostname()}.{os.getpid()}"
    stale.write_bytes(b"left by a killed build")
    alive.write_bytes(b"a build in progress")
    train(tmp_path, "disk", feature_cache_dir=str(cache))
    assert not stale.exists() and alive.exists() and len(list(cache.glob("*.safetensors"))) == 1


# =========================================================================== core install, DDP

@pytest.mark.slow
def test_two_ddp_processes_on_a_core_install_train_the_same_with_the_default_cache(tmp_path):
    """torchrun, 2 CPU processes (gloo), `datasets` not importable (item 3: FreezeTrainer with a torch Dataset must
    not need it): with the default feature_cache='auto' each rank's weights equal its weights with the cache off."""
    from torchrun import torchrun_script

    torchrun_script("ddp_feature_cache.py", tmp_path, expect=["rank0.pt", "rank1.pt"], env={"PYTHONPATH": str(ROOT)})
    ranks = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    for path in ranks:
        r = torch.load(path)
        assert r["world_size"] == 2 and r["datasets"] is None, r
        # the schedule reaches a frozen prefix after the head-only phase: the frozen-prefix cache serves from the
        # start, every boundary computed in one pass (tests/test_prefix_cache.py); 2 epochs x 3 steps per rank head-only
        assert r["auto"]["info"] == {} and "serves the whole schedule" in r["auto"]["refusal"], r["auto"]
        first, later = r["auto"]["prefix"]
        assert (first["built_at_step"], first["stopped_at_step"], first["served_steps"]) == (0, 6, 6), first
        assert later["source"] == "ahead" and later["served_steps"] == 3, later
        assert differing(r["off"]["final"], r["auto"]["final"]) == []
