"""Run under `torchrun --nproc_per_node 2`: FreezeTrainer training a LoRA adapter, different data per rank.

Writes <out>/rank<R>.pt (adapter tensors, pretrained tensors before/after) and saves the adapter to <out>/adapter.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402
from hf_freeze.names import named_base_tensors, named_peft_parameters  # noqa: E402

out = Path(sys.argv[1])
policy = "freeze=backbone;adapter=lora,r=4,alpha=8,groups=2"
model = tiny_model("resnet", seed=1)
pretrained = snapshot(model)
args = training_args(out, max_steps=4, per_device_train_batch_size=4, learning_rate=0.01)
trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=32, seed=3), freeze_policy=policy)
start = {n: p.detach().clone() for n, _, _, p in named_peft_parameters(trainer.model)}
trainer.train()
trainer.save_model(str(out / "adapter"))
rank = dist.get_rank()
torch.save({"adapter": {n: p.detach().clone() for n, _, _, p in named_peft_parameters(trainer.model)},
            "adapter_start": start, "base": {n: t.detach().clone() for n, t in named_base_tensors(trainer.model).items()},
            "pretrained": pretrained, "world_size": dist.get_world_size(),
            "first_batch": next(iter(trainer.get_train_dataloader()))["pixel_values"].sum().item()}, out / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
