"""Fit-speed benchmark: lmmjax vs statsmodels MixedLM vs lme4 (R).

    python benchmarks/fit_speed.py            # all five designs (~10 min)
    python benchmarks/fit_speed.py --quick    # sleepstudy and the two 10k designs
    python benchmarks/fit_speed.py --no-r --no-statsmodels

See benchmarks/README.md for what is measured.  The table is printed and saved
to benchmarks/results/fit_speed.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CompileCounter, clean_env, cold_env, disable_persistent_cache, git_state,  # noqa: E402
                     machine_info, median, save_report, sleepstudy, stderr_log, text_table, use_rscript,
                     wall, write_csvs)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fit_speed.txt"
SEED = 20240611

# Targets
WARM_SPEEDUP_TARGET = 5.0     # lme4 warm / lmmjax warm, every design
COLD_SLEEPSTUDY_TARGET = 3.0  # seconds, fresh process incl. summary

SM_TIMEOUT = 300.0            # seconds, per statsmodels subprocess
R_TIMEOUT = 900.0


# ----------------------------------------------------------------------------- designs
@dataclass
class Design:
    name: str
    formula: str              # lme4 syntax, used by lmmjax and lme4
    groups: tuple[str, ...]   # grouping columns (factors in R)
    crossed: bool
    big: bool                 # 100k rows: fewer repetitions
    make: callable
    csv: Path | None = None
    n: int = 0
    res: dict = field(default_factory=dict)


def _levels(prefix, k):
    width = len(str(k - 1))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(k)])


def _assign(rng, n, k):
    """Every level used, unbalanced sizes: a random permutation of a cyclic assignment
    for half the rows, uniform draws for the rest."""
    idx = np.concatenate([np.arange(n // 2) % k, rng.integers(0, k, n - n // 2)])
    return rng.permutation(idx)


def sim_slopes(n, k, seed):
    rng = np.random.default_rng(seed)
    g = _assign(rng, n, k)
    x = rng.normal(size=n)
    cov = np.array([[1.0, 0.3 * 1.0 * 0.5], [0.3 * 1.0 * 0.5, 0.25]])
    b = rng.multivariate_normal([0.0, 0.0], cov, size=k)
    y = 1.0 + 0.5 * x + b[g, 0] + b[g, 1] * x + rng.normal(scale=1.5, size=n)
    return pd.DataFrame({"y": y, "x": x, "g": _levels("g", k)[g]})


def sim_crossed(n, k1, k2, seed):
    rng = np.random.default_rng(seed)
    g1, g2 = _assign(rng, n, k1), _assign(rng, n, k2)
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + rng.normal(scale=1.0, size=k1)[g1]
         + rng.normal(scale=0.5, size=k2)[g2] + rng.normal(scale=1.5, size=n))
    return pd.DataFrame({"y": y, "x": x, "g1": _levels("a", k1)[g1], "g2": _levels("b", k2)[g2]})


SLOPES = "y ~ x + (1 + x | g)"
CROSSED = "y ~ x + (1 | g1) + (1 | g2)"


def designs(quick: bool) -> list[Design]:
    ds = [
        Design("sleepstudy", "Reaction ~ Days + (Days | Subject)", ("Subject",), False, False, sleepstudy),
        Design("sim10k_slopes", SLOPES, ("g",), False, False, lambda: sim_slopes(10_000, 200, SEED + 1)),
        Design("sim10k_crossed", CROSSED, ("g1", "g2"), True, False,
               lambda: sim_crossed(10_000, 300, 40, SEED + 2)),
        Design("sim100k_slopes", SLOPES, ("g",), False, True, lambda: sim_slopes(100_000, 1000, SEED + 3)),
        Design("sim100k_crossed", CROSSED, ("g1", "g2"), True, True,
               lambda: sim_crossed(100_000, 1000, 100, SEED + 4)),
    ]
    return ds[:3] if quick else ds


def read_data(d: Design) -> pd.DataFrame:
    """Exactly what the cold subprocesses and R read: the CSV, grouping columns as categoricals."""
    df = pd.read_csv(d.csv, dtype={g: str for g in d.groups})
    for g in d.groups:
        df[g] = df[g].astype("category")
    return df


# ----------------------------------------------------------------------------- helpers
def lmmjax_cache_support() -> bool:
    """Does ``import lmmjax`` switch on a persistent compilation cache (in $LMMJAX_CACHE_DIR)?"""
    with tempfile.TemporaryDirectory() as d:
        env = clean_env()
        env["LMMJAX_CACHE_DIR"] = d
        code = "import jax, lmmjax; print(jax.config.jax_compilation_cache_dir)"
        try:
            _, out = wall([sys.executable, "-c", code], env=env, timeout=120)
        except Exception:
            return False
        return out.strip().endswith(d)


# ----------------------------------------------------------------------------- lmmjax
LMMJAX_COLD = """\
import pandas as pd, lmmjax
d = pd.read_csv({csv!r}, dtype={dtypes!r})
m = lmmjax.lmer({formula!r}, data=d, reml=True)
print(m.summary())
"""


def lmmjax_cold(d: Design, reps: int, env=None) -> list[float]:
    code = LMMJAX_COLD.format(csv=str(d.csv), dtypes={g: "category" for g in d.groups}, formula=d.formula)
    times = []
    for _ in range(reps):
        dt, out = wall([sys.executable, "-c", code], env=env or cold_env(), timeout=600)
        if "Fixed effects" not in out:
            raise RuntimeError(f"lmmjax cold run printed no summary:\n{out[-1000:]}")
        times.append(dt)
    return times


def lmmjax_cached_cold(d: Design, cache_dir: str, lmmjax_cache: bool) -> float:
    """Persistent compilation cache (lmmjax's own if it has one, else JAX's, configured
    by environment variables): one fresh process populates an empty cache, a second one is timed."""
    env = clean_env()
    if lmmjax_cache:
        env["LMMJAX_CACHE_DIR"] = cache_dir
    else:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    lmmjax_cold(d, 1, env)
    return lmmjax_cold(d, 1, env)[0]


def lmmjax_warm(d: Design, df: pd.DataFrame, reps: int, counter: CompileCounter) -> dict:
    import lmmjax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c0 = counter.n
        t0 = time.perf_counter()
        m = lmmjax.lmer(d.formula, data=df, reml=True)
        first = time.perf_counter() - t0
        compiles_first = counter.n - c0
        c0 = counter.n
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            m2 = lmmjax.lmer(d.formula, data=df, reml=True)
            times.append(time.perf_counter() - t0)
        recompiles_same = counter.n - c0
        # same design shape, new response: must reuse the compiled criterion
        yname = d.formula.split("~")[0].strip()
        df2 = df.copy()
        df2[yname] = df2[yname] + np.random.default_rng(0).normal(scale=0.1 * df2[yname].std(), size=len(df2))
        c0 = counter.n
        lmmjax.lmer(d.formula, data=df2, reml=True)
        recompiles_newy = counter.n - c0
    return dict(first=first, warm=median(times), times=times, loglik=float(m.loglik),
                compiles_first=compiles_first, recompiles=recompiles_same + recompiles_newy,
                converged=bool(m.converged), deterministic=m2.loglik == m.loglik,
                iterations=int(m.optinfo.iterations), evaluations=int(m.optinfo.evaluations))


# ----------------------------------------------------------------------------- statsmodels
SM_WORKER = """\
import json, sys, time, warnings
import numpy as np, pandas as pd
import statsmodels.formula.api as smf
warnings.simplefilter("ignore")
csv, yname, xname, groups, reps, warmup = json.loads(sys.argv[1])
df = pd.read_csv(csv, dtype={g: str for g in groups})
def fit():
    if len(groups) == 1:
        g = groups[0]
        return smf.mixedlm(f"{yname} ~ {xname}", df, groups=df[g], re_formula=f"~{xname}").fit(reml=True)
    one = np.ones(len(df))
    vc = {g: f"0 + C({g})" for g in groups}
    # re_formula="0": no random intercept for the single all-ones group (same model as lme4's)
    return smf.mixedlm(f"{yname} ~ {xname}", df, groups=one, re_formula="0", vc_formula=vc).fit(reml=True)
