"""Attacks on the README's Trainer lifecycle / multi-process / mixed precision / verified preservation / Scaling out
promises, as a demanding user would make them (one test per attempt).

Multi-process attempts run for real on CPU in two processes (torchrun, gloo), in two launches shared by their
tests: ``scripts/attack_multiproc.py`` (FSDP2 through ``fully_shard`` driven directly, and a FreezeTrainer under
DDP) and ``scripts/attack_deepspeed.py`` (DeepSpeed ZeRO-2 through FreezeTrainer, DeepSpeed's CPU accelerator).
A test marked ``xfail(strict=True, reason="BUG: ...")`` asserts the promised behaviour that does not hold yet.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import StopAt, TinyImages, identical, snapshot, tiny_model, training_args
from torchrun import torchrun_script

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze.delta import BaseModelChanged
from hf_freeze.fingerprint import tensor_digest

V1 = Path(__file__).parent / "data" / "delta_v1"
SCHEDULE = "freeze=backbone;unfreeze=step2:1@0.5,step5:stage.0"


def _sgd_steps(model, steps=2, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = TinyImages(4 * steps)
    for i in range(steps):
        model(pixel_values=data.pixels[4 * i:4 * i + 4], labels=data.labels[4 * i:4 * i + 4]).loss.backward()
        opt.step()
        opt.zero_grad()


# =========================================================================== one process
def test_tied_weight_shared_by_a_trainable_and_a_frozen_group_is_refused_or_kept():
    """ALBERT-style sharing: vit.layers.1's query projection *is* vit.layers.0's. freeze=stage.1 must keep stage.1
    bit-identical (or refuse the policy up front). named_parameters() lists the shared tensor once, under its stage.0
    name, so it would train with stage.0 and never be fingerprinted as part of stage.1: refused, naming both names and
    groups, before anything changes; freezing both groups keeps it through training."""
    model = tiny_model("vit")
    model.vit.layers[1].attention.q_proj.weight = model.vit.layers[0].attention.q_proj.weight
    frozen_before = model.vit.layers[1].attention.q_proj.weight.detach().clone()
    for policy in ("freeze=stage.1", "freeze=*.layers.1.*", "freeze=backbone;unfreeze=step2:stage.1,step4:stage.0"):
        with pytest.raises(FreezePolicyError, match=r"vit\.layers\.0\.attention\.q_proj\.weight \(group stage\.0.*"
                                                    r"vit\.layers\.1\.attention\.q_proj\.weight \(group stage\.1.*"
                                                    r"Freeze \(or unfreeze\) the groups \['stage\.0', 'stage\.1'\]"):
            hf_freeze.apply_policy(model, policy)
        assert hf_freeze.get_state(model) is None and all(p.requires_grad for p in model.parameters())
    hf_freeze.apply_policy(model, "freeze=stage.0:stage.1")
    _sgd_steps(model)
    hf_freeze.verify_frozen(model)
    assert identical(model.vit.layers[1].attention.q_proj.weight.detach(), frozen_before)


class _QuantizedConv(torch.nn.Module):
    """A frozen weight held as a torch per-tensor quantized tensor (int8 codes + scale + zero point)."""

    def __init__(self, conv: torch.nn.Conv2d, scale: float):
        super().__init__()
        codes = torch.clamp(torch.round(conv.weight.detach() / 0.01), -128, 127).to(torch.int8)
        self.weight = torch.nn.Parameter(torch._make_per_tensor_quantized_tensor(codes, scale, 0), requires_grad=False)
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight.dequantize(), None, self.stride, self.padding)


def _quantized_resnet(scale):
    model = tiny_model("resnet", seed=1)
    layer = model.resnet.encoder.stages[1].layers[0].layer[1]
    layer.convolution = _QuantizedConv(layer.convolution, scale)
    return model.eval()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_delta_refuses_a_base_whose_frozen_quantized_weight_has_another_scale(tmp_path):
    """'Quantized / integer parameters are frozen and verified like any other'; a delta 'checks the base bit for
    bit'. Same int8 codes, scale 0.02 instead of 0.01: the weights (and logits) differ, the delta is applied anyway."""
    trained = _quantized_resnet(0.01)
    hf_freeze.apply_policy(trained, "backbone")
    hf_freeze.save_delta(trained, tmp_path, base_model="quantized-base")
    other_base = _quantized_resnet(0.02)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(trained(pixel_values=x).logits, other_base(pixel_values=x).logits)
    with pytest.raises(BaseModelChanged, match="stages.1.layers.0.layer.1.convolution.weight"):
        hf_freeze.apply_delta(other_base, tmp_path)


