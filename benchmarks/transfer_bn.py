"""Real-BatchNorm transfer benchmark: hf_freeze policies vs full fine-tuning vs fastai, Lightning and timm.

A transformers ResNet pretrained here with ordinary BatchNorm training (``bn_base.py``: Fashion-MNIST train
split, classes 0-4, 30,000 images, cached) is transferred to classes 5-9 with 10, 50 or 200 training images
per class (drawn from the train split, one draw per seed), evaluated on the fixed test-split images of classes
5-9 (5,000). Every strategy gets the same data, batch size, base learning rate and number of optimizer steps.

Per run it records: validation accuracy; **retention**: the fine-tuned backbone under the base's original
5-class head on the test images of classes 0-4 (the base scores ``base_retention`` there); the artefact to save
(every tensor that differs from the base, new head included; the adapter folder for LoRA); training time;
trainable parameters.

    python benchmarks/transfer_bn.py            # full run (resumable): docs/benchmarks/transfer_bn*.{json,png}
    python benchmarks/transfer_bn.py --quick    # 1 seed, n=10, few steps: a smoke run, nothing written to docs/

Every finished run is kept as JSON under ``<cache>/transfer-bn-runs/<settings hash>/``: an interrupted run
continues where it stopped. Skips (exit 0, with the reason) when the shared Fashion-MNIST files are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SHOTS = (10, 50, 200)
EPOCHS = {10: 30, 50: 12, 200: 6}  # 60, 96 and 192 optimizer steps at batch 32
SEEDS = (0, 1, 2)
BATCH, LR = 32, 1e-3
LLRD, TIMM_LAYER_DECAY, LORA_R = 0.8, 0.65, 8
OUT = ROOT / "docs" / "benchmarks" / "transfer_bn.json"
FORMAT_VERSION = 1  # bump when a strategy's recipe changes in a way the settings below do not capture


# ---------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune. ``policy(epochs)`` is an hf_freeze policy string (runner ``freeze_trainer``)."""

    label: str
    runner: str  # freeze_trainer | trainer | classic | timm | fastai | lightning | lightning_train | pending
    family: str  # hf_freeze | baseline | peer
    policy: Callable[[int], str] | None = None
    short: str = ""


def gradual_policy(epochs: int, unfreeze_bn: bool = False) -> str:
    """Head first; stage.3 + stage.2 at a quarter of training, stage.1 + stage.0 + stem at half, all at 0.1 x LR."""
    policy = f"freeze=backbone;unfreeze=epoch{epochs * 0.25:g}:2@0.1,epoch{epochs * 0.5:g}:3@0.1"
    return policy + (";unfreeze_bn=true" if unfreeze_bn else "")


def lightning_unfreeze_epoch(epochs: int) -> int:
    """BackboneFinetuning unfreezes at an integer epoch: the one nearest a quarter of training (>= 1)."""
    return max(1, round(epochs * 0.25))


STRATEGIES: dict[str, Strategy] = {
    "full": Strategy("full fine-tuning (Trainer)", "trainer", "baseline", short="full FT"),
    "classic": Strategy("classic: requires_grad=False (Trainer)", "classic", "baseline", short="classic"),
    "head_only": Strategy("hf_freeze head-only", "freeze_trainer", "hf_freeze", lambda e: "backbone", "head-only"),
    "gradual": Strategy("hf_freeze gradual unfreezing", "freeze_trainer", "hf_freeze", gradual_policy, "gradual"),
    "gradual_bn": Strategy("hf_freeze gradual unfreezing, unfreeze_bn=true", "freeze_trainer", "hf_freeze",
                           lambda e: gradual_policy(e, unfreeze_bn=True), "gradual+BN"),
    "llrd": Strategy(f"hf_freeze layer-wise LR decay {LLRD}", "freeze_trainer", "hf_freeze",
                     lambda e: f"freeze=none;layer_lr_decay={LLRD}", f"LLRD {LLRD}"),
    "adapters": Strategy(f"hf_freeze LoRA r={LORA_R} on stage.2 + stage.3 (backbone frozen)", "freeze_trainer",
                         "hf_freeze", lambda e: f"freeze=backbone;adapter=lora,r={LORA_R},alpha={2 * LORA_R},groups=2",
                         "LoRA"),
    "search": Strategy("hf_freeze search_freeze_policies", "pending", "hf_freeze", short="search"),
    "fastai": Strategy("fastai fine_tune (Learner, 1 frozen epoch)", "fastai", "peer", short="fastai"),
    "lightning": Strategy("Lightning BackboneFinetuning", "lightning", "peer", short="Lightning"),
    "lightning_train": Strategy("Lightning BackboneFinetuning, model.train()", "lightning_train", "peer",
                                short="Lightning+train()"),
    "timm": Strategy(f"timm create_optimizer_v2(layer_decay={TIMM_LAYER_DECAY})", "timm", "peer", short="timm LLRD"),
}
DEFAULT = tuple(k for k, s in STRATEGIES.items() if s.runner != "pending")
PENDING = {"search": "phase 2: the policy found by hf_freeze.search_freeze_policies on a held-out split of the "
                     "training images, within the peers' total budget (needs the fixed search, issue 10)"}


