"""Adapters vs head-only vs gradual unfreezing on the real ImageNet MobileNetV2, few-shot Fashion-MNIST.

Usage: ``python benchmarks/adapters.py [--shots 10] [--epochs 8] [--size 128] [--test-per-class 50] [--seeds 0]
[--threads 1]``

Every method is the same ``FreezeTrainer`` run (AdamW, batch 20, cosine schedule, no augmentation,
a new 10-way head), differing only in its freeze policy (and, for ``lora_all``, the LR):

* ``head_only``:  ``freeze=backbone``, lr 5e-3 (the baseline the ratios refer to);
* ``gradual``:    ``freeze=backbone;unfreeze=epoch3:1@0.1,epoch5:1@0.1``, lr 5e-3 (the neck, then
  stage.15, at a tenth of the LR; their BatchNorm stays in inference mode, the default unfreeze_bn=false);
* ``lora_2``:     ``adapter=lora,r=8,alpha=16,groups=2``, lr 5e-3 (LoRA on the last two adaptable
  groups: stage.15 and the neck, i.e. the groups ``gradual`` unfreezes; frozen BN stays locked);
* ``lora_all``:   ``adapter=lora,r=8,alpha=16``, lr 1e-3 (LoRA on every group but the head; at
  5e-3 its features collapsed: test accuracy 0.038, measured).

For each: trainable parameters at the end of training, the bytes ``trainer.save_model`` writes (the weights file: the
full model, or the adapter), the bytes of the tensors that differ from the pretrained model (a
lower bound for any delta format), test accuracy (``--test-per-class`` images per class of the
test split), training time as the process CPU time and the median wall time of one optimizer
step, and each figure's ratio to ``head_only``. Torch runs on ``--threads`` threads (default 1):
on a shared machine, multi-threaded wall times swing ~10x with other load (measured), while the
CPU time of one thread measures the work. Also checked for every
run: the pretrained tensors that stayed frozen are bit-identical, and for adapters, a reload of
the saved folder gives the trained logits exactly. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from shared_data import fashion_mnist, few_shot_indices, shared_dir
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainerCallback
from transformers.utils import logging as hf_logging

import hf_freeze
from hf_freeze.names import named_base_tensors

#: method -> (freeze policy, learning rate)
POLICIES = {
    "head_only": ("freeze=backbone", 5e-3),
    "gradual": ("freeze=backbone;unfreeze=epoch3:1@0.1,epoch5:1@0.1", 5e-3),
    "lora_2": ("adapter=lora,r=8,alpha=16,groups=2", 5e-3),
    "lora_all": ("adapter=lora,r=8,alpha=16", 1e-3),
}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (data, forward, backward, update): robust to bursts of load."""

    def __init__(self):
        self.steps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._start)


def pixels(processor, images, size: int) -> torch.Tensor:
    rgb = [Image.fromarray(im).convert("RGB") for im in images]
    return processor(rgb, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                     return_tensors="pt")["pixel_values"]


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    model.eval()
    return torch.cat([model(pixel_values=x[i:i + batch]).logits for i in range(0, len(x), batch)])


def warm_up(model_path: Path, x: torch.Tensor) -> None:
    """One forward/backward pass before any timing: the first one pays one-off kernel set-up."""
    model = AutoModelForImageClassification.from_pretrained(model_path)
    model(pixel_values=x).logits.sum().backward()


