"""Freeze-policy search with the Trainer's own ``hyperparameter_search`` (optuna backend): evaluate and adjust.

Each trial trains one candidate from a list of *distinct* candidates: a freeze policy (by default the policies of a
:class:`FreezeSearchSpace`: how many groups to freeze, when the schedule unfreezes them and how many, at what LR
scale, with what layer-wise LR decay, with BatchNorm kept or released) times a learning rate (the Trainer's
``learning_rate``, or several). The trial's hp_space returns them as ``FreezeTrainingArguments`` fields;
``FreezeTrainer.call_model_init`` reads them from the trial itself (the Trainer builds the model *before* it copies
the trial's fields onto the args), and the objective checks that the model trained the policy and learning rate the
trial sampled. Every trial is scored at the end of its training (no pruning).

What is kept can be weighed too, without labels: with ``retention_images`` (unlabeled images of the task the
pretrained model was trained on) and ``reference_model`` (that pretrained model, with its original head), each trial
also gets a **retention proxy**: the share of those images on which the trial's fine-tuned backbone under the original
head predicts what the pretrained model predicts (:class:`RetentionProxy`). ``tolerance`` then picks the most
retentive trial among those within ``tolerance`` of the best metric; every row says whether it is on the Pareto front
of (metric, proxy), and :meth:`SearchResult.select` re-picks with another tolerance without training again.

The budget is ``n_trials`` and/or ``max_steps`` (optimizer steps summed over the trials; every trial takes the same
number, predicted before the first and checked after each).

    trainer = FreezeTrainer(model_init=..., args=FreezeTrainingArguments(...), train_dataset=..., eval_dataset=...,
                            compute_metrics=...)
    result = search_freeze_policies(trainer, max_steps=600, retention_images=unlabeled, reference_model=base,
                                    tolerance=0.01)
    print(result.to_markdown()); result.save("search-out")   # freeze_policy.json = the chosen policy
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, TrainerCallback

from .args import FreezeArguments
from .batchnorm import stat_norms
from .errors import FreezePolicyError
from .feature_cache import FeatureCacheTrainerMixin
from .groups import layer_groups
from .names import unwrap_model
from .plan import Timing, resolve
from .policy import FreezePolicy, Unfreeze
from .state import get_state
from .trainer import FreezeTrainerMixin

#: schedule kinds: when (as fractions of training) the unfreeze events fire; ``at:F1+F2`` gives them directly
SCHEDULES = {"none": (), "early": (0.1,), "late": (0.5,), "gradual": (1 / 3, 2 / 3)}
#: how far a schedule unfreezes, besides a group count
REACHES = ("half", "all")


@dataclass
class FreezeSearchSpace:
    """The choices a trial combines.

    ``freeze``: "backbone", "half", "none" or a group count (from the input). ``schedule``: "none", "early" (at a
    tenth of training), "late" (at half-time), "gradual" (two events, at 1/3 and 2/3), or "at:F1+F2+..." (fractions
    of training). ``reach``: how many of the frozen groups the schedule has unfrozen by the end: a count, "half" or
    "all" (spread over the schedule's events, nearest the head first, the later events taking the larger share).
    ``lr_scale``: the LR scale of the groups the schedule unfreezes. ``layer_lr_decay``: None or a factor in (0, 1].
    ``unfreeze_bn``/``train_bn``: the policy fields. ``learning_rate``: the Trainer's learning rate per trial (None:
    ``args.learning_rate``).

    :meth:`policies` turns the policy fields into the list of *distinct* candidate policies for one model:
    combinations that would train the same way (an ``lr_scale`` with schedule ``none``, two schedules whose events
    fire at the same steps, a ``layer_lr_decay`` that only reaches groups that never train, ``train_bn`` or
    ``unfreeze_bn`` on groups without BatchNorm, "half" equal to "backbone" on a shallow model) appear once.
    """

    freeze: list[str] = field(default_factory=lambda: ["backbone", "half"])
    schedule: list[str] = field(default_factory=lambda: ["none", "late", "gradual"])
    reach: list[str] = field(default_factory=lambda: ["1", "all"])
    lr_scale: list[float] = field(default_factory=lambda: [1.0, 0.1])
    layer_lr_decay: list[float | None] = field(default_factory=lambda: [None])
    unfreeze_bn: list[bool] = field(default_factory=lambda: [False])
    train_bn: list[bool] = field(default_factory=lambda: [False])
    learning_rate: list[float | None] = field(default_factory=lambda: [None])

    def policies(self, groups, epochs: float | None = None, bn_groups: Iterable[str] = (),
                 timing: Timing | None = None, total_steps: int | None = None) -> list[FreezePolicy]:
        """The distinct policies of this space for a model with ``groups`` (``hf_freeze.layer_groups``).

        Events are placed in epochs of a run of ``epochs`` epochs, or, with ``total_steps``, at steps of a run of that
        many optimizer steps. ``bn_groups``: the groups holding BatchNorm statistics (:func:`norm_groups`); ``timing``
        (the run's steps per epoch): two events are the same when they fire at the same step, and an event that fires
        after the run's last step is none. First occurrence wins,
        in the order freeze x schedule x reach x lr_scale x layer_lr_decay x unfreeze_bn x train_bn.
        """
        check_space(self)
        if (epochs is None) == (total_steps is None):
            raise ValueError("give the run's length as epochs= or total_steps= (one of them)")
        bn_groups = set(bn_groups)
        run_steps = total_steps if total_steps is not None else (
            math.ceil(epochs * timing.steps_per_epoch) if timing is not None else None)
        chosen: dict[tuple, FreezePolicy] = {}
        for freeze, kind, reach, scale, decay, unfreeze_bn, train_bn in itertools.product(
                self.freeze, self.schedule, self.reach, self.lr_scale, self.layer_lr_decay, self.unfreeze_bn,
                self.train_bn):
            depth = _depth(freeze, len(groups))
            events = schedule_events(kind, depth, reach, scale, epochs=epochs, total_steps=total_steps)
            value = freeze if freeze in ("backbone", "none") else depth
            policy = FreezePolicy(freeze=value, unfreeze=events, layer_lr_decay=decay, unfreeze_bn=bool(unfreeze_bn),
                                  train_bn=bool(train_bn))
            chosen.setdefault(policy_key(policy, groups, bn_groups, timing, run_steps), policy)
        return list(chosen.values())


def _depth(freeze: str | int, num_groups: int) -> int:
    """How many groups (from the input) a ``freeze`` choice freezes: backbone = all but the head."""
    if freeze == "backbone":
        return num_groups - 1
    if freeze == "none":
        return 0
    if freeze == "half":
        return max(1, (num_groups - 1) // 2)
    return min(int(freeze), num_groups)


def schedule_fractions(kind: str) -> tuple[float, ...]:
    """When a schedule kind's events fire, as fractions of training."""
    if kind in SCHEDULES:
        return SCHEDULES[kind]
    if isinstance(kind, str) and kind.startswith("at:"):
        try:
            fractions = tuple(float(x) for x in kind[3:].split("+"))
        except ValueError:
            fractions = ()
        if fractions and all(0 < f < 1 for f in fractions) and list(fractions) == sorted(set(fractions)):
            return fractions
    raise FreezePolicyError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}, or 'at:F1+F2+...' "
                            "(increasing fractions of training, each in (0, 1), e.g. 'at:0.25+0.5')")


