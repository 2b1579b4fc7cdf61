"""Apply a freeze policy to a model, unfreeze groups later, verify preservation, remove it again.

All state lives in one :class:`FreezeState` attached to the (unwrapped) model, so re-applying,
unfreezing and removing need nothing but the model.

A model wrapped by PEFT (``hf_freeze.add_adapter``) is handled under its unwrapped names: with an
adapter, every pretrained tensor stays frozen and fingerprinted, buffers included; adapter weights
and the trained copies of ``modules_to_save`` train.
"""

from __future__ import annotations

from torch import nn

from . import batchnorm
from ._compat import moved_names
from .adapter_plan import check_wrapped, resolve_adapter
from .errors import FreezePolicyError, FrozenWeightsChanged
from .fingerprint import Fingerprint, base_state_dict, digests
from .groups import LayerGroups, layer_groups, tied_aliases, with_aliases
from .heads import check_head, install_head, installed_head
from .names import ADAPTER, COPY, ModelNames, peft_wrappers, unwrap_model
from .plan import FreezePlan, resolve
from .policy import FreezePolicy
from .report import freeze_report
from .state import FreezeState, attach, detach, get_state, require_state


def apply_policy(model: nn.Module, policy: FreezePolicy | dict | str | None = None):
    """Freeze ``model`` according to ``policy``; return a :class:`~hf_freeze.report.FreezeReport`.

    Everything is validated first: a bad policy raises FreezePolicyError and the model is untouched.
    Re-applying replaces the previous policy (it starts again from the pre-policy state). A parameter the user
    froze by hand (``requires_grad=False`` before the policy) stays frozen, even in a group the policy trains or
    unfreezes: it is fingerprinted like any frozen tensor, the report counts it under ``user_frozen``, and
    :func:`remove_policy` leaves it as the user set it.
    """
    model = unwrap_model(model)
    policy = FreezePolicy.coerce(policy)
    _check_head(model, policy)
    groups = layer_groups(model)
    plan = resolve(policy, groups)
    names = ModelNames.of(model)
    _check_quantized(names.base_parameters(model), groups, plan)
    _check_head_trains(policy, groups, plan)
    adapter = _check_adapter(model, policy, groups, plan)
    if adapter is None:
        _check_tied(model, policy, groups, plan)
    remove_policy(model)  # re-applying starts from the pre-policy state
    if install_head(model, policy.head):  # the new layers are the head group from here on
        groups = layer_groups(model)
        plan = resolve(policy, groups)
        names = ModelNames.of(model)
    user_frozen = _user_frozen(model, names, adapter is not None)
    state = FreezeState(policy, plan, groups,
                        original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
                        adapter=adapter, user_frozen=user_frozen, names=names)
    attach(model, state)
    set_frozen(model, plan.frozen_params)
    state.applied_fingerprint = Fingerprint(dict(state.fingerprint.digests))
    return freeze_report(model)


def _check_head(model: nn.Module, policy: FreezePolicy) -> None:
    """A head must fit the model (:func:`hf_freeze.heads.check_head`); a model wrapped by PEFT must carry it already
    (PEFT saves the head whole: it has to be there before wrapping, which :func:`hf_freeze.add_adapter` does)."""
    check_head(model, policy.head)
    if policy.head is not None and peft_wrappers(model) and installed_head(model) != policy.head:
        raise FreezePolicyError(f"policy {policy.to_string()!r} puts a head on a model already wrapped by PEFT; "
                                "install the head before wrapping: hf_freeze.add_adapter(model, policy) does both")


def _check_head_trains(policy: FreezePolicy, groups: LayerGroups, plan: FreezePlan) -> None:
    """A new head starts from random weights: it always trains."""
    if policy.head is None or "head" not in groups.names:
        return
    frozen = set(groups["head"].param_names) & plan.frozen_params
    if frozen:
        raise FreezePolicyError(f"policy {policy.to_string()!r} freezes the head ({sorted(frozen)[:3]}), but head="
                                f"{policy.head.to_string()!r} is a new head trained from random weights; leave the "
                                "'head' group out of freeze=")


def _user_frozen(model: nn.Module, names: ModelNames, adapter: bool) -> set[str]:
    """Base names of the parameters the user froze by hand (``requires_grad=False`` before the policy).

    With an adapter PEFT has frozen every pretrained parameter itself (all stay frozen anyway) and made the trained
    copies (``modules_to_save``) trainable along with the adapter weights: a copy frozen while the adapter trains was
    frozen by the user (:func:`hf_freeze.add_adapter` carries a flag set before wrapping over to the copy).
    """
    if not adapter:
        return {n for n, p in names.base_parameters(model) if not p.requires_grad}
    peft = names.peft_parameters(model)
    if not any(p.requires_grad for _, _, role, p in peft if role == ADAPTER):
        return set()  # loaded for inference (is_trainable=False): PEFT froze everything
    return {base for _, base, role, p in peft if role == COPY and not p.requires_grad}


