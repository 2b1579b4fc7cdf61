"""PEFT adapters (LoRA, LoHa, LoKr) on the layer groups a freeze policy names, instead of unfreezing them.

    policy = FreezePolicy(adapter=AdapterConfig("lora", r=8, alpha=16, groups=["stage.2", "stage.3"]))
    model = hf_freeze.add_adapter(model, policy)          # a peft.PeftModel; the base stays bit-identical
    ... FreezeTrainer(model=model, ...)  (or FreezeTrainer(model=plain_model, freeze_policy=policy))
    hf_freeze.save_adapter(model, folder)                 # adapter files + freeze_policy.json (FreezeTrainer: save_model)
    model = hf_freeze.load_adapter(base_model, folder)    # same logits; .merge_and_unload() too

How a policy becomes a PEFT config (:func:`resolve_adapter`, checked before anything is changed):

* ``target_modules``: the ``nn.Linear``/``nn.Conv2d`` layers of the adapter's groups, as one exact
  regex of full module names. Skipped, with the reason kept in :attr:`AdapterPlan.skipped` and shown
  by the freeze report: grouped/depthwise convolutions (PEFT needs the rank divisible by ``groups``
  and cannot merge them), subclasses that override ``forward`` (e.g. weight-standardised or
  "same"-padded convs: a delta merged into the weight would not reproduce their output) and the
  ``out_proj`` of ``nn.MultiheadAttention`` (used through its weight, not its forward).
* ``modules_to_save``: the largest modules holding only parameters the policy leaves trainable (the
  head, for ``freeze="backbone"``): trained as whole copies and saved with the adapter. With
  ``train_bn``, the BatchNorm layers of frozen groups too, so their updated statistics travel with
  the adapter (their affine weights stay frozen); without it, frozen BatchNorm stays locked in
  inference mode. Either way the pretrained tensors, buffers included, stay bit-identical and a
  reload reproduces the trained logits exactly.

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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .checks import did_you_mean, group_hint
from .errors import FreezePolicyError
from .groups import HEAD
from .names import ADAPTER, COPY, ModelNames, named_base_modules, named_base_parameters, peft_wrappers

#: method -> (PEFT config class, its alpha field, the field ``dropout`` maps to)
METHODS = {"lora": ("LoraConfig", "lora_alpha", "lora_dropout"),
           "loha": ("LoHaConfig", "alpha", "rank_dropout"),
           "lokr": ("LoKrConfig", "alpha", "rank_dropout")}
#: PEFT config fields hf_freeze fills in itself (or that would change which modules are adapted)
RESOLVED_FIELDS = ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform", "layers_pattern",
                   "target_parameters", "rank_pattern", "alpha_pattern", "task_type", "peft_type", "inference_mode",
                   "base_model_name_or_path", "revision", "auto_mapping", "peft_version")
ADAPTABLE = (nn.Linear, nn.Conv2d)


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


# =========================================================================== config

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


# =========================================================================== resolution

@dataclass(frozen=True)
class AdapterPlan:
    """An adapter config checked against one model: what gets an adapter, what is saved whole."""

    config: AdapterConfig
    groups: tuple[str, ...]  # layer groups that carry adapters
    targets: tuple[str, ...]  # module names that get an adapter
    skipped: tuple[tuple[str, str], ...]  # (module name, why it gets none) in those groups
    modules_to_save: tuple[str, ...]  # trained as whole copies, saved with the adapter

    @property
    def target_regex(self) -> str:
        return "^(?:" + "|".join(re.escape(t) for t in self.targets) + ")$"

    def peft_config(self):
        return self.config.peft_config(self.target_regex, list(self.modules_to_save))


def adapter_group_names(config: AdapterConfig, groups, frozen: set[str] | frozenset[str],
                        layers: list[tuple[str, str, str | None]]) -> list[str]:
    """The groups ``config`` names, validated: known, not the head, fully frozen by the policy.

    ``layers``: :func:`adaptable_layers`. ``N`` counts only the groups holding a layer an adapter can
    go on (the last N such groups before the head); named groups must hold one between them.
    """
    from .plan import group_range

    adaptable = {g for _, g, why in layers if why is None}
    names = groups.names
    backbone = [n for n in names if n != HEAD]
    g = config.groups
    if g == "backbone":
        chosen = [n for n in backbone if n in adaptable]
    elif _is_int(g):
        candidates = [n for n in backbone if n in adaptable]
        if g > len(candidates):
            raise FreezePolicyError(f"adapter groups={g}: the model has only {len(candidates)} groups before the head "
                                    f"with a layer an adapter can go on: {candidates}")
        chosen = candidates[len(candidates) - g:]
    else:
        named, ranged = set(), set()
        for sel in g:
            if sel in names:
                named.add(sel)
            elif ":" in sel:
                ranged.update(group_range(sel, names))
            else:
                raise FreezePolicyError(f"adapter groups: unknown group {sel!r}{group_hint(sel, names)}; groups are {names}")
        empty = [n for n in names if n in named and n not in adaptable and n != HEAD]
        if empty or not (named | ranged) & (adaptable | {HEAD}):
            empty = empty or [n for n in names if n in ranged]
            why = next((f"{layer}: {w}" for layer, grp, w in layers if grp in empty), "no nn.Linear/nn.Conv2d")
            raise FreezePolicyError(f"adapter groups {empty} hold no layer an adapter can go on ({why}); groups "
                                    f"that do: {[n for n in backbone if n in adaptable]}")
        chosen = [n for n in names if n in named or (n in ranged and (n in adaptable or n == HEAD))]
    if HEAD in chosen:
        raise FreezePolicyError("adapter groups include 'head': the head is trained whole (saved with the adapter as "
                                "modules_to_save); put adapters on frozen groups such as "
                                f"{backbone[-2:]}")
    open_groups = [n for n in chosen if not set(groups[n].param_names) <= frozen]
    if open_groups:
        frozen_groups = [n for n in names if set(groups[n].param_names) <= frozen]
        raise FreezePolicyError(f"adapter groups {open_groups} are not fully frozen by the policy; adapters go on "
                                f"frozen groups (frozen here: {frozen_groups}); freeze them or name other groups")
    return chosen


def skip_reason(module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why an adaptable layer gets no adapter (None: it gets one)."""
    base = next(c for c in ADAPTABLE if isinstance(module, c))
    if type(module).forward is not base.forward:
        return (f"{type(module).__name__} overrides forward() (e.g. weight standardisation or padding): an adapter "
                "delta merged into its weight would not reproduce its output")
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return (f"grouped/depthwise convolution (groups={module.groups}): PEFT needs the rank divisible by groups "
                "and cannot merge it (merge_and_unload would fail)")
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention uses its out_proj weight directly, so an adapter on it would have no effect"
    return None


