"""Run under `torchrun --nproc_per_node 2` (gloo, DeepSpeed's CPU accelerator): FreezeTrainer + DeepSpeed ZeRO-2.

First FreezeTrainer is built with an unfreeze schedule (refused: DeepSpeed would ignore the unfreeze); then a
head-only run trains 4 steps with a checkpoint (verification + delta) at step 2, and save_model writes the full
model. Writes <out>/rank<R>.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402
from hf_freeze.delta import DeltaManifest  # noqa: E402

out = Path(sys.argv[1])
ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
      "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
data = TinyImages(n=48, seed=3)


def args(folder, **kw):
    return training_args(folder, max_steps=4, per_device_train_batch_size=4, deepspeed=ds, use_cpu=False, **kw)


try:
    hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), args=args(out / "refused"), train_dataset=data,
                            freeze_policy="freeze=backbone;unfreeze=step2:1")
    refusal = None
except hf_freeze.FreezePolicyError as e:
    refusal = str(e)

model = tiny_model("resnet", seed=1)
base = snapshot(model)
trainer = hf_freeze.FreezeTrainer(model=model, args=args(out, save_strategy="steps", save_steps=2, save_delta=True,
                                                         delta_base_model="tiny-base"),
                                  train_dataset=data, freeze_policy="backbone")
deepspeed_on = trainer.is_deepspeed_enabled
trainer.train()
trainer.args.save_delta = False
trainer.save_model(str(out / "final"))
dist.barrier()
state = hf_freeze.get_state(model)
checkpoint = out / "out" / "checkpoint-2"
torch.save({"refusal": refusal, "deepspeed": deepspeed_on, "final": snapshot(model), "base": base,
            "tracked": sorted(state.fingerprint.digests),
            "delta_version": DeltaManifest.load(checkpoint).version if (checkpoint / "freeze_delta.json").is_file() else None,
            "final_files": sorted(p.name for p in (out / "final").iterdir())}, out / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
