"""Which ``*ForImageClassification`` class a config builds, and a classifier built from a config (shapes only)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def image_classifier_class_names(model_type: str) -> tuple[str, ...]:
    """The class names transformers' image-classification mapping lists for ``model_type`` (KeyError: none)."""
    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    return names if isinstance(names, tuple) else (names,)


def classifier_class(config):
    """The ``*ForImageClassification`` class for ``config`` (the mapping may list several)."""
    names = image_classifier_class_names(config.model_type)
    wanted = [a for a in (getattr(config, "architectures", None) or []) if a in names]
    return getattr(transformers, (wanted or list(names))[0])


def load_config(name_or_path: str, num_labels: int | None = None):
    """``AutoConfig.from_pretrained`` of a Hub id or a folder (``tiny:<type>`` configs: :func:`hf_freeze.tiny.tiny_config`)."""
    kwargs = {"num_labels": num_labels} if num_labels else {}
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def build_classifier(config):
    """A classifier for ``config`` on the meta device: shapes and names only, no memory, no weights."""
    with torch.device("meta"):
        return classifier_class(config)(config)
