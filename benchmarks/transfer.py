"""Transfer benchmark: freeze strategies vs full fine-tuning vs Lightning's BackboneFinetuning.

Real ImageNet MobileNetV2 (``shared/models/mobilenet_v2_1.0_224-imagenet``) with a new 10-class head on
Fashion-MNIST (``shared/data/fashion-mnist``): few-shot training sets of 10, 30 and 100 images per class
drawn from the train split (one draw per seed), a fixed validation set from the test split.

For every strategy x data size it runs the seeds in one fresh subprocess (clean peak memory) and records:
validation accuracy, training time, peak RSS (whole process, and the rise during training), trainable
parameters, artefact size (the full checkpoint, and the delta: the tensors that differ from the pretrained
model), and the ImageNet-sample top-1 of the trained backbone under its original 1001-class head.

    python benchmarks/transfer.py            # full run (21 min on 2 busy shared cores); writes docs/benchmarks.md
    python benchmarks/transfer.py --quick    # 1 seed, 10 images/class, 1 epoch (a smoke run, nothing written to docs/)

Strategies live in ``STRATEGIES``; add one with a new entry.
Skips (exit 0, with the reason) when the shared files are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = Path("models") / "mobilenet_v2_1.0_224-imagenet"
FMNIST = Path("data") / "fashion-mnist"
IMAGENET = Path("data") / "imagenet-samples"

SHOTS = (10, 30, 100)
EPOCHS = {10: 6, 30: 4, 100: 2}  # 24, 40 and 64 optimizer steps at batch 32
SEEDS = (0, 1, 2)
BATCH, LR, IMAGE_SIZE, VAL_PER_CLASS = 32, 1e-3, 64, 50
DROPOUT = 0.0  # the checkpoint's config says 0.8 (a keep probability in the TF original); 0 for every strategy
VAL_SEED = 1234


# ---------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune. ``policy(epochs)`` is an hf_freeze policy string for FreezeTrainer; ``runner``
    names the training loop: ``"freeze_trainer"``, ``"trainer"`` (plain transformers Trainer),
    ``"classic"`` (plain Trainer, ``requires_grad=False`` on the backbone) or ``"lightning"``."""

    label: str
    runner: str
    policy: Callable[[int], str] | None = None
    family: str = "hf_freeze"


def gradual_policy(epochs: int) -> str:
    """Head first; the top 6 groups at a quarter of training, the next 6 at half, both at 0.1 x LR."""
    return f"freeze=backbone;unfreeze=epoch{epochs * 0.25:g}:6@0.1,epoch{epochs * 0.5:g}:6@0.1"


def lightning_unfreeze_epoch(epochs: int) -> int:
    """BackboneFinetuning unfreezes at an integer epoch: the one nearest a quarter of training (>= 1)."""
    return max(1, round(epochs * 0.25))


STRATEGIES: dict[str, Strategy] = {
    "full": Strategy("full fine-tuning (Trainer)", "trainer", family="baseline"),
    "classic": Strategy("classic: requires_grad=False (Trainer)", "classic", family="baseline"),
    "head_only": Strategy("hf_freeze head-only", "freeze_trainer", lambda e: "backbone"),
    "gradual": Strategy("hf_freeze gradual unfreezing", "freeze_trainer", gradual_policy),
    "llrd": Strategy("hf_freeze layer-wise LR decay 0.8, BatchNorm frozen", "freeze_trainer",
                     lambda e: "freeze=*.normalization.*;layer_lr_decay=0.8"),
    "adapters": Strategy("hf_freeze LoRA r=8 on the last 2 adaptable groups (backbone frozen)", "freeze_trainer",
                         lambda e: "freeze=backbone;adapter=lora,r=8,alpha=16,groups=2"),
    "lightning": Strategy("Lightning BackboneFinetuning", "lightning", family="peer"),
    # not in the default run: the peer with model.train() at the start, as Lightning's eval-mode warning suggests
    "lightning_train": Strategy("Lightning BackboneFinetuning, model.train()", "lightning_train", family="peer"),
}
DEFAULT = ("full", "classic", "head_only", "gradual", "llrd", "adapters", "lightning")
PENDING: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- data
def shared_root(arg: str | None) -> Path:
    from shared_data import shared_dir

    return shared_dir(arg)


