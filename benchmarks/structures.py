"""Residual-covariance-structure benchmark: ``lmmjax.gls`` / ``lmmjax.lmer(..., residual=)`` vs nlme.

    python benchmarks/structures.py                       # 2000 subjects x 6 visits (~12k rows), all models
    python benchmarks/structures.py --quick               # 300 subjects, a smoke run
    python benchmarks/structures.py --no-r --models gls_ar1,mmrm
    python benchmarks/structures.py --subjects 5000 --reps 5

Data (numpy, fixed seed): a longitudinal design, subjects x 6 visits; a two-level
between-subject factor ``trt`` (placebo = reference, active); ``time`` = visit - 1 plus a
small uniform jitter (0 at visit 1); about 10 % of the rows of visits 2..6 dropped at random,
so subjects have gaps; ``x`` a positive row-level covariate unrelated to y;
y = fixed effects + random subject intercept + AR(1) errors over visits with a different SD
per visit.  Every model (REML) is fitted with lmmjax and nlme (``gls`` / ``lme`` with
``correlation=`` / ``weights=``) to the same CSV, in the same run.

Measured (wall clock, seconds):

* **jax fresh**: the first fit in a fresh ``python -c`` process (``cold_env()``: no persistent
  compilation cache), timed inside around the fit only (JIT compilation included); **proc** is
  the whole process (interpreter, imports, reading the CSV, fit).
* **jax warm**: in this process, one fit, then the median of ``--reps`` refits of the same
  call on the same data frame; XLA compilations during the refits and the seconds spent
  compiling (tracing + lowering + XLA) are reported too.
* **nlme**: one ``Rscript`` per model, the fit alone timed in R with ``proc.time()``
  (``gc()`` first; loading nlme and reading the CSV excluded); ``--r-timeout`` per call.

Ratios are nlme / lmmjax (> 1: lmmjax faster).  Target per model: faster than nlme (fresh
and warm) and the same REML logLik (|dLL| <= 1e-3).  The machine is shared and small:
compare ratios, not seconds.  The table is printed and saved as markdown to
benchmarks/results/structures.md.  See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
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
from _common import (CompileCounter, cold_env, disable_persistent_cache, git_state, machine_info,  # noqa: E402
                     median, stderr_log, text_table, use_rscript, wall)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "structures.md"
SEED = 20240815

N_VISITS = 6
TRT_LEVELS = ["placebo", "active"]          # reference level first (in lmmjax and in R)
VISIT_SD = (1.0, 1.1, 1.25, 1.4, 1.55, 1.7)  # residual SD per visit
RHO = 0.6                                   # AR(1) correlation between consecutive visits
SUBJECT_SD = 0.8                            # random intercept SD
BETA = (10.0, 0.5, 0.3, 0.25)               # intercept, active, time, active:time
DROP = 0.10                                 # fraction of rows of visits 2..6 dropped

LL_TOL = 1e-3
R_TIMEOUT = 900.0
FRESH_TIMEOUT = 1800.0


# ----------------------------------------------------------------------------- models
@dataclass
class Model:
    name: str
    lmmjax: str     # a Python expression in `lmmjax`, `cov` (lmmjax.cov) and `df`
    nlme: str       # an R call in `d` and `CTRL_GLS` / `CTRL_LME`
    res: dict = field(default_factory=dict)


MODELS = [
    Model("gls_ar1",
          'lmmjax.gls("y ~ trt * time", df, reml=True, residual=cov.AR1(group="subject", time="visit"))',
          'gls(y ~ trt * time, data = d, method = "REML", correlation = corAR1(form = ~ visit | subject), '
          'control = CTRL_GLS)'),
    Model("gls_car1",
          'lmmjax.gls("y ~ trt * time", df, reml=True, residual=cov.CAR1(time="time", group="subject"))',
          'gls(y ~ trt * time, data = d, method = "REML", correlation = corCAR1(form = ~ time | subject), '
          'control = CTRL_GLS)'),
    Model("gls_cs",
          'lmmjax.gls("y ~ trt * time", df, reml=True, residual=cov.CompoundSymmetry(group="subject"))',
          'gls(y ~ trt * time, data = d, method = "REML", correlation = corCompSymm(form = ~ 1 | subject), '
          'control = CTRL_GLS)'),
    Model("mmrm",
          'lmmjax.gls("y ~ trt * C(visit)", df, reml=True, '
          'residual=cov.Unstructured(group="subject", time="visit") * cov.VarIdent(by="visit"))',
          'gls(y ~ trt * factor(visit), data = d, method = "REML", correlation = corSymm(form = ~ visit | subject), '
          'weights = varIdent(form = ~ 1 | visit), control = CTRL_GLS)'),
    Model("lme_ar1",
          'lmmjax.lmer("y ~ trt * time + (1 | subject)", df, reml=True, '
          'residual=cov.AR1(group="subject", time="visit"))',
          'lme(y ~ trt * time, random = ~ 1 | subject, data = d, method = "REML", '
          'correlation = corAR1(form = ~ visit | subject), control = CTRL_LME)'),
    Model("gls_ar1_varident",
          'lmmjax.gls("y ~ trt * time", df, reml=True, '
          'residual=cov.AR1(group="subject", time="visit") * cov.VarIdent(by="visit"))',
          'gls(y ~ trt * time, data = d, method = "REML", correlation = corAR1(form = ~ visit | subject), '
          'weights = varIdent(form = ~ 1 | visit), control = CTRL_GLS)'),
    Model("gls_car1_varpower",
          'lmmjax.gls("y ~ trt * time", df, reml=True, '
          'residual=cov.CAR1(time="time", group="subject") * cov.VarPower(covariate="x"))',
          'gls(y ~ trt * time, data = d, method = "REML", correlation = corCAR1(form = ~ time | subject), '
          'weights = varPower(form = ~ x), control = CTRL_GLS)'),
]


# ----------------------------------------------------------------------------- data
def simulate(n_subjects: int, seed: int) -> pd.DataFrame:
    """subject, trt, visit (1..6), time, x, y; ~10 % of the rows of visits 2..6 dropped."""
    rng = np.random.default_rng(seed)
    K = N_VISITS
    subj = np.repeat(np.arange(n_subjects), K)
    visit = np.tile(np.arange(1, K + 1), n_subjects)
    trt = rng.permutation(np.arange(n_subjects) % 2)[subj]
    time_ = visit - 1 + np.where(visit == 1, 0.0, rng.uniform(-0.2, 0.2, subj.size))
    e = np.empty((n_subjects, K))                 # stationary AR(1), unit variance, over visits
    e[:, 0] = rng.standard_normal(n_subjects)
    for k in range(1, K):
        e[:, k] = RHO * e[:, k - 1] + np.sqrt(1 - RHO**2) * rng.standard_normal(n_subjects)
    e = (e * np.asarray(VISIT_SD)).ravel()
    u = rng.normal(0.0, SUBJECT_SD, n_subjects)[subj]
    b0, b1, b2, b3 = BETA
    y = b0 + b1 * trt + b2 * time_ + b3 * trt * time_ + u + e
    x = rng.uniform(0.5, 2.5, subj.size)
    keep = (visit == 1) | (rng.random(subj.size) >= DROP)
    width = len(str(n_subjects - 1))
    df = pd.DataFrame({"subject": np.array([f"s{i:0{width}d}" for i in range(n_subjects)])[subj],
                       "trt": np.array(TRT_LEVELS)[trt], "visit": visit, "time": np.round(time_, 6),
                       "x": np.round(x, 6), "y": y})
    return df[keep].reset_index(drop=True)


def read_data(csv) -> pd.DataFrame:
    """The CSV as lmmjax gets it (here and in the fresh processes): subject categorical,
    trt categorical with placebo as reference, visit integer."""
    df = pd.read_csv(csv, dtype={"subject": "category", "trt": str, "visit": int})
    df["trt"] = pd.Categorical(df["trt"], categories=TRT_LEVELS)
    return df


# ----------------------------------------------------------------------------- lmmjax
class CompileClock(CompileCounter):
    """CompileCounter that also adds up the seconds spent compiling (jaxpr tracing,
    lowering to MLIR, XLA backend compile)."""

    def __init__(self):
        self.seconds = 0.0
        super().__init__()

    def _on(self, event, duration, **kw):
        super()._on(event, duration, **kw)
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration


def fit_model(model: Model, df: pd.DataFrame):
    import lmmjax
    from lmmjax import cov

    return eval(model.lmmjax, {"lmmjax": lmmjax, "cov": cov, "df": df})


FRESH_CHILD = """\
import time
t0 = time.perf_counter()
import json, sys, warnings
sys.path.insert(0, {here!r})
import lmmjax
t1 = time.perf_counter()
from structures import MODELS, CompileClock, fit_model, read_data
df = read_data({csv!r})
model = next(m for m in MODELS if m.name == {name!r})
clock = CompileClock()
warnings.simplefilter("ignore")
t2 = time.perf_counter()
m = fit_model(model, df)
t3 = time.perf_counter()
print("RESULT " + json.dumps(dict(imports=t1 - t0, read=t2 - t1, fit=t3 - t2, compile_s=clock.seconds,
                                  compiles=clock.n, loglik=m.loglik, converged=m.converged)))
