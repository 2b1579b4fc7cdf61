"""The head module hf_freeze puts in place of a classifier, and how a model gets it.

Self-contained on purpose (torch only): :mod:`hf_freeze.heads` writes this file's source, unchanged, into every
saved folder whose model has a custom head, so plain transformers (``trust_remote_code=True``) builds exactly the
module hf_freeze trained. ``spec`` is the dict ``HeadConfig.to_dict()`` gives plus ``paths``: the classifier
Linear(s) it replaces (dotted names relative to the model).
"""

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLPHead(nn.Module):
    """``[Linear(width) -> LayerNorm (norm) -> activation -> Dropout (dropout > 0)] per hidden width -> Linear``."""

    def __init__(self, in_features: int, out_features: int, spec: dict):
        super().__init__()
        layers, width = [], in_features
        for hidden in spec["hidden"]:
            layers.append(nn.Linear(width, hidden))
            if spec.get("norm"):
                layers.append(nn.LayerNorm(hidden))
            layers.append(ACTIVATIONS[spec["activation"]]())
            if spec.get("dropout", 0.0) > 0:
                layers.append(nn.Dropout(spec["dropout"]))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        return self.layers(x)


def install_heads(model: nn.Module, spec: dict) -> list[str]:
    """Replace each Linear at ``spec["paths"]`` by an :class:`MLPHead` of the same input and output width, on the
    same device and dtype; a path that already holds an MLPHead is left as it is. Returns the paths replaced."""
    replaced = []
    for path in spec["paths"]:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, MLPHead):
            continue
        new = MLPHead(old.in_features, old.out_features, spec)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, child, new)
        replaced.append(path)
    return replaced
