"""Inference-speed benchmark: lmmjax Satterthwaite / Kenward-Roger t tables vs lmerTest / pbkrtest.

    python benchmarks/inference_speed.py            # sleepstudy + sim5k (~5 min)
    python benchmarks/inference_speed.py --no-r     # lmmjax only
    python benchmarks/inference_speed.py --reps 9   # more lmmjax warm repetitions

See benchmarks/README_inference.md for what is measured.  The table is printed and
saved to benchmarks/results/inference_speed.txt.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CompileCounter, cold_env, disable_persistent_cache, git_state, machine_info,  # noqa: E402
                     median, save_report, sleepstudy, stderr_log, use_rscript, wall, write_csvs)
from _common import text_table as _table  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "inference_speed.txt"
SEED = 20240612

KR_SPEEDUP_TARGET = 20.0   # pbkrtest KR (warm) / lmmjax KR (warm), on the larger design
R_TIMEOUT = 900.0          # seconds per Rscript
R_KR_BUDGET = 240.0        # seconds of R Kenward-Roger timing per design (reps reduced to fit)


# ----------------------------------------------------------------------------- designs
@dataclass
class Design:
    name: str
    formula: str
    factors: tuple[str, ...]  # columns read as factors (R) / categoricals (lmmjax)
    make: callable
    csv: Path | None = None
    n: int = 0
    res: dict = field(default_factory=dict)


def sim_between(n_subj: int, n_obs: int, seed: int) -> pd.DataFrame:
    """Random intercept + slope per subject; grp a 2-level between-subject factor (half each)."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subj), n_obs)
    grp_s = np.where(rng.permutation(n_subj) < n_subj // 2, "A", "B")
    grp = grp_s[subj]
    x = rng.normal(size=subj.size)
    cov = np.array([[1.0, 0.3 * 1.0 * 0.5], [0.3 * 1.0 * 0.5, 0.25]])
    b = rng.multivariate_normal([0.0, 0.0], cov, size=n_subj)
    isb = (grp == "B").astype(float)
    y = (1.0 + 0.5 * x + 0.3 * isb + 0.2 * x * isb + b[subj, 0] + b[subj, 1] * x
         + rng.normal(scale=1.5, size=subj.size))
    width = len(str(n_subj - 1))
    return pd.DataFrame({"y": y, "x": x, "grp": grp,
                         "subject": np.array([f"s{i:0{width}d}" for i in range(n_subj)])[subj]})


def designs() -> list[Design]:
    return [
        Design("sleepstudy", "Reaction ~ Days + (Days | Subject)", ("Subject",), sleepstudy),
        Design("sim5k", "y ~ x * grp + (1 + x | subject)", ("grp", "subject"),
               lambda: sim_between(100, 50, SEED)),
    ]


def read_data(d: Design) -> pd.DataFrame:
    """What the cold subprocesses and R read: the CSV, factor columns as categoricals."""
    df = pd.read_csv(d.csv, dtype={g: str for g in d.factors})
    for g in d.factors:
        df[g] = df[g].astype("category")
    return df


# ----------------------------------------------------------------------------- lmmjax
LMMJAX_COLD = """\
import warnings
import pandas as pd, lmmjax
warnings.simplefilter("ignore")
d = pd.read_csv({csv!r}, dtype={dtypes!r})
m = lmmjax.lmer({formula!r}, data=d, reml=True)
s = m.coef_table("satterthwaite")
k = m.coef_table("kenward-roger")
print(s.to_string()); print(k.to_string())
print("OK")
"""


def lmmjax_cold(d: Design, reps: int) -> list[float]:
    code = LMMJAX_COLD.format(csv=str(d.csv), dtypes={g: "category" for g in d.factors}, formula=d.formula)
    times = []
    for _ in range(reps):
        dt, out = wall([sys.executable, "-c", code], env=cold_env(), timeout=600, tail=3000)
        if "OK" not in out:
            raise RuntimeError(f"lmmjax cold run failed:\n{out[-1000:]}")
        times.append(dt)
    return times


def lmmjax_warm(d: Design, df: pd.DataFrame, reps: int, counter: CompileCounter) -> dict:
    import lmmjax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmmjax.SingularFitWarning)
        c0 = counter.n
        t0 = time.perf_counter()
        m = lmmjax.lmer(d.formula, data=df, reml=True)
        t1 = time.perf_counter()
        m.coef_table("satterthwaite")
        t2 = time.perf_counter()
        m.coef_table("kenward-roger")
        t3 = time.perf_counter()
        first = dict(fit=t1 - t0, satt=t2 - t1, kr=t3 - t2, compiles=counter.n - c0)
        c0 = counter.n
        fit_t, satt_t, kr_t = [], [], []
        for _ in range(reps):
            # gc.collect() before each timed call, as R's system.time(gcFirst = TRUE): otherwise an
            # occasional full collection (~50 ms in this process) lands inside a few-ms call
            gc.collect()
            t0 = time.perf_counter()
            m = lmmjax.lmer(d.formula, data=df, reml=True)   # new object: no model-level caches
            fit_t.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            satt = m.coef_table("satterthwaite")
            satt_t.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            kr = m.coef_table("kenward-roger")
            kr_t.append(time.perf_counter() - t0)
        recompiles = counter.n - c0
    return dict(first=first, fit=median(fit_t), satt=median(satt_t), kr=median(kr_t),
                satt_all=satt_t, kr_all=kr_t, recompiles=recompiles, satt_table=satt, kr_table=kr,
                loglik=float(m.loglik), singular=bool(m.is_singular), converged=bool(m.converged))


