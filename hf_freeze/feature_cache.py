"""Linear-probe feature cache: while everything below the head is frozen, run the backbone once per example.

During a head-only phase every epoch recomputes the same backbone features. ``FeatureCacheTrainerMixin``
(part of ``FreezeTrainer``) computes them once and trains the head on them: training batches become
example indices and the classification model runs with its backbone replaced by a lookup, through the
Trainer's own ``compute_loss`` (label smoothing, dropout, head-side norms, classifier and loss unchanged).
When a schedule unfreezes a group, batches are rebuilt from the real examples.

**When.** Not from a list of layer types to avoid: a *probe* runs the real training step's forward
(training mode, the run's autocast, the Trainer's compute_loss) on a sample batch and uses the cache only
if it shows that caching cannot change anything:

* the backbone gives bit-identical outputs when run twice, consumes no random numbers (any dropout,
  attention dropout, drop-path or stochastic depth does) and leaves its buffers untouched;
* each example's features do not depend on its position in the batch or on its batch mates (rearranged
  sample batches put 4 examples last, where vectorised CPU kernels may round a tensor's tail differently;
  16 when a layer's output per example is not a multiple of ``TAIL_MULTIPLE`` values);
* the loss and logits computed from the cached features equal those of the real step, bit for bit;
* plus what a probe cannot see: the policy trains nothing below the head (no adapter, no ``train_bn``),
  data loading runs in the main process, no wrapper (torch.compile, FSDP, DeepSpeed, DataParallel) computes
  the backbone differently, and the checks of :mod:`hf_freeze.cache_safety` pass: no Trainer subclass
  overrides a method that sees the (index) batches, the dataset has no ``set_epoch``, and one read of every
  example before training, in the batches the cache is built from, draws no random numbers and gives each
  example the row it gets when collated alone (a padding or mixing collator fails this); the build's own
  read must then give the same bits (an augmentation with a private generator fails this).

**Same computation.** Features are computed lazily at the first training step, after the checkpoint of a
resumed run is loaded and the unfreeze events already due have fired (a phase that is over is never
cached), with the model's own forward (as ``compute_loss`` calls it, the same batch size and autocast); a
forward hook takes the backbone's output and stops the forward there.

**Key.** A digest of the backbone's tensors as they are when the features are computed, of its modules (each
submodule's class, its attributes such as a pooling layer's, its forward hooks), of the model class/config,
device type, autocast dtype, batch size and the torch and transformers versions, and of every training batch.

**Storage.** ``memory``: per process. ``disk``: one safetensors file per key (fixed-shape tensors, any
dtype, no ``datasets`` needed) whose header carries the digest of every tensor; a file that fails the
check or cannot be read is rebuilt with a warning. It is written to a temporary file and renamed, removed
on any exception; temporary files of dead processes are cleaned up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from . import cache_safety as safety
from .cache_safety import batch_digest, identical
from .checks import unknown_choice
from .errors import FreezePolicyError
from .fingerprint import combined, digests, tensor_digest
from .names import peft_wrappers, unwrap_model
from .state import get_state

logger = logging.getLogger(__name__)
INDEX_KEY = "_hf_freeze_index"
MODES = ("auto", "off", "memory", "disk")
FORMAT = "hf_freeze-features/2"
BATCH_KEYS = {"pixel_values", "labels"}
#: CPU kernels vectorise elementwise ops (SLEEF exp/sigmoid/...) and finish a tensor's last elements with scalar
#: code that can round differently: when a layer's output size per example is not a multiple of this, the
#: batch's last example is checked at many more positions
TAIL_MULTIPLE = 32
#: config entries that only the head (or bookkeeping) reads: a change of labels keeps the cached features
HEAD_ONLY_CONFIG = {"id2label", "label2id", "num_labels", "problem_type", "freeze_policy", "hf_freeze_head",
                    "_name_or_path", "transformers_version", "architectures", "finetuning_task",
                    "dtype", "torch_dtype"}  # written by save_pretrained; the tensors' own dtypes are digested
_MEMORY: dict[str, FeatureCache] = {}  # the in-process cache, most recently stored last
MEMORY_ENTRIES = 4  # older entries are dropped (each holds a dataset's features, maybe on the GPU)


class DataChanged(RuntimeError):
    """The dataset returned different inputs for the same examples during the build (random augmentation)."""


# =========================================================================== where the backbone is

def backbone_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The single top-level child holding every non-head parameter (None if there is no such child)."""
    state = get_state(model)
    head = set(state.groups["head"].param_names)
    owners = {n.split(".")[0] for g in state.groups if g.name != "head" for n in g.param_names}
    if len(owners) != 1:
        return None
    name = owners.pop()
    if any(n.startswith(f"{name}.") for n in head):
        return None
    return name, getattr(unwrap_model(model), name)


