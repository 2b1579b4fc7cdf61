"""Turn ``docs/benchmarks/transfer.json`` (written by ``transfer.py``) into ``docs/benchmarks.md`` and PNG plots.

    python benchmarks/transfer_report.py [docs/benchmarks/transfer.json]

Hand-written text between ``<!-- NOTES -->`` and ``<!-- /NOTES -->`` in an existing docs/benchmarks.md is kept.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

NOTES = re.compile(r"<!-- NOTES -->.*?<!-- /NOTES -->", re.S)
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
            "process peak RSS | full checkpoint | delta to save | ImageNet top-1, original head (all runs) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        r = summary[k, s]
        top1 = [summary[k, t] for t in shots if (k, t) in summary]
        lo, hi = min(t["top1_min"] for t in top1), max(t["top1_max"] for t in top1)
        mean = np.mean([t["top1"] for t in top1])
        rows.append(f"| {r['label']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
                    f"{r['rss_rise']:.0f} MB | {r['rss_peak']:.0f} MB | {r['process_peak']:.0f} MB | "
                    f"{size(r['full_bytes'])} | {size(r['delta_bytes'])} | {mean:.1f}/20 ({lo}-{hi}) |")
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


def render(results: dict, notes: str) -> str:
    summary = summarise(results)
    st, m = results["settings"], results["machine"]
    epochs = ", ".join(f"{e} epochs at {s}/class" for s, e in st["epochs"].items())
    pending = "".join(f"\nPending: {k}: {v}.\n" for k, v in st.get("pending", {}).items())
    return f"""# Benchmarks

## Transfer: freeze policies vs full fine-tuning vs PyTorch Lightning

ImageNet MobileNetV2 (`mobilenet_v2_1.0_224-imagenet`, 2.2 M parameters) with a new 10-class head, fine-tuned
on few-shot Fashion-MNIST: {", ".join(f"{s}" for s in st["shots"])} training images per class drawn from the
train split (a new draw per seed: {st["seeds"]}), evaluated on a fixed set of {st["val_per_class"] * 10}
test-split images ({st["val_per_class"]} per class). Images are upsampled to {st["image_size"]} px (gray
repeated to RGB, the checkpoint's normalisation); MobileNetV2 is fully convolutional. Every strategy gets the
same data, batch size {st["batch_size"]}, optimizer (AdamW, constant LR {st["learning_rate"]:g}, no weight
decay), head dropout 0 and epochs ({epochs}). Each strategy x data size runs in a fresh process.

![validation accuracy](benchmarks/transfer_accuracy.png)

### Validation accuracy: mean (min-max) over {len(st["seeds"])} seeds

{accuracy_table(summary)}

### Training time: mean seconds per run (optimizer steps)

{time_table(summary)}

### Cost and what survives, at the largest data size

{cost_table(summary)}

![costs](benchmarks/transfer_costs.png)

Columns: *trainable params* at the end of training. *RSS rise*: the highest resident memory during
`train()` minus the memory just before (activations kept for backward, gradients, optimizer state), sampled
every 10 ms; *peak RSS in training* and *process peak RSS* (`ru_maxrss`, imports and data included) are
absolute. *Full checkpoint*: `save_pretrained` safetensors. *Delta to save*: every tensor (parameters and
buffers) that differs bit-wise from the pretrained model, new head included, as one safetensors file: what
must be stored next to the public checkpoint to rebuild the fine-tuned model. *ImageNet top-1*: the
trained backbone loaded into the original 1001-class model, on the 20 ImageNet sample photos. For the
adapter run the delta is the saved adapter folder's weights, and the model is scored after `merge_and_unload()`.
{pending}
<!-- NOTES -->
{notes}
<!-- /NOTES -->

### Machine and reproduction

{m["cores"]} CPU cores ({m["cpu"]}), {m["memory_gb"]} GB, shared with other jobs: load average
{m["load_avg_start"][0]:.1f} at the start and {m.get("load_avg_end", [float("nan")])[0]:.1f} at the end, so
absolute times are noisy; compare ratios within a row set. torch {m["torch"]} on {st["threads"]} thread(s) per
run, transformers {m["transformers"]}, pytorch-lightning {m["pytorch_lightning"]}, Python {m["python"]}. The
whole run took {results["total_minutes"]:.0f} minutes. Raw figures: `docs/benchmarks/transfer.json`.

```
python benchmarks/transfer.py            # needs ../shared (or HF_FREEZE_SHARED); skips without it
python benchmarks/transfer.py --quick    # smoke run: 1 seed, 10/class, 1 epoch
python benchmarks/transfer_report.py     # re-render this page from docs/benchmarks/transfer.json
```

### Closing note: headline figures

{headline(summary, results)}
"""


def write_report(results: dict, docs: Path) -> Path:
    page = docs / "benchmarks.md"
    notes = "(notes)"
    if page.is_file():
        found = NOTES.search(page.read_text())
        if found:
            notes = found.group(0)[len("<!-- NOTES -->"):-len("<!-- /NOTES -->")].strip()
    plot(summarise(results), docs)
    page.write_text(render(results, notes))
    print(f"wrote {page} and its plots")
    return page


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs" / "benchmarks" / "transfer.json"
    write_report(json.loads(source.read_text()), root / "docs")
