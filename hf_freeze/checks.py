"""Checks of user input that need no model, and "did you mean" suggestions.

Layer-group names have one of four shapes, whatever the model: ``stem``, ``stage.N``, ``neck`` and
``head`` (:func:`hf_freeze.groups.build_groups`). So a name of another shape in an unfreeze event or an
adapter's groups is wrong for every model, and a bare freeze selector close to a keyword or a group name
is a typo. These checks run while arguments are parsed, before any model, data or folder is touched;
what needs the model (does it have a ``stage.9``?) is checked by :func:`hf_freeze.resolve`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from .tiny import CFG

FREEZE_KEYWORDS = ("backbone", "none")
GROUP_WORDS = ("stem", "neck", "head")
_GROUP_NAME = re.compile(r"stem|neck|head|stage\.\d+")
_GLOB_CHARS = set("*?[")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word`` (difflib, ignoring case), else ``""``."""
    choices = [str(c) for c in choices]
    by_lower = {c.lower(): c for c in reversed(choices)}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


#: flags of transformers' example scripts that were renamed: old -> new
RENAMED_FLAGS = {"--use_auth_token": "--token", "--evaluation_strategy": "--eval_strategy",
                 "--per_gpu_train_batch_size": "--per_device_train_batch_size",
                 "--per_gpu_eval_batch_size": "--per_device_eval_batch_size"}
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)")


def flag_hint(flag: str, known: Iterable[str]) -> str:
    """"Did you mean" for an unrecognized ``--flag`` (``--flag=value`` too): its new name when it was renamed
    (:data:`RENAMED_FLAGS`), else the closest of ``known``."""
    name = flag.split("=")[0]
    if name in RENAMED_FLAGS:
        return f" (did you mean {RENAMED_FLAGS[name]!r}? {name} was renamed)"
    return did_you_mean(name, known)


def argparse_hint(message: str) -> str:
    """"Did you mean" for argparse's ``invalid choice: 'x' (choose from 'a', 'b')`` messages, else ``""``."""
    match = _INVALID_CHOICE.search(message)
    if not match:
        return ""
    return did_you_mean(match["value"], re.findall(r"'([^']*)'", match["choices"]))


def one_line(text) -> str:
    """``text`` on one line: its lines joined with a space (the spaces inside a line, a path's, are kept)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def number_problem(flag: str, value, low: float | None = None, *, inclusive: bool = True,
                   integer: bool = False) -> str | None:
    """What is wrong with a number given for ``flag``: not a (finite) number, not an integer, or below ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{flag} must be a finite {'integer' if integer else 'number'}, got {value!r}"
    if integer and value != int(value):
        return f"{flag} must be an integer, got {value!r}"
    if low is not None and (value < low or (value == low and not inclusive)):
        return f"{flag} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}"
    return None


def training_number_problems(args) -> list[str]:
    """Training numbers (``TrainingArguments`` fields) that make no sense whatever the model: a negative or NaN
    learning rate, no training length, empty batches."""
    checks = [("learning_rate", 0, True, False), ("weight_decay", 0, True, False),
              ("per_device_train_batch_size", 1, True, True), ("per_device_eval_batch_size", 1, True, True),
              ("gradient_accumulation_steps", 1, True, True), ("num_train_epochs", 0, True, False)]
    problems = [number_problem(f"--{name}", getattr(args, name), low, inclusive=inclusive, integer=integer)
                for name, low, inclusive, integer in checks if hasattr(args, name)]
    epochs, max_steps = getattr(args, "num_train_epochs", None), getattr(args, "max_steps", -1)
    if getattr(args, "do_train", False) and max_steps is not None and max_steps <= 0 and epochs == 0:
        problems.append("--num_train_epochs 0 trains nothing: give a number of epochs > 0 (or --max_steps N)")
    return [p for p in problems if p]


def _scalar_kinds(kind) -> tuple[set, bool] | None:
    """``({int, float, ...}, optional)`` when ``kind`` is a plain scalar type (or a union of them, with None);
    None for anything else (enums, lists, dicts: left to the dataclass)."""
    members = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    scalars = {m for m in members if m is not type(None)}
    if not scalars or not scalars <= {bool, int, float, str}:
        return None
    return scalars, type(None) in members


def _fits(value, kinds: set) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return bool(kinds & {int, float})
    return (isinstance(value, float) and float in kinds) or (isinstance(value, str) and str in kinds)


def json_value_problems(dataclass_types, values: dict) -> list[str]:
    """What is wrong with the keys and value types of an arguments file (``args.json``) for ``dataclass_types``:
    unknown keys (with "did you mean") and values of the wrong JSON type (``"3"`` for a number, ``"true"`` for a
    switch), which ``HfArgumentParser.parse_json_file`` passes to the dataclasses unchecked."""
    hints = {}
    for dtype in dataclass_types:
        try:
            resolved = typing.get_type_hints(dtype)
        except Exception:  # an annotation typing cannot resolve: leave those fields to the dataclass
            resolved = {}
        hints.update({f.name: resolved.get(f.name) for f in dataclasses.fields(dtype) if f.init})
    problems = []
    names = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"unknown key {key!r}{did_you_mean(key, hints)}")
            continue
        scalar = _scalar_kinds(hints[key]) if hints[key] is not None else None
        if scalar is None or (value is None and scalar[1]) or _fits(value, scalar[0]):
            continue
        expected = " or ".join(names[k.__name__] for k in (bool, int, float, str) if k in scalar[0])
        problems.append(f"{key!r} must be {expected}{' (or null)' if scalar[1] else ''}, got {json_repr(value)}")
    return problems