QUANTIZED_PARAM_CLASSES = ("Params4bit", "Int8Params")  # bitsandbytes: quantized even with a float storage dtype


def cannot_train(p) -> bool:
    """Integer / quantized parameters: ``requires_grad_(True)`` fails on them (or would train quantized codes)."""
    return not (p.is_floating_point() or p.is_complex()) or type(p).__name__ in QUANTIZED_PARAM_CLASSES


def _check_quantized(params: list[tuple[str, nn.Parameter]], groups: LayerGroups, plan: FreezePlan) -> None:
    """Quantized parameters (of the pretrained ``params``) may be frozen, never trained: refuse a plan that trains
    or unfreezes their group."""
    stuck = {n for n, p in params if cannot_train(p)}
    if not stuck:
        return
    trained = {n for g in groups for n in g.param_names} - plan.frozen_params
    later = {n: e for e in plan.events for g in e.groups for n in groups[g].param_names}
    bad = sorted(stuck & (trained | set(later)))
    if bad:
        group_of = groups.group_of()
        names = sorted({group_of[n] for n in bad})
        when = sorted({later[n].when for n in bad if n in later})
        raise FreezePolicyError(
            f"group(s) {names} hold quantized / integer parameters that cannot train ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; dtype {dict(params)[bad[0]].dtype}), but the policy "
            f"{'unfreezes them (' + ', '.join(when) + ')' if when else 'trains them'}. Keep those groups frozen "
            "(frozen quantized weights are fine: they are verified like any other), or train an adapter on them "
            "(FreezePolicy(adapter=...)).")


def _treatment(plan: FreezePlan, name: str, group: str) -> str:
    if name not in plan.frozen_params:
        return "trained"
    event = plan.event_for(group)
    return f"frozen until {event.when}" if event else "frozen"


def _check_tied(model: nn.Module, policy: FreezePolicy, groups: LayerGroups, plan: FreezePlan) -> None:
    """A parameter tied (shared) between modules the policy treats differently (one trains, one stays frozen, or they
    unfreeze at different times) cannot keep the promise: ``named_parameters`` lists it once, under its first name, so
    it would train with that name's group and the frozen module would change. Refuse such a policy.

    Each alias name is placed where it would be grouped if it were not shared (:func:`~hf_freeze.groups.alias_group`)
    and the policy is resolved again with it there, so group selectors, ranges and globs all see it."""
    aliases = tied_aliases(model)
    state = get_state(model)
    original = state.original_requires_grad if state is not None else {}
    params = dict(model.named_parameters())
    aliases = {n: rest for n, rest in aliases.items() if original.get(n, params[n].requires_grad)}  # not user-frozen
    if not aliases:
        return
    placed = with_aliases(groups, aliases)
    full = resolve(policy, placed)
    group_of = {n: g.name for g in placed for n in g.param_names}
    for first, rest in aliases.items():
        seen = {n: (group_of.get(n), _treatment(full, n, group_of.get(n, ""))) for n in (first, *rest) if n in group_of}
        if len({t for _, t in seen.values()}) > 1:
            shown = "; ".join(f"{n} (group {g}: {t})" for n, (g, t) in seen.items())
            both = sorted({g for g, _ in seen.values()})
            raise FreezePolicyError(
                f"one parameter is tied (shared) between modules the policy treats differently: {shown}. It is one "
                f"tensor, so training it through one name changes the frozen other. Freeze (or unfreeze) the groups "
                f"{both} together, or untie the weights (give each module its own copy) before applying the policy.")


def _check_adapter(model: nn.Module, policy: FreezePolicy, groups: LayerGroups, plan: FreezePlan):
    """The resolved adapter plan (None without an adapter); the model must carry exactly that PEFT adapter."""
    wrapped = bool(peft_wrappers(model))
    if policy.adapter is None:
        if wrapped:
            raise FreezePolicyError("the model carries a PEFT adapter but the policy has none; give the policy the "
                                    "adapter (FreezePolicy(adapter=...)), or apply the policy to the model before "
                                    "wrapping it")
        return None
    adapter = resolve_adapter(policy, groups, plan, model)
    if not wrapped:
        raise FreezePolicyError(f"policy {policy.to_string()!r} has an adapter: wrap the model with "
                                "hf_freeze.add_adapter(model, policy) (it returns the peft.PeftModel), or use "
                                "FreezeTrainer(freeze_policy=...), which does that")
    check_wrapped(model, adapter)
    return adapter


