"""What the preservation check costs: fingerprinting and verifying the frozen tensors of a real model.

Usage: python benchmarks/fingerprint_cost.py [--model PATH]   (default: the shared MobileNetV2)
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoModelForImageClassification

import hf_freeze
from hf_freeze.testing import shared_dir


def timed(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    path = a.model or shared_dir() / "models" / "mobilenet_v2_1.0_224-imagenet"
    if not path.exists():
        print(f"skipped: {path} not found")
        return 0
    model = AutoModelForImageClassification.from_pretrained(path)
    apply_s = timed(lambda: hf_freeze.apply_policy(model, "backbone"))
    state = hf_freeze.get_state(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    nbytes = sum(tensors[n].numel() * tensors[n].element_size() for n in state.fingerprint.digests)
    verify_s = timed(lambda: hf_freeze.verify_frozen(model))
    print(f"{path.name}: {len(state.fingerprint)} frozen tensors, {nbytes / 2**20:.1f} MiB")
    print(f"  apply_policy (groups + resolve + fingerprint): {apply_s * 1e3:.1f} ms")
    print(f"  verify_frozen: {verify_s * 1e3:.1f} ms  ({nbytes / 2**20 / verify_s:.0f} MiB/s)")
    print(f"  state kept: {len(state.fingerprint) * 16} bytes of digests (16 per tensor), no weight copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
