"""Why a feature cache could change training: small pure checks shared by the caches.

A cache computes something once (backbone or prefix features) and serves it at every later step. That gives
the same training only if the thing computed once would have been the same at every step. Each function below
checks one condition and returns the reason it fails, as a sentence, or ``None`` when it holds. The caches
(:mod:`hf_freeze.feature_cache`, and the frozen-prefix cache) call them; ``auto`` trains without the cache for
that reason, a forced mode raises it as a FreezePolicyError.

* :func:`override_refusal` - a Trainer subclass overrides a method that would receive batches of example indices.
* :func:`dataset_refusal` - the dataset cannot be indexed, or changes its examples per epoch (``set_epoch``).
* :func:`reads_refusal` - reading the same examples again gives other bits or draws random numbers.
* :func:`collator_refusal` - the collator's row for an example depends on its batch mates (padding to the batch's
  largest example, mixup).
* :func:`read_pass` - one read of every example in the batches the cache is built from, with the two checks above
  on each batch: a class-restricted or rare augmentation anywhere in the data is seen.
* :func:`cache_dir_problem` - ``feature_cache_dir`` cannot be a folder.
* :func:`modules_digest` - for cache keys: what in the modules, besides their tensors, decides their output.

**Random augmentation.** Reading an example draws random numbers from the global generators (torch, numpy,
Python ``random``) when an augmentation does: torchvision's transforms, albumentations and most hand-written
ones use them. A draw is seen even when it happened to give the same pixels twice, so checking that reading
leaves the three generators' states unchanged is exact for them, at no extra read. Augmentations with a private
generator are seen when the bits differ between two reads of the same example (the caches read every example
twice: once to check, once to compute).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .fingerprint import tensor_digest

#: methods of the Trainer that see the training batches; with a cache they are batches of example indices
BATCH_METHODS = ("training_step", "compute_loss", "_prepare_inputs", "_prepare_input", "get_batch_samples")
#: packages whose Trainer methods know about index batches (transformers' own pass them on untouched)
KNOWN_OWNERS = ("transformers.", "hf_freeze.")
#: examples whose reads are checked before training: the first ones and this many spread over the dataset
SPREAD = 12


# =========================================================================== random generators

def rng_state() -> tuple:
    """The states of torch's (CPU and initialised CUDA), numpy's and Python's global random generators."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def set_rng(state: tuple) -> None:
    cpu, cuda, np_state, py_state = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)


def same_rng(a: tuple, b: tuple) -> bool:
    return (torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
            and a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:] and a[3] == b[3])


@contextlib.contextmanager
def rng_preserved():
    state = rng_state()
    try:
        yield state
    finally:
        set_rng(state)


# =========================================================================== bits