# ---------------------------------------------------------------------------------------------- data
def missing_files(shared: Path) -> list[str]:
    from bn_base import FMNIST

    need = [FMNIST / f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    return [str(shared / p) for p in need if not (shared / p).exists()]


@dataclass
class Task:
    """Preprocessed tensors of one few-shot draw (train) and the fixed evaluation sets."""

    train_x: object
    train_y: object
    val_x: object
    val_y: object
    keep_x: object  # test images of the source classes, for retention
    keep_y: object


def load_task(shared: Path, base: Path, shots: int, seed: int, quick: bool = False) -> Task:
    import torch
    from bn_base import FMNIST, SOURCE_CLASSES, TARGET_CLASSES, class_subset, gray_pixels
    from shared_data import fashion_mnist
    from transformers import AutoImageProcessor

    from hf_freeze.demo.pretrain import normalize

    processor = AutoImageProcessor.from_pretrained(base)
    mean, std = processor.image_mean, processor.image_std
    images, labels = fashion_mnist(shared / FMNIST, "train")
    test_images, test_labels = fashion_mnist(shared / FMNIST, "test")
    tr = class_subset(labels, TARGET_CLASSES, shots, seed)
    per_eval = 40 if quick else None  # quick: 200 images per evaluation set
    va = class_subset(test_labels, TARGET_CLASSES, per_eval, 1234)
    ke = class_subset(test_labels, SOURCE_CLASSES, per_eval, 1234)

    def pixels(imgs, idx):
        return normalize(gray_pixels(imgs[idx]), mean, std)

    def target(lbls, idx):  # classes 5-9 -> labels 0-4
        return torch.from_numpy(lbls[idx] - TARGET_CLASSES[0])

    return Task(pixels(images, tr), target(labels, tr), pixels(test_images, va), target(test_labels, va),
                pixels(test_images, ke), torch.from_numpy(test_labels[ke]))


class TupleDataset:
    """``(pixels, label)`` items, for fastai."""

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.pixels[i], self.labels[i]


# ---------------------------------------------------------------------------------------------- peers
def layer_index(model) -> dict[str, int]:
    """Parameter name -> hf_freeze group index (stem 0 ... head last)."""
    import hf_freeze

    return {n: i for i, g in enumerate(hf_freeze.layer_groups(model)) for n in g.param_names}


def timm_optimizer(model, lr: float, layer_decay: float):
    """timm's layer-wise LR decay on an HF model. timm derives layer ids from ``model.group_matcher()``; an HF model
    has none, and timm's fallback needs ``pretrained_cfg["classifier"]``, so without help every parameter lands in
    one layer and the decay does nothing (timm warns). We give it a matcher built from ``hf_freeze.layer_groups``
    (one id per group: stem, stage.0..3, head). timm stores the decay as ``lr_scale`` in each param group, which
    only timm's own schedulers apply; the benchmark's LR is constant, so the scale is applied once here (what
    timm's ``const`` scheduler does). Returns the optimizer and facts for the record."""
    from timm.optim import create_optimizer_v2, param_groups_layer_decay

    plain = {round(g["lr_scale"], 6) for g in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=layer_decay)}
    index = layer_index(model)
    model.group_matcher = lambda coarse=False: (lambda name: index[name])
    try:
        optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.0, layer_decay=layer_decay)
    finally:
        del model.group_matcher
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return optimizer, {"timm_lr_scales_without_group_matcher": sorted(plain),
                       "timm_lr_scales": sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})}


