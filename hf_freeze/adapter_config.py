"""``AdapterConfig``: which PEFT adapter (LoRA, LoHa, LoKr) to train, and on which layer groups.

Plain data, the ``adapter`` field of a :class:`~hf_freeze.FreezePolicy`; :mod:`hf_freeze.adapter_plan`
checks it against a model and :mod:`hf_freeze.adapters` wraps the model.

String form (``adapter=`` in a policy string, ``--adapter`` on the command line)::

    lora
    lora,r=4,alpha=8,dropout=0.1,groups=stage.2+stage.3
    loha,r=8,groups=2,init_weights=true
    lora,groups=stage.1:neck,use_dora=true

``groups``: ``backbone`` (every group but the head; the default), ``N`` (the last N groups before
the head that hold a layer an adapter can go on) or group names / ranges joined by ``+``. Any other ``key=value`` is passed to the PEFT
config (scalars only).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .checks import did_you_mean
from .errors import FreezePolicyError

#: method -> (PEFT config class, its alpha field, the field ``dropout`` maps to)
METHODS = {"lora": ("LoraConfig", "lora_alpha", "lora_dropout"),
           "loha": ("LoHaConfig", "alpha", "rank_dropout"),
           "lokr": ("LoKrConfig", "alpha", "rank_dropout")}
#: PEFT config fields hf_freeze fills in itself (or that would change which modules are adapted)
RESOLVED_FIELDS = ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform", "layers_pattern",
                   "target_parameters", "rank_pattern", "alpha_pattern", "task_type", "peft_type", "inference_mode",
                   "base_model_name_or_path", "revision", "auto_mapping", "peft_version")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _scalar(text: str) -> bool | int | float | str:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _peft_class(method: str):
    try:
        import peft
    except ImportError:
        raise FreezePolicyError("adapters need the peft package: pip install 'hf_freeze[peft]'") from None
    return getattr(peft, METHODS[method][0])


@dataclass
class AdapterConfig:
    """Which adapter to train, and on which layer groups.

    ``method``: ``lora``, ``loha`` or ``lokr``; ``r``, ``alpha``, ``dropout``: rank, scaling and
    dropout (``lora_dropout`` for LoRA, ``rank_dropout`` for LoHa/LoKr); ``groups``: ``"backbone"``,
    an int N (the last N groups before the head holding a layer an adapter can go on) or a list of
    group names and ranges
    (``"stage.2:stage.3"``); ``options``: other fields of the PEFT config (``use_dora``, ``use_rslora``,
    ``init_weights``, ...), scalars only.
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    groups: str | int | list[str] = "backbone"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.groups, tuple):
            self.groups = list(self.groups)
        if isinstance(self.groups, str):
            self.groups = _parse_groups(self.groups)
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: expected one of {sorted(METHODS)}{did_you_mean(self.method, METHODS)}")
        if not (_is_int(self.r) and self.r >= 1):
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not (_is_number(self.alpha) and self.alpha > 0):
            problems.append(f"alpha must be a number > 0, got {self.alpha!r}")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        g = self.groups
        if _is_int(g):
            if g < 1:
                problems.append(f"groups={g}: the number of groups before the head must be >= 1")
        elif isinstance(g, list):
            if not g or not all(isinstance(s, str) and s.strip() for s in g):
                problems.append(f"groups={g!r}: a list of group names/ranges must hold non-empty strings")
        elif g != "backbone":
            problems.append(f"groups={g!r}: expected 'backbone', an int N (the last N groups before the head) or "
                            "a list of group names and ranges such as ['stage.2', 'stage.3'] or ['stage.2:neck']")
        if not isinstance(self.options, dict):
            problems.append(f"options must be a dict of PEFT config fields, got {type(self.options).__name__}")
        else:
            problems += self._option_problems()
        if problems:
            raise FreezePolicyError("invalid AdapterConfig: " + "; ".join(problems))

    def _option_problems(self) -> list[str]:
        problems = []
        if self.method not in METHODS:
            return problems
        _, alpha_field, dropout_field = METHODS[self.method]
        fields = _peft_class(self.method).__dataclass_fields__
        for key, value in self.options.items():
            if key in RESOLVED_FIELDS:
                problems.append(f"option {key!r} is resolved by hf_freeze from the policy's groups; "
                                "set groups= (and freeze=/train_bn=) instead")
            elif key in ("r", alpha_field, dropout_field):
                problems.append(f"option {key!r}: give it as AdapterConfig r=/alpha=/dropout= instead")
            elif key not in fields:
                valid = sorted(f for f in fields if f not in RESOLVED_FIELDS and not f.startswith("_"))
                problems.append(f"option {key!r} is not a field of {METHODS[self.method][0]}; valid: {valid}")
            elif not isinstance(value, (bool, int, float, str)):
                problems.append(f"option {key}={value!r}: only scalar options (bool, int, float, str) are supported")
        return problems

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {"method": self.method, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "groups": self.groups, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        if not isinstance(data, dict):
            raise FreezePolicyError(f"an adapter config dict is expected, got {type(data).__name__}")
        valid = list(cls.__dataclass_fields__)
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise FreezePolicyError(f"unknown adapter field(s) {unknown}; valid fields: {valid}")
        return cls(**data)

    def to_string(self) -> str:
        parts = [self.method, f"r={self.r}", f"alpha={_num(self.alpha)}"]
        if self.dropout:
            parts.append(f"dropout={_num(self.dropout)}")
        if self.groups != "backbone":
            parts.append(f"groups={self.groups if _is_int(self.groups) else '+'.join(self.groups)}")
        parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(self.options.items())]
        return ",".join(parts)

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> AdapterConfig:
        method, *items = [p.strip() for p in text.strip().split(",")]
        kwargs: dict[str, Any] = {"method": method}
        options: dict[str, Any] = {}
        for item in items:
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or not key or not value:
                raise FreezePolicyError(f"cannot parse {item!r} in adapter {text!r}: expected key=value, e.g. "
                                        "'lora,r=8,alpha=16,dropout=0.1,groups=stage.2+stage.3'")
            if key in kwargs or key in options:
                raise FreezePolicyError(f"adapter {text!r} gives {key!r} twice")
            if key == "groups":
                kwargs[key] = _parse_groups(value)
            elif key in ("r", "alpha", "dropout"):
                number = _scalar(value)
                if not _is_number(number):
                    raise FreezePolicyError(f"adapter {text!r}: {key}={value!r} is not a number")
                kwargs[key] = number
            else:
                options[key] = _scalar(value)
        return cls(**kwargs, options=options)

    @classmethod
    def from_peft(cls, config, groups: str | int | list[str] = "backbone") -> AdapterConfig:
        """An AdapterConfig carrying the hyper-parameters of a ``peft`` LoRA/LoHa/LoKr config."""
        method = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        if method not in METHODS:
            raise FreezePolicyError(f"PEFT type {config.peft_type} is not supported here; use one of {sorted(METHODS)}")
        for key in ("target_modules", "modules_to_save"):
            if getattr(config, key, None):
                raise FreezePolicyError(
                    f"the PEFT config sets {key}={getattr(config, key)!r}; hf_freeze resolves it from the policy "
                    "(adapter groups, frozen groups): leave it unset and give groups= instead")
        _, alpha_field, dropout_field = METHODS[method]
        default = type(config)()
        options = {k: getattr(config, k) for k in config.__dataclass_fields__
                   if k not in RESOLVED_FIELDS and k not in ("r", alpha_field, dropout_field) and not k.startswith("_")
                   and getattr(config, k) != getattr(default, k)}
        return cls(method=method, r=config.r, alpha=getattr(config, alpha_field),
                   dropout=getattr(config, dropout_field), groups=groups, options=options)

    @classmethod
    def coerce(cls, value) -> AdapterConfig | None:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, str):
            return cls.from_string(value)
        if hasattr(value, "peft_type"):
            return cls.from_peft(value)
        raise FreezePolicyError(f"adapter: expected an AdapterConfig, dict, adapter string ('lora,r=8') or a peft "
                                f"LoraConfig/LoHaConfig/LoKrConfig, got {type(value).__name__}")

    def peft_config(self, target_modules: str, modules_to_save: list[str]):
        """The PEFT config for resolved targets (a full-match regex) and modules to save."""
        _, alpha_field, dropout_field = METHODS[self.method]
        return _peft_class(self.method)(r=self.r, **{alpha_field: self.alpha, dropout_field: self.dropout},
                                        target_modules=target_modules, modules_to_save=modules_to_save,
                                        **self.options)


def _parse_groups(text: str) -> str | int | list[str]:
    text = text.strip()
    if text == "backbone":
        return text
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return [s.strip() for s in text.split("+")]
