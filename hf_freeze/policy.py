"""``FreezePolicy``: what to freeze, when to unfreeze, how BatchNorm and learning rates behave.

A policy is plain data (JSON round-trip, ``freeze_policy.json``, a compact string for command-line
flags). It is checked against a model's layer groups by :func:`hf_freeze.plan.resolve`, which returns a
:class:`~hf_freeze.plan.FreezePlan` or raises :class:`FreezePolicyError` without touching anything.
Each field is declared once (:mod:`hf_freeze._fields`): its help says what it means, its syntax how it is
written; ``to_dict``, the string form, the checks and :class:`~hf_freeze.FreezeArguments`' flags follow.

Compact string form (``key=value`` fields separated by ``;``, the fields at their default left out; a bare
value is the ``freeze`` field)::

    backbone
    freeze=stem:stage.2;train_bn=false
    freeze=backbone;unfreeze=epoch2:1@0.1,epoch4:2@0.01;layer_lr_decay=0.8
    freeze=*.normalization.*,stem;unfreeze=step100:stage.3+neck
    freeze=backbone;adapter=lora,r=8,alpha=16,groups=stage.2+stage.3
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import _fields, folder
from ._compat import moved_names
from ._fields import BOOL, Syntax, declare, is_int, is_number, keyword_count_or_names, num
from .adapter_config import AdapterConfig
from .errors import FreezePolicyError

POLICY_VERSION = 1


@dataclass
class Unfreeze:
    """Unfreeze ``groups`` at an epoch or step boundary, training them at ``lr_scale`` x the schedule.

    ``groups``: an int N (the next N still-frozen groups nearest the head) or a list of group names.
    """

    at_epoch: float | None = None
    at_step: int | None = None
    groups: int | list[str] = 1
    lr_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.groups, tuple):
            self.groups = list(self.groups)
        if isinstance(self.groups, str):
            self.groups = [self.groups]
        problems = []
        if (self.at_epoch is None) == (self.at_step is None):
            problems.append("give exactly one of at_epoch or at_step")
        if self.at_epoch is not None and not (is_number(self.at_epoch) and self.at_epoch > 0):
            problems.append(f"at_epoch must be a number > 0, got {self.at_epoch!r}")
        if self.at_step is not None and not (is_int(self.at_step) and self.at_step > 0):
            problems.append(f"at_step must be an integer > 0, got {self.at_step!r}")
        if is_int(self.groups):
            if self.groups < 1:
                problems.append(f"groups must be >= 1, got {self.groups}")
        elif not (isinstance(self.groups, list) and self.groups and all(isinstance(g, str) and g for g in self.groups)):
            problems.append(f"groups must be an int >= 1 or a non-empty list of group names, got {self.groups!r}")
        if not (is_number(self.lr_scale) and self.lr_scale > 0):
            problems.append(f"lr_scale must be a finite number > 0, got {self.lr_scale!r}")
        if problems:
            raise FreezePolicyError(f"invalid Unfreeze({self._when()}): " + "; ".join(problems))

    def _when(self) -> str:
        return f"at_epoch={self.at_epoch!r}" if self.at_epoch is not None else f"at_step={self.at_step!r}"

    def to_dict(self) -> dict:
        return dict(vars(self))

    def to_string(self) -> str:
        when = f"epoch{num(self.at_epoch)}" if self.at_epoch is not None else f"step{self.at_step}"
        groups = str(self.groups) if is_int(self.groups) else "+".join(self.groups)
        return f"{when}:{groups}" + (f"@{num(self.lr_scale)}" if self.lr_scale != 1.0 else "")

    @classmethod
    def from_string(cls, text: str) -> Unfreeze:
        m = re.fullmatch(r"\s*(epoch|step)\s*([0-9.eE+-]+)\s*:\s*([^@]+?)\s*(?:@\s*(\S+))?\s*", text)
        if not m:
            raise FreezePolicyError(
                f"cannot parse unfreeze event {text!r}: expected 'epochE:GROUPS[@LR_SCALE]' or "
                f"'stepS:GROUPS[@LR_SCALE]', e.g. 'epoch2:1@0.1' or 'step100:stage.3+neck'")
        unit, when, groups, scale = m.groups()
        try:
            at = int(when) if unit == "step" else float(when)
            lr = float(scale) if scale is not None else 1.0
        except ValueError as e:
            raise FreezePolicyError(f"cannot parse unfreeze event {text!r}: {e}") from None
        group_value: int | list[str] = int(groups) if groups.isdigit() else [g.strip() for g in groups.split("+")]
        kwargs = {"at_epoch": at} if unit == "epoch" else {"at_step": at}
        return cls(groups=group_value, lr_scale=lr, **kwargs)


# --------------------------------------------------------------------------- how each field is written
FREEZE = keyword_count_or_names(
    ("backbone", "none"), ",", 0, count="the number of groups to freeze",
    names="a list of freeze selectors must be non-empty strings (group names, ranges like 'stem:stage.2', or parameter "
          "globs)",
    expected="'backbone', 'none', an int N (the first N groups) or a list of group names, ranges ('stem:stage.2') and "
             "parameter-name globs ('*.bn*')")


def _coerce_events(value) -> list[Unfreeze]:
    if isinstance(value, (Unfreeze, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise FreezePolicyError(f"unfreeze must be a list of Unfreeze events, got {value!r}")
    events = []
    for u in value:
        if isinstance(u, dict):
            u = _fields.from_fields(Unfreeze, u, "unfreeze event")
        elif isinstance(u, str):
            u = Unfreeze.from_string(u)
        if not isinstance(u, Unfreeze):
            raise FreezePolicyError(f"unfreeze events must be Unfreeze objects, dicts or strings, got {u!r}")
        events.append(u)
    return events


def _events_problem(key: str, events: list[Unfreeze]) -> str | None:
    for unit in ("at_epoch", "at_step"):
        times = [getattr(u, unit) for u in events if getattr(u, unit) is not None]
        if any(b <= a for a, b in zip(times, times[1:])):
            return f"unfreeze events must be listed in time order ({unit} values {times} are not increasing)"
    return None


EVENTS = Syntax(lambda key, text: [Unfreeze.from_string(v) for v in text.split(",") if v.strip()],
                show=lambda events: ",".join(u.to_string() for u in events), problem=_events_problem,
                coerce=_coerce_events, to_json=lambda events: [u.to_dict() for u in events])


def _parse_decay(key: str, text: str) -> float | None:
    if text.lower() in ("none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected a number in (0, 1]") from None


def _decay_problem(key: str, d) -> str | None:
    if d is not None and not (is_number(d) and 0 < d <= 1):
        return f"{key} must be in (0, 1] (1 = no decay) or None, got {d!r}"
    return None


DECAY = Syntax(_parse_decay, show=num, problem=_decay_problem, flag_type=float)
ADAPTER = Syntax(lambda key, text: None if text.lower() in ("none", "") else AdapterConfig.from_string(text),
                 show=lambda a: a.to_string(), coerce=AdapterConfig.coerce, to_json=lambda a: a.to_dict())


@dataclass
class FreezePolicy:
    """A declarative freeze policy; see the module docstring for the string form."""

    freeze: str | int | list[str] = declare("backbone", syntax=FREEZE, flag="freeze", always=True, help=(
        "What to freeze: 'backbone' (all but the head), 'none', N (the first N groups), or comma-separated "
        "group names, ranges ('stem:stage.2') and parameter globs ('*.bn*'). See `hf-freeze inspect MODEL`. "
        "Default: the policy recorded in the model's config, else 'backbone'."))
    train_bn: bool = declare(False, syntax=BOOL, flag="train_bn", help=(
        "Let every BatchNorm layer update its statistics, in frozen groups and after its group is unfrozen (never "
        "locked, so unfreeze_bn changes nothing, and those statistics are never claimed frozen or verified). "
        "Default: a BatchNorm layer stays in inference mode (statistics kept, fingerprinted, verified) while its "
        "group is frozen; groups that train from the start always use batch statistics."))
    unfreeze: list[Unfreeze] = declare(default_factory=list, syntax=EVENTS, flag="unfreeze", help=(
        "Unfreeze schedule: comma-separated 'epochE:GROUPS[@LR_SCALE]' or 'stepS:GROUPS[@LR_SCALE]'; GROUPS "
        "is N (next N frozen groups nearest the head) or names joined by '+'. Example: epoch2:1@0.1,epoch4:2@0.01. "
        "Events fire when each is due and are resolved in that order (step and epoch events may be mixed)."))
    unfreeze_bn: bool = declare(False, syntax=BOOL, flag="unfreeze_bn", help=(
        "Let BatchNorm layers of groups unfrozen by the schedule use batch statistics again (default: they stay "
        "in inference mode and keep their pretrained statistics, as Keras advises for fine-tuning; their weights "
        "still train). Only matters without train_bn."))
    layer_lr_decay: float | None = declare(None, syntax=DECAY, flag="layer_lr_decay", help=(
        "Layer-wise LR decay in (0, 1]: each group nearer the input gets this factor once more (head at the base LR)."))
    verify: bool = declare(True, syntax=BOOL, flag="verify_frozen", help=(
        "Check on every save and at the end that frozen tensors are bit-identical (FrozenWeightsChanged if not)."))
    adapter: AdapterConfig | None = declare(None, syntax=ADAPTER, flag="adapter", omit_default=True, help=(
        "Train a PEFT adapter on the frozen groups instead of unfreezing them: 'lora', 'loha' or 'lokr', "
        "optionally with options ('lora,use_dora=true'; an AdapterConfig, dict or peft config in Python). The "
        "head trains whole and is saved with the adapter. No unfreeze schedule with an adapter."))

    def __post_init__(self):
        _fields.coerce(self)
        problems = _fields.problems(self)
        if self.adapter is not None and self.unfreeze:
            problems.append("an adapter keeps the pretrained weights frozen and trains adapters instead, so it takes "
                            f"no unfreeze schedule (got {[u.to_string() for u in self.unfreeze]}); choose one")
        if problems:
            raise FreezePolicyError("invalid FreezePolicy: " + "; ".join(problems))

    @property
    def needs_param_groups(self) -> bool:
        """True when per-group learning rates are needed (unfreeze lr_scale != 1 or layer_lr_decay)."""
        decay = self.layer_lr_decay is not None and self.layer_lr_decay != 1.0
        return decay or any(u.lr_scale != 1.0 for u in self.unfreeze)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {"version": POLICY_VERSION, **_fields.to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> FreezePolicy:
        if not isinstance(data, dict):
            raise FreezePolicyError(f"a freeze policy dict is expected, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise FreezePolicyError(f"freeze policy version {version!r} is not supported (this hf_freeze reads {POLICY_VERSION})")
        return _fields.from_fields(cls, data, "FreezePolicy")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_string(self) -> str:
        return ";".join(f"{key}={value}" for key, value in _fields.string_items(self))

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> FreezePolicy:
        text = text.strip()
        if "=" not in text:
            return cls(freeze=text)
        items = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            if not sep:
                raise FreezePolicyError(f"cannot parse {part!r} in policy string {text!r}: expected key=value")
            items.append((key.strip(), value.strip()))
        return _fields.from_fields(cls, _fields.parse_items(cls, items, f"policy string {text!r}"), "policy string")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``freeze_policy.json`` into ``directory``."""
        return folder.write_policy(directory, self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> FreezePolicy:
        """Read ``freeze_policy.json`` from a directory (or the file itself)."""
        return cls.from_dict(folder.policy_dict(path))

    @classmethod
    def coerce(cls, value: FreezePolicy | dict | str | None) -> FreezePolicy:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, str):
            return cls.from_string(value)
        if is_int(value) or isinstance(value, (list, tuple)):
            return cls(freeze=value)  # shorthand for the freeze field
        raise FreezePolicyError(f"expected a FreezePolicy, dict, policy string, int or list of selectors, "
                                f"got {type(value).__name__}")


def policy_from_pretrained(path: str | os.PathLike) -> FreezePolicy:
    """The policy saved with a model folder (``freeze_policy.json``, else ``config.json``'s ``freeze_policy``)."""
    return FreezePolicy.from_dict(folder.recorded_policy_dict(path))


__getattr__ = moved_names(__name__, {"POLICY_FILE": "folder", **dict.fromkeys(
    ("UnfreezeStep", "Timing", "FreezePlan", "select_params", "MAX_ORDERS", "firing_orders", "resolve"), "plan")})