def resolve_mode(explicit: str | None, args) -> str:
    """The cache mode (``feature_cache=`` of the Trainer, else of the arguments); FreezePolicyError for an unknown
    mode, or a ``feature_cache_dir`` that cannot be a folder while a cache may be used."""
    mode = explicit or getattr(args, "feature_cache", None) or "auto"
    if mode not in MODES:
        raise FreezePolicyError(unknown_choice("feature_cache", mode, MODES))
    problem = mode != "off" and safety.cache_dir_problem(getattr(args, "feature_cache_dir", None))
    if problem:
        raise FreezePolicyError(problem)
    return mode


def policy_refusal(model: nn.Module) -> str | None:
    """What in the freeze policy or the model rules the cache out (None: nothing)."""
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        return "no freeze policy is applied"
    trainable = state.trainable_below_head()
    if trainable:
        return f"group(s) {trainable} below the head are trainable, so backbone features change every step"
    found = backbone_module(model)
    if found is None:
        return model_refusal(model, state, [], "the backbone") or (
            "the backbone is not one module separate from the head (the head lives inside it, or it is split)")
    name, backbone = found
    return model_refusal(model, state, [*backbone.parameters(), *backbone.buffers()], name)


def model_refusal(model: nn.Module, state, tensors: list[torch.Tensor], where: str) -> str | None:
    """What in the policy or the model rules out caching the output of the frozen part ``where`` (whose parameters
    and buffers are ``tensors``); both caches check this (:mod:`hf_freeze.prefix_cache` too)."""
    if state.policy.train_bn:
        return "train_bn=True: frozen BatchNorm layers update their statistics in every forward pass"
    if getattr(state.policy, "adapter", None) is not None or peft_wrappers(model):
        return f"adapters (PEFT) train inside {where}, so its output changes every step"
    if any(t.is_meta for t in tensors):
        return f"{where} has weights on the meta device (offloaded by device_map), which cannot be digested"
    if len({t.device for t in tensors}) > 1:
        return f"{where} is spread over several devices (device_map)"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return "a module is compiled (module.compile()): compiled kernels may round differently from the eager pass"
    return None


def setup_refusal(args, *, compiled: bool, sharded: str | None, custom_loss: bool) -> str | None:
    """What in the training arguments or the Trainer rules the cache out (None: nothing)."""
    if getattr(args, "dataloader_num_workers", 0):
        return "dataloader_num_workers > 0 (the cache serves batches from the main process)"
    if compiled or getattr(args, "torch_compile", False):
        return ("torch.compile: compiled kernels may round the backbone differently from the eager pass that fills "
                "the cache (and the cached head step would recompile)")
    if sharded:
        return f"{sharded} shards the backbone; the cache runs one whole-model forward per process"
    if getattr(args, "n_gpu", 1) > 1:
        return "DataParallel (several GPUs in one process) replicates the backbone lookup; use DDP (torchrun)"
    if custom_loss:
        return "a compute_loss_func counts label tokens per batch, which cached batches (indices) do not carry"
    if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None):
        return "include_num_input_tokens_seen counts pixel_values, which cached batches (indices) do not carry"
    return None


def dataset_refusal(dataset, fetch: Callable[[list[int]], dict]) -> str | None:
    """Whether the dataset can be indexed, keeps its examples across epochs (no ``set_epoch``) and returns the
    same inputs for the same example: the first 4 and 12 spread up to the last are read 3 times each, and no read
    may draw random numbers (:func:`hf_freeze.cache_safety.reads_refusal`). Cheap, before the probe; the whole
    dataset is checked by :func:`hf_freeze.cache_safety.read_pass` before training."""
    return safety.dataset_refusal(dataset) or safety.reads_refusal(fetch, safety.spread(len(dataset)))


def build_batches(n: int, size: int) -> list[list[int]]:
    """The batches a cache is computed in: consecutive examples, the last batch filled up from the start."""
    return [[(start + j) % n for j in range(size)] for start in range(0, n, size)]


# =========================================================================== RNG, buffers, digests

_rng_state, _set_rng, _same_rng, _rng_preserved = safety.rng_state, safety.set_rng, safety.same_rng, safety.rng_preserved


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Restore every buffer (a trainable head's BatchNorm statistics) after probe forwards."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore():
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)

    try:
        yield restore
    finally:
        restore()


@contextlib.contextmanager
def _training_mode(model: nn.Module):
    """``model.train()`` as the Trainer calls it on every step; every module's flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def output_tensors(out, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) model output, by path."""
    if isinstance(out, torch.Tensor):
        return {prefix or "output": out}
    items = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else ()
    found = {}
    for k, v in items:
        if v is not None:
            found.update(output_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return found


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not identical(a[k], b[k]))


