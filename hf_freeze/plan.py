"""``FreezePlan``: a :class:`~hf_freeze.policy.FreezePolicy` checked against one model's layer groups.

:func:`resolve` turns the policy's selectors and unfreeze events into concrete parameter and group names,
or raises :class:`FreezePolicyError` naming what does not fit (the model is never touched here). Pure
functions over names; the groups come from :func:`hf_freeze.layer_groups`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from ._fields import is_int, num
from .checks import FREEZE_KEYWORDS, group_hint
from .errors import FreezePolicyError
from .policy import FreezePolicy, Unfreeze

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class UnfreezeStep:
    """A resolved unfreeze event: concrete group names."""

    at_epoch: float | None
    at_step: int | None
    groups: tuple[str, ...]
    lr_scale: float

    def due(self, epoch: float, step: int) -> bool:
        if self.at_step is not None:
            return step >= self.at_step
        return epoch >= self.at_epoch - 1e-9

    @property
    def when(self) -> str:
        return f"epoch {num(self.at_epoch)}" if self.at_epoch is not None else f"step {self.at_step}"


@dataclass(frozen=True)
class Timing:
    """How the Trainer counts a run: optimizer steps per epoch, batches per epoch, gradient accumulation.

    With it the global step at which an epoch event fires is known (``Trainer`` sets ``state.epoch`` to
    ``epoch + batches_done / batches_per_epoch`` after each optimizer step).
    """

    steps_per_epoch: int
    batches_per_epoch: int
    accumulation: int = 1

    def fire_step(self, event: Unfreeze | UnfreezeStep) -> int:
        """The global step at which ``FreezeCallback`` finds ``event`` due (the next update trains its groups)."""
        if event.at_step is not None:
            return event.at_step
        whole = math.floor(event.at_epoch + 1e-9)
        frac = event.at_epoch - whole
        if frac <= 1e-9:
            return whole * self.steps_per_epoch
        k = math.ceil((frac - 1e-9) * self.batches_per_epoch / self.accumulation)
        return whole * self.steps_per_epoch + min(max(k, 1), self.steps_per_epoch)


@dataclass(frozen=True)
class FreezePlan:
    """A policy checked against one model's groups. ``events`` are in the order they fire.

    ``provisional``: the policy mixes step and epoch events whose order depends on the number of steps per epoch;
    ``events`` is one order that resolves, and training resolves them again once that number is known
    (``FreezeCallback`` before the optimizer is built, see :class:`Timing`).
    """

    group_names: tuple[str, ...]
    frozen_params: frozenset[str]
    events: tuple[UnfreezeStep, ...]
    depth_scale: dict[str, float]
    provisional: bool = False

    def event_for(self, group: str) -> UnfreezeStep | None:
        return next((e for e in self.events if group in e.groups), None)

    def initial_scale(self, group: str) -> float:
        event = self.event_for(group)
        return event.lr_scale if event else 1.0


def group_range(selector: str, names: list[str]) -> list[str]:
    lo, _, hi = selector.partition(":")
    lo, hi = lo.strip(), hi.strip()
    missing = [x for x in (lo, hi) if x not in names]
    if missing:
        raise FreezePolicyError(f"freeze range {selector!r}: unknown group(s) {missing}"
                                f"{group_hint(missing[0], names)}; groups are {names}")
    i, j = names.index(lo), names.index(hi)
    if i > j:
        raise FreezePolicyError(f"freeze range {selector!r} runs backwards; write it input-to-output: "
                                f"'{hi}:{lo}' (group order: {names})")
    return names[i:j + 1]


def select_params(selectors: list[str], groups) -> set[str]:
    """Parameter names picked by group names, ranges and globs; every selector must pick something."""
    names = [g.name for g in groups]
    members = {g.name: g.param_names for g in groups}
    all_params = [n for g in groups for n in g.param_names]
    chosen: set[str] = set()
    for raw in selectors:
        s = raw.strip()
        if s in members:
            chosen.update(members[s])
        elif ":" in s and not _GLOB_CHARS & set(s):
            for g in group_range(s, names):
                chosen.update(members[g])
        else:
            hits = [n for n in all_params if fnmatch.fnmatchcase(n, s)]
            if not hits:
                raise FreezePolicyError(
                    f"freeze selector {s!r} matches no group and no parameter{group_hint(s, names, FREEZE_KEYWORDS)}; "
                    f"groups are {names}; also valid: 'backbone' or 'none' (alone), N (the first N groups), a range "
                    f"such as '{names[0]}:{names[-2] if len(names) > 1 else names[0]}', or a parameter glob matching "
                    f"full names such as {all_params[0]!r} (e.g. '*.bn*' or '{all_params[0].split('.')[0]}.*')")
            chosen.update(hits)
    return chosen


#: above this many possible firing orders of interleaved step and epoch events, a policy is refused
MAX_ORDERS = 1000


def firing_orders(events: list[Unfreeze], timing: Timing | None = None) -> list[tuple[int, ...]]:
    """The orders (indices into ``events``) in which the events may fire, earliest first; same-step ties keep list order.

    With ``timing`` there is one. Without, step events keep their order and epoch events theirs (both are listed in
    time order), and a step event S certainly fires before an epoch event E when S < ceil(E) (an epoch has at
    least one step); every other interleaving depends on the number of steps per epoch and is listed.
    """
    index = range(len(events))
    if timing is not None:
        return [tuple(sorted(index, key=lambda i: (timing.fire_step(events[i]), i)))]
    steps = [i for i in index if events[i].at_step is not None]
    epochs = [i for i in index if events[i].at_epoch is not None]
    if not steps or not epochs:
        return [tuple(index)]
    orders: list[tuple[int, ...]] = []

    def merge(a: int, b: int, done: tuple[int, ...]) -> None:
        if len(orders) > MAX_ORDERS:
            return
        if a == len(steps) or b == len(epochs):
            orders.append(done + tuple(steps[a:]) + tuple(epochs[b:]))
            return
        s_event, e_event = events[steps[a]], events[epochs[b]]
        merge(a + 1, b, done + (steps[a],))
        if s_event.at_step >= math.ceil(e_event.at_epoch - 1e-9):  # the epoch event may come first
            merge(a, b + 1, done + (epochs[b],))

    merge(0, 0, ())
    if len(orders) > MAX_ORDERS:
        raise FreezePolicyError(f"the {len(steps)} step and {len(epochs)} epoch unfreeze events can fire in more than "
                                f"{MAX_ORDERS} orders depending on the steps per epoch; use one unit (all stepN or all "
                                "epochE)")
    return orders


def _resolve_events(events: list[Unfreeze], order: tuple[int, ...], frozen_groups: list[str],
                    names: list[str]) -> list[UnfreezeStep]:
    """Concrete groups of each event, taken in firing ``order``; the result is in that order too."""
    still_frozen = list(frozen_groups)
    out = []
    for i in order:
        u = events[i]
        if is_int(u.groups):
            if u.groups > len(still_frozen):
                raise FreezePolicyError(
                    f"unfreeze {u.to_string()!r}: asks for {u.groups} group(s) but only {len(still_frozen)} are "
                    f"still frozen at that point ({still_frozen})")
            chosen = still_frozen[len(still_frozen) - u.groups:]
        else:
            unknown = [g for g in u.groups if g not in names]
            if unknown:
                raise FreezePolicyError(f"unfreeze {u.to_string()!r}: unknown group(s) {unknown}"
                                        f"{group_hint(unknown[0], names)}; groups are {names}")
            not_frozen = [g for g in u.groups if g not in still_frozen]
            if not_frozen:
                raise FreezePolicyError(
                    f"unfreeze {u.to_string()!r}: group(s) {not_frozen} are not frozen at that point; "
                    f"frozen groups then: {still_frozen}")
            chosen = [g for g in names if g in u.groups]
        still_frozen = [g for g in still_frozen if g not in chosen]
        out.append(UnfreezeStep(u.at_epoch, u.at_step, tuple(chosen), float(u.lr_scale)))
    return out


def resolve(policy: FreezePolicy, groups, timing: Timing | None = None) -> FreezePlan:
    """Check ``policy`` against ``groups`` (from :func:`hf_freeze.layer_groups`); raise FreezePolicyError if it does not fit.

    Unfreeze events are resolved in the order they fire (an ``N``-group event takes the N still-frozen groups nearest
    the head at that moment). When step and epoch events are mixed and their order depends on the steps per epoch,
    ``timing`` gives it; without it every possible order is checked: the policy is refused when none resolves, and the
    plan is ``provisional`` when they differ.
    """
    names = [g.name for g in groups]
    f = policy.freeze
    if f == "backbone":
        frozen = {n for g in groups if g.name != "head" for n in g.param_names}
    elif f == "none":
        frozen = set()
    elif is_int(f):
        if f > len(groups):
            raise FreezePolicyError(f"freeze={f}: the model has only {len(groups)} groups {names}")
        frozen = {n for g in groups[:f] for n in g.param_names}
    else:
        frozen = select_params(f, groups)

    frozen_groups = [g.name for g in groups if frozen & set(g.param_names)]
    results, errors = [], []
    for order in firing_orders(policy.unfreeze, timing):
        try:
            results.append(tuple(_resolve_events(policy.unfreeze, order, frozen_groups, names)))
        except FreezePolicyError as e:
            errors.append(e)
    if not results:
        if len(errors) == 1:
            raise errors[0]
        raise FreezePolicyError(f"{errors[0]} (in every order these step and epoch events can fire in, depending on "
                                "the steps per epoch)")
    events = results[0]
    provisional = bool(errors) or len(set(results)) > 1

    all_params = {n for g in groups for n in g.param_names}
    if frozen >= all_params and not events:
        raise FreezePolicyError(f"freeze={f!r} freezes every parameter and nothing is ever unfrozen: "
                                "nothing would train; freeze fewer groups (e.g. 'backbone') or add an unfreeze event")
    decay = policy.layer_lr_decay or 1.0
    depth_scale = {g: decay ** (len(names) - 1 - i) for i, g in enumerate(names)}
    return FreezePlan(tuple(names), frozenset(frozen), events, depth_scale, provisional)