def json_repr(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """``"--flag 'x' is not valid (did you mean 'a'?); valid: a, b, c"``."""
    choices = list(choices)
    return f"{what} {value!r} is not valid{did_you_mean(value, choices)}; valid: {', '.join(map(str, choices))}"


def is_group_name(name: str) -> bool:
    return bool(_GROUP_NAME.fullmatch(name.strip()))


def group_hint(word: str, names: Iterable[str], keywords: Iterable[str] = ()) -> str:
    """"Did you mean" among a model's group ``names`` (and ``keywords``); nothing for a well-formed group name
    the model lacks (``stage.9``): the list of its groups says more than a guess."""
    return "" if is_group_name(word) else did_you_mean(word, [*keywords, *names])


def _group_words(word: str) -> list[str]:
    """Group names a mistyped ``word`` may have meant: stem, neck, head and ``stage.N`` for the numbers in it."""
    numbers = re.findall(r"\d+", word) or ["0"]
    return [*GROUP_WORDS, *(f"stage.{n}" for n in numbers)]


def _not_a_group(name: str, where: str) -> str:
    return (f"{where}: {name!r} is not a layer-group name{did_you_mean(name, _group_words(name))}; group names "
            "are stem, stage.N, neck and head (`hf-freeze inspect MODEL` lists a model's groups)")


def _range_ends(selector: str) -> list[str]:
    return [end.strip() for end in selector.split(":", 1)]


def policy_problems(policy) -> list[str]:
    """What is wrong with the names in ``policy`` (a FreezePolicy) for any model; empty if nothing is."""
    problems = []
    selectors = policy.freeze if isinstance(policy.freeze, list) else []
    for raw in selectors:
        s = raw.strip()
        if s in FREEZE_KEYWORDS:
            problems.append(f"freeze selector {s!r} is a keyword and stands alone (freeze={s}); it cannot be "
                            f"combined with other selectors ({','.join(selectors)})")
        elif _GLOB_CHARS & set(s):
            continue  # a parameter glob: matched against the model's names
        elif ":" in s:
            problems += [_not_a_group(end, f"freeze range {s!r}") for end in _range_ends(s) if not is_group_name(end)]
        elif "." not in s and not is_group_name(s):
            hint = did_you_mean(s, (*FREEZE_KEYWORDS, *_group_words(s)))
            if hint:  # a bare word far from every name may still be a top-level parameter: the model decides
                problems.append(f"freeze selector {s!r} is neither a keyword (backbone, none) nor a group name{hint}")
    for event in policy.unfreeze:
        names = event.groups if isinstance(event.groups, list) else []
        problems += [_not_a_group(g, f"unfreeze {event.to_string()!r}") for g in names if not is_group_name(g)]
    adapter_groups = policy.adapter.groups if policy.adapter is not None else None
    for sel in adapter_groups if isinstance(adapter_groups, list) else []:
        ends = _range_ends(sel) if ":" in sel else [sel.strip()]
        problems += [_not_a_group(end, "adapter groups") for end in ends if not is_group_name(end)]
    return problems


def schedule_problems(policy, num_train_epochs: float, max_steps: int) -> list[str]:
    """Unfreeze events that can never fire within the training length the arguments set."""
    problems = []
    for event in policy.unfreeze:
        if max_steps is not None and max_steps > 0:
            if event.at_step is not None and event.at_step >= max_steps:
                problems.append(f"unfreeze {event.to_string()!r} would never happen: training stops after "
                                f"max_steps={max_steps}")
        elif event.at_epoch is not None and num_train_epochs is not None and event.at_epoch >= num_train_epochs:
            problems.append(f"unfreeze {event.to_string()!r} would never happen: training stops after "
                            f"num_train_epochs={num_train_epochs:g}")
    return problems


def imagefolder_classes(flag: str, folder: str, dataset) -> list[str]:
    """The class names of ``dataset``, loaded with ``load_dataset("imagefolder", data_dir=folder)``; a ValueError
    naming ``flag`` and the folder when it has fewer than two class subfolders (datasets then makes no label
    column at all, and the run would fail later with ``KeyError: 'label'``)."""
    names = getattr(dataset.features.get("label"), "names", None)
    if names and len(names) >= 2:
        return list(names)
    root = Path(folder).expanduser()
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    has = f"only one class subfolder ({found[0]!r})" if len(found) == 1 else "no class subfolders"
    raise ValueError(f"{flag} {folder!r} has {has}; an image folder needs one subfolder per class (at least two "
                     "classes), named after the class, with that class's images inside")


def model_source_problem(value: str, *, tiny: bool = True, needs: str = "config.json",
                         what: str = "a saved model") -> str | None:
    """What is wrong with a model reference before anything is loaded: ``tiny:<type>`` (a known type, when
    ``tiny``), a folder (it must hold ``needs``: ``config.json``, or ``preprocessor_config.json`` for an image
    processor), else something shaped like a Hub id. None if fine."""
    if value.startswith("tiny:"):
        name = value.removeprefix("tiny:")
        if not tiny:
            return (f"{value!r} is a random tiny model; this needs pretrained weights (a Hub id or a folder saved "
                    "with save_pretrained)")
        if name not in CFG:
            return f"unknown tiny model type {name!r}{did_you_mean(name, CFG)}; known: {', '.join(sorted(CFG))}"
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / needs).is_file():
            return (f"{value!r} is a folder without {needs}, not {what} (give the folder that "
                    "save_pretrained wrote, or a Hub id)")
        return None
    if path.exists():
        return f"{value!r} is a file; give the folder holding {needs} or a Hub id"
    # huggingface_hub loads only to check a Hub id: hf-freeze --help imports none of it
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return f"no such folder: {value!r} (and it is not a Hub model id such as 'google/vit-base-patch16-224')"
    return None
