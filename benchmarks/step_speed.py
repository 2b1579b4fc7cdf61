"""Step-time benchmark on the real MobileNetV2 (shared fixture), 128 px, batch 32, side by side in one run.

Measures (median seconds per step, after warm-up):
  inference   eval-mode forward under torch.no_grad (the floor for a frozen backbone)
  step        head-only training step without the Trainer: train-mode forward with the policy applied,
              loss, backward, AdamW step, on the same batch (what the model itself costs per step)
  full        the same step with nothing frozen (what the frozen prefix saves)
  hf_freeze   FreezeTrainer, head-only (policy "backbone"), feature cache off
  hf_freeze_cache  the same with the feature cache on (memory): the backbone runs once, before the first step
              (its cost is in the set-up time, recorded per configuration), then steps train the head on features
  callback    plain Trainer + FreezeCallback("backbone")
  manual      plain Trainer, hf_freeze.apply_policy() done by hand, no callback (isolates callback overhead)
  classic     plain Trainer, requires_grad=False on the backbone (the tutorial recipe; BN stats drift)
Callback overhead is measured two ways: end to end (callback - manual, noisy) and as the time spent
inside FreezeCallback's own methods per step (precise).

Every step is timed in wall clock and in this process's CPU time (``time.process_time``), and each is paired
with a reference (an eval-mode no_grad forward of a fixed batch on a separate copy of the model) timed right
after it: on shared cores the machine's speed drifts by tens of percent over minutes, wall clock and CPU time
alike, so medians of configurations measured minutes apart can invert; the median of step/reference ratios
(``paired_ratio``) cannot drift that way.

Usage: python benchmarks/step_speed.py [--steps 40] [--threads N] [--json out.json] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from shared_data import shared_dir
from transformers import AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments

import hf_freeze


def now() -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


class Reference:
    """The paired reference: an eval-mode, no_grad forward of a fixed batch on its own copy of the model, timed
    right after every measured step. Machine speed drifts by tens of percent over minutes on shared cores (wall
    clock and CPU time alike), so configurations measured minutes apart can invert; the ratio of a step to the
    reference forward timed next to it cannot."""

    def __init__(self, path, batch: int, size: int):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load(path).eval().to(device)
        self.x = Batches(batch, size).x.to(device)

    def time(self) -> tuple[float, float]:
        start = now()
        with torch.no_grad():
            self.model(pixel_values=self.x)
        end = now()
        return end[0] - start[0], end[1] - start[1]


class StepClock(TrainerCallback):
    """Each optimizer step's wall and CPU time, from the end of the previous step (data, forward, backward, step,
    all callbacks) with the paired reference forward run in between and left out; and the set-up time from
    ``train()`` to the first step (optimizer, dataloader: the feature cache is computed there)."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.samples: list[tuple[float, float, float, float]] = []  # step wall, step cpu, ref wall, ref cpu
        self.first_begin: float | None = None
        self.last: tuple[float, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_begin is None:
            self.first_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        end = now()
        if self.last is not None:
            self.samples.append((end[0] - self.last[0], end[1] - self.last[1], *self.reference.time()))
        self.last = now()


class Batches(torch.utils.data.Dataset):
    def __init__(self, n, size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def load(path):
    return AutoModelForImageClassification.from_pretrained(path, num_labels=10, ignore_mismatched_sizes=True)


class TimedFreezeCallback(hf_freeze.FreezeCallback):
    """FreezeCallback that accounts the wall time spent in its own per-step methods."""

    spent = 0.0

    def _timed(name):
        def method(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return getattr(hf_freeze.FreezeCallback, name)(self, *args, **kwargs)
            finally:
                TimedFreezeCallback.spent += time.perf_counter() - t
        return method

    on_step_begin = _timed("on_step_begin")
    on_step_end = _timed("on_step_end")
    on_log = _timed("on_log")
    on_substep_end = _timed("on_substep_end")
    on_pre_optimizer_step = _timed("on_pre_optimizer_step")
    on_optimizer_step = _timed("on_optimizer_step")


def trainer_steps(kind: str, path, steps: int, batch: int, size: int, warmup: int, setup: dict,
                  reference: Reference) -> list[tuple]:
    model = load(path)
    clock = StepClock(reference)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0, seed=0)
    data = Batches(batch * steps, size)
    if kind in ("hf_freeze", "hf_freeze_cache"):
        trainer = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=data, freeze_policy="backbone",
                                          callbacks=[clock], feature_cache="memory" if kind == "hf_freeze_cache" else "off")
    elif kind == "callback":
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[TimedFreezeCallback("backbone"), clock])
    elif kind == "manual":
        hf_freeze.apply_policy(model, "backbone")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    elif kind == "classic":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    else:
        raise ValueError(kind)
    start = time.perf_counter()
    trainer.train()
    setup.setdefault(kind, []).append(clock.first_begin - start)
    return clock.samples[warmup:]


