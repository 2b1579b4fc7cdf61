"""Names inside a model: the classifier inside its wrappers, and what each tensor is called there.

PEFT edits the classifier in place: an adapted layer ``P`` becomes a tuner layer whose pretrained
module is ``P.base_layer`` (adapter tensors beside it, e.g. ``P.lora_A.default.weight``); a module
in ``modules_to_save`` becomes a wrapper holding the pretrained module as ``P.original_module`` and
the trained copy as ``P.modules_to_save.<adapter>``. hf_freeze names every pretrained ("base")
tensor and module as in the unwrapped model, so groups, fingerprints and policies do not change.

:class:`ModelNames` is that mapping for one model, computed in one walk over its modules; a
:class:`~hf_freeze.state.FreezeState` keeps it (:meth:`~hf_freeze.state.FreezeState.names_of`).
Small pure functions over names, in the spirit of timm's ``_manipulate.py``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

BASE, ADAPTER, COPY = "base", "adapter", "copy"
TUNER, SAVED = "tuner", "saved"


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
    from peft import PeftModel  # optional dependency, already imported
    from peft.tuners.tuners_utils import BaseTuner  # optional dependency, already imported

    if isinstance(model, PeftModel):
        return model.base_model
    if isinstance(model, BaseTuner):
        return model.model
    return None


def wrapper_kind(module: nn.Module) -> str | None:
    """``"tuner"`` for a PEFT tuner layer, ``"saved"`` for a ``modules_to_save`` wrapper, else None."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer  # optional dependency, already imported
    from peft.utils.other import ModulesToSaveWrapper  # optional dependency, already imported

    if isinstance(module, ModulesToSaveWrapper):
        return SAVED
    if isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
        return TUNER
    return None


def peft_wrappers(model: nn.Module) -> dict[str, str]:
    """Real paths of PEFT tuner layers (``"tuner"``) and ``modules_to_save`` wrappers (``"saved"``) in ``model``."""
    if "peft" not in sys.modules:
        return {}
    return {name: kind for name, m in model.named_modules() if (kind := wrapper_kind(m)) is not None}


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
        if kind == TUNER:
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class ModelNames:
    """Every name inside one (unwrapped) model, from one walk over its modules.

    ``params`` / ``buffers``: real name (as ``named_parameters`` / ``named_buffers`` give it, shared tensors once)
    -> (base name, role). ``modules``: real name -> base name of the pretrained modules (PEFT wrappers and the
    modules PEFT added are left out). ``order``: base names of the pretrained parameters and buffers in
    registration order, a tensor shared between them once (what layer groups are built from).
    """

    params: dict[str, tuple[str, str]]
    buffers: dict[str, tuple[str, str]]
    modules: dict[str, str]
    wrappers: dict[str, str]
    order: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ModelNames:
        model = unwrap_model(model)
        wrappers: dict[str, str] = {}
        params: dict[str, tuple[str, str]] = {}
        buffers: dict[str, tuple[str, str]] = {}
        modules: dict[str, str] = {}
        order: list[str] = []
        seen_params, seen_buffers, seen = set(), set(), set()
        for prefix, module in model.named_modules():  # parents before children: a wrapper is known before its tensors
            kind = wrapper_kind(module)
            if kind is not None:
                wrappers[prefix] = kind
            else:
                base, role = split_peft_name(prefix, wrappers)
                if role == BASE:
                    modules[prefix] = base
            for table, names, memo in ((module._parameters, params, seen_params), (module._buffers, buffers, seen_buffers)):
                for local, tensor in table.items():
                    if tensor is None:
                        continue
                    real = _join(prefix, local)
                    base, role = split_peft_name(real, wrappers)
                    if id(tensor) not in memo:
                        memo.add(id(tensor))
                        names[real] = (base, role)
                    if role == BASE and id(tensor) not in seen:
                        order.append(base)
                    seen.add(id(tensor))
        return cls(params, buffers, modules, wrappers, tuple(order))

    def fits(self, model: nn.Module) -> bool:
        """Still the names of ``model`` (no PEFT wrapper added or removed since they were taken)."""
        model = unwrap_model(model)
        return (list(self.params) == [n for n, _ in model.named_parameters()]
                and list(self.buffers) == [n for n, _ in model.named_buffers()])

    # ------------------------------------------------------------------ the tensors and modules behind the names
    def base_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The pretrained parameters under their base names (``named_parameters`` without PEFT)."""
        return [(base, p) for real, p in unwrap_model(model).named_parameters()
                for base, role in [self.params[real]] if role == BASE]

    def base_tensors(self, model: nn.Module) -> dict:
        """Pretrained parameters and buffers by base name."""
        model = unwrap_model(model)
        found = [(self.params[n], t) for n, t in model.named_parameters()]
        found += [(self.buffers[n], t) for n, t in model.named_buffers()]
        return {base: t for (base, role), t in found if role == BASE}

    def base_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The pretrained modules under their base names (a PEFT wrapper is replaced by the module it wraps)."""
        return [(self.modules[real], m) for real, m in unwrap_model(model).named_modules() if real in self.modules]

    def peft_parameters(self, model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
        """``(real name, base name, role, parameter)`` of every adapter parameter and trained copy."""
        return [(real, base, role, p) for real, p in unwrap_model(model).named_parameters()
                for base, role in [self.params[real]] if role != BASE]


# --------------------------------------------------------------------------- one-off views (no names kept)
def named_base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return ModelNames.of(model).base_parameters(model)


def named_base_tensors(model: nn.Module) -> dict:
    return ModelNames.of(model).base_tensors(model)


def named_base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return ModelNames.of(model).base_modules(model)


def named_peft_parameters(model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
    return ModelNames.of(model).peft_parameters(model)