def train_fastai(model, task: Task, *, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """fastai's ``Learner.fine_tune`` on the HF model: a backbone/head splitter, one frozen epoch, then
    ``epochs - 1`` unfrozen ones with discriminative LRs (fastai's defaults: ``freeze_epochs=1``, ``lr_mult=100``,
    one-cycle schedules, ``train_bn=True``). Its optimizer is fastai's Adam set to torch AdamW's constants
    (betas 0.9/0.999, eps 1e-8) and no weight decay, as for every strategy."""
    from functools import partial

    from fastai.callback.core import Callback
    from fastai.callback.schedule import Learner  # noqa: F401  (patches fine_tune / fit_one_cycle onto Learner)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner as FastaiLearner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import Adam
    from fastai.torch_core import params, set_seed
    from torch import nn

    set_seed(seed, reproducible=True)

    class StepCounter(Callback):
        count = 0

        def after_step(self):
            self.count += 1

    class Logits(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, x):
            return self.hf(pixel_values=x).logits

    prefix = model.base_model_prefix + "."

    def splitter(m):
        return [params(getattr(m.hf, model.base_model_prefix)),
                [p for n, p in m.hf.named_parameters() if not n.startswith(prefix)]]

    train = DataLoader(TupleDataset(task.train_x, task.train_y), bs=batch_size, shuffle=True, drop_last=False,
                       num_workers=0)
    valid = DataLoader(TupleDataset(task.train_x[:0], task.train_y[:0]), bs=batch_size, num_workers=0)
    learn = FastaiLearner(DataLoaders(train, valid), Logits(model), loss_func=CrossEntropyLossFlat(),
                          opt_func=partial(Adam, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0), splitter=splitter,
                          train_bn=True)
    steps = StepCounter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs - 1, base_lr=lr, freeze_epochs=1, cbs=[steps])
    return {"steps": steps.count, "lr_groups_end": [float(h["lr"]) for h in learn.opt.hypers]}


# ---------------------------------------------------------------------------------------------- one run
def training_args(workdir: Path, epochs: int, seed: int):
    from hf_freeze import FreezeTrainingArguments

    return FreezeTrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0)