def missing_files(shared: Path) -> list[str]:
    need = [MODEL / "model.safetensors", FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "t10k-images-idx3-ubyte.gz",
            IMAGENET]
    return [str(shared / p) for p in need if not (shared / p).exists()]


def resized_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """``(N, 28, 28)`` uint8 -> ``(N, size, size)`` uint8, bilinear (antialiased)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def fmnist_subset(shared: Path, split: str, indices: np.ndarray, size: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Resized uint8 images and labels of ``indices`` of a split, cached as ``.npz`` under ``cache``."""
    from shared_data import fashion_mnist

    key = hashlib.sha1(f"{split}-{size}-{indices.tolist()}".encode()).hexdigest()[:16]
    path = cache / f"fmnist-{split}-{size}px-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["x"], z["y"]
    images, labels = fashion_mnist(shared / FMNIST, split)
    x, y = resized_uint8(images[indices], size), labels[indices]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    tmp.rename(path)
    return x, y


def to_pixels(x: np.ndarray, mean: list[float], std: list[float]):
    """uint8 gray ``(N, S, S)`` -> normalised float RGB ``(N, 3, S, S)`` (the processor's rescale + normalise)."""
    import torch

    t = torch.from_numpy(x).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((t - m) / s).contiguous()


def load_draw(shared: Path, shots: int, seed: int, size: int, val_per_class: int, cache: Path, mean, std):
    """``(train_pixels, train_labels, val_pixels, val_labels)`` for one few-shot draw; validation is fixed."""
    import torch
    from shared_data import few_shot_indices, read_idx

    labels = {s: read_idx(shared / FMNIST / f"{p}-labels-idx1-ubyte.gz").astype(np.int64)
              for s, p in (("train", "train"), ("test", "t10k"))}
    train_idx = few_shot_indices(labels["train"], shots, seed)
    val_idx = few_shot_indices(labels["test"], val_per_class, VAL_SEED)
    (xt, yt), (xv, yv) = (fmnist_subset(shared, s, i, size, cache) for s, i in (("train", train_idx), ("test", val_idx)))
    return to_pixels(xt, mean, std), torch.from_numpy(yt), to_pixels(xv, mean, std), torch.from_numpy(yv)


class PixelDataset:
    """``{"pixel_values", "labels"}`` items over preprocessed tensors (for the Trainer and Lightning alike)."""

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