def set_frozen(model: nn.Module, frozen: set[str] | frozenset[str], *, refingerprint: bool = True) -> None:
    """Make exactly ``frozen`` (plus the parameters the user froze) non-trainable and lock the norms that belong to it.

    ``refingerprint``: take a new fingerprint of the frozen tensors (on apply); otherwise the existing
    one only forgets the tensors that are no longer frozen, so an earlier violation is not hidden, and a tensor
    frozen again (:func:`rewind_events`) gets back the digest it had when the policy was applied.
    With an adapter every pretrained tensor is frozen and tracked (what trains is adapter weights and
    the copies of the trainable modules); copies of frozen tensors (BatchNorm saved for its
    statistics under ``train_bn``) keep their weights frozen.
    """
    model = unwrap_model(model)
    state = require_state(model)
    names = state.names_of(model)
    state.frozen = set(frozen) | state.user_frozen
    for n, p in names.base_parameters(model):
        p.requires_grad_(state.adapter is None and n not in state.frozen)
    for _, base, role, p in names.peft_parameters(model):
        if role == COPY and base in state.frozen:
            p.requires_grad_(False)
    tracked = _sync_norms(model, state, names)
    tensors = names.base_tensors(model) if refingerprint or state.adapter is not None else {}
    if state.adapter is not None:
        tracked = set(tensors)
    if refingerprint:
        state.fingerprint = Fingerprint(digests({n: tensors[n] for n in sorted(tracked)}))
    else:
        state.fingerprint.drop(set(state.fingerprint.digests) - tracked)
        applied = state.applied_fingerprint.digests
        state.fingerprint.digests.update({n: applied[n] for n in tracked - set(state.fingerprint.digests) if n in applied})


def norm_locked(state: FreezeState, frozen_here: bool, unfrozen_here: bool) -> bool:
    """Does a running-stat norm stay in inference mode (statistics kept, fingerprinted)?

    ``train_bn``: never (its statistics update while its group is frozen and after it is unfrozen). Otherwise:
    while its weights are frozen, and after a scheduled unfreeze unless ``unfreeze_bn``. A norm of a group that
    trains from the start uses batch statistics as in plain training.
    """
    if state.policy.train_bn:
        return False
    return frozen_here or (unfrozen_here and not state.policy.unfreeze_bn)


def _sync_norms(model: nn.Module, state: FreezeState, names: ModelNames) -> set[str]:
    """Lock/unlock running-stat norms to match ``state.frozen``; return the tensor names to fingerprint."""
    group_of = state.groups.group_of()
    fully_frozen = {g.name for g in state.groups if set(g.param_names) <= state.frozen}
    tracked = set(state.frozen) | {b for g in fully_frozen for b in state.groups[g].buffer_names}
    norms = batchnorm.stat_norms(model, names)
    for name, module in norms.items():
        prefix = f"{name}." if name else ""
        own = [prefix + p for p, _ in module.named_parameters(recurse=False)]
        buffers = {prefix + b for b, _ in module.named_buffers(recurse=False)}
        frozen_here = all(n in state.frozen for n in own) if own else any(group_of.get(b) in fully_frozen for b in buffers)
        unfrozen_here = any(group_of.get(b) in state.unfrozen for b in buffers)
        if norm_locked(state, frozen_here, unfrozen_here):
            batchnorm.lock_eval(module)  # frozen, or unfrozen with its statistics kept: inference mode
            tracked |= buffers
        else:
            if batchnorm.is_locked(module):
                batchnorm.unlock(module, model.training)
            tracked -= buffers
    state.locked_norms = {n for n, m in norms.items() if batchnorm.is_locked(m)}
    return tracked


def unfreeze_groups(model: nn.Module, group_names, *, when: str = "manual", lr_scale: float = 1.0) -> list[str]:
    """Make ``group_names`` trainable; returns the parameter names unfrozen.

    Their BatchNorm layers stay in inference mode (statistics kept, still verified) unless the policy
    sets ``unfreeze_bn`` or ``train_bn``; their affine weights train either way. Parameters the user froze
    by hand stay frozen.
    """
    model = unwrap_model(model)
    state = require_state(model)
    if state.adapter is not None:
        raise FreezePolicyError(f"cannot unfreeze {list(group_names)}: policy {state.policy.to_string()!r} trains an "
                                "adapter and keeps every pretrained tensor frozen")
    unknown = [g for g in group_names if g not in state.groups.names]
    if unknown:
        raise FreezePolicyError(f"unknown group(s) {unknown}; groups are {state.groups.names}")
    group_of = state.groups.group_of()
    stuck = [n for n, p in state.names_of(model).base_parameters(model)
             if cannot_train(p) and group_of.get(n) in group_names]
    if stuck:
        raise FreezePolicyError(f"cannot unfreeze {list(group_names)}: they hold quantized / integer parameters that "
                                f"cannot train ({', '.join(stuck[:3])}); keep them frozen or train an adapter on them")
    names = {n for g in group_names for n in state.groups[g].param_names} & state.frozen - state.user_frozen
    for g in group_names:
        state.unfrozen.setdefault(g, (when, lr_scale))
    set_frozen(model, state.frozen - names, refingerprint=False)
    return sorted(names)


