"""Build an image classifier from a Hub id, a local folder or a tiny config, with or without weights."""

from __future__ import annotations

import contextlib

import torch


def classifier_class(config):
    """The ``*ForImageClassification`` class for ``config`` (the mapping may list several)."""
    import transformers

    from .tiny import image_classifier_class_names

    names = image_classifier_class_names(config.model_type)
    wanted = [a for a in (getattr(config, "architectures", None) or []) if a in names]
    return getattr(transformers, (wanted or list(names))[0])


def load_config(name_or_path: str, num_labels: int | None = None):
    """``tiny:<model_type>`` -> a tiny config; anything else -> ``AutoConfig.from_pretrained``."""
    from transformers import AutoConfig

    from .tiny import tiny_config

    if name_or_path.startswith("tiny:"):
        return tiny_config(name_or_path.removeprefix("tiny:"), num_labels or 3)
    kwargs = {"num_labels": num_labels} if num_labels else {}
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def build_classifier(name_or_path: str, *, weights: bool = False, num_labels: int | None = None):
    """A classifier for ``name_or_path``; without ``weights`` it is built on the meta device (shapes only)."""
    config = load_config(name_or_path, num_labels)
    cls = classifier_class(config)
    if weights and not name_or_path.startswith("tiny:"):
        return cls.from_pretrained(name_or_path, config=config, ignore_mismatched_sizes=bool(num_labels))
    ctx = torch.device("meta") if not weights else contextlib.nullcontext()
    with ctx:
        return cls(config)
