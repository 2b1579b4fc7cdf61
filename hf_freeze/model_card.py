"""Model cards for frozen fine-tunes, rendered with ``huggingface_hub.ModelCard`` from ``hf_freeze/model_cards/``.

The card says, without any code to read: which base model (id, revision), what was frozen (the
``freeze_report`` table), when each group was unfrozen and at what LR scale, trainable vs total parameters,
whether the frozen tensors are still bit-identical (and their fingerprint), the evaluation results (also as
``model-index`` metadata) and a PNG of the training curves with the unfreeze events marked.

    card = write_model_card(model, "out", CardConfig(dataset="fashion_mnist"), log_history=trainer.state.log_history,
                            events_log=trainer.freeze_callback.events_log)

``FreezeTrainer.create_model_card`` (and so ``trainer.push_to_hub()``) calls this for you.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn
from transformers.modelcard import make_markdown_table, parse_log_history

from . import __version__
from .apply import changed_frozen_tensors
from .delta import DeltaManifest, base_reference
from .folder import ADAPTER_FILES, CARD_FILE, DELTA_WEIGHTS, FULL_WEIGHTS, PLOT_FILE, checkpoint_kind, is_delta
from .names import unwrap_model
from .report import freeze_report
from .state import get_state

TEMPLATES = Path(__file__).parent / "model_cards"
LIBRARY = {"full": "transformers", "delta": "hf_freeze", "adapter": "peft"}
RELATION = {"full": "finetune", "delta": "finetune", "adapter": "adapter"}
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step", "loss"}
GROUPING = {"table": "hf_freeze's architecture table", "timm group_matcher": "timm's `group_matcher`",
            "generic discovery": "generic discovery (architecture not in hf_freeze's table)"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class CardConfig:
    """What the card says beyond what the model and the training log know.

    ``base_model``: Hub id of the base (default: where the model was loaded from; a local folder is named in the
    text but kept out of the metadata, where the Hub expects a repo id). ``dataset``: Hub dataset id for the
    metadata and ``model-index``; ``dataset_name``: its display name. ``template``: a file name in
    ``hf_freeze/model_cards/`` or a path to your own Jinja template (it gets the same variables).
    """

    model_name: str | None = None
    repo_id: str | None = None
    base_model: str | None = None
    base_revision: str | None = None
    license: str | None = None
    dataset: str | None = None
    dataset_name: str | None = None
    tags: list[str] = field(default_factory=list)
    summary: str | None = None
    template: str = "model_card.md"
    plot: bool = True


# --------------------------------------------------------------------------- small pure pieces
def eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last evaluation's metrics, ``eval_`` prefix removed (runtime/throughput dropped)."""
    for entry in reversed(log_history or []):
        found = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")}
        if found:
            return {k: v for k, v in found.items() if k not in _NOT_METRICS - {"loss"}}
    return {}


def eval_results(metrics: dict[str, float], dataset: str | None, dataset_name: str | None):
    """``huggingface_hub.EvalResult`` entries for the ``model-index`` (loss only when nothing else was measured)."""
    chosen = {k: v for k, v in metrics.items() if k != "loss" and isinstance(v, (int, float))} or \
        {k: v for k, v in metrics.items() if k == "loss"}
    dataset_type = dataset or "custom"
    return [EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_type,
                       dataset_name=dataset_name or dataset_type, metric_type=k, metric_name=k.replace("_", " "),
                       metric_value=round(float(v), 6)) for k, v in chosen.items()]