"""


def lmmjax_fresh(model: Model, csv: Path) -> dict:
    """One fresh `python -c` (no persistent compilation cache): import, read, first fit."""
    code = FRESH_CHILD.format(here=str(HERE), csv=str(csv), name=model.name)
    dt, out = wall([sys.executable, "-c", code], env=cold_env(), timeout=FRESH_TIMEOUT, tail=3000)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"fresh lmmjax process printed no result:\n{out[-1000:]}")
    return dict(json.loads(line[len("RESULT "):]), total=dt)


def lmmjax_warm(model: Model, df: pd.DataFrame, reps: int, clock: CompileClock) -> dict:
    """One fit, then `reps` timed refits (same call, same data frame)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        m = fit_model(model, df)
        first = time.perf_counter() - t0
        times, rest, ll, n0, s0 = [], [], [], clock.n, clock.seconds
        for _ in range(reps):
            del m
            gc.collect()
            c0 = clock.seconds
            t0 = time.perf_counter()
            m = fit_model(model, df)
            times.append(time.perf_counter() - t0)
            rest.append(times[-1] - (clock.seconds - c0))
            ll.append(m.loglik)
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message)[:160]}" for w in rec))
    return dict(first=first, times=times, warm=median(times), rest=median(rest), loglik=float(m.loglik), converged=bool(m.converged),
                deterministic=len(set(ll)) == 1, compiles_per_fit=(clock.n - n0) / max(reps, 1),
                compile_s_per_fit=(clock.seconds - s0) / max(reps, 1), fixef=m.fixef.to_numpy(),
                sigma=m.sigma, npar=len(m.psi), max_group=m.max_group_size, warnings=msgs)


