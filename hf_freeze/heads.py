"""Put a task-specific head (:class:`~hf_freeze.HeadConfig`) in place of a model's linear classifier.

Where the classifier lives comes from the architecture table (``Layout.classifier``; timm: its
``pretrained_cfg``); its input width is that Linear's ``in_features``, its output the model's labels. Building the
head is :mod:`hf_freeze._head_module` (the same source travels into saved folders). The model's config records
the head (``hf_freeze_head``: the spec, the paths, the original model type and class) so a saved folder says what
to rebuild; :mod:`hf_freeze.folder` turns such a folder into one plain transformers loads with
``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ._head_module import MLPHead, install_heads
from .architectures import ARCHITECTURES, TIMM_MODEL_TYPE, timm_classifier
from .errors import FreezePolicyError
from .folder import HEAD_AUTO_MAP, head_model_type, write_head_code, write_head_files
from .head_config import HeadConfig

#: the config attribute recording an installed head
CONFIG_KEY = "hf_freeze_head"


def classifier_paths(model: nn.Module) -> tuple[str, ...]:
    """The classifier Linear(s) of ``model`` a head goes on (FreezePolicyError naming why when there is none)."""
    config = getattr(model, "config", None)
    model_type = base_model_type(config) if config is not None else type(model).__name__
    if model_type == TIMM_MODEL_TYPE and hasattr(model, "timm_model"):
        candidates, reason = timm_classifier(model), "its timm pretrained_cfg names no classifier"
    elif model_type in ARCHITECTURES:
        layout = ARCHITECTURES[model_type]
        candidates = layout.classifier
        reason = layout.not_a_classifier or layout.input_issue or "the table lists no classifier for it"
    else:
        known = sorted(t for t, layout in ARCHITECTURES.items() if layout.classifier) + [TIMM_MODEL_TYPE]
        raise FreezePolicyError(
            f"cannot put a head on model type {model_type!r}: the architecture table (hf_freeze.architectures) does "
            f"not know where its classifier lives. Types with a known classifier: {', '.join(known)}; or leave "
            "head unset (the model's own classifier is the head)")
    present = [p for p in candidates if _submodule(model, p) is not None]
    if not present:
        raise FreezePolicyError(f"cannot put a head on {type(model).__name__} ({model_type!r}): {reason}"
                                + (f" (looked for {list(candidates)})" if candidates else "")
                                + "; leave head unset (the model's own classifier is the head)")
    return tuple(present)


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def input_widths(model: nn.Module, paths: tuple[str, ...]) -> dict[str, int]:
    """``{path: in_features}`` of each classifier; FreezePolicyError when one is not a Linear (nor a head already)."""
    widths = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, (nn.Linear, MLPHead)):
            raise FreezePolicyError(
                f"cannot put a head on {type(model).__name__}: {path} is a {type(module).__name__}, not a Linear "
                "classifier (with num_labels=0 there is no classifier); give the model num_labels >= 1")
        widths[path] = module.in_features
    return widths


def head_spec(model: nn.Module, head: HeadConfig) -> dict:
    """What the config records about ``head`` on ``model`` (and what the travelling modeling file reads)."""
    paths = classifier_paths(model)
    input_widths(model, paths)
    config = getattr(model, "config", None)
    recorded = getattr(config, CONFIG_KEY, None) or {}
    return {**head.to_dict(), "paths": list(paths), "base_model_type": base_model_type(config),
            "base_class": recorded.get("base_class") or type(model).__name__,
            "base_config": recorded.get("base_config") or type(config).__name__}


def installed_head(model_or_config) -> HeadConfig | None:
    """The head a model (or its config) records, None if none."""
    config = getattr(model_or_config, "config", model_or_config)
    spec = getattr(config, CONFIG_KEY, None)
    if not isinstance(spec, dict):
        return None
    return HeadConfig.from_dict({k: v for k, v in spec.items() if k in ("kind", "hidden", "activation", "dropout", "norm")})


def check_head(model: nn.Module, head: HeadConfig | None) -> dict | None:
    """The spec to install (None: nothing to do); FreezePolicyError, model untouched, when it cannot go on."""
    if head is None:
        current = installed_head(model)
        if current is not None:
            raise FreezePolicyError(f"the model already carries head {current.to_string()!r} but the policy has no "
                                    f"head; give the policy head={current.to_string()!r}, or start from a model "
                                    "without one")
        return None
    current = installed_head(model)
    if current is not None and current != head:
        raise FreezePolicyError(f"the model already carries head {current.to_string()!r}, the policy asks for "
                                f"{head.to_string()!r}; a head is installed once: load the base model again to change it")
    return head_spec(model, head)


def install_head(model: nn.Module, head: HeadConfig | None) -> list[str]:
    """Replace the classifier(s) of ``model`` by ``head`` (idempotent; checked first, nothing changes on an error);
    returns the paths replaced now. A transformers model becomes its :func:`with_head` class, so that every
    ``save_pretrained`` of it (with or without a policy, a Trainer, hf_freeze) writes a folder that travels."""
    spec = check_head(model, head)
    if spec is None:
        return []
    replaced = install_heads(model, spec)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, spec)
        if callable(getattr(type(model), "save_pretrained", None)):
            model.__class__ = with_head(type(model))
    return replaced


_WITH_HEAD: dict[type, type] = {}


def with_head(cls: type) -> type:
    """A subclass of a transformers classifier class (same name) whose ``__init__`` installs the head its config
    records: ``from_pretrained`` then loads the head's tensors like any other (what the folder's own modeling file
    does, without running that file); its ``save_pretrained`` writes the folder's custom code first and a
    ``config.json`` that names it from the first write (:func:`travelling_config`): a save that fails or is killed
    part-way never leaves a folder plain transformers would load with a re-initialised head."""
    if cls in _WITH_HEAD.values():
        return cls
    if cls not in _WITH_HEAD:
        def __init__(self, config, *args, **kwargs):
            cls.__init__(self, config, *args, **kwargs)
            install_heads(self, getattr(config, CONFIG_KEY))

        def save_pretrained(self, save_directory, *args, **kwargs):
            spec = getattr(self.config, CONFIG_KEY, None)
            main = kwargs.get("is_main_process", True) and isinstance(spec, dict)
            if main:
                write_head_files(save_directory, spec)
            with travelling_config(self.config if main else None):
                out = cls.save_pretrained(self, save_directory, *args, **kwargs)
            if main:
                write_head_code(save_directory)
            return out

        def __reduce_ex__(self, protocol):  # pickled as "with_head(cls)": the class itself has no importable name
            return (_new_with_head, (cls,), *object.__reduce_ex__(self, protocol)[2:])

        _WITH_HEAD[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "save_pretrained": save_pretrained,
                                                      "__reduce_ex__": __reduce_ex__, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})
    return _WITH_HEAD[cls]


def _new_with_head(cls: type):
    """An empty instance of ``with_head(cls)`` (what unpickling a model with a head starts from)."""
    sub = with_head(cls)
    return sub.__new__(sub)


_TRAVELLING: dict[tuple[type, str], type] = {}


@contextlib.contextmanager
def travelling_config(config):
    """Inside this block ``config`` serialises as the folder's custom-code config (``hf_freeze_head-<type>``,
    ``auto_map``), so ``config.json`` never names the original type beside a head's weights; restored after."""
    spec = getattr(config, CONFIG_KEY, None) if config is not None else None
    if not isinstance(spec, dict):
        yield
        return
    cls, model_type = type(config), head_model_type(spec)
    if (cls, model_type) not in _TRAVELLING:
        _TRAVELLING[cls, model_type] = type(cls.__name__, (cls,), {"model_type": model_type, "__module__": cls.__module__,
                                                                  "__qualname__": cls.__qualname__})
    missing = object()
    auto_map = config.__dict__.get("auto_map", missing)
    config.__class__, config.auto_map = _TRAVELLING[cls, model_type], dict(HEAD_AUTO_MAP)
    try:
        yield
    finally:
        config.__class__ = cls
        if auto_map is missing:
            config.__dict__.pop("auto_map", None)
        else:
            config.auto_map = auto_map


def base_model_type(config) -> str | None:
    """The model type of the original architecture (a config loaded from a saved head folder keeps it)."""
    spec = getattr(config, CONFIG_KEY, None)
    if isinstance(spec, dict) and spec.get("base_model_type"):
        return spec["base_model_type"]
    return getattr(config, "model_type", None)


def head_parameters(model: nn.Module) -> dict[str, int]:
    """``{path: parameter count}`` of each installed head."""
    return {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules() if isinstance(m, MLPHead)}


def describe(model: nn.Module) -> str | None:
    """One line for reports and cards: the head's layers and its parameters (None without a head)."""
    heads = {n: m for n, m in model.named_modules() if isinstance(m, MLPHead)}
    if not heads:
        return None
    first = next(iter(heads.values()))
    layers = " -> ".join(type(m).__name__ + (f"({m.in_features}->{m.out_features})" if isinstance(m, nn.Linear) else "")
                         for m in first.layers)
    total = sum(p.numel() for m in heads.values() for p in m.parameters())
    return f"{layers} at {', '.join(heads)} ({total:,} parameters)"
