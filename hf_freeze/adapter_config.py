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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _fields
from ._fields import Syntax, declare, is_int, is_number, keyword_count_or_names, num
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
        import peft  # optional dependency: only adapters need it
    except ImportError:
        raise FreezePolicyError("adapters need the peft package: pip install 'hf_freeze[peft]'") from None
    return getattr(peft, METHODS[method][0])


def _parse_number(key: str, text: str) -> int | float:
    number = _scalar(text)
    if not is_number(number):
        raise ValueError(f"{key}={text!r} is not a number")
    return number


def _method_problem(key: str, method) -> str | None:
    if method not in METHODS:
        return f"method={method!r}: expected one of {sorted(METHODS)}{did_you_mean(method, METHODS)}"
    return None


def _bounded(test: Callable[[Any], bool], expected: str) -> Callable[[str, Any], str | None]:
    return lambda key, value: None if test(value) else f"{key} must be {expected}, got {value!r}"


METHOD = Syntax(lambda key, text: text, problem=_method_problem)
RANK = Syntax(_parse_number, problem=_bounded(lambda r: is_int(r) and r >= 1, "an integer >= 1"), flag_type=int)
ALPHA = Syntax(_parse_number, show=num, problem=_bounded(lambda a: is_number(a) and a > 0, "a number > 0"),
               flag_type=float)
DROPOUT = Syntax(_parse_number, show=num, problem=_bounded(lambda d: is_number(d) and 0 <= d < 1, "in [0, 1)"),
                 flag_type=float)
GROUPS = keyword_count_or_names(
    ("backbone",), "+", 1, count="the number of groups before the head",
    names="a list of group names/ranges must hold non-empty strings",
    expected="'backbone', an int N (the last N groups before the head) or a list of group names and ranges such as "
             "['stage.2', 'stage.3'] or ['stage.2:neck']")
OPTIONS = Syntax(lambda key, text: text, to_json=dict)


@dataclass
class AdapterConfig:
    """Which adapter to train, and on which layer groups (string form: see the module docstring)."""

    method: str = declare("lora", syntax=METHOD, in_string=False, help="'lora', 'loha' or 'lokr'.")
    r: int = declare(8, syntax=RANK, flag="lora_r", always=True, help="Adapter rank (default 8).")
    alpha: float = declare(16, syntax=ALPHA, flag="lora_alpha", always=True, help="Adapter alpha (default 16).")
    dropout: float = declare(0.0, syntax=DROPOUT, flag="lora_dropout", help=(
        "Adapter dropout (default 0.0; LoRA's lora_dropout, LoHa/LoKr's rank_dropout)."))
    groups: str | int | list[str] = declare("backbone", syntax=GROUPS, flag="adapter_groups", help=(
        "Groups that get adapters: 'backbone' (default: all but the head), N (the last N groups before the head "
        "holding a layer an adapter can go on), or names/ranges joined by '+' or ',' (stage.2+stage.3, stage.1:neck)."))
    options: dict[str, Any] = declare(default_factory=dict, syntax=OPTIONS, in_string=False, help=(
        "Other fields of the PEFT config (use_dora, use_rslora, init_weights, ...), scalars only."))

    def __post_init__(self):
        _fields.coerce(self)
        problems = _fields.problems(self)
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
        return _fields.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        if not isinstance(data, dict):
            raise FreezePolicyError(f"an adapter config dict is expected, got {type(data).__name__}")
        return _fields.from_fields(cls, data, "adapter")

    def to_string(self) -> str:
        parts = [self.method, *(f"{key}={value}" for key, value in _fields.string_items(self))]
        parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(self.options.items())]
        return ",".join(parts)

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> AdapterConfig:
        """``METHOD[,key=value...]``: the fields of :meth:`to_string`; any other key is a PEFT option."""
        method, *parts = [p.strip() for p in text.strip().split(",")]
        items = []
        for item in parts:
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or not key or not value:
                raise FreezePolicyError(f"cannot parse {item!r} in adapter {text!r}: expected key=value, e.g. "
                                        "'lora,r=8,alpha=16,dropout=0.1,groups=stage.2+stage.3'")
            items.append((key, value))
        keys = ["method", *(k for k, _ in items)]
        repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if repeated:
            raise FreezePolicyError(f"adapter {text!r} gives {repeated!r} twice")
        written = {f.name for f, d in _fields.declarations(cls) if d.in_string}
        kwargs = _fields.parse_items(cls, [(k, v) for k, v in items if k in written], f"adapter {text!r}",
                                     context=lambda message: f"adapter {text!r}: {message}")
        return cls(method=method, **kwargs, options={k: _scalar(v) for k, v in items if k not in written})

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
