"""Mixed-precision preservation check: FreezeTrainer under bf16 / fp16 keeps frozen tensors bit-identical.

Runs a real Trainer loop on the real MobileNetV2 (or a tiny ResNet when the fixture is absent) with a
mid-run unfreeze, for each precision available on the device (CUDA: fp32, bf16, fp16; CPU: fp32, bf16),
and, side by side, the classic ``requires_grad=False`` recipe, printing how many frozen tensors changed.

Usage: python benchmarks/mixed_precision_check.py [--model PATH] [--steps 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from shared_data import shared_dir
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

import hf_freeze


class Noise(torch.utils.data.Dataset):
    def __init__(self, n, size):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.x = torch.randn(n, 3, size, size, generator=g) + self.y.view(-1, 1, 1, 1) * 0.1

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def snapshot(model):
    return {n: t.detach().cpu().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def changed(before, model, names):
    now = snapshot(model)
    return [n for n in names if not torch.equal(before[n].reshape(-1).view(torch.uint8), now[n].reshape(-1).view(torch.uint8))]


def run(path, precision, recipe, steps, size, cpu):
    model = AutoModelForImageClassification.from_pretrained(path, num_labels=10, ignore_mismatched_sizes=True)
    before = snapshot(model)
    groups = hf_freeze.layer_groups(model)
    never = [n for g in groups if g.name not in ("head", "neck", groups.names[-3]) for n in (*g.param_names, *g.buffer_names)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=steps,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=cpu, disable_tqdm=True, bf16=precision == "bf16", fp16=precision == "fp16", seed=0)
    data = Noise(16 * steps, size)
    if recipe == "hf_freeze":
        policy = f"freeze=backbone;unfreeze=step{steps // 2}:2"  # neck + last stage unfreeze mid-run
        trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=data, freeze_policy=policy)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier.") or any(n in g.param_names for g in groups if g.name in ("neck", groups.names[-3])))
        trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    moved_head = changed(before, model, [n for n in groups["head"].param_names])
    return len(changed(before, model, never)), len(never), len(moved_head)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args(argv)
    path = a.model or shared_dir() / "models" / "mobilenet_v2_1.0_224-imagenet"
    cuda = torch.cuda.is_available()
    precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; model {path}")
    ok = True
    for precision in precisions:
        for recipe in ("hf_freeze", "classic"):
            bad, total, head = run(path, precision, recipe, a.steps, a.size, cpu=not cuda)
            trained = f"   head tensors trained: {head}" if recipe == "hf_freeze" else ""
            print(f"  {precision:<5} {recipe:<9} frozen tensors changed: {bad:>3}/{total}{trained}")
            ok &= recipe != "hf_freeze" or (bad == 0 and head > 0)
    print("RESULT:", "frozen tensors bit-identical under every precision" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
