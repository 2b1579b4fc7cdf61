"""Run under `torchrun --nproc_per_node 2`: FreezeTrainer with a mid-run unfreeze, different data per rank.

Writes <out>/rank<R>.pt with the final tensors, the pretrained tensors and the freeze state summary.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
policy = sys.argv[2] if len(sys.argv) > 2 else "freeze=backbone;unfreeze=step2:1@0.5,step4:stage.0"
model = tiny_model("resnet", seed=1)
pretrained = snapshot(model)
args = training_args(out, max_steps=6, per_device_train_batch_size=4, logging_steps=1, bf16="--bf16" in sys.argv)
trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=48, seed=3), freeze_policy=policy)
trainer.train()
rank = dist.get_rank()
state = hf_freeze.get_state(model)
torch.save({"final": snapshot(model), "pretrained": pretrained, "world_size": dist.get_world_size(),
            "unfrozen": dict(state.unfrozen), "frozen": sorted(state.frozen),
            # the Trainer's own loader (the caches' loaders hand out example indices): which examples this rank reads
            "first_batch": next(iter(transformers.Trainer.get_train_dataloader(trainer)))["pixel_values"].sum().item()},
           out / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
