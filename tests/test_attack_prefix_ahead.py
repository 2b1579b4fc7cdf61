"""Attack on the README's "One pass for the whole schedule" (frozen-prefix cache): the rows of every boundary an
unfreeze schedule reaches are computed in the first boundary's pass and served later after a check.

Every attempt compares the cached run with ``feature_cache='off'`` bit for bit (every parameter and buffer), or
asserts the promised refusal. Attempts that break a promise are strict xfails naming the bug.
"""

import errno

import pytest
import torch
from helpers import TinyImages, differing, identical, snapshot, tiny_model, training_args
from transformers import TrainerCallback

from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze import feature_cache as fc
from hf_freeze import prefix_cache as pc

#: ResNet groups: stem, stage.0, stage.1, head. Head only for epoch 0, then stage.1, then stage.0 train.
TWO = "freeze=backbone;unfreeze=epoch1:1,epoch2:1"


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py: every test starts with empty caches


def resnet():
    return tiny_model("resnet", seed=2)


def run(tmp_path, mode, model, policy, *, dataset=None, name=None, resume=None, callbacks=None, **args):
    """One FreezeTrainer run on 20 images (batches of 8, 8, 4: 3 steps per epoch)."""
    args = {"num_train_epochs": 3, "logging_steps": 50, **args}
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / (name or mode), **args),
                            train_dataset=dataset if dataset is not None else TinyImages(n=20),
                            freeze_policy=policy, feature_cache=mode, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(trainer.model)


def sources(trainer):
    return [(i["boundary"], i["source"]) for i in trainer.prefix_cache_info]


def served(trainer):
    return sum(i["served_steps"] for i in trainer.prefix_cache_info)


def aheads(trainer):
    return [i for i in trainer.prefix_cache_info if i["source"] == "ahead"]


# =========================================================================== what changes between the pass and a later boundary

class ChangeData(TrainerCallback):
    """At the start of epoch ``epoch`` the user replaces the pixels of examples ``rows`` (a curriculum step that
    swaps in harder images), not those of the first batch."""

    def __init__(self, dataset, epoch, rows=range(8, 20)):
        self.dataset, self.epoch, self.rows = dataset, epoch, list(rows)

    def on_epoch_begin(self, args, state, control, **kw):
        if round(state.epoch) == self.epoch:
            g = torch.Generator().manual_seed(7)
            self.dataset.pixels[self.rows] = torch.randn(len(self.rows), 3, 32, 32, generator=g)


def changing_run(tmp_path, mode, epoch, name=None, **kw):
    data = TinyImages(n=20)
    return run(tmp_path, mode, resnet(), TWO, dataset=data, callbacks=[ChangeData(data, epoch)], name=name, **kw)


def test_dataset_changed_after_the_pass_before_a_later_boundary_memory(tmp_path):
    """memory mode: the linear-probe cache for epoch 0, the stage.0 boundary computed at epoch 1 together with the
    stem's rows (ahead); the user changes examples 8..19 at epoch 2, when the stem boundary is due."""
    off, w_off = changing_run(tmp_path, "off", 2)
    on, w_on = changing_run(tmp_path, "memory", 2)
    assert differing(w_off, w_on) == [], sources(on)


def test_dataset_changed_at_a_boundary_without_ahead_equals_off(tmp_path, monkeypatch):
    """Control: the same run with nothing computed ahead (each boundary computed when due) equals off, so the
    difference above comes from the rows computed ahead."""
    monkeypatch.setattr(pc.PrefixCacheTrainerMixin, "_ahead_that_fits", lambda self, plan, storage: [])
    off, w_off = changing_run(tmp_path, "off", 2)
    on, w_on = changing_run(tmp_path, "memory", 2)
    assert differing(w_off, w_on) == [] and sources(on) == [("resnet.encoder.stages.0", "computed"),
                                                            ("resnet.embedder", "computed")]


def test_dataset_changed_after_the_head_only_phase_auto(tmp_path):
    off, w_off = changing_run(tmp_path, "off", 1)
    on, w_on = changing_run(tmp_path, "auto", 1)
    assert differing(w_off, w_on) == [], sources(on)


class HookFrom(TrainerCallback):
    """At the start of epoch ``epoch`` the user adds a forward hook to the stem (which is frozen throughout)."""

    def __init__(self, epoch, hook):
        self.epoch, self.hook = epoch, hook

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        if round(state.epoch) == self.epoch:
            model.resnet.embedder.register_forward_hook(self.hook)


