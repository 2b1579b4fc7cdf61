"""What the classic ``requires_grad=False`` recipe does to a "frozen" backbone inside the Trainer, vs hf_freeze.

Real ImageNet MobileNetV2 (shared fixture), a new 10-class head, 30 Fashion-MNIST images per class (seed 0),
the transfer benchmark's settings at that size (``transfer.py``: 64 px, batch 32, AdamW 1e-3 constant, 4 epochs).
Counts the backbone tensors (parameters and buffers: the 312 that policy ``backbone`` fingerprints) that are not
bit-identical after training, validation accuracy on the benchmark's 500 fixed images, and the ImageNet-sample
top-1 of the trained backbone under its original 1001-class head.

    python benchmarks/classic_drift.py     # writes benchmarks/results/classic_drift.json (README's intro figures)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "classic_drift.json"
SHOTS, SEED = 30, 0


def backbone_names(model) -> tuple[list[str], list[str]]:
    import hf_freeze

    groups = [g for g in hf_freeze.layer_groups(model) if g.name != "head"]
    return [n for g in groups for n in g.param_names], [n for g in groups for n in g.buffer_names]


def run(recipe: str, shared: Path, cache: Path) -> dict:
    import torch
    import transformers
    from transfer import (
        EPOCHS,
        IMAGE_SIZE,
        IMAGENET,
        MODEL,
        VAL_PER_CLASS,
        PixelDataset,
        accuracy,
        bit_identical,
        imagenet_retained,
        load_draw,
        state_copy,
        training_args,
    )
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_freeze

    processor = AutoImageProcessor.from_pretrained(shared / MODEL)
    xt, yt, xv, yv = load_draw(shared, SHOTS, SEED, IMAGE_SIZE, VAL_PER_CLASS, cache, processor.image_mean,
                               processor.image_std)
    torch.manual_seed(SEED)
    model = AutoModelForImageClassification.from_pretrained(shared / MODEL, num_labels=10, ignore_mismatched_sizes=True,
                                                            classifier_dropout_prob=0.0)
    before = state_copy(model)
    params, buffers = backbone_names(model)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(Path(tmp), EPOCHS[SHOTS], SEED)
        data = PixelDataset(xt, yt)
        if recipe == "classic":
            getattr(model, model.base_model_prefix).requires_grad_(False)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        else:
            trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=data, freeze_policy="backbone")
        trainer.train()
    after = model.state_dict()
    changed = [n for n in params + buffers if not bit_identical(before[n], after[n])]
    return {"backbone_tensors": len(params) + len(buffers), "backbone_tensors_changed": len(changed),
            "params_changed": sum(n in params for n in changed), "buffers_changed": sum(n in buffers for n in changed),
            "changed_kinds": dict(Counter(n.rsplit(".", 1)[-1] for n in changed)),
            "steps": trainer.state.global_step, "val_accuracy": accuracy(model, xv, yv),
            "imagenet_top1": imagenet_retained(model, shared / MODEL, processor, shared / IMAGENET)}


def main(argv=None) -> int:
    import torch
    from shared_data import shared_dir
    from transfer import baseline_top1, missing_files
    from transformers.utils import logging as hf_logging

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--shared", default=None)
    p.add_argument("--cache", default=str(Path(os.environ.get("HF_FREEZE_CACHE", Path.home() / ".cache" / "hf_freeze"))
                                          / "transfer-benchmark"))
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    shared = shared_dir(a.shared)
    missing = missing_files(shared)
    if missing:
        print(f"classic_drift skipped: shared files not found: {missing}")
        return 0
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    result = {"shots": SHOTS, "seed": SEED, "imagenet_top1_before": baseline_top1(shared)}
    for recipe in ("classic", "hf_freeze"):
        result[recipe] = run(recipe, shared, Path(a.cache))
        print(recipe, result[recipe], flush=True)
    result["steps"] = result["classic"]["steps"]
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