def _config_digest(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "-"
    entries = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in HEAD_ONLY_CONFIG}
    entries["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return hashlib.blake2b(json.dumps(entries, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def autocast_of(device: torch.device) -> str:
    """The autocast dtype in force for ``device`` right now ('none' outside autocast)."""
    return str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "none"


# =========================================================================== capturing the backbone's output

class _Stop(Exception):
    """Raised by the capture hook to end a forward once the backbone has run."""


@dataclass
class _Capture:
    outputs: list = field(default_factory=list)
    autocast: str = "none"  # the autocast dtype in force when the backbone ran
    ragged_tail: bool = False  # some layer output's size per example is not a multiple of TAIL_MULTIPLE
    rng_moved: bool = False
    buffers_changed: list[str] = field(default_factory=list)


@contextlib.contextmanager
def capturing(backbone: nn.Module, *, stop: bool = False, check: bool = False):
    """Record what ``backbone`` returns in the forwards inside the block; ``stop``: end the forward right there.

    ``check``: also record whether the backbone used random numbers or changed one of its buffers.
    """
    record = _Capture()
    before: dict = {}

    def pre(module, args, kwargs):
        if check:
            before["rng"] = _rng_state()
            before["buffers"] = {n: b.detach().clone() for n, b in module.named_buffers()}

    def post(module, args, kwargs, out):
        # a copy if the forward goes on: the head may modify the output in place (MobileNet's inplace dropout)
        record.outputs.append(out if stop else _copied(out))
        record.autocast = autocast_of(next(module.parameters()).device)
        if check:
            record.rng_moved |= not _same_rng(before["rng"], _rng_state())
            now = dict(module.named_buffers())
            record.buffers_changed += [n for n, b in before["buffers"].items() if not identical(b, now[n])]
        if stop:
            raise _Stop

    def sizes(module, args, out):
        for t in output_tensors(out).values():
            rows = t.shape[0] if t.dim() else 0
            record.ragged_tail |= bool(rows) and (t.numel() // rows) % TAIL_MULTIPLE != 0

    handles = [backbone.register_forward_pre_hook(pre, with_kwargs=True),
               backbone.register_forward_hook(post, with_kwargs=True)]
    if check:
        handles += [m.register_forward_hook(sizes) for m in backbone.modules() if m is not backbone]
    try:
        yield record
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _copied(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, dict):
        return type(out)(**{k: _copied(v) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_copied(v) for v in out)
    return out


def backbone_output(model: nn.Module, backbone: nn.Module, batch: dict) -> _Capture:
    """What the backbone returns (and under which autocast) when ``model`` runs on ``batch``; the forward stops
    right after the backbone."""
    with capturing(backbone, stop=True) as record:
        model(**batch)
    if len(record.outputs) != 1:
        raise RuntimeError(f"the backbone ran {len(record.outputs)} times in one forward")
    return record


@contextlib.contextmanager
def backbone_replaced(backbone: nn.Module, out):
    """``backbone`` returns ``out`` without computing anything inside the block."""
    backbone.forward = lambda *a, **k: out
    try:
        yield
    finally:
        del backbone.forward


def placeholder_inputs(labels: torch.Tensor) -> dict:
    return {"pixel_values": torch.empty(len(labels), 0, device=labels.device), "labels": labels}


# =========================================================================== the probe

@dataclass
class Plan:
    """What the probe established: which backbone output fields the head needs, and the sample's digest."""

    backbone: str
    fields: list[str]
    output_cls: type
    n: int
    batch_size: int
    first_digest: str
    autocast: str
    data_digest: str = ""  # of every batch of ``batch_size`` as the build reads them, taken before training


@dataclass
class ProbeResult:
    refusal: str | None  # None: the cache gives the same step
    fields: list[str] = field(default_factory=list)  # the backbone output fields the head needs
    output_cls: type | None = None
    autocast: str = "none"  # the autocast dtype the backbone runs under


def probe(model: nn.Module, loss_fn: Callable, fetch: Callable[[list[int]], dict], n: int, size: int) -> ProbeResult:
    """Run the real training forward on sample batches and decide whether cached features give the same step.

    ``loss_fn(inputs) -> (loss, outputs)``: the Trainer's compute_loss under its context managers, model in
    training mode, no grad. ``fetch(rows)``: the collated, prepared batch of those examples; ``n`` examples,
    batches of ``size``.
    """
    inner = unwrap_model(model)
    name, backbone = backbone_module(inner)
    sample = fetch(list(range(size)))
    extra = sorted(set(sample) - BATCH_KEYS)
    if extra:
        return ProbeResult(f"training batches carry inputs besides pixel_values and labels ({extra})")
    with _rng_preserved() as rng0, _buffers_kept(inner) as restore:
        runs = []
        for _ in range(2):  # the RNG is not reset between the runs: randomness shows up as a difference too
            restore()
            with capturing(backbone, check=True) as record:
                loss, outputs = loss_fn(dict(sample))
            runs.append((record, loss, outputs))
        (first, loss, outputs), (second, _, _) = runs
        if len(first.outputs) != 1:
            return ProbeResult(f"{name} runs {len(first.outputs)} times in one forward")
        if first.rng_moved or second.rng_moved:
            return ProbeResult(f"{name} draws random numbers in training mode (dropout, attention dropout, drop-path "
                               "or stochastic depth): its features differ at every epoch")
        changed = sorted(set(first.buffers_changed + second.buffers_changed))
        if changed:
            return ProbeResult(f"{name} changes its buffers in training mode ({changed[:3]}): its features drift")
        out = first.outputs[0]
        every = output_tensors(out)
        differ = _differing(every, output_tensors(second.outputs[0]))
        if differ:
            return ProbeResult(f"{name} gives different outputs for the same batch ({differ[:3]}): not deterministic")
        if not hasattr(out, "items"):
            return ProbeResult(f"{name} does not return a ModelOutput (got {type(out).__name__})")
        ragged = [k for k, v in every.items() if not v.dim() or v.shape[0] != size]
        if ragged:
            return ProbeResult(f"{name}'s output {ragged[:3]} is not one row per example")

        def features(rows):
            restore()
            with capturing(backbone, stop=True) as record:
                loss_fn(fetch(rows))
            return output_tensors(record.outputs[0])

        differ = batch_dependence(features, every, n, size, last=16 if first.ragged_tail else 4)
        if differ:
            return ProbeResult(f"{name}'s features of an example change with its position in the batch or with "
                               f"the other examples in it ({differ[:3]}): batch statistics (BatchNorm without "
                               "running statistics), or kernels that round the batch's last rows differently")
        top = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        candidates = [["pooler_output"]] if "pooler_output" in top and len(top) > 1 else []
        candidates.append(sorted(top))
        idx = torch.arange(size, device=sample["labels"].device)
        for fields in candidates:  # served exactly as in training: rows gathered from stored tensors
            restore()
            _set_rng(rng0)
            served = type(out)(**{k: top[k].detach().clone()[idx] for k in fields})
            try:
                with backbone_replaced(backbone, served):
                    c_loss, c_outputs = loss_fn(placeholder_inputs(sample["labels"]))
            except Exception:  # the head needs more than these fields
                continue
            if identical(loss, c_loss) and not _differing(_logits(outputs), _logits(c_outputs)):
                return ProbeResult(None, fields, type(out), first.autocast)
        return ProbeResult("the head's loss computed from cached features differs from the real step's "
                           "(it reads something besides the backbone's tensor outputs)")


def batch_dependence(features: Callable[[list[int]], dict], first: dict, n: int, size: int, last: int = 16) -> list[str]:
    """Output fields whose rows change when examples move within a batch or get other batch mates.

    ``features(rows)``: backbone outputs of a batch of those examples; ``first``: those of rows ``0..size-1``.
    Batches: the first half of the sample after copies of itself (other batch mates), then rotations of the
    sample (and of a second sample when ``last`` > 8): about ``last`` examples come last, where vectorised
    kernels may round a tensor's tail elements differently.
    """
    if size < 2:
        return []
    half = size - size // 2
    shuffles = [(list(range(size)), first, [*reversed(range(size - half)), *range(half)])]
    groups = [(list(range(size)), first)]
    if n > size and last > 8:
        second = [(size + j) % n for j in range(size)]
        groups.append((second, features(second)))
    per_group = min(size - 1, max(1, (last - 2) // len(groups)))
    for ids, ref in groups:
        shuffles += [(ids, ref, [*range(r, size), *range(r)]) for r in range(1, per_group + 1)]
    for ids, ref, positions in shuffles:
        got = features([ids[p] for p in positions])
        rows = torch.tensor(positions, device=next(iter(ref.values())).device)
        differ = [k for k in ref if not identical(ref[k][rows], got[k])]
        if differ:
            return differ
    return []


def _logits(outputs) -> dict[str, torch.Tensor]:
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    return {"logits": logits} if logits is not None else {}


# =========================================================================== the cache

@dataclass
class FeatureCache:
    """Backbone outputs for every training example (rows in dataset order), and how to train the head on them."""

    backbone: str
    output_cls: type
    fields: dict[str, torch.Tensor]
    labels: torch.Tensor
    key: str
    source: str = "computed"  # "computed", "memory" or "disk"
    seconds: float = 0.0

    @property
    def reused(self) -> bool:
        return self.source != "computed"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, plan: Plan, fetch: Callable[[list[int]], dict], prepare: Callable[[dict], dict],
              *, size: int | None = None, mode: str = "memory", cache_dir: str | os.PathLike | None = None,
              progress: bool = True) -> FeatureCache:
        """Compute (or reuse) every example's features, with ``model``'s own forward, in the current context.

        Every row is computed in a batch of exactly ``size`` examples (default: the plan's batch size; the last
        batch is filled up with the first examples), as kernels may round differently at another batch size.
        ``fetch(indices)``: the collated batch on the CPU; ``prepare``: moves it where the model is.
        """
        start = time.perf_counter()
        size = size or plan.batch_size
        inner = unwrap_model(model)
        backbone = getattr(inner, plan.backbone)
        device = next(backbone.parameters()).device
        model_type = getattr(getattr(inner, "config", None), "model_type", None) or type(inner).__name__
        prefix = f"{model_type}-{model_key(inner, plan, device, size)[:20]}"
        folder = cache_folder(cache_dir)
        known = [k for k in _MEMORY if k.startswith(prefix)]
        if mode == "disk" and folder.is_dir():
            clean_stale_temps(folder)
            known += [p.name.removesuffix(".safetensors") for p in folder.glob(f"{prefix}-*.safetensors")]
        data = plan.data_digest if size == plan.batch_size and plan.data_digest else None
        passes = dict(model=model, backbone=backbone, plan=plan, size=size, fetch=fetch, prepare=prepare,
                      progress=progress)
        if data is None and known:  # something is cached for these weights: digest the data, compute only on a miss
            data = _data_pass(**passes, compute=False)[0]
        if data is not None:
            key = f"{prefix}-{data[:20]}-{plan.n}"
            if key in _MEMORY:
                cache = _MEMORY[key].to(device)
                if mode == "disk" and not (folder / f"{key}.safetensors").is_file():
                    save(cache, folder / f"{key}.safetensors")
                return cache.since(start, "memory")
            if mode == "disk":
                loaded = load(folder / f"{key}.safetensors", key, device)
                if loaded is not None:
                    _remember(loaded)
                    return loaded.since(start, "disk")
        digest, fields, labels = _data_pass(**passes, compute=True)
        if data is not None and digest != data:
            raise DataChanged("the dataset returned different inputs on a second read")
        key = f"{prefix}-{digest[:20]}-{plan.n}"
        cache = cls(plan.backbone, plan.output_cls, fields, labels, key)
        if mode == "disk":
            save(cache, folder / f"{key}.safetensors")
        _remember(cache)
        return cache.since(start, "computed")

    def since(self, start: float, source: str) -> FeatureCache:
        return FeatureCache(self.backbone, self.output_cls, self.fields, self.labels, self.key, source,
                            time.perf_counter() - start)

    def to(self, device) -> FeatureCache:
        self.fields = {k: v.to(device) for k, v in self.fields.items()}
        self.labels = self.labels.to(device)
        return self

    # ------------------------------------------------------------------ training on the cache
    @contextlib.contextmanager
    def serving(self, model: nn.Module, indices: torch.Tensor):
        """Inside the block the model's backbone returns the cached rows ``indices``; yields the batch to train on."""
        idx = indices.to(self.labels.device)
        out = self.output_cls(**{k: v[idx] for k, v in self.fields.items()})
        with backbone_replaced(getattr(unwrap_model(model), self.backbone), out):
            yield placeholder_inputs(self.labels[idx])


def _remember(cache: FeatureCache) -> None:
    _MEMORY.pop(cache.key, None)
    _MEMORY[cache.key] = cache
    while len(_MEMORY) > MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))


def model_key(inner: nn.Module, plan: Plan, device: torch.device, size: int) -> str:
    """Digest of everything but the data that determines the cached features, taken now: the backbone's tensors
    and modules (classes, attributes such as a pooling layer's, forward hooks), the model class and config, the
    torch and transformers versions, device type, autocast, batch size and the fields kept."""
    backbone = getattr(inner, plan.backbone)
    return weights_key(inner, dict((*backbone.named_parameters(), *backbone.named_buffers())), FORMAT, plan.backbone,
                       device, plan.autocast, size, ",".join(plan.fields), modules=backbone)


def weights_key(inner: nn.Module, tensors: dict[str, torch.Tensor], fmt: str, module: str, device: torch.device,
                autocast: str, *parts, modules: nn.Module | None = None) -> str:
    """The model side of a cache key (both caches key through here, :mod:`hf_freeze.prefix_cache` too): the digests
    of ``tensors`` (what computes the cached output of ``module``), the model's class and config, torch and
    transformers, device, autocast, the cache's own ``parts`` and, given ``modules``, their classes, attributes and
    hooks (:func:`hf_freeze.cache_safety.modules_digest`)."""
    return combined(digests(tensors), fmt, f"{type(inner).__module__}.{type(inner).__qualname__}", module,
                    torch.__version__, transformers.__version__, device.type, autocast, *parts, _config_digest(inner),
                    safety.modules_digest(modules) if modules is not None else "")


def _data_pass(model, backbone, plan: Plan, size: int, fetch, prepare, *, compute: bool, progress: bool):
    """One pass over the data in batches of ``size``: the data digest, and (``compute``) the features and labels."""
    h = hashlib.blake2b(digest_size=16)
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in plan.fields}
    labels = []
    with _rng_preserved(), torch.no_grad():
        for ids in tqdm(build_batches(plan.n, size), disable=not progress, unit="batch",
                        desc="hf_freeze: caching backbone features" if compute else "hf_freeze: digesting the data"):
            start, rows = ids[0], min(size, plan.n - ids[0])
            raw = fetch(ids)  # the last batch filled up from the start
            digest = batch_digest(raw)
            if start == 0 and size == plan.batch_size and digest != plan.first_digest:
                raise DataChanged("the first batch differs from the one the probe read")
            h.update(digest.encode())
            if compute:
                batch = prepare(raw)
                record = backbone_output(model, backbone, batch)
                if record.autocast != plan.autocast:
                    raise RuntimeError(f"the backbone runs under autocast {record.autocast} at the first training step, "
                                       f"under {plan.autocast} when probed")
                out = record.outputs[0]
                for k in plan.fields:
                    chunks[k].append(out[k].detach()[:rows])
                labels.append(batch["labels"][:rows])
    if not compute:
        return h.hexdigest(), None, None
    return h.hexdigest(), {k: torch.cat(v) for k, v in chunks.items()}, torch.cat(labels)


# =========================================================================== on disk

def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """The folder on-disk caches go to (both caches): ``feature_cache_dir``, else :func:`default_dir`."""
    return Path(cache_dir) if cache_dir else default_dir()


def default_dir() -> Path:
    return Path(os.environ.get("HF_FREEZE_CACHE", Path.home() / ".cache" / "hf_freeze")) / "features"


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temporary files left by builds of processes on this host that no longer run."""
    removed = []
    host = socket.gethostname()
    for p in folder.glob("*.safetensors.tmp.*"):
        owner_host, _, pid = p.name.rsplit(".tmp.", 1)[1].rpartition(".")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
            logger.info("hf_freeze: removed %s, left by an interrupted feature-cache build", p)
    return removed


def save(cache: FeatureCache, path: Path) -> None:
    """Write ``cache`` atomically: a temporary file renamed into place, deleted if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tensors = {f"field.{k}": v.detach().contiguous().cpu() for k, v in cache.fields.items()}
    tensors["labels"] = cache.labels.detach().contiguous().cpu()
    meta = {"format": FORMAT, "key": cache.key, "backbone": cache.backbone,
            "output_class": f"{cache.output_cls.__module__}:{cache.output_cls.__qualname__}",
            "checksums": json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)}
    tmp = _temp_name(path)
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path, key: str, device) -> FeatureCache | None:
    """The cache stored at ``path`` on ``device``; None (with a warning) if it is absent, unreadable or fails its checksums."""
    if not path.is_file():
        return None
    problem = None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        sums = json.loads(meta.get("checksums", "{}"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            problem = f"it was written for another key or format ({meta.get('key')}, {meta.get('format')})"
        elif set(sums) != set(tensors) or "labels" not in tensors:
            problem = "its list of tensors does not match its checksums"
        else:
            bad = [k for k, v in tensors.items() if tensor_digest(v) != sums[k]]
            if bad:
                problem = f"tensor(s) {bad} fail their checksum (the file was modified)"
            else:
                module, qual = meta["output_class"].split(":")
                output_cls = importlib.import_module(module)
                for part in qual.split("."):
                    output_cls = getattr(output_cls, part)
    except Exception as e:  # truncated or garbled header/data, missing class: rebuild
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem:
        logger.warning("hf_freeze: feature cache %s is not usable: %s; recomputing it", path, problem)
        return None
    labels = tensors.pop("labels").to(device)
    fields = {k.removeprefix("field."): v.to(device) for k, v in tensors.items()}
    return FeatureCache(meta["backbone"], output_cls, fields, labels, key, "disk")


# =========================================================================== the Trainer side

class IndexDataset(torch.utils.data.Dataset):
    """Stand-in training dataset while the cache serves: item i is just its index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {INDEX_KEY: i}


def collate_indices(items: list[dict]) -> dict:
    return {INDEX_KEY: torch.tensor([it[INDEX_KEY] for it in items])}


class FeatureCacheTrainerMixin:
    """Trainer hooks of the linear-probe feature cache (``FreezeTrainerMixin`` includes them).

    Attributes: ``feature_cache_mode``; ``feature_cache_refusal`` (why the cache is not used, or None);
    ``feature_cache`` (the :class:`FeatureCache` while it serves); ``feature_cache_info`` (key, source
    computed/memory/disk, rows, fields, dtype, seconds, steps served).
    """

    def _init_feature_cache(self, mode: str) -> None:
        self.feature_cache_mode = mode
        self.feature_cache: FeatureCache | None = None
        self.feature_cache_refusal: str | None = None
        self.feature_cache_info: dict = {}
        self._feature_cache_plan: Plan | None = None
        self._feature_cache_source = None
        self._feature_cache_sizes: dict[int, FeatureCache] = {}

    # ------------------------------------------------------------------ the real examples
    def _real_source(self):
        """(dataset, collator) exactly as the Trainer's training dataloader would use them."""
        if self._feature_cache_source is None:
            ds = sys.modules.get("datasets")  # a datasets.Dataset can exist only once datasets is imported
            if ds is not None and isinstance(self.train_dataset, ds.Dataset):
                self._feature_cache_source = (self._remove_unused_columns(self.train_dataset, description="Training"),
                                              self.data_collator)
            else:
                self._feature_cache_source = (self.train_dataset, self._get_collator_with_removed_columns(
                    self.data_collator, description="Training"))
        return self._feature_cache_source

    def _real_batch(self, indices) -> dict:
        """Collate the real training examples ``indices`` exactly as the Trainer's dataloader would."""
        dataset, collator = self._real_source()
        return collator([dataset[int(i)] for i in indices])

    def _forward_context(self):
        """The context of the training step's forward: compute_loss's, plus accelerate's autocast if the model
        is not prepared yet (once prepared, its forward carries the autocast itself)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.compute_loss_context_manager())
        if self.accelerator.native_amp and not hasattr(self.model, "_original_forward"):
            stack.enter_context(self.accelerator.autocast())
        return stack

    # ------------------------------------------------------------------ deciding
    def _cache_refusal(self) -> str | None:
        """The checks both caches make before probing (the arguments, the Trainer subclass, the dataset and its
        collator): :mod:`hf_freeze.prefix_cache` calls this too, so a check added here guards both."""
        reason = setup_refusal(
            self.args, compiled=any(hasattr(m, "_orig_mod") for m in (self.model, self.model_wrapped)),
            sharded="FSDP" if self.is_fsdp_enabled else "DeepSpeed" if self.is_deepspeed_enabled else None,
            custom_loss=self.compute_loss_func is not None) or self._override_refusal()
        if reason:
            return reason
        self._feature_cache_source = None
        return dataset_refusal(self.train_dataset, self._real_batch)

    def _feature_cache_check(self) -> tuple[str | None, Plan | None]:
        reason = policy_refusal(self.model) or self._cache_refusal()
        if reason:
            return reason, None
        n, size = len(self.train_dataset), self._train_batch_size
        b = min(size, n)
        raw = self._real_batch(range(b))

        def loss_fn(inputs):
            with self._forward_context():
                return super(FeatureCacheTrainerMixin, self).compute_loss(self.model, inputs, return_outputs=True)

        try:
            with _training_mode(self.model), torch.no_grad():
                found = probe(self.model, loss_fn, lambda rows: self._prepare_inputs(self._real_batch(rows)), n, b)
        except Exception as e:  # the real step fails the same way: let the Trainer report it
            return f"the probe's training forward failed ({type(e).__name__}: {e})", None
        if found.refusal:
            return found.refusal, None
        dataset, collator = self._real_source()
        batches = build_batches(n, b)
        show = not self.args.disable_tqdm and self.args.should_log
        reason, data = safety.read_pass(dataset, collator, batches, total=len(batches),
                                        desc="hf_freeze: checking the data for the feature cache" if show else None)
        if reason:
            return reason, None
        return None, Plan(backbone_module(self.model)[0], found.fields, found.output_cls, n, b, batch_digest(raw),
                          found.autocast, data)

    def _override_refusal(self) -> str | None:
        """A subclass's method that would receive index batches it does not expect (see ``cache_safety``)."""
        return safety.override_refusal(type(self))

    def get_train_dataloader(self):
        self.feature_cache, self._feature_cache_plan, self.feature_cache_info = None, None, {}
        self.feature_cache_refusal, self._feature_cache_sizes = None, {}
        mode = self.feature_cache_mode
        if mode == "off":
            return super().get_train_dataloader()
        reason, plan = self._feature_cache_check()
        if reason:
            return self._no_feature_cache(reason, super().get_train_dataloader)
        self._feature_cache_plan = plan
        dataset, _ = self._real_source()
        collator, self.data_collator = self.data_collator, collate_indices
        try:  # same length, same sampler (built from the real dataset): the same indices in the same order
            return self._get_dataloader(dataset=IndexDataset(plan.n), description="Training",
                                        batch_size=self._train_batch_size,
                                        sampler_fn=lambda _: self._get_train_sampler(dataset), is_training=True)
        finally:
            self.data_collator = collator

    def _no_feature_cache(self, reason: str, fallback=None):
        self.feature_cache_refusal = reason
        if self.feature_cache_mode != "auto":
            raise FreezePolicyError(f"feature_cache={self.feature_cache_mode!r} would change results or cannot work: "
                                    f"{reason}. Use feature_cache='off' (or 'auto', which trains without it).")
        logger.info("hf_freeze: no feature cache: %s", reason)
        return fallback() if fallback else None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if INDEX_KEY not in self._signature_columns:
            self._signature_columns.append(INDEX_KEY)

    # ------------------------------------------------------------------ serving
    def _serving_cache(self, model, size: int) -> FeatureCache | None:
        """The cache to serve a batch of ``size`` rows from (None: the phase is over, use the real examples)."""
        plan = self._feature_cache_plan
        if plan is None or get_state(model).trainable_below_head():
            if plan is not None:
                logger.info("hf_freeze: a group below the head trains now: the linear-probe cache stops")
            if plan is not None and self.feature_cache_info:
                self.feature_cache_info["stopped_at_step"] = self.state.global_step
            self.feature_cache, self._feature_cache_plan, self._feature_cache_sizes = None, None, {}
            return None
        if self.feature_cache is None:
            self.feature_cache = self._build_feature_cache(plan.batch_size)
            if self.feature_cache is None:
                return None
            self._feature_cache_sizes = {plan.batch_size: self.feature_cache}
            cache = self.feature_cache
            first = next(iter(cache.fields.values()))
            self.feature_cache_info = {"key": cache.key, "source": cache.source, "rows": len(cache.labels),
                                       "fields": sorted(cache.fields), "dtype": str(first.dtype),
                                       "device": str(first.device), "seconds": cache.seconds,
                                       "built_at_step": self.state.global_step, "served_steps": 0,
                                       "batch_sizes": {plan.batch_size: cache.source}}
        if size not in self._feature_cache_sizes:
            self._feature_cache_sizes[size] = self._cache_for_size(plan, size)
        self.feature_cache_info["served_steps"] += 1
        return self._feature_cache_sizes[size]

    def _build_feature_cache(self, size: int) -> FeatureCache | None:
        try:
            with self._forward_context():
                cache = FeatureCache.build(self.model, self._feature_cache_plan, self._real_batch, self._prepare_inputs,
                                           size=size, mode="disk" if self.feature_cache_mode == "disk" else "memory",
                                           cache_dir=getattr(self.args, "feature_cache_dir", None),
                                           progress=not self.args.disable_tqdm and self.args.should_log)
        except DataChanged as e:
            self._feature_cache_plan = None
            self._no_feature_cache(f"the dataset returns different pixels for the same example ({e})")
            return None
        logger.info("hf_freeze: training the head on cached backbone features (%s, batches of %d, %s in %.2f s)",
                    cache.key, size, cache.source, cache.seconds)
        return cache

    def _cache_for_size(self, plan: Plan, size: int) -> FeatureCache | None:
        """Batches of another size (the last of an epoch): the main cache if the backbone gives the same bits at
        this batch size, else features computed in batches of this size."""
        raw = self._real_batch(range(size))
        backbone = getattr(unwrap_model(self.model), plan.backbone)
        with self._forward_context(), torch.no_grad(), _rng_preserved():
            out = backbone_output(self.model, backbone, self._prepare_inputs(raw)).outputs[0]
        main = self.feature_cache
        if all(identical(out[k].detach(), v[:size]) for k, v in main.fields.items()):
            self.feature_cache_info["batch_sizes"][size] = f"same bits as {plan.batch_size}"
            return main
        logger.info("hf_freeze: the backbone rounds differently in batches of %d than of %d: caching those too",
                    size, plan.batch_size)
        cache = self._build_feature_cache(size)  # None: the data changed, real examples from now on
        self.feature_cache_info["batch_sizes"][size] = cache.source if cache else "none (the data changed)"
        return cache

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if INDEX_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        indices = inputs[INDEX_KEY]
        cache = self._serving_cache(model, len(indices))
        if cache is None:
            real = self._prepare_inputs(self._real_batch(indices.tolist()))
            return super().compute_loss(model, real, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with cache.serving(model, indices) as cached:
            return super().compute_loss(model, cached, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
