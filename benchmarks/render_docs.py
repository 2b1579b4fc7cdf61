"""Render every benchmark figure in README.md and docs/benchmarks.md from the committed result files.

Each generated part sits between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->``;
everything outside the markers is hand-written and kept. ``tests/test_benchmark_docs.py`` re-renders the
blocks from the result files and fails when a committed figure differs.

    python benchmarks/render_docs.py           # rewrite the blocks in README.md and docs/benchmarks.md
    python benchmarks/render_docs.py --check   # exit 1 and name the stale blocks (what the test does)
    python benchmarks/render_docs.py --plots   # also redraw the PNGs from the result files

Result files (relative to the project root): ``docs/benchmarks/transfer_bn.json`` (transfer_bn.py),
``docs/benchmarks/transfer.json`` (transfer.py), ``docs/benchmarks/feature_cache.json`` (feature_cache.py),
``docs/benchmarks/search.json`` (search.py),
``benchmarks/results/classic_drift.json`` (classic_drift.py), ``benchmarks/results/prefix_cache*_cpu.json``
(prefix_cache.py), ``benchmarks/results/step_speed_*.json``
(step_speed.py), ``benchmarks/results/mixed_precision_h200.txt`` (mixed_precision_check.py).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BLOCK = re.compile(r"(<!-- BEGIN GENERATED ([\w.-]+) -->\n)(.*?)(<!-- END GENERATED \2 -->)", re.S)
DOCS = ("README.md", "docs/benchmarks.md")
SOURCES = {
    "transfer_bn": "docs/benchmarks/transfer_bn.json",
    "transfer": "docs/benchmarks/transfer.json",
    "feature_cache": "docs/benchmarks/feature_cache.json",
    "search": "docs/benchmarks/search.json",
    "classic_drift": "benchmarks/results/classic_drift.json",
    "step_h200": "benchmarks/results/step_speed_h200.json",
    "step_cpu16": "benchmarks/results/step_speed_cpu16.json",
    "step_cpu": "benchmarks/results/step_speed_cpu1.json",
    "mixed_precision": "benchmarks/results/mixed_precision_h200.txt",
    "prefix_cache": "benchmarks/results/prefix_cache_cpu.json",
    "prefix_cache_sweep": "benchmarks/results/prefix_cache_sweep_cpu.json",
    "prefix_cache_160": "benchmarks/results/prefix_cache_cpu_160.json",
}


def load_sources(root: Path) -> dict:
    out = {}
    for name, rel in SOURCES.items():
        path = root / rel
        if path.is_file():
            out[name] = path.read_text() if path.suffix == ".txt" else json.loads(path.read_text())
    return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def size(n: float) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------- real-BatchNorm
def bn_summary(results: dict) -> dict[tuple[str, int], dict]:
    """Per (strategy key, shots): mean, std (ddof 1), min and max over the seeds of every measure."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["strategy_key"], r["shots"]), []).append(r)
    out = {}
    for (key, shots), runs in groups.items():
        def stats(field, runs=runs):
            v = np.array([r[field] for r in runs], dtype=float)
            return {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0, "min": v.min(), "max": v.max(),
                    "values": v.tolist()}

        out[key, shots] = {"acc": stats("val_accuracy"), "ret": stats("retention"), "sec": stats("train_seconds"),
                           "delta": stats("delta_bytes"), "trainable": stats("trainable_params"),
                           "steps": runs[0].get("steps"), "n": len(runs), "total": runs[0]["total_params"],
                           "full_bytes": runs[0]["full_checkpoint_bytes"]}
    return out


def bn_keys(results: dict, summary) -> list[str]:
    present = {k for k, _ in summary}
    return [k for k in results["settings"]["strategies"] if k in present]


def bn_label(results: dict, key: str) -> str:
    return results["settings"]["strategies"][key]


def pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def bn_settings(r: dict) -> str:
    st, base = r["settings"], r["base"]
    pre = base["pretraining"]
    epochs = ", ".join(f"{e} at {s}/class" for s, e in st["epochs"].items())
    return (f"Base: transformers `ResNetForImageClassification` ({pre['params']:,} parameters, hidden sizes "
            f"{pre['settings']['hidden_sizes']}, depths {pre['settings']['depths']}, {pre['settings']['image_size']} px), "
            f"pretrained here on the Fashion-MNIST train split, classes 0-4 ({pre['train_images']:,} images, "
            f"{pre['settings']['epochs']} epochs, BatchNorm in training mode): {pre['test_accuracy']:.3f} on the "
            f"{pre['test_images']:,} test images of classes 0-4 ({pre['seconds']:.0f} s, cached). Transfer: classes 5-9, "
            f"{', '.join(map(str, st['shots']))} training images per class (a new draw per seed: {st['seeds']}), "
            f"validation on all {base['val_images']:,} test images of classes 5-9. Retention: the fine-tuned backbone "
            f"under the base's original head on the {base['retention_images']:,} test images of classes 0-4 (the "
            f"base scores **{base['retention']:.3f}**). Every strategy: batch {st['batch_size']}, base LR "
            f"{st['learning_rate']:g}, Adam(W) without weight decay, the same number of optimizer steps (epochs: "
            f"{epochs}), one torch thread per run. The run that wrote the file took "
            f"{r['minutes_this_invocation']:.0f} minutes of wall time on {r['machine']['cores']} CPU cores shared with "
            f"other jobs (runs already on disk are reused, so a resumed run reports less).")


