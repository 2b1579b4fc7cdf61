"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): a freeze policy on an FSDP2-sharded model.

The model is sharded the way accelerate's FSDP2 preparation does it (its auto-wrap policy picks the units from
``_no_split_modules``: ViT layers / ResNet conv layers, then the root), after ``apply_policy`` fingerprinted it
unsharded. Training is driven by hf_freeze: optimizer groups from ``freeze_param_groups``, the schedule fired by
``FreezeCallback`` (a mid-run unfreeze). Then: verification, a full state dict gathered through torch's state-dict
API, ``save_delta`` on rank 0 from that gathered dict, a resume (fresh sharded model, events re-fired, delta
loaded), and a frozen value corrupted on one rank's shard.

Also: a 160 KiB linear layer (several fingerprint leaves, a shard boundary inside one) fingerprinted whole and
sharded. Usage: fsdp_train.py OUT MODEL_TYPE... Writes OUT/<MODEL_TYPE>/rank<R>.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402
from hf_freeze.fingerprint import Fingerprint, is_sharded, tensor_digest  # noqa: E402
from hf_freeze.model_card import preservation_text  # noqa: E402
from hf_freeze.param_groups import freeze_param_groups  # noqa: E402

POLICY = {"resnet": "freeze=backbone;unfreeze=step3:stage.1@0.5;layer_lr_decay=0.5",
          "vit": "freeze=backbone;unfreeze=step3:stage.1+neck@0.5;layer_lr_decay=0.5"}
STEPS = 6


def shard(model):
    """accelerate's FSDP2 wrapping: its auto-wrap policy's units bottom-up, then the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in get_module_children_bottom_up(model)[:-1] if wrap(m)]
    for m in units:
        fully_shard(m)
    fully_shard(model)
    return len(units)


def gathered(model):
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {n: t.detach().clone() for n, t in get_model_state_dict(model, options=opts).items()}


def build(model_type, on_meta=False):
    if on_meta:  # what accelerate's cpu_ram_efficient_loading gives ranks > 0: no weights until rank 0's arrive
        with torch.device("meta"):
            return tiny_model(model_type, seed=1)
    return tiny_model(model_type, seed=1)


def trainer_state(step):
    return TrainerState(global_step=step, epoch=step / 100, max_steps=STEPS)


def main():
    dist.init_process_group("gloo")
    for model_type in sys.argv[2:]:
        out = Path(sys.argv[1]) / model_type
        out.mkdir(parents=True, exist_ok=True)
        run(out, model_type)
    dist.barrier()
    dist.destroy_process_group()


def big_linear_digests():
    """Digests of a 41 x 1000 fp32 weight (160 KiB: 10 leaves; rank 0 holds 21 rows, so a leaf straddles ranks),
    whole, FSDP2-sharded, and as DTensors placed Shard(1) (the full_tensor() fallback) and Replicate()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(3)
    layer = torch.nn.Linear(1000, 41)
    whole = Fingerprint.take(layer, ["weight", "bias"]).digests
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    other = {f"weight@{p}": tensor_digest(distribute_tensor(layer.weight.detach(), mesh, [p]))
             for p in (Shard(1), Replicate())}
    fully_shard(layer)
    return whole, {**Fingerprint.take(layer, ["weight", "bias"]).digests, **other}


