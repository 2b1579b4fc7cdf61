"""``FreezePolicy``: what to freeze, when to unfreeze, how BatchNorm and learning rates behave.

A policy is plain data (JSON round-trip, ``freeze_policy.json``, a compact string for command-line
flags). It is checked against a model's layer groups by :func:`hf_freeze.plan.resolve`, which returns a
:class:`~hf_freeze.plan.FreezePlan` or raises :class:`FreezePolicyError` without touching anything.

Compact string form (fields separated by ``;``; a bare value is the ``freeze`` field)::

    backbone
    freeze=stem:stage.2;train_bn=false
    freeze=backbone;unfreeze=epoch2:1@0.1,epoch4:2@0.01;layer_lr_decay=0.8
    freeze=*.normalization.*,stem;unfreeze=step100:stage.3+neck
    freeze=backbone;adapter=lora,r=8,alpha=16,groups=stage.2+stage.3

``freeze``:   ``backbone`` | ``none`` | ``N`` (the first N groups) | comma-separated selectors:
              a group name (``stage.3``), an inclusive range (``stem:stage.2``) or a parameter-name
              glob (``*.bn*``, ``vit.layers.0.*``).
``train_bn``: ``true`` lets every BatchNorm layer update its statistics: in frozen groups, and in groups
              after the schedule unfreezes them (never locked; their statistics are not fingerprinted).
``unfreeze_bn``: with ``train_bn=false``, ``true`` lets the BatchNorm layers of unfrozen groups use batch
              statistics again (default ``false``: they stay in inference mode, statistics kept and verified;
              their affine weights still train).
``unfreeze``: comma-separated events ``epochE:GROUPS[@LR_SCALE]`` or ``stepS:GROUPS[@LR_SCALE]``;
              GROUPS is a number (the next N frozen groups nearest the head) or names joined by ``+``.
              Events fire when each is due, and are resolved in that order (step and epoch events may be
              mixed; see :func:`hf_freeze.plan.resolve` and :class:`hf_freeze.plan.Timing`).
``adapter``:  ``METHOD[,key=value...]``: train PEFT adapters on frozen groups instead of unfreezing them
              (see :mod:`hf_freeze.adapter_config`; no unfreeze schedule with an adapter).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._compat import moved_names
from .adapter_config import AdapterConfig
from .errors import FreezePolicyError

POLICY_FILE = "freeze_policy.json"
POLICY_VERSION = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
        if self.at_epoch is not None and not (_is_number(self.at_epoch) and self.at_epoch > 0):
            problems.append(f"at_epoch must be a number > 0, got {self.at_epoch!r}")
        if self.at_step is not None and not (_is_int(self.at_step) and self.at_step > 0):
            problems.append(f"at_step must be an integer > 0, got {self.at_step!r}")
        if _is_int(self.groups):
            if self.groups < 1:
                problems.append(f"groups must be >= 1, got {self.groups}")
        elif not (isinstance(self.groups, list) and self.groups and all(isinstance(g, str) and g for g in self.groups)):
            problems.append(f"groups must be an int >= 1 or a non-empty list of group names, got {self.groups!r}")
        if not (_is_number(self.lr_scale) and self.lr_scale > 0):
            problems.append(f"lr_scale must be a finite number > 0, got {self.lr_scale!r}")
        if problems:
            raise FreezePolicyError(f"invalid Unfreeze({self._when()}): " + "; ".join(problems))

    def _when(self) -> str:
        return f"at_epoch={self.at_epoch!r}" if self.at_epoch is not None else f"at_step={self.at_step!r}"

    def to_dict(self) -> dict:
        return {"at_epoch": self.at_epoch, "at_step": self.at_step, "groups": self.groups, "lr_scale": self.lr_scale}

    def to_string(self) -> str:
        when = f"epoch{_num(self.at_epoch)}" if self.at_epoch is not None else f"step{self.at_step}"
        groups = str(self.groups) if _is_int(self.groups) else "+".join(self.groups)
        return f"{when}:{groups}" + (f"@{_num(self.lr_scale)}" if self.lr_scale != 1.0 else "")

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


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass
class FreezePolicy:
    """A declarative freeze policy; see the module docstring for the string form."""

    freeze: str | int | list[str] = "backbone"
    #: BatchNorm statistics. False (default): a BatchNorm layer stays in inference mode (statistics kept,
    #: fingerprinted, verified) while its group is frozen, and after its group is unfrozen unless ``unfreeze_bn``.
    #: True: every BatchNorm layer updates its statistics, frozen group or not, before and after an unfreeze; none
    #: is locked, so ``unfreeze_bn`` changes nothing, and those statistics are never claimed frozen or verified.
    #: (Groups that train from the start always use batch statistics.)
    train_bn: bool = False
    unfreeze: list[Unfreeze] = field(default_factory=list)
    layer_lr_decay: float | None = None
    verify: bool = True
    #: when a group is unfrozen, may its BatchNorm layers switch to batch statistics? False (default, as Keras
    #: advises for fine-tuning): they stay in inference mode, their affine weights train, their statistics are kept
    #: (and verified). Only matters with ``train_bn=False``
    unfreeze_bn: bool = False
    #: PEFT adapter trained on frozen groups (AdapterConfig, dict, adapter string or peft config); None: no adapter
    adapter: AdapterConfig | None = None

    def __post_init__(self):
        self.adapter = AdapterConfig.coerce(self.adapter)
        if isinstance(self.freeze, tuple):
            self.freeze = list(self.freeze)
        if isinstance(self.freeze, str):
            self.freeze = _parse_freeze_string(self.freeze)
        if isinstance(self.unfreeze, (Unfreeze, dict)):
            self.unfreeze = [self.unfreeze]
        if not isinstance(self.unfreeze, (list, tuple)):
            raise FreezePolicyError(f"unfreeze must be a list of Unfreeze events, got {self.unfreeze!r}")
        events = []
        for u in self.unfreeze:
            if isinstance(u, dict):
                u = _from_dict(Unfreeze, u, "unfreeze event")
            elif isinstance(u, str):
                u = Unfreeze.from_string(u)
            if not isinstance(u, Unfreeze):
                raise FreezePolicyError(f"unfreeze events must be Unfreeze objects, dicts or strings, got {u!r}")
            events.append(u)
        self.unfreeze = events
        problems = []
        f = self.freeze
        if _is_int(f):
            if f < 0:
                problems.append(f"freeze={f}: the number of groups to freeze must be >= 0")
        elif isinstance(f, list):
            if not f or not all(isinstance(s, str) and s.strip() for s in f):
                problems.append(f"freeze={f!r}: a list of freeze selectors must be non-empty strings "
                                "(group names, ranges like 'stem:stage.2', or parameter globs)")
        elif f not in ("backbone", "none"):
            problems.append(f"freeze={f!r}: expected 'backbone', 'none', an int N (the first N groups) or a list "
                            "of group names, ranges ('stem:stage.2') and parameter-name globs ('*.bn*')")
        for name in ("train_bn", "verify", "unfreeze_bn"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        d = self.layer_lr_decay
        if d is not None and not (_is_number(d) and 0 < d <= 1):
            problems.append(f"layer_lr_decay must be in (0, 1] (1 = no decay) or None, got {d!r}")
        for unit in ("at_epoch", "at_step"):
            times = [getattr(u, unit) for u in self.unfreeze if getattr(u, unit) is not None]
            if any(b <= a for a, b in zip(times, times[1:])):
                problems.append(f"unfreeze events must be listed in time order ({unit} values {times} are not increasing)")
        if self.adapter is not None and self.unfreeze:
            problems.append("an adapter keeps the pretrained weights frozen and trains adapters instead, so it takes "
                            f"no unfreeze schedule (got {[u.to_string() for u in self.unfreeze]}); choose one")
        if problems:
            raise FreezePolicyError("invalid FreezePolicy: " + "; ".join(problems))

    # ----------------------------------------------------------------- serialisation
    @property
    def needs_param_groups(self) -> bool:
        """True when per-group learning rates are needed (unfreeze lr_scale != 1 or layer_lr_decay)."""
        decay = self.layer_lr_decay is not None and self.layer_lr_decay != 1.0
        return decay or any(u.lr_scale != 1.0 for u in self.unfreeze)

    def to_dict(self) -> dict:
        d = {"version": POLICY_VERSION, "freeze": self.freeze, "train_bn": self.train_bn,
             "unfreeze": [u.to_dict() for u in self.unfreeze], "layer_lr_decay": self.layer_lr_decay,
             "verify": self.verify, "unfreeze_bn": self.unfreeze_bn}
        if self.adapter is not None:
            d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> FreezePolicy:
        if not isinstance(data, dict):
            raise FreezePolicyError(f"a freeze policy dict is expected, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise FreezePolicyError(f"freeze policy version {version!r} is not supported (this hf_freeze reads {POLICY_VERSION})")
        return _from_dict(cls, data, "FreezePolicy")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_string(self) -> str:
        f = self.freeze
        parts = [f"freeze={f if not isinstance(f, list) else ','.join(f)}"]
        if self.train_bn:
            parts.append("train_bn=true")
        if self.unfreeze:
            parts.append("unfreeze=" + ",".join(u.to_string() for u in self.unfreeze))
        if self.unfreeze_bn:
            parts.append("unfreeze_bn=true")
        if self.layer_lr_decay is not None:
            parts.append(f"layer_lr_decay={_num(self.layer_lr_decay)}")
        if not self.verify:
            parts.append("verify=false")
        if self.adapter is not None:
            parts.append(f"adapter={self.adapter.to_string()}")
        return ";".join(parts)

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> FreezePolicy:
        text = text.strip()
        if "=" not in text:
            return cls(freeze=text)
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep:
                raise FreezePolicyError(f"cannot parse {part!r} in policy string {text!r}: expected key=value")
            if key in kwargs:
                raise FreezePolicyError(f"policy string {text!r} gives {key!r} twice")
            kwargs[key] = _parse_field(key, value.strip())
        return _from_dict(cls, kwargs, "policy string")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / POLICY_FILE
        out.write_text(self.to_json() + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> FreezePolicy:
        """Read ``freeze_policy.json`` from a directory (or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / POLICY_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no {POLICY_FILE} at {path}")
        return cls.from_dict(json.loads(p.read_text()))

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
        if _is_int(value) or isinstance(value, (list, tuple)):
            return cls(freeze=value)  # shorthand for the freeze field
        raise FreezePolicyError(f"expected a FreezePolicy, dict, policy string, int or list of selectors, "
                                f"got {type(value).__name__}")


def _parse_freeze_string(text: str) -> str | int | list[str]:
    text = text.strip()
    if text in ("backbone", "none"):
        return text
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return [s.strip() for s in text.split(",")]


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse_field(key: str, value: str) -> Any:
    if key == "freeze":
        return value
    if key in ("train_bn", "verify", "unfreeze_bn"):
        if value.lower() not in _TRUE | _FALSE:
            raise FreezePolicyError(f"{key}={value!r}: expected true or false")
        return value.lower() in _TRUE
    if key == "unfreeze":
        return [Unfreeze.from_string(v) for v in value.split(",") if v.strip()]
    if key == "layer_lr_decay":
        if value.lower() in ("none", ""):
            return None
        try:
            return float(value)
        except ValueError:
            raise FreezePolicyError(f"layer_lr_decay={value!r}: expected a number in (0, 1]") from None
    if key == "adapter":
        return None if value.lower() in ("none", "") else AdapterConfig.from_string(value)
    return value  # unknown keys are reported by _from_dict


def _from_dict(cls, data: dict, what: str):
    valid = [f for f in cls.__dataclass_fields__]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise FreezePolicyError(f"unknown {what} field(s) {unknown}; valid fields: {valid}")
    return cls(**data)


__getattr__ = moved_names(__name__, dict.fromkeys(
    ("UnfreezeStep", "Timing", "FreezePlan", "select_params", "MAX_ORDERS", "firing_orders", "resolve"), "plan"))
