"""Layer groups: split any image classifier into ``stem, stage.0..K, neck, head`` (input to output).

Small pure functions over names, in the spirit of timm's ``_manipulate.py``. Architecture
knowledge lives in :mod:`hf_freeze.architectures`; timm models use timm's own ``group_matcher``;
anything else goes through :func:`discover_layout` (and says so).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ._logging import get_logger
from .architectures import ARCHITECTURES, TIMM_MODEL_TYPE, Layout
from .errors import UnsupportedModelError

logger = get_logger(__name__)

HEAD, STEM, NECK = "head", "stem", "neck"


@dataclass(frozen=True)
class LayerGroup:
    """One depth unit of a model. ``param_names``/``buffer_names`` are relative to the classifier."""

    name: str
    param_names: tuple[str, ...]
    num_params: int
    buffer_names: tuple[str, ...] = ()


class LayerGroups(list):
    """``list[LayerGroup]`` ordered from input to output, plus where the grouping came from."""

    def __init__(self, groups: Iterable[LayerGroup], model_type: str, source: str, input_issue: str | None):
        super().__init__(groups)
        self.model_type = model_type
        self.source = source  # "table", "timm group_matcher" or "generic discovery"
        self.input_issue = input_issue

    @property
    def names(self) -> list[str]:
        return [g.name for g in self]

    def __getitem__(self, key):
        if isinstance(key, str):
            for g in self:
                if g.name == key:
                    return g
            raise KeyError(key)
        return super().__getitem__(key)

    def group_of(self) -> dict[str, str]:
        """Map every parameter and buffer name to its group's name."""
        return {n: g.name for g in self for n in (*g.param_names, *g.buffer_names)}


# --------------------------------------------------------------------------- model plumbing

def unwrap_model(model: nn.Module) -> nn.Module:
    """The classifier inside DDP/FSDP/``torch.compile``/accelerate/PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP1, DataParallel
            model = model.module
        elif (inner := _peft_inner(model)) is not None:  # PeftModel -> LoraModel -> classifier
            model = inner
    return model


def _peft_inner(model: nn.Module) -> nn.Module | None:
    if "peft" not in sys.modules:  # no PEFT object can exist before peft is imported
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.base_model
    if isinstance(model, BaseTuner):
        return model.model
    return None


# --------------------------------------------------------------------------- names inside a PEFT-wrapped model
#
# PEFT edits the classifier in place: an adapted layer ``P`` becomes a tuner layer whose pretrained
# module is ``P.base_layer`` (adapter tensors beside it, e.g. ``P.lora_A.default.weight``); a module
# in ``modules_to_save`` becomes a wrapper holding the pretrained module as ``P.original_module`` and
# the trained copy as ``P.modules_to_save.<adapter>``. hf_freeze names every pretrained ("base")
# tensor and module as in the unwrapped model, so groups, fingerprints and policies do not change.
# The helpers below unwrap first: names are relative to the classifier.

BASE, ADAPTER, COPY = "base", "adapter", "copy"
_TUNER, _SAVED = "tuner", "saved"


def peft_wrappers(model: nn.Module) -> dict[str, str]:
    """Real paths of PEFT tuner layers (``"tuner"``) and ``modules_to_save`` wrappers (``"saved"``) in ``model``."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            out[name] = _SAVED
        elif isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "base_layer", None), nn.Module):
            out[name] = _TUNER
    return out


def split_peft_name(name: str, wrappers: dict[str, str]) -> tuple[str, str]:
    """``(base name, role)`` of a tensor or module name inside a PEFT-wrapped model.

    role ``"base"``: a pretrained tensor, named as in the unwrapped model; ``"copy"``: the trained copy
    (``modules_to_save``) of the base tensor named; ``"adapter"``: an adapter tensor, the base name
    being the path of the layer it adapts.
    """
    if not wrappers:
        return name, BASE
    parts, real, out, role, i = name.split("."), [], [], BASE, 0
    while i < len(parts):
        real.append(parts[i])
        out.append(parts[i])
        i += 1
        kind = wrappers.get(".".join(real))
        if kind is None or i == len(parts):
            continue
        if kind == _TUNER:
            if parts[i] != "base_layer":
                return ".".join(out), ADAPTER
            real.append(parts[i])
            i += 1
        elif parts[i] == "original_module":
            real.append(parts[i])
            i += 1
        elif parts[i] == "modules_to_save":
            real += parts[i:i + 2]
            i += 2
            role = COPY
    return ".".join(out), role


