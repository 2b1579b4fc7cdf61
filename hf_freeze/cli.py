"""``hf-freeze``: command-line entry point.

    hf-freeze inspect MODEL [--freeze VALUE | --policy STRING] [--json]
    hf-freeze search (--model MODEL --train_dir DIR --validation_dir DIR | --demo) [--n_trials 8] [--epochs 3]

MODEL is a Hub id, a local folder, or ``tiny:<model_type>`` (a tiny random config of any type in
transformers' image-classification mapping). Only the config is read; the model is built on the
meta device, so inspecting a large model costs no memory and downloads no weights.

Bad input is one line on stderr (``hf-freeze inspect: error: ...``) and exit code 2, argparse style;
``--debug`` (or ``HF_FREEZE_DEBUG=1``) shows the traceback instead. Everything that needs no model is
checked while the arguments are parsed, before any download, dataset load or folder creation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .checks import did_you_mean, model_source_problem, policy_problems, unknown_choice
from .errors import FreezePolicyError, UnsupportedModelError
from .folder import POLICY_FILE
from .policy import FreezePolicy
from .tiny import tiny_config

DEBUG_ENV = "HF_FREEZE_DEBUG"
SEARCH_FREEZE = ("backbone", "half")
SEARCH_SCHEDULES = ("none", "late", "gradual")


class UsageError(Exception):
    """Bad input found after parsing (a model that cannot be loaded, a policy that does not fit it)."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``prog: error: message``, exit code 2."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            message += self._suggest_options(message.split(":", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def _suggest_options(self, given: list[str]) -> str:
        """``(did you mean --freeze?)`` for mistyped flags, among this parser's and its commands' options."""
        parsers = [self, *getattr(self, "commands", {}).values()]
        known = {o for p in parsers for o in p._option_string_actions}  # argparse's own table of flags
        hints = [did_you_mean(flag.split("=")[0], known) for flag in given if flag.startswith("--")]
        return "".join(h for h in hints if h)


def one_line(text) -> str:
    return " ".join(str(text).split())


def debug_enabled(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])  # str(KeyError) wraps the message in quotes
    return str(error)


# ------------------------------------------------------------------ argument types (checked while parsing)
def model_source(value: str, *, tiny: bool = True) -> str:
    """A ``tiny:<type>``, a folder holding ``config.json``, or something shaped like a Hub id."""
    problem = model_source_problem(value, tiny=tiny)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def pretrained_source(value: str) -> str:
    return model_source(value, tiny=False)


def existing_folder(value: str) -> str:
    if not Path(value).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {value!r}")
    return value


def _number(cast, low, inclusive: bool):
    def parse(value: str):
        try:
            number = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, "
                                             f"got {value!r}") from None
        if number < low or (number == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {value!r}")
        return number

    return parse


positive_int = _number(int, 1, inclusive=True)
positive_float = _number(float, 0, inclusive=False)


def freeze_value(value: str) -> str:
    """A ``--freeze`` value: its syntax and group-name shapes, checked without a model."""
    return _policy_checked(value, lambda: FreezePolicy(freeze=value))


def policy_string(value: str) -> str:
    """A whole policy string, checked without a model."""
    return _policy_checked(value, lambda: FreezePolicy.from_string(value))


def _policy_checked(value: str, build) -> str:
    try:
        problems = policy_problems(build())
    except FreezePolicyError as e:
        problems = [str(e)]
    if problems:
        raise argparse.ArgumentTypeError("; ".join(problems))
    return value


def comma_list(item):
    """``a,b,c`` -> ``[item(a), item(b), item(c)]``; each item checked."""
    def parse(value: str) -> list:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
        return [item(v) for v in items]

    return parse


def search_freeze_choice(value: str) -> str:
    if value in SEARCH_FREEZE or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(unknown_choice("freeze choice", value, [*SEARCH_FREEZE, "N (a group count)"]))


def schedule_choice(value: str) -> str:
    if value not in SEARCH_SCHEDULES:
        raise argparse.ArgumentTypeError(unknown_choice("schedule", value, SEARCH_SCHEDULES))
    return value


def bool_choice(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(unknown_choice("value", value, ("true", "false")))
    return value.lower() == "true"


@contextlib.contextmanager
def input_errors(what: str):
    """Turn what loading user-named models/data raises into a one-line :class:`UsageError`."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, (FreezePolicyError, UnsupportedModelError)):
            raise
        raise UsageError(f"{what}: {_message(e)}") from e


# ------------------------------------------------------------------ commands
def _load_classifier(source: str):
    """The classifier for ``source``, on the meta device; UsageError when its config cannot be read or is no classifier."""
    # the command's modules load only when it runs: hf-freeze --help loads no torch
    from .loading import build_classifier, image_classifier_class_names, load_config

    where = "its config could not be read" if Path(source).expanduser().is_dir() or source.startswith("tiny:") else \
        "it is not a local folder, and its config could not be loaded from the Hugging Face Hub"
    with input_errors(f"{source!r}: {where}"):
        config = tiny_config(source.removeprefix("tiny:")) if source.startswith("tiny:") else load_config(source)
    try:
        image_classifier_class_names(config.model_type)
    except KeyError:
        raise UsageError(f"{source!r}: model type {config.model_type!r} has no image-classification class in "
                         "transformers (AutoModelForImageClassification cannot build it)") from None
    return build_classifier(config)


def _inspect(args) -> int:
    # the command's modules load only when it runs: hf-freeze --help loads no torch
    from .apply import apply_policy
    from .groups import layer_groups

    policy = FreezePolicy.from_string(args.policy) if args.policy else FreezePolicy(freeze=args.freeze)
    model = _load_classifier(args.model)
    groups = layer_groups(model)
    if policy.adapter is None:
        report = apply_policy(model, policy)
    else:  # preview which layers get adapters (on the meta device: nothing is allocated)
        # the command's modules load only when it runs: hf-freeze --help loads no torch
        from .adapters import add_adapter
        from .report import freeze_report

        report = freeze_report(add_adapter(model, policy))
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
    import datasets  # optional dependency (hf_freeze[examples]): only hf-freeze search needs it

    if args.demo:
        from .demo.data import transfer_task  # the demo needs datasets and scikit-learn (hf_freeze[examples])

        task = transfer_task(shots_per_class=args.shots, seed=args.seed, validation_per_class=args.validation_per_class)
        train, val = task["train"], task["validation"]
    else:
        train = datasets.load_dataset("imagefolder", data_dir=args.train_dir, split="train")
        val = datasets.load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
        if train.features["label"].names != val.features["label"].names:
            raise UsageError(f"--train_dir classes {train.features['label'].names} differ from --validation_dir "
                             f"classes {val.features['label'].names}: give both folders the same class subfolders")

    def to_inputs(batch):
        images = [im.convert("RGB") for im in batch["image"]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}

    return train.with_transform(to_inputs), val.with_transform(to_inputs), train.features["label"].names


def _search(args) -> int:
    # the command's modules load only when it runs: hf-freeze --help loads no torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .args import FreezeTrainingArguments
    from .metrics import classification_metrics
    from .search import FreezeSearchSpace, search_freeze_policies
    from .trainer import FreezeTrainer

    model_path = args.model
    if args.demo and not model_path:
        from .demo.pretrain import pretrained_base  # the demo needs datasets and scikit-learn (hf_freeze[examples])

        model_path = str(pretrained_base(seed=args.seed))
    with input_errors(f"--model {model_path!r}"):
        processor = AutoImageProcessor.from_pretrained(model_path)
    with input_errors("loading the images"):
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
    space = FreezeSearchSpace(freeze=args.freeze_choices, schedule=args.schedules, lr_scale=args.lr_scales,
                              train_bn=args.train_bn_choices)
    result = search_freeze_policies(trainer, n_trials=args.n_trials, space=space, seed=args.seed)
    out = result.save(args.output_dir)
    print(result.to_markdown())
    print(f"best policy: {result.best_policy.to_string()}  -> {out / POLICY_FILE} "
          f"(train with --freeze_policy_file {out / POLICY_FILE})")
    return 0


def _check_search(parser: Parser, args) -> None:
    """Cross-argument checks of ``search`` (still parse time: nothing is loaded yet)."""
    folders = [f for f in ("train_dir", "validation_dir") if getattr(args, f)]
    if args.demo and folders:
        parser.error(f"--demo trains on the embedded digits task; drop {', '.join('--' + f for f in folders)} "
                     "(or drop --demo)")
    if not args.demo and not (args.model and len(folders) == 2):
        parser.error("give --model, --train_dir and --validation_dir, or --demo")


def build_parser() -> Parser:
    parser = Parser(prog="hf-freeze", description="Verified layer freezing for HF image classifiers")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    parser.commands = {}
    p = sub.add_parser("inspect", parents=[common], help="print a model's layer groups and preview a freeze policy")
    p.add_argument("model", type=model_source, help="Hub id, local folder, or tiny:<model_type>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--freeze", default="backbone", type=freeze_value,
                       help="freeze value to preview: backbone | none | N | selectors (default: backbone)")
    group.add_argument("--policy", type=policy_string,
                       help="a whole policy string, e.g. 'freeze=stem:stage.2;unfreeze=epoch2:1@0.1'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("search", parents=[common],
                       help="search freeze depth / schedule / LR scale / train_bn with hyperparameter_search")
    s.add_argument("--model", type=pretrained_source,
                   help="pretrained model (Hub id or folder); with --demo: the embedded digits base")
    s.add_argument("--train_dir", type=existing_folder, help="imagefolder with the training images")
    s.add_argument("--validation_dir", type=existing_folder, help="imagefolder with the validation images")
    s.add_argument("--demo", action="store_true", help="use the embedded digits transfer task (offline)")
    s.add_argument("--shots", type=positive_int, default=10, help="with --demo: training images per class")
    s.add_argument("--validation_per_class", type=positive_int, default=None,
                   help="with --demo: validation images per class")
    s.add_argument("--n_trials", type=positive_int, default=8)
    s.add_argument("--epochs", type=positive_float, default=3)
    s.add_argument("--learning_rate", type=positive_float, default=3e-3)
    s.add_argument("--batch_size", type=positive_int, default=16)
    s.add_argument("--freeze_choices", type=comma_list(search_freeze_choice), default="backbone,half",
                   help="comma-separated: backbone, half, or group counts")
    s.add_argument("--schedules", type=comma_list(schedule_choice), default="none,late,gradual",
                   help="comma-separated: none, late, gradual")
    s.add_argument("--lr_scales", type=comma_list(positive_float), default="1.0,0.1")
    s.add_argument("--train_bn_choices", type=comma_list(bool_choice), default="false")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output_dir", default="outputs/search")
    parser.commands.update(inspect=p, search=s)
    return parser


COMMANDS = {"inspect": _inspect, "search": _search}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search":
        _check_search(parser.commands["search"], args)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, FreezePolicyError, UnsupportedModelError, ModuleNotFoundError) as e:
        if debug_enabled(args):
            raise
        message = _message(e)
        if isinstance(e, ModuleNotFoundError):
            message = f"this needs the {e.name} package: pip install 'hf_freeze[examples]'"
        print(f"hf-freeze {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
