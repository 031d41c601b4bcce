"""Type I error calibration of fixed-effect t tests with few clusters.

    python benchmarks/calibration.py                 # 2000 data sets (~3-5 min)
    python benchmarks/calibration.py --quick         # 300 data sets
    python benchmarks/calibration.py --n 5000 --subjects 12 --no-r --no-statsmodels

Simulates `--subjects` subjects (default 8) x `--times` time points (default 6),
random intercept SD 1 and random slope SD 0.5 (uncorrelated), residual SD 1, a
between-subject 2-level `group` (half the subjects each) with true effect 0 and a
within-subject `time` slope with fixed effect 1; fits
`y ~ time + group + (1 + time | subject)` by REML with lmmjax and records the
p value of the `group` coefficient under ddf = "asymptotic" (Wald z),
"satterthwaite" and "kenward-roger".  statsmodels MixedLM (Wald z) runs on the
first `--sm-n` data sets; lmerTest (Satterthwaite, Kenward-Roger via pbkrtest)
on the first `--r-n`, to check that lmmjax's p values are R's on the same data,
singular fits included.  See benchmarks/README_inference.md.  The report is
printed and saved to benchmarks/results/calibration.txt.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as sst

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_state, machine_info, save_report, stderr_log  # noqa: E402
from _common import text_table as _table  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "calibration.txt"
SEED = 20240613
FORMULA = "y ~ time + group + (1 + time | subject)"
METHODS = ("asymptotic", "satterthwaite", "kenward-roger")
R_TIMEOUT = 1800.0


# ----------------------------------------------------------------------------- simulation
def base_frame(n_subj: int, n_times: int) -> pd.DataFrame:
    subj = np.repeat(np.arange(n_subj), n_times)
    width = len(str(n_subj - 1))
    return pd.DataFrame({
        "subject": pd.Categorical(np.array([f"s{i:0{width}d}" for i in range(n_subj)])[subj]),
        "time": np.tile(np.arange(n_times, dtype=float), n_subj),
        "group": pd.Categorical(np.where(subj < n_subj // 2, "A", "B")),
    })


def simulate_y(rng, base: pd.DataFrame, n_subj: int) -> np.ndarray:
    subj = base["subject"].cat.codes.to_numpy()
    t = base["time"].to_numpy()
    b0 = rng.normal(scale=1.0, size=n_subj)
    b1 = rng.normal(scale=0.5, size=n_subj)
    # fixed effects: intercept 0, time 1, group 0 (the null)
    return 1.0 * t + b0[subj] + b1[subj] * t + rng.normal(scale=1.0, size=t.size)


# ----------------------------------------------------------------------------- helpers
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = 1 - level
    lo = 0.0 if k == 0 else sst.beta.ppf(a / 2, k, n - k + 1)
    hi = 1.0 if k == n else sst.beta.ppf(1 - a / 2, k + 1, n - k)
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- lmmjax
def run_lmmjax(base: pd.DataFrame, ys: np.ndarray, log) -> dict:
    import lmmjax

    n = len(ys)
    p = {m: np.full(n, np.nan) for m in METHODS}
    df = {m: np.full(n, np.nan) for m in METHODS}
    t_tab = {m: 0.0 for m in METHODS}
    singular = np.zeros(n, bool)
    converged = np.zeros(n, bool)
    loglik = np.full(n, np.nan)
    errors = []
    t_first = None
    coef = None
    t_fit = 0.0
    t_all = time.perf_counter()
    data = base.copy()
    for i in range(n):
        data["y"] = ys[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lmmjax.SingularFitWarning)
                warnings.simplefilter("ignore", lmmjax.ConvergenceWarning)
                t0 = time.perf_counter()
                m = lmmjax.lmer(FORMULA, data=data, reml=True)
                t_fit += time.perf_counter() - t0
                singular[i], converged[i], loglik[i] = m.is_singular, m.converged, m.loglik
                if coef is None:
                    coef = [c for c in m.fixef.index if c.startswith("group")]
                    if len(coef) != 1:
                        raise RuntimeError(f"expected one group coefficient, got {list(m.fixef.index)}")
                    coef = coef[0]
                for meth in METHODS:
                    t0 = time.perf_counter()
                    tab = m.coef_table(meth)
                    t_tab[meth] += time.perf_counter() - t0
                    p[meth][i] = tab.loc[coef, "p"]
                    df[meth][i] = tab.loc[coef, "df"]
        except Exception as e:  # noqa: BLE001 - report, don't hide
            errors.append((i, f"{type(e).__name__}: {e}"))
        if i == 0:
            t_first = time.perf_counter() - t_all
        if (i + 1) % 500 == 0:
            log(f"lmmjax {i + 1}/{n}")
    return dict(p=p, df=df, t_fit=t_fit, t_tab=t_tab, wall=time.perf_counter() - t_all, singular=singular,
                converged=converged, loglik=loglik, errors=errors, coef=coef, t_first=t_first)


# ----------------------------------------------------------------------------- statsmodels
def run_statsmodels(base: pd.DataFrame, ys: np.ndarray, log) -> dict:
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    n = len(ys)
    pv = np.full(n, np.nan)
    conv = np.zeros(n, bool)
    boundary = np.zeros(n, bool)
    llf = np.full(n, np.nan)
    errors = []
    data = base.copy()
    data["group"] = data["group"].astype(str)
    data["subject"] = data["subject"].astype(str)
    t0 = time.perf_counter()
    for i in range(n):
        data["y"] = ys[i]
        try:
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                r = smf.mixedlm("y ~ time + group", data, groups=data["subject"],
                                re_formula="~time").fit(reml=True)
            msgs = [str(w.message) for w in ws]
            conv[i] = bool(r.converged) and not any(issubclass(w.category, ConvergenceWarning)
                                                   and "converge" in str(w.message).lower() for w in ws)
            boundary[i] = any("boundary" in m.lower() or "singular" in m.lower() for m in msgs)
            pv[i] = r.pvalues["group[T.B]"]
            llf[i] = r.llf
        except Exception as e:  # noqa: BLE001
            errors.append((i, f"{type(e).__name__}: {e}"))
        if (i + 1) % 100 == 0:
            log(f"statsmodels {i + 1}/{n}")
    return dict(p=pv, converged=conv, boundary=boundary, llf=llf, errors=errors, wall=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- R (agreement check)
R_SCRIPT = r"""
suppressPackageStartupMessages({{library(lmerTest); library(pbkrtest)}})
d <- read.csv("{csv}")
d$subject <- factor(d$subject); d$group <- factor(d$group)
ids <- sort(unique(d$id))
out <- data.frame(id = ids, p_satt = NA_real_, df_satt = NA_real_, p_kr = NA_real_, df_kr = NA_real_,
                  singular = NA, loglik = NA_real_, theta = NA_character_, t_satt = NA_real_, t_kr = NA_real_)
