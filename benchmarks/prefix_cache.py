"""Frozen-prefix cache: training the later groups at the cost of the trainable part.

Part 1, per model and freeze boundary (25/50/75% of the groups below the head frozen), side by side in one
process: the time of epochs 2..N of ``FreezeTrainer`` with the cache (``auto``) and without (``off``), and the
*ideal*: a plain loop of forward + backward + optimizer step of the trainable suffix alone on precomputed
prefix outputs (the same batches, the same optimizer), which is what training the suffix must cost at least.
Also the size of the cache per example and the weights of the cached and uncached runs (identical or not).

Part 2, a gradual schedule end to end: ``freeze=backbone`` with two unfreeze events (a quarter of the groups
below the head each), ``--epochs`` epochs per phase: under ``auto`` the prefix cache serves from the start (the
deepest frozen module for the head-only phase) and computes the two later boundaries' rows in the same pass; cached
vs uncached, whole ``train()`` time including every probe, cache build and check.

Models: the real MobileNetV2 (``mobilenet_v2_1.0_224-imagenet`` from the shared fixtures) at 128 px on
Fashion-MNIST images through its image processor (skipped with the reason when the fixtures are absent), and a
ViT-Ti/16-shaped ViT at 128 px (hidden 192, 12 layers, 3 heads, MLP 768, patch 16: 65 tokens) with random
weights (timing only; its attention/hidden dropout set to 0, as in the pretrained ViT configs, so the probe
can serve it).

``--sweep``: instead, every tiny model type of ``hf_freeze.tiny`` that takes pixel_values, fp32 and bf16
autocast: the first half of the groups below the head frozen and one of them unfrozen after epoch 1, cache
off vs ``auto``: served and bit-identical, refused (why), or different (a bug). Needs no fixtures.

Usage: python benchmarks/prefix_cache.py [--images 96] [--epochs 3] [--size 128] [--json out.json]
       python benchmarks/prefix_cache.py --sweep [--json out.json]
Run with one torch thread (``--threads 1``, the default). Times are CPU seconds of the process
(``time.process_time``), which other jobs on a shared machine hardly change; wall-clock seconds are recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from shared_data import FASHION_MNIST_CLASSES, fashion_mnist, few_shot_indices, shared_dir
from transformers import TrainerCallback, set_seed

import hf_freeze
from hf_freeze import feature_cache as fc
from hf_freeze import prefix_cache as pc

CLOCK = time.process_time  # CPU time of this process (one torch thread): robust to other jobs on a shared machine


class EpochClock(TrainerCallback):
    """Seconds per epoch on ``CLOCK`` (and wall-clock seconds in ``wall``)."""

    def __init__(self):
        self.start, self.start_wall = CLOCK(), time.perf_counter()
        self.ends: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_wall = CLOCK(), time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ends.append((CLOCK(), time.perf_counter()))

    def epochs(self, wall: bool = False) -> list[float]:
        marks = [self.start_wall if wall else self.start, *(w if wall else c for c, w in self.ends)]
        return [b - a for a, b in zip(marks, marks[1:])]


class Tensors(torch.utils.data.Dataset):
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class Processed(torch.utils.data.Dataset):
    """Fashion-MNIST images through the model's image processor on every access (what an uncached epoch pays)."""

    def __init__(self, images, labels, processor, size):
        from PIL import Image

        self.images = [Image.fromarray(im).convert("RGB") for im in images]
        self.labels, self.processor, self.size = torch.as_tensor(labels), processor, size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        px = self.processor(self.images[i], size={"shortest_edge": self.size},
                            crop_size={"height": self.size, "width": self.size}, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": px, "labels": self.labels[i]}


def targs(out, epochs, **kw):
    return hf_freeze.FreezeTrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=1e-3,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **kw)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing(a, b) -> list[str]:
    return [k for k in a if not fc.identical(a[k], b[k])]


# =========================================================================== the ideal: the suffix alone

