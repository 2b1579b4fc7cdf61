"""Run under torchrun --nproc_per_node 2 (gloo, CPU): attacks of tests/test_attack_scaling.py in one launch.

FSDP2 (``fully_shard`` driven directly): odd frozen tensors in one unit (3 rows on 2 ranks, 1 row, 0 rows) beside a
non-contiguous frozen tensor FSDP2 cannot shard (left plain), tampering on one rank, an HSDP 2-D mesh with a replica
changed, a version-1 (scheme 1) delta manifest checked on a sharded model whose base differs on one rank, a delta
written by a one-process run loaded into a two-rank sharded model. DDP: the same one-process delta checkpoint
resumed by FreezeTrainer in two processes (a different world size), one unfreeze already done, one to come.

Usage: attack_multiproc.py OUT CHECKPOINT POLICY. Writes OUT/rank<R>.pt (FSDP) and OUT/ddp_rank<R>.pt (DDP).
"""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402
from hf_freeze.fingerprint import Fingerprint, is_sharded  # noqa: E402

ODD = {"rows3": (3, 5), "row1": (1, 7), "rows0": (0, 4)}


def odd_model():
    model = tiny_model("resnet", seed=1)
    stage = model.resnet.encoder.stages[0]
    g = torch.Generator().manual_seed(5)
    for name, shape in ODD.items():
        stage.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g)))
    # non-contiguous: FSDP2 cannot shard it, so it lives in a unit left unsharded (stage 1 stays plain tensors)
    model.resnet.encoder.stages[1].register_parameter("transposed", torch.nn.Parameter(torch.randn(6, 3, generator=g).t()))
    return model


def attempt(fn):
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return {"type": type(e).__name__, "changed": sorted(getattr(e, "changed", []) or []), "message": str(e)[:600]}


def local_of(model, name):
    t = dict(model.named_parameters())[name]
    return t.to_local() if is_sharded(t) else t


def tamper(model, name, rank_to_tamper):
    """Add 1 to the first element of ``name``'s local shard on one rank; return a function that puts it back."""
    local = local_of(model, name)
    index = (0,) * local.dim()
    hit = dist.get_rank() == rank_to_tamper and local.numel() > 0
    if hit:
        saved = local[index].clone()
        with torch.no_grad():
            local[index] += 1.0

    def undo():
        if hit:
            with torch.no_grad():
                local[index] = saved
    return undo


def main():
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    out = Path(sys.argv[1])
    rec = {}
    prefix = "resnet.encoder.stages.0."

    # ---- 1. odd tensors in one FSDP2 unit
    model = odd_model()
    hf_freeze.apply_policy(model, "backbone")
    state = hf_freeze.get_state(model)
    names = [prefix + n for n in ODD] + ["resnet.encoder.stages.1.transposed"]
    rec["odd_tracked"] = [n for n in names if n in state.fingerprint.digests]
    unsharded = dict(state.fingerprint.digests)
    fully_shard(model.resnet.encoder.stages[0])  # only this unit: the rest of the model stays plain, replicated
    rec["local_rows"] = {n: tuple(local_of(model, n).shape) for n in names}
    rec["sharded_digests_equal"] = {n: Fingerprint.take(model, [n]).digests[n] == unsharded[n] for n in names}
    rec["verify_after_shard"] = attempt(lambda: hf_freeze.verify_frozen(model, "after sharding"))
    for name, who in (("rows3", 1), ("rows3", 0), ("row1", 0), ("transposed", 1), ("transposed", 0)):
        undo = tamper(model, (prefix + name) if name != "transposed" else "resnet.encoder.stages.1.transposed", who)
        rec[f"tamper_{name}_on_{who}"] = attempt(lambda: hf_freeze.verify_frozen(model, "after tampering"))
        undo()
    rec["verify_after_undo"] = attempt(lambda: hf_freeze.verify_frozen(model, "after undo"))

    # ---- 2. HSDP: a 2-D mesh (2 replicas x 1 shard), a frozen value changed on rank 1's replica
    from torch.distributed.device_mesh import init_device_mesh

    hsdp = tiny_model("resnet", seed=1)
    hf_freeze.apply_policy(hsdp, "backbone")
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(hsdp, mesh=mesh)
    target = "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"
    rec["hsdp_placements"] = str(dict(hsdp.named_parameters())[target].placements)
    rec["hsdp_verify"] = attempt(lambda: hf_freeze.verify_frozen(hsdp, "hsdp"))
    undo = tamper(hsdp, target, 1)
    rec["hsdp_tamper_on_1"] = attempt(lambda: hf_freeze.verify_frozen(hsdp, "hsdp tampered"))
    undo()

    # ---- 3. an old delta (manifest version 1, scheme-1 digests) checked on a sharded model whose base differs on
    # rank 1 only (a frozen BatchNorm statistic): what apply_delta checks first, on every rank
    from test_fingerprint import V1, deterministic_base

    from hf_freeze.delta import DeltaManifest

    base = deterministic_base()
    fully_shard(base)
    manifest = DeltaManifest.load(V1)
    buf = "resnet.embedder.embedder.normalization.running_mean"
    if rank == 1:
        with torch.no_grad():
            dict(base.named_buffers())[buf][0] += 1.0
    rec["v1_changed"] = manifest.frozen_fingerprint().changed(base)
    # the same with the current scheme (version-2 digests of the same base): the verdict is shared
    v2 = Fingerprint.take(deterministic_base(), sorted(manifest.frozen_digests))
    rec["v2_changed"] = v2.changed(base)

    # ---- 4. a delta checkpoint written by one process, loaded into a model sharded over two ranks
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    checkpoint, policy = sys.argv[2], sys.argv[3]
    fresh = tiny_model("resnet", seed=1)
    for stage in fresh.resnet.encoder.stages:
        fully_shard(stage)
    fully_shard(fresh)
    rec["delta_load"] = attempt(lambda: hf_freeze.apply_delta(fresh, checkpoint))
    full = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True))
    rec["delta_loaded"] = {n: t.detach().clone() for n, t in full.items()}
    dist.barrier()
    torch.save(rec, out / f"rank{rank}.pt")

    # ---- 5. the same checkpoint resumed by FreezeTrainer under DDP (the run that wrote it had one process)
    ddp = {}
    model = tiny_model("resnet", seed=1)
    args = training_args(out / "ddp", max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                         save_delta=True, delta_base_model="tiny-base")
    trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=48, seed=3),
                                      freeze_policy=policy)
    ddp["error"] = attempt(lambda: trainer.train(resume_from_checkpoint=checkpoint))
    st = hf_freeze.get_state(model)
    ddp.update(world_size=dist.get_world_size(), final=snapshot(model), unfrozen=dict(st.unfrozen),
               events=[(e["step"], e["groups"], e["resumed"]) for e in trainer.freeze_callback.events_log],
               global_step=trainer.state.global_step)
    torch.save(ddp, out / f"ddp_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
