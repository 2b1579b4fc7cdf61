"""Tables and plots of the MobileNetV2 transfer benchmark (``docs/benchmarks/transfer.json``, from ``transfer.py``).

    python benchmarks/transfer_report.py [docs/benchmarks/transfer.json]   # redraw the PNGs, re-render the docs

The tables go into README.md and docs/benchmarks.md through ``render_docs.py`` (generated blocks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

FAMILY = {"full": "baseline", "classic": "baseline", "lightning": "peer", "lightning_train": "peer"}


def summarise(results: dict) -> dict[tuple[str, int], dict]:
    """Per (strategy key, shots): means and spreads over the seeds."""
    out = {}
    for config in results["configs"]:
        runs = config["runs"]
        acc = np.array([r["val_accuracy"] for r in runs])
        top1 = np.array([r["imagenet_top1"] for r in runs])
        out[(config["strategy_key"], runs[0]["shots"])] = {
            "label": runs[0]["strategy"], "acc": acc.mean(), "acc_min": acc.min(), "acc_max": acc.max(),
            "acc_std": acc.std(ddof=1) if len(acc) > 1 else 0.0, "n": len(runs),
            "seconds": float(np.mean([r["train_seconds"] for r in runs])),
            "steps": runs[0].get("steps"),
            "rss_peak": max(r["rss_peak_train_mb"] for r in runs),
            "rss_rise": max(r["rss_peak_train_mb"] - r["rss_before_train_mb"] for r in runs),
            "process_peak": config["process_peak_rss_mb"],
            "trainable": int(np.mean([r["trainable_params"] for r in runs])), "total": runs[0]["total_params"],
            "full_bytes": runs[0]["full_checkpoint_bytes"], "delta_bytes": int(np.mean([r["delta_bytes"] for r in runs])),
            "top1": top1.mean(), "top1_min": int(top1.min()), "top1_max": int(top1.max()),
        }
    return out


def keys_and_shots(summary) -> tuple[list[str], list[int]]:
    keys = list(dict.fromkeys(k for k, _ in summary))
    shots = sorted({s for _, s in summary})
    return keys, shots


def size(n: float) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def accuracy_table(summary) -> str:
    keys, shots = keys_and_shots(summary)
    head = "| strategy | " + " | ".join(f"{s}/class" for s in shots) + " |"
    rows = [head, "|---|" + "---:|" * len(shots)]
    for k in keys:
        cells = [f"**{summary[k, s]['acc']:.3f}** ({summary[k, s]['acc_min']:.3f}-{summary[k, s]['acc_max']:.3f})"
                 if (k, s) in summary else "" for s in shots]
        rows.append(f"| {summary[k, shots[0]]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def time_table(summary) -> str:
    keys, shots = keys_and_shots(summary)
    rows = ["| strategy | " + " | ".join(f"{s}/class: s (steps)" for s in shots) + " | vs full |",
            "|---|" + "---:|" * (len(shots) + 1)]
    for k in keys:
        cells = [f"{summary[k, s]['seconds']:.1f} ({summary[k, s]['steps']})" for s in shots]
        ratio = (sum(summary[k, s]["seconds"] for s in shots) / sum(summary["full", s]["seconds"] for s in shots)
                 if all(("full", s) in summary for s in shots) else float("nan"))
        rows.append(f"| {summary[k, shots[0]]['label']} | " + " | ".join(cells) + f" | x{ratio:.2f} |")
    return "\n".join(rows)


def cost_table(summary) -> str:
    keys, shots = keys_and_shots(summary)
    s = shots[-1]
    rows = [f"| strategy ({s}/class) | trainable params | RSS rise in training | peak RSS in training | "
            f"process peak RSS | full checkpoint | delta to save | ImageNet top-1 at {s}/class, original head (min-max) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        r = summary[k, s]
        rows.append(f"| {r['label']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
                    f"{r['rss_rise']:.0f} MB | {r['rss_peak']:.0f} MB | {r['process_peak']:.0f} MB | "
                    f"{size(r['full_bytes'])} | {size(r['delta_bytes'])} | {r['top1']:.1f}/20 "
                    f"({r['top1_min']}-{r['top1_max']}) |")
    return "\n".join(rows)


def headline(summary, results) -> str:
    """Best hf_freeze strategy vs full fine-tuning vs Lightning at each data size, in words."""
    keys, shots = keys_and_shots(summary)
    ours = [k for k in keys if k not in FAMILY]
    lines = []
    for s in shots:
        best = max(ours, key=lambda k: summary[k, s]["acc"])
        b, f = summary[best, s], summary.get(("full", s))
        parts = [f"**{s}/class**: best hf_freeze policy *{b['label']}* {b['acc']:.3f}"]
        if f:
            parts.append(f"full fine-tuning {f['acc']:.3f}")
        if ("lightning", s) in summary:
            parts.append(f"Lightning BackboneFinetuning {summary['lightning', s]['acc']:.3f}")
        lines.append("- " + " vs ".join(parts) + f" (mean of {b['n']} seeds).")
    base = results["baseline_imagenet_top1"]
    keep = [k for k in keys if all(summary[k, s]["top1_min"] == base for s in shots)]
    lines.append(f"- ImageNet samples, original head: the pretrained model gets {base}/20; after training, "
                 f"{', '.join(summary[k, shots[0]]['label'] for k in keep) or 'no strategy'} still scores {base}/20 "
                 "in every run; every other strategy loses some or all of it.")
    return "\n".join(lines)


def plot(summary, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, shots = keys_and_shots(summary)
    out = docs / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in keys:
        acc = np.array([summary[k, s]["acc"] for s in shots])
        err = np.array([[summary[k, s]["acc"] - summary[k, s]["acc_min"], summary[k, s]["acc_max"] - summary[k, s]["acc"]]
                        for s in shots]).T
        style = "--" if FAMILY.get(k) == "baseline" else ":" if FAMILY.get(k) == "peer" else "-"
        ax.errorbar(shots, acc, yerr=err, label=summary[k, shots[0]]["label"], linestyle=style, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("training images per class (Fashion-MNIST)")
    ax.set_ylabel("validation accuracy (mean, min-max over seeds)")
    ax.set_title("MobileNetV2 (ImageNet) -> Fashion-MNIST, 10 classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transfer_accuracy.png", dpi=110)
    plt.close(fig)

    s = shots[-1]
    labels = [summary[k, s]["label"].replace(" (Trainer)", "").replace("hf_freeze ", "").replace("BatchNorm", "BN")
              for k in keys]
    panels = [("training time, s", [summary[k, s]["seconds"] for k in keys], False, "{:.1f}"),
              ("RSS rise in training, MB", [summary[k, s]["rss_rise"] for k in keys], False, "{:.0f}"),
              ("delta to save, KB (log)", [summary[k, s]["delta_bytes"] / 1024 for k in keys], True, "{:.0f}"),
              ("ImageNet top-1 (original head), /20", [summary[k, s]["top1"] for k in keys], False, "{:.1f}")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values, log, fmt) in zip(axes.flat, panels):
        bars = ax.barh(range(len(keys)), values, color=[f"C{i}" for i in range(len(keys))])
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, padding=2)
        ax.margins(x=0.15)
        ax.set_yticks(range(len(keys)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{title} ({s}/class)", fontsize=10)
        if log:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "transfer_costs.png", dpi=110)
    plt.close(fig)
    return ["benchmarks/transfer_accuracy.png", "benchmarks/transfer_costs.png"]


def write_report(results: dict, docs: Path) -> None:
    """Redraw the plots, then re-render the generated blocks of README.md and docs/benchmarks.md
    (``render_docs.py``) from the committed result files."""
    from render_docs import update_docs

    plot(summarise(results), docs)
    update_docs(docs.parent)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs" / "benchmarks" / "transfer.json"
    write_report(json.loads(source.read_text()), root / "docs")
