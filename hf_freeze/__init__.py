"""hf_freeze: declarative, verified layer freezing for Hugging Face image classifiers."""

from .apply import apply_policy, changed_frozen_tensors, get_state, remove_policy, unfreeze_groups, verify_frozen
from .errors import FreezePolicyError, FrozenWeightsChanged, UnsupportedModelError
from .fingerprint import Fingerprint
from .groups import LayerGroup, LayerGroups, layer_groups
from .policy import FreezePlan, FreezePolicy, Unfreeze, resolve
from .report import FreezeReport, freeze_report

__version__ = "0.1.0"

__all__ = [
    "FreezePlan", "FreezePolicy", "FreezePolicyError", "FreezeReport", "Fingerprint", "FrozenWeightsChanged",
    "LayerGroup", "LayerGroups", "Unfreeze", "UnsupportedModelError", "apply_policy", "changed_frozen_tensors",
    "freeze_report", "get_state", "layer_groups", "remove_policy", "resolve", "unfreeze_groups", "verify_frozen",
]

from .args import FreezeArguments, FreezeTrainingArguments  # noqa: E402
from .callback import FreezeCallback  # noqa: E402
from .trainer import FreezeTrainer, FreezeTrainerMixin, policy_from_pretrained  # noqa: E402

__all__ += ["FreezeArguments", "FreezeCallback", "FreezeTrainer", "FreezeTrainerMixin", "FreezeTrainingArguments",
            "policy_from_pretrained"]
from .search import FreezeSearchSpace, SearchResult, search_freeze_policies  # noqa: E402

__all__ += ["FreezeSearchSpace", "SearchResult", "search_freeze_policies"]

from .args import DeltaArguments  # noqa: E402
from .delta import BaseModelChanged, DeltaManifest, apply_delta, from_pretrained, save_delta  # noqa: E402
from .hub import PushFailed, push_folder  # noqa: E402
from .model_card import CardConfig, render_model_card, write_model_card  # noqa: E402

__all__ += ["BaseModelChanged", "CardConfig", "DeltaArguments", "DeltaManifest", "PushFailed", "apply_delta",
            "from_pretrained", "push_folder", "render_model_card", "save_delta", "write_model_card"]

from .adapters import AdapterConfig, AdapterPlan, add_adapter, load_adapter, save_adapter  # noqa: E402

__all__ += ["AdapterConfig", "AdapterPlan", "add_adapter", "load_adapter", "save_adapter"]