def run(out, model_type):
    rank = dist.get_rank()
    policy = POLICY[model_type]
    record = {"world_size": dist.get_world_size(), "model_type": model_type, "big_linear": big_linear_digests()}

    model = build(model_type)
    base = snapshot(model)
    hf_freeze.apply_policy(model, policy)
    state = hf_freeze.get_state(model)
    record["fingerprint_unsharded"] = dict(state.fingerprint.digests)
    record["units"] = shard(model)
    record["sharded_params"] = sorted(n for n, p in model.named_parameters() if is_sharded(p))
    record["fingerprint_sharded"] = Fingerprint.take(model, sorted(state.fingerprint.digests)).digests
    hf_freeze.verify_frozen(model, "right after sharding")
    # a FreezeTrainer around the sharded model, for its save/load methods (its Accelerator is DDP on CPU: unused)
    trainer = hf_freeze.FreezeTrainer(model=model, freeze_policy=policy, args=training_args(
        out / "trainer", save_delta=True, delta_base_model="tiny-base"))

    # per-group learning rates (layer decay x lr_scale) on the sharded parameters
    groups = freeze_param_groups(model, state, 0.05, 0.01)
    record["lr"] = {g["name"]: g["lr"] for g in groups}
    optimizer = torch.optim.AdamW(groups, lr=0.05)
    callback = hf_freeze.FreezeCallback(policy, _param_groups=True)
    control = TrainerControl()
    callback.on_train_begin(None, trainer_state(0), control, model=model)
    data = TinyImages(n=4 * STEPS, seed=10 + rank)  # different data on each rank
    for step in range(STEPS):
        callback.on_step_begin(None, trainer_state(step), control, model=model)
        batch = {"pixel_values": data.pixels[4 * step:4 * step + 4], "labels": data.labels[4 * step:4 * step + 4]}
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    record["events_log"] = callback.events_log
    record["unfrozen"] = dict(state.unfrozen)
    record["frozen"] = sorted(state.frozen)
    record["tracked"] = sorted(state.fingerprint.digests)
    hf_freeze.verify_frozen(model, "after training")
    final = gathered(model)
    record["final"], record["base"] = final, base

    # save as Trainer.save_model does under FSDP: accelerate's options (the full state dict on rank 0 only), then
    # FreezeTrainer._save on every rank (it writes on rank 0, a delta verified on the gathered tensors), then a full
    # checkpoint; the model card's preservation line is the last check made on all ranks (rank 0 alone, no hang)
    to_rank0 = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                    cpu_offload=True))
    trainer._save(str(out / "delta"), state_dict=to_rank0)
    trainer.args.save_delta = False
    trainer._save(str(out / "full"), state_dict=to_rank0)
    if rank == 0:
        record["card"] = preservation_text(model)[1]
    dist.barrier()

    # resume: a fresh model, policy applied unsharded, sharded, events re-fired at step STEPS, delta loaded
    fresh = build(model_type)
    hf_freeze.apply_policy(fresh, policy)
    shard(fresh)
    resumed_cb = hf_freeze.FreezeCallback(policy, _param_groups=True)
    resumed_cb.on_train_begin(None, trainer_state(STEPS), control, model=fresh)
    trainer._load_from_checkpoint(str(out / "delta"), fresh)  # a delta checkpoint: apply_delta on every rank
    record["resumed"] = gathered(fresh)
    record["resumed_unfrozen"] = dict(hf_freeze.get_state(fresh).unfrozen)

    # rank 1 starts on the meta device (cpu_ram_efficient_loading); rank 0's weights arrive after sharding
    late = build(model_type, on_meta=rank > 0)
    hf_freeze.apply_policy(late, policy)
    shard(late)
    if rank > 0:
        late.to_empty(device="cpu")
    full = {n: t.clone() for n, t in base.items()} if rank == 0 else {}
    set_model_state_dict(late, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    hf_freeze.verify_frozen(late, "after loading rank 0's weights")
    record["late_loaded"] = gathered(late)

    # corruption on rank 1 only: one element of a frozen parameter's local shard (+ a frozen buffer if any)
    frozen_sharded = [n for n, p in model.named_parameters() if n in state.fingerprint.digests and is_sharded(p)
                      and p.to_local().numel() and n.endswith("weight")]
    target = max(frozen_sharded, key=lambda n: dict(model.named_parameters())[n].numel())
    buffers = [n for n, b in model.named_buffers() if n in state.fingerprint.digests and b.is_floating_point()]
    corrupt = [target] + buffers[:1]
    record["corrupted"] = corrupt
    if rank == 1:
        with torch.no_grad():
            dict(model.named_parameters())[target].to_local().view(-1)[0] += 1.0
            if buffers:
                dict(model.named_buffers())[buffers[0]].view(-1)[0] += 1.0
    try:
        hf_freeze.verify_frozen(model, "after corruption")
        record["raised"] = None
    except hf_freeze.FrozenWeightsChanged as e:
        record["raised"] = {"changed": e.changed, "message": str(e)}

    torch.save(record, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
