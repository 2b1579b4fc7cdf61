"""``FreezeReport``: what is frozen, per group, like Keras' ``model.summary()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .apply import require_state
from .groups import unwrap_model


@dataclass(frozen=True)
class GroupRow:
    name: str
    params: int
    trainable: int
    state: str  # "trainable", "frozen" or "partial"
    norms: str  # BatchNorm mode: "eval (locked)", "train", "mixed" or "-"
    lr_scale: float
    unfrozen_at: str  # "" | "epoch 2" | "step 100" | "manual"
    pending: str = ""  # "until epoch 2" for a frozen group a scheduled event will unfreeze


@dataclass(frozen=True)
class FreezeReport:
    model_type: str
    grouping: str
    policy: str
    rows: tuple[GroupRow, ...]
    fingerprinted: int
    input_issue: str | None = None

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def row(self, name: str) -> GroupRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_params=self.total_params, trainable_params=self.trainable_params)
        return d

    def __str__(self) -> str:
        head = ("group", "params", "trainable", "state", "batchnorm", "lr x")
        lines = [(r.name, f"{r.params:,}", f"{r.trainable:,}", r.state + (f" ({r.unfrozen_at})" if r.unfrozen_at else f" ({r.pending})" if r.pending else ""),
                  r.norms, f"{r.lr_scale:.3g}") for r in self.rows]
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i in (0, 3, 4) else '>'}{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        total = self.total_params or 1
        out = [f"Freeze policy: {self.policy}", f"Model type: {self.model_type} (groups from {self.grouping})",
               rule, fmt.format(*head), rule, *(fmt.format(*x) for x in lines), rule,
               f"Total params: {self.total_params:,}",
               f"Trainable params: {self.trainable_params:,} ({100 * self.trainable_params / total:.1f}%)",
               f"Non-trainable params: {self.frozen_params:,} ({100 * self.frozen_params / total:.1f}%)",
               f"Frozen tensors fingerprinted (params + buffers): {self.fingerprinted}"]
        if self.input_issue:
            out.append(f"Note: {self.input_issue}")
        return "\n".join(out)

    def to_markdown(self) -> str:
        rows = ["| group | params | trainable | state | BatchNorm | LR scale |", "|---|---:|---:|---|---|---:|"]
        rows += [f"| {r.name} | {r.params:,} | {r.trainable:,} | {r.state}{f' (unfrozen at {r.unfrozen_at})' if r.unfrozen_at else f' ({r.pending})' if r.pending else ''} "
                 f"| {r.norms} | {r.lr_scale:.3g} |" for r in self.rows]
        return "\n".join(rows)


def freeze_report(model: nn.Module) -> FreezeReport:
    """The report for the policy currently applied to ``model``."""
    from . import batchnorm

    model = unwrap_model(model)
    state = require_state(model)
    params = dict(model.named_parameters())
    norms = batchnorm.stat_norms(model)
    rows = []
    for g in state.groups:
        n_train = sum(params[n].numel() for n in g.param_names if n not in state.frozen)
        kind = "trainable" if n_train == g.num_params else "frozen" if n_train == 0 else "partial"
        modes = {("eval (locked)" if batchnorm.is_locked(m) else "train")
                 for name, m in norms.items() if any(b.startswith(f"{name}.") for b in g.buffer_names)}
        norm_mode = "-" if not modes else modes.pop() if len(modes) == 1 else "mixed"
        event = state.plan.event_for(g.name)
        pending = f"until {event.when}" if event and g.name not in state.unfrozen and kind != "trainable" else ""
        rows.append(GroupRow(g.name, g.num_params, n_train, kind, norm_mode, state.group_lr_scale(g.name),
                             state.unfrozen.get(g.name, ("", 1.0))[0], pending))
    return FreezeReport(state.groups.model_type, state.groups.source, state.policy.to_string(), tuple(rows),
                        len(state.fingerprint), state.groups.input_issue)
