"""Layer groups: split any image classifier into ``stem, stage.0..K, neck, head`` (input to output).

Small pure functions over names, in the spirit of timm's ``_manipulate.py``. Architecture
knowledge lives in :mod:`hf_freeze.architectures`; timm models use timm's own ``group_matcher``;
anything else goes through :func:`discover_layout` (and says so). Names are those of
:mod:`hf_freeze.names` (pretrained tensors under their unwrapped names, PEFT or not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ._compat import moved_names
from ._logging import get_logger
from .architectures import ARCHITECTURES, TIMM_MODEL_TYPE, Layout
from .errors import UnsupportedModelError
from .heads import base_model_type
from .names import BASE, ModelNames, unwrap_model

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


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return base_model_type(config) or type(model).__name__


def ordered_tensor_names(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(all names in registration order, parameter names, buffer names); shared tensors once; PEFT adapter
    tensors left out, pretrained tensors under their unwrapped names."""
    names = ModelNames.of(model)
    params = {base for base, role in names.params.values() if role == BASE}
    order = list(names.order)
    return order, [n for n in order if n in params], [n for n in order if n not in params]


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
    from timm.models._manipulate import group_with_matcher  # optional dependency: only timm models get here

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


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameters registered under several names (tied / shared weights): the name groups use (the first one
    ``named_parameters`` gives) -> the other names."""
    names: dict[int, list[str]] = {}
    for n, p in unwrap_model(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {first: rest for first, *rest in names.values() if rest}


def alias_group(alias: str, group_of: dict[str, str]) -> set[str]:
    """The group(s) of the tensors nearest ``alias`` in the module tree (its own module's, else its parent's, ...):
    where the alias would be grouped if it were not shared. Empty when no enclosing module below the root has any."""
    parts = alias.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k]) + "."
        found = {g for n, g in group_of.items() if n.startswith(prefix)}
        if found:
            return found
    return set()


def with_aliases(groups: LayerGroups, aliases: dict[str, list[str]]) -> LayerGroups:
    """``groups`` with every alias name of :func:`tied_aliases` added to the group(s) of :func:`alias_group`."""
    group_of = groups.group_of()
    extra: dict[str, list[str]] = {}
    for rest in aliases.values():
        for alias in rest:
            for g in alias_group(alias, group_of):
                extra.setdefault(g, []).append(alias)
    return LayerGroups([LayerGroup(g.name, g.param_names + tuple(extra.get(g.name, ())), g.num_params, g.buffer_names)
                        for g in groups], groups.model_type, groups.source, groups.input_issue)


def layer_groups(model: nn.Module) -> LayerGroups:
    """Split ``model`` into ordered layer groups; every parameter lands in exactly one group."""
    model = unwrap_model(model)
    model_type = model_type_of(model)
    names = ModelNames.of(model)
    order = list(names.order)
    sizes = {n: p.numel() for n, p in names.base_parameters(model)}
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



__getattr__ = moved_names(__name__, dict.fromkeys(
    ("peft_wrappers", "split_peft_name", "named_base_parameters", "named_base_tensors", "named_base_modules",
     "named_peft_parameters", "ADAPTER", "COPY"), "names"))
