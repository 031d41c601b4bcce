"""Helpers shared by the benchmark scripts (fit_speed.py, inference_speed.py, calibration.py).

Not a benchmark itself; the scripts import it as ``from _common import ...`` (they put
their own folder on ``sys.path`` first, since they are run as ``python benchmarks/<script>.py``).
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- environment
def disable_persistent_cache():
    """In-process fits: no persistent compilation cache (call before lmmjax is imported)."""
    for k in ("JAX_COMPILATION_CACHE_DIR", "LMMJAX_CACHE_DIR"):
        os.environ.pop(k, None)
    os.environ["LMMJAX_COMPILATION_CACHE"] = "0"


def clean_env():
    """os.environ without any persistent-compilation-cache settings (JAX's or lmmjax's) or XLA_FLAGS."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE",
                         "LMMJAX_CACHE", "LMMJAX_COMPILATION_CACHE")):
            del env[k]
    env.pop("XLA_FLAGS", None)
    return env


def cold_env():
    """A true cold start: no persistent compilation cache, neither JAX's nor lmmjax's."""
    env = clean_env()
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["LMMJAX_COMPILATION_CACHE"] = "0"
    return env


def use_rscript(no_r: bool, what: str) -> bool:
    """Whether to run R: not switched off and Rscript on the PATH (else says it skips `what`)."""
    use_r = not no_r and shutil.which("Rscript") is not None
    if not no_r and not use_r:
        print(f"Rscript not found: skipping {what}", file=sys.stderr)
    return use_r


# ----------------------------------------------------------------------------- timing
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def wall(cmd, env=None, timeout=None, tail=2000):
    """Run `cmd`, return (wall seconds, stdout); raise with the last `tail` characters of stderr on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-tail:]}")
    return dt, p.stdout


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events)."""

    def __init__(self):
        import jax

        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kw):
        if "backend_compile" in event:
            self.n += 1


def stderr_log(t_start: float):
    """A progress logger: `[  12.3s] msg` on stderr, seconds since `t_start`."""
    return lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def sleepstudy():
    import pandas as pd

    import lmmjax

    df = lmmjax.datasets.sleepstudy()
    return pd.DataFrame({"Reaction": df["Reaction"].to_numpy(float),
                         "Days": df["Days"].to_numpy(float),
                         "Subject": df["Subject"].astype(str).to_numpy()})


def write_csvs(ds, tmp: Path):
    """Make each design's data and write it to tmp/<name>.csv (sets d.n and d.csv)."""
    for d in ds:
        df = d.make()
        d.n = len(df)
        d.csv = tmp / f"{d.name}.csv"
        df.to_csv(d.csv, index=False, float_format="%.17g")


# ----------------------------------------------------------------------------- report
def machine_info(python: bool = True) -> str:
    """'date, host, N cores, [python X, ]jax Y, lmmjax Z' for a report's first line."""
    import jax

    import lmmjax

    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, "
            + (f"python {platform.python_version()}, " if python else "")
            + f"jax {jax.__version__}, lmmjax {lmmjax.__version__}")


def git_state() -> str:
    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "lmmjax"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"commit {head}" + (" + uncommitted changes in lmmjax/" if dirty else "")


def text_table(hdr, rows):
    """Aligned plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(hdr)]
    line = lambda cells: "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                                    for i, (c, wd) in enumerate(zip(cells, widths)))
    return [line(hdr), line(["-" * x for x in widths])] + [line(r) for r in rows]


def save_report(text: str, out: Path):
    """Print the report and save it to `out`."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nsaved to {out}", file=sys.stderr)