# ----------------------------------------------------------------------------- nlme
R_SCRIPT = """\
suppressPackageStartupMessages({{ library(nlme); library(jsonlite) }})
d <- read.csv("{csv}", stringsAsFactors = FALSE)
d$subject <- factor(d$subject)
d$trt <- factor(d$trt, levels = c({trt_levels}))
d$visit <- as.integer(d$visit)
CTRL_GLS <- glsControl(maxIter = 500, msMaxIter = 500)
CTRL_LME <- lmeControl(maxIter = 500, msMaxIter = 500, niterEM = 100)
warns <- character(0)
invisible(gc())
t0 <- proc.time()[["elapsed"]]
fit <- withCallingHandlers(
  tryCatch({call}, error = function(e) e),
  warning = function(w) {{ warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") }})
elapsed <- proc.time()[["elapsed"]] - t0
out <- list(time = elapsed, warnings = unique(warns), nlme = as.character(packageVersion("nlme")))
if (inherits(fit, "error")) {{
  out$error <- conditionMessage(fit)
}} else {{
  b <- if (inherits(fit, "lme")) fixef(fit) else coef(fit)
  out$logLik <- as.numeric(logLik(fit))
  out$coef <- unname(b)
  out$coef_names <- names(b)
  out$se <- unname(sqrt(diag(vcov(fit))))
  out$sigma <- fit$sigma
  out$structure <- as.list(coef(fit$modelStruct, unconstrained = FALSE))
}}
cat("RESULT", toJSON(out, digits = NA, auto_unbox = TRUE), "\\n")
"""