def bn_readme_settings(r: dict) -> str:
    st, base = r["settings"], r["base"]
    pre = base["pretraining"]
    return (f"A transformers ResNet ({pre['params']:,} parameters) pretrained here with ordinary BatchNorm training on "
            f"Fashion-MNIST classes 0-4 ({pre['train_images']:,} images), transferred to classes 5-9 with "
            f"{', '.join(map(str, st['shots']))} images per class, {plural(len(st['seeds']), 'seed')}, the same data, base LR and "
            f"number of steps for every strategy (`benchmarks/transfer_bn.py`). *Accuracy*: validation on the "
            f"{base['val_images']:,} test images of classes 5-9. *Retention*: the fine-tuned backbone under the base's "
            f"original head on the {base['retention_images']:,} test images of classes 0-4 (the base itself: "
            f"{base['retention']:.3f}) — what the fine-tuning kept of the pretrained model.")


def bn_accuracy_table(r: dict) -> str:
    summary = bn_summary(r)
    shots = r["settings"]["shots"]
    rows = ["| strategy | " + " | ".join(f"{s}/class: accuracy | retention" for s in shots) + " |",
            "|---|" + "---:|---:|" * len(shots)]
    for k in bn_keys(r, summary):
        cells = [f"{pm(summary[k, s]['acc'])} | {pm(summary[k, s]['ret'])}" if (k, s) in summary else "— | —"
                 for s in shots]
        rows.append(f"| {bn_label(r, k)} | " + " | ".join(cells) + " |")
    for k in r["settings"].get("pending", {}):
        rows.append(f"| {bn_label(r, k)} | " + " | ".join("pending | pending" for _ in shots) + " |")
    return "\n".join(rows) + f"\n\nMean ± standard deviation over {plural(len(r['settings']['seeds']), 'seed')}."


def bn_cost_table(r: dict) -> str:
    summary = bn_summary(r)
    shots = r["settings"]["shots"]
    s = shots[-1]
    rows = ["| strategy | " + " | ".join(f"train s at {t}/class (steps)" for t in shots)
            + f" | trainable params ({s}/class) | artefact to save ({s}/class) |",
            "|---|" + "---:|" * (len(shots) + 2)]
    for k in bn_keys(r, summary):
        times = [f"{summary[k, t]['sec']['mean']:.1f} ({summary[k, t]['steps']})" for t in shots]
        x = summary[k, s]
        rows.append(f"| {bn_label(r, k)} | " + " | ".join(times)
                    + f" | {int(x['trainable']['mean']):,} ({100 * x['trainable']['mean'] / x['total']:.0f}%) | "
                      f"{size(x['delta']['mean'])} |")
    return "\n".join(rows)


def dominates(a: dict, b: dict) -> bool:
    """``a`` is at least as accurate and at least as retentive as ``b`` within seed noise (the larger of the two
    standard deviations on each axis)."""
    return all(a[m]["mean"] >= b[m]["mean"] - max(a[m]["std"], b[m]["std"]) for m in ("acc", "ret"))


def bn_findings(r: dict) -> str:
    """Per data size, in words: the accuracy ranking, who is most accurate (and by how much against the best
    hf_freeze policy), which baselines and peers some hf_freeze policy matches or beats on both axes, which not."""
    summary = bn_summary(r)
    keys = bn_keys(r, summary)
    fam, short = r["settings"]["family"], r["settings"]["short"]
    ours = [k for k in keys if fam[k] == "hf_freeze"]
    hand_set = [k for k in ours if k != "search"]
    others = [k for k in keys if fam[k] != "hf_freeze"]

    def name(k):
        return short.get(k) or bn_label(r, k)

    lines = []
    for s in r["settings"]["shots"]:
        acc = {k: summary[k, s]["acc"] for k in keys}
        ranking = sorted(keys, key=lambda k: -acc[k]["mean"])
        best, best_ours = ranking[0], next(k for k in ranking if fam[k] == "hf_freeze")
        parts = [f"- **{s}/class** — accuracy, best first: "
                 + ", ".join(f"{name(k)} {acc[k]['mean']:.3f}" for k in ranking) + "."]
        if fam[best] != "hf_freeze":
            gap = acc[best]["mean"] - acc[best_ours]["mean"]
            noise = max(acc[best]["std"], acc[best_ours]["std"])
            parts.append(f"**{name(best)} is the most accurate**; the best hf_freeze policy ({name(best_ours)}) is "
                         f"{gap:.3f} behind, {'within' if gap <= noise else '**beyond**'} seed noise ({noise:.3f}).")
        base = r["base"]["retention"]
        changing = [k for k in ours if summary[k, s]["ret"]["mean"] < base]
        if changing:
            keep = max(changing, key=lambda k: summary[k, s]["ret"]["mean"])
            gap = acc[best]["mean"] - acc[keep]["mean"]
            noise = max(acc[best]["std"], acc[keep]["std"])
            parts.append(f"Trade-off: the most retentive hf_freeze policy that trains the backbone ({name(keep)}, "
                         f"retention {summary[keep, s]['ret']['mean']:.3f} vs {summary[best, s]['ret']['mean']:.3f}) "
                         f"is {gap:.3f} less accurate than {name(best)}, "
                         f"{'within' if gap <= noise else 'beyond'} seed noise ({noise:.3f}).")
        covered, uncovered = [], []
        for k in others:
            winners = [name(w) for w in hand_set if dominates(summary[w, s], summary[k, s])]
            (covered if winners else uncovered).append((k, winners))
        if covered:
            parts.append("Matched or beaten on both axes by a hand-set policy: "
                         + "; ".join(f"{name(k)} (by {', '.join(w)})" for k, w in covered) + ".")
        if uncovered:
            parts.append("**Not matched on both axes by any hand-set hf_freeze policy: "
                         + ", ".join(name(k) for k, _ in uncovered) + ".**")
        if ("search", s) in summary:
            parts.append(search_finding(r, summary, s, hand_set, name))
        lines.append(" ".join(parts))
    base = r["base"]["retention"]
    kept = [k for k in keys if all(x["retention"] == base for x in r["runs"] if x["strategy_key"] == k)]
    lines.append(f"- Retention: {', '.join(name(k) for k in kept) or 'no strategy'} keeps the base's {base:.3f} in "
                 "every run (the backbone is bit-identical); every other strategy changes what the original head sees.")
    return "\n".join(lines)