def test_odd_tensors_fingerprint_by_value_and_every_change_is_seen():
    """bool, complex, float8, uint16, 0-dim, empty, transposed and stride-0 (expanded) tensors: the digest is the
    one of a contiguous copy, and a one-element (or sign-of-zero / NaN-payload) change always changes it."""
    g = torch.Generator().manual_seed(0)
    cases = {
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.randn(3, 2, dtype=torch.complex64, generator=g),
        "float8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "uint16": torch.arange(6).to(torch.uint16),
        "scalar": torch.tensor(3.0),
        "transposed": torch.randn(6, 3, generator=g).t(),
        "expanded": torch.randn(1, 5, generator=g).expand(4, 5),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
    }
    for name, t in cases.items():
        assert tensor_digest(t) == tensor_digest(t.contiguous().clone()), name
        changed = t.contiguous().clone()
        flat = changed.view(-1) if changed.dim() else changed.view(1)
        flat.view(torch.uint8)[0] ^= 1  # flip one bit of the first element
        assert tensor_digest(changed) != tensor_digest(t), name
    assert tensor_digest(torch.empty(0, 4)) != tensor_digest(torch.empty(4, 0))  # shape is in the header
    assert tensor_digest(torch.tensor([0.0])) != tensor_digest(torch.tensor([-0.0]))
    nan_a = torch.tensor([float("nan")])
    nan_b = nan_a.clone()
    nan_b.view(torch.int32)[0] += 1  # another NaN payload: still NaN, other bytes
    assert torch.isnan(nan_b).all() and tensor_digest(nan_a) != tensor_digest(nan_b)


@pytest.mark.parametrize("edit", ["1->2", "2->1", "no version"])
def test_a_delta_manifest_relabelled_to_another_version_is_refused_loudly(tmp_path, edit):
    """The combined fingerprint does not cover the version, so a relabelled manifest passes its corruption check;
    the digests are then read under the other scheme and must fail loudly, never match by accident."""
    from test_fingerprint import deterministic_base

    if edit == "1->2":
        shutil.copytree(V1, tmp_path / "d")
    else:
        model = deterministic_base()
        hf_freeze.apply_policy(model, "backbone")
        hf_freeze.save_delta(model, tmp_path / "d", base_model="deterministic-tiny-resnet")
    path = tmp_path / "d" / "freeze_delta.json"
    manifest = json.loads(path.read_text())
    if edit == "no version":
        del manifest["version"]
    else:
        manifest["version"] = int(edit[-1])
    path.write_text(json.dumps(manifest))
    with pytest.raises(BaseModelChanged, match="does not match the delta's fingerprint"):
        hf_freeze.apply_delta(deterministic_base(), tmp_path / "d")


def test_a_frozen_tensor_moved_to_meta_after_the_policy_is_refused_not_vouched_for():
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    model.resnet.embedder.to("meta")  # e.g. offloaded by accelerate after the policy was applied
    with pytest.raises(FreezePolicyError, match="cannot verify frozen tensors on the meta device"):
        hf_freeze.verify_frozen(model)