def r_available() -> str | None:
    """None if Rscript can load nlme and jsonlite, else the reason."""
    try:
        wall(["Rscript", "-e", "suppressPackageStartupMessages({library(nlme); library(jsonlite)})"], timeout=120)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return None


def nlme_fit(model: Model, csv: Path, tmp: Path, timeout: float) -> dict:
    rfile = tmp / f"{model.name}.R"
    rfile.write_text(R_SCRIPT.format(csv=csv, trt_levels=", ".join(f'"{x}"' for x in TRT_LEVELS), call=model.nlme))
    try:
        dt, out = wall(["Rscript", str(rfile)], timeout=timeout, tail=3000)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout (> {timeout:g} s)")
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return dict(error=f"Rscript printed no result: {out[-300:]}")
    r = json.loads(line[len("RESULT "):])
    r["process"] = dt
    return r


# ----------------------------------------------------------------------------- report
def fmt_s(x):
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(a, b):
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def fmt_ll(x):
    return "-" if x is None else f"{x:.4f}"


def verdict(r: dict) -> str:
    """'PASS' / 'FAIL (reasons)' against: faster than nlme fresh and warm, |dLL| <= LL_TOL."""
    j, w, n = r.get("fresh"), r.get("warm"), r.get("nlme")
    if "lmmjax_error" in r:
        return "FAIL (lmmjax error)"
    if n is None:
        return "-"
    if "error" in n:
        return "n/a (nlme " + ("timeout" if n["error"].startswith("timeout") else "failed") + ")"
    why = []
    if j is not None and not j["fit"] < n["time"]:
        why.append("slower fresh")
    if w is not None and not w["warm"] < n["time"]:
        why.append("slower warm")
    ll = (w or j or {}).get("loglik")
    if ll is None or not abs(ll - n["logLik"]) <= LL_TOL:
        why.append("logLik")
    return "PASS" if not why else f"FAIL ({', '.join(why)})"


HDR = ["model", "jax fresh", "jax proc", "jax warm", "nlme", "nlme/fresh", "nlme/warm",
       "logLik jax", "logLik nlme", "|dLL|", "target"]


def table_rows(models):
    rows = []
    for m in models:
        r = m.res
        j, w, n = r.get("fresh") or {}, r.get("warm") or {}, r.get("nlme") or {}
        nt = n.get("time") if "error" not in n else None
        ll_j = w.get("loglik", j.get("loglik"))
        ll_n = n.get("logLik")
        nlme_cell = fmt_s(nt) if n and "error" not in n else ("timeout" if n.get("error", "").startswith("timeout")
                                                             else "error" if n else "-")
        rows.append([m.name, fmt_s(j.get("fit")), fmt_s(j.get("total")), fmt_s(w.get("warm")), nlme_cell,
                     fmt_ratio(nt, j.get("fit")), fmt_ratio(nt, w.get("warm")), fmt_ll(ll_j), fmt_ll(ll_n),
                     "-" if ll_j is None or ll_n is None else f"{abs(ll_j - ll_n):.1e}", verdict(r)])
    return rows


def md_table(hdr, rows):
    align = ["---"] + ["---:"] * (len(hdr) - 2) + ["---"]
    esc = lambda cells: [c.replace("|", "\\|") for c in cells]
    return ["| " + " | ".join(esc(hdr)) + " |", "| " + " | ".join(align) + " |"] + \
           ["| " + " | ".join(esc(row)) + " |" for row in rows]


