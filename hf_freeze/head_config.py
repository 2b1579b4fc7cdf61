"""``HeadConfig``: task-specific layers put on top of the (frozen) network in place of its linear classifier.

Plain data, the ``head`` field of a :class:`~hf_freeze.FreezePolicy`; :mod:`hf_freeze.heads` checks it against a
model (where its classifier lives, its input width: :mod:`hf_freeze.architectures`) and builds it. The classic
recipe (pooled features -> Dense(1024, relu) -> dropout -> Dense(num_classes)) is ``mlp:1024,relu,dropout=0.2``.

String form (``head=`` in a policy string, ``--head`` on the command line)::

    mlp:1024
    mlp:1024,relu,dropout=0.2
    mlp:512,256,gelu,norm=true

After ``mlp:``: each bare integer is a hidden width (in order), a bare activation name is the activation, and
``key=value`` sets ``activation``, ``dropout`` or ``norm``. Each hidden layer is Linear -> LayerNorm (``norm``) ->
activation -> Dropout (``dropout`` > 0); a last Linear maps to the labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import _fields
from ._fields import BOOL, Syntax, declare, is_int, is_number, num
from .checks import did_you_mean
from .errors import FreezePolicyError

#: the activations a head can use (the modules: hf_freeze._head_module.ACTIVATIONS)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
KINDS = ("mlp",)


def _parse_widths(key: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split("+")]
    if not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ValueError(f"{key}={text!r}: expected hidden widths joined by '+', e.g. 1024+512")
    return tuple(int(p) for p in parts)


def _widths_problem(key: str, value) -> str | None:
    if not (isinstance(value, tuple) and value and all(is_int(w) for w in value)):
        return f"{key} must be a non-empty list of hidden widths (integers), got {value!r}"
    bad = [w for w in value if w <= 0]
    return f"{key}: every hidden width must be > 0, got {list(value)}" if bad else None


def _activation_problem(key: str, value) -> str | None:
    if value in ACTIVATIONS:
        return None
    return f"{key}={value!r} is not a known activation{did_you_mean(value, ACTIVATIONS)}; valid: {', '.join(ACTIVATIONS)}"


def _parse_dropout(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected a number in [0, 1)") from None


WIDTHS = Syntax(_parse_widths, show=lambda w: "+".join(map(str, w)), problem=_widths_problem,
                coerce=lambda v: tuple(v) if isinstance(v, list) else ((v,) if is_int(v) else v), to_json=list)
ACTIVATION = Syntax(lambda key, text: text.strip().lower(), problem=_activation_problem)
DROPOUT = Syntax(_parse_dropout, show=num, flag_type=float, problem=lambda key, d: None if is_number(d) and 0 <= d < 1
                 else f"{key} must be a number in [0, 1), got {d!r}")


@dataclass
class HeadConfig:
    """An MLP head: ``hidden`` widths, ``activation``, ``dropout`` after each activation, LayerNorm (``norm``)."""

    hidden: tuple[int, ...] = declare(syntax=WIDTHS, in_string=False, help=(
        "Hidden widths of the head, input side first (e.g. (1024,) or (512, 256)); a last Linear maps to the labels."))
    activation: str = declare("relu", syntax=ACTIVATION, always=True, help=f"Activation: one of {', '.join(ACTIVATIONS)}.")
    dropout: float = declare(0.0, syntax=DROPOUT, help="Dropout after each hidden activation, in [0, 1) (default 0).")
    norm: bool = declare(False, syntax=BOOL, help="LayerNorm after each hidden Linear (default false).")

    def __post_init__(self):
        _fields.coerce(self)
        problems = _fields.problems(self)
        if problems:
            raise FreezePolicyError("invalid HeadConfig: " + "; ".join(problems))

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {"kind": "mlp", **_fields.to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        if not isinstance(data, dict):
            raise FreezePolicyError(f"a head config dict is expected, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("kind", "mlp")
        if kind not in KINDS:
            raise FreezePolicyError(f"head kind {kind!r} is not known; valid: {', '.join(KINDS)}")
        return _fields.from_fields(cls, data, "head")

    def to_string(self) -> str:
        return "mlp:" + ",".join([*map(str, self.hidden), *(v if k == "activation" else f"{k}={v}"
                                                          for k, v in _fields.string_items(self))])

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> HeadConfig:
        """``mlp:W1[,W2...][,ACTIVATION][,key=value...]`` (see the module docstring)."""
        kind, sep, rest = text.strip().partition(":")
        if kind.strip().lower() not in KINDS or not sep:
            raise FreezePolicyError(f"cannot parse head {text!r}: expected 'mlp:WIDTH[,WIDTH...][,ACTIVATION]"
                                    f"[,dropout=P][,norm=true]', e.g. 'mlp:1024,relu,dropout=0.2'; head kinds: "
                                    f"{', '.join(KINDS)}")
        widths, items = [], []
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = (x.strip() for x in part.partition("="))
            if eq:
                items.append((key, value))
            elif re.fullmatch(r"-?\d+", part):
                widths.append(int(part))
            else:
                items.append(("activation", part))
        kwargs = _fields.parse_items(cls, items, f"head {text!r}", context=lambda message: f"head {text!r}: {message}")
        return _fields.from_fields(cls, {"hidden": tuple(widths), **kwargs}, "head")

    @classmethod
    def coerce(cls, value) -> HeadConfig | None:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, str):
            return None if value.strip().lower() in ("none", "") else cls.from_string(value)
        raise FreezePolicyError(f"head: expected a HeadConfig, dict or head string ('mlp:1024,relu,dropout=0.2'), "
                                f"got {type(value).__name__}")
