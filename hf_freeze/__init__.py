"""hf_freeze: declarative, verified layer freezing for Hugging Face image classifiers.

The names below are imported on first use (PEP 562), so ``import hf_freeze`` and ``hf-freeze --help``
load neither torch nor transformers, and optional packages (peft, datasets, optuna, matplotlib, timm,
evaluate) load only where they are used; benchmarks/import_time.py measures it.
"""

# ruff: noqa: F401

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    # policies and the core engine
    "FreezePolicy": "policy", "Unfreeze": "policy", "FreezePlan": "plan", "resolve": "plan",
    "LayerGroup": "groups", "LayerGroups": "groups", "layer_groups": "groups",
    "apply_policy": "apply", "remove_policy": "apply", "unfreeze_groups": "apply", "verify_frozen": "apply",
    "changed_frozen_tensors": "apply", "get_state": "state",
    "FreezeReport": "report", "freeze_report": "report", "Fingerprint": "fingerprint",
    "FreezePolicyError": "errors", "FrozenWeightsChanged": "errors", "UnsupportedModelError": "errors",
    # Trainer integration
    "FreezeCallback": "callback", "FreezeTrainer": "trainer", "FreezeTrainerMixin": "trainer",
    "FreezeArguments": "args", "FreezeTrainingArguments": "args", "policy_from_pretrained": "policy",
    "FreezeSearchSpace": "search", "SearchResult": "search", "search_freeze_policies": "search",
    # adapters
    "AdapterConfig": "adapter_config", "AdapterPlan": "adapter_plan", "add_adapter": "adapters", "load_adapter": "adapters",
    "save_adapter": "adapters",
    # sharing
    "CardConfig": "model_card", "render_model_card": "model_card", "write_model_card": "model_card",
    "DeltaArguments": "args", "DeltaManifest": "delta", "BaseModelChanged": "delta", "apply_delta": "delta",
    "save_delta": "delta", "from_pretrained": "delta", "PushFailed": "hub", "push_folder": "hub",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule, e.g. hf_freeze.tiny
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see (re-exports: names listed in __all__ through _EXPORTS)
    from .adapter_config import AdapterConfig
    from .adapter_plan import AdapterPlan
    from .adapters import add_adapter, load_adapter, save_adapter
    from .apply import apply_policy, changed_frozen_tensors, remove_policy, unfreeze_groups, verify_frozen
    from .args import DeltaArguments, FreezeArguments, FreezeTrainingArguments
    from .callback import FreezeCallback
    from .delta import BaseModelChanged, DeltaManifest, apply_delta, from_pretrained, save_delta
    from .errors import FreezePolicyError, FrozenWeightsChanged, UnsupportedModelError
    from .fingerprint import Fingerprint
    from .groups import LayerGroup, LayerGroups, layer_groups
    from .hub import PushFailed, push_folder
    from .model_card import CardConfig, render_model_card, write_model_card
    from .plan import FreezePlan, resolve
    from .policy import FreezePolicy, Unfreeze, policy_from_pretrained
    from .report import FreezeReport, freeze_report
    from .search import FreezeSearchSpace, SearchResult, search_freeze_policies
    from .state import get_state
    from .trainer import FreezeTrainer, FreezeTrainerMixin