def train(strategy: Strategy, model, task: Task, epochs: int, seed: int, workdir: Path) -> dict:
    """Train ``model`` in place the strategy's way; returns extra facts (steps, events, policy)."""
    import transformers
    from transfer import PixelDataset

    import hf_freeze

    if strategy.runner == "fastai":
        return train_fastai(model, task, epochs=epochs, batch_size=BATCH, lr=LR, seed=seed)
    dataset = PixelDataset(task.train_x, task.train_y)
    if strategy.runner.startswith("lightning"):
        from lightning_peer import train_lightning

        return train_lightning(model, dataset, epochs=epochs, batch_size=BATCH, lr=LR, seed=seed,
                               unfreeze_at_epoch=lightning_unfreeze_epoch(epochs),
                               train_mode=strategy.runner == "lightning_train")
    args = training_args(workdir, epochs, seed)
    extra: dict = {}
    if strategy.runner == "freeze_trainer":
        trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=dataset,
                                          freeze_policy=strategy.policy(epochs))
    elif strategy.runner == "timm":
        optimizer, extra = timm_optimizer(model, LR, TIMM_LAYER_DECAY)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None))
    else:
        if strategy.runner == "classic":
            getattr(model, model.base_model_prefix).requires_grad_(False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    extra["steps"] = trainer.state.global_step
    if strategy.runner == "freeze_trainer":
        hf_freeze.verify_frozen(model, "after the benchmark run")
        extra["policy"] = trainer.freeze_policy.to_string()
        extra["feature_cache"] = trainer.feature_cache_refusal or "used"
        extra["events"] = [{k: e[k] for k in ("step", "groups", "trainable_params")}
                           for e in trainer.freeze_callback.events_log]
        if trainer.freeze_policy.adapter is not None:  # the artefact is the adapter folder; then merge for scoring
            trainer.model.save_pretrained(workdir / "adapter")
            extra["adapter_bytes"] = sum(f.stat().st_size for f in (workdir / "adapter").glob("*.safetensors"))
            extra["trainable_params_adapter"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            trainer.model.merge_and_unload()  # in place: `model` now holds the merged weights, plain names
    return extra


def load_for_transfer(base: Path, seed: int):
    """The base with a freshly initialised 5-class head for classes 5-9 (same shape as the old head, so it is
    re-initialised explicitly: ``ignore_mismatched_sizes`` would keep it)."""
    import torch
    from bn_base import TARGET_CLASSES
    from shared_data import FASHION_MNIST_CLASSES
    from transformers import AutoModelForImageClassification

    names = [FASHION_MNIST_CLASSES[c] for c in TARGET_CLASSES]
    model = AutoModelForImageClassification.from_pretrained(
        base, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model.classifier[1].reset_parameters()
    return model


def retention(model, base: Path, task: Task) -> float:
    """Accuracy on test classes 0-4 of the fine-tuned backbone under the base's original head."""
    from bn_base import accuracy
    from transformers import AutoModelForImageClassification

    original = AutoModelForImageClassification.from_pretrained(base)
    prefix = original.base_model_prefix + "."
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = original.load_state_dict(backbone, strict=False)
    if unexpected or any(k.startswith(prefix) for k in missing):
        raise RuntimeError(f"backbone transplant failed: missing {missing}, unexpected {unexpected}")
    return accuracy(original, task.keep_x, task.keep_y)


def run_one(key: str, shared: Path, base: Path, shots: int, seed: int, epochs: int, quick: bool) -> dict:
    from bn_base import accuracy
    from transfer import artefact_bytes, state_copy

    strategy = STRATEGIES[key]
    task = load_task(shared, base, shots, seed, quick)
    model = load_for_transfer(base, seed)
    pretrained = state_copy(model)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        start, cpu_start = time.perf_counter(), time.process_time()
        extra = train(strategy, model, task, epochs, seed, workdir)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        trainable = extra.pop("trainable_params_adapter", None) or sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        val = accuracy(model, task.val_x, task.val_y)
        full_bytes, delta_bytes, delta_tensors = artefact_bytes(model, pretrained, workdir)
        if "adapter_bytes" in extra:
            delta_bytes = extra.pop("adapter_bytes")
    return {"strategy_key": key, "strategy": strategy.label, "shots": shots, "seed": seed, "epochs": epochs,
            "train_images": len(task.train_y), "val_images": len(task.val_y), "retention_images": len(task.keep_y),
            "val_accuracy": val, "retention": retention(model, base, task), "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "full_checkpoint_bytes": full_bytes, "delta_bytes": delta_bytes, "delta_tensors": delta_tensors, **extra}


# ---------------------------------------------------------------------------------------------- orchestration
def settings(a, base: Path) -> dict:
    return {"format": FORMAT_VERSION, "base": base.name, "batch_size": BATCH, "learning_rate": LR,
            "epochs": {str(s): (1 if a.quick else EPOCHS[s]) for s in a.shot_sizes}, "quick": a.quick,
            "llrd": LLRD, "timm_layer_decay": TIMM_LAYER_DECAY, "lora_r": LORA_R}


def run_dir(a, base: Path) -> Path:
    st = settings(a, base)
    st.pop("epochs")
    key = hashlib.sha256(json.dumps(st, sort_keys=True).encode()).hexdigest()[:12]
    return Path(a.cache) / "transfer-bn-runs" / key


def run_path(folder: Path, key: str, shots: int, seed: int, epochs: int) -> Path:
    return folder / f"{key}-{shots}-e{epochs}-s{seed}.json"


def worker(a) -> None:
    """One strategy x data size, the listed seeds, in this (fresh) process; writes one JSON per finished run."""
    import torch
    from shared_data import shared_dir
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    shared, base, folder = shared_dir(a.shared), Path(a.base), Path(a.run_dir)
    for seed in a.seeds:
        result = run_one(a.worker, shared, base, a.shots[0], seed, a.epochs, a.quick)
        path = run_path(folder, a.worker, a.shots[0], seed, a.epochs)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(path)
        print(f"  {a.worker} {a.shots[0]}/class seed {seed}: acc {result['val_accuracy']:.3f} "
              f"retention {result['retention']:.3f} train {result['train_seconds']:.1f}s", flush=True)


def run_missing(key: str, shots: int, epochs: int, seeds: list[int], base: Path, folder: Path, a) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--shots", str(shots), "--epochs",
           str(epochs), "--seeds", *map(str, seeds), "--base", str(base), "--run-dir", str(folder), "--threads",
           str(a.threads), "--cache", str(a.cache)] + (["--quick"] if a.quick else [])
    if a.shared:
        cmd += ["--shared", str(a.shared)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} at {shots}/class failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def base_facts(base: Path, shared: Path, quick: bool) -> dict:
    """The base's own score on the retention set (what retention is measured against) and its pretraining report."""
    from bn_base import REPORT, accuracy
    from transformers import AutoModelForImageClassification

    task = load_task(shared, base, 10, 0, quick)
    model = AutoModelForImageClassification.from_pretrained(base)
    return {"retention": accuracy(model, task.keep_x, task.keep_y), "retention_images": len(task.keep_y),
            "val_images": len(task.val_y), "pretraining": json.loads((base / REPORT).read_text())}


def orchestrate(a) -> dict | None:
    import torch
    from bn_base import pretrained_base
    from shared_data import shared_dir
    from transfer import machine_info

    shared = shared_dir(a.shared)
    missing = missing_files(shared)
    if missing:
        print(f"transfer_bn benchmark skipped: shared files not found: {missing} (set HF_FREEZE_SHARED or --shared)")
        return None
    torch.set_num_threads(a.threads)
    base = pretrained_base(shared, cache_dir=a.cache_root)
    keys = a.strategies or list(DEFAULT)
    if a.quick:
        a.shot_sizes, a.seeds = [10], [0]
    folder = run_dir(a, base)
    folder.mkdir(parents=True, exist_ok=True)
    st = settings(a, base)
    print(f"transfer_bn: {keys} x {a.shot_sizes}/class x seeds {a.seeds}; runs kept in {folder}", flush=True)
    started = time.time()
    for shots in a.shot_sizes:
        epochs = 1 if a.quick else EPOCHS[shots]
        for key in keys:
            todo = [s for s in a.seeds if not run_path(folder, key, shots, s, epochs).is_file()]
            if todo:
                run_missing(key, shots, epochs, todo, base, folder, a)
    runs = [json.loads(run_path(folder, k, s, seed, 1 if a.quick else EPOCHS[s]).read_text())
            for s in a.shot_sizes for k in keys for seed in a.seeds]
    results = {"settings": {**st, "shots": list(a.shot_sizes), "seeds": list(a.seeds),
                            "strategies": {k: STRATEGIES[k].label for k in STRATEGIES},
                            "short": {k: STRATEGIES[k].short for k in STRATEGIES},
                            "family": {k: STRATEGIES[k].family for k in STRATEGIES},
                            "policies": {k: STRATEGIES[k].policy(EPOCHS[SHOTS[0]]) for k in STRATEGIES
                                         if STRATEGIES[k].policy}, "pending": PENDING,
                            "threads": a.threads},
               "machine": machine_info(), "base": base_facts(base, shared, a.quick), "runs": runs,
               "minutes_this_invocation": round((time.time() - started) / 60, 1)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return results


def main(argv=None) -> None:
    cache_root = Path(os.environ.get("HF_FREEZE_CACHE", Path.home() / ".cache" / "hf_freeze"))
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 10/class, 1 epoch, 200-image evaluation sets")
    p.add_argument("--strategies", nargs="+", choices=list(DEFAULT), help="default: all")
    p.add_argument("--shot-sizes", type=int, nargs="+", default=list(SHOTS), choices=list(SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: shared cores)")
    p.add_argument("--shared", default=None, help="the shared/ folder (default: $HF_FREEZE_SHARED or ../shared)")
    p.add_argument("--cache", default=str(cache_root), help="cache root: the base and the finished runs")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no-docs", action="store_true", help="only write --out, not the plots and docs")
    p.add_argument("--worker", choices=list(DEFAULT), help=argparse.SUPPRESS)
    p.add_argument("--shots", type=int, nargs=1, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.cache_root = a.cache
    if a.worker:
        worker(a)
        return
    if a.quick and a.out == str(OUT):
        a.out = str(Path(a.cache) / "transfer-bn-quick.json")
    results = orchestrate(a)
    if results and not (a.quick or a.no_docs):
        from render_docs import plot_transfer_bn, update_docs

        plot_transfer_bn(results, ROOT / "docs" / "benchmarks")
        update_docs(ROOT)


if __name__ == "__main__":
    main()
