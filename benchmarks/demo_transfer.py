"""Measure what the demo's freeze policy has to show on the transfer task (digits 5-9, few-shot).

Usage: ``python benchmarks/demo_transfer.py [--shots 10 30] [--seeds 0 1 2 3 4] [--epochs 3 10]``

For each few-shot draw it trains, with plain torch (Adam, batch 16, no augmentation):

* ``linear_probe``: pretrained backbone frozen (eval mode, BN statistics fixed), a new
  linear head trained on its pooled features (lr 1e-2);
* ``freeze_early``: pretrained, embedder and first stage frozen (eval mode), the rest and
  a new head trained (lr 3e-3);
* ``full_finetune``: pretrained with a new head, every weight trained (lr 3e-3);
* ``scratch``: the same architecture from random init, every weight trained (lr 3e-3);

It runs torch on one thread.

and prints validation accuracy (all remaining images of digits 5-9) over seeds as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetForImageClassification
from transformers.utils import logging as hf_logging

from hf_freeze.demo.data import TRANSFER_DIGITS, transfer_task
from hf_freeze.demo.pretrain import PretrainSettings, base_config, normalize, pretrained_base, to_pixel_array

METHODS = ("linear_probe", "freeze_early", "full_finetune", "scratch")
Draw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_draw(shots: int, seed: int, mean: list[float], std: list[float]) -> Draw:
    """Normalised ``(x_train, y_train, x_val, y_val)`` of one few-shot draw of the transfer task."""
    task = transfer_task(shots_per_class=shots, seed=seed)
    return (
        normalize(to_pixel_array(task["train"]), mean, std),
        torch.tensor(task["train"]["label"]),
        normalize(to_pixel_array(task["validation"]), mean, std),
        torch.tensor(task["validation"]["label"]),
    )


def build(method: str, path: Path) -> tuple[ResNetForImageClassification, list[nn.Module]]:
    """The model for ``method`` (new 5-way head) and the modules it keeps frozen."""
    if method == "scratch":
        return ResNetForImageClassification(base_config(PretrainSettings(), [str(d) for d in TRANSFER_DIGITS])), []
    model = AutoModelForImageClassification.from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True)
    frozen = {
        "linear_probe": [model.resnet],
        "freeze_early": [model.resnet.embedder, model.resnet.encoder.stages[0]],
    }.get(method, [])
    for module in frozen:
        module.requires_grad_(False)
    return model, frozen


def fit(model: nn.Module, frozen: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
        epochs: int, lr: float, seed: int) -> None:
    """Minibatch Adam on the trainable weights; frozen modules stay in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        model.train()
        for module in frozen:
            module.eval()
        for idx in torch.randperm(len(y), generator=generator).split(16):
            loss = nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the logits ``forward(x)``."""
    return float((forward(x).argmax(-1) == y).float().mean())


def run_one(method: str, path: Path, draw: Draw, epochs: int, seed: int) -> float:
    """Train ``method`` on one draw and return its validation accuracy."""
    torch.manual_seed(seed)
    x, y, xv, yv = draw
    model, frozen = build(method, path)
    if method == "linear_probe":  # train the head on precomputed features: same result, far cheaper
        model.eval()
        with torch.no_grad():
            feats, feats_v = (model.resnet(pixel_values=t).pooler_output.flatten(1) for t in (x, xv))
        head = model.classifier
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=generator).split(16):
                loss = nn.functional.cross_entropy(head(feats[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return accuracy(head, feats_v, yv)
    fit(model, frozen, x, y, epochs, 3e-3, seed)
    model.eval()
    return accuracy(lambda b: model(pixel_values=b).logits, xv, yv)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is as fast and is not slowed down by shared cores
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = pretrained_base(cache_dir=args.cache_dir, progress=False)
    processor = AutoImageProcessor.from_pretrained(path)
    mean, std = list(processor.image_mean), list(processor.image_std)
    print(f"base: {path}")
    print("| shots/class | epochs | method | val acc mean | min | max | s/run |")
    print("|---|---|---|---|---|---|---|")
    for shots in args.shots:
        draws = {seed: load_draw(shots, seed, mean, std) for seed in args.seeds}
        for epochs in args.epochs:
            for method in args.methods:
                start = time.perf_counter()
                accs = [run_one(method, path, draws[s], epochs, s) for s in args.seeds]
                per_run = (time.perf_counter() - start) / len(args.seeds)
                print(f"| {shots} | {epochs} | {method} | {statistics.mean(accs):.3f} | {min(accs):.3f} | "
                      f"{max(accs):.3f} | {per_run:.2f} |", flush=True)


if __name__ == "__main__":
    main()