def rewind_events(model: nn.Module, fired: int) -> list[str]:
    """Make the policy state describe weights saved when only its first ``fired`` unfreeze events had fired.

    The groups of the later events are frozen again (BatchNorm locked as before) and their tensors get back the
    fingerprints taken when the policy was applied, so :func:`verify_frozen` proves those weights never trained.
    Used when the Trainer loads the best checkpoint at the end (``load_best_model_at_end``). Returns the groups.
    """
    model = unwrap_model(model)
    state = require_state(model)
    later = state.plan.events[fired:state.events_done]
    groups = [g for e in later for g in e.groups]
    if not groups:
        return []
    for g in groups:
        state.unfrozen.pop(g, None)
    state.events_done = fired
    names = {n for g in groups for n in state.groups[g].param_names}
    set_frozen(model, state.frozen | names, refingerprint=False)
    return groups


def restart_policy(model: nn.Module) -> None:
    """Put the policy state back to where :func:`apply_policy` left it: no event fired, nothing unfrozen, the frozen
    tensors expected bit-identical to the weights the policy was applied to (their fingerprint of then, not of now).

    Used when a run resumes from a checkpoint on the model of an earlier run: the checkpoint then brings the
    weights, and its events fire again as due (a fresh process applying the policy to the base model is the same).
    """
    model = unwrap_model(model)
    state = require_state(model)
    state.plan = resolve(state.policy, state.groups)  # timing-dependent orders are resolved again by the run
    state.unfrozen.clear()
    state.events_done = 0
    set_frozen(model, state.plan.frozen_params, refingerprint=False)


def adopt_fingerprint(model: nn.Module, recorded: Fingerprint, where: str = "") -> None:
    """``model`` holds the weights of a checkpoint that recorded ``recorded`` (its frozen tensors' fingerprint when it
    was saved): verify the tensors frozen now against it (:class:`FrozenWeightsChanged` naming those that differ), then
    take it as their reference, also as the digests of when the policy was applied (they were frozen since then).

    Used when a run resumes (after the load, before any step): the run is verified against the checkpoint's run, not
    against the weights this model object held when the policy was last applied to it (an earlier run may have trained
    them). A record of another fingerprint scheme is ignored: the fingerprint in memory stays the reference.
    """
    model = unwrap_model(model)
    state = require_state(model)
    if recorded.scheme != state.fingerprint.scheme:
        return
    check = Fingerprint({n: d for n, d in recorded.digests.items() if n in state.fingerprint.digests}, recorded.scheme)
    changed = check.changed(model)
    if changed:
        raise FrozenWeightsChanged(changed, where)
    state.fingerprint.digests.update(check.digests)
    state.applied_fingerprint.digests.update(recorded.digests)


def remove_policy(model: nn.Module) -> None:
    """Undo :func:`apply_policy`: original ``requires_grad`` flags and normal BatchNorm behaviour.

    A PEFT adapter stays in place (``peft_model.unload()`` removes it)."""
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        return
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, True))
    for module in batchnorm.stat_norms(model, state.names_of(model)).values():
        if batchnorm.is_locked(module):
            batchnorm.unlock(module, model.training)
    detach(model)  # the state, and the FreezeCallback's save_pretrained that also writes freeze_policy.json


def changed_frozen_tensors(model: nn.Module, state_dict: dict | None = None, *, collective: bool = True) -> list[str]:
    """Frozen tensors no longer bit-identical to their fingerprint (see :func:`verify_frozen`).

    ``collective=False``: called on one rank alone; a sharded model then reports its last collective check.
    """
    fingerprint = require_state(model).fingerprint
    model = unwrap_model(model)
    if state_dict is None:
        return fingerprint.changed(model) if collective else fingerprint.changed_local(model)
    return fingerprint.changed_in(base_state_dict(state_dict, model), model)


def verify_frozen(model: nn.Module, where: str = "", *, state_dict: dict | None = None) -> None:
    """Raise :class:`FrozenWeightsChanged` naming every frozen tensor that is no longer bit-identical.

    On a sharded (FSDP2) model this is a collective: call it on every rank; every rank raises the same error.
    ``state_dict``: full tensors already gathered to this rank (what ``Trainer.save_model`` passes to ``_save`` on
    rank 0): they are checked instead of the model's, with no collective. Frozen tensors on the meta device are
    refused (FreezePolicyError): there is nothing to verify.
    """
    changed = changed_frozen_tensors(model, state_dict)
    if changed:
        raise FrozenWeightsChanged(changed, where)


__getattr__ = moved_names(__name__, {"STATE_ATTR": "state"})