def ideal_epoch_seconds(make, policy, boundary, dataset, epochs: int, batch: int) -> list[float]:
    """Forward + backward + gradient clipping + AdamW step of the trainable suffix alone, on prefix outputs computed
    beforehand (the prefix modules up to ``boundary`` replaced by the stored rows; no Trainer, no probe, no data
    loading)."""
    set_seed(0)
    model = make()
    hf_freeze.apply_policy(model, policy)
    owned = pc.group_modules(model, hf_freeze.get_state(model))
    model.train()
    n = len(dataset)
    items = [dataset[i] for i in range(n)]
    pixels = torch.stack([x["pixel_values"] for x in items])
    labels = torch.stack([torch.as_tensor(x["labels"]) for x in items])
    with pc.tracing(model, list(owned)) as rec, torch.no_grad():
        model(pixel_values=pixels[:batch])
    run = rec.order[:rec.order.index(boundary) + 1]
    structure, _ = pc.Structure.of(rec.outputs[boundary], batch)
    with torch.no_grad():
        outs = [structure.tensors(pc.boundary_output(model, boundary, {"pixel_values": pixels[i:i + batch]})[0])
                for i in range(0, n, batch)]
    stored = {i: torch.cat([leaf.stored(o[i]) for o in outs]) for i, leaf in structure.rows.items()}
    plan = pc.PrefixPlan([], boundary, run[:-1], structure, {m: pc.Structure.of(rec.outputs[m], batch)[0] for m in run[:-1]},
                         (tuple(pixels.shape[1:]), pixels.dtype), n, batch, "", "none", [])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        t = CLOCK()
        for idx in torch.randperm(n, generator=g).split(batch):
            out = structure.build({i: leaf.logical(stored[i][idx]) for i, leaf in structure.rows.items()})
            with pc.serving_modules(model, plan, out, len(idx), "cpu") as inputs:
                loss = model(**inputs, labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
        times.append(CLOCK() - t)
    return times


# =========================================================================== part 1 and 2

def boundaries(make) -> list[tuple[str, int, int]]:
    """freeze=N for 25/50/75% of the groups below the head."""
    groups = hf_freeze.layer_groups(make()).names
    below = [g for g in groups if g != "head"]
    return [(f"{p}%", max(1, round(len(below) * p / 100)), len(below)) for p in (25, 50, 75)]


def timed_run(make, policy, dataset, out, epochs, mode):
    """One FreezeTrainer run from a fresh process-like state: (trainer, model, CPU and wall seconds per epoch and in
    all)."""
    pc._MEMORY.clear()
    fc._MEMORY.clear()
    set_seed(0)
    clock = EpochClock()
    model = make()
    t = hf_freeze.FreezeTrainer(model=model, args=targs(out, epochs), train_dataset=dataset, freeze_policy=policy,
                                feature_cache=mode, callbacks=[clock])
    start, start_wall = CLOCK(), time.perf_counter()
    t.train()
    return t, model, {"epoch_s": clock.epochs(), "train_s": CLOCK() - start, "epoch_wall_s": clock.epochs(wall=True),
                      "train_wall_s": time.perf_counter() - start_wall}


def compare(name, make, dataset, epochs, tmp) -> list[dict]:
    rows = []
    for label, k, total in boundaries(make):
        policy = f"freeze={k}"
        res = {"model": name, "boundary": label, "policy": policy, "frozen_groups": k, "groups_below_head": total}
        w = {}
        for mode in ("off", "auto"):
            t, model, res[mode] = timed_run(make, policy, dataset, tmp / f"{name}-{k}-{mode}", epochs, mode)
            if mode == "auto":
                res["cache"] = t.prefix_cache_info
                res["refusal"] = t.prefix_cache_refusal
            w[mode] = weights(model)
        boundary = (res.get("cache") or [{}])[0].get("boundary")
        if boundary is None:
            print(f"{name} {label}: no prefix cache ({res['refusal']})")
            rows.append(res)
            continue
        res["ideal"] = {"epoch_s": ideal_epoch_seconds(make, policy, boundary, dataset, epochs, 16)}
        res["weights_identical"] = not differing(w["off"], w["auto"])
        later = {m: float(np.mean(res[m]["epoch_s"][1:])) for m in ("off", "auto", "ideal")}
        res["later_epoch_s"] = later
        res["cached_over_ideal"] = later["auto"] / later["ideal"]
        res["uncached_over_cached"] = later["off"] / later["auto"]
        info = res.get("cache") or [{}]
        print(f"{name} {label} ({policy}, boundary {info[0].get('boundary')}, "
              f"{pc.human(info[0].get('bytes_per_example', 0))}/example): epochs 2..{epochs} "
              f"uncached {later['off']:.2f} s, cached {later['auto']:.2f} s, ideal {later['ideal']:.2f} s -> "
              f"cached/ideal {res['cached_over_ideal']:.2f}x, uncached/cached {res['uncached_over_cached']:.2f}x; "
              f"first epoch cached {res['auto']['epoch_s'][0]:.2f} s vs {res['off']['epoch_s'][0]:.2f} s; "
              f"weights identical: {res['weights_identical']}", flush=True)
        rows.append(res)
    return rows


def gradual(name, make, dataset, epochs, tmp) -> dict:
    groups = [g for g in hf_freeze.layer_groups(make()).names if g != "head"]
    step = max(1, len(groups) // 4)
    policy = f"freeze=backbone;unfreeze=epoch{epochs}:{step},epoch{2 * epochs}:{step}"
    epochs = 3 * epochs
    res = {"model": name, "policy": policy, "epochs": epochs}
    w = {}
    for mode in ("off", "auto"):
        t, model, res[mode] = timed_run(make, policy, dataset, tmp / f"{name}-gradual-{mode}", epochs, mode)
        if mode == "auto":
            res["head_cache"] = t.feature_cache_info
            res["prefix_cache"] = t.prefix_cache_info
        w[mode] = weights(model)
    res["weights_identical"] = not differing(w["off"], w["auto"])
    res["speedup"] = res["off"]["train_s"] / res["auto"]["train_s"]
    print(f"{name} gradual ({policy}, {epochs} epochs): uncached {res['off']['train_s']:.1f} s, cached "
          f"{res['auto']['train_s']:.1f} s -> {res['speedup']:.2f}x; boundaries "
          f"{[i['boundary'] for i in res['prefix_cache']]}; weights identical: {res['weights_identical']}", flush=True)
    return res


def vit_maker(size):
    from transformers import ViTConfig, ViTForImageClassification

    def make():
        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                                   intermediate_size=768, image_size=size, patch_size=16, num_labels=10,
                                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return make


def mobilenet(shared, images, size):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = shared / "models" / "mobilenet_v2_1.0_224-imagenet"
    data = shared / "data" / "fashion-mnist"
    if not path.is_dir() or not data.is_dir():
        return None, f"shared fixtures not found under {shared}"
    x, y = fashion_mnist(data, "train")
    idx = few_shot_indices(y, images // 10, 0)
    dataset = Processed(x[idx], y[idx], AutoImageProcessor.from_pretrained(path), size)

    def make():
        torch.manual_seed(0)
        return AutoModelForImageClassification.from_pretrained(
            path, num_labels=10, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
            label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)}, ignore_mismatched_sizes=True)
    return (make, dataset), None


# =========================================================================== sweep

def sweep() -> list[dict]:
    from hf_freeze.tiny import CFG, IMAGE_SIZE, tiny_model

    skip = {"dinat", "shieldgemma2", "imagegpt", "perceiver", "siglip2", "pp_lcnet"}  # not buildable / other inputs
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for model_type in sorted(set(CFG) - skip):
        groups = [g for g in hf_freeze.layer_groups(tiny_model(model_type)).names if g != "head"]
        k = max(1, -(-len(groups) // 2))  # the first half (rounded up), then one of them unfrozen
        policy = f"freeze={k};unfreeze=epoch1:1"
        size = IMAGE_SIZE.get(model_type, 32)
        data = Tensors(*_synthetic(12, size))
        for bf16 in (False, True):
            w, trainers = [], []
            for mode in ("off", "auto"):
                pc._MEMORY.clear()
                model = tiny_model(model_type, seed=2)
                args = hf_freeze.FreezeTrainingArguments(
                    output_dir=str(tmp / mode), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=0.05,
                    save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    bf16=bf16)
                t = hf_freeze.FreezeTrainer(model=model, args=args, feature_cache=mode, freeze_policy=policy,
                                            train_dataset=data)
                t.train()
                w.append(weights(model))
                trainers.append(t)
            auto = trainers[1]
            differ = differing(*w)
            served = [(i["boundary"], i["served_steps"]) for i in auto.prefix_cache_info]
            verdict = ("DIFFERENT" if differ else "served, bit-identical" if any(s for _, s in served) else "refused")
            rows.append({"model_type": model_type, "precision": "bf16" if bf16 else "fp32", "policy": policy,
                         "verdict": verdict, "boundaries": served, "refusal": auto.prefix_cache_refusal,
                         "sources": [i["source"] for i in auto.prefix_cache_info],
                         "bytes_per_example": [i["bytes_per_example"] for i in auto.prefix_cache_info],
                         "differing_tensors": differ})
            print(f"| {model_type} | {rows[-1]['precision']} | {policy} | {verdict} | "
                  f"{', '.join(b for b, _ in served)} | {auto.prefix_cache_refusal or ''} |", flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("served, bit-identical", "refused", "DIFFERENT")}
    print(f"{len(rows)} cells: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return rows


def _synthetic(n, size):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 3, size, size, generator=g) + labels.view(-1, 1, 1, 1).float(), labels


def _commit() -> str:
    """The checked-out commit (with ``+dirty`` when files differ), or "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared", default=None)
    ap.add_argument("--models", default="mobilenet_v2,vit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    if a.sweep:
        rows = sweep()
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
        return 0
    tmp = Path(tempfile.mkdtemp())
    results = {"threads": a.threads, "images": a.images, "epochs": a.epochs, "size": a.size, "runs": [], "gradual": [],
               "skipped": {}, "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "commit": _commit(), "clock": "CPU seconds of the process (time.process_time), one torch thread; "
               "*_wall_s: wall-clock seconds"}
    wanted = a.models.split(",")
    setups = {}
    if "mobilenet_v2" in wanted:
        found, why = mobilenet(shared_dir(a.shared), a.images, a.size)
        if found is None:
            print(f"MobileNetV2 skipped: {why}")
            results["skipped"]["mobilenet_v2"] = why
        else:
            setups["mobilenet_v2"] = found
    if "vit" in wanted:
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (a.images,), generator=g)
        setups["vit"] = (vit_maker(a.size), Tensors(torch.randn(a.images, 3, a.size, a.size, generator=g), labels))
        results["vit_config"] = (f"ViT-Ti/16 shape at {a.size} px: hidden 192, 12 layers, 3 heads, MLP 768, patch 16, random "
                                 "init, dropout 0")
    for name, (make, dataset) in setups.items():
        results["runs"] += compare(name, make, dataset, a.epochs, tmp)
        results["gradual"].append(gradual(name, make, dataset, a.epochs, tmp))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    results["load_average_at_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