@pytest.mark.parametrize("mode,epoch", [("memory", 2), ("auto", 1)])
def test_forward_hook_added_to_the_stem_after_the_pass_is_caught_by_the_check(tmp_path, mode, epoch):
    def scale(m, i, out):
        return out * 1.5
    off, w_off = run(tmp_path, "off", resnet(), TWO, callbacks=[HookFrom(epoch, scale)])
    on, w_on = run(tmp_path, mode, resnet(), TWO, callbacks=[HookFrom(epoch, scale)])
    assert differing(w_off, w_on) == []
    assert ("resnet.embedder", "ahead") not in sources(on)


def test_forward_hook_that_changes_only_later_examples_is_caught(tmp_path):
    """The hook shifts the stem's output of bright examples (pixel mean > 1.5: label 2 here), ordered so that the
    first batch has none of them: the rows computed ahead are no longer the stem's output for 6 of 20 examples."""
    def data():
        d = TinyImages(n=20)
        order = torch.argsort(d.pixels.mean(dim=(1, 2, 3)), stable=True)
        d.pixels, d.labels = d.pixels[order].clone(), d.labels[order].clone()
        return d
    bright = [i for i in range(20) if data().pixels[i].mean() > 1.5]
    assert bright and min(bright) >= 8

    def shift(m, args, out):
        keep = (args[0].mean(dim=(1, 2, 3)) > 1.5).to(out.dtype).view(-1, 1, 1, 1)
        return out + keep

    off, w_off = run(tmp_path, "off", resnet(), TWO, dataset=data(), callbacks=[HookFrom(2, shift)])
    on, w_on = run(tmp_path, "memory", resnet(), TWO, dataset=data(), callbacks=[HookFrom(2, shift)])
    assert differing(w_off, w_on) == [], sources(on)


def test_stem_buffer_changed_after_the_pass_is_reported_as_in_off(tmp_path):
    """A callback changes a frozen BatchNorm statistic of the stem at epoch 2: the plain run reports it at the end
    (FrozenWeightsChanged); the cached run must report it the same way, not hide it."""
    class Buf(TrainerCallback):
        def on_epoch_begin(self, args, state, control, model=None, **kw):
            if round(state.epoch) == 2:
                with torch.no_grad():
                    model.resnet.embedder.embedder.normalization.running_mean.add_(0.1)
    from hf_freeze.errors import FrozenWeightsChanged
    for mode in ("off", "memory"):
        with pytest.raises(FrozenWeightsChanged, match="running_mean"):
            run(tmp_path, mode, resnet(), TWO, callbacks=[Buf()])


# =========================================================================== memory limit at the edges

@pytest.mark.parametrize("limit,ahead", [(2 * 81920, True), (2 * 81920 - 1, False)])
def test_memory_limit_exactly_two_boundaries_or_one_byte_less(tmp_path, limit, ahead):
    """memory mode: the stage.0 and stem boundaries take 81920 bytes each; a limit of exactly both computes the stem's
    rows ahead, one byte less computes them when due. Both train as off."""
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    on, w_on = run(tmp_path, "memory", resnet(), TWO, feature_cache_max_memory=str(limit))
    assert differing(w_off, w_on) == []
    assert sources(on) == [("resnet.encoder.stages.0", "computed"),
                           ("resnet.embedder", "ahead" if ahead else "computed")]


@pytest.mark.parametrize("limit,whole", [(40960 + 2 * 81920, True), (40960 + 2 * 81920 - 1, False)])
def test_auto_head_only_phase_at_the_limit_of_the_whole_schedule(tmp_path, limit, whole):
    """auto: the deepest boundary (stage.1, 40960 bytes) plus both later ones fit exactly: the prefix cache serves the
    whole schedule from step 0; one byte less: the linear-probe cache serves epoch 0, then the prefix cache."""
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    on, w_on = run(tmp_path, "auto", resnet(), TWO, feature_cache_max_memory=str(limit))
    assert differing(w_off, w_on) == []
    if whole:
        assert [s for _, s in sources(on)] == ["computed", "ahead", "ahead"]
        assert "serves the whole schedule" in on.feature_cache_refusal
    else:
        assert on.feature_cache_info["served_steps"] == 3
        assert sources(on) == [("resnet.encoder.stages.0", "computed"), ("resnet.embedder", "ahead")]


# =========================================================================== full disk, Ctrl-C