# ----------------------------------------------------------------------------- R
R_WARM = r"""
suppressPackageStartupMessages({{library(lmerTest); library(pbkrtest)}})
d <- read.csv("{csv}")
for (g in c({factors})) d[[g]] <- factor(d[[g]])
f <- {formula}
el <- function(expr) system.time(expr)[["elapsed"]]
fit <- lme4::lmer(f, data = d, REML = TRUE)
ft <- as_lmerModLmerTest(fit)
p <- length(lme4::fixef(fit))
L <- diag(p)
pbkr <- function() {{
  V <- pbkrtest::vcovAdj(fit)
  sapply(seq_len(p), function(i) pbkrtest::Lb_ddf(L[i, ], vcov(fit), V))
}}
# warm-up (the KR warm-up also sizes the number of KR repetitions)
invisible(summary(ft, ddf = "Satterthwaite"))
invisible(as_lmerModLmerTest(fit))
t_kr1 <- el(invisible(pbkr()))
t_krs1 <- el(sk <- summary(ft, ddf = "Kenward-Roger"))
reps_kr <- max(1L, min({reps_kr}L, floor({kr_budget} / (t_kr1 + t_krs1))))
satt_summary <- sapply(seq_len({reps}), function(i) el(ss <- summary(ft, ddf = "Satterthwaite")))
satt_full <- sapply(seq_len({reps}), function(i) el(summary(as_lmerModLmerTest(fit), ddf = "Satterthwaite")))
kr_pbkrtest <- sapply(seq_len(reps_kr), function(i) el(invisible(pbkr())))
kr_summary <- sapply(seq_len(reps_kr), function(i) el(sk <- summary(ft, ddf = "Kenward-Roger")))
ss <- summary(ft, ddf = "Satterthwaite")
sk <- summary(ft, ddf = "Kenward-Roger")
df_pb <- pbkr()
cat("TIMES_satt_summary", satt_summary, "\n")
cat("TIMES_satt_full", satt_full, "\n")
cat("TIMES_kr_pbkrtest", kr_pbkrtest, "\n")
cat("TIMES_kr_summary", kr_summary, "\n")
cat("TIMES_kr_warmup", t_kr1, t_krs1, "\n")
cat("LOGLIK", format(as.numeric(logLik(fit)), digits = 17), "\n")
cat("THETA", format(lme4::getME(fit, "theta"), digits = 17), "\n")
cat("KRDF_pbkrtest", format(df_pb, digits = 17), "\n")
cat("VERSIONS", as.character(packageVersion("lme4")), as.character(packageVersion("lmerTest")),
    as.character(packageVersion("pbkrtest")), "\n")
cat("SATT_TABLE\n"); write.csv(format(as.data.frame(coef(ss)), digits = 17), stdout())
cat("KR_TABLE\n"); write.csv(format(as.data.frame(coef(sk)), digits = 17), stdout())
cat("END\n")
"""

