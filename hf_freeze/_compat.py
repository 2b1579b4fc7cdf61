"""Old import paths of names that moved to another module: they still resolve, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings


def moved_names(module: str, moved: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) for ``module`` that resolves each name of ``moved`` (name -> the
    hf_freeze submodule it lives in now) from its new home, with a DeprecationWarning naming that home."""

    def __getattr__(name: str):
        home = moved.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved: import it from hf_freeze.{home}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"hf_freeze.{home}"), name)

    return __getattr__
