"""Frozen-prefix cache: the same training as without it (bit for bit on CPU), refused where it cannot be."""

import json
import logging

import pytest
import torch
from helpers import StopAt, TinyImages, identical, snapshot, tiny_model, training_args
from helpers import tiny_vit as vit
from torch import nn
from transformers import TrainerCallback

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze import feature_cache as fc
from hf_freeze import prefix_cache as pc

STATIC = "freeze=stem:stage.0"  # stage.1 (and the rest) train from the start
#: the linear-probe cache for epoch 0, then the boundary moves down at every epoch: stage.1 trains from epoch 1,
#: stage.0 from epoch 2, the stem from epoch 3 (ResNet: nothing frozen is left, the cache is dropped)
GRADUAL = "freeze=backbone;unfreeze=epoch1:1,epoch2:1,epoch3:1"


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py: every test starts with empty caches


def train(tmp_path, mode, model=None, policy=STATIC, dataset=None, name=None, resume=None, callbacks=None, **args):
    """One FreezeTrainer run on 20 images (batches of 8, 8, 4); returns the trainer and the weights."""
    model = model if model is not None else tiny_model("resnet", seed=2)
    args = {"num_train_epochs": 2, "logging_steps": 50, **args}
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / (name or mode), **args),
                            train_dataset=dataset if dataset is not None else TinyImages(n=20),
                            freeze_policy=policy, feature_cache=mode, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(model)


def differing(a, b):
    return [n for n in a if not identical(a[n], b[n])]


def served(trainer):
    return [(i["boundary"], i["served_steps"], i.get("stopped_at_step")) for i in trainer.prefix_cache_info]


# =========================================================================== same training

EXPECTED = {  # (arch, policy) -> (boundary, steps served, step it was dropped at) per prefix cache, in order
    ("resnet", STATIC): [("resnet.encoder.stages.0", 6, None)],
    ("vit", STATIC): [("vit.layers.0", 6, None)],
    ("resnet", GRADUAL): [("resnet.encoder.stages.0", 3, 6), ("resnet.embedder", 3, 9)],
    ("vit", GRADUAL): [("vit.layers.1", 3, 6), ("vit.layers.0", 3, 9), ("vit.embeddings", 3, None)],
}


