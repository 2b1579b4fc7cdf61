"""Run under `torchrun --nproc_per_node 2` on a "core install": `datasets` cannot be imported.

The same FreezeTrainer run with the feature cache off and with the default (`auto`): head-only for 2 epochs,
then a group unfreezes; 22 images, batches of 4 per rank. Writes <out>/rank<R>.pt.
"""

import sys

sys.modules["datasets"] = None  # not installed: every import of it fails

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
result = {}
for mode in ("off", None):
    model = tiny_model("resnet", seed=1)
    args = training_args(out / str(mode), num_train_epochs=3, per_device_train_batch_size=4, logging_steps=50)
    trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=TinyImages(n=22, seed=3),
                                      freeze_policy="freeze=backbone;unfreeze=epoch2:1", feature_cache=mode)
    trainer.train()
    result[mode or "auto"] = {"final": snapshot(model), "info": trainer.feature_cache_info,
                              "refusal": trainer.feature_cache_refusal, "prefix": trainer.prefix_cache_info}
torch.save({**result, "world_size": dist.get_world_size(), "datasets": sys.modules["datasets"]},
           out / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
