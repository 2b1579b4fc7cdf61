"""Feature cache and freeze-policy search on the real MobileNetV2 few-shot task (Fashion-MNIST).

Part 1, side by side: head-only training with the feature cache off and on (memory). Per-epoch wall
time (epoch 1 of the cached run includes computing the cache), validation accuracy of both, and the
largest difference between the two runs' weights (expected: 0, bit-identical).
Target: cached epochs 2..N cost <= 5% of epoch 1.

Part 2, the disk cache: a run that computes it, then a run in a "new process" (memory cache cleared)
that reuses it: build time of each (the reuse reads every example once more to digest the data, then
loads the file and checks its checksums), and the load + checksum alone. Target: reusing is faster than
recomputing.

Part 3: ``search_freeze_policies`` over freeze depth x schedule x LR scale; the best policy vs the
default ("backbone").

``--sweep``: instead, every tiny model type of ``hf_freeze.tiny`` that takes pixel_values, fp32 and bf16
autocast, one epoch head-only with the cache off and ``auto``: served and bit-identical, or refused (why),
or different (a bug). Needs no fixtures.

Usage: python benchmarks/feature_cache.py [--shots 10] [--epochs 5] [--size 128] [--trials 6] [--json out.json]
       python benchmarks/feature_cache.py --sweep [--json out.json]
Skips cleanly when the shared fixtures are absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from shared_data import FASHION_MNIST_CLASSES, fashion_mnist, few_shot_indices, shared_dir
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainerCallback, set_seed

import hf_freeze
from hf_freeze.metrics import classification_metrics as accuracy


class EpochClock(TrainerCallback):
    def __init__(self):
        self.start = time.perf_counter()
        self.ends: list[float] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def epochs(self) -> list[float]:
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


def datasets_for(root, shots, val_size, seed, processor, size):
    import datasets

    images, labels = fashion_mnist(root, "train")
    train_idx = few_shot_indices(labels, shots, seed)
    test_images, test_labels = fashion_mnist(root, "test")
    val_idx = few_shot_indices(test_labels, val_size // 10, seed)

    def make(imgs, labs, idx):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(imgs[i]) for i in idx], "label": labs[idx].tolist()})

    def to_inputs(batch):  # the model's own processor, on every access (what an uncached epoch pays)
        px = processor([im.convert("RGB") for im in batch["image"]], size={"shortest_edge": size},
                       crop_size={"height": size, "width": size}, return_tensors="pt")["pixel_values"]
        return {"pixel_values": px, "labels": batch["label"]}

    return make(images, labels, train_idx).with_transform(to_inputs), make(test_images, test_labels, val_idx).with_transform(to_inputs)


def model_init_for(path):
    def model_init():
        return AutoModelForImageClassification.from_pretrained(
            path, num_labels=10, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
            label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)}, ignore_mismatched_sizes=True)
    return model_init


def targs(out, epochs, **kw):
    return hf_freeze.FreezeTrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16, per_device_eval_batch_size=64,
        learning_rate=1e-2, save_strategy="no", logging_strategy="no", report_to=[], remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True, **kw)


def disk_cache(path, train, tmp) -> dict:
    """Compute the disk cache in one run, reuse it in a second run whose memory cache was cleared."""
    fc = hf_freeze.feature_cache
    folder = tmp / "disk-cache"
    infos = []
    for _ in range(2):
        fc._MEMORY.clear()  # the second run is like a new process: only the file remains
        set_seed(0)
        trainer = hf_freeze.FreezeTrainer(model=model_init_for(path)(), args=targs(tmp / "disk", 1, feature_cache_dir=str(folder)),
                                          train_dataset=train, freeze_policy="backbone", feature_cache="disk")
        trainer.train()
        infos.append(trainer.feature_cache_info)
    computed, reused = infos
    assert computed["source"] == "computed" and reused["source"] == "disk", infos
    file = folder / f"{reused['key']}.safetensors"
    start = time.perf_counter()
    cache = fc.load(file, reused["key"], "cpu")
    load_s = time.perf_counter() - start
    field = next(iter(cache.fields.values()))
    # the storage alone at a larger size: 20,000 rows of 1280 float32 (MobileNetV2's pooled width), ~98 MB
    big = fc.FeatureCache("mobilenet_v2", cache.output_cls, {"pooler_output": torch.randn(20000, 1280)},
                          torch.zeros(20000, dtype=torch.long), "synthetic")
    start = time.perf_counter()
    fc.save(big, folder / "synthetic.safetensors")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    assert fc.load(folder / "synthetic.safetensors", "synthetic", "cpu") is not None
    big_load_s = time.perf_counter() - start
    big_mb = (folder / "synthetic.safetensors").stat().st_size / 2**20
    return {"computed_s": computed["seconds"], "reused_s": reused["seconds"], "load_s": load_s,
            "file_mb": file.stat().st_size / 2**20, "rows": len(cache.labels), "dtype": str(field.dtype),
            "row_bytes": field[0].numel() * field.element_size(),
            "synthetic": {"mb": big_mb, "save_s": save_s, "load_and_check_s": big_load_s}}


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, size):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.pixels = torch.randn(n, 3, size, size, generator=g) + self.labels.view(-1, 1, 1, 1).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def sweep() -> list[dict]:
    """Cache off vs auto for every tiny model type (pixel_values input), fp32 and bf16 autocast."""
    import warnings

    from hf_freeze.tiny import CFG, IMAGE_SIZE, tiny_model

    warnings.filterwarnings("ignore")
    skip = {"dinat", "shieldgemma2", "imagegpt", "perceiver", "siglip2", "pp_lcnet"}  # not buildable / other inputs
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for model_type in sorted(set(CFG) - skip):
        for bf16 in (False, True):
            weights, trainers = [], []
            for mode in ("off", "auto"):
                hf_freeze.feature_cache._MEMORY.clear()
                model = tiny_model(model_type, seed=2)
                args = hf_freeze.FreezeTrainingArguments(
                    output_dir=str(tmp / mode), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=0.05,
                    save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    bf16=bf16)
                trainer = hf_freeze.FreezeTrainer(model=model, args=args, feature_cache=mode, freeze_policy="backbone",
                                                  train_dataset=Synthetic(12, IMAGE_SIZE.get(model_type, 32)))
                trainer.train()
                weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                trainers.append(trainer)
            auto = trainers[1]
            differ = [k for k in weights[0] if not torch.equal(weights[0][k].view(-1).view(torch.uint8),
                                                                weights[1][k].view(-1).view(torch.uint8))]
            served = bool(auto.feature_cache_info)
            verdict = "DIFFERENT" if differ else "served, bit-identical" if served else "refused"
            rows.append({"model_type": model_type, "precision": "bf16" if bf16 else "fp32", "verdict": verdict,
                         "refusal": auto.feature_cache_refusal, "differing_tensors": differ})
            print(f"| {model_type} | {rows[-1]['precision']} | {verdict} | {auto.feature_cache_refusal or ''} |",
                  flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("served, bit-identical", "refused", "DIFFERENT")}
    print(f"{len(rows)} cells: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--search_epochs", type=float, default=3)
    ap.add_argument("--shared", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args(argv)
    if a.sweep:
        rows = sweep()
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return 0
    root = shared_dir(a.shared)
    path = root / "models" / "mobilenet_v2_1.0_224-imagenet"
    if not path.is_dir() or not (root / "data" / "fashion-mnist").is_dir():
        print(f"skipped: shared fixtures not found under {root}")
        return 0
    processor = AutoImageProcessor.from_pretrained(path)
    train, val = datasets_for(root / "data" / "fashion-mnist", a.shots, a.val, 0, processor, a.size)
    tmp = Path(tempfile.mkdtemp())
    results = {}
    weights = {}
    for mode in ("off", "memory"):
        hf_freeze.feature_cache._MEMORY.clear()
        set_seed(0)  # the new head's random init must be the same in both runs
        clock = EpochClock()
        trainer = hf_freeze.FreezeTrainer(model_init=None, model=model_init_for(path)(), args=targs(tmp / mode, a.epochs),
                                          train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
                                          freeze_policy="backbone", feature_cache=mode, callbacks=[clock])
        clock.start = time.perf_counter()
        trainer.train()
        results[mode] = {"epoch_s": clock.epochs(), "accuracy": trainer.evaluate()["eval_accuracy"],
                         "cache": trainer.feature_cache_info}
        weights[mode] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    off, on = results["off"], results["memory"]
    results["max_abs_weight_difference"] = max((weights["off"][k].float() - weights["memory"][k].float()).abs().max().item()
                                               for k in weights["off"])
    later = float(np.mean(on["epoch_s"][1:]))
    print(f"MobileNetV2 head-only, Fashion-MNIST {a.shots}/class ({10 * a.shots} images), {a.size} px, {a.epochs} epochs")
    print(f"  uncached: epochs {', '.join(f'{t:.2f}' for t in off['epoch_s'])} s   val accuracy {off['accuracy']:.3f}")
    print(f"  cached:   epochs {', '.join(f'{t:.2f}' for t in on['epoch_s'])} s   val accuracy {on['accuracy']:.3f}")
    print(f"  cached epochs 2..N / cached epoch 1 (incl. caching): {later / on['epoch_s'][0]:.3%}  (target <= 5%)")
    print(f"  cached epochs 2..N / uncached epoch: {later / np.mean(off['epoch_s']):.3%}")
    print(f"  largest |weight difference| cached vs uncached: {results['max_abs_weight_difference']:g}")
    results["ratio_later_to_first"] = later / on["epoch_s"][0]

    results["disk"] = disk = disk_cache(path, train, tmp)
    print(f"disk cache ({disk['file_mb']:.2f} MB, {disk['rows']} rows x {disk['row_bytes']} bytes, {disk['dtype']}):")
    print(f"  computed in {disk['computed_s']:.2f} s (one pass: image processor + backbone forward)")
    print(f"  reused in {disk['reused_s']:.2f} s (digest pass over the examples {disk['reused_s'] - disk['load_s']:.2f} s"
          f" + load and checksum {disk['load_s']:.3f} s)")
    print(f"  reusing / recomputing: {disk['reused_s'] / disk['computed_s']:.1%}; load alone / recomputing: "
          f"{disk['load_s'] / disk['computed_s']:.1%}")
    big = disk["synthetic"]
    print(f"  storage alone, 20,000 x 1280 float32 ({big['mb']:.0f} MB): written in {big['save_s']:.2f} s, "
          f"loaded and checksum-verified in {big['load_and_check_s']:.2f} s")

    if a.trials:
        trainer = hf_freeze.FreezeTrainer(model_init=model_init_for(path), args=targs(tmp / "search", a.search_epochs,
                                          eval_strategy="epoch"), train_dataset=train, eval_dataset=val,
                                          compute_metrics=accuracy)
        space = hf_freeze.FreezeSearchSpace(freeze=["backbone", "half"], schedule=["none", "late", "gradual"], lr_scale=[0.1])
        t = time.perf_counter()
        result = hf_freeze.search_freeze_policies(trainer, n_trials=a.trials, space=space)
        default = next((r for r in result.rows if r["policy"] == "freeze=backbone"), None)
        print(f"search: {len(result.rows)} policies in {time.perf_counter() - t:.0f} s, {a.search_epochs:g} epochs each")
        print(result.to_markdown())
        if default:
            print(f"best {result.rows[0]['policy']} {result.rows[0]['eval_accuracy']:.3f} vs default "
                  f"freeze=backbone {default['eval_accuracy']:.3f}")
        result.save(tmp / "search-out")
        results["search"] = result.rows
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
