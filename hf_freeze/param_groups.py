"""Optimizer parameter groups that follow a freeze policy (in the spirit of timm's ``optim/_param_groups.py``).

One group per (layer group, decay / no decay); each carries ``lr = base_lr x scale`` where the scale is
the layer-decay factor times the ``lr_scale`` the group is (or will be) unfrozen with. Every tensor that
will ever train is included from the start — frozen ones simply have no gradient yet — so unfreezing
needs no ``add_param_group`` and a resumed run has the same optimizer layout. With a PEFT adapter the
groups hold the adapter weights and trained copies of each layer group.
"""

from __future__ import annotations

from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from .adapter_plan import adapter_params_by_group

#: ``Trainer.get_decay_parameter_names`` (transformers 5.24): no decay on these names and inside ``nn.LayerNorm``
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
NO_DECAY_TYPES = (nn.LayerNorm,)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names that get weight decay by the Trainer's default rule: not biases, not LayerNorm/RMSNorm; BatchNorm and
    GroupNorm weights do get it, as in a plain ``Trainer``. ``FreezeTrainer`` asks its own
    ``get_decay_parameter_names`` instead (a subclass may override it)."""
    return set(get_parameter_names(model, list(NO_DECAY_TYPES), NO_DECAY_PATTERNS))


def ever_trainable(state) -> set[str]:
    """Parameters trainable now or unfrozen by a scheduled event (never those the user froze by hand)."""
    later = {n for e in state.plan.events[state.events_done:] for g in e.groups for n in state.groups[g].param_names}
    all_names = {n for g in state.groups for n in g.param_names}
    return (all_names - state.frozen) | (later - state.user_frozen)


def freeze_param_groups(model: nn.Module, state, base_lr: float, weight_decay: float,
                        decay: set[str] | None = None) -> list[dict]:
    """Parameter groups for ``torch.optim`` built from the model's :class:`~hf_freeze.apply.FreezeState`.

    ``decay``: the parameter names that get weight decay (``Trainer.get_decay_parameter_names``; default
    :func:`decay_parameter_names`). Head first: the Trainer logs the first group's learning rate, which is then the
    base schedule.
    """
    params = dict(model.named_parameters())
    decay = decay_parameter_names(model) if decay is None else set(decay)
    members = _members(model, state)
    groups = []
    for g in reversed(state.groups):
        scale = state.group_lr_scale(g.name)
        for with_decay in (True, False):
            names = [n for n in members[g.name] if (n in decay) == with_decay]
            if names:
                groups.append({"params": [params[n] for n in names], "lr": base_lr * scale, "lr_scale": scale,
                               "weight_decay": weight_decay if with_decay else 0.0,
                               "name": f"{g.name}/{'decay' if with_decay else 'no_decay'}"})
    return groups


def _members(model: nn.Module, state) -> dict[str, list[str]]:
    """Per layer group, the names of the parameters that train now or later (adapter weights, with an adapter)."""
    if state.adapter is not None:
        by_group = adapter_params_by_group(model, state.groups, state.names_of(model))
        return {g: [n for n, p in ps if p.requires_grad] for g, ps in by_group.items()}
    keep = ever_trainable(state)
    return {g.name: [n for n in g.param_names if n in keep] for g in state.groups}