def adaptable_layers(model: nn.Module, groups) -> list[tuple[str, str, str | None]]:
    """``(module name, group, reason it gets no adapter or None)`` for every nn.Linear/nn.Conv2d outside the head."""
    group_of = groups.group_of()
    modules = dict(named_base_modules(model))
    out = []
    for name, module in modules.items():
        group = group_of.get(f"{name}.weight")
        if isinstance(module, ADAPTABLE) and group not in (None, HEAD):
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            out.append((name, group, skip_reason(module, parent)))
    return out


def modules_to_save(model: nn.Module, trainable: set[str], extra: list[str]) -> list[str]:
    """The modules owning ``trainable`` parameters (outermost first, none inside another), then ``extra`` ones.

    Owners rather than whole containers (``classifier.1``, not ``classifier``): PEFT's LoHa/LoKr
    ``merge_and_unload`` needs a saved module to have a ``weight``. Raises FreezePolicyError when an
    owner also holds frozen parameters (PEFT saves whole modules).
    """
    params = [n for n, _ in named_base_parameters(model)]
    owners = {n.rpartition(".")[0] for n in trainable}
    chosen: list[str] = []

    def inside(name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in chosen)

    if "" in owners:
        raise FreezePolicyError(f"trainable parameter(s) {sorted(n for n in trainable if '.' not in n)} sit directly on "
                                "the model, which PEFT cannot save as a module copy; freeze them")
    for name, _ in named_base_modules(model):
        if name in owners and not inside(name):
            frozen = [n for n in params if n.startswith(f"{name}.") and n not in trainable]
            if frozen:
                raise FreezePolicyError(
                    f"module {name!r} holds parameters this policy trains and frozen ones ({frozen[0]!r}); with an "
                    "adapter, trainable parameters are saved as whole-module copies (peft modules_to_save): freeze "
                    "or train whole modules (group names, not parameter globs)")
            chosen.append(name)
    return chosen + [e for e in extra if not inside(e)]


