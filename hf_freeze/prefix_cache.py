"""Frozen-prefix cache: while the groups nearest the input are frozen, run them once per example.

The linear-probe cache (:mod:`hf_freeze.feature_cache`) covers head-only phases. When the early groups are
frozen and the later ones train (``freeze=stem:stage.11``), every epoch still recomputes the frozen
*prefix*. ``PrefixCacheTrainerMixin`` (part of ``FreezeTrainer``) computes the output of the last frozen
module once per example and trains the rest of the model on it: training batches become example indices,
and the model's own forward runs through the Trainer's ``compute_loss`` with the prefix's modules replaced
by lookups.

**Where the prefix ends.** Layer groups come from the architecture table. Each group's *modules* are the
largest callable modules whose parameters all belong to that group (``vit.layers.3``,
``mobilenet_v2.conv_stem``); the probe records the order in which they run. The prefix is the leading run
of modules, in that order, whose groups are frozen; the *boundary* is the last one that passes the probe.
On the cached path the boundary module returns the cached output, and the prefix modules before it
return *stand-ins* shaped like their outputs (zeros with the batch's size, other values as the probe saw
them), which nothing but the next replaced module receives. Nothing per model is re-implemented; a model
type whose table entry sets ``prefix_issue`` is refused with that reason.

**When.** The same positive rule as the linear-probe cache, for the prefix: the probe runs the real training
forward (training mode, the run's autocast, the Trainer's compute_loss) and uses the cache only if the
boundary output is bit-identical when run twice (also against the computation that fills the cache), the
prefix draws no random numbers and changes no buffers, each example's output is one row that does not
depend on its position or batch mates, and one training step from the cached output gives the real step's
loss, logits, gradient of every trainable parameter and buffers, bit for bit. Plus the static conditions of
the linear-probe cache (same inputs for the same example, no workers, no torch.compile/FSDP/DeepSpeed/
DataParallel, no compute_loss_func, no override of compute_loss/training_step), no ``train_bn``, no adapter:
checked by the linear-probe cache's own functions (``FeatureCacheTrainerMixin._cache_refusal``,
``feature_cache.model_refusal``), so a check added there guards both caches.

**Schedules.** An unfreeze event that reaches the prefix moves the boundary down. The probe also chooses the
boundaries of the prefixes the events still to fire will reach (:func:`later_prefixes`), and the pass that
computes the rows stores theirs too (:attr:`PrefixProbe.ahead`); when one is due it serves after
``_switch_to``'s check (same key, same data digest, :func:`recheck`'s training step), else the probe runs again at
the new boundary and the cache is rebuilt (one prefix pass over the data). Under ``auto`` a head-only phase whose
schedule reaches a prefix later is served from the deepest frozen module, so that one pass serves the whole run.
When the first group trains, batches come from the real examples. A batch of another size (an epoch's last) is
served from the cache if the prefix gives the same bits at that size, else from the real examples.

**Storage.** ``memory`` (host memory, rows moved to the model's device per step) while the cache fits
``feature_cache_max_memory`` (default: half of the memory available when the trainer is built); above it
``auto`` writes it to a file under ``feature_cache_dir``/spill that is memory-mapped and deleted when the cache
is dropped or training ends, ``memory`` refuses, and ``disk`` always writes a file kept for later runs. Files are safetensors
(written row block by row block, never whole in memory) whose header carries the digest of every tensor,
checked before a file is reused. Keys as for the linear-probe cache (``feature_cache.weights_key``), over the
prefix's tensors, in the same folder (``feature_cache.cache_folder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from . import cache_safety as safety
from . import feature_cache as fc
from .architectures import ARCHITECTURES
from .errors import FreezePolicyError
from .fingerprint import LEAF_BYTES, _leaf, _root
from .groups import model_type_of
from .names import unwrap_model
from .plan import Timing
from .state import get_state

logger = logging.getLogger(__name__)
FORMAT = "hf_freeze-prefix/1"
DIGEST_CHARS = 32  # tensor_digest is BLAKE2b-128 in hex
RESERVE = 512  # header bytes kept free for the key, written when the data is complete
_MEMORY: dict[str, PrefixCache] = {}  # the last in-memory prefix cache of this process (reused by a later run)

# =========================================================================== sizes


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """``"512MB"``, ``"1.5GiB"``, ``"2000000"`` or an int -> bytes; None -> None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise FreezePolicyError(f"--feature_cache_max_memory {text!r} is not a size; give bytes or a number with a "
                                "unit: KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory() -> int:
    """Bytes of host memory available now (psutil, a dependency of accelerate: ``MemAvailable`` on Linux)."""
    return int(psutil.virtual_memory().available)


def memory_limit(args) -> int:
    """The most bytes a cache may hold in memory: ``feature_cache_max_memory``, else half the available memory."""
    given = parse_size(getattr(args, "feature_cache_max_memory", None))
    return given if given is not None else available_memory() // 2


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# =========================================================================== where the prefix is

def leading_frozen(state, frozen: set[str] | None = None) -> list[str]:
    """The groups from the input on that are entirely frozen (stops at the first trainable group and at the head);
    ``frozen``: these parameter names instead of the state's frozen ones."""
    frozen = state.frozen if frozen is None else frozen
    out = []
    for g in state.groups:
        if g.name == "head" or not set(g.param_names) <= frozen:
            break
        out.append(g.name)
    return out


def later_prefixes(state, fires: Callable | None = None) -> list[list[str]]:
    """The leading frozen groups after each unfreeze event still to fire, in firing order: the prefixes the schedule
    will reach (a prefix equal to the one before it, and what follows an empty one, left out). ``fires(event)``:
    whether the run reaches that event (``max_steps`` may end it first); the events after one it does not reach are
    left out too."""
    frozen, last, out = set(state.frozen), leading_frozen(state), []
    for event in state.plan.events[state.events_done:]:
        if fires is not None and not fires(event):
            break
        for g in event.groups:
            frozen -= set(state.groups[g].param_names) - state.user_frozen
        lead = leading_frozen(state, frozen)
        if not lead:
            break
        if lead != last:
            out.append(lead)
            last = lead
    return out


def group_modules(model: nn.Module, state) -> dict[str, str]:
    """Module name -> group, for the largest callable modules whose parameters all belong to one group below the
    head (a ModuleList/ModuleDict, which is never called, stands for its children)."""
    group_of = state.groups.group_of()
    owners: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(len(parts)):  # every enclosing module, the model itself ("") included
            owners.setdefault(".".join(parts[:i]), set()).add(group_of.get(name, "?"))
    modules = dict(model.named_modules())
    found: dict[str, str] = {}

    def visit(name: str, module: nn.Module):
        groups = owners.get(name)
        if not groups:
            return
        if len(groups) == 1 and (g := next(iter(groups))) not in ("head", "?") and name:
            if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                found[name] = g
                return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return {n: found[n] for n in modules if n in found}


def policy_refusal(model: nn.Module) -> str | None:
    """What in the policy or the model rules the prefix cache out (None: nothing)."""
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        return "no freeze policy is applied"
    issue = getattr(ARCHITECTURES.get(model_type_of(model)), "prefix_issue", None)
    if issue:
        return f"model type {model_type_of(model)!r}: {issue}"
    # the linear-probe cache's checks, shared; over the whole model: the cached rows are served on one device
    reason = fc.model_refusal(model, state, [*model.parameters(), *model.buffers()], "the model")
    if reason:
        return reason
    if not leading_frozen(state):
        first = state.groups[0].name
        return f"nothing is frozen at the input end (group {first!r} trains), so there is no frozen prefix to cache"
    return None


# =========================================================================== tracing the prefix modules

@dataclass
class _Trace:
    order: list[str] = field(default_factory=list)  # modules in the order they finished
    calls: Counter = field(default_factory=Counter)
    outputs: dict = field(default_factory=dict)  # name -> copy of its (first) output
    rng_moved: dict[str, bool] = field(default_factory=dict)  # since the first traced module started
    ragged: dict[str, bool] = field(default_factory=dict)  # a layer inside produced a ragged per-example size
    autocast: dict[str, str] = field(default_factory=dict)
    buffers_changed: list[str] = field(default_factory=list)


@contextlib.contextmanager
def tracing(model: nn.Module, names: list[str], *, stop: str | None = None, keep: bool = True):
    """Record, in the forwards inside the block, when each module of ``names`` runs, what it returns (``keep``),
    whether random numbers were drawn since the first of them started, and which of their buffers changed.
    ``stop``: end the forward right after that module."""
    modules = dict(model.named_modules())
    record = _Trace()
    start: dict = {}
    ragged = {"now": False}

    def pre(name):
        def hook(module, args, kwargs):
            if not start:
                start["rng"] = fc._rng_state()
                start["buffers"] = {f"{n}.{b}": t.detach().clone() for n in names
                                    for b, t in modules[n].named_buffers()}
        return hook

    def post(name):
        def hook(module, args, kwargs, out):
            record.calls[name] += 1
            if record.calls[name] == 1:
                record.order.append(name)
                record.outputs[name] = out if (stop == name or not keep) else fc._copied(out)
                record.rng_moved[name] = not fc._same_rng(start["rng"], fc._rng_state())
                record.ragged[name] = ragged["now"]
                params = next(module.parameters(), None)
                record.autocast[name] = fc.autocast_of(params.device) if params is not None else "none"
            if stop == name:
                raise fc._Stop
        return hook

    def sizes(module, args, out):
        for t in fc.output_tensors(out).values():
            rows = t.shape[0] if t.dim() else 0
            ragged["now"] |= bool(rows) and (t.numel() // rows) % fc.TAIL_MULTIPLE != 0

    handles = []
    for n in names:
        handles += [modules[n].register_forward_pre_hook(pre(n), with_kwargs=True),
                    modules[n].register_forward_hook(post(n), with_kwargs=True)]
        handles += [m.register_forward_hook(sizes) for m in modules[n].modules()]
    try:
        yield record
    except fc._Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        if "buffers" in start:
            now = {f"{n}.{b}": t for n in names for b, t in modules[n].named_buffers()}
            record.buffers_changed = [k for k, v in start["buffers"].items() if not fc.identical(v, now[k])]


def boundary_outputs(model: nn.Module, boundaries: list[str], batch: dict) -> tuple[dict, dict]:
    """What each module of ``boundaries`` returns (and under which autocast) when ``model`` runs on ``batch``; the
    forward stops right after the first of them (the deepest: the others run before it, their outputs are copied)."""
    with tracing(unwrap_model(model), boundaries, stop=boundaries[0], keep=True) as record:
        model(**batch)
    for boundary in boundaries:
        if record.calls[boundary] != 1:
            raise RuntimeError(f"{boundary} ran {record.calls[boundary]} times in one forward")
    return {b: record.outputs[b] for b in boundaries}, {b: record.autocast[b] for b in boundaries}


def boundary_output(model: nn.Module, boundary: str, batch: dict):
    """What module ``boundary`` returns (and under which autocast) when ``model`` runs on ``batch``; the forward stops
    right there."""
    outs, autocast = boundary_outputs(model, [boundary], batch)
    return outs[boundary], autocast[boundary]


# =========================================================================== what a prefix output looks like

@dataclass(frozen=True)
class Leaf:
    """One per-example tensor of a module's output: the shape of one row, the dtype, and the order of its dimensions
    in memory (outermost first; the batch dimension first). The cache stores rows in that order and serves them with
    the strides the module gives them (a channels-last output stays channels-last: kernels round by layout)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    order: tuple[int, ...]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[d - 1] for d in self.order[1:])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()

    def stored(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (a batch) as rows in memory order: a view, no copy."""
        return v.permute(self.order)

    def logical(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.permute([self.order.index(d) for d in range(len(self.order))])

    def fits(self, v) -> bool:
        return (isinstance(v, torch.Tensor) and v.dtype == self.dtype and tuple(v.shape[1:]) == self.shape
                and self.stored(v).is_contiguous())


@dataclass
class Structure:
    """The structure of a module's output: a pytree whose tensor leaves have one row per example."""

    spec: object
    rows: dict[int, Leaf]  # leaf index -> its rows
    fixed: dict[int, object]  # leaf index -> a value that is not per example (an int, a shape), as the probe saw it

    @classmethod
    def of(cls, out, size: int) -> tuple[Structure, str | None]:
        leaves, spec = tree_flatten(out)
        rows, fixed, problem = {}, {}, None
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                if v.dim() and v.shape[0] == size:
                    order = tuple(sorted(range(v.dim()), key=lambda d: (-v.stride(d) if v.shape[d] > 1 else 1, d)))
                    order = (0, *[d for d in order if d != 0]) if v.shape[0] == 1 else order
                    rows[i] = Leaf(tuple(v.shape[1:]), v.dtype, order)
                    if order[0] != 0 or not rows[i].stored(v).is_contiguous():
                        problem = (f"output {i} is a strided view (shape {tuple(v.shape)}, strides {v.stride()}), "
                                   "whose memory layout the cache cannot reproduce")
                else:
                    problem = f"output {i} (shape {tuple(v.shape)}) is not one row per example"
                    fixed[i] = v
            else:
                fixed[i] = v
        return cls(spec, rows, fixed), problem

    @property
    def row_bytes(self) -> int:
        return sum(leaf.row_bytes for leaf in self.rows.values())

    def tensors(self, out) -> dict[int, torch.Tensor]:
        leaves, _ = tree_flatten(out)
        return {i: leaves[i] for i in self.rows}

    def matches(self, out) -> bool:
        """``out`` has this structure, these fixed values, and tensors of these shapes, dtypes and memory layouts."""
        leaves, spec = tree_flatten(out)
        if str(spec) != str(self.spec) or len(leaves) != len(self.rows) + len(self.fixed):
            return False
        return (all(leaf.fits(leaves[i]) for i, leaf in self.rows.items())
                and all(fc.identical(leaves[i], v) if isinstance(v, torch.Tensor) else leaves[i] == v
                        for i, v in self.fixed.items()))

    def build(self, tensors: dict[int, torch.Tensor]):
        n = len(self.rows) + len(self.fixed)
        return tree_unflatten([tensors[i] if i in self.rows else self.fixed[i] for i in range(n)], self.spec)

    def stand_in(self, size: int, scratch: torch.Tensor):
        """Zeros of this structure for a batch of ``size``: views of ``scratch`` (a byte buffer shared by every
        stand-in: what the code between two replaced modules writes into it reaches nothing but a replaced module)."""
        return self.build({i: scratch[:size * leaf.row_bytes].view(leaf.dtype).view(size, *leaf.shape)
                           for i, leaf in self.rows.items()})

    def scratch_bytes(self, size: int) -> int:
        return max((size * leaf.row_bytes for leaf in self.rows.values()), default=0)


# =========================================================================== the probe

@dataclass
class PrefixPlan:
    groups: list[str]  # the frozen groups the prefix belongs to
    boundary: str  # the module whose output is cached
    skipped: list[str]  # the prefix modules that run before it (they return stand-ins)
    layout: Structure  # of the boundary's output
    stand_ins: dict[str, Structure]
    pixels: tuple[tuple[int, ...], torch.dtype]  # one example's pixel_values
    n: int
    batch_size: int
    first_digest: str
    autocast: str
    tensors: list[str]  # names of the parameters and buffers of the prefix groups (the key digests them)

    @property
    def row_bytes(self) -> int:
        return self.layout.row_bytes


@dataclass
class PrefixProbe:
    refusal: str | None
    plan: PrefixPlan | None = None
    #: plans for the prefixes the schedule reaches later (:func:`later_prefixes`) that passed every check but the
    #: training step, which :func:`recheck` makes when they are due; their rows are computed in the same pass
    ahead: list[PrefixPlan] = field(default_factory=list)


@contextlib.contextmanager
def _trainable_as_state(model: nn.Module, state):
    """requires_grad as the policy state says right now (FreezeCallback.setup opens future groups for DDP)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    names = dict(model.named_parameters())
    for n, p in names.items():
        p.requires_grad_(n not in state.frozen and (p.is_floating_point() or p.is_complex()))
    try:
        yield [p for p in names.values() if p.requires_grad]
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)


def _same_grads(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and fc.identical(x, y)) for x, y in zip(a, b))


def _module_problem(run: list[str], i: int, a: _Trace, b: _Trace, size: int) -> str | None:
    """Why the output of ``run[i]`` (the prefix ``run[:i + 1]``) cannot be cached (None: it can), from two traced
    forwards of one batch (``a`` in training mode with grad, ``b`` without)."""
    name = run[i]
    layout, ragged_out = Structure.of(a.outputs[name], size)
    if any(a.calls[m] != 1 for m in run[:i + 1]):
        return f"{[m for m in run[:i + 1] if a.calls[m] != 1][0]} runs more than once in one forward"
    if a.rng_moved[name] or b.rng_moved[name]:
        return (f"the prefix up to {name} draws random numbers in training mode (dropout, attention dropout, "
                "drop-path or stochastic depth): its output differs at every epoch")
    if changed := [k for k in a.buffers_changed + b.buffers_changed if k.startswith(tuple(f"{m}." for m in run[:i + 1]))]:
        return f"the prefix up to {name} changes its buffers in training mode ({changed[:3]})"
    if ragged_out:
        return f"{name}'s {ragged_out}"
    if differ := fc._differing(fc.output_tensors(a.outputs[name]), fc.output_tensors(b.outputs[name])):
        return f"{name} gives different outputs for the same batch ({differ[:3]}): not deterministic"
    if not layout.rows:
        return f"{name} returns no tensor"
    return None


def _deepest(run: list[str], a: _Trace, b: _Trace, size: int) -> tuple[int | None, str | None]:
    """The index in ``run`` of the deepest module whose output can be cached, or None and why not."""
    problem = None
    for i in range(len(run) - 1, -1, -1):
        problem = _module_problem(run, i, a, b, size)
        if problem is None:
            return i, None
    return None, problem


def _step_problem(inner: nn.Module, loss_fn: Callable, params, cache: PrefixCache, real, rng0, restore) -> str | None:
    """Does one training step from the cached rows ``0..size-1`` give the real step's loss, logits, every gradient
    and buffer? ``real``: (loss, outputs, grads, buffers after) of the real step on those examples."""
    loss, outputs, grads, after = real
    boundary, size = cache.plan.boundary, cache.plan.batch_size
    restore()
    fc._set_rng(rng0)
    try:
        with cache.serving(inner, torch.arange(size)) as inputs:
            c_loss, c_outputs = loss_fn(inputs)
        c_grads = _grads(c_loss, params)
    except Exception as e:  # the code between the prefix modules needs their real outputs
        return f"the model cannot run from {boundary}'s output ({type(e).__name__}: {e})"
    c_after = list(inner.buffers())
    if not fc.identical(loss, c_loss) or fc._differing(fc._logits(outputs), fc._logits(c_outputs)):
        return (f"the loss or logits computed from {boundary}'s cached output differ from the real step's (the model "
                "reads something besides that output)")
    if not _same_grads(grads, c_grads):
        return f"the gradients computed from {boundary}'s cached output differ from the real step's"
    if not all(fc.identical(x, y) for x, y in zip(after, c_after)):
        return f"the buffers after a step from {boundary}'s cached output differ from the real step's"
    return None


def _real_step(inner, loss_fn, sample, params, names):
    """The real training step on ``sample``, traced over ``names``: (trace, (loss, outputs, grads, buffers after))."""
    with tracing(inner, names) as a:
        loss, outputs = loss_fn(dict(sample))
    grads = _grads(loss, params)
    return a, (loss, outputs, grads, [b.detach().clone() for b in inner.buffers()])


def _leaf_dict(layout: Structure, out) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in layout.tensors(out).items()}


def probe(model: nn.Module, loss_fn: Callable, fetch: Callable[[list[int]], dict], n: int, size: int,
          first_digest: str, context: Callable = contextlib.nullcontext, later: list[list[str]] = ()) -> PrefixProbe:
    """Find the deepest frozen module whose output can be cached, and check that training from it is the real step.

    ``loss_fn(inputs) -> (loss, outputs)``: the Trainer's compute_loss under its context managers, model in training
    mode (grad enabled: the probe compares gradients). ``fetch(rows)``: the collated, prepared batch of those
    examples; ``n`` examples, batches of ``size``; ``context()``: the forward's context as the cache is filled
    (the run's autocast). ``later``: the frozen groups of the prefixes the schedule reaches later; the deepest
    cacheable module of each (another one than this boundary) gets a plan in ``ahead``, checked now in everything
    but the training step (whose trainable groups are not those of now).
    """
    inner = unwrap_model(model)
    state = get_state(inner)
    frozen_groups = leading_frozen(state)
    owned = group_modules(inner, state)
    names = list(owned)
    sample = fetch(list(range(size)))
    extra = sorted(set(sample) - fc.BATCH_KEYS)
    if extra or "pixel_values" not in sample:
        return PrefixProbe(f"training batches carry inputs besides pixel_values and labels ({extra})" if extra else
                           f"training batches carry no pixel_values (they carry {sorted(sample)})")
    pixels = sample["pixel_values"]
    with fc._rng_preserved() as rng0, fc._buffers_kept(inner) as restore, _trainable_as_state(inner, state) as params:
        restore()
        a, real = _real_step(inner, loss_fn, sample, params, names)
        restore()
        with tracing(inner, names) as b, torch.no_grad():
            loss_fn(dict(sample))
        if a.order != b.order:
            return PrefixProbe("the model's modules run in a different order in two forwards of the same batch")
        run = []  # the leading prefix modules in the order they run
        for name in a.order:
            if owned[name] not in frozen_groups:
                break
            run.append(name)
        if not run:
            return PrefixProbe(f"the first module to run ({a.order[0] if a.order else 'none'}) is not in a frozen group")
        cut, problem = _deepest(run, a, b, size)
        if cut is None:
            return PrefixProbe(problem)

        def plan_at(groups: list[str], i: int) -> PrefixPlan:
            boundary = run[i]
            return PrefixPlan(list(groups), boundary, run[:i], Structure.of(a.outputs[boundary], size)[0],
                              {m: Structure.of(a.outputs[m], size)[0] for m in run[:i]},
                              (tuple(pixels.shape[1:]), pixels.dtype), n, size, first_digest, a.autocast[boundary],
                              sorted(n_ for g in groups for n_ in (*state.groups[g].param_names,
                                                                   *state.groups[g].buffer_names)))

        plan = plan_at(frozen_groups, cut)
        ahead = []
        for groups in later:  # the prefix of modules of those groups; its deepest cacheable one, if not taken yet
            lead = list(itertools.takewhile(lambda m, g=frozenset(groups): owned[m] in g, run))
            j, _ = _deepest(lead, a, b, size)
            if j is not None and run[j] not in {plan.boundary, *(p.boundary for p in ahead)}:
                ahead.append(plan_at(groups, j))

        def features(rows, raw=False):  # as the cache is filled: the model's forward, stopped at the boundary, no grad
            restore()
            with context(), torch.no_grad():
                outs, _ = boundary_outputs(inner, [p.boundary for p in (plan, *ahead)], fetch(rows))
            if raw:
                return outs
            return {f"{k}/{p.boundary}": v for p in (plan, *ahead)
                    for k, v in _leaf_dict(p.layout, outs[p.boundary]).items()}

        filled = features(list(range(size)), raw=True)
        kept = []
        for p in (plan, *ahead):
            if not p.layout.matches(filled[p.boundary]):
                problem = (f"{p.boundary}'s output has another structure or memory layout in the no-grad forward that "
                           "fills the cache than in the training forward")
            elif fc._differing(_leaf_dict(p.layout, filled[p.boundary]), _leaf_dict(p.layout, a.outputs[p.boundary])):
                problem = (f"{p.boundary}'s output differs between the training forward and the no-grad forward that "
                           "fills the cache")
            else:
                kept.append(p)
                continue
            if p is plan:
                return PrefixProbe(problem)
        ahead = kept[1:]
        ragged = any(a.ragged[m] for m in run[:cut + 1])
        while True:  # the rows of an example must not depend on its position or batch mates, at every boundary
            first = {f"{k}/{p.boundary}": v for p in (plan, *ahead)
                     for k, v in _leaf_dict(p.layout, filled[p.boundary]).items()}
            differ = fc.batch_dependence(features, first, n, size, last=16 if ragged else 4)
            moved = {k.split("/", 1)[1] for k in differ}
            if plan.boundary in moved:
                return PrefixProbe(f"{plan.boundary}'s output for an example changes with its position in the batch "
                                   "or with the other examples in it: batch statistics, or kernels that round the "
                                   "batch's last rows differently")
            if not moved:
                break
            ahead = [p for p in ahead if p.boundary not in moved]
        # one training step served from a cache of these rows, exactly as in training: loss, logits, every gradient
        # and buffer as in the real step
        sink = MemorySink({f"leaf.{i}": (leaf.dtype, (size, *leaf.stored_shape)) for i, leaf in plan.layout.rows.items()})
        for i, v in plan.layout.tensors(filled[plan.boundary]).items():
            sink.append(f"leaf.{i}", plan.layout.rows[i].stored(v))
        sink.append("labels", sample["labels"])
        problem = _step_problem(inner, loss_fn, params, sink.finish(PrefixCache, plan, "probe", None, False), real,
                                rng0, restore)
        return PrefixProbe(problem) if problem else PrefixProbe(None, plan, ahead)


def recheck(model: nn.Module, loss_fn: Callable, fetch: Callable[[list[int]], dict], cache: PrefixCache) -> str | None:
    """Before a cache computed ahead (:attr:`PrefixProbe.ahead`) serves: the probe's checks that depend on what
    trains now. The real training step on the first batch runs the prefix modules once each, draws no random numbers
    in them and changes none of their buffers, gives the stored rows at the boundary, and equals the step served from
    those rows (loss, logits, every gradient and buffer). None: it may serve; else why not."""
    inner = unwrap_model(model)
    plan = cache.plan
    size = plan.batch_size
    names = [*plan.skipped, plan.boundary]
    sample = fetch(list(range(size)))
    with fc._rng_preserved() as rng0, fc._buffers_kept(inner) as restore, \
            _trainable_as_state(inner, get_state(inner)) as params:
        restore()
        a, real = _real_step(inner, loss_fn, sample, params, names)
        if a.order != names or any(a.calls[m] != 1 for m in names):
            return f"the prefix modules up to {plan.boundary} ran in another order or more than once"
        if a.rng_moved[plan.boundary] or a.buffers_changed:
            return f"the prefix up to {plan.boundary} draws random numbers or changes its buffers now"
        out = a.outputs[plan.boundary]
        stored = {str(i): v for i, v in cache.gather(torch.arange(size), out_device(out)).items()}
        if not plan.layout.matches(out) or fc._differing(_leaf_dict(plan.layout, out), stored):
            return f"{plan.boundary}'s output for the first batch is not the rows computed ahead"
        return _step_problem(inner, loss_fn, params, cache, real, rng0, restore)


def out_device(out) -> torch.device:
    return next(iter(fc.output_tensors(out).values())).device


# =========================================================================== serving

def _replaced(module: nn.Module, value):
    return fc.backbone_replaced(module, value)


def pixel_placeholder(plan: PrefixPlan, size: int, device) -> torch.Tensor:
    shape, dtype = plan.pixels
    return torch.zeros((), dtype=dtype, device=device).expand(size, *shape)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(plan: PrefixPlan, size: int, device) -> torch.Tensor:
    """A zeroed byte buffer large enough for every stand-in of a batch of ``size`` (one per device, reused)."""
    need = max((st.scratch_bytes(size) for st in plan.stand_ins.values()), default=0)
    key = (str(device),)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < need:
        buf = _SCRATCH[key] = torch.zeros(need, dtype=torch.uint8, device=device)
    return buf


@contextlib.contextmanager
def serving_modules(model: nn.Module, plan: PrefixPlan, out, size: int, device):
    """Inside the block the boundary module returns ``out`` and the prefix modules before it return stand-ins;
    yields the placeholder ``pixel_values`` to call the model with."""
    modules = dict(unwrap_model(model).named_modules())
    buf = scratch(plan, size, device)
    with contextlib.ExitStack() as stack:
        for name in plan.skipped:
            stack.enter_context(_replaced(modules[name], plan.stand_ins[name].stand_in(size, buf)))
        stack.enter_context(_replaced(modules[plan.boundary], out))
        yield {"pixel_values": pixel_placeholder(plan, size, device)}


# =========================================================================== on disk: safetensors, streamed

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class StreamDigest:
    """:func:`hf_freeze.fingerprint.tensor_digest` of a tensor whose bytes arrive in pieces."""

    def __init__(self, dtype, shape):
        self.dtype, self.shape, self.leaves, self.pending = dtype, tuple(shape), [], b""

    def update(self, data: bytes) -> None:
        data = self.pending + bytes(data)
        whole = len(data) - len(data) % LEAF_BYTES
        self.leaves += [_leaf(data[i:i + LEAF_BYTES]) for i in range(0, whole, LEAF_BYTES)]
        self.pending = data[whole:]

    def hexdigest(self) -> str:
        return _root(self.dtype, self.shape, [*self.leaves, *([_leaf(self.pending)] if self.pending else [])])


def _header(entries: dict[str, tuple[torch.dtype, tuple]], meta: dict[str, str], length: int | None = None
            ) -> tuple[bytes, dict[str, int]]:
    """The safetensors header (padded with spaces to ``length``, else to 8 bytes) and each tensor's data offset."""
    header, offsets, at = {"__metadata__": meta}, {}, 0
    for name, (dtype, shape) in entries.items():
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        offsets[name] = at
        at += size
    text = json.dumps(header, separators=(",", ":")).encode()
    if length is None:
        length = len(text) + RESERVE + (-(len(text) + RESERVE + 8) % 8)
    if len(text) > length:
        raise ValueError(f"the header grew past its reserved {length} bytes")
    return len(text + b" " * (length - len(text))).to_bytes(8, "little") + text + b" " * (length - len(text)), offsets


class DiskWriter:
    """Writes the cache's tensors into a safetensors file row block by row block; the checksums are filled in at the
    end (the header keeps its length). Written to a temporary file renamed into place, removed on any exception."""

    def __init__(self, path: Path, entries: dict[str, tuple[torch.dtype, tuple]], meta: dict[str, str]):
        self.path, self.entries, self.meta = path, entries, meta
        path.parent.mkdir(parents=True, exist_ok=True)
        fc.clean_stale_temps(path.parent)
        clean_stale_spills(path.parent)
        self.tmp = fc._temp_name(path)
        self.digests = {k: StreamDigest(d, s) for k, (d, s) in entries.items()}
        head, self.offsets = _header(entries, {**meta, "checksums": self._sums("0" * DIGEST_CHARS)})
        self.data_start = len(head)
        self.length = len(head) - 8
        self.file = open(self.tmp, "wb")
        self.file.write(head)
        self.written = dict.fromkeys(entries, 0)

    def _sums(self, fill=None) -> str:
        return json.dumps({k: fill or d.hexdigest() for k, d in self.digests.items()}, sort_keys=True)

    def append(self, name: str, rows: torch.Tensor) -> None:
        data = rows.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.file.seek(self.data_start + self.offsets[name] + self.written[name])
        self.file.write(data)
        self.digests[name].update(data)
        self.written[name] += len(data)

    def close(self) -> None:
        head, _ = _header(self.entries, {**self.meta, "checksums": self._sums()}, self.length)
        self.file.seek(0)
        self.file.write(head)
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def spill_name(key: str) -> str:
    """The file of a cache spilled to disk for this run only: it names the host and process that own it."""
    return f"{key}.spill.{socket.gethostname()}.{os.getpid()}.safetensors"


def clean_stale_spills(folder: Path) -> list[Path]:
    """Remove spill files of processes on this host that no longer run (a killed run never deleted them)."""
    removed = []
    host = socket.gethostname()
    for p in folder.glob("*.spill.*.safetensors"):
        owner_host, _, pid = p.name.removesuffix(".safetensors").rsplit(".spill.", 1)[1].rpartition(".")
        if owner_host == host and pid.isdigit() and not fc._alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
            logger.info("hf_freeze: removed %s, spilled by a run that no longer runs", p)
    return removed


def read_disk(path: Path, key: str) -> tuple[dict[str, np.memmap], dict[str, tuple]] | None:
    """The memory-mapped tensors of a prefix-cache file whose key and checksums check out (None, with a warning,
    when it is absent, for another key, unreadable or modified)."""
    if not path.is_file():
        return None
    problem = None
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        meta = header.pop("__metadata__", {})
        sums = json.loads(meta.get("checksums", "{}"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            problem = f"it was written for another key or format ({meta.get('key')}, {meta.get('format')})"
        elif set(sums) != set(header):
            problem = "its list of tensors does not match its checksums"
        else:
            arrays, shapes, bad = {}, {}, []
            for name, entry in header.items():
                dtype, shape = _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                rows = shape[0]
                arr = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size + begin,
                                shape=(rows, (end - begin) // max(rows, 1)))
                digest = StreamDigest(dtype, shape)
                step = max(1, (64 << 20) // max(arr.shape[1], 1))
                for i in range(0, rows, step):
                    digest.update(arr[i:i + step].tobytes())
                if digest.hexdigest() != sums[name]:
                    bad.append(name)
                arrays[name], shapes[name] = arr, (dtype, shape)
            if bad:
                problem = f"tensor(s) {bad} fail their checksum (the file was modified)"
    except Exception as e:  # truncated or garbled header/data
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem:
        logger.warning("hf_freeze: prefix cache %s is not usable: %s; recomputing it", path, problem)
        return None
    return arrays, shapes


# =========================================================================== the cache

@dataclass
class PrefixCache:
    """The boundary output of every training example (rows in dataset order) and how to train the suffix on it."""

    plan: PrefixPlan
    fields: dict[str, object]  # "leaf.i" -> tensor (memory) or memmap of raw rows (disk)
    labels: torch.Tensor
    key: str
    storage: str  # "memory" or "disk"
    source: str = "computed"  # "computed", "memory" or "disk"
    seconds: float = 0.0
    path: Path | None = None
    temporary: bool = False  # a file written because the cache did not fit in memory: deleted when dropped
    dtypes: dict[str, tuple] = field(default_factory=dict)
    weights: str = ""  # model_key when the rows were computed (weights, modules and hooks of the prefix, ...)
    data: str = ""  # the data digest of the pass that computed them

    @property
    def rows(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.rows * self.plan.row_bytes

    def gather(self, idx: torch.Tensor, device) -> dict[int, torch.Tensor]:
        """The rows ``idx`` of every output tensor, on ``device``, with the module's memory layout."""
        out = {}
        for i, leaf in self.plan.layout.rows.items():
            v = self.fields[f"leaf.{i}"]
            if isinstance(v, torch.Tensor):
                rows = v[idx.to(v.device)].to(device, non_blocking=True)
            else:  # memory-mapped raw rows: copied into a tensor of torch's own allocation
                rows = torch.empty((len(idx), *leaf.stored_shape), dtype=leaf.dtype)
                rows.view(-1).view(torch.uint8).copy_(torch.from_numpy(v[idx.cpu().numpy()]).reshape(-1))
                rows = rows.to(device)
            out[i] = leaf.logical(rows)
        return out

    @contextlib.contextmanager
    def serving(self, model: nn.Module, indices: torch.Tensor):
        """Inside the block the model runs from the cached rows ``indices``; yields the batch to train on."""
        inner = unwrap_model(model)
        device = next(inner.parameters()).device
        out = self.plan.layout.build(self.gather(indices, device))
        with serving_modules(inner, self.plan, out, len(indices), device) as inputs:
            yield {**inputs, "labels": self.labels[indices.to(self.labels.device)].to(device)}

    def close(self) -> None:
        self.fields = {}
        if self.temporary and self.path is not None:
            self.path.unlink(missing_ok=True)
            logger.info("hf_freeze: removed the temporary prefix cache %s", self.path)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, plan: PrefixPlan, fetch: Callable[[list[int]], dict], prepare: Callable,
              *, storage: str, keep: bool, cache_dir, progress: bool,
              ahead: list[PrefixPlan] = ()) -> tuple[PrefixCache, list[PrefixCache]]:
        """Compute (or reuse) every example's boundary output with ``model``'s own forward, in the current context,
        in batches of the plan's size (the last one filled up with the first examples).

        ``storage``: "memory" or "disk"; ``keep``: a disk file stays for later runs (else it is temporary).
        ``ahead``: plans of prefixes the schedule reaches later (boundaries that run before this one): when the
        rows are computed, theirs are stored in the same pass, each in a cache of its own (the second value)."""
        start = time.perf_counter()
        inner = unwrap_model(model)
        device = next(inner.parameters()).device
        plans = [plan, *ahead]
        weights = [model_key(inner, p, device) for p in plans]
        prefixes = [f"{model_type_of(inner)}-{w[:20]}" for w in weights]
        prefix = prefixes[0]
        folder = fc.cache_folder(cache_dir)
        known = [k for k in _MEMORY if k.startswith(prefix)]
        if storage == "disk" and keep and folder.is_dir():
            fc.clean_stale_temps(folder)
            known += [p.name.removesuffix(".safetensors") for p in folder.glob(f"{prefix}-*.safetensors")]
        data = None
        if known:  # something is cached for these weights: digest the data first, compute only on a miss
            data = _pass(model, [plan], fetch, prepare, None, progress)
            key = f"{prefix}-{data[:20]}-{plan.n}"
            if key in _MEMORY and storage == "memory":
                return _MEMORY[key].since(start, "memory"), []
            if storage == "disk":
                path = folder / f"{key}.safetensors"
                found = read_disk(path, key)
                if found is not None:
                    arrays, dtypes = found
                    labels = torch.from_numpy(np.array(arrays.pop("labels"))).view(dtypes["labels"][0])
                    return cls(plan, arrays, labels.reshape(-1), key, "disk", path=path, dtypes=dtypes,
                               weights=weights[0], data=data).since(start, "disk"), []
        _MEMORY.clear()  # one prefix cache in memory at a time
        sinks, caches = [], []
        try:
            for i, (p, name) in enumerate(zip(plans, prefixes)):
                entries = {f"leaf.{j}": (leaf.dtype, (p.n, *leaf.stored_shape)) for j, leaf in p.layout.rows.items()}
                if storage == "memory":
                    sink = MemorySink(entries)
                else:
                    # a file kept for later runs goes in the folder, a spill of this run in its spill/ subfolder
                    where = folder if keep else folder / "spill"
                    sink = DiskSink(where / f"{name}-building-{os.getpid()}.safetensors",
                                    {**entries, "labels": (torch.int64, (p.n,))})
                sinks.append(sink if i == 0 else Optional(sink))
            digest = _pass(model, plans, fetch, prepare, sinks, progress)
            if data is None:  # every example read a second time, under another random state: augmentation shows
                data = _pass(model, plans, fetch, prepare, None, progress)
            if digest != data:
                raise fc.DataChanged("the dataset returned different inputs on a second read")
            for sink, p, name, w in zip(sinks, plans, prefixes, weights):
                cache = sink.finish(cls, p, f"{name}-{digest[:20]}-{p.n}", folder, keep)
                if cache is not None:
                    cache.weights, cache.data = w, digest
                caches.append(cache)
        except BaseException:
            for sink in sinks:
                sink.abort()
            for cache in caches:  # finished before the failure: a spilled file is deleted, a kept one stays valid
                if cache is not None:
                    cache.close()
            raise
        if storage == "memory":
            _MEMORY[caches[0].key] = caches[0]
        return caches[0].since(start, "computed"), [c.since(start, "ahead") for c in caches[1:] if c is not None]

    def since(self, start: float, source: str) -> PrefixCache:
        return dataclasses.replace(self, source=source, seconds=time.perf_counter() - start)


class MemorySink:
    def __init__(self, entries):
        self.fields = {k: torch.empty(s, dtype=d) for k, (d, s) in entries.items()}
        self.labels, self.at = [], dict.fromkeys(entries, 0)

    def append(self, name, rows):
        if name == "labels":
            self.labels.append(rows.cpu())
            return
        self.fields[name][self.at[name]:self.at[name] + len(rows)] = rows.to(self.fields[name].device)
        self.at[name] += len(rows)

    def finish(self, cls, plan, key, folder, keep):
        return cls(plan, self.fields, torch.cat(self.labels), key, "memory")

    def abort(self):
        self.fields = {}


class DiskSink:
    def __init__(self, path, entries):
        self.entries, self.path = entries, path
        self.labels = []
        self.writer = DiskWriter(path, entries, {"format": FORMAT, "key": ""})

    def append(self, name, rows):
        if name == "labels":
            self.labels.append(rows.cpu().to(torch.int64))
        self.writer.append(name, rows)

    def finish(self, cls, plan, key, folder, keep):
        final = self.path.parent / (f"{key}.safetensors" if keep else spill_name(key))
        self.writer.meta["key"] = key
        self.writer.path = final
        self.writer.close()
        found = read_disk(final, key)
        if found is None:
            raise RuntimeError(f"the prefix cache just written to {final} does not read back")
        arrays, dtypes = found
        arrays.pop("labels")
        return cls(plan, arrays, torch.cat(self.labels), key, "disk", path=final, temporary=not keep, dtypes=dtypes)

    def abort(self):
        self.writer.abort()


class Optional:
    """A sink of rows computed ahead: a disk that cannot take them (OSError: full, read-only) drops them (those
    boundaries are computed when due) and never fails the boundary that is due now."""

    def __init__(self, sink):
        self.sink, self.failed = sink, None

    def append(self, name, rows):
        if self.failed is None:
            try:
                self.sink.append(name, rows)
            except OSError as e:
                self._fail(e)

    def finish(self, cls, plan, key, folder, keep):
        if self.failed is None:
            try:
                return self.sink.finish(cls, plan, key, folder, keep)
            except OSError as e:
                self._fail(e)
        return None

    def _fail(self, error: OSError) -> None:
        self.failed = error
        self.sink.abort()
        logger.warning("hf_freeze: the rows computed ahead for a later boundary could not be written (%s): that "
                       "boundary is computed when it is due", error)

    def abort(self):
        self.sink.abort()


def model_key(inner: nn.Module, plan: PrefixPlan, device: torch.device) -> str:
    """Digest of everything but the data that determines the cached rows, taken now."""
    tensors = dict((*inner.named_parameters(), *inner.named_buffers()))
    modules = dict(inner.named_modules())
    return fc.weights_key(inner, {n: tensors[n] for n in plan.tensors if n in tensors}, FORMAT, plan.boundary, device,
                          plan.autocast, plan.batch_size, str(plan.layout.spec), sorted(plan.layout.rows.items()),
                          plan.pixels, *(safety.modules_digest(modules[m]) for m in (*plan.skipped, plan.boundary)))


#: the random state a digest-only pass reads the data under: another state than the pass that fills the cache (which
#: starts from the run's), so that a random augmentation of any example shows as a different digest
DIGEST_SEED = 0x5EED


def _reseeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _pass(model, plans: list[PrefixPlan], fetch, prepare, sinks: list | None, progress: bool) -> str:
    """One pass over the data in batches of the plans' size: the data digest, and (``sinks``, one per plan) the rows
    stored at every plan's boundary (one forward, stopped at the first plan's). Without sinks (a digest-only pass) the
    data is read under :data:`DIGEST_SEED`; the run's random state is restored after either."""
    h = hashlib.blake2b(digest_size=16)
    plan = plans[0]
    size = plan.batch_size
    with fc._rng_preserved(), torch.no_grad():
        if sinks is None:
            _reseeded(DIGEST_SEED)
        for start in tqdm(range(0, plan.n, size), disable=not progress, unit="batch",
                          desc="hf_freeze: caching the frozen prefix" if sinks else "hf_freeze: digesting the data"):
            rows = min(size, plan.n - start)
            raw = fetch([(start + j) % plan.n for j in range(size)])
            digest = fc.batch_digest(raw)
            if start == 0 and digest != plan.first_digest:
                raise fc.DataChanged("the first batch differs from the one the probe read")
            h.update(digest.encode())
            if sinks is None:
                continue
            batch = prepare(raw)
            outs, autocast = boundary_outputs(model, [p.boundary for p in plans], batch)
            for p, sink in zip(plans, sinks):
                out = outs[p.boundary]
                if autocast[p.boundary] != p.autocast:
                    raise RuntimeError(f"the prefix runs under autocast {autocast[p.boundary]} now, under {p.autocast} "
                                       "when probed")
                if not p.layout.matches(out):
                    raise RuntimeError(f"{p.boundary}'s output changed structure or memory layout between batches")
                for i, v in p.layout.tensors(out).items():
                    sink.append(f"leaf.{i}", p.layout.rows[i].stored(v.detach())[:rows])
                sink.append("labels", batch["labels"][:rows])
    return h.hexdigest()


# =========================================================================== the Trainer side

class PrefixCacheTrainerMixin(fc.FeatureCacheTrainerMixin):
    """Trainer hooks of the frozen-prefix cache, on top of the linear-probe cache (``FreezeTrainerMixin`` includes
    them). The linear-probe cache serves while everything below the head is frozen; otherwise (or after its phase)
    this one serves while a prefix of groups is frozen.

    Attributes: ``prefix_cache`` (the :class:`PrefixCache` while it serves), ``prefix_cache_refusal`` (why none
    serves, or None), ``prefix_cache_info`` (one dict per boundary: module, groups, key, storage, source, rows,
    bytes per example, seconds, the step it was built at, steps served, the step it was dropped at).
    """

    def _init_feature_cache(self, mode: str) -> None:
        super()._init_feature_cache(mode)
        self.prefix_cache: PrefixCache | None = None
        self.prefix_cache_refusal: str | None = None
        self.prefix_cache_info: list[dict] = []
        self._prefix_plan: PrefixPlan | None = None
        self._prefix_refused: tuple | None = None  # the frozen groups a mid-run probe refused
        self._prefix_sizes: dict[int, bool] = {}
        self._prefix_later: list[PrefixPlan] = []  # the last probe's plans for the prefixes the schedule reaches later
        self._prefix_ahead: dict[tuple[str, ...], PrefixCache] = {}  # their caches, computed in an earlier pass
        self._memory_limit = memory_limit(self.args)

    # ------------------------------------------------------------------ deciding
    def _probe_loss(self, inputs):
        with self._forward_context():
            return super(fc.FeatureCacheTrainerMixin, self).compute_loss(self.model, inputs, return_outputs=True)

    def _fetch_prepared(self, rows):
        return self._prepare_inputs(self._real_batch(rows))

    def _prefix_probe(self) -> PrefixProbe:
        """The shared static checks, the shared read pass, then :func:`probe` (with the prefixes the schedule
        reaches later)."""
        reason = policy_refusal(self.model) or self._cache_refusal()  # the linear-probe cache's checks, shared
        if reason:
            return PrefixProbe(reason)
        n, size = len(self.train_dataset), self._train_batch_size
        b = min(size, n)
        dataset, collator = self._real_source()  # the shared read pass: random draws, batch-dependent collators
        reason, _ = safety.read_pass(dataset, collator, fc.build_batches(n, b), total=len(fc.build_batches(n, b)))
        if reason:
            return PrefixProbe(reason)
        first = fc.batch_digest(self._real_batch(range(b)))
        try:
            with fc._training_mode(self.model):
                return probe(self.model, self._probe_loss, self._fetch_prepared, n, b, first, self._forward_context,
                             later=self._later_prefixes())
        except Exception as e:  # the real step fails the same way: let the Trainer report it
            return PrefixProbe(f"the probe's training forward failed ({type(e).__name__}: {e})")

    def _later_prefixes(self) -> list[list[str]]:
        """:func:`later_prefixes` of the events this run reaches: with ``max_steps``, those that fire before it (steps
        per epoch counted as the Trainer counts them from the dataset's length, the batch size, the processes and
        gradient accumulation)."""
        state = get_state(self.model)
        limit = self.args.max_steps if self.args.max_steps and self.args.max_steps > 0 else None
        if limit is None:
            return later_prefixes(state)
        per_rank = math.ceil(len(self.train_dataset) / max(self.args.world_size, 1))
        size = self._train_batch_size
        batches = per_rank // size if self.args.dataloader_drop_last else math.ceil(per_rank / size)
        acc = max(int(self.args.gradient_accumulation_steps or 1), 1)
        timing = Timing(max(batches // acc + int(batches % acc > 0), 1), max(batches, 1), acc)
        return later_prefixes(state, lambda event: timing.fire_step(event) < limit)

    def _size_refusal(self, plan: PrefixPlan, later: bool = False) -> str | None:
        """Why the cache at ``plan`` cannot be stored under this mode and these limits (None: it can)."""
        need = plan.n * plan.row_bytes
        when = " (a prefix the schedule reaches later)" if later else ""
        if need > self._memory_limit and self.feature_cache_mode == "memory":
            return (f"the prefix cache at {plan.boundary}{when} needs {human(need)} ({human(plan.row_bytes)} per "
                    f"example), more than feature_cache_max_memory ({human(self._memory_limit)}); use "
                    "feature_cache='disk' or 'auto' (which writes it to a memory-mapped file)")
        if need > self._memory_limit or self.feature_cache_mode == "disk":
            folder = fc.cache_folder(getattr(self.args, "feature_cache_dir", None))
            free = shutil.disk_usage(_existing(folder)).free
            if need * 1.05 > free:
                return (f"the prefix cache at {plan.boundary}{when} needs {human(need)}: more than "
                        f"feature_cache_max_memory ({human(self._memory_limit)}) and than the free space under "
                        f"{folder} ({human(free)})")
        return None

    def _prefix_check(self) -> tuple[str | None, PrefixPlan | None]:
        found = self._prefix_probe()
        if found.refusal:
            return found.refusal, None
        # feature_cache='memory' promises the cache serves: a later prefix that cannot fit is refused now too
        reason = self._size_refusal(found.plan) or next(
            (r for p in found.ahead if self.feature_cache_mode == "memory" and (r := self._size_refusal(p, True))), None)
        if reason:
            return reason, None
        self._prefix_later = found.ahead
        return None, found.plan

    def _memory_refusal_later(self) -> str | None:
        """feature_cache='memory' while the linear-probe cache serves a schedule's head-only phase: a prefix the
        schedule reaches later whose cache cannot fit the memory limit is refused before the first step."""
        if self.feature_cache_mode != "memory" or not self._later_prefixes():
            return None
        found = self._prefix_probe()
        later = [p for p in (found.plan, *found.ahead) if p is not None and p.groups != leading_frozen(
            get_state(self.model))]
        return next((r for p in later if (r := self._size_refusal(p, True))), None)

    def _no_feature_cache(self, reason: str, fallback=None):
        """The linear-probe cache cannot serve: try the frozen prefix before training on the real examples."""
        if fallback is None or self.feature_cache_mode == "off":
            return super()._no_feature_cache(reason, fallback)
        prefix_reason, plan = self._prefix_check()
        if plan is None:
            self.prefix_cache_refusal = prefix_reason
            return super()._no_feature_cache(f"{reason}; no frozen-prefix cache either: {prefix_reason}", fallback)
        self.feature_cache_refusal = reason
        logger.info("hf_freeze: no linear-probe cache (%s); caching the frozen prefix up to %s instead", reason,
                    plan.boundary)
        return self._prefix_loader(plan)

    def _prefix_loader(self, plan: PrefixPlan):
        """Training batches of example indices (the Trainer's own sampler over the real dataset), served by the
        prefix cache at ``plan``."""
        self._prefix_plan = plan
        dataset, _ = self._real_source()
        collator, self.data_collator = self.data_collator, fc.collate_indices
        try:
            return self._get_dataloader(dataset=fc.IndexDataset(plan.n), description="Training",
                                        batch_size=self._train_batch_size,
                                        sampler_fn=lambda _: self._get_train_sampler(dataset), is_training=True)
        finally:
            self.data_collator = collator

    def get_train_dataloader(self):
        self._prefix_drop(None)
        self._drop_ahead()
        self._prefix_plan, self._prefix_refused, self.prefix_cache_refusal = None, None, None
        self.prefix_cache_info = []
        if (loader := self._prefix_for_the_schedule()) is not None:
            return loader
        loader = super().get_train_dataloader()
        if self._feature_cache_plan is not None and (reason := self._memory_refusal_later()):
            raise FreezePolicyError(f"feature_cache='memory' would not serve the whole schedule: {reason}")
        return loader

    def _prefix_for_the_schedule(self):
        """A head-only phase whose schedule reaches frozen prefixes later: the prefix cache serves from the start (at
        the deepest module below the head) when it can compute every later boundary's rows in the same pass and all
        of them fit the memory limit: one pass over the data for the whole schedule, instead of the
        linear-probe cache's pass and one more per boundary; ``auto`` only (``disk`` keeps the linear-probe cache's
        file for later runs). Otherwise (None) the linear-probe cache serves the head-only phase and each later
        boundary is computed when due."""
        state = get_state(self.model)
        if (self.feature_cache_mode != "auto" or state is None or state.trainable_below_head()
                or not self._later_prefixes() or policy_refusal(self.model)):
            return None
        reason, plan = self._prefix_check()
        if plan is None or not self._prefix_later:
            self._prefix_later = []
            return None
        ahead = self._ahead_that_fits(plan, "memory")
        if len(ahead) < len(self._prefix_later):  # not all of them at once: one boundary at a time, as usual
            self._prefix_later = []
            return None
        self.feature_cache, self._feature_cache_plan, self.feature_cache_info = None, None, {}
        self._feature_cache_sizes = {}
        self.feature_cache_refusal = ("the frozen-prefix cache serves the whole schedule: one pass computes the "
                                      "rows of every boundary it reaches")
        logger.info("hf_freeze: caching the frozen prefix up to %s and, in the same pass, at %s for the schedule's "
                    "later phases", plan.boundary, ", ".join(p.boundary for p in ahead))
        return self._prefix_loader(plan)

    # ------------------------------------------------------------------ serving
    def _serving_cache(self, model, size: int):
        cache = super()._serving_cache(model, size)
        if cache is not None or self.feature_cache_mode == "off":
            return cache
        return self._prefix_serving(model, size)

    def _prefix_serving(self, model, size: int) -> PrefixCache | None:
        state = get_state(model)
        groups = leading_frozen(state)
        plan = self._prefix_plan
        ready = self._prefix_ahead.pop(tuple(groups), None) if plan is not None and plan.groups != groups else None
        if ready is not None and self._switch_to(ready, plan):  # its rows were computed with an earlier boundary's
            plan = ready.plan
        elif plan is not None and plan.groups != groups:  # an unfreeze event reached the prefix: probe again
            self._prefix_plan, old = None, plan
            plan = self._plan_prefix(groups)
            same = (plan is not None and self.prefix_cache is not None and plan.boundary == old.boundary
                    and repr(plan.layout) == repr(old.layout) and plan.batch_size == old.batch_size)
            if same:  # the new boundary is the old one (the modules after it draw random numbers): keep its rows
                self.prefix_cache.plan = plan
                self.prefix_cache_info[-1]["groups"] = list(plan.groups)
                logger.info("hf_freeze: the prefix cache at %s still serves (frozen now: %s)", plan.boundary,
                            "+".join(groups))
            else:
                self._prefix_drop(f"group(s) {sorted(set(old.groups) - set(groups))} train now")
        elif plan is None:
            plan = self._plan_prefix(groups)
        if plan is None:
            return None
        if self.prefix_cache is None:
            self.prefix_cache = self._build_prefix_cache(plan)
            if self.prefix_cache is None:
                return None
            self._prefix_sizes = {plan.batch_size: True}
        if size not in self._prefix_sizes:
            self._prefix_sizes[size] = self._same_bits_at(plan, size)
        if not self._prefix_sizes[size]:
            return None
        self.prefix_cache_info[-1]["served_steps"] += 1
        return self.prefix_cache

    def _switch_to(self, ready: PrefixCache, old: PrefixPlan) -> bool:
        """Serve ``ready`` (computed ahead) from now on if the prefix's key is unchanged (weights, modules, hooks),
        a read of every example gives the digest of the pass that computed its rows, and :func:`recheck` passes
        with the groups that train now; else close it (False: the boundary is probed and built as usual)."""
        start = time.perf_counter()
        plan = ready.plan
        inner = unwrap_model(self.model)
        reason = policy_refusal(self.model) or self._cache_refusal()
        if reason is None and model_key(inner, plan, next(inner.parameters()).device) != ready.weights:
            reason = ("the prefix's weights, modules or forward hooks changed since its rows were computed")
        if reason is None and fc.batch_digest(self._real_batch(range(plan.batch_size))) != plan.first_digest:
            reason = "the first batch differs from the one the probe read"
        if reason is None:  # every example read again (as a build would): the dataset still gives the same inputs
            try:
                if _pass(self.model, [plan], self._real_batch, self._prepare_inputs, None, False) != ready.data:
                    reason = "the dataset returns other inputs than when its rows were computed"
            except fc.DataChanged as e:
                reason = f"the dataset returns other inputs than when its rows were computed ({e})"
        if reason is None:
            try:
                with fc._training_mode(self.model):
                    reason = recheck(self.model, self._probe_loss, self._fetch_prepared, ready)
            except Exception as e:
                reason = f"the check's training forward failed ({type(e).__name__}: {e})"
        if reason:
            ready.close()
            logger.info("hf_freeze: the prefix cache computed ahead at %s does not serve (%s): probing again",
                        plan.boundary, reason)
            return False
        self._prefix_drop(f"group(s) {sorted(set(old.groups) - set(plan.groups))} train now")
        self.prefix_cache, self._prefix_plan, self._prefix_sizes = ready, plan, {plan.batch_size: True}
        if ready.storage == "memory":  # the in-memory cache a later run can reuse (a copy: closing ours keeps it)
            _MEMORY.clear()
            _MEMORY[ready.key] = dataclasses.replace(ready)
        self._record_cache(ready, time.perf_counter() - start)
        return True

    def _drop_ahead(self) -> None:
        for cache in self._prefix_ahead.values():
            cache.close()
        self._prefix_ahead, self._prefix_later = {}, []

    def _plan_prefix(self, groups: list[str]) -> PrefixPlan | None:
        """Probe the prefix now (None: nothing frozen at the input end, or refused: batches use the real examples)."""
        if not groups or self._prefix_refused == tuple(groups):
            return None
        reason, plan = self._prefix_check()
        if plan is None:
            self._prefix_refused, self.prefix_cache_refusal = tuple(groups), reason
            logger.info("hf_freeze: no frozen-prefix cache for %s: %s; training on the real examples", groups, reason)
            return None
        self._prefix_plan = plan
        return plan

    def _build_prefix_cache(self, plan: PrefixPlan) -> PrefixCache | None:
        need = plan.n * plan.row_bytes
        mode = self.feature_cache_mode
        storage = "disk" if mode == "disk" or need > self._memory_limit else "memory"
        if storage == "disk" and mode == "memory":  # a later boundary is larger than the limit
            self._prefix_refused, self._prefix_plan = tuple(plan.groups), None
            self.prefix_cache_refusal = (f"the prefix cache at {plan.boundary} would need {human(need)}, more than "
                                         f"feature_cache_max_memory ({human(self._memory_limit)})")
            logger.warning("hf_freeze: %s; training on the real examples", self.prefix_cache_refusal)
            return None
        try:
            with self._forward_context():
                cache, ahead = PrefixCache.build(
                    self.model, plan, self._real_batch, self._prepare_inputs, storage=storage, keep=mode == "disk",
                    cache_dir=getattr(self.args, "feature_cache_dir", None),
                    progress=not self.args.disable_tqdm and self.args.should_log,
                    ahead=self._ahead_that_fits(plan, storage))
        except fc.DataChanged as e:
            self._prefix_refused, self._prefix_plan = tuple(plan.groups), None
            self.prefix_cache_refusal = f"the dataset returns different pixels for the same example ({e})"
            logger.info("hf_freeze: no frozen-prefix cache: %s", self.prefix_cache_refusal)
            return None
        except OSError as e:  # the spill file cannot be written (a full disk): auto trains on the real examples
            if storage != "disk" or mode != "auto":
                raise
            self._prefix_refused, self._prefix_plan = tuple(plan.groups), None
            self.prefix_cache_refusal = (f"the prefix cache at {plan.boundary} ({human(need)}, over "
                                         f"feature_cache_max_memory) could not be written to disk ({e})")
            logger.warning("hf_freeze: %s; training on the real examples", self.prefix_cache_refusal)
            return None
        self._drop_ahead()
        self._prefix_ahead = {tuple(c.plan.groups): c for c in ahead}
        self._record_cache(cache, cache.seconds)
        return cache

    def _ahead_that_fits(self, plan: PrefixPlan, storage: str) -> list[PrefixPlan]:
        """The later prefixes whose rows are computed in this boundary's pass: in order, while all of them fit the
        memory limit (``memory`` storage) or the free disk space (``disk``); the others are computed when due."""
        total, chosen = plan.n * plan.row_bytes, []
        if storage == "memory":
            room = self._memory_limit
        else:
            room = shutil.disk_usage(_existing(fc.cache_folder(getattr(self.args, "feature_cache_dir", None)))).free / 1.05
        for p in self._prefix_later:
            total += p.n * p.row_bytes
            if total > room:
                break
            chosen.append(p)
        return chosen

    def _record_cache(self, cache: PrefixCache, seconds: float) -> None:
        plan = cache.plan
        self.prefix_cache_info.append({
            "boundary": plan.boundary, "groups": list(plan.groups), "key": cache.key, "storage": cache.storage,
            "source": cache.source, "rows": cache.rows, "bytes_per_example": plan.row_bytes, "bytes": cache.nbytes,
            "path": str(cache.path) if cache.path else None, "seconds": seconds,
            "built_at_step": self.state.global_step, "served_steps": 0, "batch_sizes": {plan.batch_size: "cache"},
            "ahead": [c.plan.boundary for c in self._prefix_ahead.values()] if cache.source != "ahead" else []})
        logger.info("hf_freeze: training from the cached output of %s (frozen %s): %d rows x %s = %s, %s (%s) in "
                    "%.2f s%s", plan.boundary, "+".join(plan.groups), cache.rows, human(plan.row_bytes),
                    human(cache.nbytes), cache.storage, "computed in an earlier boundary's pass, checked"
                    if cache.source == "ahead" else cache.source, seconds,
                    f"; computed in the same pass for later boundaries: {', '.join(self.prefix_cache_info[-1]['ahead'])}"
                    if self.prefix_cache_info[-1]["ahead"] else "")

    def _same_bits_at(self, plan: PrefixPlan, size: int) -> bool:
        """Does the prefix give the cached bits in batches of ``size`` (else those batches use the real examples)?"""
        raw = self._real_batch(range(size))
        with self._forward_context(), torch.no_grad(), fc._rng_preserved():
            out, _ = boundary_output(self.model, plan.boundary, self._prepare_inputs(raw))
        cached = self.prefix_cache.gather(torch.arange(size), "cpu")
        same = plan.layout.matches(out) and all(fc.identical(v.detach().cpu(), cached[i])
                                                for i, v in plan.layout.tensors(out).items())
        self.prefix_cache_info[-1]["batch_sizes"][size] = "cache" if same else "real examples (other bits)"
        if not same:
            logger.info("hf_freeze: the prefix rounds differently in batches of %d than of %d: those batches use the "
                        "real examples", size, plan.batch_size)
        return same

    def _prefix_drop(self, why: str | None) -> None:
        if self.prefix_cache is not None:
            if why:
                logger.info("hf_freeze: dropping the prefix cache at %s: %s", self.prefix_cache.plan.boundary, why)
            if self.prefix_cache_info:
                self.prefix_cache_info[-1]["stopped_at_step"] = self.state.global_step
            self.prefix_cache.close()
        self.prefix_cache, self._prefix_sizes = None, {}

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._drop_ahead()
            if self.prefix_cache is not None and self.prefix_cache.temporary:
                self._prefix_drop("training ended")


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
