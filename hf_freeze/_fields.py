"""Each config field declared once: default, help, how its value is written, what a valid value is, its flag.

peft's config dataclasses are the model: one dataclass, ``field(default=..., metadata={"help": ...})`` per
field. :func:`declare` adds to that metadata a :class:`Syntax` (how the value is written in the compact string
form and read back, what makes a value invalid) and the command-line flag that carries it. From the
declarations, :class:`~hf_freeze.FreezePolicy` and :class:`~hf_freeze.AdapterConfig` derive their ``to_dict``,
their string form and the checks of each value, and :class:`~hf_freeze.FreezeArguments` its flags
(:func:`flag_fields`). Small pure functions over ``dataclasses.fields``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from .errors import FreezePolicyError

_DECL = "hf_freeze"  # the metadata key of a declaration


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: float) -> str:
    """A number as written in a string form: ``2`` for 2.0, ``0.1`` for 0.1."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _same(value: Any) -> Any:
    return value


def _no_problem(key: str, value: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Syntax:
    """How the values of a field are written, read back and checked.

    ``parse(key, text)``: the value a string form gives (ValueError with a message naming the key when the text
    is not one); ``show(value)``: the reverse; ``problem(key, value)``: what is wrong with a value (None: nothing);
    ``coerce(value)``: the canonical value of a shorthand the constructor accepts (a tuple for a list, ...);
    ``to_json``: the value in ``to_dict``; ``flag_type``: the type of its command-line flag (``str``: the flag
    holds the string form).
    """

    parse: Callable[[str, str], Any]
    show: Callable[[Any], str] = str
    problem: Callable[[str, Any], str | None] = _no_problem
    coerce: Callable[[Any], Any] = _same
    to_json: Callable[[Any], Any] = _same
    flag_type: type = str


@dataclass(frozen=True)
class Declaration:
    help: str
    syntax: Syntax
    #: the flag that carries the field on the command line (None: none)
    flag: str | None
    #: in the ``key=value`` items of the string form (False: the class writes it itself)
    in_string: bool
    #: shown in the string form even at its default
    always: bool
    #: left out of ``to_dict`` at its default (a field added after files were written without it)
    omit_default: bool


def declare(default: Any = MISSING, *, default_factory: Any = MISSING, help: str, syntax: Syntax,
            flag: str | None = None, in_string: bool = True, always: bool = False, omit_default: bool = False):
    """A dataclass ``field`` with its declaration in the metadata (``help`` as HfArgumentParser reads it)."""
    declaration = Declaration(help, syntax, flag, in_string, always, omit_default)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, _DECL: declaration})


def declarations(cls) -> list[tuple[dataclasses.Field, Declaration]]:
    return [(f, f.metadata[_DECL]) for f in dataclasses.fields(cls) if _DECL in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


# --------------------------------------------------------------------------- what derives from the declarations
def coerce(obj) -> None:
    """Replace every declared field's value by its canonical form (before it is checked)."""
    for f, d in declarations(type(obj)):
        setattr(obj, f.name, d.syntax.coerce(getattr(obj, f.name)))


def problems(obj) -> list[str]:
    """What is wrong with each declared field's value, in declaration order."""
    found = (d.syntax.problem(f.name, getattr(obj, f.name)) for f, d in declarations(type(obj)))
    return [p for p in found if p]


def to_dict(obj) -> dict:
    return {f.name: d.syntax.to_json(getattr(obj, f.name)) for f, d in declarations(type(obj))
            if not (d.omit_default and getattr(obj, f.name) == default_of(f))}


def string_items(obj) -> list[tuple[str, str]]:
    """``(key, value)`` of the string form: every field written in it that is not at its default (or ``always``)."""
    return [(f.name, d.syntax.show(getattr(obj, f.name))) for f, d in declarations(type(obj))
            if d.in_string and (d.always or getattr(obj, f.name) != default_of(f))]


def parse_items(cls, items: list[tuple[str, str]], what: str, context: Callable[[str], str] = _same) -> dict:
    """The keyword arguments ``key=value`` items of a string form give; an unknown key is kept as it is (for
    :func:`from_fields` to report), a repeated one is refused. ``context`` adds where to a parse error."""
    syntax = {f.name: d.syntax for f, d in declarations(cls) if d.in_string}
    kwargs: dict[str, Any] = {}
    for key, text in items:
        if key in kwargs:
            raise FreezePolicyError(f"{what} gives {key!r} twice")
        try:
            kwargs[key] = syntax[key].parse(key, text) if key in syntax else text
        except ValueError as e:
            raise FreezePolicyError(context(str(e))) from None
    return kwargs


def parse_value(cls, name: str, value: Any) -> Any:
    """A flag's value as field ``name`` of ``cls`` holds it: a string is the field's string form, parsed."""
    if not isinstance(value, str):
        return value
    syntax = next(d.syntax for f, d in declarations(cls) if f.name == name)
    try:
        return syntax.parse(name, value)
    except ValueError as e:
        raise FreezePolicyError(str(e)) from None


def from_fields(cls, data: dict, what: str):
    """``cls(**data)``; FreezePolicyError naming unknown keys and the valid fields."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise FreezePolicyError(f"unknown {what} field(s) {unknown}; valid fields: {valid}")
    return cls(**data)


def flag_fields(cls) -> list[tuple[str, Any, dataclasses.Field]]:
    """``(flag name, type, dataclasses.field)`` of each flag-carrying field of ``cls``: a bool field is a bool flag
    with the field's default; any other flag defaults to None (not given)."""
    out = []
    for f, d in declarations(cls):
        if d.flag is None:
            continue
        if d.syntax.flag_type is bool:
            out.append((d.flag, bool, dataclasses.field(default=default_of(f), metadata={"help": d.help})))
        else:
            out.append((d.flag, d.syntax.flag_type | None, dataclasses.field(default=None, metadata={"help": d.help})))
    return out


def flag_source(cls) -> dict[str, str]:
    """Flag name -> the field it sets."""
    return {d.flag: f.name for f, d in declarations(cls) if d.flag is not None}


# --------------------------------------------------------------------------- common syntaxes
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse_bool(key: str, text: str) -> bool:
    if text.lower() not in _TRUE | _FALSE:
        raise ValueError(f"{key}={text!r}: expected true or false")
    return text.lower() in _TRUE


def _bool_problem(key: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{key} must be True or False, got {value!r}"


BOOL = Syntax(_parse_bool, show=lambda v: str(v).lower(), problem=_bool_problem, flag_type=bool)


def keyword_count_or_names(keywords: tuple[str, ...], sep: str, minimum: int, *, count: str, names: str,
                           expected: str) -> Syntax:
    """A value that is one of ``keywords``, a count N >= ``minimum``, or a list of names (joined by ``sep`` in the
    string form). ``count``, ``names``, ``expected``: what the messages say about a bad count, a bad list, the rest."""

    def parse(key: str, text: str):
        text = text.strip()
        if text in keywords:
            return text
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return [s.strip() for s in text.split(sep)]

    def coerce(value):
        value = list(value) if isinstance(value, tuple) else value
        return parse("", value) if isinstance(value, str) else value

    def problem(key: str, value) -> str | None:
        if is_int(value):
            return f"{key}={value}: {count} must be >= {minimum}" if value < minimum else None
        if isinstance(value, list):
            return None if value and all(isinstance(s, str) and s.strip() for s in value) else f"{key}={value!r}: {names}"
        return None if value in keywords else f"{key}={value!r}: expected {expected}"

    return Syntax(parse, show=lambda v: sep.join(v) if isinstance(v, list) else str(v), problem=problem, coerce=coerce)