def search_finding(r: dict, summary, s: int, hand_set: list[str], name) -> str:
    """Which peer points the search's policy matches or beats on both axes at ``s``/class, which it does not, and
    which of those a hand-set policy does."""
    peers = [k for k in r["settings"]["search"]["peers"] if (k, s) in summary]
    x = summary["search", s]
    won = [k for k in peers if dominates(x, summary[k, s])]
    lost = [k for k in peers if k not in won]
    text = (f"**The search** (accuracy {x['acc']['mean']:.3f} ± {x['acc']['std']:.3f}, retention "
            f"{x['ret']['mean']:.3f} ± {x['ret']['std']:.3f}) matches or beats on both axes: "
            f"{', '.join(name(k) for k in won) or 'none of the peer points'}")
    if lost:
        reasons = []
        for k in lost:
            p = summary[k, s]
            short_of = [axis for axis, m in (("accuracy", "acc"), ("retention", "ret"))
                        if x[m]["mean"] < p[m]["mean"] - max(x[m]["std"], p[m]["std"])]
            by_hand = [name(w) for w in hand_set if dominates(summary[w, s], p)]
            reasons.append(f"{name(k)} (short on {' and '.join(short_of)}; "
                           + (f"matched by the hand-set {', '.join(by_hand)}" if by_hand else "no hand-set policy "
                              "matches it either") + ")")
        text += "; not: " + "; ".join(reasons)
    better = [name(k) for (k, t), y in summary.items() if t == s and k != "search"
              and y["acc"]["mean"] > x["acc"]["mean"] and y["ret"]["mean"] > x["ret"]["mean"]]
    return text + ". " + (f"Higher on both means than the search: {', '.join(better)}." if better else
                          "No strategy has both a higher mean accuracy and a higher mean retention (the search's "
                          "point is on the frontier of the means).")


