"""What a freeze policy leaves on a model: one :class:`FreezeState`, and a ``save_pretrained`` that saves the policy too.

Both are instance attributes of the (unwrapped) classifier, like the BatchNorm lock: they survive
``copy.deepcopy``/pickle, and :func:`detach` (called by :func:`hf_freeze.remove_policy`) removes them.
The state is created by :func:`hf_freeze.apply_policy` and changed by the functions of :mod:`hf_freeze.apply`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .fingerprint import Fingerprint
from .folder import write_policy
from .names import ModelNames, unwrap_model

if TYPE_CHECKING:  # annotations only
    from .adapter_plan import AdapterPlan
    from .groups import LayerGroups
    from .plan import FreezePlan
    from .policy import FreezePolicy

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
    #: the resolved PEFT adapter when the policy has one
    adapter: AdapterPlan | None = None
    #: parameters the user had frozen (``requires_grad=False``) before the policy: they stay frozen, events included
    user_frozen: set[str] = field(default_factory=set)
    #: the fingerprint taken when the policy was applied (before any unfreeze)
    applied_fingerprint: Fingerprint = field(default_factory=Fingerprint)
    #: the model's names (base names, PEFT roles), taken when the policy was applied; see :meth:`names_of`
    names: ModelNames | None = None

    def names_of(self, model: nn.Module) -> ModelNames:
        """The names of ``model``: the ones kept here, taken again if a PEFT wrapper was added or removed since."""
        if self.names is None or not self.names.fits(model):
            self.names = ModelNames.of(model)
        return self.names

    def trainable_below_head(self) -> list[str]:
        """Groups below the head with any trainable parameter (empty: a pure head-only phase)."""
        return [g.name for g in self.groups if g.name != "head" and not set(g.param_names) <= self.frozen]

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


def attach(model: nn.Module, state: FreezeState) -> None:
    setattr(unwrap_model(model), STATE_ATTR, state)


def detach(model: nn.Module) -> None:
    """Remove the state and every policy-saving ``save_pretrained`` (:func:`save_policy_with`) from ``model``."""
    model = unwrap_model(model)
    for module in model.modules():
        if saves_policy(module):
            del module.__dict__["save_pretrained"]
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


# --------------------------------------------------------------------------- save_pretrained carries the policy
def _save_pretrained_with_policy(model, save_directory, *args, **kwargs):
    """``save_pretrained`` of the model's class, then the applied policy's ``freeze_policy.json`` beside it."""
    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    state = get_state(model)
    if state is not None and kwargs.get("is_main_process", True):
        write_policy(save_directory, state.policy)
    return out


def save_policy_with(model) -> None:
    """Make ``model.save_pretrained`` (what ``Trainer.save_model`` calls) write ``freeze_policy.json`` too."""
    if callable(getattr(type(model), "save_pretrained", None)) and not saves_policy(model):
        model.__dict__["save_pretrained"] = functools.partial(_save_pretrained_with_policy, model)


def saves_policy(model) -> bool:
    fn = model.__dict__.get("save_pretrained")
    return isinstance(fn, functools.partial) and fn.func is _save_pretrained_with_policy
