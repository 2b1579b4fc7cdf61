"""Two real CPU processes (torchrun, gloo): replicas stay identical through a mid-run unfreeze."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import identical

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), str(tmp_path), *extra]
    for _attempt in range(2):  # gloo occasionally aborts at process exit after the work is done
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode == 0 or all((tmp_path / f"rank{r}.pt").is_file() for r in (0, 1)):
            break
    assert all((tmp_path / f"rank{r}.pt").is_file() for r in (0, 1)), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_keep_replicas_identical_through_an_unfreeze(tmp_path):
    r0, r1 = torchrun(tmp_path)
    assert r0["world_size"] == 2
    assert r0["unfrozen"] == r1["unfrozen"] == {"stage.1": ("step 2", 0.5), "stage.0": ("step 4", 1.0)}
    params = [n for n in r0["final"] if not n.split(".")[-1].startswith(("running_", "num_batches"))]
    differing = [n for n in params if not identical(r0["final"][n], r1["final"][n])]
    assert differing == [], f"replicas diverged: {differing}"
    # later-unfrozen groups really trained (and, being identical on both ranks, were all-reduced)
    moved = [n for n in params if not identical(r0["final"][n], r0["pretrained"][n])]
    assert any(".stages.1." in n for n in moved) and any(".stages.0." in n for n in moved)
    # still-frozen tensors (stem, buffers included) are bit-identical to the pretrained ones on both ranks
    for r in (r0, r1):
        assert r["frozen"] and all(n.startswith("resnet.embedder.") for n in r["frozen"])
        stem = [n for n in r["final"] if n.startswith("resnet.embedder.")]
        assert [n for n in stem if not identical(r["final"][n], r["pretrained"][n])] == []
    # each rank saw different data (so identical replicas mean gradients were all-reduced)
    assert r0["first_batch"] != r1["first_batch"]