def fail_writer(monkeypatch, which: int, at: str, exc=None):
    """The ``which``-th DiskWriter created (0: the first boundary's, 1: the first one computed ahead) fails in
    ``at`` ("append" or "close") like a full disk."""
    made = []
    init, method = pc.DiskWriter.__init__, getattr(pc.DiskWriter, at)

    def counting(self, *a, **k):
        self._nth = len(made)
        made.append(self)
        init(self, *a, **k)

    def failing(self, *a, **k):
        if self._nth == which:
            raise exc or OSError(errno.ENOSPC, "No space left on device")
        return method(self, *a, **k)

    monkeypatch.setattr(pc.DiskWriter, "__init__", counting)
    monkeypatch.setattr(pc.DiskWriter, at, failing)
    return made


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("at", ["append", "close"])
def test_full_disk_while_spilling_a_boundary_computed_ahead_auto(tmp_path, monkeypatch, at):
    """auto over the memory limit spills to disk; the file of the boundary computed ahead cannot be written. The
    boundary trains on the real examples (README: a logged warning), training equals off, and no spill file is
    left behind (spill files are deleted when the cache is dropped or training ends)."""
    cache = tmp_path / "fc"
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    made = fail_writer(monkeypatch, 1, at)
    on, w_on = run(tmp_path, "auto", resnet(), TWO, feature_cache_max_memory="50KB", feature_cache_dir=str(cache))
    assert len(made) >= 2
    assert differing(w_off, w_on) == []
    assert leftovers(cache / "spill") == []


@pytest.mark.parametrize("at", ["append", "close"])
def test_full_disk_while_writing_a_boundary_computed_ahead_disk(tmp_path, monkeypatch, at):
    cache = tmp_path / "fc"
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    fail_writer(monkeypatch, 1, at)  # 0: the stage.0 boundary's file, 1: the stem's (computed ahead)
    on, w_on = run(tmp_path, "disk", resnet(), TWO, feature_cache_dir=str(cache))
    assert differing(w_off, w_on) == []


def test_full_disk_while_writing_ahead_in_disk_mode_leaves_nothing_half_written(tmp_path, monkeypatch):
    """What holds of the crash above: no half-written file, the checkpoints before it are there, and a run after
    it (disk space back) equals off."""
    cache = tmp_path / "fc"
    kw = dict(feature_cache_dir=str(cache), save_strategy="steps", save_steps=1)
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    fail_writer(monkeypatch, 1, "close")
    crash, w_crash = run(tmp_path, "disk", resnet(), TWO, name="crash", **kw)  # the file computed ahead is dropped
    assert differing(w_off, w_crash) == []
    assert not [p for p in leftovers(cache) if "building" in p or p.endswith(".tmp")], leftovers(cache)
    monkeypatch.undo()
    again, w_again = run(tmp_path, "disk", resnet(), TWO, name="again", **kw)
    assert differing(w_off, w_again) == []


class Interrupt(Exception):
    pass


def test_ctrl_c_during_the_whole_schedule_pass_then_train_again(tmp_path, monkeypatch):
    """auto computes every boundary's rows before the first step; Ctrl-C in the middle of that pass (while the rows
    computed ahead are stored) leaves the model as it was, and train() again on the same trainer equals off."""
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    calls = {"n": 0}
    append = pc.MemorySink.append

    def interrupted(self, name, rows):
        calls["n"] += 1
        if calls["n"] == 9:  # the second batch
            raise KeyboardInterrupt
        return append(self, name, rows)

    monkeypatch.setattr(pc.MemorySink, "append", interrupted)
    model = resnet()
    before = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / "ki", num_train_epochs=3, logging_steps=50),
                            train_dataset=TinyImages(n=20), freeze_policy=TWO, feature_cache="auto")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert differing(before, snapshot(model)) == [] and trainer.state.global_step == 0
    monkeypatch.setattr(pc.MemorySink, "append", append)
    trainer.train()
    assert differing(w_off, snapshot(model)) == []
    assert [s for _, s in sources(trainer)] == ["computed", "ahead", "ahead"]


def test_ctrl_c_during_the_check_of_a_cache_computed_ahead_then_resume(tmp_path, monkeypatch):
    """memory mode, checkpoints every step; Ctrl-C while the stem's rows computed ahead are checked (step 6); a new
    process resumes from checkpoint-6 and equals the uninterrupted plain run."""
    kw = dict(save_strategy="steps", save_steps=1)
    off, w_off = run(tmp_path, "off", resnet(), TWO, **kw)
    recheck = pc.recheck

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(pc, "recheck", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "memory", resnet(), TWO, name="cut", **kw)
    monkeypatch.setattr(pc, "recheck", recheck)
    fc._MEMORY.clear()
    pc._MEMORY.clear()
    out = tmp_path / "cut" / "out"
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert last == 6
    resumed, w_resumed = run(tmp_path, "memory", resnet(), TWO, name="cut", resume=str(out / "checkpoint-6"), **kw)
    assert differing(w_off, w_resumed) == []