# ---------------------------------------------------------------------------------------------- measures
class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 10 ms)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def accuracy(model, pixels, labels, batch: int = 100) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            correct += int((model(pixel_values=pixels[i:i + batch]).logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(labels)


def state_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bit_identical(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def artefact_bytes(model, pretrained: dict, workdir: Path) -> tuple[int, int, int]:
    """(full checkpoint bytes, delta bytes, tensors in the delta): the delta holds every tensor (parameters and
    buffers) that differs from the pretrained model, new head included, as one safetensors file."""
    from safetensors.torch import save_file

    full = workdir / "full"
    model.save_pretrained(full)
    full_bytes = sum(f.stat().st_size for f in full.glob("*.safetensors"))
    delta = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if k not in pretrained or not bit_identical(v, pretrained[k])}
    save_file(delta, workdir / "delta.safetensors")
    return full_bytes, (workdir / "delta.safetensors").stat().st_size, len(delta)


def imagenet_retained(model, model_path: Path, processor, folder: Path) -> int:
    """Top-1 hits on the ImageNet samples of the trained backbone under the original 1001-class head."""
    from shared_data import imagenet_top1
    from transformers import AutoModelForImageClassification

    original = AutoModelForImageClassification.from_pretrained(model_path)
    prefix = original.base_model_prefix + "."
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = original.load_state_dict(backbone, strict=False)
    if unexpected or any(k.startswith(prefix) for k in missing):
        raise RuntimeError(f"backbone transplant failed: missing {missing}, unexpected {unexpected}")
    return imagenet_top1(original, processor, folder)


# ---------------------------------------------------------------------------------------------- training
def training_args(workdir: Path, epochs: int, seed: int):
    from hf_freeze import FreezeTrainingArguments

    return FreezeTrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0)


def train(strategy: Strategy, model, dataset, epochs: int, seed: int, workdir: Path) -> dict:
    """Train ``model`` in place the strategy's way; returns extra facts (steps, events)."""
    import transformers

    import hf_freeze

    if strategy.runner.startswith("lightning"):
        from lightning_peer import train_lightning

        return train_lightning(model, dataset, epochs=epochs, batch_size=BATCH, lr=LR, seed=seed,
                               unfreeze_at_epoch=lightning_unfreeze_epoch(epochs),
                               train_mode=strategy.runner == "lightning_train")
    args = training_args(workdir, epochs, seed)
    if strategy.runner == "freeze_trainer":
        trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=dataset,
                                          freeze_policy=strategy.policy(epochs))
    else:
        if strategy.runner == "classic":
            getattr(model, model.base_model_prefix).requires_grad_(False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    extra = {"steps": trainer.state.global_step}
    if strategy.runner == "freeze_trainer":
        hf_freeze.verify_frozen(model, "after the benchmark run")
        extra["policy"] = trainer.freeze_policy.to_string()
        extra["events"] = [{k: e[k] for k in ("step", "groups", "trainable_params")}
                           for e in trainer.freeze_callback.events_log]
        if trainer.freeze_policy.adapter is not None:  # the artefact is the adapter folder; then merge for scoring
            trainer.model.save_pretrained(workdir / "adapter")
            files = list((workdir / "adapter").glob("*.safetensors"))
            extra["adapter_bytes"] = sum(f.stat().st_size for f in files)
            extra["trainable_params_adapter"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            trainer.model.merge_and_unload()  # in place: `model` now holds the merged weights, plain names
    return extra


def run_one(strategy: Strategy, shared: Path, shots: int, seed: int, epochs: int, size: int, val_per_class: int,
            cache: Path) -> dict:
    import torch
    from shared_data import FASHION_MNIST_CLASSES
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(shared / MODEL)
    xt, yt, xv, yv = load_draw(shared, shots, seed, size, val_per_class, cache, processor.image_mean,
                               processor.image_std)
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_pretrained(
        shared / MODEL, num_labels=10, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)}, ignore_mismatched_sizes=True,
        classifier_dropout_prob=DROPOUT)
    pretrained = state_copy(model)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with PeakRSS() as rss:
            start = time.perf_counter()
            extra = train(strategy, model, PixelDataset(xt, yt), epochs, seed, workdir)
            seconds = time.perf_counter() - start
        trainable = extra.pop("trainable_params_adapter", None) or sum(p.numel() for p in model.parameters() if p.requires_grad)
        val = accuracy(model, xv, yv)
        full_bytes, delta_bytes, delta_tensors = artefact_bytes(model, pretrained, workdir)
        if "adapter_bytes" in extra:  # what an adapter run must save: the adapter (LoRA weights + head)
            delta_bytes = extra.pop("adapter_bytes")
    top1 = imagenet_retained(model, shared / MODEL, processor, shared / IMAGENET)
    return {"strategy": strategy.label, "shots": shots, "seed": seed, "epochs": epochs, "train_images": len(yt),
            "val_images": len(yv), "val_accuracy": val, "train_seconds": seconds,
            "rss_before_train_mb": rss.start / 2**20, "rss_peak_train_mb": rss.peak / 2**20,
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "full_checkpoint_bytes": full_bytes, "delta_bytes": delta_bytes, "delta_tensors": delta_tensors,
            "imagenet_top1": top1, **extra}