def raw_steps(kind: str, path, steps: int, batch: int, size: int, warmup: int, reference: Reference) -> list[tuple]:
    """Training steps without the Trainer: ``step`` (policy "backbone") or ``full`` (nothing frozen)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(path).to(device)
    hf_freeze.apply_policy(model, "backbone" if kind == "step" else "none")
    data = Batches(batch, size)
    x, y = data.x.to(device), data.y.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(steps):
        start = now()
        model.train()
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = now()
        times.append((end[0] - start[0], end[1] - start[1], *reference.time()))
    return times[warmup:]


def inference_steps(path, steps: int, batch: int, size: int, warmup: int, reference: Reference) -> list[tuple]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(path).eval().to(device)
    x = Batches(batch, size).x.to(device)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = now()
            model(pixel_values=x)
            end = now()
            times.append((end[0] - start[0], end[1] - start[1], *reference.time()))
    return times[warmup:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    path = shared_dir(a.shared) / "models" / "mobilenet_v2_1.0_224-imagenet"
    if not path.is_dir():
        print(f"skipped: real MobileNetV2 not found at {path}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    kinds = ["inference", "step", "full", "hf_freeze", "hf_freeze_cache", "callback", "manual", "classic"]
    setup: dict[str, list[float]] = {}
    reference = Reference(path, a.batch, a.size)
    samples = {k: [] for k in kinds}
    peak = {}
    callback_steps = 0
    for _ in range(a.rounds):  # interleave so machine noise hits every configuration alike
        for k in kinds:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if k == "inference":
                samples[k] += inference_steps(path, a.steps, a.batch, a.size, a.warmup, reference)
            elif k in ("step", "full"):
                samples[k] += raw_steps(k, path, a.steps, a.batch, a.size, a.warmup, reference)
            else:
                samples[k] += trainer_steps(k, path, a.steps, a.batch, a.size, a.warmup, setup, reference)
                callback_steps += a.steps if k == "callback" else 0
            if torch.cuda.is_available():
                peak[k] = torch.cuda.max_memory_allocated() / 2**20
    med = {k: statistics.median(x[0] for x in v) for k, v in samples.items()}
    med_cpu = {k: statistics.median(x[1] for x in v) for k, v in samples.items()}
    paired = {k: statistics.median(x[0] / x[2] for x in v) for k, v in samples.items()}
    paired_cpu = {k: statistics.median(x[1] / x[3] for x in v) for k, v in samples.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"MobileNetV2, {a.size} px, batch {a.batch}, {device}, "
          f"{a.rounds} x {a.steps - a.warmup - 1} timed steps each (median s/step)")
    for k in kinds:
        mem = f"   peak GPU memory {peak[k]:.0f} MiB" if k in peak else ""
        print(f"  {k:<15} {med[k]:.4f} s   x{med[k] / med['inference']:.3f} of inference forward{mem}   "
              f"CPU time {med_cpu[k]:.4f} s  x{med_cpu[k] / med_cpu['inference']:.3f}   "
              f"paired to the reference forward: x{paired[k]:.3f} wall, x{paired_cpu[k]:.3f} CPU")
    overhead = (med["callback"] - med["manual"]) / med["manual"]
    self_time = TimedFreezeCallback.spent / callback_steps / med["callback"]
    print(f"head-only training step (model compute) / inference forward: {med['step'] / med['inference']:.3f}  (target <= 1.05)")
    print(f"head-only step / full fine-tuning step: {med['step'] / med['full']:.3f}")
    print(f"FreezeTrainer step / inference forward (Trainer overhead included): {med['hf_freeze'] / med['inference']:.3f}")
    print(f"FreezeTrainer step / classic requires_grad=False Trainer step: {med['hf_freeze'] / med['classic']:.3f}")
    print(f"callback overhead per step: {100 * self_time:.3f}% in its own methods; end to end {100 * overhead:+.2f}% "
          "(callback vs manual, includes noise)  (target < 1%)")
    setup_med = {k: statistics.median(v) for k, v in setup.items()}
    print(f"train() set-up before the first step: cache on {setup_med['hf_freeze_cache']:.3f} s, "
          f"off {setup_med['hf_freeze']:.3f} s")
    if a.json:
        provenance = {"measured": datetime.date.today().isoformat(), "device": device, "size": a.size, "batch": a.batch,
                      "steps": a.steps, "rounds": a.rounds, "torch": torch.__version__, "cpu": platform.machine(),
                      "load_avg": os.getloadavg()}
        Path(a.json).write_text(json.dumps({"median_s": med, "median_cpu_s": med_cpu, "paired_ratio": paired,
                                            "paired_ratio_cpu": paired_cpu, "setup_s": setup_med, "peak_mib": peak,
                                            "callback_self_time": self_time, "callback_end_to_end": overhead,
                                            "provenance": provenance}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