STEPS = "freeze=backbone;unfreeze=step2:1,step4:1"  # boundary moves mid-epoch (3 steps per epoch)


@pytest.mark.parametrize("mode", ["auto", "disk"])
def test_resume_around_step_events_in_a_new_process(tmp_path, mode):
    """Step events in the middle of epochs; checkpoints every step; resumed from before the first event, between
    them, exactly at the second one and after the last, each in a new process: equals the uninterrupted plain run;
    with disk the files computed ahead by the first run serve the resumed runs."""
    kw = dict(save_strategy="steps", save_steps=1, feature_cache_dir=str(tmp_path / "fc"))
    off, w_off = run(tmp_path, "off", resnet(), STEPS, **kw)
    full, w_full = run(tmp_path, mode, resnet(), STEPS, name="full", **kw)
    assert differing(w_off, w_full) == [] and "ahead" in [s for _, s in sources(full)]
    out = tmp_path / "full" / "out"
    for step in (1, 3, 4, 6):
        fc._MEMORY.clear()
        pc._MEMORY.clear()
        resumed, w_resumed = run(tmp_path, mode, resnet(), STEPS, name="full", resume=str(out / f"checkpoint-{step}"),
                                 **kw)
        assert differing(w_off, w_resumed) == [], (step, sources(resumed))
        assert served(resumed) > 0, step
        if mode == "disk" and step >= 3:
            assert all(s == "disk" for _, s in sources(resumed)), (step, sources(resumed))


# =========================================================================== schedules

SCHEDULES = {
    # the middle group first (the prefix shrinks to the stem at once), then stage.1 (the prefix stays the stem)
    "middle_first": "freeze=backbone;unfreeze=epoch1:stage.0,epoch2:stage.1",
    # listed order and firing order differ (3 steps per epoch: epoch1 fires at step 3, before step4)
    "named_order_depends_on_epoch_length": "freeze=backbone;unfreeze=step4:stage.1,epoch1:stage.0",
    # numbers taken in firing order, the step event first although listed second
    "numbers_order_depends_on_epoch_length": "freeze=backbone;unfreeze=epoch1:1@0.5,step2:1@0.1",
    # both events due at step 3: the intermediate prefix (stem+stage.0) is never trained on
    "two_events_at_the_same_step": "freeze=backbone;unfreeze=epoch1:1,step3:1",
    # fractional epochs: mid-epoch boundaries
    "fractional_epochs": "freeze=backbone;unfreeze=epoch0.5:1,epoch1.5:1",
    # the stem unfreezes while stage.0 stays frozen: no prefix after it
    "stem_before_stage0": "freeze=backbone;unfreeze=epoch1:stage.1,epoch2:stem",
    # lr scales and layer decay on a schedule that reaches every prefix
    "lr_scales_and_decay": "freeze=backbone;unfreeze=step1:1@0.3,step5:1@0.01;layer_lr_decay=0.5",
}


@pytest.mark.parametrize("name,mode", [(n, "auto") for n in SCHEDULES] + [
    ("middle_first", "memory"), ("named_order_depends_on_epoch_length", "memory")])
def test_schedules_equal_off(tmp_path, name, mode):
    policy = SCHEDULES[name]
    off, w_off = run(tmp_path, "off", resnet(), policy)
    on, w_on = run(tmp_path, mode, resnet(), policy)
    assert differing(w_off, w_on) == [], sources(on)
    assert [e["step"] for e in on.freeze_callback.events_log] == [e["step"] for e in off.freeze_callback.events_log]
    assert served(on) + on.feature_cache_info.get("served_steps", 0) > 0


# =========================================================================== other models, precision, accumulation

def two_events(model):
    """Head only for epoch 0; at epoch 1 everything above stage.0 trains; at epoch 2 stage.0 too (stem frozen)."""
    import hf_freeze
    below = [g.name for g in hf_freeze.layer_groups(model) if g.name != "head"]
    return f"freeze=backbone;unfreeze=epoch1:{len(below) - 2},epoch2:1"


