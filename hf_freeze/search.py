"""Freeze-depth search with the Trainer's own ``hyperparameter_search`` (optuna backend).

Each trial is a freeze policy built from a few choices — how many groups to freeze, whether and how to
unfreeze them, at what LR scale, with or without ``train_bn`` — set on ``FreezeTrainingArguments`` by the
Trainer itself (``_hp_search_setup``) and picked up by ``FreezeTrainer`` when ``model_init`` rebuilds the
model. Results are ranked by the validation metric; the best policy is saved as ``freeze_policy.json``.

    trainer = FreezeTrainer(model_init=..., args=FreezeTrainingArguments(...), train_dataset=..., eval_dataset=...,
                            compute_metrics=...)
    result = search_freeze_policies(trainer, n_trials=8, metric="eval_accuracy")
    print(result.to_markdown()); result.save("search-out")   # freeze_policy.json = the best policy
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FreezePolicyError
from .policy import FreezePolicy


@dataclass
class FreezeSearchSpace:
    """The choices a trial combines. ``freeze`` values as in FreezePolicy ("backbone" or a group count)."""

    freeze: list[str] = field(default_factory=lambda: ["backbone", "half"])
    schedule: list[str] = field(default_factory=lambda: ["none", "late", "gradual"])
    lr_scale: list[float] = field(default_factory=lambda: [1.0, 0.1])
    train_bn: list[bool] = field(default_factory=lambda: [False])

    def grid(self) -> dict[str, list]:
        return {"freeze": list(self.freeze), "schedule": list(self.schedule), "lr_scale": list(self.lr_scale),
                "train_bn": list(self.train_bn)}


def schedule_string(kind: str, epochs: float, lr_scale: float, frozen_groups: int) -> str:
    """An unfreeze schedule for ``epochs`` of training: none, late (1 group at half-time), gradual (1 group at 1/3 and 2/3)."""
    scale = f"@{lr_scale:g}" if lr_scale != 1.0 else ""
    if kind == "none" or frozen_groups == 0:
        return ""
    if kind == "late":
        return f"epoch{epochs / 2:g}:1{scale}"
    if kind == "gradual":
        if frozen_groups < 2:
            return f"epoch{epochs / 2:g}:1{scale}"
        return f"epoch{epochs / 3:.3g}:1{scale},epoch{2 * epochs / 3:.3g}:1{scale}"
    raise FreezePolicyError(f"unknown schedule {kind!r}; valid: none, late, gradual")


def make_hp_space(space: FreezeSearchSpace, num_groups: int, epochs: float):
    """An optuna ``hp_space`` that returns FreezeTrainingArguments fields (freeze, unfreeze, train_bn)."""

    def hp_space(trial) -> dict:
        choice = {k: trial.suggest_categorical(k, v) for k, v in space.grid().items()}
        freeze = choice["freeze"]
        depth = num_groups - 1 if freeze == "backbone" else max(1, (num_groups - 1) // 2) if freeze == "half" else int(freeze)
        freeze_value = "backbone" if freeze == "backbone" else str(depth)
        unfreeze = schedule_string(choice["schedule"], epochs, choice["lr_scale"], depth)
        return {"freeze": freeze_value, "unfreeze": unfreeze, "train_bn": bool(choice["train_bn"])}

    return hp_space


@dataclass
class SearchResult:
    metric: str
    direction: str
    rows: list[dict]  # ranked best first: trial, policy, metric value, other eval metrics

    @property
    def best_policy(self) -> FreezePolicy:
        return FreezePolicy.from_string(self.rows[0]["policy"])

    def to_markdown(self) -> str:
        lines = [f"| rank | trial | policy | {self.metric} |", "|---:|---:|---|---:|"]
        lines += [f"| {i + 1} | {r['trial']} | `{r['policy']}` | {r[self.metric]:.4f} |" for i, r in enumerate(self.rows)]
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.best_policy.save_pretrained(out)
        (out / "search_results.json").write_text(json.dumps(asdict(self), indent=2))
        (out / "search_results.md").write_text(self.to_markdown() + "\n")
        self._plot(out / "search_results.png")
        return out

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows[::-1]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
        ax.barh([r["policy"] for r in rows], [r[self.metric] for r in rows], color="#4c72b0")
        ax.set_xlabel(self.metric)
        ax.set_title(f"freeze-policy search ({len(rows)} trials, best on top)")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def search_freeze_policies(trainer, n_trials: int = 8, metric: str = "eval_accuracy", direction: str = "maximize",
                           space: FreezeSearchSpace | None = None, seed: int = 0) -> SearchResult:
    """Run ``trainer.hyperparameter_search`` over freeze policies; ``trainer`` needs ``model_init``."""
    import optuna

    from .groups import layer_groups

    if trainer.model_init is None:
        raise ValueError("search_freeze_policies needs a FreezeTrainer built with model_init= (each trial starts "
                         "from the pretrained model)")
    if not hasattr(trainer.args, "freeze_policy"):
        raise ValueError("search_freeze_policies needs FreezeTrainingArguments (the trial sets its freeze fields)")
    space = space or FreezeSearchSpace()
    num_groups = len(layer_groups(trainer.call_model_init()))
    rows: dict[int, dict] = {}

    def objective(metrics: dict) -> float:
        trial = trainer._trial
        rows[trial.number] = {"trial": trial.number, "policy": trainer.freeze_policy.to_string(), **trial.params,
                              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if metric not in metrics:
            raise KeyError(f"metric {metric!r} not in evaluation metrics {sorted(metrics)}")
        return metrics[metric]

    sampler = optuna.samplers.GridSampler(space.grid(), seed=seed)
    trainer.hyperparameter_search(hp_space=make_hp_space(space, num_groups, trainer.args.num_train_epochs),
                                  compute_objective=objective, n_trials=n_trials, direction=direction,
                                  backend="optuna", sampler=sampler)
    ranked = sorted(rows.values(), key=lambda r: r[metric], reverse=direction == "maximize")
    return SearchResult(metric, direction, ranked)