def _check_peft_matching(model: nn.Module, plan: AdapterPlan) -> None:
    """PEFT matches ``modules_to_save`` by name suffix and drops targets inside them: make sure it adapts exactly the plan."""
    from peft.tuners.tuners_utils import check_target_module_exists

    keys = [n for n, _ in named_base_modules(model) if n]
    for m in plan.modules_to_save:
        extra = [k for k in keys if k.endswith(m) and k != m]
        if extra:
            raise FreezePolicyError(
                f"PEFT matches modules_to_save by name suffix, so {m!r} would also wrap {extra[:5]}; this model's "
                f"trainable module names are ambiguous for PEFT (train fewer modules, e.g. freeze='backbone')")
    config = plan.peft_config()
    matched = {k for k in keys if bool(check_target_module_exists(config, k))}
    if matched != set(plan.targets):
        raise FreezePolicyError(f"PEFT would adapt {sorted(matched ^ set(plan.targets))[:5]} differently from the "
                                "plan (a target lies inside a module to save)")


def resolve_adapter(policy, groups, plan, model: nn.Module) -> AdapterPlan:
    """Check ``policy.adapter`` against the model; raise FreezePolicyError (nothing changed) if it does not fit."""
    from . import batchnorm

    config = policy.adapter
    layers = adaptable_layers(model, groups)
    chosen = adapter_group_names(config, groups, plan.frozen_params, layers)
    targets = [n for n, g, why in layers if g in chosen and why is None]
    skipped = [(n, why) for n, g, why in layers if g in chosen and why is not None]
    all_params = {n for g in groups for n in g.param_names}
    trainable = all_params - plan.frozen_params
    bn = []
    if policy.train_bn:  # their statistics update: save the BatchNorm layers of frozen groups with the adapter
        group_of = groups.group_of()
        for name, m in batchnorm.stat_norms(model).items():
            own = [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]
            bufs = [f"{name}.{b}" for b, _ in m.named_buffers(recurse=False)]
            if (all(n in plan.frozen_params for n in own) if own
                    else any(set(groups[group_of[b]].param_names) <= plan.frozen_params for b in bufs if b in group_of)):
                bn.append(name)
    saved = modules_to_save(model, trainable, bn)
    result = AdapterPlan(config, tuple(chosen), tuple(targets), tuple(skipped), tuple(saved))
    _check_peft_matching(model, result)
    return result


def check_wrapped(model: nn.Module, plan: AdapterPlan) -> None:
    """The PEFT layers inside ``model`` must be exactly the ones ``plan`` asks for."""
    wrappers = peft_wrappers(model)
    modules = dict(model.named_modules())
    tuners = {n for n, k in wrappers.items() if k == "tuner"}
    saved = {n for n, k in wrappers.items() if k == "saved"}
    problems = []
    for what, have, want in (("adapted layers", tuners, set(plan.targets)),
                             ("modules_to_save", saved, set(plan.modules_to_save))):
        if have != want:
            problems.append(f"{what}: only in the model {sorted(have - want)[:5]}, only in the policy "
                            f"{sorted(want - have)[:5]}")
    kinds = {type(modules[n]).__module__.split(".")[2] for n in tuners if type(modules[n]).__module__.startswith("peft.tuners.")}
    if kinds - {plan.config.method}:
        problems.append(f"adapter method: the model has {sorted(kinds)}, the policy {plan.config.method!r}")
    if problems:
        raise FreezePolicyError("the model's PEFT adapter does not match the policy's adapter "
                                f"({plan.config.to_string()}): " + "; ".join(problems))


# =========================================================================== parameters per group

def adapter_params_by_group(model: nn.Module, groups, names: ModelNames | None = None
                            ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Adapter parameters and trained copies (real names) by the layer group of the base layer they belong to
    (``names``: the model's, if known)."""
    group_of = groups.group_of()
    module_group = {n.rpartition(".")[0]: g for n, g in group_of.items()}
    out: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in groups}
    for real, base, role, p in (names or ModelNames.of(model)).peft_parameters(model):
        group = group_of.get(base) if role == COPY else module_group.get(base) if role == ADAPTER else None
        if group is not None:
            out[group].append((real, p))
    return out


# =========================================================================== wrap, load, save

#: a convolution's geometry, which PEFT tuner layers do not forward to the layer they wrap
CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                   "padding_mode")