def test_resume_with_accumulation_a_fractional_epoch_event_unfreeze_bn_and_delta_equals_uninterrupted(tmp_path):
    """gradient_accumulation_steps=2, an event at epoch 0.75 (between checkpoints, restored on resume), BatchNorm
    statistics of the unfrozen group updating, delta checkpoints: the resumed run equals the uninterrupted one."""
    policy = "freeze=backbone;unfreeze=epoch0.75:1;unfreeze_bn=true"
    kwargs = dict(num_train_epochs=2, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=4, save_delta=True, delta_base_model="tiny-base")
    full = tiny_model("resnet", seed=1)
    FreezeTrainer(model=full, args=training_args(tmp_path / "a", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train()
    FreezeTrainer(model=tiny_model("resnet", seed=1), args=training_args(tmp_path / "b", **kwargs),
                  train_dataset=TinyImages(), freeze_policy=policy, callbacks=[StopAt(4)]).train()
    resumed = tiny_model("resnet", seed=1)
    FreezeTrainer(model=resumed, args=training_args(tmp_path / "b", **kwargs), train_dataset=TinyImages(),
                  freeze_policy=policy).train(resume_from_checkpoint=True)
    a, b = snapshot(full), snapshot(resumed)
    assert [n for n in a if not identical(a[n], b[n])] == []


# =========================================================================== FSDP2 + DDP in two processes
@pytest.fixture(scope="module")
def multiproc(tmp_path_factory):
    """A one-process delta checkpoint (step 3 of a 6-step run interrupted there: stage.1 unfrozen at step 2, stage.0
    due at step 5), then one torchrun launch of scripts/attack_multiproc.py that also resumes it under DDP."""
    out = tmp_path_factory.mktemp("multiproc")
    one = tiny_model("resnet", seed=1)
    FreezeTrainer(model=one, args=training_args(out / "one", max_steps=6, per_device_train_batch_size=4,
                                                save_strategy="steps", save_steps=3, save_delta=True,
                                                delta_base_model="tiny-base"),
                  train_dataset=TinyImages(n=48, seed=3), freeze_policy=SCHEDULE, callbacks=[StopAt(3)]).train()
    checkpoint = out / "one" / "out" / "checkpoint-3"
    torchrun_script("attack_multiproc.py", out, str(checkpoint), SCHEDULE,
                    expect=[f"{p}rank{r}.pt" for p in ("", "ddp_") for r in (0, 1)])
    load = lambda name: [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in (0, 1)]  # noqa: E731
    return {"fsdp": load("rank"), "ddp": load("ddp_rank"), "checkpoint": checkpoint}


UNEVEN = ["resnet.encoder.stages.0.rows3", "resnet.encoder.stages.0.row1", "resnet.encoder.stages.0.rows0"]


@pytest.mark.slow
def test_fsdp2_uneven_one_row_and_empty_shards_keep_the_unsharded_fingerprint(multiproc):
    r0, r1 = multiproc["fsdp"]
    # 3 rows -> 2 + 1, 1 row -> 1 + 0, 0 rows -> 0 + 0: really sharded, unevenly
    assert [r0["local_rows"][n][0] for n in UNEVEN] == [2, 1, 0] and [r1["local_rows"][n][0] for n in UNEVEN] == [1, 0, 0]
    for r in (r0, r1):
        assert set(UNEVEN) <= set(r["odd_tracked"]) and all(r["sharded_digests_equal"].values())
        assert r["verify_after_shard"] is None and r["verify_after_undo"] is None


@pytest.mark.slow
@pytest.mark.parametrize(("tensor", "rank"), [("rows3", 1), ("rows3", 0), ("row1", 0)])
def test_fsdp2_tampering_one_ranks_uneven_shard_raises_the_same_error_on_every_rank(multiproc, tensor, rank):
    r0, r1 = multiproc["fsdp"]
    name = f"resnet.encoder.stages.0.{tensor}"
    for r in (r0, r1):
        assert r[f"tamper_{tensor}_on_{rank}"]["type"] == "FrozenWeightsChanged"
        assert r[f"tamper_{tensor}_on_{rank}"]["changed"] == [name]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_plain_frozen_tensor_beside_sharded_ones_changed_on_one_rank_is_reported_on_all(multiproc, rank):
    """A non-contiguous frozen parameter (FSDP2 refuses to shard it, so its unit stays unsharded) tampered on one
    rank: the verdict is shared through the collective check, every rank raises naming it."""
    r0, r1 = multiproc["fsdp"]
    name = "resnet.encoder.stages.1.transposed"
    assert r0["local_rows"][name] == r1["local_rows"][name] == (3, 6)
    for r in (r0, r1):
        assert r[f"tamper_transposed_on_{rank}"]["changed"] == [name]


@pytest.mark.slow
def test_hsdp_two_dimensional_mesh_verifies_and_catches_a_diverged_replica(multiproc):
    """README: 'no 2-D mesh was run'. A (2 replicas x 1 shard) mesh: clean model verifies, a frozen value changed on
    rank 1's replica only is a change, on every rank."""
    r0, r1 = multiproc["fsdp"]
    target = "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"
    assert r0["hsdp_placements"] == "(Replicate(), Shard(dim=0))"
    for r in (r0, r1):
        assert r["hsdp_verify"] is None
        assert r["hsdp_tamper_on_1"]["type"] == "FrozenWeightsChanged" and r["hsdp_tamper_on_1"]["changed"] == [target]


@pytest.mark.slow
def test_version_1_delta_check_on_a_sharded_model_gives_every_rank_the_same_verdict(multiproc):
    """'Resuming from a delta checks the fingerprint on every rank'; 'every rank raises the same error'. An old
    (version 1) delta applied to an FSDP2 model whose frozen BatchNorm statistic differs on rank 1 only: apply_delta's
    check finds it on rank 1 alone; rank 0 would enter set_model_state_dict's collectives and wait for rank 1."""
    r0, r1 = multiproc["fsdp"]
    changed = ["resnet.embedder.embedder.normalization.running_mean"]
    assert r0["v2_changed"] == r1["v2_changed"] == changed  # the current scheme shares the verdict
    assert r1["v1_changed"] == changed
    assert r0["v1_changed"] == changed  # rank 0 reports nothing today


@pytest.mark.slow
def test_a_one_process_delta_loads_into_a_two_rank_sharded_model(multiproc):
    """Resume on another world size (1 -> 2, FSDP2): the delta written by one process, applied to a model sharded
    over two ranks, gathers back to exactly what the same delta gives unsharded."""
    r0, r1 = multiproc["fsdp"]
    expected = snapshot(hf_freeze.apply_delta(tiny_model("resnet", seed=1), multiproc["checkpoint"]))
    for r in (r0, r1):
        assert r["delta_load"] is None
    got = r0["delta_loaded"]
    assert set(got) == set(expected) and [n for n in got if not identical(got[n], expected[n])] == []


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_two_process_ddp(multiproc):
    """Resume on another world size (1 -> 2, DDP): the unfreeze done before the checkpoint is restored, the one due
    later fires under DDP (its group was registered by the reducer), replicas stay identical, the stem is untouched."""
    r0, r1 = multiproc["ddp"]
    base = snapshot(tiny_model("resnet", seed=1))
    for r in (r0, r1):
        assert r["error"] is None and r["world_size"] == 2 and r["global_step"] == 6
        assert r["unfrozen"] == {"stage.1": ("step 2", 0.5), "stage.0": ("step 5", 1.0)}
        assert r["events"] == [(3, ["stage.1"], True), (5, ["stage.0"], False)]
    assert [n for n in r0["final"] if not identical(r0["final"][n], r1["final"][n])] == []
    assert [n for n in base if n.startswith("resnet.embedder.") and not identical(r0["final"][n], base[n])] == []
    assert any(n.startswith("resnet.encoder.stages.0.") and not identical(r0["final"][n], base[n]) for n in base)


# =========================================================================== DeepSpeed ZeRO-2 in two processes
@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf_freeze[deepspeed]')")
    out = tmp_path_factory.mktemp("deepspeed")
    # It used to hang in about half of the runs: on CPU every process counted as the main one and wrote every
    # checkpoint file, one read config.json while another rewrote it (JSONDecodeError, a ValueError: transformers'
    # save_model then took its ZeRO-3 fallback on that rank only and called save_checkpoint twice), and the other
    # waited forever in DeepSpeed's barrier. FreezeTrainingArguments.should_save now lets rank 0 alone write.
    torchrun_script("attack_deepspeed.py", out, "a", "c", expect=["rank0.pt", "rank1.pt"], timeout=600)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_deepspeed_zero2_keeps_a_frozen_stem_while_later_stages_train(deepspeed_runs):
    for r in deepspeed_runs:
        status, a = r["a"]
        assert status == "ok" and a["deepspeed"]
        assert a["stem_changed"] == [] and a["stage0_moved"]


@pytest.mark.slow
def test_deepspeed_own_optimizer_honours_layer_lr_decay_or_is_refused(deepspeed_runs):
    """freeze=stem;layer_lr_decay=0.5 under ZeRO-2 (no schedule: 'accepted'): the groups must train at 0.05 x 0.5^depth
    (0.0125, 0.025, 0.05), or the combination must be refused up front. With the config's own 'optimizer' section
    DeepSpeed would use 0.05 for all: refused when FreezeTrainer is built, on every rank, model untouched; without the
    section (the alternative the refusal names) the engine trains each group at its own learning rate."""
    for r in deepspeed_runs:
        status, a = r["a"]
        assert status == "ok", a
        assert "own 'optimizer' section" in a["refusal"] and "Remove the 'optimizer' section" in a["refusal"]
        assert a["refused_untouched"]
        assert a["engine"] == a["expected"] == [0.0125, 0.025, 0.05]


@pytest.mark.slow
def test_deepspeed_without_gpus_saves_from_rank_0_only_and_refuses_plain_training_arguments(deepspeed_runs):
    """On CPU accelerate sets up each DeepSpeed process as if it were alone (world_size 1, process_index 0 on both):
    FreezeTrainingArguments.should_save is True on torch.distributed rank 0 only, and plain TrainingArguments (with
    which both processes would write every checkpoint file at once) are refused before the model changes."""
    (s0, a0), (s1, a1) = (r["a"] for r in deepspeed_runs)
    assert s0 == s1 == "ok", (a0, a1)
    assert a0["alone"] and a1["alone"] and a0["args_world"] == a1["args_world"] == 1
    assert (a0["should_save"], a1["should_save"]) == (True, False)
    for a in (a0, a1):
        assert "accelerate found no GPU" in a["plain_refusal"] and "FreezeTrainingArguments" in a["plain_refusal"]
        assert a["plain_untouched"]


@pytest.mark.slow
def test_deepspeed_resume_true_finds_the_zero2_checkpoints(deepspeed_runs):
    """A ZeRO-2 run saved checkpoint-1 and checkpoint-2 (complete: DeepSpeed's global_step2/, latest, weights,
    trainer state); train(resume_from_checkpoint=True) must resume from checkpoint-2, not call both incomplete."""
    for r in deepspeed_runs:
        status, c = r["c"]
        assert status == "ok" and "global_step2" in c["files"] and "latest" in c["files"]
        assert c["resume"] is None, c["resume"]
        assert c["global_step"] == 3


def test_a_deepspeed_checkpoint_is_complete_only_with_every_state_latest_names(tmp_path):
    """The layout a ZeRO-2 run in 2 processes writes (see the test above): trainer state, weights, ``latest`` naming
    ``global_step2/`` with the model states and one optimizer-state file per rank; no optimizer.pt, no scheduler.pt.
    Each missing or truncated piece makes the folder incomplete, named; an older complete one is resumed instead."""
    from safetensors.torch import save_file

    from hf_freeze.checkpoints import checkpoint_problem, last_complete_checkpoint

    def write(step):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / f"global_step{step}").mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        for name in ("mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))):
            torch.save({"step": step}, folder / f"global_step{step}" / name)
        (folder / "latest").write_text(f"global_step{step}")
        return folder

    old, new = write(1), write(2)
    assert checkpoint_problem(new) is None and last_complete_checkpoint(tmp_path) == new
    states = new / "global_step2"
    (states / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(tmp_path / "rank0.pt")
    assert checkpoint_problem(new) == "global_step2/ lacks the ZeRO optimizer states of rank(s) [0]"
    (tmp_path / "rank0.pt").rename(states / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = (states / "mp_rank_00_model_states.pt").read_bytes()
    (states / "mp_rank_00_model_states.pt").write_bytes(data[:len(data) // 2])
    assert checkpoint_problem(new) == "global_step2/mp_rank_00_model_states.pt is truncated or not a torch.save file"
    assert last_complete_checkpoint(tmp_path) == old
    (old / "latest").unlink()  # killed before the engine wrote 'latest'
    assert "without 'latest'" in checkpoint_problem(old)
    (old / "latest").write_text("global_step7")
    assert checkpoint_problem(old) == "latest names 'global_step7', which is not a folder of DeepSpeed states"


def test_deepspeed_bf16_with_a_buffer_dtype_is_refused_before_training(tmp_path):
    """'DeepSpeed ... refused in bf16/fp16 modes unless the model already has that dtype (the engine casts every
    parameter)'. DeepSpeed 0.19 casts *buffers* too when ``data_types.buffer_dtype`` is set (checked by hand with
    deepspeed.initialize on CPU: a bf16 ResNet's frozen running_mean came out float32), and upcasts the buffers
    ``data_types.keep_in_fp32_modules`` names, so the frozen statistics of a model already in bf16 would change dtype:
    refused up front, naming a buffer; the same config without those settings is accepted."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf_freeze[deepspeed]')")
    from accelerate.utils import DistributedType
    from test_distributed import check, state

    def ds(data_types):
        args = training_args(tmp_path, bf16=True, deepspeed={"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                                                             "data_types": data_types})
        return args, state(DistributedType.DEEPSPEED, deepspeed=args.deepspeed_plugin)

    model = tiny_model("resnet").to(torch.bfloat16)
    for data_types in ({"buffer_dtype": "fp32"}, {"keep_in_fp32_modules": ["embedder"]}):
        args, st = ds(data_types)
        with pytest.raises(FreezePolicyError, match=r"cast \d+ buffer\(s\).*resnet\.embedder\.embedder\.normalization"
                                                    r"\.running_mean.*Remove data_types\.buffer_dtype"):
            check(args, "backbone", model, st)
    for data_types in ({"buffer_dtype": "bf16"}, {"keep_in_fp32_modules": []}, {}):  # nothing to cast
        args, st = ds(data_types)
        check(args, "backbone", model, st)
    assert all(b.dtype in (torch.bfloat16, torch.int64) for b in model.buffers())  # the checks changed nothing


def test_deepspeed_own_optimizer_or_scheduler_with_per_group_lrs_is_refused_before_training(tmp_path):
    """DeepSpeed builds the optimizer of an 'optimizer' section at one LR, and its schedulers give every group the same
    LR: with layer_lr_decay both are refused up front, naming the alternative; without per-group LRs, accepted."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf_freeze[deepspeed]')")
    from accelerate.utils import DistributedType
    from test_distributed import check, state

    own = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}}
    for sections in (["optimizer"], ["scheduler"], ["optimizer", "scheduler"], []):
        args = training_args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, **{k: own[k] for k in sections}})
        st = state(DistributedType.DEEPSPEED, deepspeed=args.deepspeed_plugin)
        check(args, "freeze=stem", tiny_model("resnet"), st)  # one learning rate: DeepSpeed's own sections are fine
        if not sections:
            check(args, "freeze=stem;layer_lr_decay=0.5", tiny_model("resnet"), st)
            continue
        with pytest.raises(FreezePolicyError, match=r"own '(optimizer|scheduler)'.*silently dropped\. Remove the"):
            check(args, "freeze=stem;layer_lr_decay=0.5", tiny_model("resnet"), st)
