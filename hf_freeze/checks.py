"""Checks of user input that need no model, and "did you mean" suggestions.

Layer-group names have one of four shapes, whatever the model: ``stem``, ``stage.N``, ``neck`` and
``head`` (:func:`hf_freeze.groups.build_groups`). So a name of another shape in an unfreeze event or an
adapter's groups is wrong for every model, and a bare freeze selector close to a keyword or a group name
is a typo. These checks run while arguments are parsed, before any model, data or folder is touched;
what needs the model (does it have a ``stage.9``?) is checked by :func:`hf_freeze.resolve`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path

from .tiny import CFG

FREEZE_KEYWORDS = ("backbone", "none")
GROUP_WORDS = ("stem", "neck", "head")
_GROUP_NAME = re.compile(r"stem|neck|head|stage\.\d+")
_GLOB_CHARS = set("*?[")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


def model_source_problem(value: str, *, tiny: bool = True) -> str | None:
    """What is wrong with a model reference before anything is loaded: ``tiny:<type>`` (a known type, when
    ``tiny``), a folder (it must hold ``config.json``), else something shaped like a Hub id. None if fine."""
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
        if not (path / "config.json").is_file():
            return (f"{value!r} is a folder without config.json, not a saved model (give the folder that "
                    "save_pretrained wrote, or a Hub id)")
        return None
    if path.exists():
        return f"{value!r} is a file; give the model's folder (the one holding config.json) or a Hub id"
    # huggingface_hub loads only to check a Hub id: hf-freeze --help imports none of it
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return f"no such folder: {value!r} (and it is not a Hub model id such as 'google/vit-base-patch16-224')"
    return None
