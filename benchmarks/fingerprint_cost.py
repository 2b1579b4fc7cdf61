"""What the preservation check costs: fingerprinting and verifying the frozen tensors of a real model.

Compares, in one process and interleaved (medians of ``--repeat`` rounds, one CPU thread):
* scheme 2 (current): BLAKE2b-128 over 16 KiB leaves, then over the leaf digests (split-independent);
* scheme 1 (hf_freeze <= 0.1): BLAKE2b-128 over each tensor's bytes in one pass;
* per-row digests (the rejected split-independent design: one hash call per dim-0 row, 1-D tensors per element).

Usage: python benchmarks/fingerprint_cost.py [--model PATH] [--out FILE]   (default: the shared MobileNetV2)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from shared_data import shared_dir
from transformers import AutoModelForImageClassification

import hf_freeze
from hf_freeze.fingerprint import digests, named_tensors


def per_row(tensors) -> dict[str, str]:
    out = {}
    for n, t in tensors.items():
        rows = t.detach().contiguous().reshape(t.shape[0] if t.dim() else 1, -1).view(torch.uint8).numpy()
        h = hashlib.blake2b(digest_size=16)
        for r in rows:
            h.update(hashlib.blake2b(r.data, digest_size=16).digest())
        out[n] = h.hexdigest()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args(argv)
    path = Path(a.model) if a.model else shared_dir() / "models" / "mobilenet_v2_1.0_224-imagenet"
    if not path.exists():
        print(f"skipped: {path} not found")
        return 0
    torch.set_num_threads(1)
    model = AutoModelForImageClassification.from_pretrained(path)
    hf_freeze.apply_policy(model, "backbone")
    state = hf_freeze.get_state(model)
    tensors = {n: t for n, t in named_tensors(model).items() if n in state.fingerprint.digests}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rows = sum(t.shape[0] if t.dim() else 1 for t in tensors.values())
    jobs = {"apply_policy (groups + resolve + fingerprint)": lambda: hf_freeze.apply_policy(model, "backbone"),
            "verify_frozen (scheme 2, current)": lambda: hf_freeze.verify_frozen(model),
            "digests, scheme 2 (16 KiB leaves)": lambda: digests(tensors, 2),
            "digests, scheme 1 (previous, one pass)": lambda: digests(tensors, 1),
            "digests, per-row (rejected design)": lambda: per_row(tensors)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(a.repeat):
        for k, fn in jobs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    lines = [f"{path.name}: {len(tensors)} frozen tensors, {nbytes / 2**20:.1f} MiB, {rows} dim-0 rows "
             f"(torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, 1 thread, median of {a.repeat}, "
             f"load average {os.getloadavg()[0]:.1f})"]
    for k, ts in times.items():
        s = statistics.median(ts)
        lines.append(f"  {k:<48} {s * 1e3:7.1f} ms  ({nbytes / 2**20 / s:5.0f} MiB/s)")
    lines.append(f"  state kept: {len(tensors) * 16} bytes of digests (16 per tensor), no weight copies")
    report = "\n".join(lines)
    print(report)
    if a.out:
        Path(a.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