@pytest.mark.parametrize("policy", [STATIC, GRADUAL], ids=["static", "gradual"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_prefix_cached_training_is_bit_identical_to_uncached(tmp_path, arch, precision, policy):
    make = (lambda: tiny_model("resnet", seed=2)) if arch == "resnet" else vit
    extra = {"bf16": True} if precision == "bf16" else {}
    epochs = 2 if policy == STATIC else 4
    off, w_off = train(tmp_path, "off", make(), policy, num_train_epochs=epochs, **extra)
    on, w_on = train(tmp_path, "memory", make(), policy, num_train_epochs=epochs, **extra)
    # stated tolerance: none. Every parameter and buffer (BatchNorm statistics included) is bit-identical
    assert differing(w_off, w_on) == []
    assert served(on) == EXPECTED[(arch, policy)]
    first = on.prefix_cache_info[0]
    assert first["rows"] == 20 and first["source"] == "computed" and first["storage"] == "memory"
    assert first["batch_sizes"] == {8: "cache", 4: "cache"}  # the epoch's last batch (4 images) checked separately
    assert first["bytes_per_example"] > 0 and first["bytes"] == 20 * first["bytes_per_example"]
    if policy == GRADUAL:  # the linear-probe cache served epoch 0, then the prefix cache at each boundary
        assert on.feature_cache_info["served_steps"] == 3 and on.feature_cache_info["stopped_at_step"] == 3
        assert [e["step"] for e in on.freeze_callback.events_log] == [3, 6, 9]
        assert [i["built_at_step"] for i in on.prefix_cache_info] == [3, 6, 9][:len(on.prefix_cache_info)]
        if arch == "resnet":  # the stem trains from step 9: nothing frozen is left, batches are the real examples
            assert on.prefix_cache is None
    else:
        assert on.feature_cache_info == {} and "below the head are trainable" in on.feature_cache_refusal


def test_a_channels_last_boundary_output_is_served_with_its_layout(tmp_path):
    """ConvNeXt's stem returns a channels-last tensor; the suffix's kernels round differently on a contiguous copy of
    the same values (at batch size 4 here). The cache stores rows in the module's memory order and serves them with
    its strides."""
    make = lambda: tiny_model("convnext", seed=2)  # noqa: E731
    off, w_off = train(tmp_path, "off", make(), "freeze=stem", num_train_epochs=1)
    on, w_on = train(tmp_path, "memory", make(), "freeze=stem", num_train_epochs=1)
    assert differing(w_off, w_on) == [] and served(on) == [("convnext.embeddings", 3, None)]
    leaf = on.prefix_cache.plan.layout.rows[0]
    assert leaf.order == (0, 2, 3, 1)
    with torch.no_grad():
        out = on.prefix_cache.gather(torch.tensor([3, 1]), "cpu")[0]
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_resumed_run_equals_the_uninterrupted_one_and_reuses_the_disk_cache(tmp_path):
    """Checkpoints every 2 steps of the gradual ResNet schedule; resumed at step 4 (boundary at stage.0), 6 (at the
    stem) and 10 (nothing frozen left); one disk cache folder for all runs."""
    cache = tmp_path / "fc"
    kw = dict(policy=GRADUAL, num_train_epochs=4, save_strategy="steps", save_steps=2, feature_cache_dir=str(cache))
    full, w_full = train(tmp_path, "disk", name="full", **kw)
    keys = [i["key"] for i in full.prefix_cache_info]
    files = sorted(cache.glob("*.safetensors"))
    assert len(keys) == 2 and len(files) == 3  # the linear-probe cache's file and one per boundary
    train(tmp_path, "disk", name="cut", callbacks=[StopAt(10)], **kw)
    out = tmp_path / "cut" / "out"
    for step, boundaries in ((4, ["resnet.encoder.stages.0", "resnet.embedder"]), (6, ["resnet.embedder"]), (10, [])):
        fc._MEMORY.clear()  # a new process
        pc._MEMORY.clear()
        resumed, w_resumed = train(tmp_path, "disk", name="cut", resume=str(out / f"checkpoint-{step}"), **kw)
        assert differing(w_full, w_resumed) == []
        assert [i["boundary"] for i in resumed.prefix_cache_info] == boundaries
        assert all(i["source"] == "disk" and i["key"] in keys for i in resumed.prefix_cache_info), [(i["key"], i["source"]) for i in resumed.prefix_cache_info + full.prefix_cache_info]
        assert sorted(cache.glob("*")) == files


# =========================================================================== one pass for the whole schedule

def counting_passes(monkeypatch) -> list[tuple[list[str], bool]]:
    """Record every pass over the data of the prefix cache: (boundaries, whether it computes rows)."""
    passes, real = [], pc._pass
    monkeypatch.setattr(pc, "_pass", lambda model, plans, fetch, prepare, sinks, progress: passes.append(
        ([p.boundary for p in plans], sinks is not None)) or real(model, plans, fetch, prepare, sinks, progress))
    return passes


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_auto_computes_every_boundary_of_a_schedule_in_one_pass(tmp_path, arch, monkeypatch):
    """A head-only phase, then the boundary moves down at every epoch: under auto the prefix cache serves from the
    start (the deepest frozen module), and the rows of every later boundary are computed in that same pass; each
    later one serves after its training-step check. Weights equal the uncached run's bit for bit."""
    make = (lambda: tiny_model("resnet", seed=2)) if arch == "resnet" else vit
    off, w_off = train(tmp_path, "off", make(), GRADUAL, num_train_epochs=4)
    passes = counting_passes(monkeypatch)
    on, w_on = train(tmp_path, "auto", make(), GRADUAL, num_train_epochs=4)
    assert differing(w_off, w_on) == []
    info = on.prefix_cache_info
    assert on.feature_cache_info == {} and "serves the whole schedule" in on.feature_cache_refusal
    assert len(info) >= 3 and [i["source"] for i in info] == ["computed"] + ["ahead"] * (len(info) - 1)
    assert info[0]["ahead"] == [i["boundary"] for i in info[1:]]
    assert all(steps > 0 for _, steps, _ in served(on)), served(on)
    # one pass computes the rows of every boundary, one more reads the data under another random state; each later
    # boundary reads the data once more (no model) when it is due: the dataset still gives the same inputs
    assert passes == [([i["boundary"] for i in info], True), ([i["boundary"] for i in info], False),
                      *(([i["boundary"]], False) for i in info[1:])]


def test_memory_mode_computes_the_later_boundaries_with_the_first_one(tmp_path, monkeypatch):
    """feature_cache='memory': the linear-probe cache serves the head-only phase; the first prefix boundary's pass
    computes the later ones too (no pass at the second boundary)."""
    passes = counting_passes(monkeypatch)
    on, _ = train(tmp_path, "memory", policy=GRADUAL, num_train_epochs=4)
    assert on.feature_cache_info["served_steps"] > 0
    assert [(b, s) for b, s, _ in served(on)] == [("resnet.encoder.stages.0", 3), ("resnet.embedder", 3)]
    assert [i["source"] for i in on.prefix_cache_info] == ["computed", "ahead"]
    assert passes == [(["resnet.encoder.stages.0", "resnet.embedder"], True),
                      (["resnet.encoder.stages.0", "resnet.embedder"], False), (["resnet.embedder"], False)]


class NoisyStemFrom(TrainerCallback):
    """From epoch ``epoch`` on, the stem adds a little noise (random numbers drawn inside the frozen prefix)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if round(state.epoch) == self.epoch:
            model.resnet.embedder.register_forward_hook(lambda m, i, out: out + 1e-3 * torch.randn_like(out))


def test_a_cache_computed_ahead_is_checked_when_due_and_refused_when_the_prefix_changed(tmp_path):
    """The stem starts drawing random numbers at epoch 2, after the pass that computed its rows: the check made
    when that boundary is due sees it, the cache is dropped, the new probe refuses, and training uses the real
    examples: weights equal the uncached run's (which draws the same numbers)."""
    policy = "freeze=stem:stage.0;unfreeze=epoch2:1"
    off, w_off = train(tmp_path, "off", policy=policy, num_train_epochs=3, callbacks=[NoisyStemFrom(2)])
    on, w_on = train(tmp_path, "auto", policy=policy, num_train_epochs=3, callbacks=[NoisyStemFrom(2)])
    assert differing(w_off, w_on) == []
    assert served(on) == [("resnet.encoder.stages.0", 6, 6)]
    assert on.prefix_cache_info[0]["ahead"] == ["resnet.embedder"]
    assert "random numbers" in on.prefix_cache_refusal


def test_a_later_run_reuses_the_in_memory_cache_a_schedule_ended_with(tmp_path):
    """The schedule ends serving the stem's rows (computed ahead); the next run in the process (a search trial, a
    notebook) freezes the stem only and reuses them from memory, after the first trainer let them go."""
    train(tmp_path, "auto", policy=GRADUAL, num_train_epochs=4, name="first")
    off, w_off = train(tmp_path, "off", policy="freeze=stem")
    on, w_on = train(tmp_path, "auto", policy="freeze=stem")
    assert differing(w_off, w_on) == []
    assert [(i["boundary"], i["source"]) for i in on.prefix_cache_info] == [("resnet.embedder", "memory")]


def test_a_failed_check_of_a_cache_computed_ahead_probes_again(tmp_path, monkeypatch):
    monkeypatch.setattr(pc, "recheck", lambda *a: "forced by the test")
    off, w_off = train(tmp_path, "off", policy=GRADUAL, num_train_epochs=4)
    on, w_on = train(tmp_path, "memory", policy=GRADUAL, num_train_epochs=4)
    assert differing(w_off, w_on) == []
    assert [(i["boundary"], i["source"]) for i in on.prefix_cache_info] == [
        ("resnet.encoder.stages.0", "computed"), ("resnet.embedder", "computed")]


def test_later_boundaries_over_the_memory_limit_are_computed_when_due(tmp_path):
    """Room for one boundary's rows (81920 bytes each here), not two: the second is computed at its own time."""
    policy = "freeze=stem:stage.0;unfreeze=epoch1:1"
    off, w_off = train(tmp_path, "off", policy=policy, num_train_epochs=2)
    on, w_on = train(tmp_path, "auto", policy=policy, num_train_epochs=2, feature_cache_max_memory="100KB")
    assert differing(w_off, w_on) == []
    assert [(i["boundary"], i["source"], i["storage"], i["bytes"]) for i in on.prefix_cache_info] == [
        ("resnet.encoder.stages.0", "computed", "memory", 81920), ("resnet.embedder", "computed", "memory", 81920)]
    assert on.prefix_cache_info[0]["ahead"] == []


def test_auto_resumed_in_and_after_the_head_only_phase_equals_the_uninterrupted_run(tmp_path):
    kw = dict(policy=GRADUAL, num_train_epochs=4, save_strategy="steps", save_steps=2)
    full, w_full = train(tmp_path, "auto", name="full", **kw)
    train(tmp_path, "auto", name="cut", callbacks=[StopAt(8)], **kw)
    for step in (2, 4, 8):
        fc._MEMORY.clear()  # a new process
        pc._MEMORY.clear()
        resumed, w_resumed = train(tmp_path, "auto", name="cut", resume=str(tmp_path / "cut" / "out" / f"checkpoint-{step}"),
                                   **kw)
        assert differing(w_full, w_resumed) == [], step
        assert sum(s for _, s, _ in served(resumed)) > 0, step


# =========================================================================== the positive rule

def resnet_with(where, module):
    """A tiny ResNet with a parameter-free ``module`` appended to ``where`` ("stem" or "stage.0")."""
    model = tiny_model("resnet", seed=2)
    if where == "stem":
        model.resnet.embedder.pooler = nn.Sequential(model.resnet.embedder.pooler, module)
    else:
        model.resnet.encoder.stages[0].layers.append(module)
    return model


def pixel_shortcut():
    """A ResNet whose pooled features also read the pixels: the suffix depends on more than the prefix's output."""
    model = tiny_model("resnet", seed=2)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kw: seen.update(px=kw["pixel_values"]), with_kwargs=True)
    pool = model.resnet.pooler
    model.resnet.pooler = nn.Sequential(pool)
    model.resnet.pooler.register_forward_hook(lambda m, args, out: out + seen["px"].float().mean())
    return model


def test_the_boundary_stops_before_the_first_module_that_draws_random_numbers(tmp_path):
    """Dropout in stage.0 (frozen for epoch 0): the prefix is cached up to the stem, and training equals the uncached
    run. When stage.0 is unfrozen, the boundary is the same module: its rows keep serving, nothing is rebuilt."""
    policy = "freeze=stem:stage.0;unfreeze=epoch1:1"
    off, w_off = train(tmp_path, "off", resnet_with("stage.0", nn.Dropout(0.2)), policy)
    on, w_on = train(tmp_path, "auto", resnet_with("stage.0", nn.Dropout(0.2)), policy)
    assert served(on) == [("resnet.embedder", 6, None)] and differing(w_off, w_on) == []
    assert on.prefix_cache_info[0]["groups"] == ["stem"] and on.freeze_callback.events_log[0]["step"] == 3


REFUSED = {  # how the model is changed or trained -> what the refusal says
    "stem_dropout": (dict(model=lambda: resnet_with("stem", nn.Dropout2d(0.1))), "draws random numbers"),
    "stem_batch_statistics": (dict(model=lambda: resnet_with("stem", nn.BatchNorm2d(16, affine=False,
                                                                                     track_running_stats=False))),
                              "other examples in it"),
    "reads_the_pixels_again": (dict(model=pixel_shortcut), "differ from the real step's"),
    "vit_embedding_dropout": (dict(model=lambda: vit(hidden_dropout_prob=0.1)), "draws random numbers"),
    "train_bn": (dict(policy="freeze=stem:stage.0;train_bn=true"), "train_bn=True"),
    "adapter": (dict(policy="freeze=backbone;adapter=lora,r=2"), "adapters"),
    "stem_trains": (dict(policy="freeze=stage.0"), "nothing is frozen at the input end"),
    "workers": (dict(dataloader_num_workers=1), "dataloader_num_workers"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsafe_prefixes_are_refused_before_anything_changes(tmp_path, case):
    setup, reason = REFUSED[case]
    setup = dict(setup)
    model = setup.pop("model", lambda: tiny_model("resnet", seed=2))()
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match=reason) as err:
        train(tmp_path, "memory", model=model, **setup)
    assert "no frozen-prefix cache either" in str(err.value) and "feature_cache='off'" in str(err.value)
    after = snapshot(model)
    assert differing({n: t for n, t in before.items() if n in after}, after) == []


@pytest.mark.parametrize("case", ["stem_dropout", "reads_the_pixels_again"])
def test_auto_falls_back_to_exactly_the_uncached_run(tmp_path, case):
    make = REFUSED[case][0]["model"]
    torch.manual_seed(0)
    off, w_off = train(tmp_path, "off", make())
    torch.manual_seed(0)
    auto, w_auto = train(tmp_path, "auto", make())
    assert auto.prefix_cache_info == [] and REFUSED[case][1] in auto.prefix_cache_refusal
    assert differing(w_off, w_auto) == []


def test_a_table_entry_refuses_its_family(tmp_path, monkeypatch):
    from dataclasses import replace

    from hf_freeze import architectures

    entry = replace(architectures.ARCHITECTURES["resnet"], prefix_issue="its stages read the stem's input again")
    monkeypatch.setitem(architectures.ARCHITECTURES, "resnet", entry)
    auto, _ = train(tmp_path, "auto")
    assert auto.prefix_cache_refusal == "model type 'resnet': its stages read the stem's input again"


# =========================================================================== memory limit, disk

def test_a_cache_over_the_memory_limit_goes_to_a_memory_mapped_file_or_is_refused(tmp_path, caplog):
    off, w_off = train(tmp_path, "off")
    cache = tmp_path / "fc"
    with caplog.at_level(logging.INFO, logger="hf_freeze.prefix_cache"):
        auto, w_auto = train(tmp_path, "auto", feature_cache_max_memory="10KB", feature_cache_dir=str(cache))
    info = auto.prefix_cache_info[0]
    assert info["bytes"] == 20 * 4096 > 10_000 and info["storage"] == "disk" and info["served_steps"] == 6
    assert info["path"].startswith(str(cache / "spill"))
    assert "20 rows x 4.0 KiB = 80.0 KiB, disk (computed)" in caplog.text  # the size per example is logged
    assert differing(w_off, w_auto) == []
    assert list(cache.rglob("*.safetensors*")) == []  # the spilled file is deleted when training ends

    model = tiny_model("resnet", seed=2)
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match=r"needs 80.0 KiB \(4.0 KiB per example\), more than "
                                                r"feature_cache_max_memory \(9.8 KiB\)"):
        train(tmp_path, "memory", model=model, feature_cache_max_memory="10KB")
    assert differing(before, snapshot(model)) == []


def test_bad_memory_limit_is_refused_while_parsing(tmp_path):
    with pytest.raises(FreezePolicyError, match="'12 parsecs' is not a size"):
        training_args(tmp_path, feature_cache_max_memory="12 parsecs")
    assert pc.parse_size("1.5GiB") == 3 * 2**29 and pc.parse_size("512MB") == 512 * 10**6


def test_the_disk_file_is_safetensors_and_a_modified_one_is_rebuilt(tmp_path, caplog):
    from safetensors import safe_open

    cache = tmp_path / "fc"
    first, w_first = train(tmp_path, "disk", feature_cache_dir=str(cache))
    info = first.prefix_cache_info[0]
    path = cache / f"{info['key']}.safetensors"
    with safe_open(str(path), framework="pt") as f:  # the standard reader: header, shapes and checksums
        meta = f.metadata()
        rows = f.get_tensor("leaf.0")
        assert meta["format"] == pc.FORMAT and meta["key"] == info["key"]
        assert json.loads(meta["checksums"])["leaf.0"] == hf_freeze.fingerprint.tensor_digest(rows)
        assert rows.shape == (20, 16, 8, 8) and f.get_tensor("labels").tolist() == TinyImages(n=20).labels.tolist()
    data = bytearray(path.read_bytes())
    data[-900:-700] = bytes(200)  # rows of the stored outputs, same file size
    path.write_bytes(bytes(data))
    pc._MEMORY.clear()
    with caplog.at_level(logging.WARNING, logger="hf_freeze.prefix_cache"):
        again, w_again = train(tmp_path, "disk", feature_cache_dir=str(cache))
    assert "fail their checksum" in caplog.text and str(path) in caplog.text
    assert again.prefix_cache_info[0]["source"] == "computed" and differing(w_first, w_again) == []
    pc._MEMORY.clear()
    third, w_third = train(tmp_path, "disk", feature_cache_dir=str(cache))
    assert third.prefix_cache_info[0]["source"] == "disk" and differing(w_first, w_third) == []


# =========================================================================== the linear-probe cache's checks, shared

@pytest.mark.parametrize("check", ["setup_refusal", "dataset_refusal", "model_refusal"])
def test_the_prefix_cache_makes_the_linear_probe_caches_checks(tmp_path, monkeypatch, check):
    """Both caches call the same check functions of feature_cache.py (not copies): a refusal added there refuses both,
    before anything changes."""
    monkeypatch.setattr(fc, check, lambda *a, **k: f"the {check} check says no")
    model = tiny_model("resnet", seed=2)
    before = snapshot(model)
    with pytest.raises(FreezePolicyError) as err:  # the linear-probe cache first, then the prefix cache
        train(tmp_path, "memory", model=model, policy="freeze=backbone;unfreeze=epoch1:1")
    assert str(err.value).count(f"the {check} check says no") == 2
    assert "no frozen-prefix cache either" in str(err.value)
    assert differing(before, snapshot(model)) == []


def test_the_prefix_cache_keys_and_stores_as_the_linear_probe_cache(tmp_path, monkeypatch):
    """The model side of the key and the disk folder come from feature_cache.py's functions."""
    calls = []
    key = fc.weights_key
    monkeypatch.setattr(fc, "weights_key", lambda *a: calls.append(a[2]) or key(*a))
    folder = tmp_path / "elsewhere"
    monkeypatch.setattr(fc, "cache_folder", lambda cache_dir: folder)
    on, _ = train(tmp_path, "disk", num_train_epochs=1)
    assert pc.FORMAT in calls
    assert (folder / f"{on.prefix_cache_info[0]['key']}.safetensors").is_file()


# =========================================================================== composition (see also tests/test_composition.py)

@pytest.mark.parametrize("extra", [{}, {"bf16": True}], ids=["fp32", "bf16"])
def test_gradient_accumulation_with_a_moving_boundary_equals_off(tmp_path, extra):
    """Accumulation 2 over batches of 8, 8, 4 (an epoch ends inside an accumulation window), unfreeze events at
    optimizer steps 2 and 4: the boundary moves down twice, weights equal the uncached run's bit for bit."""
    policy = "freeze=backbone;unfreeze=step2:1,step4:1"
    kw = dict(num_train_epochs=4, gradient_accumulation_steps=2, **extra)
    off, w_off = train(tmp_path, "off", policy=policy, **kw)
    on, w_on = train(tmp_path, "auto", policy=policy, **kw)
    assert differing(w_off, w_on) == []
    # the head-only phase from the deepest frozen module, then the two boundaries computed in the same pass
    assert [(b, s > 0) for b, s, _ in served(on)] == [("resnet.encoder.stages.1", True),
                                                      ("resnet.encoder.stages.0", True), ("resnet.embedder", True)]
    assert [i["source"] for i in on.prefix_cache_info] == ["computed", "ahead", "ahead"]
    assert [e["step"] for e in on.freeze_callback.events_log] == [2, 4]
