"""Linear-probe feature cache: while everything below the head is frozen, run the backbone once per image.

During a head-only phase every epoch recomputes the same backbone features. When that is provably safe
(all non-head groups frozen, frozen BatchNorm in inference mode, no active dropout/drop-path in the
backbone, the dataset returns the same pixels for the same example), ``FeatureCache`` computes the backbone
outputs once (progress bar), and the training batches become example indices: the classification model
runs with its backbone replaced by a lookup, so the head (dropout, pooling norms, classifier, loss) trains
exactly as before. When a schedule unfreezes a group, batches are rebuilt from the real examples again.

The cache lives in memory (per process) or on disk (Arrow via ``datasets``), keyed by the frozen backbone's
fingerprint and a digest of every example's inputs, so a second run on the same model and data reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .apply import get_state
from .groups import peft_wrappers, unwrap_model

logger = logging.getLogger(__name__)
INDEX_KEY = "_hf_freeze_index"
MODES = ("auto", "off", "memory", "disk")
_MEMORY: dict[str, dict] = {}


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
    return name, getattr(model, name)


def refusal(model: nn.Module, dataset, args) -> str | None:
    """Why caching would change results or cannot work here (None: it is safe)."""
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        return "no freeze policy is applied"
    trainable = state.trainable_below_head()
    if trainable:
        return f"group(s) {trainable} below the head are trainable, so backbone features change every step"
    if state.policy.train_bn:
        return "train_bn=True: frozen BatchNorm layers update their statistics in every forward pass"
    if getattr(state.policy, "adapter", None) is not None or peft_wrappers(model):
        return "adapters (PEFT) train inside the backbone, so its features change every step"
    found = backbone_module(model)
    if found is None:
        return "the backbone is not one module separate from the head (the head lives inside it, or it is split)"
    _, backbone = found
    active = [n for n, m in backbone.named_modules()
              if (isinstance(m, nn.Dropout) or "droppath" in type(m).__name__.lower()) and getattr(m, "p", getattr(m, "drop_prob", 0.0))]
    if active:
        return f"the backbone has active dropout/drop-path ({active[0]}, ...): its features are random in training mode"
    if getattr(args, "dataloader_num_workers", 0):
        return "dataloader_num_workers > 0 (the cache serves batches from the main process)"
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return "the training dataset has no length (an iterable dataset cannot be indexed)"
    if not _same_twice(dataset):
        return "the dataset returns different pixels for the same example (random augmentation)"
    return None


@contextlib.contextmanager
def _rng_preserved():
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _inputs_digest(item: dict) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(item):
        v = item[k]
        if isinstance(v, torch.Tensor):
            h.update(k.encode() + v.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, np.ndarray):
            h.update(k.encode() + np.ascontiguousarray(v).tobytes())
        else:
            h.update(f"{k}={v!r}".encode())
    return h.digest()


def _same_twice(dataset) -> bool:
    with _rng_preserved():
        return all(_inputs_digest(dataset[i]) == _inputs_digest(dataset[i]) for i in range(min(2, len(dataset))))


def _replaced_forward(module: nn.Module, fn):
    """Context manager: ``module.forward`` is ``fn`` inside the block."""

    @contextlib.contextmanager
    def ctx():
        module.forward = fn
        try:
            yield
        finally:
            del module.forward

    return ctx()


@dataclass
class FeatureCache:
    """Backbone outputs for every training example, and how to train the head on them."""

    output_cls: type
    fields: dict[str, torch.Tensor]
    labels: torch.Tensor
    key: str
    reused: bool = False

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, fetch, n: int, batch_size: int, mode: str = "memory",
              cache_dir: str | os.PathLike | None = None, progress: bool = True) -> FeatureCache:
        """Compute (or reuse) the features of examples ``0..n-1``; ``fetch(indices)`` gives a collated batch."""
        model = unwrap_model(model)
        state = get_state(model)
        name, backbone = backbone_module(model)
        prefix = f"{name}."
        weights = hashlib.blake2b(digest_size=16)
        for t, d in sorted(state.fingerprint.digests.items()):
            if t.startswith(prefix):
                weights.update(f"{t}={d};".encode())
        data = hashlib.blake2b(digest_size=16)
        with _rng_preserved():
            for i in range(n):
                data.update(_inputs_digest({k: v[0] for k, v in fetch([i]).items()}))
        key = f"{state.groups.model_type}-{weights.hexdigest()[:16]}-{data.hexdigest()[:16]}-{n}"
        if key in _MEMORY:
            return cls(**_MEMORY[key], key=key, reused=True)
        folder = Path(cache_dir or Path(os.environ.get("HF_FREEZE_CACHE", Path.home() / ".cache" / "hf_freeze")) / "features") / key
        if mode == "disk" and (folder / "dataset_info.json").is_file():
            cache = cls._load(folder, key)
            _MEMORY[key] = {"output_cls": cache.output_cls, "fields": cache.fields, "labels": cache.labels}
            return cache
        device = next(model.parameters()).device
        chunks: dict[str, list[torch.Tensor]] = {}
        labels, output_cls = [], None
        from tqdm.auto import tqdm

        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                for start in tqdm(range(0, n, batch_size), desc="hf_freeze: caching backbone features",
                                  disable=not progress, unit="batch"):
                    batch = fetch(list(range(start, min(n, start + batch_size))))
                    out = backbone(batch["pixel_values"].to(device))
                    output_cls = type(out)
                    for k, v in out.items():
                        if isinstance(v, torch.Tensor):
                            chunks.setdefault(k, []).append(v.detach())
                    labels.append(batch["labels"])
        finally:
            backbone.train(was_training)
        fields = {k: torch.cat(v) for k, v in chunks.items()}
        cache = cls(output_cls, fields, torch.cat(labels).to(device), key)
        cache._keep_only_what_the_head_reads(model)
        _MEMORY[key] = {"output_cls": cache.output_cls, "fields": cache.fields, "labels": cache.labels}
        if mode == "disk":
            cache._save(folder)
        return cache

    def _keep_only_what_the_head_reads(self, model: nn.Module) -> None:
        """Drop output fields the head does not use (e.g. a CNN's feature map when it reads the pooled vector)."""
        if len(self.fields) < 2 or "pooler_output" not in self.fields:
            return
        idx = torch.arange(min(4, len(self.labels)), device=self.labels.device)
        with torch.no_grad(), _rng_preserved():
            model.eval()
            full = self._logits(model, idx, self.fields)
            try:
                lean = self._logits(model, idx, {"pooler_output": self.fields["pooler_output"]})
            except Exception:  # the head needs more than the pooled vector
                lean = None
            model.train()
        if lean is not None and torch.equal(full, lean):
            self.fields = {"pooler_output": self.fields["pooler_output"]}

    def _logits(self, model, idx, fields):
        _, backbone = backbone_module(model)
        out = self.output_cls(**{k: v[idx] for k, v in fields.items()})
        with _replaced_forward(backbone, lambda *a, **k: out):
            return model(pixel_values=torch.empty(len(idx), 0)).logits

    def _save(self, folder: Path) -> None:
        import datasets

        cols = {k: v.cpu().numpy() for k, v in self.fields.items()}
        cols["labels"] = self.labels.cpu().numpy()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        datasets.Dataset.from_dict(cols).save_to_disk(str(tmp))
        (tmp / "output_class.txt").write_text(f"{self.output_cls.__module__}:{self.output_cls.__qualname__}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder) if not folder.exists() else None

    @classmethod
    def _load(cls, folder: Path, key: str) -> FeatureCache:
        import importlib

        import datasets

        module, qual = (folder / "output_class.txt").read_text().split(":")
        output_cls = getattr(importlib.import_module(module), qual)
        columns = datasets.load_from_disk(str(folder)).with_format("torch")[:]
        labels = columns.pop("labels")
        return cls(output_cls, columns, labels, key, reused=True)

    # ------------------------------------------------------------------ training on the cache
    def to(self, device) -> FeatureCache:
        self.fields = {k: v.to(device) for k, v in self.fields.items()}
        self.labels = self.labels.to(device)
        return self

    def forward(self, model: nn.Module, indices: torch.Tensor):
        """Run the classification model on cached backbone outputs for ``indices`` (loss included)."""
        inner = unwrap_model(model)
        _, backbone = backbone_module(inner)
        idx = indices.to(self.labels.device)
        out = self.output_cls(**{k: v[idx] for k, v in self.fields.items()})
        with _replaced_forward(backbone, lambda *a, **k: out):
            return model(pixel_values=torch.empty(len(idx), 0), labels=self.labels[idx])


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
