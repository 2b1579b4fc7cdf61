"""Start-up cost: ``python -c "import hf_freeze"`` and ``hf-freeze --help``, and which heavy modules they load.

Each command runs ``--repeat`` times in a fresh interpreter; the figure is the median wall time of the whole
process, next to a bare ``python -c pass`` for the interpreter's own start-up. ``heavy_imported`` lists the
optional packages (and torch/transformers) that each command imports; peft, datasets, optuna, matplotlib,
timm and evaluate must stay lazy (imported only where they are used).

Usage: python benchmarks/import_time.py [--repeat 7] [--out benchmarks/results/import_time.json]
       python benchmarks/import_time.py --root ../other-checkout --out /tmp/before.json   (another version)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "optuna", "matplotlib", "timm", "evaluate")
REPORT = "import json, sys; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import hf_freeze'": ["-c", "import hf_freeze"],
    "hf-freeze --help": ["-m", "hf_freeze.cli", "--help"],
    "python -c 'from hf_freeze import FreezePolicy'": ["-c", "from hf_freeze import FreezePolicy"],
    "python -c 'from hf_freeze import FreezeTrainer'": ["-c", "from hf_freeze import FreezeTrainer"],
}


SOURCE = ROOT  # the checkout whose hf_freeze is measured (--root)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def wall_time(args: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), cwd=SOURCE)
        if proc.returncode != 0:
            raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
        times.append(time.perf_counter() - t)
    return times


def heavy_imported(args: list[str]) -> list[str]:
    """The HEAVY modules loaded once ``args`` has run (a module run with ``-m`` is read at interpreter exit)."""
    report = REPORT.format(heavy=HEAVY)
    if args[0] == "-m":
        code = (f"import atexit, runpy, sys\natexit.register(lambda: exec({report!r}))\n"
                f"sys.argv = {[args[1], *args[2:]]!r}\nrunpy.run_module({args[1]!r}, run_name='__main__')")
    else:
        code = f"{args[1]}\n{report}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=SOURCE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "import_time.json"))
    ap.add_argument("--root", default=str(ROOT), help="checkout whose hf_freeze to measure (default: this one)")
    a = ap.parse_args(argv)
    global SOURCE
    SOURCE = Path(a.root).resolve()
    results = {}
    for name, args in COMMANDS.items():
        times = wall_time(args, a.repeat)
        results[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                         "runs": a.repeat, "heavy_imported": heavy_imported(args)}
        print(f"{name:<52} median {results[name]['median_s']:.3f} s  (min {results[name]['min_s']:.3f} s)  "
              f"imports {', '.join(results[name]['heavy_imported']) or 'none of ' + '/'.join(HEAVY)}")
    lazy = [m for m in HEAVY if m not in ("torch", "transformers")]
    light = ("python -c 'import hf_freeze'", "hf-freeze --help")
    leaked = {k: [m for m in results[k]["heavy_imported"] if m in lazy] for k in light}
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews timings
           "source": "this checkout" if SOURCE == ROOT else str(SOURCE), "commands": results,
           "must_stay_lazy": lazy, "leaked": leaked}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 1 if any(leaked.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