def details(models, data_info: str) -> list[str]:
    out = [f"data: {data_info}", ""]
    for m in models:
        r = m.res
        out.append(f"{m.name}")
        out.append(f"  lmmjax: {m.lmmjax}")
        out.append(f"  nlme:   {m.nlme}")
        if "lmmjax_error" in r:
            out.append(f"  lmmjax error: {r['lmmjax_error']}")
        j = r.get("fresh")
        if j:
            out.append(f"  fresh process {j['total']:.2f} s = imports {j['imports']:.2f} + read {j['read']:.2f} + "
                       f"fit {j['fit']:.2f} s ({j['compiles']} XLA compilations, {j['compile_s']:.2f} s compiling), "
                       f"logLik {j['loglik']:.6f}, converged {j['converged']}")
        w = r.get("warm")
        if w:
            out.append(f"  in-process: first fit {w['first']:.2f} s, refits " + ", ".join(f"{t:.2f}" for t in w["times"])
                       + f" s; per refit {w['compiles_per_fit']:.1f} XLA compilations, "
                       f"{w['compile_s_per_fit']:.2f} s compiling (median {w['rest']:.2f} s outside compilation); "
                       f"{w['npar']} covariance parameters, "
                       f"largest group {w['max_group']} rows; converged {w['converged']}"
                       + ("" if w["deterministic"] else "; logLik NOT identical across refits"))
            for msg in w["warnings"][:3]:
                out.append(f"  lmmjax warning: {msg}")
        n = r.get("nlme")
        if n:
            if "error" in n:
                after = f" after {n['time']:.1f} s" if "time" in n else ""
                out.append(f"  nlme error{after}: {n['error'][:300]}")
            else:
                ll = (w or j or {}).get("loglik")
                bits = [f"nlme logLik {n['logLik']:.6f}"]
                if ll is not None:
                    bits.append(f"lmmjax - nlme {ll - n['logLik']:+.2e}")
                if w and len(n["coef"]) == len(w["fixef"]):
                    z = np.max(np.abs(w["fixef"] - np.asarray(n["coef"])) / np.asarray(n["se"]))
                    bits.append(f"max |d beta|/SE {z:.1e}")
                    bits.append(f"sigma {w['sigma']:.5f} vs {n['sigma']:.5f}")
                elif w:
                    bits.append(f"fixef length differs ({len(w['fixef'])} vs {len(n['coef'])})")
                bits.append(f"Rscript process {n['process']:.1f} s")
                out.append("  " + "; ".join(bits))
            for msg in n.get("warnings", [])[:3]:
                out.append(f"  nlme warning: {msg[:200]}")
        out.append("")
    return out