def unfreeze_events(model: nn.Module, events_log: list[dict] | None, log_history: list[dict] | None = None) -> list[dict]:
    """One row per unfreeze: step, epoch, groups, trigger, LR scale, trainable params after.

    From the callback's ``events_log`` when there is one, else from the model's state (``get_state().unfrozen``:
    no step is known for epoch triggers without a log; it is estimated from ``log_history``).
    """
    if events_log:
        return [{"step": e["step"], "epoch": _fmt(e["epoch"]), "groups": ", ".join(e["groups"]), "when": e["when"],
                 "lr_scale": _fmt(e["lr_scale"]), "trainable": f"{e['trainable_params']:,}",
                 "resumed": bool(e.get("resumed"))} for e in events_log]
    state = get_state(model)
    if state is None:
        return []
    by_trigger: dict[tuple[str, float], list[str]] = {}
    for group, (when, scale) in state.unfrozen.items():
        by_trigger.setdefault((when, scale), []).append(group)
    rows = []
    for (when, scale), groups in by_trigger.items():
        step = _step_of(when, log_history)
        rows.append({"step": "" if step is None else step, "epoch": when.removeprefix("epoch ") if when.startswith("epoch") else "",
                     "groups": ", ".join(groups), "when": when, "lr_scale": _fmt(scale), "trainable": "", "resumed": False})
    return rows


def _step_of(when: str, log_history: list[dict] | None) -> int | None:
    kind, _, value = when.partition(" ")
    if kind == "step":
        return int(value)
    if kind == "epoch" and log_history:
        timed = [h for h in log_history if h.get("epoch") and h.get("step")]
        if timed:
            return round(float(value) * timed[-1]["step"] / timed[-1]["epoch"])
    return None


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def preservation_text(model: nn.Module) -> tuple[str, dict]:
    """A sentence on the bit-exact check of the still-frozen tensors, and the same as metadata."""
    state = get_state(model)
    if state is None:
        return "", {}
    try:
        changed = changed_frozen_tensors(model, collective=False)  # written on rank 0 alone
    except RuntimeError as e:  # a sharded model never verified on all ranks (verify_frozen=False)
        return f"**Not checked**: {e}.", {"preserved": None}
    tensors = len(state.fingerprint)
    fp = state.fingerprint.combined()
    if changed:
        shown = ", ".join(f"`{n}`" for n in changed[:5])
        return (f"**FAILED**: {len(changed)} of {tensors} frozen tensors are no longer bit-identical to the base "
                f"model ({shown}{', ...' if len(changed) > 5 else ''})."), {"preserved": False, "changed": len(changed)}
    return (f"**Passed.** All {tensors:,} still-frozen tensors (parameters and BatchNorm buffers) are bit-identical "
            f"to the base model: checked against BLAKE2b fingerprints taken when the policy was applied "
            f"(combined fingerprint `{fp}`)."), {"preserved": True, "frozen_tensors": tensors, "fingerprint": fp}


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors once."""
    params = {id(p): p for p in unwrap_model(model).parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_of(model: nn.Module, config: CardConfig, folder: Path) -> tuple[str | None, str | None]:
    """(base model, revision): the config's, else the delta manifest's, else where the model was loaded from."""
    if config.base_model:
        return config.base_model, config.base_revision
    if is_delta(folder):
        m = DeltaManifest.load(folder)
        return m.base_model, m.base_revision
    try:
        return base_reference(model)
    except ValueError:
        return None, None


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.isabs(name) and not os.path.exists(name) and bool(_HUB_ID.match(name))


def checkpoint_kind_of(folder: Path) -> str:
    try:
        return checkpoint_kind(folder)
    except FileNotFoundError:
        return "full"


def plot_series(log_history: list[dict], events: list[dict]) -> dict:
    """What the training plot shows: ``train_loss``/``eval_loss`` as (step, value), ``metrics`` {name: [(step, value)]},
    ``events`` as (step, label) for every unfreeze with a known step."""
    evals = [h for h in log_history if "step" in h and any(k.startswith("eval_") for k in h)]
    names = sorted({k for h in evals for k in h if k.startswith("eval_") and k.removeprefix("eval_") not in _NOT_METRICS})
    return {
        "train_loss": [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h],
        "eval_loss": [(h["step"], h["eval_loss"]) for h in evals if "eval_loss" in h],
        "metrics": {k.removeprefix("eval_"): [(h["step"], h[k]) for h in evals if k in h] for k in names},
        "events": [(e["step"], f"unfreeze {e['groups']}\n(LR x{e['lr_scale']})") for e in events if e["step"] != ""],
    }


def training_plot(log_history: list[dict], events: list[dict], path: str | os.PathLike) -> Path | None:
    """PNG of :func:`plot_series`: losses left, evaluation metrics right, unfreeze events as dashed lines.

    Returns None (and writes nothing) when the log holds no loss, or matplotlib is not installed.
    """
    series = plot_series(log_history, events)
    if not series["train_loss"] and not series["eval_loss"]:
        return None
    try:
        from matplotlib.figure import Figure  # optional dependency; no pyplot: no global backend or figure state
    except ImportError:
        return None
    metrics = series["metrics"]
    fig = Figure(figsize=(10 if metrics else 6, 3.6))
    axes = fig.subplots(1, 2 if metrics else 1, squeeze=False)
    ax = axes[0][0]
    if series["train_loss"]:
        ax.plot(*zip(*series["train_loss"]), label="training loss", color="tab:blue")
    if series["eval_loss"]:
        ax.plot(*zip(*series["eval_loss"]), "o-", label="eval loss", color="tab:orange")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(loc="lower left", fontsize=8)
    if metrics:
        for name, points in metrics.items():
            axes[0][1].plot(*zip(*points), "o-", label=name)
        axes[0][1].set(xlabel="step", title="Evaluation")
        axes[0][1].legend(loc="best", fontsize=8)
    for step, label in series["events"]:
        for a in axes[0]:
            a.axvline(step, color="gray", linestyle="--", linewidth=1)
        ax.annotate(label, xy=(step, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=7, color="dimgray",
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: same log, same bytes
    return Path(path)


def results_table(log_history: list[dict]) -> str:
    """The Trainer's own "Training results" table (``transformers.modelcard``), freeze metrics left out."""
    clean = [{k: v for k, v in h.items() if not k.startswith("freeze/")} for h in log_history or []]
    _, lines, _ = parse_log_history(clean)
    return make_markdown_table(lines) if lines else ""


