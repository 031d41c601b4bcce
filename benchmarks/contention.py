"""How much each tool slows down when the machine is busy with other work.

    python benchmarks/contention.py [--designs insteval,slopes] [--tools lmmjax,lmmjax-1cpu,mixedlm,lme4]
                                    [--load N] [--no-r]

Each tool fits each design twice in fresh subprocesses (``benchmarks/scale.py``'s runners:
a first fit, then a timed warm fit): once on an idle machine and once while ``--load``
busy-looping processes (default: one per CPU) compete for the CPUs.  The slowdown is
loaded warm time / idle warm time.  ``lmmjax-1cpu`` is lmmjax with
``LMMJAX_CPU_THREADS=1`` (:func:`lmmjax.set_cpu_threads`: its calls confined to one CPU).
Wall times are noisy on a shared machine; compare the slowdowns of tools in the same run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, text_table  # noqa: E402
from scale import FORMULAS, _has_r, make_data, run  # noqa: E402

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"


def timed(tool: str, csv: Path, name: str, load: int) -> dict | str:
    env_key = "LMMJAX_CPU_THREADS"
    old = os.environ.pop(env_key, None)
    if tool == "lmmjax-1cpu":
        os.environ[env_key] = "1"
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        return run("lmmjax" if tool.startswith("lmmjax") else tool, csv, name, 3600)
    finally:
        for b in busy:
            b.kill()
            b.wait()
        os.environ.pop(env_key, None)
        if old is not None:
            os.environ[env_key] = old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--designs", default="insteval,slopes")
    ap.add_argument("--tools", default="lmmjax,lmmjax-1cpu,mixedlm,lme4")
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per CPU)")
    ap.add_argument("--no-r", action="store_true")
    a = ap.parse_args()
    tools = [t for t in a.tools.split(",") if not (t == "lme4" and (a.no_r or not _has_r()))]
    print(machine_info())
    print(f"load: {a.load} busy-looping processes")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.designs.split(","):
            csv = make_data(name, Path(tmp))
            rows = []
            for t in tools:
                idle, busy = timed(t, csv, name, 0), timed(t, csv, name, a.load)
                if isinstance(idle, str) or isinstance(busy, str):
                    rows.append([t, str(idle)[:30] if isinstance(idle, str) else "", str(busy)[:30], ""])
                    continue
                rows.append([t, f"{idle['warm']:.2f}", f"{busy['warm']:.2f}", f"{busy['warm'] / idle['warm']:.2f}"])
            print(f"\n{name}: {FORMULAS[name]}")
            print("\n".join(text_table(["tool", "idle warm s", "loaded warm s", "slowdown"], rows)))


if __name__ == "__main__":
    main()
