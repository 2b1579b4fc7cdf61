"""``AdapterPlan``: an :class:`~hf_freeze.adapter_config.AdapterConfig` checked against one model.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import batchnorm
from ._fields import is_int
from .adapter_config import AdapterConfig
from .checks import group_hint
from .errors import FreezePolicyError
from .groups import HEAD
from .names import ADAPTER, COPY, ModelNames, peft_wrappers
from .plan import group_range

ADAPTABLE = (nn.Linear, nn.Conv2d)


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
    adaptable = {g for _, g, why in layers if why is None}
    names = groups.names
    backbone = [n for n in names if n != HEAD]
    g = config.groups
    if g == "backbone":
        chosen = [n for n in backbone if n in adaptable]
    elif is_int(g):
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


def adaptable_layers(model: nn.Module, groups, names: ModelNames | None = None) -> list[tuple[str, str, str | None]]:
    """``(module name, group, reason it gets no adapter or None)`` for every nn.Linear/nn.Conv2d outside the head."""
    group_of = groups.group_of()
    modules = dict((names or ModelNames.of(model)).base_modules(model))
    out = []
    for name, module in modules.items():
        group = group_of.get(f"{name}.weight")
        if isinstance(module, ADAPTABLE) and group not in (None, HEAD):
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            out.append((name, group, skip_reason(module, parent)))
    return out


def modules_to_save(model: nn.Module, trainable: set[str], extra: list[str], names: ModelNames | None = None
                    ) -> list[str]:
    """The modules owning ``trainable`` parameters (outermost first, none inside another), then ``extra`` ones.

    Owners rather than whole containers (``classifier.1``, not ``classifier``): PEFT's LoHa/LoKr
    ``merge_and_unload`` needs a saved module to have a ``weight``. Raises FreezePolicyError when an
    owner also holds frozen parameters (PEFT saves whole modules).
    """
    names = names or ModelNames.of(model)
    params = [n for n, _ in names.base_parameters(model)]
    owners = {n.rpartition(".")[0] for n in trainable}
    chosen: list[str] = []

    def inside(name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in chosen)

    if "" in owners:
        raise FreezePolicyError(f"trainable parameter(s) {sorted(n for n in trainable if '.' not in n)} sit directly on "
                                "the model, which PEFT cannot save as a module copy; freeze them")
    for name, _ in names.base_modules(model):
        if name in owners and not inside(name):
            frozen = [n for n in params if n.startswith(f"{name}.") and n not in trainable]
            if frozen:
                raise FreezePolicyError(
                    f"module {name!r} holds parameters this policy trains and frozen ones ({frozen[0]!r}); with an "
                    "adapter, trainable parameters are saved as whole-module copies (peft modules_to_save): freeze "
                    "or train whole modules (group names, not parameter globs)")
            chosen.append(name)
    return chosen + [e for e in extra if not inside(e)]


def _check_peft_matching(names: ModelNames, plan: AdapterPlan) -> None:
    """PEFT matches ``modules_to_save`` by name suffix and drops targets inside them: make sure it adapts exactly the plan."""
    from peft.tuners.tuners_utils import check_target_module_exists  # optional dependency: only adapters need it

    keys = [n for n in names.modules.values() if n]
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
    config = policy.adapter
    names = ModelNames.of(model)
    layers = adaptable_layers(model, groups, names)
    chosen = adapter_group_names(config, groups, plan.frozen_params, layers)
    targets = [n for n, g, why in layers if g in chosen and why is None]
    skipped = [(n, why) for n, g, why in layers if g in chosen and why is not None]
    all_params = {n for g in groups for n in g.param_names}
    trainable = all_params - plan.frozen_params
    bn = []
    if policy.train_bn:  # their statistics update: save the BatchNorm layers of frozen groups with the adapter
        group_of = groups.group_of()
        for name, m in batchnorm.stat_norms(model, names).items():
            own = [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]
            bufs = [f"{name}.{b}" for b, _ in m.named_buffers(recurse=False)]
            if (all(n in plan.frozen_params for n in own) if own
                    else any(set(groups[group_of[b]].param_names) <= plan.frozen_params for b in bufs if b in group_of)):
                bn.append(name)
    saved = modules_to_save(model, trainable, bn, names)
    result = AdapterPlan(config, tuple(chosen), tuple(targets), tuple(skipped), tuple(saved))
    _check_peft_matching(names, result)
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
