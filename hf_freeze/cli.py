"""``hf-freeze``: command-line entry point.

    hf-freeze inspect MODEL [--freeze VALUE | --policy STRING] [--json]
    hf-freeze search (--model MODEL --train_dir DIR --validation_dir DIR | --demo) [--n_trials 8] [--epochs 3]

MODEL is a Hub id, a local folder, or ``tiny:<model_type>`` (a tiny random config of any type in
transformers' image-classification mapping). Only the config is read; the model is built on the
meta device, so inspecting a large model costs no memory and downloads no weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FreezePolicyError, UnsupportedModelError


def _inspect(args) -> int:
    from .apply import apply_policy
    from .groups import layer_groups
    from .loading import build_classifier
    from .policy import FreezePolicy

    try:
        policy = FreezePolicy.from_string(args.policy) if args.policy else FreezePolicy(freeze=args.freeze)
        model = build_classifier(args.model)
        groups = layer_groups(model)
        if policy.adapter is None:
            report = apply_policy(model, policy)
        else:  # preview which layers get adapters (on the meta device: nothing is allocated)
            from .adapters import add_adapter
            from .report import freeze_report

            report = freeze_report(add_adapter(model, policy))
    except (FreezePolicyError, UnsupportedModelError, KeyError, OSError) as e:
        print(f"hf-freeze: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"groups": [{"name": g.name, "num_params": g.num_params, "param_names": list(g.param_names)}
                                     for g in groups], "report": report.to_dict()}, indent=2))
        return 0
    print(f"{args.model}: {type(model).__name__}, {len(groups)} groups (from {groups.source})")
    for g in groups:
        first, last = g.param_names[0], g.param_names[-1]
        print(f"  {g.name:<10} {g.num_params:>12,}  {first}{' ... ' + last if last != first else ''}")
    print()
    print(report)
    return 0


def _image_datasets(args, processor):
    """(train, validation) from imagefolder directories or the embedded digits task; no augmentation."""
    import datasets

    if args.demo:
        from .demo.data import transfer_task

        task = transfer_task(shots_per_class=args.shots, seed=args.seed, validation_per_class=args.validation_per_class)
        train, val = task["train"], task["validation"]
    else:
        train = datasets.load_dataset("imagefolder", data_dir=args.train_dir, split="train")
        val = datasets.load_dataset("imagefolder", data_dir=args.validation_dir, split="train")

    def to_inputs(batch):
        images = [im.convert("RGB") for im in batch["image"]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}

    return train.with_transform(to_inputs), val.with_transform(to_inputs), train.features["label"].names


def _search(args) -> int:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .args import FreezeTrainingArguments
    from .metrics import classification_metrics
    from .search import FreezeSearchSpace, search_freeze_policies
    from .trainer import FreezeTrainer

    if not args.demo and not (args.model and args.train_dir and args.validation_dir):
        print("hf-freeze: error: give --model, --train_dir and --validation_dir, or --demo", file=sys.stderr)
        return 2
    model_path = args.model
    if args.demo and not model_path:
        from .demo.pretrain import pretrained_base

        model_path = str(pretrained_base(seed=args.seed))
    processor = AutoImageProcessor.from_pretrained(model_path)
    train, val, names = _image_datasets(args, processor)

    def model_init():
        return AutoModelForImageClassification.from_pretrained(
            model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)

    training_args = FreezeTrainingArguments(
        output_dir=str(Path(args.output_dir) / "trials"), num_train_epochs=args.epochs, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
        report_to=[], remove_unused_columns=False, seed=args.seed, disable_tqdm=True)
    trainer = FreezeTrainer(model_init=model_init, args=training_args, train_dataset=train, eval_dataset=val,
                            compute_metrics=classification_metrics)
    space = FreezeSearchSpace(freeze=args.freeze_choices.split(","), schedule=args.schedules.split(","),
                              lr_scale=[float(x) for x in args.lr_scales.split(",")],
                              train_bn=[x.lower() == "true" for x in args.train_bn_choices.split(",")])
    try:
        result = search_freeze_policies(trainer, n_trials=args.n_trials, space=space, seed=args.seed)
    except (FreezePolicyError, ValueError) as e:
        print(f"hf-freeze: error: {e}", file=sys.stderr)
        return 2
    out = result.save(args.output_dir)
    print(result.to_markdown())
    print(f"best policy: {result.best_policy.to_string()}  -> {out / 'freeze_policy.json'} "
          f"(train with --freeze_policy_file {out / 'freeze_policy.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-freeze", description="Verified layer freezing for HF image classifiers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a model's layer groups and preview a freeze policy")
    p.add_argument("model", help="Hub id, local folder, or tiny:<model_type>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--freeze", default="backbone",
                       help="freeze value to preview: backbone | none | N | selectors (default: backbone)")
    group.add_argument("--policy", help="a whole policy string, e.g. 'freeze=stem:stage.2;unfreeze=epoch2:1@0.1'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("search", help="search freeze depth / schedule / LR scale / train_bn with hyperparameter_search")
    s.add_argument("--model", help="pretrained model (Hub id or folder); with --demo: the embedded digits base")
    s.add_argument("--train_dir", help="imagefolder with the training images")
    s.add_argument("--validation_dir", help="imagefolder with the validation images")
    s.add_argument("--demo", action="store_true", help="use the embedded digits transfer task (offline)")
    s.add_argument("--shots", type=int, default=10, help="with --demo: training images per class")
    s.add_argument("--validation_per_class", type=int, default=None, help="with --demo: validation images per class")
    s.add_argument("--n_trials", type=int, default=8)
    s.add_argument("--epochs", type=float, default=3)
    s.add_argument("--learning_rate", type=float, default=3e-3)
    s.add_argument("--batch_size", type=int, default=16)
    s.add_argument("--freeze_choices", default="backbone,half", help="comma-separated: backbone, half, or group counts")
    s.add_argument("--schedules", default="none,late,gradual")
    s.add_argument("--lr_scales", default="1.0,0.1")
    s.add_argument("--train_bn_choices", default="false")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output_dir", default="outputs/search")
    args = parser.parse_args(argv)
    return {"inspect": _inspect, "search": _search}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