def named_base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The pretrained parameters, under their unwrapped names (``named_parameters`` without PEFT)."""
    model = unwrap_model(model)
    wrappers = peft_wrappers(model)
    out = []
    for real, p in model.named_parameters():
        name, role = split_peft_name(real, wrappers)
        if role == BASE:
            out.append((name, p))
    return out


def named_base_tensors(model: nn.Module) -> dict:
    """Pretrained parameters and buffers by unwrapped name."""
    model = unwrap_model(model)
    wrappers = peft_wrappers(model)
    out = {}
    for real, t in (*model.named_parameters(), *model.named_buffers()):
        name, role = split_peft_name(real, wrappers)
        if role == BASE:
            out[name] = t
    return out


def named_base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The pretrained modules under their unwrapped names (a PEFT wrapper is replaced by the module it wraps)."""
    model = unwrap_model(model)
    wrappers = peft_wrappers(model)
    out = []
    for real, m in model.named_modules():
        if real in wrappers:
            continue
        name, role = split_peft_name(real, wrappers)
        if role == BASE:
            out.append((name, m))
    return out


def named_peft_parameters(model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
    """``(real name, base name, role, parameter)`` of every adapter parameter and trained copy."""
    model = unwrap_model(model)
    wrappers = peft_wrappers(model)
    out = []
    for real, p in model.named_parameters():
        name, role = split_peft_name(real, wrappers)
        if role != BASE:
            out.append((real, name, role, p))
    return out


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def ordered_tensor_names(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(all names in registration order, parameter names, buffer names); shared tensors once; PEFT adapter
    tensors left out, pretrained tensors under their unwrapped names."""
    order, params, buffers, seen = [], [], [], set()
    wrappers = peft_wrappers(model)
    for mod_name, module in model.named_modules():
        for kind, table in (("p", module._parameters), ("b", module._buffers)):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                full, role = split_peft_name(f"{mod_name}.{name}" if mod_name else name, wrappers)
                if role != BASE:
                    continue
                order.append(full)
                (params if kind == "p" else buffers).append(full)
    return order, params, buffers


# --------------------------------------------------------------------------- naming rules

def _compile(patterns: Iterable[str], base: str) -> list[re.Pattern]:
    return [re.compile(p.replace("{base}", re.escape(base))) for p in patterns if p]


def classify_names(names: list[str], layout: Layout, base: str) -> list[str | int | None]:
    """Per name: HEAD/STEM/NECK, a stage ordinal (int) or None (placed by position)."""
    head, stem, neck = (_compile(p, base) for p in (layout.head, layout.stem, layout.neck))
    stages = _compile([layout.stages], base)
    keys: list[str | int | None] = []
    for n in names:
        if any(p.match(n) for p in head):
            keys.append(HEAD)
        elif any(p.match(n) for p in stem):
            keys.append(STEM)
        elif any(p.match(n) for p in neck):
            keys.append(NECK)
        elif stages and (m := stages[0].match(n)):
            keys.append(int(m.group(1)))
        else:
            keys.append(None)
    return keys


def place_by_position(keys: list[str | int | None]) -> list[str | int]:
    """Fill unclassified names: before the first stage -> stem, after the last -> neck, else the next stage."""
    stage_pos = [i for i, k in enumerate(keys) if isinstance(k, int)]
    out: list[str | int] = []
    for i, k in enumerate(keys):
        if k is not None:
            out.append(k)
        elif not stage_pos or i < stage_pos[0]:
            out.append(STEM)
        elif i > stage_pos[-1]:
            out.append(NECK)
        else:
            out.append(keys[next(p for p in stage_pos if p > i)])
    return out


def build_groups(order: list[str], keys: list[str | int], params: dict[str, int]) -> list[LayerGroup]:
    """Assemble ordered groups (stem, stage.0..K renumbered, neck, head); groups without parameters are dropped."""
    stage_ids = sorted({k for k in keys if isinstance(k, int)})
    label = {s: f"stage.{i}" for i, s in enumerate(stage_ids)}
    names_in_order = [STEM, *label.values(), NECK, HEAD]
    members: dict[str, list[str]] = {g: [] for g in names_in_order}
    for name, key in zip(order, keys):
        members[label.get(key, key) if isinstance(key, int) else key].append(name)
    groups = []
    for g in names_in_order:
        p = tuple(n for n in members[g] if n in params)
        if p:
            b = tuple(n for n in members[g] if n not in params)
            groups.append(LayerGroup(g, p, sum(params[n] for n in p), b))
    return groups


# --------------------------------------------------------------------------- layouts

def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def discover_layout(model: nn.Module) -> Layout:
    """Generic layout for a model no table entry knows.

    Head: the top-level children other than the base model (or, without a base model attribute,
    the child holding the last ``Linear`` with ``num_labels`` outputs and everything after it).
    Stages: the elements of the ``ModuleList``/``Sequential`` holding the most parameters.
    """
    base = _base_prefix(model)
    children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
    if base:
        head_children = [n for n, _ in children if n != base]
    else:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        last = None
        for i, (_, c) in enumerate(children):
            if any(isinstance(m, nn.Linear) and m.out_features == num_labels for m in c.modules()):
                last = i
        head_children = [n for n, _ in children[last:]] if last is not None else []
    if not head_children:
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot find the classification head (no top-level module besides the "
            f"base model, and no Linear with num_labels outputs). Add a Layout for model type "
            f"{model_type_of(model)!r} to hf_freeze.architectures.ARCHITECTURES.")
    head = tuple(rf"^{re.escape(n)}\." for n in head_children)
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not name or name.split(".")[0] in head_children:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    stages = rf"^{re.escape(best)}\.(\d+)\." if best else ""
    return Layout(stages=stages, head=head, source="generic discovery")


def _timm_keys(model: nn.Module, order: list[str]) -> list[str | int]:
    """Keys for TimmWrapperForImageClassification from timm's ``group_matcher(coarse=True)``."""
    from timm.models._manipulate import group_with_matcher

    timm_model = model.timm_model
    matcher = timm_model.group_matcher(coarse=True)
    rel = [n.removeprefix("timm_model.") for n in order]
    lid = group_with_matcher(((n, None) for n in rel), matcher, reverse=True)
    compiled = []
    for group_name, spec in matcher.items():
        specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
        compiled += [(group_name, re.compile(s[0])) for s in specs if s and s[0]]
    classifier = timm_model.pretrained_cfg.get("classifier") or "fc"
    head_prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    keys: list[str | int] = []
    for n in rel:
        matched = [g for g, r in compiled if r.match(n)]
        if n.startswith(head_prefixes):
            keys.append(HEAD)
        elif matched and matched[0] == "stem":
            keys.append(STEM)
        elif not matched:
            keys.append(NECK)  # timm maps unmatched names (norms, pooling, head) to the last ordinal
        else:
            keys.append(lid[n])
    return keys


def layout_for(model: nn.Module) -> Layout:
    """The table entry for this model type, or a discovered one."""
    model_type = model_type_of(model)
    layout = ARCHITECTURES.get(model_type)
    if layout is None:
        layout = discover_layout(model)
        logger.warning("hf_freeze: model type %r is not in the architecture table; using generic discovery "
                       "(stages = %s)", model_type, layout.stages or "none found")
    return layout


def layer_groups(model: nn.Module) -> LayerGroups:
    """Split ``model`` into ordered layer groups; every parameter lands in exactly one group."""
    model = unwrap_model(model)
    model_type = model_type_of(model)
    order, params, _ = ordered_tensor_names(model)
    sizes = {n: p.numel() for n, p in named_base_parameters(model)}
    if model_type == TIMM_MODEL_TYPE and hasattr(model, "timm_model"):
        keys, source, issue = _timm_keys(model, order), "timm group_matcher", None
    else:
        layout = layout_for(model)
        if layout.not_a_classifier:
            raise UnsupportedModelError(f"model type {model_type!r}: {layout.not_a_classifier}")
        keys = place_by_position(classify_names(order, layout, _base_prefix(model)))
        source, issue = layout.source, layout.input_issue
    groups = build_groups(order, keys, sizes)
    if not groups or groups[-1].name != HEAD:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type!r}): no parameter matched the classification head; "
            f"known heads are listed in hf_freeze.architectures.ARCHITECTURES")
    return LayerGroups(groups, model_type, source, issue)

