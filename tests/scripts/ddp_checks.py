"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): DDP traps refused by FreezeTrainer, and one that works.

1. FreezeTrainer is built with each configuration that fails mid-run under DDP with an unfreeze schedule; the
   FreezePolicyError message (or None when accepted) is recorded per configuration.
2. A tiny ViT trains with gradient checkpointing, ddp_find_unused_parameters=True and two mid-run unfreezes.
Writes <out>/rank<R>.pt.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
policy = "freeze=backbone;unfreeze=step2:1,step4:1"
data = TinyImages(n=48, seed=3)
cases = {
    "checkpointing": dict(gradient_checkpointing=True),
    "static_graph": dict(ddp_static_graph=True),
    "find_unused_false": dict(ddp_find_unused_parameters=False),
    "checkpointing_find_unused": dict(gradient_checkpointing=True, ddp_find_unused_parameters=True),
    "fsdp_env_on_cpu": {},  # accelerate runs DDP on CPU whatever ACCELERATE_USE_FSDP says
}
refusals = {}
for name, overrides in cases.items():
    if name == "fsdp_env_on_cpu":
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1", FSDP_USE_ORIG_PARAMS="false")
    try:
        hf_freeze.FreezeTrainer(model=tiny_model("vit", seed=1), args=training_args(out / name, **overrides),
                                train_dataset=data, freeze_policy=policy)
        refusals[name] = None
    except hf_freeze.FreezePolicyError as e:
        refusals[name] = str(e)

model = tiny_model("vit", seed=1)
base = snapshot(model)
args = training_args(out, max_steps=6, per_device_train_batch_size=4, gradient_checkpointing=True,
                     ddp_find_unused_parameters=True)
trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=data, freeze_policy=policy)
trainer.train()
state = hf_freeze.get_state(model)
torch.save({"refusals": refusals, "final": snapshot(model), "base": base, "unfrozen": dict(state.unfrozen),
            "frozen": sorted(state.fingerprint.digests), "checkpointing": model.is_activation_checkpointing},
           out / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
