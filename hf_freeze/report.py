"""``FreezeReport``: what is frozen, per group, like Keras' ``model.summary()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from . import batchnorm
from .adapter_plan import adapter_params_by_group
from .names import unwrap_model
from .state import require_state


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
    adapter: int = 0  # PEFT adapter parameters + trained copies (modules_to_save) belonging to this group
    user_frozen: int = 0  # parameters the user had frozen by hand before the policy (they stay frozen)

    def state_text(self, markdown: bool = False) -> str:
        """``state`` with when it was (or will be) unfrozen and what the user froze, e.g. ``partial (epoch 2; 16 frozen by the user)``."""
        notes = [f"unfrozen at {self.unfrozen_at}" if markdown else self.unfrozen_at] if self.unfrozen_at else \
            [self.pending] if self.pending else []
        if self.user_frozen:
            notes.append(f"{self.user_frozen:,} frozen by the user")
        return self.state + (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class FreezeReport:
    model_type: str
    grouping: str
    policy: str
    rows: tuple[GroupRow, ...]
    fingerprinted: int
    input_issue: str | None = None
    #: with a PEFT adapter: "lora,r=8,..."; its layers, and the layers of its groups it skips (name: reason)
    adapter: str | None = None
    adapter_targets: int = 0
    adapter_skipped: tuple[tuple[str, str], ...] = ()
    modules_to_save: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def frozen_params(self) -> int:
        """Pretrained parameters that do not train (all of them with an adapter)."""
        return self.total_params - self.trainable_params if self.adapter is None else self.total_params

    @property
    def adapter_params(self) -> int:
        return sum(r.adapter for r in self.rows)

    def row(self, name: str) -> GroupRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_params=self.total_params, trainable_params=self.trainable_params)
        if self.adapter is not None:
            d.update(adapter_params=self.adapter_params)
        return d

    def __str__(self) -> str:
        head = ("group", "params", "trainable", "state", "batchnorm", "lr x")
        lines = [(r.name, f"{r.params:,}", f"{r.trainable:,}", r.state_text(), r.norms, f"{r.lr_scale:.3g}")
                 for r in self.rows]
        if self.adapter is not None:
            head = (*head[:3], "adapter", *head[3:])
            lines = [(*x[:3], f"{r.adapter:,}", *x[3:]) for r, x in zip(self.rows, lines)]
        left = {0, 3, 4} if self.adapter is None else {0, 4, 5}
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        total = self.total_params or 1
        out = [f"Freeze policy: {self.policy}", f"Model type: {self.model_type} (groups from {self.grouping})",
               rule, fmt.format(*head), rule, *(fmt.format(*x) for x in lines), rule,
               f"Total params: {self.total_params:,}",
               f"Trainable params: {self.trainable_params:,} ({100 * self.trainable_params / total:.1f}%)",
               f"Non-trainable params: {self.frozen_params:,} ({100 * self.frozen_params / total:.1f}%)",
               f"Frozen tensors fingerprinted (params + buffers): {self.fingerprinted}"]
        if self.adapter is not None:
            out += self._adapter_lines()
        if self.input_issue:
            out.append(f"Note: {self.input_issue}")
        return "\n".join(out)

    def _adapter_lines(self) -> list[str]:
        out = [f"Adapter: {self.adapter} on {self.adapter_targets} layer(s); {self.adapter_params:,} adapter params "
               f"(saved copies of: {', '.join(self.modules_to_save) or 'none'})"]
        reasons: dict[str, list[str]] = {}
        for name, why in self.adapter_skipped:
            reasons.setdefault(why, []).append(name)
        out += [f"No adapter on {len(names)} layer(s) ({names[0]}{', ...' if len(names) > 1 else ''}): {why}"
                for why, names in reasons.items()]
        return out

    def to_markdown(self) -> str:
        with_adapter = self.adapter is not None
        rows = ["| group | params | trainable |" + (" adapter |" if with_adapter else "") + " state | BatchNorm | LR scale |",
                "|---|---:|---:|" + ("---:|" if with_adapter else "") + "---|---|---:|"]
        rows += [f"| {r.name} | {r.params:,} | {r.trainable:,} |" + (f" {r.adapter:,} |" if with_adapter else "")
                 + f" {r.state_text(markdown=True)} | {r.norms} | {r.lr_scale:.3g} |" for r in self.rows]
        if with_adapter:
            rows += ["", *self._adapter_lines()]
        return "\n".join(rows)


def freeze_report(model: nn.Module) -> FreezeReport:
    """The report for the policy currently applied to ``model``."""
    model = unwrap_model(model)
    state = require_state(model)
    names = state.names_of(model)
    plan = state.adapter
    params = dict(names.base_parameters(model))
    extra = adapter_params_by_group(model, state.groups, names) if plan is not None else {}
    saved = plan.modules_to_save if plan is not None else ()

    def norm_mode(name: str, module: nn.Module) -> str:
        if any(name == s or name.startswith(f"{s}.") for s in saved):
            return "train (saved copy)"
        return "eval (locked)" if batchnorm.is_locked(module) else "train"

    norms = batchnorm.stat_norms(model, names)
    rows = []
    for g in state.groups:
        open_params = sum(params[n].numel() for n in g.param_names if n not in state.frozen)
        kind = "trainable" if open_params == g.num_params else "frozen" if open_params == 0 else "partial"
        n_train, n_adapter = open_params, 0
        if plan is not None:
            kind = "adapter" if g.name in plan.groups else kind
            n_train = sum(p.numel() for _, p in extra[g.name] if p.requires_grad)
            n_adapter = sum(p.numel() for _, p in extra[g.name])
        modes = {norm_mode(name, m) for name, m in norms.items() if any(b.startswith(f"{name}.") for b in g.buffer_names)}
        mode = "-" if not modes else modes.pop() if len(modes) == 1 else "mixed"
        event = state.plan.event_for(g.name)
        pending = f"until {event.when}" if event and g.name not in state.unfrozen and kind != "trainable" else ""
        user = sum(params[n].numel() for n in g.param_names if n in state.user_frozen)
        rows.append(GroupRow(g.name, g.num_params, n_train, kind, mode, state.group_lr_scale(g.name),
                             state.unfrozen.get(g.name, ("", 1.0))[0], pending, n_adapter, user))
    adapter = {} if plan is None else dict(adapter=plan.config.to_string(), adapter_targets=len(plan.targets),
                                             adapter_skipped=plan.skipped, modules_to_save=plan.modules_to_save)
    return FreezeReport(state.groups.model_type, state.groups.source, state.policy.to_string(), tuple(rows),
                        len(state.fingerprint), state.groups.input_issue, **adapter)
