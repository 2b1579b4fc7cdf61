"""Keep normalisation layers with running statistics in inference mode while they are frozen.

The Trainer calls ``model.train()`` on every step, which would switch a frozen BatchNorm back to
batch statistics and update its running mean/var. A locked module gets an instance-level ``train``
that always stays in eval mode, so ``model.train()`` cannot undo it; unlocking deletes it.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .names import ModelNames


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    module.training = False
    return module


def stat_norms(model: nn.Module, names: ModelNames | None = None) -> dict[str, nn.Module]:
    """Modules whose forward updates running statistics in training mode (BatchNorm*, SyncBatchNorm, ...);
    inside a PEFT-wrapped model, the pretrained ones under their unwrapped names (``names``: the model's, if known)."""
    modules = (names or ModelNames.of(model)).base_modules(model)
    return {n: m for n, m in modules if isinstance(m, _NormBase) and m.track_running_stats}


def lock_eval(module: nn.Module) -> None:
    module.train = functools.partial(_stay_in_eval, module)
    module.training = False


def unlock(module: nn.Module, training: bool) -> None:
    if is_locked(module):
        del module.__dict__["train"]
    module.training = training


def is_locked(module: nn.Module) -> bool:
    fn = module.__dict__.get("train")
    return isinstance(fn, functools.partial) and fn.func is _stay_in_eval