R_COLD = """\
suppressPackageStartupMessages(library(lmerTest))
d <- read.csv("{csv}")
for (g in c({factors})) d[[g]] <- factor(d[[g]])
fit <- lmer({formula}, data = d, REML = TRUE)
print(coef(summary(fit, ddf = "Satterthwaite")))
print(coef(summary(fit, ddf = "Kenward-Roger")))
"""


def _r_args(d: Design):
    return dict(csv=str(d.csv), factors=", ".join(f'"{g}"' for g in d.factors), formula=d.formula)


def _run_r(script: str) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(script)
    try:
        return wall(["Rscript", f.name], timeout=R_TIMEOUT, tail=3000)
    finally:
        os.unlink(f.name)


def _r_table(block: str) -> pd.DataFrame:
    t = pd.read_csv(io.StringIO(block), index_col=0)
    t.columns = ["estimate", "se", "df", "t", "p"]
    return t.astype(float)


def r_warm(d: Design, reps: int, reps_kr: int) -> dict:
    _, out = _run_r(R_WARM.format(reps=reps, reps_kr=reps_kr, kr_budget=R_KR_BUDGET, **_r_args(d)))
    head, rest = out.split("SATT_TABLE\n", 1)
    satt_block, rest = rest.split("KR_TABLE\n", 1)
    kr_block = rest.split("END\n", 1)[0]
    lines = {ln.split()[0]: ln.split()[1:] for ln in head.splitlines() if ln.strip()}
    r = {k[len("TIMES_"):]: [float(x) for x in v] for k, v in lines.items() if k.startswith("TIMES_")}
    r = {k: dict(all=v, med=median(v)) for k, v in r.items()}
    r["loglik"] = float(lines["LOGLIK"][0])
    r["theta"] = np.array([float(x) for x in lines["THETA"]])
    r["versions"] = lines["VERSIONS"]
    r["kr_df_pbkrtest"] = np.array([float(x) for x in lines["KRDF_pbkrtest"]])
    r["satt_table"] = _r_table(satt_block)
    r["kr_table"] = _r_table(kr_block)
    return r


def r_cold(d: Design) -> float:
    dt, out = _run_r(R_COLD.format(**_r_args(d)))
    if "Pr(>|t|)" not in out:
        raise RuntimeError(f"R cold run printed no table:\n{out[-1000:]}")
    return dt


