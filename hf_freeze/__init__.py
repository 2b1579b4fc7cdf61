"""hf_freeze: declarative, verified layer freezing for Hugging Face image classifiers."""

from .adapters import AdapterConfig, AdapterPlan, add_adapter, load_adapter, save_adapter
from .apply import apply_policy, changed_frozen_tensors, get_state, remove_policy, unfreeze_groups, verify_frozen
from .args import DeltaArguments, FreezeArguments, FreezeTrainingArguments
from .callback import FreezeCallback
from .delta import BaseModelChanged, DeltaManifest, apply_delta, from_pretrained, save_delta
from .errors import FreezePolicyError, FrozenWeightsChanged, UnsupportedModelError
from .fingerprint import Fingerprint
from .groups import LayerGroup, LayerGroups, layer_groups
from .hub import PushFailed, push_folder
from .model_card import CardConfig, render_model_card, write_model_card
from .policy import FreezePlan, FreezePolicy, Unfreeze, resolve
from .report import FreezeReport, freeze_report
from .search import FreezeSearchSpace, SearchResult, search_freeze_policies
from .trainer import FreezeTrainer, FreezeTrainerMixin, policy_from_pretrained

__version__ = "0.1.0"

__all__ = [
    # policies and the core engine
    "FreezePolicy", "Unfreeze", "FreezePlan", "resolve", "LayerGroup", "LayerGroups", "layer_groups",
    "apply_policy", "remove_policy", "unfreeze_groups", "verify_frozen", "changed_frozen_tensors", "get_state",
    "FreezeReport", "freeze_report", "Fingerprint",
    "FreezePolicyError", "FrozenWeightsChanged", "UnsupportedModelError",
    # Trainer integration
    "FreezeCallback", "FreezeTrainer", "FreezeTrainerMixin", "FreezeArguments", "FreezeTrainingArguments",
    "policy_from_pretrained", "FreezeSearchSpace", "SearchResult", "search_freeze_policies",
    # adapters
    "AdapterConfig", "AdapterPlan", "add_adapter", "load_adapter", "save_adapter",
    # sharing
    "CardConfig", "render_model_card", "write_model_card", "DeltaArguments", "DeltaManifest", "BaseModelChanged",
    "apply_delta", "save_delta", "from_pretrained", "PushFailed", "push_folder",
]
