"""Apply a freeze policy to a model, unfreeze groups later, verify preservation, remove it again.

All state lives in one :class:`FreezeState` attached to the (unwrapped) model, so re-applying,
unfreezing and removing need nothing but the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import batchnorm
from .errors import FreezePolicyError, FrozenWeightsChanged
from .fingerprint import Fingerprint
from .groups import LayerGroups, layer_groups, unwrap_model
from .policy import FreezePlan, FreezePolicy, resolve

STATE_ATTR = "_hf_freeze_state"


@dataclass
class FreezeState:
    policy: FreezePolicy
    plan: FreezePlan
    groups: LayerGroups
    original_requires_grad: dict[str, bool]
    frozen: set[str] = field(default_factory=set)
    locked_norms: set[str] = field(default_factory=set)
    fingerprint: Fingerprint = field(default_factory=Fingerprint)
    #: group name -> (when it was unfrozen, lr scale it was unfrozen with)
    unfrozen: dict[str, tuple[str, float]] = field(default_factory=dict)
    events_done: int = 0

    def group_frozen(self, group: str) -> bool:
        return bool(self.frozen & set(self.groups[group].param_names))

    def frozen_groups(self) -> list[str]:
        return [g.name for g in self.groups if self.group_frozen(g.name)]

    def group_lr_scale(self, group: str) -> float:
        """LR multiplier: depth decay x the scale it was (or will be) unfrozen with."""
        return self.plan.depth_scale[group] * self.unfrozen.get(group, ("", self.plan.initial_scale(group)))[1]


def get_state(model: nn.Module) -> FreezeState | None:
    return getattr(unwrap_model(model), STATE_ATTR, None)


def require_state(model: nn.Module) -> FreezeState:
    state = get_state(model)
    if state is None:
        raise RuntimeError("no freeze policy is applied to this model; call hf_freeze.apply_policy(model, policy) first")
    return state


def apply_policy(model: nn.Module, policy: FreezePolicy | dict | str | None = None):
    """Freeze ``model`` according to ``policy``; return a :class:`~hf_freeze.report.FreezeReport`.

    Everything is validated first: a bad policy raises FreezePolicyError and the model is untouched.
    Re-applying replaces the previous policy (it starts again from the pre-policy state).
    """
    from .report import freeze_report

    model = unwrap_model(model)
    policy = FreezePolicy.coerce(policy)
    groups = layer_groups(model)
    plan = resolve(policy, groups)
    remove_policy(model)  # re-applying starts from the pre-policy state
    state = FreezeState(policy, plan, groups,
                        original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    setattr(model, STATE_ATTR, state)
    set_frozen(model, plan.frozen_params)
    return freeze_report(model)


def set_frozen(model: nn.Module, frozen: set[str] | frozenset[str], *, refingerprint: bool = True) -> None:
    """Make exactly ``frozen`` non-trainable and lock the norms that belong to it.

    ``refingerprint``: take a new fingerprint of the frozen tensors (on apply); otherwise the existing
    one only forgets the tensors that are no longer frozen, so an earlier violation is not hidden.
    """
    model = unwrap_model(model)
    state = require_state(model)
    state.frozen = set(frozen)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in state.frozen)
    tracked = _sync_norms(model, state)
    if refingerprint:
        state.fingerprint = Fingerprint.take(model, sorted(tracked))
    else:
        state.fingerprint.drop(set(state.fingerprint.digests) - tracked)


def _sync_norms(model: nn.Module, state: FreezeState) -> set[str]:
    """Lock/unlock running-stat norms to match ``state.frozen``; return the tensor names to fingerprint."""
    group_of = state.groups.group_of()
    fully_frozen = {g.name for g in state.groups if set(g.param_names) <= state.frozen}
    tracked = set(state.frozen) | {b for g in fully_frozen for b in state.groups[g].buffer_names}
    for name, module in batchnorm.stat_norms(model).items():
        prefix = f"{name}." if name else ""
        own = [prefix + p for p, _ in module.named_parameters(recurse=False)]
        buffers = {prefix + b for b, _ in module.named_buffers(recurse=False)}
        frozen_here = all(n in state.frozen for n in own) if own else any(group_of.get(b) in fully_frozen for b in buffers)
        if frozen_here and not state.policy.train_bn:
            batchnorm.lock_eval(module)
            tracked |= buffers
        else:
            if batchnorm.is_locked(module):
                batchnorm.unlock(module, model.training)
            tracked -= buffers
    state.locked_norms = {n for n, m in batchnorm.stat_norms(model).items() if batchnorm.is_locked(m)}
    return tracked


def unfreeze_groups(model: nn.Module, group_names, *, when: str = "manual", lr_scale: float = 1.0) -> list[str]:
    """Make ``group_names`` trainable (BatchNorm back to normal mode); returns the parameter names unfrozen."""
    model = unwrap_model(model)
    state = require_state(model)
    unknown = [g for g in group_names if g not in state.groups.names]
    if unknown:
        raise FreezePolicyError(f"unknown group(s) {unknown}; groups are {state.groups.names}")
    names = {n for g in group_names for n in state.groups[g].param_names} & state.frozen
    for g in group_names:
        state.unfrozen.setdefault(g, (when, lr_scale))
    set_frozen(model, state.frozen - names, refingerprint=False)
    return sorted(names)


def remove_policy(model: nn.Module) -> None:
    """Undo :func:`apply_policy`: original ``requires_grad`` flags and normal BatchNorm behaviour."""
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        return
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, True))
    for module in batchnorm.stat_norms(model).values():
        if batchnorm.is_locked(module):
            batchnorm.unlock(module, model.training)
    delattr(model, STATE_ATTR)


def changed_frozen_tensors(model: nn.Module) -> list[str]:
    return require_state(model).fingerprint.changed(unwrap_model(model))


def verify_frozen(model: nn.Module, where: str = "") -> None:
    """Raise :class:`FrozenWeightsChanged` naming every frozen tensor that is no longer bit-identical."""
    changed = changed_frozen_tensors(model)
    if changed:
        raise FrozenWeightsChanged(changed, where)