# ----------------------------------------------------------------------------- comparison
def lmmjax_at_theta(d: Design, df: pd.DataFrame, theta: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lmmjax evaluated at lme4's θ (no optimization): isolates the inference code from
    optimizer differences (SEs and dfs move to first order with θ̂)."""
    import lmmjax

    m = lmmjax.lmer(d.formula, data=df, reml=True, theta=theta, warn=False)
    return m.coef_table("satterthwaite"), m.coef_table("kenward-roger")


def compare(jt: pd.DataFrame, rt: pd.DataFrame) -> dict:
    """max |a-b| and max |a-b|/|b| over coefficients, for estimate, se, df, p."""
    if list(jt.index) != list(rt.index):
        raise RuntimeError(f"coefficient names differ: lmmjax {list(jt.index)} vs R {list(rt.index)}")
    out = {}
    for c in ("estimate", "se", "df", "p"):
        a, b = jt[c].to_numpy(float), rt[c].to_numpy(float)
        out[c] = (float(np.max(np.abs(a - b))), float(np.max(np.abs(a - b) / np.abs(b))))
    return out


# ----------------------------------------------------------------------------- report
def fmt_s(x):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if x < 0.1:
        return f"{x * 1000:.1f}ms"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(a, b):
    if a is None or b is None or np.isnan(a) or np.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


def report(ds: list[Design], args, wall_total: float) -> str:
    out = []
    w = out.append
    rv = next((d.res["r"]["versions"] for d in ds if "r" in d.res), None)
    w(f"lmmjax inference speed  ({machine_info()}"
      + (f"; R lme4 {rv[0]}, lmerTest {rv[1]}, pbkrtest {rv[2]})" if rv else ")"))
    w(f"lmmjax source: {git_state()}")
    w("wall clock; lmmjax warm = median over refits (new model object each time) of coef_table(ddf) alone; "
      "R = median inside one R process after warm-up")
    w("")
    hdr = ["design", "n", "method", "jax warm", "R: table", "R: full", "table/jax", "full/jax"]
    rows = []
    for d in ds:
        j, r = d.res.get("jax", {}), d.res.get("r", {})
        rows.append([d.name, str(d.n), "Satterthwaite", fmt_s(j.get("satt")),
                     fmt_s(r.get("satt_summary", {}).get("med")), fmt_s(r.get("satt_full", {}).get("med")),
                     fmt_ratio(r.get("satt_summary", {}).get("med"), j.get("satt")),
                     fmt_ratio(r.get("satt_full", {}).get("med"), j.get("satt"))])
        rows.append(["", "", "Kenward-Roger", fmt_s(j.get("kr")),
                     fmt_s(r.get("kr_summary", {}).get("med")), fmt_s(r.get("kr_pbkrtest", {}).get("med")),
                     fmt_ratio(r.get("kr_summary", {}).get("med"), j.get("kr")),
                     fmt_ratio(r.get("kr_pbkrtest", {}).get("med"), j.get("kr"))])
    out.extend(_table(hdr, rows))
    w("R: table = lmerTest summary(fit, ddf=...) on a lmerModLmerTest object (Satterthwaite: the "
      "Hessian/Jacobian were already")
    w("           computed when the object was made; Kenward-Roger: lmerTest calls pbkrtest::vcovAdj once "
      "per coefficient)")
    w("R: full  = Satterthwaite: as_lmerModLmerTest(fit) + summary (numDeriv Hessian + Jacobian + table); "
      "Kenward-Roger:")
    w("           pbkrtest alone, vcovAdj(fit) once + Lb_ddf per coefficient")
    w("ratios = R / lmmjax warm, same run (> 1: lmmjax faster)")
    w("")
    hdr = ["design", "jax cold (fit + both tables)", "R cold", "jax first in-process (fit/satt/KR, compiles)",
           "jax warm fit", "recompiles"]
    rows = []
    for d in ds:
        j = d.res.get("jax", {})
        f = j.get("first", {})
        rows.append([d.name, fmt_s(d.res.get("jax_cold")) + "  (" + ", ".join(
            f"{t:.2f}" for t in d.res.get("jax_cold_all", [])) + ")",
            fmt_s(d.res.get("r_cold")),
            f"{f.get('fit', 0):.2f}/{f.get('satt', 0):.2f}/{f.get('kr', 0):.2f} s ({f.get('compiles', 0)})",
            fmt_s(j.get("fit")), str(j.get("recompiles", "-"))])
    out.extend(_table(hdr, rows))
    w("cold = fresh process (python -c / Rscript): imports, read CSV, fit, Satterthwaite + KR tables; "
      "no persistent compilation cache")
    w("")
    w("agreement with R (max over coefficients; abs / rel = |jax - R| / |R|); 'own fit' = each tool's "
      "optimum, 'at lme4 theta' = lmmjax evaluated at lme4's theta (lmer(..., theta=))")
    hdr = ["design", "method", "theta", "estimate", "se", "df", "p"]
    rows = []
    for d in ds:
        for meth, key in (("Satterthwaite", "satt_cmp"), ("Kenward-Roger", "kr_cmp")):
            for where, suffix in (("own fit", ""), ("at lme4 theta", "_theta")):
                c = d.res.get(key + suffix)
                if c is None:
                    continue
                rows.append([d.name if (meth, suffix) == ("Satterthwaite", "") else "",
                             meth if suffix == "" else "", where]
                            + [f"{c[k][0]:.1e} / {c[k][1]:.1e}" for k in ("estimate", "se", "df", "p")])
    if rows:
        out.extend(_table(hdr, rows))
    else:
        w("  (R not run)")
    w("")
    w("details:")
    for d in ds:
        j, r = d.res.get("jax", {}), d.res.get("r", {})
        w(f"  {d.name}: {d.formula}  (n = {d.n})")
        if j:
            w("      lmmjax warm satt " + ", ".join(fmt_s(t) for t in j["satt_all"])
              + "; KR " + ", ".join(fmt_s(t) for t in j["kr_all"])
              + f"; logLik {j['loglik']:.10f}, singular {j['singular']}, converged {j['converged']}")
        if r:
            w(f"      R logLik {r['loglik']:.10f}; " + "; ".join(
                f"{k} " + ", ".join(fmt_s(t) for t in r[k]["all"])
                for k in ("satt_summary", "satt_full", "kr_summary", "kr_pbkrtest", "kr_warmup") if k in r))
            jk = j.get("kr_table")
            if jk is not None:
                dd = np.max(np.abs(jk["df"].to_numpy() - r["kr_df_pbkrtest"]) / r["kr_df_pbkrtest"])
                w(f"      KR df vs pbkrtest::Lb_ddf directly: max rel diff {dd:.1e}")
        if j:
            for meth, key in (("Satterthwaite", "satt_table"), ("Kenward-Roger", "kr_table")):
                t = j[key]
                w(f"      lmmjax {meth}:")
                for name, row in t.iterrows():
                    w(f"        {name:<12} est {row['estimate']:+.6g}  se {row['se']:.7g}  df {row['df']:.6g}  "
                      f"p {row['p']:.4g}")
    w("")
    w("target:")
    big = next((d for d in ds if d.name == "sim5k"), None)
    if big and "r" in big.res and "jax" in big.res:
        rk = big.res["r"]["kr_pbkrtest"]["med"] / big.res["jax"]["kr"]
        rs = big.res["r"]["kr_summary"]["med"] / big.res["jax"]["kr"]
        rmin = min(big.res["r"]["kr_pbkrtest"]["all"]) / min(big.res["jax"]["kr_all"])
        w(f"  KR >= {KR_SPEEDUP_TARGET:g}x faster than pbkrtest on sim5k (warm, medians): "
          f"{'PASS' if rk >= KR_SPEEDUP_TARGET else 'FAIL'} ({rk:.1f}x vs vcovAdj + Lb_ddf; "
          f"{rs:.1f}x vs lmerTest's KR summary; ratio of the fastest runs {rmin:.1f}x)")
        for where, key in (("own fits", "kr_cmp"), ("at lme4's theta", "kr_cmp_theta")):
            c = big.res[key]
            ok = c["se"][1] < 1e-6 and c["df"][1] < 1e-4
            w(f"  same KR numbers on sim5k, {where} (se rel < 1e-6, df rel < 1e-4): {'PASS' if ok else 'FAIL'} "
              f"(se {c['se'][1]:.1e}, df {c['df'][1]:.1e})")
    else:
        w("  not measured (--no-r or Rscript missing)")
    w(f"\ntotal benchmark wall time {wall_total:.0f} s")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-r", action="store_true", help="skip lmerTest / pbkrtest (Rscript)")
    p.add_argument("--reps", type=int, default=5, help="lmmjax warm repetitions (default 5)")
    p.add_argument("--cold-reps", type=int, default=3, help="lmmjax cold runs per design (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to save the report")
    args = p.parse_args(argv)

    # in-process: no persistent compilation cache either (set before lmmjax is imported)
    disable_persistent_cache()
    t_start = time.perf_counter()
    use_r = use_rscript(args.no_r, "R")
    log = stderr_log(t_start)
    ds = designs()
    tmp = Path(tempfile.mkdtemp(prefix="lmmjax_infbench_"))
    try:
        write_csvs(ds, tmp)
        counter = CompileCounter()
        for d in ds:
            log(f"{d.name}: lmmjax cold x{args.cold_reps}")
            cold = lmmjax_cold(d, args.cold_reps)
            d.res["jax_cold_all"], d.res["jax_cold"] = cold, median(cold)
            log(f"{d.name}: lmmjax warm")
            d.res["jax"] = lmmjax_warm(d, read_data(d), args.reps, counter)
            if use_r:
                log(f"{d.name}: R warm (lmerTest / pbkrtest)")
                r = d.res["r"] = r_warm(d, reps=5, reps_kr=5 if d.n < 1000 else 3)
                d.res["satt_cmp"] = compare(d.res["jax"]["satt_table"], r["satt_table"])
                d.res["kr_cmp"] = compare(d.res["jax"]["kr_table"], r["kr_table"])
                st, kt = lmmjax_at_theta(d, read_data(d), r["theta"])
                d.res["satt_cmp_theta"] = compare(st, r["satt_table"])
                d.res["kr_cmp_theta"] = compare(kt, r["kr_table"])
                log(f"{d.name}: R cold")
                d.res["r_cold"] = r_cold(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(ds, args, time.perf_counter() - t_start)
    save_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