def reach_count(reach: str | int, frozen: int) -> int:
    """How many of ``frozen`` groups a schedule with ``reach`` unfreezes by the end."""
    if reach == "all":
        return frozen
    if reach == "half":
        return min(frozen, max(1, frozen // 2))
    return min(int(reach), frozen)


def schedule_events(kind: str, frozen: int, reach: str | int, lr_scale: float, *, epochs: float | None = None,
                    total_steps: int | None = None) -> list[Unfreeze]:
    """The unfreeze events of one schedule: ``reach_count(reach, frozen)`` groups over the kind's events (at most one
    event per group; the later events take the larger share), at ``lr_scale``, timed in epochs of an ``epochs``-epoch
    run or in steps of a ``total_steps``-step run. Events that would land on the same step are merged."""
    fractions = schedule_fractions(kind)
    count = reach_count(reach, frozen)
    if not fractions or count == 0:
        return []
    k = min(len(fractions), count)
    shares = [count // k + (1 if i >= k - count % k else 0) for i in range(k)]
    timed: dict[float | int, int] = {}
    for f, n in zip(fractions[:k], shares):
        when = max(1, round(f * total_steps)) if total_steps is not None else float(f"{f * epochs:.4g}")
        timed[when] = timed.get(when, 0) + n
    key = "at_step" if total_steps is not None else "at_epoch"
    return [Unfreeze(groups=n, lr_scale=float(lr_scale), **{key: when}) for when, n in timed.items()]


def check_space(space: FreezeSearchSpace) -> None:
    """Every choice of ``space``, checked without a model; FreezePolicyError names each bad one."""
    problems = []
    for name in ("freeze", "schedule", "reach", "lr_scale", "layer_lr_decay", "unfreeze_bn", "train_bn",
                 "learning_rate"):
        if not list(getattr(space, name)):
            problems.append(f"{name} has no choice")
    for f in space.freeze:
        if f not in ("backbone", "half", "none") and not str(f).isdigit():
            problems.append(f"freeze choice {f!r}: expected 'backbone', 'half', 'none' or a group count")
    for kind in space.schedule:
        try:
            schedule_fractions(kind)
        except FreezePolicyError as e:
            problems.append(str(e))
    for r in space.reach:
        if r not in REACHES and not (str(r).isdigit() and int(r) >= 1):
            problems.append(f"reach choice {r!r}: expected a group count >= 1, 'half' or 'all'")
    for name, ok, what in (("lr_scale", lambda x: _positive(x), "a number > 0"),
                           ("layer_lr_decay", lambda x: x is None or (_positive(x) and x <= 1), "None or in (0, 1]"),
                           ("learning_rate", lambda x: x is None or _positive(x), "None or a number > 0"),
                           ("unfreeze_bn", lambda x: isinstance(x, bool), "True or False"),
                           ("train_bn", lambda x: isinstance(x, bool), "True or False")):
        problems += [f"{name} choice {x!r}: expected {what}" for x in getattr(space, name) if not ok(x)]
    if problems:
        raise FreezePolicyError("invalid FreezeSearchSpace: " + "; ".join(problems))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def policy_key(policy: FreezePolicy, groups, bn_groups: set[str] = frozenset(), timing: Timing | None = None,
               run_steps: int | None = None) -> tuple:
    """What ``policy`` does to a model with ``groups``: two policies with the same key train the same way.

    The resolved plan: frozen parameters; unfreeze events with their groups and LR scales, timed by the step they fire
    at when ``timing`` is known (else by their epoch/step value), without the events that fire only after the last of
    ``run_steps`` optimizer steps (no update trains their groups); the layer-wise LR scale of each group that ever
    trains; ``train_bn``/``unfreeze_bn`` only where they change a BatchNorm layer; the adapter; the task-specific head
    (a different head is a different model, even where the plan over ``groups`` is the same).
    """
    plan = resolve(policy, groups, timing)
    effective = [e for e in plan.events if not (timing and run_steps is not None and timing.fire_step(e) >= run_steps)]
    frozen_groups = {g.name for g in groups if plan.frozen_params & set(g.param_names)}
    unfrozen_later = {g for e in effective for g in e.groups}
    trained = {g.name for g in groups if set(g.param_names) - plan.frozen_params} | unfrozen_later
    train_bn = policy.train_bn and bool(frozen_groups & bn_groups)
    unfreeze_bn = policy.unfreeze_bn and not policy.train_bn and bool(unfrozen_later & bn_groups)
    events = tuple(((timing.fire_step(e),) if timing else (e.at_epoch, e.at_step)) + (e.groups, e.lr_scale)
                   for e in effective)
    scales = tuple(sorted((g, s) for g, s in plan.depth_scale.items() if g in trained))
    adapter = policy.adapter.to_string() if policy.adapter is not None else None
    head = policy.head.to_string() if policy.head is not None else None
    return (plan.frozen_params, events, scales, train_bn, unfreeze_bn, adapter, head)


def norm_groups(model, groups) -> set[str]:
    """The groups holding BatchNorm running statistics."""
    group_of = groups.group_of()
    return {group_of[f"{name}.{b}"] for name, m in stat_norms(model).items() for b, _ in m.named_buffers(recurse=False)
            if f"{name}.{b}" in group_of}


#: the FreezeTrainingArguments fields a trial sets (plus ``learning_rate`` when several are searched)
TRIAL_FIELDS = ("freeze", "unfreeze", "train_bn", "unfreeze_bn", "layer_lr_decay", "head")


def trial_fields(policy: FreezePolicy) -> dict:
    """The ``FreezeTrainingArguments`` fields a trial sets (``Trainer._hp_search_setup``) for ``policy``."""
    if policy.adapter is not None or not policy.verify:
        raise FreezePolicyError(f"search candidate {policy.to_string()!r}: a search trial sets freeze, unfreeze, "
                                "train_bn, unfreeze_bn, layer_lr_decay and head only (no adapter, verify stays on)")
    f = policy.freeze
    return {"freeze": ",".join(f) if isinstance(f, list) else str(f),
            "unfreeze": ",".join(u.to_string() for u in policy.unfreeze),
            "train_bn": policy.train_bn, "unfreeze_bn": policy.unfreeze_bn, "layer_lr_decay": policy.layer_lr_decay,
            "head": policy.head.to_string() if policy.head is not None else None}


def make_hp_space(policies: list[FreezePolicy], learning_rates: list[float] | None = None):
    """An optuna ``hp_space``: a categorical ``policy`` over the candidates (and ``learning_rate`` over
    ``learning_rates`` when there are several), returned as FreezeTrainingArguments fields. ``FreezeTrainer`` reads
    the trial itself when it builds the trial's model (see its ``call_model_init``)."""
    choices = [p.to_string() for p in policies]
    for p in policies:
        trial_fields(p)  # refuse what a trial cannot set, before any trial runs
    searched_lr = learning_rates is not None and len(learning_rates) > 1

    def hp_space(trial) -> dict:
        fields = trial_fields(FreezePolicy.from_string(trial.suggest_categorical("policy", choices)))
        if searched_lr:
            fields["learning_rate"] = trial.suggest_categorical("learning_rate", learning_rates)
        return fields

    return hp_space


# ---------------------------------------------------------------------------------------------- retention proxy
class RetentionProxy:
    """Label-free retention: on unlabeled ``images`` of the task ``reference_model`` was trained on, the share of
    images on which a fine-tuned model's backbone under ``reference_model``'s own head predicts what
    ``reference_model`` predicts (1.0: the same predictions everywhere, e.g. a bit-identical backbone).

    ``reference_model``: the pretrained model with its original head (a model, or a folder / Hub id for
    ``AutoModelForImageClassification``); it is not changed. ``images``: a tensor of ``pixel_values`` or a sequence
    of items that are tensors or dicts with ``pixel_values`` (labels, if any, are not read). The backbone is every
    tensor outside the reference's ``head`` group (:func:`hf_freeze.layer_groups`); a model whose backbone does not
    have the reference's tensor names and shapes is refused by :meth:`check`.
    """

    def __init__(self, reference_model, images, batch_size: int = 64):
        if isinstance(reference_model, (str, os.PathLike)):
            reference_model = AutoModelForImageClassification.from_pretrained(reference_model)
        if not isinstance(reference_model, torch.nn.Module):
            raise TypeError(f"reference_model must be a model, a folder or a Hub id, got {type(reference_model).__name__}")
        reference = unwrap_model(reference_model)
        head = layer_groups(reference)["head"]
        self.head_names = frozenset((*head.param_names, *head.buffer_names))
        self.images = _stack_images(images)
        self.batch_size = batch_size
        self._probe = copy.deepcopy(reference).eval()
        self.backbone_shapes = {k: tuple(v.shape) for k, v in self._probe.state_dict().items()
                                if k not in self.head_names}
        self.expected = self._predict(self._probe)

    def check(self, model) -> None:
        """Refuse (FreezePolicyError) a model whose backbone tensors differ from the reference's in names or shapes."""
        state = unwrap_model(model).state_dict()
        missing = [k for k in self.backbone_shapes if k not in state]
        shapes = [k for k in self.backbone_shapes if k in state and tuple(state[k].shape) != self.backbone_shapes[k]]
        if missing or shapes:
            raise FreezePolicyError(
                "the retention proxy puts the trial model's backbone under reference_model's head, but their backbones "
                f"differ: {len(missing)} reference tensor(s) missing from the model (e.g. {missing[:3]}), "
                f"{len(shapes)} with another shape (e.g. {shapes[:3]}); give the pretrained model the trials start "
                "from, with its original head")

    def __call__(self, model) -> float:
        """The proxy for ``model`` (not changed: its backbone tensors are copied into a private copy of the reference)."""
        self.check(model)
        state = unwrap_model(model).state_dict()
        with torch.no_grad():
            self._probe.load_state_dict({k: state[k] for k in self.backbone_shapes}, strict=False)
        device = next(unwrap_model(model).parameters()).device
        predicted = self._predict(self._probe.to(device))
        return float((predicted == self.expected).float().mean())

    def _predict(self, model):
        device = next(model.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, len(self.images), self.batch_size):
                out.append(model(pixel_values=self.images[i:i + self.batch_size].to(device)).logits.argmax(-1).cpu())
        return torch.cat(out)


def _stack_images(images):
    if isinstance(images, torch.Tensor):
        stacked = images
    else:
        items = [x["pixel_values"] if isinstance(x, dict) else x for x in images]
        if not items or not all(isinstance(x, torch.Tensor) for x in items):
            raise TypeError("retention images: expected a tensor of pixel_values or a non-empty sequence of tensors / "
                            "dicts with 'pixel_values'")
        stacked = torch.stack(items)
    if stacked.ndim < 2 or len(stacked) == 0:
        raise ValueError(f"retention images: expected a batch of images, got a tensor of shape {tuple(stacked.shape)}")
    return stacked


# ---------------------------------------------------------------------------------------------- ranking
def _sign(direction: str) -> int:
    return 1 if direction == "maximize" else -1


def mark_pareto(rows: list[dict], metric: str, direction: str) -> None:
    """Set ``row["pareto"]``: no other row is at least as good on the metric and the retention proxy and better on one."""
    s = _sign(direction)
    for r in rows:
        r["pareto"] = not any(s * o[metric] >= s * r[metric] and o["retention_proxy"] >= r["retention_proxy"]
                              and (s * o[metric] > s * r[metric] or o["retention_proxy"] > r["retention_proxy"])
                              for o in rows if o is not r)


def rank_rows(rows: list[dict], metric: str, direction: str, tolerance: float | None = None) -> list[dict]:
    """Best first. Without ``tolerance``: by the metric (ties: the higher retention proxy, then the earlier trial).
    With it: the rows within ``tolerance`` of the best metric, most retentive first, then the others by the metric."""
    s = _sign(direction)

    def by_metric(r):
        return (-s * r[metric], -r.get("retention_proxy", 0.0), r["trial"])

    if tolerance is None:
        return sorted(rows, key=by_metric)
    if not rows:
        return []
    best = max(s * r[metric] for r in rows)
    near = [r for r in rows if s * r[metric] >= best - tolerance - 1e-12]
    rest = [r for r in rows if r not in near]
    return (sorted(near, key=lambda r: (-r["retention_proxy"], -s * r[metric], r["trial"]))
            + sorted(rest, key=by_metric))


@dataclass
class SearchResult:
    metric: str
    direction: str
    rows: list[dict]  # ranked, best first: trial, policy, learning_rate, step, metrics, retention_proxy, pareto
    tolerance: float | None = None
    steps_per_trial: int | None = None
    max_steps: int | None = None  # the budget (optimizer steps over all trials), if one was set
    candidates: int | None = None  # distinct candidates (policies x learning rates) the trials were drawn from

    @property
    def best(self) -> dict:
        return self.rows[0]

    @property
    def best_policy(self) -> FreezePolicy:
        return FreezePolicy.from_string(self.rows[0]["policy"])

    @property
    def best_learning_rate(self) -> float:
        return self.rows[0]["learning_rate"]

    @property
    def total_steps(self) -> int:
        return sum(r["step"] for r in self.rows)

    @property
    def has_retention(self) -> bool:
        return bool(self.rows) and all("retention_proxy" in r for r in self.rows)

    @property
    def pareto(self) -> list[dict]:
        """The rows on the Pareto front of (metric, retention proxy), in ranking order."""
        return [r for r in self.rows if r.get("pareto")]

    def select(self, tolerance: float | None) -> SearchResult:
        """The same trials ranked with another ``tolerance`` (no training)."""
        if tolerance is not None and not self.has_retention:
            raise ValueError("tolerance picks the most retentive trial among the near-best ones: the search needs "
                             "retention_images and reference_model")
        rows = rank_rows([dict(r) for r in self.rows], self.metric, self.direction, tolerance)
        return SearchResult(self.metric, self.direction, rows, tolerance, self.steps_per_trial, self.max_steps,
                            self.candidates)

    def to_markdown(self) -> str:
        lrs = len({r["learning_rate"] for r in self.rows}) > 1
        ret = self.has_retention
        head = ["rank", "trial", "policy"] + (["learning rate"] if lrs else []) + [self.metric] + (
            ["retention proxy", "Pareto"] if ret else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h != "policy" else "---" for h in head) + "|"]
        for i, r in enumerate(self.rows):
            cells = [str(i + 1), str(r["trial"]), f"`{r['policy']}`"] + ([f"{r['learning_rate']:g}"] if lrs else []) + [
                f"{r[self.metric]:.4f}"] + ([f"{r['retention_proxy']:.4f}", "yes" if r["pareto"] else ""] if ret else [])
            lines.append("| " + " | ".join(cells) + " |")
        rule = (f"rank: the trials within {self.tolerance:g} of the best {self.metric}, most retentive first, then the "
                f"others by {self.metric}" if self.tolerance is not None else f"rank: by {self.metric}")
        budget = f" of a {self.max_steps}-step budget" if self.max_steps else ""
        return "\n".join(lines) + (f"\n\n{rule}; {len(self.rows)} trials of {self.steps_per_trial} steps "
                                   f"({self.total_steps} steps{budget}) from {self.candidates} distinct candidates.")

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

        if self.has_retention:  # the trade-off: metric against retention proxy, the chosen trial circled
            fig, ax = plt.subplots(figsize=(7, 5))
            for r in self.rows:
                ax.scatter(r["retention_proxy"], r[self.metric], color="#c44e52" if r["pareto"] else "#4c72b0", s=24)
            ax.scatter(self.best["retention_proxy"], self.best[self.metric], s=160, facecolors="none",
                       edgecolors="black", label=f"chosen: {self.best['policy']}")
            ax.set_xlabel("retention proxy (agreement with the pretrained model)")
            ax.set_ylabel(self.metric)
            ax.set_title(f"freeze-policy search: {len(self.rows)} trials, red = Pareto front", fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
            ax.grid(alpha=0.3)
        else:
            rows = self.rows[::-1]
            fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
            ax.barh([r["policy"] for r in rows], [r[self.metric] for r in rows], color="#4c72b0")
            ax.set_xlabel(self.metric)
            ax.set_title(f"freeze-policy search ({len(rows)} trials, best on top)")
            ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- the search
def trial_timing(trainer) -> tuple[Timing, int]:
    """(Timing, optimizer steps) of one trial, as ``Trainer.set_initial_training_values`` counts them, from the
    Trainer's own training dataloader (built without the feature cache's probe)."""
    args = trainer.args
    batches = len(super(FeatureCacheTrainerMixin, trainer).get_train_dataloader())
    accumulation = max(args.gradient_accumulation_steps, 1)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return Timing(per_epoch, batches, accumulation), total


def _check_call(trainer, n_trials, direction, max_steps, retention_images, reference_model, tolerance) -> None:
    if not isinstance(trainer, FreezeTrainerMixin):
        raise ValueError(f"search_freeze_policies needs a FreezeTrainer (it applies each trial's policy), got "
                         f"{type(trainer).__name__}")
    if trainer.model_init is None:
        raise ValueError("search_freeze_policies needs a FreezeTrainer built with model_init= (each trial starts "
                         "from the pretrained model)")
    if not isinstance(trainer.args, FreezeArguments):
        raise ValueError("search_freeze_policies needs FreezeTrainingArguments (the trial sets its freeze fields)")
    if getattr(trainer.args, "freeze_policy_file", None):
        raise ValueError(f"freeze_policy_file={trainer.args.freeze_policy_file!r} fixes the policy, so the trials "
                         "could not change it; drop it for the search (use it afterwards with the best policy)")
    given = trainer.args.given_flags()
    if given:
        values = ", ".join(f"{flag}={getattr(trainer.args, flag)!r}" for flag in given)
        raise FreezePolicyError(
            f"the training arguments set {values}, but each search trial sets its own policy ({', '.join(TRIAL_FIELDS)}"
            "), so the trials would train a mix of both or drop these: remove them from the training arguments and "
            "put them in the candidates instead (policies=[...], or the FreezeSearchSpace field, e.g. "
            "FreezeSearchSpace(layer_lr_decay=[0.8]))")
    if trainer.args.load_best_model_at_end:
        raise ValueError("load_best_model_at_end=True: a trial is scored on the model at the end of its training; "
                         "set it to False for the search")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction={direction!r}; valid: maximize, minimize")
    for name, value in (("n_trials", n_trials), ("max_steps", max_steps)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name}={value!r}: expected an integer >= 1 or None")
    if (retention_images is None) != (reference_model is None):
        given, needed = ("retention_images", "reference_model") if reference_model is None else (
            "reference_model", "retention_images")
        raise ValueError(f"{given} needs {needed}: the retention proxy runs the trial's backbone under the pretrained "
                         "model's original head (reference_model) on unlabeled images of its task (retention_images)")
    if tolerance is not None:
        if retention_images is None:
            raise ValueError("tolerance picks the most retentive trial among the near-best ones: give "
                             "retention_images and reference_model too")
        if not (_positive(tolerance) or tolerance == 0):
            raise ValueError(f"tolerance={tolerance!r}: expected a number >= 0")
    if retention_images is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError("the retention proxy reads the trial model's whole state in one process; it does not work "
                         "with FSDP or DeepSpeed sharding: search without it, or without sharding")


def distinct_candidates(policies: list[FreezePolicy], groups, bn_groups, timing, run_steps) -> list[FreezePolicy]:
    """``policies`` if no two train the same way; else FreezePolicyError naming a pair."""
    seen: dict[tuple, FreezePolicy] = {}
    for p in policies:
        key = policy_key(p, groups, bn_groups, timing, run_steps)
        if key in seen:
            raise FreezePolicyError(f"candidates {seen[key].to_string()!r} and {p.to_string()!r} train the same way "
                                    "on this model; keep one")
        seen[key] = p
    return policies


def search_freeze_policies(trainer, n_trials: int | None = None, metric: str = "eval_accuracy",
                           direction: str = "maximize", space: FreezeSearchSpace | None = None, seed: int = 0,
                           policies: list[FreezePolicy | str] | None = None, *, max_steps: int | None = None,
                           retention_images=None, reference_model=None, tolerance: float | None = None,
                           retention_batch_size: int = 64) -> SearchResult:
    """Run ``trainer.hyperparameter_search`` (optuna, grid sampler, no pruning) over distinct freeze policies x
    learning rates; ``trainer``: a ``FreezeTrainer`` with ``model_init`` and ``FreezeTrainingArguments``.

    Candidates: ``policies`` if given (refused if two train the same way), else ``space.policies(...)`` (default
    :class:`FreezeSearchSpace`) for the model ``model_init`` builds; times ``space.learning_rate``. The trials are a
    seeded random order of the candidates, without repeats, at most ``n_trials`` (default: all) and at most
    ``max_steps // steps_per_trial``. Each trial trains the policy and learning rate it sampled (checked: a mismatch
    raises) to the end, and is scored by its last evaluation, made at the end of training (forced if the
    ``eval_strategy`` would not). ``retention_images`` + ``reference_model``: each trial's :class:`RetentionProxy`;
    ``tolerance``: choose the most retentive trial within ``tolerance`` of the best ``metric``. Everything is checked
    before the first trial; the Trainer's arguments are restored afterwards.
    """
    import optuna  # optional dependency (hf_freeze[examples]): only the search needs it

    _check_call(trainer, n_trials, direction, max_steps, retention_images, reference_model, tolerance)
    space = space or FreezeSearchSpace()
    check_space(space)
    timing, steps = trial_timing(trainer)
    if max_steps is not None and max_steps < steps:
        raise ValueError(f"max_steps={max_steps} is less than one trial ({steps} optimizer steps): raise the budget "
                         "or shorten the trials (num_train_epochs / max_steps in the training arguments)")
    model = trainer.call_model_init()
    groups = layer_groups(model)
    bn_groups = norm_groups(model, groups)
    if policies is None:
        length = {"total_steps": steps} if trainer.args.max_steps > 0 else {"epochs": trainer.args.num_train_epochs}
        policies = space.policies(groups, bn_groups=bn_groups, timing=timing, **length)
    else:
        policies = distinct_candidates([FreezePolicy.coerce(p) for p in policies], groups, bn_groups, timing, steps)
    if not policies:
        raise ValueError("no candidate policy to search")
    learning_rates = list(dict.fromkeys(trainer.args.learning_rate if lr is None else float(lr)
                                        for lr in space.learning_rate))
    hp_space = make_hp_space(policies, learning_rates)
    proxy = None
    if retention_images is not None:
        proxy = RetentionProxy(reference_model, retention_images, retention_batch_size)
        proxy.check(model)
    del model
    grid = {"policy": [p.to_string() for p in policies]}
    if len(learning_rates) > 1:
        grid["learning_rate"] = learning_rates
    candidates = len(policies) * len(learning_rates)
    runs = min(n_trials or candidates, candidates, max_steps // steps if max_steps else candidates)

    rows: dict[int, dict] = {}
    last_eval: dict[int, int] = {}

    def objective(metrics: dict) -> float:
        trial, state = trainer._trial, trainer.state
        model = unwrap_model(trainer.model)
        sampled, applied = trial.params["policy"], get_state(model).policy.to_string()
        if applied != sampled:  # the guarantee this search gives: a trial's score belongs to the policy it sampled
            raise RuntimeError(f"trial {trial.number} sampled {sampled!r} but trained {applied!r}")
        lr = trial.params.get("learning_rate", learning_rates[0])
        if trainer.args.learning_rate != lr:
            raise RuntimeError(f"trial {trial.number} sampled learning_rate={lr} but trained with "
                               f"{trainer.args.learning_rate}")
        if metric not in metrics:
            raise KeyError(f"metric {metric!r} not in evaluation metrics {sorted(metrics)}")
        row = {"trial": trial.number, "policy": applied, "learning_rate": lr, "step": state.global_step,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if proxy is not None and state.global_step >= state.max_steps:
            row["retention_proxy"] = proxy(model)
        rows[trial.number] = row
        last_eval[trial.number] = state.global_step
        return metrics[metric]

    class EndOfTrial(TrainerCallback):
        """At the end of each trial: its step count must be the predicted one (the budget relies on it), and its
        score must come from an evaluation at the end of training (else the Trainer evaluates once more)."""

        def on_train_end(self, args, state, control, **kwargs):
            trial = trainer._trial
            if state.global_step != steps:
                raise RuntimeError(f"trial {trial.number} trained {state.global_step} optimizer steps, {steps} were "
                                   "predicted (and budgeted) for every trial")
            if last_eval.get(trial.number) != state.global_step:
                trainer.objective = None  # hyperparameter_search then evaluates the final model

    saved = {name: getattr(trainer.args, name) for name in (*(f.name for f in fields(FreezeArguments)),
                                                             "learning_rate")}
    callback = EndOfTrial()
    trainer.add_callback(callback)
    try:
        # no pruner: optuna's default (MedianPruner) stops trials early, whose mid-training scores would then be
        # ranked against the final scores of the others
        trainer.hyperparameter_search(hp_space=hp_space, compute_objective=objective, n_trials=runs,
                                      direction=direction, backend="optuna",
                                      sampler=optuna.samplers.GridSampler(grid, seed=seed),
                                      pruner=optuna.pruners.NopPruner())
    finally:
        trainer.remove_callback(callback)
        for name, value in saved.items():
            setattr(trainer.args, name, value)
    done = list(rows.values())  # empty on the other processes of a multi-process run: the main one scores
    if proxy is not None and done:
        mark_pareto(done, metric, direction)
    return SearchResult(metric, direction, rank_rows(done, metric, direction, tolerance), tolerance, steps, max_steps,
                        candidates)