@pytest.mark.parametrize("arch,extra", [
    ("vit", {"bf16": True}),
    ("convnext", {}),
    ("regnet", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}),
    ("swin", {}),
])
def test_other_models_auto_equal_off(tmp_path, arch, extra):
    import hf_freeze
    make = lambda: tiny_model(arch, seed=2)  # noqa: E731
    policy = two_events(make())
    size = hf_freeze.tiny.IMAGE_SIZE.get(arch, 32)
    data = lambda: TinyImages(n=20, size=size)  # noqa: E731
    off, w_off = run(tmp_path, "off", make(), policy, dataset=data(), **extra)
    on, w_on = run(tmp_path, "auto", make(), policy, dataset=data(), **extra)
    assert differing(w_off, w_on) == [], sources(on)
    assert served(on) + on.feature_cache_info.get("served_steps", 0) > 0, (on.prefix_cache_refusal, on.feature_cache_refusal)


# =========================================================================== several runs in one process

def test_next_run_in_the_same_process_after_a_cache_computed_ahead_was_dropped(tmp_path):
    """Trial 1 (auto): head only, stage.1 at epoch 1 (the stage.0 boundary, computed ahead, serves), then everything
    at epoch 2 (dropped). Trial 2, a fresh copy of the same pretrained model in the same process, static
    freeze=stem:stage.0: its boundary is the same module with the same weights and data."""
    first, _ = run(tmp_path, "auto", resnet(), "freeze=backbone;unfreeze=epoch1:1,epoch2:2", name="trial1")
    assert ("resnet.encoder.stages.0", "ahead") in sources(first)
    off, w_off = run(tmp_path, "off", resnet(), "freeze=stem:stage.0", num_train_epochs=1)
    on, w_on = run(tmp_path, "auto", resnet(), "freeze=stem:stage.0", num_train_epochs=1, name="trial2")
    assert differing(w_off, w_on) == [] and served(on) > 0


@pytest.mark.parametrize("mode", ["auto"])
def test_second_train_on_the_same_trainer_equals_off(tmp_path, mode):
    """train() twice on one trainer (the schedule is over for the second): both equal the plain run's two calls."""
    def twice(m):
        t, _ = run(tmp_path, m, resnet(), TWO, name=m)
        t.train()
        return t, snapshot(t.model)
    off, w_off = twice("off")
    on, w_on = twice(mode)
    assert differing(w_off, w_on) == [], sources(on)


def test_trainer_rebuilt_on_the_trained_model_equals_off(tmp_path):
    """A second FreezeTrainer on the model the first one trained (the stem stayed frozen: its rows computed ahead by
    the first run have the same key), under auto."""
    def rebuilt(mode):
        first, _ = run(tmp_path, mode, resnet(), TWO, name=mode + "1")
        return run(tmp_path, mode, first.model, TWO, name=mode + "2")
    off, w_off = rebuilt("off")
    on, w_on = rebuilt("auto")
    assert differing(w_off, w_on) == [], sources(on)


def test_max_steps_ending_before_the_later_boundaries(tmp_path):
    """max_steps=4: the stem's rows computed ahead are never used; training equals off and they are released."""
    off, w_off = run(tmp_path, "off", resnet(), TWO, max_steps=4)
    on, w_on = run(tmp_path, "auto", resnet(), TWO, max_steps=4)
    assert differing(w_off, w_on) == [] and served(on) == 4
    assert on._prefix_ahead == {}


def test_user_frozen_stage_and_unfreeze_bn_equal_off(tmp_path):
    """The user froze stage.0 themselves (an event never trains it) and unfreeze_bn=true."""
    def model():
        m = resnet()
        for p in m.resnet.encoder.stages[0].parameters():
            p.requires_grad_(False)
        return m
    policy = "freeze=backbone;unfreeze=epoch1:1,epoch2:1;unfreeze_bn=true"
    off, w_off = run(tmp_path, "off", model(), policy)
    on, w_on = run(tmp_path, "auto", model(), policy)
    assert differing(w_off, w_on) == [], sources(on)


def test_train_bn_is_refused_by_auto_and_equals_off(tmp_path):
    policy = "freeze=backbone;unfreeze=epoch1:1,epoch2:1;train_bn=true"
    off, w_off = run(tmp_path, "off", resnet(), policy)
    on, w_on = run(tmp_path, "auto", resnet(), policy)
    assert differing(w_off, w_on) == [] and served(on) == 0