def report(models, args, data_info: str, r_note: str | None, wall_total: float) -> tuple[str, str]:
    head = [f"lmmjax residual covariance structures vs nlme  ({machine_info()})",
            f"lmmjax source: {git_state()}",
            "seconds (wall clock). jax fresh = first fit in a fresh process incl. JIT compilation, no persistent "
            "cache (fit only; 'jax proc' = the whole process incl. interpreter, imports, CSV); jax warm = median "
            f"of {args.reps} in-process refits; nlme = the fit alone, timed inside R. Ratios nlme/lmmjax: > 1 = "
            f"lmmjax faster. target: faster than nlme (fresh and warm) and |dLL| <= {LL_TOL:g} (REML logLik)."]
    if r_note:
        head.append(f"nlme: {r_note}")
    rows = table_rows(models)
    tail = details(models, data_info)
    checked = [v[-1] for v in rows if v[-1].startswith(("PASS", "FAIL"))]
    summary = [f"target met on {checked.count('PASS')} of {len(checked)} models" if checked
               else "target not checked (no nlme results)",
               f"total benchmark wall time {wall_total:.0f} s; mode: "
               + (", ".join(k for k, v in [("quick", args.quick), ("no-r", args.no_r)] if v) or "full")]
    text = "\n".join(head + [""] + text_table(HDR, rows) + [""] + summary + ["", "details:"] + tail)
    md = "\n".join(["# lmmjax residual covariance structures vs nlme", ""] + head[:2] + [""] + head[2:] + [""]
                   + md_table(HDR, rows) + [""] + summary + ["", "## Details", "", "```text"] + tail + ["```", ""])
    return text, md


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=None, help="subjects (default 2000; 300 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 300 subjects, 2 warm refits")
    p.add_argument("--models", default=None,
                   help="comma-separated subset of: " + ", ".join(m.name for m in MODELS))
    p.add_argument("--reps", type=int, default=None, help="warm refits per model (default 3; 2 with --quick)")
    p.add_argument("--no-r", action="store_true", help="skip nlme (Rscript)")
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-process timings")
    p.add_argument("--r-timeout", type=float, default=R_TIMEOUT, help=f"seconds per nlme fit (default {R_TIMEOUT:g})")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the markdown report goes")
    args = p.parse_args(argv)
    args.subjects = args.subjects or (300 if args.quick else 2000)
    args.reps = args.reps or (2 if args.quick else 3)
    models = MODELS
    if args.models:
        names = [s.strip() for s in args.models.split(",") if s.strip()]
        unknown = sorted(set(names) - {m.name for m in MODELS})
        if unknown:
            p.error(f"unknown model(s) {unknown}; choose from {[m.name for m in MODELS]}")
        models = [m for m in MODELS if m.name in names]

    disable_persistent_cache()     # in-process fits: no persistent compilation cache (before lmmjax is imported)
    t_start = time.perf_counter()
    log = stderr_log(t_start)
    use_r = use_rscript(args.no_r, "nlme")
    r_note = "skipped (--no-r)" if args.no_r else None
    if use_r:
        why = r_available()
        if why:
            use_r, r_note = False, f"skipped: Rscript cannot load nlme / jsonlite ({why})"
    elif not args.no_r:
        r_note = "skipped: Rscript not found"
    if r_note:
        print(f"nlme {r_note}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="lmmjax_structbench_"))
    try:
        csv = tmp / "long.csv"
        simulate(args.subjects, args.seed).to_csv(csv, index=False, float_format="%.17g")
        df = read_data(csv)
        per = df.groupby("subject", observed=True).size()
        data_info = (f"{args.subjects} subjects x {N_VISITS} visits, {len(df)} rows after dropping ~{DROP:.0%} of "
                     f"visits 2..{N_VISITS} ({int((per < N_VISITS).sum())} subjects with gaps, "
                     f"{per.min()}..{per.max()} rows each); seed {args.seed}; truth: beta {BETA}, subject SD "
                     f"{SUBJECT_SD}, AR(1) rho {RHO} over visits, residual SD by visit {VISIT_SD}")
        log(data_info)
        clock = CompileClock()
        for m in models:
            try:
                if not args.no_fresh:
                    log(f"{m.name}: lmmjax fresh process")
                    m.res["fresh"] = lmmjax_fresh(m, csv)
                    log(f"  fit {m.res['fresh']['fit']:.2f} s (process {m.res['fresh']['total']:.2f} s), "
                        f"logLik {m.res['fresh']['loglik']:.6f}")
                log(f"{m.name}: lmmjax warm ({args.reps} refits)")
                m.res["warm"] = w = lmmjax_warm(m, df, args.reps, clock)
                log(f"  first {w['first']:.2f} s, warm {w['warm']:.2f} s ({w['compiles_per_fit']:.1f} compilations, "
                    f"{w['compile_s_per_fit']:.2f} s compiling per refit, {w['rest']:.2f} s outside)")
            except Exception as e:  # keep going: report what failed
                msg = str(e).strip().splitlines()
                m.res["lmmjax_error"] = f"{type(e).__name__}: {msg[-1] if msg else ''}"
                log(f"  lmmjax failed: {m.res['lmmjax_error']}")
            if use_r:
                log(f"{m.name}: nlme")
                try:
                    m.res["nlme"] = n = nlme_fit(m, csv, tmp, args.r_timeout)
                except RuntimeError as e:
                    m.res["nlme"] = n = dict(error=str(e).strip().splitlines()[-1])
                log(f"  {n['error'][:200]}" if "error" in n else f"  {n['time']:.2f} s, logLik {n['logLik']:.6f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text, md = report(models, args, data_info, r_note, time.perf_counter() - t_start)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(f"\nsaved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