def search_runs_table(r: dict) -> str:
    """Per data size and seed: the policy the search chose, its trials and budget, and the chosen policy's scores."""
    st = r["settings"]["search"]
    runs = sorted((x for x in r["runs"] if x["strategy_key"] == "search"), key=lambda x: (x["shots"], x["seed"]))
    if not runs:
        return "(the search strategy has not run)"
    rows = ["| n/class | seed | chosen policy | trials (of candidates) | trial steps / budget (total incl. final) | "
            "search s | tolerance | chosen trial: held-out acc / proxy | final: accuracy / retention / proxy |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for x in runs:
        q = x["search"]
        chosen = q["rows"][0]
        rows.append(f"| {x['shots']} | {x['seed']} | `{x['policy']}` | {q['trials']} ({q['candidates']}) | "
                    f"{q['trial_steps']} / {q['budget']['trials']} ({q['trial_steps'] + x['steps']} of "
                    f"{q['budget']['total']}) | {q['search_seconds']:.0f} | {q['tolerance']:.3f} | "
                    f"{chosen['eval_accuracy']:.3f} / {chosen['retention_proxy']:.3f} | {x['val_accuracy']:.3f} / "
                    f"{x['retention']:.3f} / {q['final_retention_proxy']:.3f} |")
    proxies = np.array([x["search"]["final_retention_proxy"] for x in runs])
    kept = np.array([x["retention"] for x in runs])
    corr = float(np.corrcoef(proxies, kept)[0, 1]) if len(runs) > 2 else float("nan")
    space = ", ".join(f"{k}={v}" for k, v in st["space"].items())
    first = runs[0]["search"]
    return "\n".join(rows) + (
        f"\n\nBudget per seed: the optimizer steps of one run of each peer point ({', '.join(st['peers'])}): "
        f"{len(st['peers'])} x the standard run; the trials get all of it but one run's worth, which the final training "
        f"of the chosen policy on all n images takes. Trials train on {100 * (1 - st['holdout']):.0f}% of each class of "
        f"the n/class draw (e.g. {first['search_train_images']} images at {runs[0]['shots']}/class) for the standard "
        f"number of epochs and are scored on the other {100 * st['holdout']:.0f}% (held-out acc). Space: "
        f"`FreezeSearchSpace({space})`; trials are a seeded random order of its distinct policies. Retention proxy: "
        f"agreement with the base on {5 * st['source_per_class']} unlabeled train-split images of classes 0-4 (not "
        f"the test images behind *retention*). Choice: {st['tolerance']}. Across these {len(runs)} runs the final "
        f"model's proxy and its retention correlate with r = {corr:.3f}. Search seconds: wall time of the trials "
        "(evaluations and proxy included) on the shared cores, one torch thread.")


def bn_readme_table(r: dict) -> str:
    summary = bn_summary(r)
    shots = r["settings"]["shots"]
    s = shots[-1]
    rows = ["| strategy | " + " | ".join(f"{t}/class: acc / retention" for t in shots)
            + f" | artefact ({s}/class) | train s ({s}/class) |", "|---|" + "---:|" * (len(shots) + 2)]
    for k in bn_keys(r, summary):
        cells = [f"{summary[k, t]['acc']['mean']:.3f} / {summary[k, t]['ret']['mean']:.3f}" for t in shots]
        rows.append(f"| {bn_label(r, k)} | " + " | ".join(cells)
                    + f" | {size(summary[k, s]['delta']['mean'])} | {summary[k, s]['sec']['mean']:.1f} |")
    for k in r["settings"].get("pending", {}):
        rows.append(f"| {bn_label(r, k)} | " + " | ".join("pending" for _ in shots) + " | | |")
    searches = [x["search"]["search_seconds"] for x in r["runs"] if x["strategy_key"] == "search" and x["shots"] == s]
    search_note = (f" The search row's time is the final training of the policy it chose; the search itself (its "
                   f"trials) took {np.mean(searches):.0f} s more at {s}/class." if searches else "")
    return "\n".join(rows) + (f"\n\nMeans over {plural(len(r['settings']['seeds']), 'seed')}; the base's own retention is "
                              f"{r['base']['retention']:.3f}. Training time: wall seconds on {r['machine']['cores']} "
                              "CPU cores shared with other jobs, one torch thread (noisy). Standard deviations, the "
                              "frontier plots and the strategies' exact recipes: [`docs/benchmarks.md`](docs/benchmarks.md)."
                              + search_note)


def bn_timm_note(r: dict) -> str:
    run = next((x for x in r["runs"] if x["strategy_key"] == "timm"), None)
    if run is None:
        return "(timm not run)"
    return (f"timm's layer ids without a `group_matcher`: LR scales {run['timm_lr_scales_without_group_matcher']} "
            f"(one layer: the decay does nothing, timm warns); with the matcher built from `hf_freeze.layer_groups`: "
            f"{run['timm_lr_scales']}.")


def bn_plots(r: dict) -> str:
    return "\n".join(f"![accuracy vs retention at {s}/class](benchmarks/transfer_bn_{s}.png)" for s in r["settings"]["shots"])


def plot_transfer_bn(r: dict, out: Path) -> list[Path]:
    """One PNG per data size: validation accuracy against retention, every strategy a point (mean) with its seed
    spread (min-max bars on both axes) and the individual seeds as faint dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = bn_summary(r)
    keys = bn_keys(r, summary)
    fam = r["settings"]["family"]
    marker = {"hf_freeze": "o", "baseline": "s", "peer": "^"}
    palette = plt.get_cmap("tab20").colors
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for s in r["settings"]["shots"]:
        fig, ax = plt.subplots(figsize=(9.5, 5.2))
        for i, k in enumerate(keys):
            x, y = summary[k, s]["ret"], summary[k, s]["acc"]
            color = palette[(2 * i) % 20 + (2 * i) // 20]  # the dark shades first, then the light ones
            ax.scatter(x["values"], y["values"], color=color, alpha=0.25, s=14, marker=marker[fam[k]])
            ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                        yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]], color=color, marker=marker[fam[k]],
                        markersize=7, capsize=3, linestyle="none", label=r["settings"]["short"].get(k) or k)
        ax.axvline(r["base"]["retention"], color="gray", linestyle=":", linewidth=1)
        ax.text(r["base"]["retention"], ax.get_ylim()[0], " base", color="gray", fontsize=7, va="bottom")
        ax.set_xlabel("retention: fine-tuned backbone + original head, test classes 0-4")
        ax.set_ylabel("validation accuracy, classes 5-9")
        ax.set_title(f"ResNet (real BatchNorm), Fashion-MNIST 0-4 -> 5-9, {s} images/class\n"
                     "mean and min-max over seeds; o hf_freeze, s baselines, ^ peers", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = out / f"transfer_bn_{s}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- MobileNetV2
def mobilenet_readme_table(r: dict) -> str:
    from transfer_report import summarise

    summary = summarise(r)
    keys = list(dict.fromkeys(k for k, _ in summary))
    shots = sorted({s for _, s in summary})
    s = shots[-1]
    rows = ["| strategy | " + " | ".join(f"{t}/class" for t in shots)
            + f" | ImageNet top-1 at {s}/class, original head | delta to save ({s}/class) |",
            "|---|" + "---:|" * (len(shots) + 2)]
    for k in keys:
        cells = [f"{summary[k, t]['acc']:.3f}" for t in shots]
        x = summary[k, s]
        rows.append(f"| {x['label']} | " + " | ".join(cells)
                    + f" | {x['top1']:.1f}/20 | {size(x['delta_bytes'])} |")
    st = r["settings"]
    return "\n".join(rows) + (f"\n\nValidation accuracy on {st['val_per_class'] * 10} test images, mean over "
                              f"{len(st['seeds'])} seeds, {st['image_size']} px; the pretrained model scores "
                              f"{r['baseline_imagenet_top1']}/20 on the ImageNet samples.")


def mobilenet_settings(r: dict) -> str:
    st = r["settings"]
    epochs = ", ".join(f"{e} epochs at {s}/class" for s, e in st["epochs"].items())
    return (f"ImageNet MobileNetV2 (`mobilenet_v2_1.0_224-imagenet`, 2.2 M parameters) with a new 10-class head, "
            f"fine-tuned on few-shot Fashion-MNIST: {', '.join(map(str, st['shots']))} training images per class "
            f"drawn from the train split (a new draw per seed: {st['seeds']}), evaluated on a fixed set of "
            f"{st['val_per_class'] * 10} test-split images. Images upsampled to {st['image_size']} px. Every strategy: "
            f"batch {st['batch_size']}, AdamW, constant LR {st['learning_rate']:g}, no weight decay, head dropout 0, "
            f"{epochs}; each strategy x data size in a fresh process. Whole run: {r['total_minutes']:.0f} minutes on "
            f"{r['machine']['cores']} shared cores, torch {r['machine']['torch']}, transformers "
            f"{r['machine']['transformers']}, pytorch-lightning {r['machine']['pytorch_lightning']}.")


def mobilenet_block(fn_name: str) -> Callable[[dict], str]:
    def render(r: dict) -> str:
        import transfer_report

        summary = transfer_report.summarise(r)
        fn = getattr(transfer_report, fn_name)
        return fn(summary, r) if fn_name == "headline" else fn(summary)

    return render


# ---------------------------------------------------------------------------------------------- the rest
def classic_drift_sentence(d: dict) -> str:
    c, h = d["classic"], d["hf_freeze"]
    return (f"On the real ImageNet MobileNetV2 with {d['shots']} Fashion-MNIST images per class ({d['steps']} "
            f"Trainer steps), {c['backbone_tensors_changed']} of {c['backbone_tensors']} \"frozen\" backbone tensors "
            f"changed, validation accuracy was {c['val_accuracy']:.3f} (chance: 0.1) and the backbone with its original "
            f"head went from {d['imagenet_top1_before']}/20 to {c['imagenet_top1']}/20 on ImageNet photos. With "
            f"hf_freeze: {h['backbone_tensors_changed']} changed, {h['val_accuracy']:.3f}, and "
            f"{h['imagenet_top1']}/20 (`benchmarks/classic_drift.py`, `benchmarks/results/classic_drift.json`; "
            "`tests/test_real_mobilenet.py` checks the hf_freeze side).")


def classic_drift_table(d: dict) -> str:
    rows = ["| recipe | backbone tensors changed | of which parameters | of which buffers | validation accuracy | "
            "ImageNet top-1, original head |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("classic", "classic `requires_grad=False` (plain Trainer)"), ("hf_freeze", "hf_freeze `backbone`")):
        x = d[key]
        rows.append(f"| {label} | {x['backbone_tensors_changed']} / {x['backbone_tensors']} | {x['params_changed']} | "
                    f"{x['buffers_changed']} | {x['val_accuracy']:.3f} | {x['imagenet_top1']}/20 |")
    return "\n".join(rows) + (f"\n\nBefore training: ImageNet top-1 {d['imagenet_top1_before']}/20. Changed buffers: "
                              f"{', '.join(f'`{k}` x{v}' for k, v in d['classic']['changed_kinds'].items())}.")


def feature_cache_table(d: dict) -> str:
    off, on = d["off"]["epoch_s"], d["memory"]["epoch_s"]
    rows = ["| | epoch 1 | epochs 2-N | validation accuracy |", "|---|---:|---:|---:|",
            f"| no cache | {off[0]:.2f} s | {min(off[1:]):.2f}-{max(off[1:]):.2f} s | {d['off']['accuracy']:.3f} |",
            f"| feature cache (memory) | {on[0]:.2f} s (includes computing the cache) | {min(on[1:]):.2f}-{max(on[1:]):.2f} s "
            f"| {d['memory']['accuracy']:.3f} |"]
    later = float(np.mean(on[1:]))
    return "\n".join(rows) + (f"\n\nCached epochs 2..N cost **{100 * d['ratio_later_to_first']:.1f}%** of the cached "
                              f"epoch 1 (target ≤ 5%) and {100 * later / float(np.mean(off[1:])):.1f}% of an uncached "
                              "epoch (what is left is the Trainer's own per-step work).")


def prefix_cache_table(d: dict) -> str:
    """Per model and boundary: epochs 2..N cached / uncached / ideal; then the gradual schedules; then the goals."""
    rows = ["| model | frozen groups (cached module) | size per example | epochs 2..N: uncached | cached | ideal "
            "(suffix alone) | cached / ideal | uncached / cached | weights cached = uncached |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    served = [r for r in d["runs"] if r.get("ideal")]
    for r in d["runs"]:
        head = f"| {r['model']} | {r['boundary']}: {r['frozen_groups']} of {r['groups_below_head']}"
        if not r.get("ideal"):
            rows.append(f"{head} | refused: {r['refusal']} | | | | | | |")
            continue
        info, later = r["cache"][0], r["later_epoch_s"]
        rows.append(f"{head} (`{info['boundary']}`) | {size(info['bytes_per_example'])} | {later['off']:.2f} s | "
                    f"{later['auto']:.2f} s | {later['ideal']:.2f} s | {r['cached_over_ideal']:.2f}x | "
                    f"{r['uncached_over_cached']:.2f}x | {'bit-identical' if r['weights_identical'] else 'DIFFERENT'} |")
    rows += ["", "| model | gradual schedule | epochs | `train()` uncached | cached | uncached / cached | prefix "
             "boundaries | weights cached = uncached |", "|---|---|---:|---:|---:|---:|---|---|"]
    for g in d["gradual"]:
        bounds = ", ".join(f"`{i['boundary']}`" for i in g["prefix_cache"]) or "none"
        rows.append(f"| {g['model']} | `{g['policy']}` | {g['epochs']} | {g['off']['train_s']:.1f} s | "
                    f"{g['auto']['train_s']:.1f} s | {g['speedup']:.2f}x | {bounds} | "
                    f"{'bit-identical' if g['weights_identical'] else 'DIFFERENT'} |")
    for g in d["gradual"]:  # where the time goes: the epochs that start a phase probe and build a cache
        per = g["epochs"] // 3
        starts = [0, per, 2 * per]
        off, on = g["off"]["epoch_s"], g["auto"]["epoch_s"]
        rest = [i for i in range(len(on)) if i not in starts]
        before = g["auto"]["train_s"] - sum(on)
        sources = ", ".join(f"`{i['boundary']}` {i['source']}" for i in g["prefix_cache"])
        rows.append(f"\n{g['model']}, gradual: before the first epoch (the probe) {before:.1f} s cached vs "
                    f"{g['off']['train_s'] - sum(off):.1f} s uncached; the 3 epochs that start a phase (a cache build, "
                    f"or the check of a cache computed ahead) took {sum(on[i] for i in starts):.1f} s cached vs "
                    f"{sum(off[i] for i in starts):.1f} s uncached; the other {len(rest)} epochs "
                    f"{sum(on[i] for i in rest):.1f} s vs {sum(off[i] for i in rest):.1f} s. Boundaries: {sources} "
                    "(*ahead*: its rows computed in the first boundary's pass).")
    uncached_sizes = {}  # batches of another size than the cache's are served only where the prefix gives the same bits
    for r in served:
        for k, v in r["cache"][0].get("batch_sizes", {}).items():
            if v != "cache":
                uncached_sizes.setdefault((r["model"], k), []).append(r["boundary"])
    for (model, k), where in uncached_sizes.items():
        rows.append(f"\n{model} ({', '.join(where)}): the epoch's last batch ({k} of {served[0]['cache'][0]['rows']} "
                    f"images) trains on the real examples: the prefix rounds differently in batches of {k} than of "
                    "16; the ideal serves every batch from stored rows.")
    ideal_ok = [r for r in served if r["cached_over_ideal"] <= 1.15]
    fast = [g for g in d["gradual"] if g["speedup"] >= 1.5]
    worst = max((r["cached_over_ideal"] for r in served), default=float("nan"))
    load = d.get("load_average_at_start")
    return "\n".join(rows) + (
        f"\n\nGoal *within 1.15x of the ideal*: **{'met' if len(ideal_ok) == len(served) else 'not met'}** "
        f"({len(ideal_ok)} of {len(served)} boundaries; worst {worst:.2f}x). Goal *gradual schedule at least 1.5x "
        f"faster end to end*: **{'met' if len(fast) == len(d['gradual']) else 'not met'}** ({len(fast)} of "
        f"{len(d['gradual'])} models: " + ", ".join(f"{g['model']} {g['speedup']:.2f}x" for g in d["gradual"]) + "). "
        f"{served[0]['cache'][0]['rows'] if served else d['images']} images (`--images {d['images']}`: "
        f"{d['images'] // 10} per class), batch 16, {d['size']} px, {d['epochs']} epochs per run, {d['threads']} torch thread"
        f"{'s' if d['threads'] != 1 else ''}, CPU ({d.get('cpus', '?')} cores shared with other jobs"
        + (f", load average {load[0]:.1f} at the start" if load else "") + ").")


def prefix_cache_full_batches_sentence(d: dict) -> str:
    """The same benchmark on a dataset of whole batches (no epoch-end batch of another size)."""
    runs = [r for r in d["runs"] if r.get("ideal")]
    model = runs[0]["model"] if runs else d["gradual"][0]["model"]
    rows = runs[0]["cache"][0]["rows"] if runs else d["images"]
    return (f"The same benchmark with {rows} images ({rows // 16} full batches, no partial one; "
            f"`python benchmarks/prefix_cache.py --images {d['images']} --models {model}`, "
            f"`benchmarks/results/prefix_cache_cpu_160.json`) gives cached / ideal "
            + ", ".join(f"{r['cached_over_ideal']:.2f}x ({r['boundary']})" for r in runs)
            + " and the gradual schedule " + ", ".join(f"{g['speedup']:.2f}x" for g in d["gradual"]) + ".")


def prefix_cache_sweep_sentence(rows: list) -> str:
    verdicts = {v: [r for r in rows if r["verdict"] == v] for v in ("served, bit-identical", "refused", "DIFFERENT")}
    types = sorted({r["model_type"] for r in rows})
    refused = ", ".join(f"{r['model_type']} ({r['precision']})" for r in verdicts["refused"])
    return (f"Over {len(types)} tiny model types of `hf_freeze.tiny` that take `pixel_values`, fp32 and bf16 autocast "
            f"({len(rows)} runs, the first half of the groups below the head frozen and one of them unfrozen after "
            f"epoch 1), the prefix cache served {len(verdicts['served, bit-identical'])} with bit-identical weights, "
            f"refused {len(verdicts['refused'])}" + (f" ({refused})" if refused else "")
            + f", and {len(verdicts['DIFFERENT'])} differed (`benchmarks/prefix_cache.py --sweep`, "
            "`benchmarks/results/prefix_cache_sweep_cpu.json`)." + (
                f" In {sum('ahead' in r['sources'] for r in rows)} of them the second boundary's rows were computed "
                "in the first boundary's pass (*ahead*)." if all("sources" in r for r in rows) else ""))


STEP_ROWS = [
    ("inference", "inference forward (eval, no_grad); starred: against the reference, the same operation"),
    ("step", "head-only training step, model compute only (no Trainer)"),
    ("full", "full fine-tuning step, model compute only"),
    ("hf_freeze", "`FreezeTrainer` head-only step, feature cache off"),
    ("hf_freeze_cache", "`FreezeTrainer` head-only step, feature cache on (memory)"),
    ("manual", "plain Trainer step after `apply_policy` (no callback)"),
    ("classic", "plain Trainer step, classic `requires_grad=False`"),
]


def step_speed_table(sources: dict, readme: bool = False) -> str:
    """One column per result file (wall-clock medians) plus, where recorded, its CPU-time medians (the README
    shows only the CPU-time column of a file that has one)."""
    cols = []
    for k, title in (("step_h200", "NVIDIA H200"), ("step_cpu16", "CPU, 16 threads"), ("step_cpu", "CPU, 1 thread")):
        if k not in sources:
            continue
        p = sources[k].get("provenance", {})
        when = f"{p.get('measured', '?')}{', ' + p['note'] if p.get('note') else ''}"
        if not (readme and "median_cpu_s" in sources[k]):
            cols.append((k, f"{title}, wall ({when})", "median_s"))
        if "median_cpu_s" in sources[k]:
            cols.append((k, f"{title}, CPU time ({when})", "median_cpu_s"))
    ratio_field = {"median_s": "paired_ratio", "median_cpu_s": "paired_ratio_cpu"}
    rows = ["| median per step | " + " | ".join(t for _, t, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in STEP_ROWS:
        cells = []
        for k, _, field in cols:
            med = sources[k][field]
            if key not in med:
                cells.append("not measured")
                continue
            paired = sources[k].get(ratio_field[field])
            value = paired[key] if paired else med[key] / med["inference"]
            ratio = "" if key == "inference" and not paired else f" ({value:.2f}x{'*' if paired else ''})"
            cells.append(f"{1000 * med[key]:.1f} ms{ratio}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for k, _, field in cols:
        setup = sources[k].get("setup_s", {})
        first = field == "median_s" or (readme and "median_cpu_s" in sources[k])
        cells.append(f"{setup['hf_freeze_cache']:.2f} s vs {setup['hf_freeze']:.2f} s (wall)"
                     if "hf_freeze_cache" in setup and first else "—")
    rows.append("| `train()` set-up before the first step, cache on vs off (the cache is computed here) | "
                + " | ".join(cells) + " |")
    rows.append("| FreezeCallback's own time per step (wall) | "
                + " | ".join(f"{100 * sources[k]['callback_self_time']:.2f}%"
                             if field == "median_s" or (readme and "median_cpu_s" in sources[k]) else "—"
                             for k, _, field in cols) + " |")
    rows.append("| peak GPU memory: inference / head-only step / full | "
                + " | ".join(" / ".join(f"{sources[k]['peak_mib'][x]:.0f}" for x in ("inference", "step", "full"))
                             + " MiB" if sources[k].get("peak_mib") and field == "median_s" else "—"
                             for k, _, field in cols) + " |")
    return "\n".join(rows) + ("\n\nRatios in brackets: to the inference forward. Without a star: ratio of two "
                              "medians measured minutes apart. With a star (*): the median of per-step ratios to a "
                              "reference inference forward timed right after each step, immune to the machine's "
                              "speed drifting between configurations.")


def mixed_precision_summary(text: str) -> str:
    lines = re.findall(r"^\s+(fp32|bf16|fp16)\s+(hf_freeze|classic)\s+frozen tensors changed:\s+(\d+)/(\d+)", text, re.M)
    by = {}
    for precision, recipe, changed, total in lines:
        by.setdefault(recipe, []).append((precision, int(changed), int(total)))
    ours = ", ".join(f"{p} {c}/{t}" for p, c, t in by.get("hf_freeze", []))
    classic = ", ".join(f"{p} {c}/{t}" for p, c, t in by.get("classic", []))
    device = re.search(r"device: ([^;]+)", text)
    return (f"{device.group(1) if device else '?'}: frozen tensors changed with hf_freeze: {ours}; with the classic "
            f"recipe: {classic}.")


# ---------------------------------------------------------------------------------------------- policy search
def search_table(d: dict) -> str:
    """benchmarks/search.py: the trials ranked, the set-up, and the check that every trial trained what it sampled."""
    st, space = d["settings"], d["space"]
    default = next((r for r in d["rows"] if r["policy"] == "freeze=backbone"), None)
    rows = ["| rank | policy | eval accuracy |", "|---:|---|---:|"]
    rows += [f"| {i + 1} | `{r['policy']}`{' (the default)' if r is default else ''} | {r['eval_accuracy']:.3f} |"
             for i, r in enumerate(d["rows"])]
    mismatched = sum(t["sampled"] != t["applied"] for t in d["trials"].values())
    rechecks = d["rechecks"]
    same = all(c["same_loss"] and c["alone"] == c["in_search"] for c in rechecks)
    return (f"`search_freeze_policies` over the {d['candidates']} distinct policies of `FreezeSearchSpace("
            + ", ".join(f"{k}={v}" for k, v in space.items() if k in ("freeze", "schedule", "reach", "lr_scale"))
            + f")` on the real MobileNetV2, Fashion-MNIST {st['shots']} images/class, {st['val']} validation images, "
            f"{st['size']} px, {st['epochs']:g} epochs ({d['steps_per_trial']} optimizer steps) per trial; "
            f"{d['seconds']:.0f} s for the {len(d['rows'])} trials on {plural(st['threads'], 'torch thread')} of the "
            f"shared machine ({d['measured']}, torch {d['torch']}).\n\n" + "\n".join(rows)
            + f"\n\nEach of the {len(d['trials'])} trials trained the policy it sampled (recorded through "
            f"`hf_freeze.get_state(model).policy` at train begin: {mismatched} mismatches), and "
            f"{len(rechecks)} {'policy' if len(rechecks) == 1 else 'policies'} (best and worst) trained again alone, outside the search, gave "
            + ("the same accuracy and a bit-identical evaluation loss." if same else "**a different score**: "
               + "; ".join(f"`{c['policy']}` {c['in_search']:.3f} vs {c['alone']:.3f}" for c in rechecks) + "."))


def search_readme_sentence(d: dict) -> str:
    best, runner_up = d["rows"][0], d["rows"][1] if len(d["rows"]) > 1 else None
    default = next((r for r in d["rows"] if r["policy"] == "freeze=backbone"), None)
    if default is best:
        versus = f" (the default; {best['eval_accuracy']:.3f}" + (
            f", then `{runner_up['policy']}` {runner_up['eval_accuracy']:.3f})" if runner_up else ")")
    elif default is not None:
        versus = f" ({best['eval_accuracy']:.3f} vs {default['eval_accuracy']:.3f} for the default `backbone`)"
    else:
        versus = f" ({best['eval_accuracy']:.3f})"
    space = d["space"]
    return (f"On the real MobileNetV2 few-shot task the {d['candidates']} distinct policies of freeze depths "
            f"{', '.join(space['freeze'])} x schedules {', '.join(space['schedule'])} (reach {space['reach'][0]}) at LR "
            f"scale {space['lr_scale'][0]:g} ranked `{best['policy']}` first{versus}; "
            "`benchmarks/search.py`, figures in [`docs/benchmarks.md`](docs/benchmarks.md#4-linear-probe-feature-cache) "
            "and `docs/benchmarks/search.json`.")


RENDERERS: dict[str, tuple[str, Callable]] = {
    "readme-classic-drift": ("classic_drift", classic_drift_sentence),
    "readme-transfer-bn-settings": ("transfer_bn", bn_readme_settings),
    "readme-transfer-bn": ("transfer_bn", bn_readme_table),
    "readme-transfer-bn-findings": ("transfer_bn", bn_findings),
    "readme-transfer-mobilenet": ("transfer", mobilenet_readme_table),
    "readme-step-speed": (None, lambda sources: step_speed_table(sources, readme=True)),
    "bn-settings": ("transfer_bn", bn_settings),
    "bn-accuracy": ("transfer_bn", bn_accuracy_table),
    "bn-costs": ("transfer_bn", bn_cost_table),
    "bn-findings": ("transfer_bn", bn_findings),
    "bn-timm": ("transfer_bn", bn_timm_note),
    "bn-plots": ("transfer_bn", bn_plots),
    "bn-search": ("transfer_bn", search_runs_table),
    "search-mobilenet": ("search", search_table),
    "readme-search": ("search", search_readme_sentence),
    "mobilenet-settings": ("transfer", mobilenet_settings),
    "mobilenet-accuracy": ("transfer", mobilenet_block("accuracy_table")),
    "mobilenet-time": ("transfer", mobilenet_block("time_table")),
    "mobilenet-cost": ("transfer", mobilenet_block("cost_table")),
    "mobilenet-headline": ("transfer", mobilenet_block("headline")),
    "classic-drift": ("classic_drift", classic_drift_table),
    "feature-cache": ("feature_cache", feature_cache_table),
    "step-speed": (None, step_speed_table),
    "mixed-precision": ("mixed_precision", mixed_precision_summary),
    "readme-mixed-precision": ("mixed_precision", mixed_precision_summary),
    "readme-prefix-cache": ("prefix_cache", prefix_cache_table),
    "readme-prefix-cache-sweep": ("prefix_cache_sweep", prefix_cache_sweep_sentence),
    "readme-prefix-cache-160": ("prefix_cache_160", prefix_cache_full_batches_sentence),
}


def render_block(name: str, sources: dict) -> str:
    if name not in RENDERERS:
        raise KeyError(f"no renderer for generated block {name!r}; known: {', '.join(RENDERERS)}")
    source, fn = RENDERERS[name]
    if source is None:
        return fn(sources)
    if source not in sources:
        raise FileNotFoundError(f"block {name!r} needs {SOURCES[source]}")
    return fn(sources[source])


def render_text(text: str, sources: dict) -> str:
    """``text`` with every generated block re-rendered from ``sources``."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2), sources).rstrip("\n") + "\n" + m.group(4), text)


def block_names(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def stale_blocks(root: Path) -> list[str]:
    """``file:block`` for every block whose committed text differs from a fresh rendering."""
    sources = load_sources(root)
    stale = []
    for rel in DOCS:
        text = (root / rel).read_text()
        fresh = render_text(text, sources)
        old = {m.group(2): m.group(3) for m in BLOCK.finditer(text)}
        new = {m.group(2): m.group(3) for m in BLOCK.finditer(fresh)}
        stale += [f"{rel}:{name}" for name in old if old[name] != new[name]]
    return stale


def update_docs(root: Path) -> list[Path]:
    sources = load_sources(root)
    written = []
    for rel in DOCS:
        path = root / rel
        text = path.read_text()
        fresh = render_text(text, sources)
        if fresh != text:
            path.write_text(fresh)
            written.append(path)
    print("rendered: " + (", ".join(str(p.relative_to(root)) for p in written) or "nothing changed"))
    return written


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    p.add_argument("--plots", action="store_true", help="also redraw the PNGs from the result files")
    a = p.parse_args(argv)
    root = HERE.parent
    if a.check:
        stale = stale_blocks(root)
        print("stale: " + ", ".join(stale) if stale else "all generated blocks match their result files")
        return 1 if stale else 0
    if a.plots:
        sources = load_sources(root)
        if "transfer_bn" in sources:
            plot_transfer_bn(sources["transfer_bn"], root / "docs" / "benchmarks")
        if "transfer" in sources:
            from transfer_report import plot, summarise

            plot(summarise(sources["transfer"]), root / "docs")
    update_docs(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