def test_drop_last_equals_off(tmp_path):
    off, w_off = run(tmp_path, "off", resnet(), TWO, dataloader_drop_last=True)
    on, w_on = run(tmp_path, "auto", resnet(), TWO, dataloader_drop_last=True)
    assert differing(w_off, w_on) == [] and [s for _, s in sources(on)] == ["computed", "ahead", "ahead"]


def test_memory_mode_refuses_a_later_boundary_that_cannot_fit_before_anything_changes(tmp_path):
    """RegNet: the stem's output (8 KiB per example, 160 KiB) is larger than stage.0's; a 100 KB limit fits the
    first prefix boundary but not the stem's, reached at epoch 2: memory refuses before the first step, the model and
    the output folder are as they were."""
    model = tiny_model("regnet", seed=2)
    before = snapshot(model)
    out = tmp_path / "memory" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FreezePolicyError, match="regnet.embedder"):
        run(tmp_path, "memory", model, TWO, feature_cache_max_memory="100KB", save_strategy="steps", save_steps=1)
    assert differing(before, snapshot(model)) == []
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_same_trainer_resumed_from_a_checkpoint_after_the_run_in_the_same_process(tmp_path):
    """memory mode: the run ends with the stem's rows computed ahead serving; the user then resumes the same trainer
    from checkpoint-7 (a notebook): it must equal the plain run."""
    kw = dict(save_strategy="steps", save_steps=1)
    off, w_off = run(tmp_path, "off", resnet(), TWO, **kw)
    on, _ = run(tmp_path, "memory", resnet(), TWO, **kw)
    assert sources(on)[-1] == ("resnet.embedder", "ahead")
    on.train(resume_from_checkpoint=str(tmp_path / "memory" / "out" / "checkpoint-7"))
    assert differing(w_off, snapshot(on.model)) == []


def test_first_batch_changed_after_the_pass_is_caught(tmp_path):
    """Control for the dataset bug: when the user's change reaches the first batch too, the check sees it, the rows
    computed ahead are dropped and the boundary is computed from the new examples: equal to off."""
    data_off, data_on = TinyImages(n=20), TinyImages(n=20)
    off, w_off = run(tmp_path, "off", resnet(), TWO, dataset=data_off, callbacks=[ChangeData(data_off, 2, range(20))])
    on, w_on = run(tmp_path, "memory", resnet(), TWO, dataset=data_on, callbacks=[ChangeData(data_on, 2, range(20))])
    assert differing(w_off, w_on) == []
    assert sources(on) == [("resnet.encoder.stages.0", "computed"), ("resnet.embedder", "computed")]


# =========================================================================== heads, adapters, evaluation

def test_mlp_head_with_norm_lr_scales_and_the_whole_schedule(tmp_path):
    policy = "freeze=backbone;head=mlp:16,relu,dropout=0.2,norm=true;unfreeze=step2:1@0.5,epoch1.5:1@0.1"
    off, w_off = run(tmp_path, "off", resnet(), policy)
    on, w_on = run(tmp_path, "auto", resnet(), policy)
    assert differing(w_off, w_on) == [], sources(on)


def test_adapter_with_a_schedule_is_refused_before_anything_changes(tmp_path):
    """An adapter policy takes no unfreeze schedule: refused naming both, the model untouched."""
    model = resnet()
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match="adapter.*unfreeze schedule"):
        run(tmp_path, "auto", model, "freeze=backbone;adapter=lora,r=2,groups=stage.1;unfreeze=epoch1:stage.0")
    assert differing(before, snapshot(model)) == [] and not hasattr(model, "_hf_freeze_state")


def test_evaluation_and_load_best_model_at_end_with_the_whole_schedule(tmp_path):
    """Evaluation every epoch between the boundary moves, the best checkpoint loaded at the end (TinyImages(seed=1)
    as the evaluation set)."""
    kw = dict(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss",
              greater_is_better=False)

    def go(mode):
        trainer = FreezeTrainer(model=resnet(), args=training_args(tmp_path / mode, num_train_epochs=3,
                                                                   logging_steps=50, **kw),
                                train_dataset=TinyImages(n=20), eval_dataset=TinyImages(n=12, seed=1),
                                freeze_policy=TWO, feature_cache=mode)
        trainer.train()
        return trainer, snapshot(trainer.model)
    off, w_off = go("off")
    on, w_on = go("auto")
    assert differing(w_off, w_on) == [] and [s for _, s in sources(on)] == ["computed", "ahead", "ahead"]
    assert [h.get("eval_loss") for h in off.state.log_history if "eval_loss" in h] == [
        h.get("eval_loss") for h in on.state.log_history if "eval_loss" in h]


