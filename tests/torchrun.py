"""Run a script of tests/scripts/ in two real CPU processes (torchrun, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_script(script: str, out: Path, *args: str, expect: list[str], nproc: int = 2, env: dict | None = None,
                    timeout: int = 900):
    """Run ``scripts/<script> <out> <args>`` under torchrun; ``expect``: files under ``out`` the run must write.

    gloo occasionally aborts at process exit after the work is done: one retry, then the files decide.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(SCRIPTS / script), str(out), *args]
    for _attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode == 0 or all((out / f).is_file() for f in expect):
            break
    missing = [f for f in expect if not (out / f).is_file()]
    assert not missing, f"{script} did not write {missing}:\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