for (k in seq_along(ids)) {{
  dd <- d[d$id == ids[k], ]
  r <- try({{
    t0 <- proc.time()[["elapsed"]]
    fit <- suppressMessages(suppressWarnings(lmerTest::lmer(y ~ time + group + (1 + time | subject),
                                                            data = dd, REML = TRUE)))
    cs <- coef(summary(fit, ddf = "Satterthwaite"))
    t1 <- proc.time()[["elapsed"]]
    ck <- suppressWarnings(coef(summary(fit, ddf = "Kenward-Roger")))
    t2 <- proc.time()[["elapsed"]]
    out[k, c("p_satt", "df_satt", "p_kr", "df_kr")] <- c(cs["groupB", "Pr(>|t|)"], cs["groupB", "df"],
                                                        ck["groupB", "Pr(>|t|)"], ck["groupB", "df"])
    out$singular[k] <- isSingular(fit)
    out$loglik[k] <- as.numeric(logLik(fit))
    out$theta[k] <- paste(sprintf("%.17g", getME(fit, "theta")), collapse = ";")
    out$t_satt[k] <- t1 - t0
    out$t_kr[k] <- t2 - t1
  }}, silent = TRUE)
}}
num <- sapply(out, is.numeric)
out[num] <- lapply(out[num], function(x) sprintf("%.17g", x))
write.csv(out, "{out}", row.names = FALSE)
"""


def run_r(base: pd.DataFrame, ys: np.ndarray, tmp: Path) -> dict:
    long = pd.concat([base.assign(y=ys[i], id=i) for i in range(len(ys))], ignore_index=True)
    csv, out = tmp / "calib.csv", tmp / "calib_r.csv"
    long.to_csv(csv, index=False, float_format="%.17g")
    script = tmp / "calib.R"
    script.write_text(R_SCRIPT.format(csv=csv, out=out))
    t0 = time.perf_counter()
    p = subprocess.run(["Rscript", str(script)], capture_output=True, text=True, timeout=R_TIMEOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"Rscript failed:\n{p.stderr[-2000:]}")
    r = pd.read_csv(out)
    r["singular"] = r["singular"].astype(str).str.strip().str.upper() == "TRUE"
    return dict(table=r, wall=wall)


def lmmjax_at_r_theta(base: pd.DataFrame, ys: np.ndarray, rt: pd.DataFrame, coef: str) -> dict:
    """lmmjax evaluated at lme4's θ (lmer(..., theta=)): p and df for Satterthwaite and KR.
    Separates the inference code from optimizer differences (in these flat likelihoods the
    Satterthwaite df moves a lot with θ̂)."""
    import lmmjax

    m = len(rt)
    out = {k: np.full(m, np.nan) for k in ("p_satt", "df_satt", "p_kr", "df_kr")}
    data = base.copy()
    for i in range(m):
        th = rt["theta"].iloc[i]
        if not isinstance(th, str):
            continue
        data["y"] = ys[i]
        fit = lmmjax.lmer(FORMULA, data=data, reml=True, theta=np.array([float(x) for x in th.split(";")]),
                          warn=False)
        s, k = fit.coef_table("satterthwaite").loc[coef], fit.coef_table("kenward-roger").loc[coef]
        out["p_satt"][i], out["df_satt"][i], out["p_kr"][i], out["df_kr"][i] = s["p"], s["df"], k["p"], k["df"]
    return out


# ----------------------------------------------------------------------------- report
def report(args, res: dict, sm: dict | None, rr: dict | None, wall_total: float) -> str:
    n = args.n
    out = []
    w = out.append
    w(f"lmmjax type I error calibration  ({machine_info(python=False)}; {git_state()})")
    w(f"{n} data sets (seed {args.seed}): {args.subjects} subjects x {args.times} time points, "
      f"group = 2-level between-subject factor ({args.subjects // 2} + {args.subjects - args.subjects // 2} "
      f"subjects), true group effect 0")
    w(f"random intercept SD 1, random slope SD 0.5, corr 0, residual SD 1, time effect 1; "
      f"model {FORMULA}, REML; test of '{res['coef']}' (two-sided)")
    w("")
    j_ok = ~np.isnan(res["p"]["asymptotic"])
    n_sing, n_nc = int(res["singular"].sum()), int((~res["converged"]).sum())
    hdr = ["method", "alpha=0.05", "95% CI", "alpha=0.01", "95% CI ", "fits", "singular", "not conv",
           "failed/NaN", "median df", "total s", "ms/data set"]
    rows = []
    labels = {"asymptotic": "lmmjax Wald z (asymptotic)", "satterthwaite": "lmmjax Satterthwaite",
              "kenward-roger": "lmmjax Kenward-Roger"}

    def row(label, pv, nfits, sing, nc, total, per, dfs=None):
        ok = ~np.isnan(pv)
        k = int(ok.sum())
        r05, r01 = int((pv[ok] < 0.05).sum()), int((pv[ok] < 0.01).sum())
        lo5, hi5 = clopper_pearson(r05, k)
        lo1, hi1 = clopper_pearson(r01, k)
        mdf = "-" if dfs is None else ("inf" if np.all(np.isinf(dfs[ok])) else f"{np.median(dfs[ok]):.1f}")
        return [label, f"{r05 / k:.4f}", f"[{lo5:.3f}, {hi5:.3f}]", f"{r01 / k:.4f}",
                f"[{lo1:.4f}, {hi1:.4f}]", str(nfits), str(sing), str(nc), str(int((~ok).sum())), mdf,
                f"{total:.1f}", f"{1000 * per:.1f}"]

    for meth in METHODS:
        tot = res["t_fit"] + res["t_tab"][meth]
        rows.append(row(labels[meth], res["p"][meth], n, n_sing, n_nc, tot, tot / n, res["df"][meth]))
    if sm is not None:
        m = len(sm["p"])
        rows.append(row("statsmodels MixedLM Wald z", sm["p"], m, f"{int(sm['boundary'].sum())}*",
                        int((~sm["converged"]).sum()), sm["wall"], sm["wall"] / m))
        rows.append(row(f"  lmmjax Wald z, same {m}", res["p"]["asymptotic"][:m], m,
                        int(res["singular"][:m].sum()), int((~res["converged"][:m]).sum()), float("nan"),
                        float("nan")))
    if rr is not None:
        t = rr["table"]
        m = len(t)
        rows.append(row("lmerTest Satterthwaite", t["p_satt"].to_numpy(float), m, int(t["singular"].sum()), "-",
                        float(t["t_satt"].sum()), float(t["t_satt"].mean()), t["df_satt"].to_numpy(float)))
        rows.append(row("lmerTest/pbkrtest KR", t["p_kr"].to_numpy(float), m, int(t["singular"].sum()), "-",
                        float(t["t_kr"].sum()), float(t["t_kr"].mean()), t["df_kr"].to_numpy(float)))
    out.extend(_table(hdr, rows))
    w("CI: Clopper-Pearson 95% for the rejection rate; rates over data sets with a finite p value; "
      "singular fits are kept.")
    w("times: lmmjax = fit + that table, summed over data sets (compilation included: the first fit); "
      "statsmodels = fit (incl. its Wald table);")
    w("       lmerTest Satterthwaite = lmerTest::lmer (lme4 fit + numDeriv Hessian/Jacobian) + summary; "
      "lmerTest KR = summary(ddf='Kenward-Roger') alone.")
    if sm is not None:
        w("* statsmodels 'singular' column = fits that warned about a boundary/singular covariance "
          "(its own criterion, not lme4's)")
    w("")
    w(f"lmmjax: wall {res['wall']:.1f} s for {n} data sets, of which the first (compilation: fit + 3 tables) "
      f"{res['t_first']:.1f} s; mean over all: fit {1000 * res['t_fit'] / n:.1f} ms, tables " + ", ".join(
          f"{k} {1000 * v / n:.2f} ms" for k, v in res["t_tab"].items())
      + f"; after the first: {1000 * (res['wall'] - res['t_first']) / max(n - 1, 1):.1f} ms per data set "
      "(fit + all 3 tables)")
    if res["errors"]:
        w(f"lmmjax errors ({len(res['errors'])}):")
        for i, e in res["errors"][:10]:
            w(f"  data set {i}: {e}")
    sing = res["singular"] & j_ok
    if sing.any():
        w("lmmjax rejection rate at 0.05 among singular / non-singular fits: " + "; ".join(
            f"{meth} {np.mean(res['p'][meth][sing] < 0.05):.4f} / {np.mean(res['p'][meth][~sing & j_ok] < 0.05):.4f}"
            for meth in METHODS))
    if sm is not None:
        if sm["errors"]:
            w(f"statsmodels errors ({len(sm['errors'])}): " + "; ".join(f"#{i}: {e[:80]}" for i, e in sm["errors"][:3]))
        m = len(sm["p"])
        ok = ~np.isnan(sm["p"]) & ~np.isnan(res["p"]["asymptotic"][:m])
        dp = np.abs(sm["p"][ok] - res["p"]["asymptotic"][:m][ok])
        dll = res["loglik"][:m] - sm["llf"]
        same = ok & (np.abs(dll) < 1e-4)
        dps = np.abs(sm["p"][same] - res["p"]["asymptotic"][:m][same])
        w(f"statsmodels vs lmmjax Wald p (first {m}): max |diff| {dp.max():.2e}, median {np.median(dp):.1e}; "
          f"REML logLik differs by > 1e-4 in {int((ok & ~(np.abs(dll) < 1e-4)).sum())} "
          f"(lmmjax higher in {int((ok & (dll > 1e-4)).sum())}, statsmodels higher in {int((ok & (dll < -1e-4)).sum())}); "
          f"over the {int(same.sum())} with the same optimum: max |p diff| "
          f"{dps.max() if dps.size else float('nan'):.2e}; statsmodels wall {sm['wall']:.1f} s")
        w("  (statsmodels' bse_fe come from inverting the joint observed Hessian of fixed effects and covariance "
          "parameters, so its Wald SEs differ from lme4's / lmmjax's (X'V^-1X)^-1 even at the same optimum)")
    if rr is not None:
        t = rr["table"]
        m = len(t)
        dll = res["loglik"][:m] - t["loglik"].to_numpy(float)
        fin = ~np.isnan(dll)
        w(f"R agreement (first {m} data sets, lmerTest / pbkrtest; Rscript wall {rr['wall']:.1f} s): REML logLik "
          f"differs by > 1e-4 in {int((fin & (np.abs(dll) >= 1e-4)).sum())} (lmmjax higher in "
          f"{int((fin & (dll >= 1e-4)).sum())}, lme4 higher in {int((fin & (dll <= -1e-4)).sum())}; "
          f"max |dLL| {np.nanmax(np.abs(dll)):.2e}); rows below use only data sets with the same optimum "
          f"(|dLL| < 1e-4):")
        same_opt = np.abs(dll) < 1e-4
        for meth, pc, dc in (("satterthwaite", "p_satt", "df_satt"), ("kenward-roger", "p_kr", "df_kr")):
            pr, dr = t[pc].to_numpy(float), t[dc].to_numpy(float)
            pj, dj = res["p"][meth][:m], res["df"][meth][:m]
            ok = ~np.isnan(pr) & ~np.isnan(pj)
            for lab, sel in (("non-singular", ok & same_opt & ~res["singular"][:m]),
                             ("singular", ok & same_opt & res["singular"][:m])):
                if not sel.any():
                    continue
                dp = np.abs(pj[sel] - pr[sel])
                ddf = np.abs(dj[sel] - dr[sel]) / np.abs(dr[sel])
                big = int((ddf > 1e-3).sum())
                w(f"  {meth:<14} {lab:<12} n={int(sel.sum()):4d}: |p diff| max {dp.max():.1e} median "
                  f"{np.median(dp):.1e}; df rel diff max {ddf.max():.1e} median {np.median(ddf):.1e}; "
                  f"df rel diff > 1e-3: {big}; decision at 0.05 differs: "
                  f"{int(((pj[sel] < 0.05) != (pr[sel] < 0.05)).sum())}")
            miss = int((np.isnan(pr) != np.isnan(pj)).sum())
            if miss:
                w(f"  {meth}: NaN/failed in only one of lmmjax and R: {miss}")
        at = rr["at_theta"]
        w("  lmmjax evaluated at lme4's theta (all data sets, isolates the inference code from the optimizers):")
        for meth, pc, dc in (("satterthwaite", "p_satt", "df_satt"), ("kenward-roger", "p_kr", "df_kr")):
            pr, dr = t[pc].to_numpy(float), t[dc].to_numpy(float)
            ok = ~np.isnan(pr) & ~np.isnan(at[pc])
            dp = np.abs(at[pc][ok] - pr[ok])
            ddf = np.abs(at[dc][ok] - dr[ok]) / np.abs(dr[ok])
            w(f"  {meth:<14} n={int(ok.sum()):4d}: |p diff| max {dp.max():.1e} median {np.median(dp):.1e}; "
              f"df rel diff max {ddf.max():.1e} median {np.median(ddf):.1e}; decision at 0.05 differs: "
              f"{int(((at[pc][ok] < 0.05) != (pr[ok] < 0.05)).sum())}")
        sd = t["singular"].to_numpy() != res["singular"][:m]
        w(f"  singular flag differs between lme4 and lmmjax in {int(sd.sum())} of {m} data sets "
          f"({int((sd & same_opt).sum())} of them at the same optimum)")
        worse = np.flatnonzero(fin & (np.abs(dll) >= 1e-4))
        for i in worse[:5]:
            w(f"    data set {i}: logLik lmmjax {res['loglik'][i]:.6f} vs lme4 {t['loglik'].iloc[i]:.6f}; "
              f"Satterthwaite df {res['df']['satterthwaite'][i]:.3f} vs {t['df_satt'].iloc[i]:.3f}, "
              f"p {res['p']['satterthwaite'][i]:.4f} vs {t['p_satt'].iloc[i]:.4f}; KR p "
              f"{res['p']['kenward-roger'][i]:.4f} vs {t['p_kr'].iloc[i]:.4f}; singular "
              f"{res['singular'][i]} vs {bool(t['singular'].iloc[i])}")
    w(f"\ntotal wall time {wall_total:.0f} s; mode: {'quick' if args.quick else 'full'}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="number of simulated data sets (default 2000)")
    p.add_argument("--quick", action="store_true", help="300 data sets (unless --n is given)")
    p.add_argument("--subjects", type=int, default=8, help="number of subjects (default 8)")
    p.add_argument("--times", type=int, default=6, help="time points per subject (default 6)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--sm-n", type=int, default=300, help="statsmodels on the first N data sets (default 300)")
    p.add_argument("--no-statsmodels", action="store_true")
    p.add_argument("--r-n", type=int, default=300,
                   help="lmerTest/pbkrtest on the first N data sets, as an agreement check (default 300)")
    p.add_argument("--no-r", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.n = args.n or (300 if args.quick else 2000)
    if args.subjects < 4 or args.subjects % 2:
        p.error("--subjects must be an even number >= 4")

    os.environ["LMMJAX_COMPILATION_CACHE"] = "0"   # measure compilation too, leave ~/.cache alone
    t_start = time.perf_counter()
    log = stderr_log(t_start)
    base = base_frame(args.subjects, args.times)
    rng = np.random.default_rng(args.seed)
    ys = np.stack([simulate_y(rng, base, args.subjects) for _ in range(args.n)])

    log(f"lmmjax: {args.n} data sets")
    gc.collect()
    res = run_lmmjax(base, ys, log)
    sm = None
    if not args.no_statsmodels:
        try:
            import statsmodels  # noqa: F401
        except ImportError:
            log("statsmodels not importable: skipped")
        else:
            m = min(args.sm_n, args.n)
            log(f"statsmodels: {m} data sets")
            sm = run_statsmodels(base, ys[:m], log)
    rr = None
    if not args.no_r and shutil.which("Rscript") and args.r_n > 0:
        m = min(args.r_n, args.n)
        log(f"R (lmerTest/pbkrtest): {m} data sets")
        tmp = Path(tempfile.mkdtemp(prefix="lmmjax_calib_"))
        try:
            rr = run_r(base, ys[:m], tmp)
            log("lmmjax at lme4's theta")
            rr["at_theta"] = lmmjax_at_r_theta(base, ys[:m], rr["table"], res["coef"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, res, sm, rr, time.perf_counter() - t_start)
    save_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