def test_ctrl_c_during_the_ahead_pass_mid_run_then_resume_the_same_trainer(tmp_path, monkeypatch):
    """memory mode: Ctrl-C while the stage.0 boundary's pass (with the stem's rows ahead) runs at step 3; the user
    resumes the same trainer in the same process (resume_from_checkpoint=True): equals the plain run."""
    kw = dict(save_strategy="steps", save_steps=1)
    off, w_off = run(tmp_path, "off", resnet(), TWO, **kw)
    calls = {"n": 0}
    append = pc.MemorySink.append

    def interrupted(self, name, rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return append(self, name, rows)

    monkeypatch.setattr(pc.MemorySink, "append", interrupted)
    trainer = FreezeTrainer(model=resnet(), args=training_args(tmp_path / "ki", num_train_epochs=3, logging_steps=50,
                                                                **kw),
                            train_dataset=TinyImages(n=20), freeze_policy=TWO, feature_cache="memory")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(pc.MemorySink, "append", append)
    trainer.train(resume_from_checkpoint=True)
    assert differing(w_off, snapshot(trainer.model)) == [], sources(trainer)


@pytest.mark.parametrize("case", ["one_example", "nine_examples", "float64", "vit_gradient_checkpointing",
                                  "zero_memory_limit"])
def test_odd_sizes_dtypes_and_settings_equal_off(tmp_path, case):
    from helpers import tiny_vit

    class D64(TinyImages):
        def __getitem__(self, i):
            d = super().__getitem__(i)
            return {**d, "pixel_values": d["pixel_values"].double()}
    make, policy, kw = resnet, TWO, {}
    if case == "one_example":
        kw = dict(dataset=TinyImages(n=1))
    elif case == "nine_examples":  # a last batch of one
        kw = dict(dataset=TinyImages(n=9))
    elif case == "float64":
        make, kw = (lambda: resnet().double()), dict(dataset=D64(n=20))
    elif case == "vit_gradient_checkpointing":
        make, policy, kw = tiny_vit, "freeze=backbone;unfreeze=epoch1:2,epoch2:1", dict(gradient_checkpointing=True)
    else:
        kw = dict(feature_cache_max_memory="0", feature_cache_dir=str(tmp_path / "fc"))
    off, w_off = run(tmp_path, "off", make(), policy, **kw)
    on, w_on = run(tmp_path, "auto", make(), policy, **kw)
    assert differing(w_off, w_on) == [] and "ahead" in [s for _, s in sources(on)], sources(on)


# =========================================================================== two DDP processes

def test_two_ddp_processes_deciding_differently_about_the_rows_computed_ahead(tmp_path):
    """Rank 0 serves the whole schedule from memory, rank 1 spills each boundary to disk; then disk mode with both
    ranks writing the same files computed ahead into one folder. Every run equals the plain one on its rank, and the
    ranks hold the same parameters."""
    from pathlib import Path

    from torchrun import torchrun_script

    root = Path(__file__).resolve().parents[1]
    torchrun_script("attack_prefix_ahead_ddp.py", tmp_path, expect=["rank0.pt", "rank1.pt"],
                    env={"PYTHONPATH": str(root)})
    ranks = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    r0, r1 = (torch.load(p) for p in ranks)
    for r in (r0, r1):
        assert r["world_size"] == 2
        assert differing(r["off"]["final"], r["auto"]["final"]) == [], r["auto"]
        assert differing(r["off"]["final"], r["disk"]["final"]) == [], r["disk"]
        # which rank writes a file first decides whether the other computes or reads it: either serves
        assert {s for _, s, _ in r["disk"]["prefix"]} <= {"computed", "ahead", "disk"}, r["disk"]
    assert [s for _, s, _ in r0["auto"]["prefix"]] == ["computed", "ahead", "ahead"], r0["auto"]
    assert {st for _, _, st in r1["auto"]["prefix"]} == {"disk"}, r1["auto"]
    params = [n for n in r0["off"]["final"] if "running_" not in n and "num_batches" not in n]
    assert [n for n in params if not identical(r0["auto"]["final"][n], r1["auto"]["final"][n])] == []


def test_memory_mode_with_max_steps_before_the_boundary_that_cannot_fit(tmp_path):
    """RegNet as in the refusal above, but max_steps=4: only the epoch-1 event (step 3) fires; the stem's boundary,
    too large for 100KB, is never reached. The plain run trains; memory mode should serve and equal it."""
    off, w_off = run(tmp_path, "off", tiny_model("regnet", seed=2), TWO, max_steps=4)
    assert [e["step"] for e in off.freeze_callback.events_log] == [3]
    on, w_on = run(tmp_path, "memory", tiny_model("regnet", seed=2), TWO, max_steps=4, feature_cache_max_memory="100KB")
    assert differing(w_off, w_on) == [] and served(on) > 0


# =========================================================================== a killed process

KILLED = '''
import os, signal, sys
sys.path.insert(0, "tests")
from helpers import TinyImages, tiny_model, training_args
from transformers import TrainerCallback
from hf_freeze import FreezeTrainer

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

args = training_args(__import__("pathlib").Path(sys.argv[1]), num_train_epochs=3, logging_steps=50,
                     feature_cache_max_memory="50KB", feature_cache_dir=sys.argv[2])
FreezeTrainer(model=tiny_model("resnet", seed=2), args=args, train_dataset=TinyImages(n=20),
              freeze_policy="freeze=backbone;unfreeze=epoch1:1,epoch2:1", feature_cache="auto",
              callbacks=[Kill()]).train()
'''


def test_spill_files_computed_ahead_by_a_killed_process_are_cleaned_up_by_the_next_run(tmp_path):
    """auto over the memory limit: at step 3 the stage.0 boundary spills to disk together with the stem's rows
    computed ahead; the process is killed (SIGKILL: the OOM killer) at step 4. The next run with the same cache
    folder (other images) finishes, equals off, and leaves no spill file behind, the killed run's included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "fc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "killed"), str(cache)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert len(leftovers(cache / "spill")) == 2  # the files the killed run left
    # the next run trains on other images (other keys: nothing of the killed run is overwritten by chance)
    off, w_off = run(tmp_path, "off", resnet(), TWO, dataset=TinyImages(n=20, seed=1))
    on, w_on = run(tmp_path, "auto", resnet(), TWO, dataset=TinyImages(n=20, seed=1), feature_cache_max_memory="50KB",
                   feature_cache_dir=str(cache))
    assert differing(w_off, w_on) == [] and {i["storage"] for i in on.prefix_cache_info} == {"disk"}
    assert leftovers(cache / "spill") == []


# =========================================================================== resume with other settings, damaged files

def test_auto_resumed_in_the_head_only_phase_with_a_smaller_memory_limit(tmp_path):
    """The first run serves the whole schedule from memory; resumed at step 1 (head-only phase) in a new process with
    room for one boundary only: the linear-probe cache or the boundaries one at a time; equal to off."""
    kw = dict(save_strategy="steps", save_steps=1)
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    full, _ = run(tmp_path, "auto", resnet(), TWO, name="full", **kw)
    assert [s for _, s in sources(full)] == ["computed", "ahead", "ahead"]
    fc._MEMORY.clear()
    pc._MEMORY.clear()
    resumed, w_resumed = run(tmp_path, "auto", resnet(), TWO, name="full", feature_cache_max_memory="100KB",
                             resume=str(tmp_path / "full" / "out" / "checkpoint-1"), **kw)
    assert differing(w_off, w_resumed) == [], sources(resumed)
    assert "ahead" not in [s for _, s in sources(resumed)]


def test_disk_resume_with_the_file_computed_ahead_damaged(tmp_path):
    """disk mode: the stem's file computed ahead by the first run has a flipped byte; a run resumed at step 4 (new
    process) serves stage.0 from its file, finds the stem's damaged when due and computes it again: equal to off."""
    cache = tmp_path / "fc"
    kw = dict(save_strategy="steps", save_steps=1, feature_cache_dir=str(cache))
    off, w_off = run(tmp_path, "off", resnet(), TWO)
    full, _ = run(tmp_path, "disk", resnet(), TWO, name="full", **kw)
    stem = next(i for i in full.prefix_cache_info if i["boundary"] == "resnet.embedder")
    assert stem["source"] == "ahead"
    path = cache / f"{stem['key']}.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    fc._MEMORY.clear()
    pc._MEMORY.clear()
    resumed, w_resumed = run(tmp_path, "disk", resnet(), TWO, name="full",
                             resume=str(tmp_path / "full" / "out" / "checkpoint-4"), **kw)
    assert differing(w_off, w_resumed) == []
    assert sources(resumed) == [("resnet.encoder.stages.0", "disk"), ("resnet.embedder", "computed")]
