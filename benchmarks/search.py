"""Freeze-policy search on the real MobileNetV2 few-shot task (Fashion-MNIST), and a check of every trial.

``search_freeze_policies`` over the distinct policies of a ``FreezeSearchSpace`` (freeze depth x schedule x LR
scale), the same task as ``benchmarks/feature_cache.py``. A callback records, for every trial, the policy the
trial sampled and the policy applied to the model that trained; each trial's score is then re-measured by
training its policy alone (outside the search) and must be the same.

Usage: python benchmarks/search.py [--shots 10] [--val 300] [--size 128] [--epochs 3] [--trials 6] [--json out.json]
Skips cleanly when the shared fixtures are absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from feature_cache import datasets_for, model_init_for, targs  # same task, same training arguments
from shared_data import shared_dir
from transformers import AutoImageProcessor, TrainerCallback

import hf_freeze
from hf_freeze.metrics import classification_metrics as accuracy


class Applied(TrainerCallback):
    def __init__(self):
        self.trainer, self.seen = None, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trial = self.trainer._trial
        self.seen[trial.number] = {"sampled": trial.params["policy"],
                                   "applied": hf_freeze.get_state(model).policy.to_string()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--recheck", type=int, default=2, help="trials (best and worst first) re-trained alone")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    root = shared_dir(a.shared)
    path = root / "models" / "mobilenet_v2_1.0_224-imagenet"
    if not path.is_dir() or not (root / "data" / "fashion-mnist").is_dir():
        print(f"skipped: shared fixtures not found under {root}")
        return 0
    processor = AutoImageProcessor.from_pretrained(path)
    train, val = datasets_for(root / "data" / "fashion-mnist", a.shots, a.val, 0, processor, a.size)
    tmp = Path(tempfile.mkdtemp())
    recorder = Applied()
    trainer = hf_freeze.FreezeTrainer(model_init=model_init_for(path), args=targs(tmp / "search", a.epochs,
                                      eval_strategy="epoch"), train_dataset=train, eval_dataset=val,
                                      compute_metrics=accuracy, callbacks=[recorder])
    recorder.trainer = trainer
    space = hf_freeze.FreezeSearchSpace(freeze=["backbone", "half"], schedule=["none", "late", "gradual"], lr_scale=[0.1])
    t = time.perf_counter()
    result = hf_freeze.search_freeze_policies(trainer, n_trials=a.trials, space=space)
    seconds = time.perf_counter() - t
    print(f"search: {len(result.rows)} policies in {seconds:.0f} s, {a.epochs:g} epochs each")
    print(result.to_markdown())
    mismatched = [t for t, r in recorder.seen.items() if r["sampled"] != r["applied"]]
    print(f"trials whose applied policy differs from the sampled one: {len(mismatched)} of {len(recorder.seen)}")
    rechecks = []
    for row in (result.rows[:1] + result.rows[-1:] + result.rows[1:-1])[:a.recheck]:
        alone = hf_freeze.FreezeTrainer(model_init=model_init_for(path), args=targs(tmp / f"alone{row['trial']}",
                                        a.epochs, eval_strategy="epoch"), train_dataset=train, eval_dataset=val,
                                        compute_metrics=accuracy, freeze_policy=row["policy"])
        alone.train()
        again = alone.evaluate()
        rechecks.append({"policy": row["policy"], "in_search": row["eval_accuracy"], "alone": again["eval_accuracy"],
                         "same_loss": again["eval_loss"] == row["eval_loss"]})
        print(f"re-trained alone: {row['policy']}: accuracy {again['eval_accuracy']:.4f} (search: "
              f"{row['eval_accuracy']:.4f}), eval loss identical: {again['eval_loss'] == row['eval_loss']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "seconds": seconds, "rows": result.rows,
                                            "trials": recorder.seen, "rechecks": rechecks}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
