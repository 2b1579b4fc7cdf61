"""Exceptions raised by hf_freeze."""

from __future__ import annotations


class FreezePolicyError(ValueError):
    """A freeze policy (or one of its items) is invalid for this model.

    Raised before anything is mutated: the model is left exactly as it was.
    """


class UnsupportedModelError(ValueError):
    """The model cannot be handled (not an image classifier, or not on the pixel_values/labels path)."""


class FrozenWeightsChanged(RuntimeError):
    """A tensor that the policy froze is no longer bit-identical to its fingerprint."""

    def __init__(self, changed: list[str], where: str = ""):
        self.changed = list(changed)
        shown = ", ".join(self.changed[:10]) + (f", ... ({len(self.changed) - 10} more)" if len(self.changed) > 10 else "")
        at = f" {where}" if where else ""
        super().__init__(f"{len(self.changed)} frozen tensor(s) changed{at}: {shown}")
