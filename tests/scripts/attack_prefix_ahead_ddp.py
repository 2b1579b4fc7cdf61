"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): the frozen-prefix cache computed ahead under DDP, with the
ranks deciding differently: rank 0 has room for the whole schedule in memory (auto serves it from step 0), rank 1's
memory limit (50KB) sends every prefix boundary to a memory-mapped spill file; then disk mode, both ranks writing the
files computed ahead into one shared folder. Head only for epoch 0, stage.1 from epoch 1, stage.0 from epoch 2.
Writes <out>/rank<R>.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
rank = int(__import__("os").environ["RANK"])
result = {}
for mode in ("off", "auto", "disk"):
    extra = {"feature_cache_dir": str(out / "fc")}
    if mode == "auto" and rank == 1:
        extra["feature_cache_max_memory"] = "50KB"
    args = training_args(out / mode, num_train_epochs=3, per_device_train_batch_size=4, logging_steps=50, **extra)
    trainer = hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), args=args,
                                      train_dataset=TinyImages(n=22, seed=3),
                                      freeze_policy="freeze=backbone;unfreeze=epoch1:1,epoch2:1", feature_cache=mode)
    trainer.train()
    result[mode] = {"final": snapshot(trainer.model), "prefix": [(i["boundary"], i["source"], i["storage"])
                                                                  for i in trainer.prefix_cache_info],
                    "refusal": trainer.feature_cache_refusal}
torch.save({**result, "world_size": dist.get_world_size()}, out / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