def worker(a) -> None:
    """One strategy x data size, all seeds, in this (fresh) process; prints one JSON document."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sys.path.insert(0, str(HERE))
    strategy = STRATEGIES[a.worker]
    runs = [run_one(strategy, shared_root(a.shared), a.shots[0], seed, a.epochs, a.size, a.val_per_class, Path(a.cache))
            for seed in a.seeds]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps({"strategy_key": a.worker, "runs": runs, "process_peak_rss_mb": peak}))


# ---------------------------------------------------------------------------------------------- orchestration
def run_config(key: str, shots: int, epochs: int, a) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--shots", str(shots), "--epochs",
           str(epochs), "--seeds", *map(str, a.seeds), "--size", str(a.size), "--val-per-class", str(a.val_per_class),
           "--cache", str(a.cache), "--threads", str(a.threads)]
    if a.shared:
        cmd += ["--shared", str(a.shared)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{key} at {shots}/class failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def baseline_top1(shared: Path) -> int:
    from shared_data import imagenet_top1
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(shared / MODEL)
    return imagenet_top1(model, AutoImageProcessor.from_pretrained(shared / MODEL), shared / IMAGENET)


def machine_info() -> dict:
    import psutil
    import pytorch_lightning
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pytorch_lightning": pytorch_lightning.__version__}


def orchestrate(a) -> None:
    shared = shared_root(a.shared)
    missing = missing_files(shared)
    if missing:
        print(f"transfer benchmark skipped: shared files not found: {missing} (set HF_FREEZE_SHARED or --shared)")
        return
    keys = a.strategies or list(DEFAULT)
    shots_list, seeds = ((10,), (0,)) if a.quick else (tuple(a.shot_sizes), tuple(a.seeds))
    a.seeds = list(seeds)
    info = machine_info()
    started = time.time()
    print(f"transfer benchmark: {keys} x {shots_list}/class x seeds {list(seeds)}, {a.size} px, "
          f"torch threads {a.threads}; machine {info}", flush=True)
    results = {"settings": {"shots": list(shots_list), "seeds": list(seeds), "epochs": {}, "image_size": a.size,
                            "batch_size": BATCH, "learning_rate": LR, "val_per_class": a.val_per_class,
                            "threads": a.threads, "quick": a.quick,
                            "strategies": {k: STRATEGIES[k].label for k in keys}, "pending": PENDING},
               "machine": info, "baseline_imagenet_top1": baseline_top1(shared), "configs": []}
    for shots in shots_list:
        epochs = 1 if a.quick else EPOCHS[shots]
        results["settings"]["epochs"][str(shots)] = epochs
        for key in keys:
            r = run_config(key, shots, epochs, a)
            results["configs"].append(r)
            accs = [run["val_accuracy"] for run in r["runs"]]
            print(f"{shots:>4}/class {key:<10} acc {np.mean(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}]  "
                  f"train {np.mean([run['train_seconds'] for run in r['runs']]):6.1f}s  "
                  f"imagenet {[run['imagenet_top1'] for run in r['runs']]}/20  wall {r['wall_seconds']:.0f}s", flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["total_minutes"] = (time.time() - started) / 60
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out} ({results['total_minutes']:.1f} min)")
    if not (a.quick or a.no_docs):
        from transfer_report import write_report

        write_report(results, ROOT / "docs")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 10 images/class, 1 epoch; docs are not rewritten")
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), help="default: all")
    p.add_argument("--shot-sizes", type=int, nargs="+", default=list(SHOTS), choices=list(SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--size", type=int, default=IMAGE_SIZE, help="image size in pixels (MobileNetV2 is fully convolutional)")
    p.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on shared cores)")
    p.add_argument("--shared", default=None, help="the shared/ folder (default: $HF_FREEZE_SHARED or ../shared)")
    p.add_argument("--cache", default=str(Path(os.environ.get("HF_FREEZE_CACHE", Path.home() / ".cache" / "hf_freeze"))
                                          / "transfer-benchmark"))
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "transfer.json"))
    p.add_argument("--no-docs", action="store_true", help="only write --out, not docs/benchmarks.md")
    p.add_argument("--worker", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    p.add_argument("--shots", type=int, nargs=1, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
    else:
        if a.quick:
            a.out = str(Path(a.cache) / "transfer-quick.json")
        orchestrate(a)


if __name__ == "__main__":
    main()
