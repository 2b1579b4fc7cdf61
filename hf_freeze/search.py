"""Freeze-depth search with the Trainer's own ``hyperparameter_search`` (optuna backend).

Each trial is one policy from a list of distinct candidates (by default :meth:`FreezeSearchSpace.policies`: how
many groups to freeze, whether and how to unfreeze them, at what LR scale, with or without ``train_bn``). The
trial's hp_space returns the policy as ``FreezeTrainingArguments`` fields; ``FreezeTrainer.call_model_init``
reads them from the trial itself (the Trainer builds the model *before* it copies the trial's fields onto the
args), and the objective checks that the model trained the policy the trial sampled. Results are ranked by the
validation metric; the best policy is saved as ``freeze_policy.json``.

    trainer = FreezeTrainer(model_init=..., args=FreezeTrainingArguments(...), train_dataset=..., eval_dataset=...,
                            compute_metrics=...)
    result = search_freeze_policies(trainer, n_trials=8, metric="eval_accuracy")
    print(result.to_markdown()); result.save("search-out")   # freeze_policy.json = the best policy
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .batchnorm import stat_norms
from .errors import FreezePolicyError
from .groups import layer_groups
from .plan import resolve
from .policy import FreezePolicy, Unfreeze
from .state import get_state


@dataclass
class FreezeSearchSpace:
    """The choices a trial combines. ``freeze``: "backbone", "half" or a group count.

    :meth:`policies` turns them into the list of *distinct* candidate policies for one model: combinations that
    would train the same way (an ``lr_scale`` with schedule ``none``, ``gradual`` when only one group is frozen,
    ``train_bn`` on a model without BatchNorm, "half" equal to "backbone" on a shallow model) appear once.
    """

    freeze: list[str] = field(default_factory=lambda: ["backbone", "half"])
    schedule: list[str] = field(default_factory=lambda: ["none", "late", "gradual"])
    lr_scale: list[float] = field(default_factory=lambda: [1.0, 0.1])
    train_bn: list[bool] = field(default_factory=lambda: [False])

    def policies(self, groups, epochs: float, bn_groups: Iterable[str] = ()) -> list[FreezePolicy]:
        """The distinct policies of this space for a model with ``groups`` (``hf_freeze.layer_groups``), trained
        for ``epochs``; ``bn_groups``: the groups holding BatchNorm statistics (they decide whether ``train_bn``
        changes anything). First occurrence wins, in the order freeze x schedule x lr_scale x train_bn."""
        _check_choices(self)
        depths = {f: _depth(f, len(groups)) for f in self.freeze}
        bn_groups = set(bn_groups)
        chosen: dict[tuple, FreezePolicy] = {}
        for freeze in self.freeze:
            value = "backbone" if freeze == "backbone" else depths[freeze]
            for kind in self.schedule:
                for scale in self.lr_scale:
                    events = schedule_string(kind, epochs, scale, depths[freeze])
                    for bn in self.train_bn:
                        policy = FreezePolicy(freeze=value, train_bn=bool(bn),
                                              unfreeze=[Unfreeze.from_string(e) for e in events.split(",") if e])
                        chosen.setdefault(policy_key(policy, groups, bn_groups), policy)
        return list(chosen.values())


def _depth(freeze: str | int, num_groups: int) -> int:
    """How many groups (from the input) a ``freeze`` choice freezes: backbone = all but the head."""
    if freeze == "backbone":
        return num_groups - 1
    if freeze == "half":
        return max(1, (num_groups - 1) // 2)
    return int(freeze)


def _check_choices(space: FreezeSearchSpace) -> None:
    problems = []
    for name in ("freeze", "schedule", "lr_scale", "train_bn"):
        if not list(getattr(space, name)):
            problems.append(f"{name} has no choice")
    for f in space.freeze:
        if f not in ("backbone", "half") and not str(f).isdigit():
            problems.append(f"freeze choice {f!r}: expected 'backbone', 'half' or a group count")
    for kind in space.schedule:
        if kind not in SCHEDULES:
            problems.append(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if problems:
        raise FreezePolicyError("invalid FreezeSearchSpace: " + "; ".join(problems))


SCHEDULES = ("none", "late", "gradual")


def schedule_string(kind: str, epochs: float, lr_scale: float, frozen_groups: int) -> str:
    """An unfreeze schedule for ``epochs`` of training: none, late (1 group at half-time), gradual (1 group at 1/3 and 2/3)."""
    scale = f"@{lr_scale:g}" if lr_scale != 1.0 else ""
    if kind not in SCHEDULES:
        raise FreezePolicyError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if kind == "none" or frozen_groups == 0:
        return ""
    if kind == "late" or frozen_groups < 2:
        return f"epoch{epochs / 2:g}:1{scale}"
    return f"epoch{epochs / 3:.3g}:1{scale},epoch{2 * epochs / 3:.3g}:1{scale}"


def policy_key(policy: FreezePolicy, groups, bn_groups: set[str] = frozenset()) -> tuple:
    """What ``policy`` does to a model with ``groups``: two policies with the same key train the same way.

    The resolved plan (frozen parameters, unfreeze events with their groups and LR scales, per-group LR decay), plus
    ``train_bn``/``unfreeze_bn`` only where they change a BatchNorm layer, and the adapter.
    """
    plan = resolve(policy, groups)
    frozen_groups = {g.name for g in groups if plan.frozen_params & set(g.param_names)}
    unfrozen_later = {g for e in plan.events for g in e.groups}
    train_bn = policy.train_bn and bool(frozen_groups & bn_groups)
    unfreeze_bn = policy.unfreeze_bn and not policy.train_bn and bool(unfrozen_later & bn_groups)
    events = tuple((e.at_epoch, e.at_step, e.groups, e.lr_scale) for e in plan.events)
    adapter = policy.adapter.to_string() if policy.adapter is not None else None
    return (plan.frozen_params, events, tuple(sorted(plan.depth_scale.items())), train_bn, unfreeze_bn, adapter)


def norm_groups(model, groups) -> set[str]:
    """The groups holding BatchNorm running statistics."""
    group_of = groups.group_of()
    return {group_of[f"{name}.{b}"] for name, m in stat_norms(model).items() for b, _ in m.named_buffers(recurse=False)
            if f"{name}.{b}" in group_of}


def trial_fields(policy: FreezePolicy) -> dict:
    """The ``FreezeTrainingArguments`` fields a trial sets (``Trainer._hp_search_setup``) for ``policy``."""
    if policy.adapter is not None or policy.layer_lr_decay is not None or not policy.verify:
        raise FreezePolicyError(f"search candidate {policy.to_string()!r}: a search trial sets freeze, unfreeze, "
                                "train_bn and unfreeze_bn only")
    f = policy.freeze
    return {"freeze": ",".join(f) if isinstance(f, list) else str(f),
            "unfreeze": ",".join(u.to_string() for u in policy.unfreeze),
            "train_bn": policy.train_bn, "unfreeze_bn": policy.unfreeze_bn}


def make_hp_space(policies: list[FreezePolicy]):
    """An optuna ``hp_space``: one categorical ``policy`` over the candidates, returned as FreezeTrainingArguments
    fields. ``FreezeTrainer`` reads the trial itself when it builds the trial's model (see its ``call_model_init``)."""
    choices = [p.to_string() for p in policies]
    for p in policies:
        trial_fields(p)  # refuse what a trial cannot set, before any trial runs

    def hp_space(trial) -> dict:
        return trial_fields(FreezePolicy.from_string(trial.suggest_categorical("policy", choices)))

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
        import matplotlib  # optional dependency (hf_freeze[examples]): only the saved plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency, as above

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
                           space: FreezeSearchSpace | None = None, seed: int = 0,
                           policies: list[FreezePolicy | str] | None = None) -> SearchResult:
    """Run ``trainer.hyperparameter_search`` (optuna, grid sampler) over freeze policies; ``trainer`` needs ``model_init``.

    The candidates are ``policies`` if given, else ``space.policies(...)`` (default :class:`FreezeSearchSpace`) for
    the model ``model_init`` builds: distinct policies only. Each trial trains the policy it sampled (checked: a
    mismatch raises); at most ``n_trials`` of them run, without repeats, each to the end (no pruning).
    """
    import optuna  # optional dependency (hf_freeze[examples]): only the search needs it

    if trainer.model_init is None:
        raise ValueError("search_freeze_policies needs a FreezeTrainer built with model_init= (each trial starts "
                         "from the pretrained model)")
    if not hasattr(trainer.args, "freeze_policy"):
        raise ValueError("search_freeze_policies needs FreezeTrainingArguments (the trial sets its freeze fields)")
    if getattr(trainer.args, "freeze_policy_file", None):
        raise ValueError(f"freeze_policy_file={trainer.args.freeze_policy_file!r} fixes the policy, so the trials "
                         "could not change it; drop it for the search (use it afterwards with the best policy)")
    if policies is None:
        model = trainer.call_model_init()
        groups = layer_groups(model)
        policies = (space or FreezeSearchSpace()).policies(groups, trainer.args.num_train_epochs,
                                                           norm_groups(model, groups))
    policies = [FreezePolicy.coerce(p) for p in policies]
    if not policies:
        raise ValueError("no candidate policy to search")
    rows: dict[int, dict] = {}

    def objective(metrics: dict) -> float:
        trial = trainer._trial
        sampled, applied = trial.params["policy"], get_state(trainer.model).policy.to_string()
        if applied != sampled:  # the guarantee this search gives: a trial's score belongs to the policy it sampled
            raise RuntimeError(f"trial {trial.number} sampled {sampled!r} but trained {applied!r}")
        rows[trial.number] = {"trial": trial.number, "policy": applied,
                              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if metric not in metrics:
            raise KeyError(f"metric {metric!r} not in evaluation metrics {sorted(metrics)}")
        return metrics[metric]

    grid = {"policy": [p.to_string() for p in policies]}
    sampler = optuna.samplers.GridSampler(grid, seed=seed)
    # no pruner: optuna's default (MedianPruner) stops trials early, whose mid-training scores would then be
    # ranked against the final scores of the others
    trainer.hyperparameter_search(hp_space=make_hp_space(policies), compute_objective=objective,
                                  n_trials=min(n_trials, len(policies)), direction=direction, backend="optuna",
                                  sampler=sampler, pruner=optuna.pruners.NopPruner())
    ranked = sorted(rows.values(), key=lambda r: r[metric], reverse=direction == "maximize")
    return SearchResult(metric, direction, ranked)