def _template_text(name: str) -> str:
    path = Path(name) if os.path.sep in name or Path(name).is_file() else TEMPLATES / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found; built-in templates: "
                                f"{sorted(p.name for p in TEMPLATES.glob('*.md'))}, or pass a path to your own")
    return path.read_text(encoding="utf-8")


def _checkpoint_description(kind: str, folder: Path) -> str:
    if kind == "delta":
        return f"a delta checkpoint: only the trained tensors (`{DELTA_WEIGHTS}`, {_size(folder / DELTA_WEIGHTS)})"
    if kind == "adapter":
        return f"a PEFT adapter (`{ADAPTER_FILES[1]}`, {_size(folder / ADAPTER_FILES[1])})"
    weights = folder / FULL_WEIGHTS[0]
    return f"the full model (`{FULL_WEIGHTS[0]}`{', ' + _size(weights) if weights.is_file() else ''})"


def _size(path: Path) -> str:
    if not path.is_file():
        return "not written yet"
    n = path.stat().st_size
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# --------------------------------------------------------------------------- the card
def render_model_card(model: nn.Module, config: CardConfig | None = None, *, folder: str | os.PathLike | None = None,
                      log_history: list[dict] | None = None, events_log: list[dict] | None = None,
                      hyperparameters: dict | None = None, plot_file: str | None = None,
                      after_saved: tuple[int, list[dict]] | None = None):
    """The :class:`huggingface_hub.ModelCard` for ``model`` (saved or about to be saved in ``folder``).

    ``after_saved``: (step, unfreeze events) when the weights are an earlier checkpoint than the end of training
    (``load_best_model_at_end``): those events fired after it; the card lists them apart, not as part of the weights.
    """
    config = config or CardConfig()
    model = unwrap_model(model)
    folder = Path(folder) if folder is not None else Path(".")
    kind = checkpoint_kind_of(folder)
    state = get_state(model)
    base, revision = base_of(model, config, folder)
    hub_base = base if is_hub_id(base) else None
    metrics = eval_metrics(log_history or [])
    trainable, total = param_counts(model)
    later = list(after_saved[1]) if after_saved else []
    events = unfreeze_events(model, [e for e in events_log or [] if e not in later], log_history)
    preservation, preserved = preservation_text(model)
    name = config.model_name or (config.repo_id or "").split("/")[-1] or folder.resolve().name
    hf_config = getattr(model, "config", None)
    hf_freeze_meta = {"checkpoint": kind, **({"policy": state.policy.to_string()} if state else {}), **preserved}
    tags = list(dict.fromkeys(["hf_freeze", "image-classification", *(["delta-checkpoint"] if kind == "delta" else []),
                               *config.tags]))
    data = ModelCardData(
        model_name=name, base_model=hub_base, library_name=LIBRARY[kind], pipeline_tag="image-classification",
        license=config.license, tags=tags, datasets=[config.dataset] if config.dataset else None,
        metrics=sorted(r.metric_type for r in eval_results(metrics, config.dataset, config.dataset_name)) or None,
        eval_results=eval_results(metrics, config.dataset, config.dataset_name) or None,
        **({"base_model_relation": RELATION[kind]} if hub_base else {}), hf_freeze=hf_freeze_meta)
    pending = ""
    if state is not None:
        after = {g for e in later for g in e["groups"]}
        waiting = [e for e in state.plan.events[state.events_done:]
                   if not set(e.groups) <= set(state.unfrozen) and not set(e.groups) <= after]
        pending = ", ".join(f"{', '.join(e.groups)} at {e.when}" for e in waiting)
    report = freeze_report(model) if state is not None else None
    variables = dict(
        model_name=name, repo_id=config.repo_id or name, kind=kind, version=__version__,
        summary=config.summary or _summary(hf_config, base, state, kind),
        base_model=base, base_is_hub=bool(hub_base), base_url=f"https://huggingface.co/{hub_base}" if hub_base else "",
        base_revision=revision, architecture=type(model).__name__, model_type=getattr(hf_config, "model_type", "?"),
        num_labels=getattr(hf_config, "num_labels", "?"), checkpoint_description=_checkpoint_description(kind, folder),
        policy=state.policy.to_string() if state else "", trainable_params=trainable, total_params=total,
        trainable_percent=100.0 * trainable / max(total, 1),
        eval_metrics={k: f"{v:.4f}" if isinstance(v, float) else v for k, v in metrics.items()},
        dataset_name=config.dataset_name or config.dataset,
        freeze_table=report.to_markdown() if report else "", grouping=GROUPING.get(report.grouping, report.grouping) if report else "",
        events=events, pending=pending, preservation=preservation, plot_file=plot_file,
        saved_step=after_saved[0] if after_saved else None,
        after_saved="; ".join(f"{', '.join(e['groups'])} at step {e['step']} ({e['when']})" for e in later),
        results_table=results_table(log_history or []), hyperparameters=hyperparameters or {},
        has_processor=(folder / "preprocessor_config.json").is_file(), fingerprint=preserved.get("fingerprint", ""), delta_size=_size(folder / DELTA_WEIGHTS))
    return ModelCard.from_template(data, template_str=_template_text(config.template), **variables)


def _summary(hf_config, base, state, kind) -> str:
    labels = getattr(hf_config, "num_labels", None)
    what = f"An image classifier ({labels} labels)" if labels else "An image classifier"
    source = f" fine-tuned from `{base}`" if base else ""
    how = f" with hf_freeze: policy `{state.policy.to_string()}`" if state else ""
    return f"{what}{source}{how}."


def write_model_card(model: nn.Module, output_dir: str | os.PathLike, config: CardConfig | None = None, *,
                     log_history: list[dict] | None = None, events_log: list[dict] | None = None,
                     hyperparameters: dict | None = None, after_saved: tuple[int, list[dict]] | None = None):
    """Render the card into ``output_dir/README.md`` (+ ``training_curves.png``) and return the ``ModelCard``."""
    config = config or CardConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if config.plot and log_history:
        events = unfreeze_events(model, events_log, log_history)
        plot = training_plot(log_history, events, out / PLOT_FILE)
    card = render_model_card(model, config, folder=out, log_history=log_history, events_log=events_log,
                             hyperparameters=hyperparameters, plot_file=plot.name if plot else None,
                             after_saved=after_saved)
    card.save(out / CARD_FILE)
    return card