def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs with the same bits are identical, 0.0 and -0.0 are not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def batch_digest(batch: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(batch):
        v = batch[k]
        h.update(f"{k}:{tensor_digest(v) if isinstance(v, torch.Tensor) else repr(v)};".encode())
    return h.hexdigest()


# =========================================================================== the Trainer, the dataset, the collator

def override_refusal(trainer_cls: type, allowed: Sequence[str] = KNOWN_OWNERS) -> str | None:
    """A method in :data:`BATCH_METHODS` that a class outside ``allowed`` (module prefixes) overrides."""
    for name in BATCH_METHODS:
        owner = next((c for c in trainer_cls.__mro__ if name in c.__dict__), None)
        if owner is not None and not owner.__module__.startswith(tuple(allowed)):
            return (f"{owner.__name__} overrides {name}, which would receive batches of example indices instead of "
                    "the examples")
    return None


def dataset_refusal(dataset) -> str | None:
    """What in the dataset itself rules a cache out: no length, empty, or examples that follow the epoch."""
    if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return "the training dataset has no length (an iterable dataset cannot be indexed)"
    if len(dataset) == 0:
        return "the training dataset is empty"
    if callable(getattr(dataset, "set_epoch", None)):
        return (f"the training dataset ({type(dataset).__name__}) has set_epoch(), which the Trainer calls every "
                "epoch: its examples may change from epoch to epoch, the cache would keep the first epoch's")
    return None


def spread(n: int, first: int = 4, count: int = SPREAD) -> list[int]:
    """The first ``first`` indices and ``count`` more spread evenly up to the last one."""
    picked = dict.fromkeys(range(min(first, n)))
    if n > first:
        picked.update(dict.fromkeys(round(first + k * (n - 1 - first) / max(count - 1, 1)) for k in range(count)))
    return list(picked)


def reads_refusal(fetch: Callable[[list[int]], dict], indices: Iterable[int], times: int = 3) -> str | None:
    """Read each example ``times`` times with ``fetch([i])`` (collated): the reason if the bits differ or a read
    draws random numbers (the generators are restored afterwards)."""
    with rng_preserved():
        for i in indices:
            digests = set()
            for _ in range(times):
                before = rng_state()
                digests.add(batch_digest(fetch([i])))
                if not same_rng(before, rng_state()):
                    return (f"reading example {i} draws random numbers (random augmentation): the cache would keep "
                            "one draw")
            if len(digests) > 1:
                return f"the dataset returns different pixels for example {i} when read again (random augmentation)"
    return None


def collator_refusal(collator: Callable[[list], dict], items: list, batch: dict | None = None,
                     indices: Sequence[int] | None = None) -> str | None:
    """Whether ``collator(items)`` gives each example the row it gets collated alone: the cache stores rows
    computed in one batch and serves them in others. ``batch``: ``collator(items)`` if already computed."""
    batch = collator(items) if batch is None else batch
    for k, item in enumerate(items):
        alone = collator([item])
        name = indices[k] if indices is not None else k
        if set(alone) != set(batch):
            return f"the collator returns other fields for example {name} alone ({sorted(alone)}) than in a batch"
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or not isinstance(alone[key], torch.Tensor):
                return f"the collator returns {key!r} as {type(value).__name__}, not a tensor with a row per example"
            if value.dim() == 0 or value.shape[0] != len(items) or not identical(value[k], alone[key][0]):
                return (f"the collator's {key!r} row for example {name} depends on the other examples in its batch "
                        "(padding to the batch's largest example, mixing examples): a cached row would not be the "
                        "one of the training batch")
    return None


def read_pass(dataset, collator: Callable[[list], dict], batches: Iterable[Sequence[int]], *, desc: str | None = None,
              total: int | None = None) -> tuple[str | None, str]:
    """Read and collate ``batches`` of example indices once, as the cache will: (reason, data digest).

    The reason: reading a batch drew random numbers, or the collator gave an example another row than alone.
    The digest chains :func:`batch_digest` of every collated batch (the caches' data key). Generators restored.
    """
    h = hashlib.blake2b(digest_size=16)
    with rng_preserved():
        for ids in tqdm(batches, disable=desc is None, desc=desc, total=total, unit="batch"):
            before = rng_state()
            items = [dataset[int(i)] for i in ids]
            batch = collator(items)
            if not same_rng(before, rng_state()):
                return (f"reading or collating examples {list(ids)[:8]} draws random numbers (random augmentation "
                        "or mixing): the cache would keep one draw"), ""
            problem = collator_refusal(collator, items, batch, ids)
            if problem:
                return problem, ""
            h.update(batch_digest(batch).encode())
    return None, h.hexdigest()


def cache_dir_problem(path: str | os.PathLike | None, option: str = "feature_cache_dir") -> str | None:
    """Why ``path`` cannot be (made) the cache folder: it or a parent is an existing non-folder."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is" if q == p else f"lies inside {q}, which is"
                return f"{option} {str(path)!r} {what} a file, not a folder; give a folder (it is created if missing)"
            return None
    return None


# =========================================================================== keys

#: what ``nn.Module`` itself keeps in every instance (hooks are described on their own), and what transformers
#: records about loading (a model loaded from a folder and the same model built in memory compute the same)
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_is_hf_initialized", "name_or_path", "warnings_issued",
                                                       "all_tied_weights_keys"}


def _describe(value, depth: int = 0) -> str:
    """A process-independent description of an attribute value (ids and addresses left out)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                           torch.Size, enum.Enum)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return f"tensor:{tensor_digest(value.detach())}"
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, (tuple, list, set, frozenset)):
        parts = [_describe(v, depth + 1) for v in value]
        return f"{type(value).__name__}[{','.join(sorted(parts) if isinstance(value, (set, frozenset)) else parts)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!s}:{_describe(v, depth + 1)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, functools.partial):
        return f"partial({_describe(value.func, depth + 1)},{_describe(value.args, depth + 1)},{_describe(value.keywords, depth + 1)})"
    if callable(value) and hasattr(value, "__qualname__"):
        func = getattr(value, "__func__", value)
        return f"{getattr(func, '__module__', '')}.{func.__qualname__}"
    return f"{type(value).__module__}.{type(value).__qualname__}"  # objects (configs: digested on their own)


def modules_digest(module: nn.Module) -> str:
    """Digest of what besides parameters and buffers decides ``module``'s output: every submodule's name and
    class, its own attributes (pooling size, eps, activation function, plain tensors, an instance ``forward``)
    and its forward hooks. Two modules with the same tensors and the same digest compute the same function as
    far as their Python code is the same (the caches' keys add the torch and transformers versions)."""
    h = hashlib.blake2b(digest_size=16)
    for name, m in module.named_modules(remove_duplicate=False):
        cls = type(m)
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        hooks = [_describe(list(m._forward_pre_hooks.values())), _describe(list(m._forward_hooks.values()))]
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{_describe(attrs)}|{hooks}\n".encode())
    return h.hexdigest()
