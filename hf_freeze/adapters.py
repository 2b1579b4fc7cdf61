"""PEFT adapters (LoRA, LoHa, LoKr) on the layer groups a freeze policy names, instead of unfreezing them.

    policy = FreezePolicy(adapter=AdapterConfig("lora", r=8, alpha=16, groups=["stage.2", "stage.3"]))
    model = hf_freeze.add_adapter(model, policy)          # a peft.PeftModel; the base stays bit-identical
    ... FreezeTrainer(model=model, ...)  (or FreezeTrainer(model=plain_model, freeze_policy=policy))
    hf_freeze.save_adapter(model, folder)                 # adapter files + freeze_policy.json (FreezeTrainer: save_model)
    model = hf_freeze.load_adapter(base_model, folder)    # same logits; .merge_and_unload() too

The config is :class:`~hf_freeze.adapter_config.AdapterConfig` (its string form is documented there);
:func:`~hf_freeze.adapter_plan.resolve_adapter` decides which layers get an adapter and which modules are
saved whole, before anything is changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ._compat import moved_names
from .adapter_plan import resolve_adapter
from .apply import apply_policy, remove_policy
from .errors import FreezePolicyError
from .folder import POLICY_FILE, write_policy
from .groups import layer_groups
from .heads import check_head, install_head
from .names import COPY, ModelNames, peft_wrappers, unwrap_model
from .plan import resolve
from .policy import FreezePolicy
from .state import require_state

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
    from peft import get_peft_model  # optional dependency: only adapters need it


    base = unwrap_model(model)
    policy = FreezePolicy.coerce(policy)
    if policy.adapter is None:
        raise FreezePolicyError(f"policy {policy.to_string()!r} has no adapter; give one, e.g. "
                                "FreezePolicy(adapter='lora,r=8') or the string 'freeze=backbone;adapter=lora'")
    if peft_wrappers(base):
        raise FreezePolicyError("the model already carries a PEFT adapter; pass it to apply_policy() with a matching "
                                "policy, or start from the plain model")
    check_head(base, policy.head)
    groups = layer_groups(base)
    adapter_plan = resolve_adapter(policy, groups, resolve(policy, groups), base)
    if install_head(base, policy.head):  # the head first: PEFT saves it whole (modules_to_save)
        groups = layer_groups(base)
        adapter_plan = resolve_adapter(policy, groups, resolve(policy, groups), base)
    remove_policy(base)  # a policy applied before starts over, as apply_policy does
    user_frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    wrapped = get_peft_model(base, adapter_plan.peft_config())
    for _, name, role, p in ModelNames.of(wrapped).peft_parameters(wrapped):
        if role == COPY and name in user_frozen:  # PEFT made the copy trainable: the user's requires_grad=False wins
            p.requires_grad_(False)
    expose_conv_geometry(wrapped)
    apply_policy(wrapped, policy)
    return wrapped


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, is_trainable: bool = False):
    """Load an adapter folder saved by FreezeTrainer (adapter files + ``freeze_policy.json``) onto the base ``model``.

    Returns the ``peft.PeftModel`` with the freeze policy applied (frozen BatchNorm locked in inference
    mode, pretrained tensors fingerprinted). Plain ``PeftModel.from_pretrained`` gives the same model,
    except on MobileNet with ``tf_padding`` (see :func:`expose_conv_geometry`).
    """
    from peft import PeftModel  # optional dependency: only adapters need it


    policy = FreezePolicy.from_pretrained(folder)
    if policy.adapter is None:
        raise FreezePolicyError(f"{Path(folder) / POLICY_FILE} describes no adapter ({policy.to_string()!r})")
    base = unwrap_model(model)
    check_head(base, policy.head)
    groups = layer_groups(base)
    resolve_adapter(policy, groups, resolve(policy, groups), base)  # the folder fits this base model
    install_head(base, policy.head)  # the head's weights come with the adapter (modules_to_save)
    wrapped = PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
    expose_conv_geometry(wrapped)
    apply_policy(wrapped, policy)
    return wrapped


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save a wrapped model's adapter (``PeftModel.save_pretrained``) and its freeze policy into ``folder``."""
    if not hasattr(model, "peft_config"):
        raise TypeError(f"save_adapter needs the peft.PeftModel (from hf_freeze.add_adapter), got {type(model).__name__}")
    policy = require_state(model).policy
    model.save_pretrained(str(folder))
    write_policy(folder, policy)
    return Path(folder)


__getattr__ = moved_names(__name__, {
    **dict.fromkeys(("AdapterConfig", "METHODS", "RESOLVED_FIELDS"), "adapter_config"),
    **dict.fromkeys(("AdapterPlan", "ADAPTABLE", "adapter_group_names", "skip_reason", "adaptable_layers",
                     "modules_to_save", "check_wrapped", "adapter_params_by_group"), "adapter_plan")})