def saved_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(method: str, args, data, model_path: Path, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    policy, lr = POLICIES[method]
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_pretrained(model_path, num_labels=10, ignore_mismatched_sizes=True)
    pretrained = {n: t.detach().clone() for n, t in named_base_tensors(model).items()}
    with tempfile.TemporaryDirectory() as tmp:
        targs = hf_freeze.FreezeTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=20, learning_rate=lr, num_train_epochs=args.epochs,
            lr_scheduler_type="cosine", weight_decay=0.01, report_to=[], save_strategy="no", logging_strategy="no",
            seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        train = [{"pixel_values": x, "labels": int(y)} for x, y in zip(x_train, y_train)]
        timer = StepTimer()
        trainer = hf_freeze.FreezeTrainer(model=model, args=targs, train_dataset=train, freeze_policy=policy,
                                          callbacks=[timer])
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # after every unfreeze
        logits = predict(trainer.model, x_test)
        trainer.save_model(str(Path(tmp) / "saved"))
        artefact = saved_bytes(Path(tmp) / "saved")
        hf_freeze.verify_frozen(trainer.model)  # still-frozen pretrained tensors are bit-identical
        now = named_base_tensors(trainer.model)
        changed = [n for n in pretrained if not torch.equal(pretrained[n], now[n])]
        delta = sum(now[n].numel() * now[n].element_size() for n in changed)
        exact_reload = None
        if hf_freeze.get_state(trainer.model).adapter is not None:
            delta = sum(p.numel() * p.element_size() for _, _, _, p in hf_freeze.names.named_peft_parameters(trainer.model))
            delta += sum(now[n].numel() * now[n].element_size() for n in changed)  # 0: nothing pretrained moved
            torch.manual_seed(seed + 1000)  # a different random head under the saved copy
            base = AutoModelForImageClassification.from_pretrained(model_path, num_labels=10, ignore_mismatched_sizes=True)
            reloaded = hf_freeze.load_adapter(base, Path(tmp) / "saved")
            exact_reload = bool(torch.equal(predict(reloaded, x_test[:50]), logits[:50]))
    return {"method": method, "seed": seed, "trainable_params": trainable, "artefact_bytes": artefact,
            "delta_bytes": delta, "pretrained_changed": len(changed), "accuracy": float((logits.argmax(-1) == y_test).float().mean()),
            "train_s": train_s, "train_cpu_s": cpu_s, "steps": len(timer.steps),
            "median_step_s": statistics.median(timer.steps), "exact_reload": exact_reload}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=10, help="training images per class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="input resolution (px)")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--shared", default=None, help="the shared/ folder (default: $HF_FREEZE_SHARED or ../shared)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = work)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    shared = shared_dir(args.shared)
    model_path = shared / "models" / "mobilenet_v2_1.0_224-imagenet"
    processor = AutoImageProcessor.from_pretrained(model_path)
    train_images, train_labels = fashion_mnist(shared / "data" / "fashion-mnist", "train")
    test_images, test_labels = fashion_mnist(shared / "data" / "fashion-mnist", "test")
    test_idx = few_shot_indices(test_labels, args.test_per_class, seed=123)
    x_test, y_test = pixels(processor, test_images[test_idx], args.size), torch.as_tensor(test_labels[test_idx])
    print(f"torch threads: {torch.get_num_threads()}; MobileNetV2 (ImageNet), Fashion-MNIST {args.shots}/class, "
          f"{args.size} px, {args.epochs} epochs, test {len(y_test)} images")
    warm_up(model_path, x_test[:20])
    results = []
    for seed in args.seeds:
        idx = few_shot_indices(train_labels, args.shots, seed=seed)
        data = (pixels(processor, train_images[idx], args.size), torch.as_tensor(train_labels[idx]), x_test, y_test)
        for method in args.methods:
            results.append(run(method, args, data, model_path, seed))
            r = results[-1]
            print(f"  seed {seed} {method:9s} acc {r['accuracy']:.3f}  {r['train_s']:.1f} s wall, "
                  f"{r['train_cpu_s']:.1f} s CPU, median step {r['median_step_s'] * 1e3:.0f} ms  "
                  f"trainable {r['trainable_params']:,}  saved {r['artefact_bytes']:,} B", flush=True)
    print(table(results, args.methods))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def table(results: list[dict], methods: list[str]) -> str:
    def mean(method, key):
        return statistics.mean(r[key] for r in results if r["method"] == method)

    base = methods[0]
    rows = ["| method | trainable params | saved weights | trained-tensor delta | test accuracy | train CPU time | "
            "median step (wall) | pretrained tensors changed | reload exact |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in methods:
        accs = [r["accuracy"] for r in results if r["method"] == m]
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        reload = {r["exact_reload"] for r in results if r["method"] == m}
        rows.append(
            f"| {m} | {mean(m, 'trainable_params'):,.0f} ({mean(m, 'trainable_params') / mean(base, 'trainable_params'):.1f}x) "
            f"| {mean(m, 'artefact_bytes') / 1e6:.2f} MB ({mean(m, 'artefact_bytes') / mean(base, 'artefact_bytes'):.2f}x) "
            f"| {mean(m, 'delta_bytes') / 1e3:,.0f} KB ({mean(m, 'delta_bytes') / mean(base, 'delta_bytes'):.1f}x) "
            f"| {mean(m, 'accuracy'):.3f}{spread} ({mean(m, 'accuracy') - mean(base, 'accuracy'):+.3f}) "
            f"| {mean(m, 'train_cpu_s'):.1f} s ({mean(m, 'train_cpu_s') / mean(base, 'train_cpu_s'):.2f}x) "
            f"| {mean(m, 'median_step_s') * 1e3:.0f} ms ({mean(m, 'median_step_s') / mean(base, 'median_step_s'):.2f}x) "
            f"| {mean(m, 'pretrained_changed'):.0f} | {'-' if reload == {None} else 'yes' if reload == {True} else 'NO'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
