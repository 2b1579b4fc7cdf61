"""``python -m hf_freeze.demo`` (``make demo``): the main job, offline, on an embedded default.

1. Pretrain (once, cached) a small ResNet on real handwritten digits 0-4 (scikit-learn's copy of the
   UCI digits; no download).
2. Fine-tune it on a few-shot task — digits 5-9, 10 images per class — with a freeze policy: backbone
   frozen (BatchNorm in inference mode), new head, then gradual unfreezing at smaller learning rates.
3. Verify the still-frozen tensors bit for bit, evaluate, and write the model, its policy, its model card
   with the training plot, the freeze report, the unfreeze events and the metrics to ``./outputs/demo``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_freeze
from hf_freeze.demo import DEFAULT_POLICY
from hf_freeze.demo.data import transfer_task
from hf_freeze.demo.pretrain import logger as pretrain_logger
from hf_freeze.demo.pretrain import pretrained_base, torch_threads
from hf_freeze.metrics import classification_metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="outputs/demo")
    ap.add_argument("--policy", default=DEFAULT_POLICY, help="freeze policy string (see README)")
    ap.add_argument("--shots", type=int, default=10, help="training images per class")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--learning_rate", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.output_dir)

    print("== 1. pretrained base: ResNet on real digits 0-4 (cached after the first run)")
    pretrain_logger.setLevel(logging.INFO)  # the demo shows the pretraining's progress whatever transformers' level
    base = pretrained_base(seed=a.seed)
    print(f"   {base}  ({json.loads((base / 'pretraining.json').read_text())})")

    print(f"== 2. few-shot transfer task: digits 5-9, {a.shots} images per class")
    task = transfer_task(shots_per_class=a.shots, seed=a.seed)
    processor = AutoImageProcessor.from_pretrained(base)
    names = task["train"].features["label"].names

    def to_inputs(batch):
        return {"pixel_values": processor(batch["image"], return_tensors="pt")["pixel_values"], "labels": batch["label"]}

    train, val = (task[s].with_transform(to_inputs) for s in ("train", "validation"))
    model = AutoModelForImageClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True)

    args = hf_freeze.FreezeTrainingArguments(
        output_dir=str(out / "model"), num_train_epochs=a.epochs, per_device_train_batch_size=16, learning_rate=a.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.01, eval_strategy="epoch", save_strategy="no",
        logging_strategy="epoch", report_to=[], remove_unused_columns=False, use_cpu=True, seed=a.seed,
        dataloader_num_workers=0)

    trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                      compute_metrics=classification_metrics, freeze_policy=a.policy)
    print("== 3. freeze report at the start")
    print(hf_freeze.freeze_report(model))
    with torch_threads(1):  # small model: one thread is fastest and reproducible on shared cores
        trainer.train()
        metrics = trainer.evaluate()

    print("== 4. result")
    for e in trainer.freeze_callback.events_log:
        print(f"   unfroze {', '.join(e['groups'])} at {e['when']} (step {e['step']}, lr x{e['lr_scale']:g}): "
              f"{e['trainable_params']:,} trainable parameters")
    hf_freeze.verify_frozen(model, "after the demo run")
    report = hf_freeze.freeze_report(model)
    print(report)
    print(f"   still-frozen tensors bit-identical: yes ({report.fingerprinted} checked)")
    print(f"   validation accuracy: {metrics['eval_accuracy']:.3f} on {len(val)} images")
    trainer.save_model()
    processor.save_pretrained(out / "model")
    trainer.create_model_card(finetuned_from=str(base), dataset_name="scikit-learn digits 5-9 (few-shot)",
                              model_name="hf-freeze-demo")
    (out / "freeze_report.txt").write_text(str(report) + "\n")
    (out / "freeze_events.json").write_text(json.dumps(trainer.freeze_callback.events_log, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"   wrote {out / 'model'} (weights, config.json with the policy, freeze_policy.json, README.md model card, "
          f"training_curves.png), {out / 'freeze_report.txt'}, {out / 'freeze_events.json'}, {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