if warmup:
    fit()
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    r = fit()
    times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps(dict(times=times, loglik=float(r.llf), converged=bool(r.converged))))
"""


def statsmodels_fit(d: Design, reps: int, warmup: bool) -> dict:
    yname = d.formula.split("~")[0].strip()
    xname = d.formula.split("~")[1].split("+")[0].strip()
    arg = json.dumps([str(d.csv), yname, xname, list(d.groups), reps, warmup])
    try:
        _, out = wall([sys.executable, "-c", SM_WORKER, arg], timeout=SM_TIMEOUT)
    except subprocess.TimeoutExpired:
        return dict(skipped=f"timeout > {SM_TIMEOUT:.0f} s")
    r = json.loads(out.split("RESULT ", 1)[1])
    r["time"] = median(r["times"])
    return r


# ----------------------------------------------------------------------------- lme4
R_WARM = """\
suppressPackageStartupMessages(library(lme4))
d <- read.csv("{csv}")
for (g in c({groups})) d[[g]] <- factor(d[[g]])
f <- {formula}
fit <- lmer(f, data = d, REML = TRUE)
times <- numeric(0)
for (i in seq_len({reps})) {{
  times <- c(times, system.time(fit <- lmer(f, data = d, REML = TRUE))[["elapsed"]])
}}
cat("TIMES", times, "\\n")
cat("LOGLIK", format(as.numeric(logLik(fit)), digits = 17), "\\n")
cat("CONV", length(fit@optinfo$conv$lme4$messages) == 0, "\\n")
"""

R_COLD = """\
suppressPackageStartupMessages(library(lme4))
d <- read.csv("{csv}")
for (g in c({groups})) d[[g]] <- factor(d[[g]])
fit <- lmer({formula}, data = d, REML = TRUE)
print(summary(fit))
"""


def _r_args(d: Design):
    return dict(csv=str(d.csv), groups=", ".join(f'"{g}"' for g in d.groups), formula=d.formula)


def lme4_warm(d: Design, reps: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(R_WARM.format(reps=reps, **_r_args(d)))
    try:
        _, out = wall(["Rscript", f.name], timeout=R_TIMEOUT)
    finally:
        os.unlink(f.name)
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.strip()}
    times = [float(t) for t in lines["TIMES"]]
    return dict(times=times, time=median(times), loglik=float(lines["LOGLIK"][0]),
                converged=lines["CONV"][0] == "TRUE")


def lme4_cold(d: Design, reps: int) -> list[float]:
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(R_COLD.format(**_r_args(d)))
    try:
        times = []
        for _ in range(reps):
            dt, out = wall(["Rscript", f.name], timeout=R_TIMEOUT)
            if "Fixed effects" not in out:
                raise RuntimeError(f"R cold run printed no summary:\n{out[-1000:]}")
            times.append(dt)
    finally:
        os.unlink(f.name)
    return times


# ----------------------------------------------------------------------------- report
def fmt_s(x):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(a, b):
    if a is None or b is None or np.isnan(a) or np.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.1f}x"


def fmt_d(a, b):
    if a is None or b is None:
        return "-"
    return f"{a - b:+.1e}"


def report(ds: list[Design], args, wall_total: float) -> str:
    out = []
    w = out.append
    has_cached = any("jax_cached_cold" in d.res for d in ds)
    w(f"lmmjax fit speed  ({machine_info()})")
    w(f"lmmjax source: {git_state()}")
    w("times in seconds (wall clock); warm = median of in-process refits; cold = fresh process incl. "
      "import/JIT/summary, no persistent cache; ratios > 1 mean lmmjax is faster")
    if has_cached:
        w("jax cached = fresh process after one earlier process populated the persistent compilation cache ("
          + ("lmmjax's own, $LMMJAX_CACHE_DIR" if args.lmmjax_cache else "JAX's, $JAX_COMPILATION_CACHE_DIR") + ")")
    w("")
    hdr = ["design", "n", "jax cold"] + (["jax cached"] if has_cached else []) + ["jax warm", "statsm", "lme4 warm", "lme4 cold",
           "lme4w/jaxw", "sm/jaxw", "lme4c/jaxc", "dLL lme4", "dLL sm"]
    rows = []
    for d in ds:
        r = d.res
        jc, jw = r.get("jax_cold"), r.get("jax", {}).get("warm")
        sm = r.get("sm", {})
        smt = sm.get("time")
        lw = r.get("lme4", {}).get("time")
        lc = r.get("lme4_cold")
        ll = r.get("jax", {}).get("loglik")
        rows.append([
            d.name, str(d.n), fmt_s(jc)] + ([fmt_s(r.get("jax_cached_cold"))] if has_cached else []) + [
            fmt_s(jw),
            fmt_s(smt) if smt is not None else ("skip" if "skipped" in sm else "-"),
            fmt_s(lw), fmt_s(lc), fmt_ratio(lw, jw), fmt_ratio(smt, jw), fmt_ratio(lc, jc),
            fmt_d(ll, r.get("lme4", {}).get("loglik")), fmt_d(ll, sm.get("loglik")),
        ])
    out.extend(text_table(hdr, rows))
    w("dLL = logLik(lmmjax) - logLik(other), REML log-likelihoods")
    w("")
    w("details:")
    for d in ds:
        r = d.res
        j = r.get("jax", {})
        bits = [f"  {d.name}: {d.formula}"]
        if j:
            bits.append(f"lmmjax logLik {j['loglik']:.10f}, first fit {j['first']:.2f} s "
                        f"({j['compiles_first']} compiles), recompiles on refit {j['recompiles']}, "
                        f"{j['iterations']} L-BFGS iterations / {j['evaluations']} evaluations, "
                        f"converged {j['converged']}"
                        + ("" if j["deterministic"] else ", NOT deterministic across refits"))
        if "jax_cold_all" in r:
            bits.append("lmmjax cold runs " + ", ".join(f"{t:.2f}" for t in r["jax_cold_all"]))
        if "jax_cached_cold" in r:
            bits.append(f"lmmjax cached cold (persistent cache) {r['jax_cached_cold']:.2f} s")
        lm = r.get("lme4", {})
        if lm:
            rel = (j["loglik"] - lm["loglik"]) / abs(lm["loglik"]) if j else float("nan")
            bits.append(f"lme4 logLik {lm['loglik']:.10f} (rel diff {rel:+.1e}), converged "
                        f"{lm['converged']}, warm times " + ", ".join(f"{t:.3f}" for t in lm["times"]))
        if "lme4_cold_all" in r:
            bits.append("lme4 cold runs " + ", ".join(f"{t:.2f}" for t in r["lme4_cold_all"]))
        sm = r.get("sm", {})
        if "skipped" in sm:
            bits.append(f"statsmodels skipped: {sm['skipped']}")
        elif sm:
            rel = (j["loglik"] - sm["loglik"]) / abs(sm["loglik"]) if j else float("nan")
            bits.append(f"statsmodels logLik {sm['loglik']:.10f} (rel diff {rel:+.1e}), converged "
                        f"{sm['converged']}, times " + ", ".join(f"{t:.2f}" for t in sm["times"]))
        w(bits[0])
        for b in bits[1:]:
            w("      " + b)
    w("")
    w("targets:")
    ratios = [(d.name, d.res["lme4"]["time"] / d.res["jax"]["warm"]) for d in ds
              if "lme4" in d.res and "jax" in d.res]
    if ratios:
        ok = all(x >= WARM_SPEEDUP_TARGET for _, x in ratios)
        worst = min(ratios, key=lambda t: t[1])
        w(f"  warm fit >= {WARM_SPEEDUP_TARGET:g}x faster than lme4 on every design: "
          f"{'PASS' if ok else 'FAIL'} (lowest {worst[1]:.1f}x on {worst[0]})")
    else:
        w("  warm fit vs lme4: not measured (--no-r or Rscript missing)")
    sl = next((d for d in ds if d.name == "sleepstudy"), None)
    if sl and "jax_cold" in sl.res:
        c = sl.res["jax_cold"]
        w(f"  cold start sleepstudy (fresh process incl. summary) < {COLD_SLEEPSTUDY_TARGET:g} s: "
          f"{'PASS' if c < COLD_SLEEPSTUDY_TARGET else 'FAIL'} ({c:.2f} s, median of "
          f"{len(sl.res['jax_cold_all'])})")
        if "jax_cached_cold" in sl.res:
            c = sl.res["jax_cached_cold"]
            w(f"    with a populated persistent cache: {'PASS' if c < COLD_SLEEPSTUDY_TARGET else 'FAIL'} "
              f"({c:.2f} s)")
    rec = [d.name for d in ds if d.res.get("jax", {}).get("recompiles")]
    w(f"  no recompilation on refit of the same design shape: {'FAIL: ' + ', '.join(rec) if rec else 'PASS'}")
    w(f"\ntotal benchmark wall time {wall_total:.0f} s; mode: "
      + (", ".join(k for k, v in [("quick", args.quick), ("no-r", args.no_r),
                                 ("no-statsmodels", args.no_statsmodels),
                                 ("cached-cold", args.cached_cold)] if v) or "full"))
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only sleepstudy and the 10k designs")
    p.add_argument("--no-r", action="store_true", help="skip lme4 (Rscript)")
    p.add_argument("--no-statsmodels", action="store_true", help="skip statsmodels MixedLM")
    p.add_argument("--cached-cold", action="store_true",
                   help="also time a cold start with a populated persistent compilation cache "
                        "(automatic when lmmjax enables its own cache)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to save the report")
    args = p.parse_args(argv)

    # the in-process fits too: no persistent cache (set before lmmjax is imported)
    disable_persistent_cache()
    t_start = time.perf_counter()
    use_r = use_rscript(args.no_r, "lme4")
    ds = designs(args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="lmmjax_bench_"))
    args.lmmjax_cache = lmmjax_cache_support()
    cached = args.cached_cold or args.lmmjax_cache
    log = stderr_log(t_start)
    try:
        write_csvs(ds, tmp)
        counter = CompileCounter()
        for d in ds:
            log(f"{d.name}: lmmjax cold")
            cold = lmmjax_cold(d, 3 if d.name == "sleepstudy" else 1)
            d.res["jax_cold_all"], d.res["jax_cold"] = cold, median(cold)
            if cached:
                log(f"{d.name}: lmmjax cached cold")
                d.res["jax_cached_cold"] = lmmjax_cached_cold(d, str(tmp / f"xla_cache_{d.name}"),
                                                              args.lmmjax_cache)
            log(f"{d.name}: lmmjax warm")
            d.res["jax"] = lmmjax_warm(d, read_data(d), 5, counter)
            if not args.no_statsmodels:
                if d.crossed and d.big:
                    d.res["sm"] = dict(skipped="too slow (single-group vc_formula, dense 100k x 1100)")
                else:
                    log(f"{d.name}: statsmodels")
                    small = not d.big and not d.crossed
                    d.res["sm"] = statsmodels_fit(d, 3 if small else 1, warmup=small)
            if use_r:
                log(f"{d.name}: lme4 warm")
                d.res["lme4"] = lme4_warm(d, 3 if d.big else 5)
                log(f"{d.name}: lme4 cold")
                rc = lme4_cold(d, 3 if d.name == "sleepstudy" else 1)
                d.res["lme4_cold_all"], d.res["lme4_cold"] = rc, median(rc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(ds, args, time.perf_counter() - t_start)
    save_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
