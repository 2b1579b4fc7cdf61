"""Bit-exact fingerprints of frozen tensors.

Each tensor's raw bytes (dtype, shape and data) are hashed with BLAKE2b-128. Cost: one device->host
copy and one hash pass over the frozen bytes (about 1 GB/s on one CPU core), 16 bytes of state per
tensor; no copy of the weights is kept. ``benchmarks/fingerprint_cost.py`` measures it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.is_meta:  # shape-only models (``hf-freeze inspect``) have no data to hash
        return "meta:" + h.hexdigest()
    if t.numel():
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name; inside a PEFT-wrapped model, the pretrained ones under their unwrapped names."""
    from .groups import named_base_tensors

    return named_base_tensors(model)


@dataclass
class Fingerprint:
    """Digests of named tensors, taken once and compared on demand."""

    digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def take(cls, model: nn.Module, names: Iterable[str]) -> Fingerprint:
        tensors = named_tensors(model)
        return cls({n: tensor_digest(tensors[n]) for n in names})

    def changed(self, model: nn.Module) -> list[str]:
        tensors = named_tensors(model)
        return [n for n, d in self.digests.items() if n not in tensors or tensor_digest(tensors[n]) != d]

    def drop(self, names: Iterable[str]) -> None:
        for n in names:
            self.digests.pop(n, None)

    def combined(self) -> str:
        """One digest over all tensors (order-independent of insertion), for model cards and delta checkpoints."""
        h = hashlib.blake2b(digest_size=16)
        for n in sorted(self.digests):
            h.update(f"{n}={self.digests[n]};".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.digests)