def expose_conv_geometry(model: nn.Module) -> int:
    """Copy each adapted convolution's geometry (stride, kernel_size, ...) onto its PEFT wrapper; returns how many.

    Some models read it from the layer at run time: MobileNet v1/v2 with ``tf_padding`` (the real
    MobileNetV2 checkpoints) compute TF "same" padding from ``conv.stride``, ``conv.kernel_size`` and
    ``conv.dilation`` and fail with AttributeError on a wrapped layer otherwise.
    """
    count = 0
    for name, kind in peft_wrappers(model).items():
        layer = model.get_submodule(name)
        base = layer.get_base_layer() if kind == "tuner" else None
        if isinstance(base, nn.Conv2d):
            for attr in CONV_ATTRIBUTES:
                if attr not in vars(layer) and not hasattr(type(layer), attr):
                    setattr(layer, attr, getattr(base, attr))
            count += 1
    return count


def add_adapter(model: nn.Module, policy=None):
    """Wrap ``model`` in a ``peft.PeftModel`` as ``policy.adapter`` says and apply the freeze policy to it.

    Everything is checked first (FreezePolicyError leaves the model untouched). The pretrained tensors
    are fingerprinted; :func:`hf_freeze.verify_frozen` checks them all, buffers included.
    """
    from peft import get_peft_model

    from .apply import apply_policy, remove_policy
    from .groups import layer_groups
    from .names import unwrap_model
    from .plan import resolve
    from .policy import FreezePolicy

    base = unwrap_model(model)
    policy = FreezePolicy.coerce(policy)
    if policy.adapter is None:
        raise FreezePolicyError(f"policy {policy.to_string()!r} has no adapter; give one, e.g. "
                                "FreezePolicy(adapter='lora,r=8') or the string 'freeze=backbone;adapter=lora'")
    if peft_wrappers(base):
        raise FreezePolicyError("the model already carries a PEFT adapter; pass it to apply_policy() with a matching "
                                "policy, or start from the plain model")
    groups = layer_groups(base)
    adapter_plan = resolve_adapter(policy, groups, resolve(policy, groups), base)
    remove_policy(base)  # a policy applied before starts over, as apply_policy does
    wrapped = get_peft_model(base, adapter_plan.peft_config())
    expose_conv_geometry(wrapped)
    apply_policy(wrapped, policy)
    return wrapped


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, is_trainable: bool = False):
    """Load an adapter folder saved by FreezeTrainer (adapter files + ``freeze_policy.json``) onto the base ``model``.

    Returns the ``peft.PeftModel`` with the freeze policy applied (frozen BatchNorm locked in inference
    mode, pretrained tensors fingerprinted). Plain ``PeftModel.from_pretrained`` gives the same model,
    except on MobileNet with ``tf_padding`` (see :func:`expose_conv_geometry`).
    """
    from peft import PeftModel

    from .apply import apply_policy
    from .groups import layer_groups
    from .names import unwrap_model
    from .plan import resolve
    from .policy import FreezePolicy

    policy = FreezePolicy.from_pretrained(folder)
    if policy.adapter is None:
        raise FreezePolicyError(f"{Path(folder) / 'freeze_policy.json'} describes no adapter ({policy.to_string()!r})")
    base = unwrap_model(model)
    groups = layer_groups(base)
    resolve_adapter(policy, groups, resolve(policy, groups), base)  # the folder fits this base model
    wrapped = PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
    expose_conv_geometry(wrapped)
    apply_policy(wrapped, policy)
    return wrapped


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save a wrapped model's adapter (``PeftModel.save_pretrained``) and its freeze policy into ``folder``."""
    from .state import require_state

    if not hasattr(model, "peft_config"):
        raise TypeError(f"save_adapter needs the peft.PeftModel (from hf_freeze.add_adapter), got {type(model).__name__}")
    policy = require_state(model).policy
    model.save_pretrained(str(folder))
    policy.save_pretrained(folder)
    return Path(folder)
