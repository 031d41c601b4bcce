"""Many-response benchmark: ``lmmjax.lmer_batch`` on a single-cell-like design vs per-gene peers.

    python benchmarks/batch.py                 # full run (10k genes, 100k x 20k sparse, R), ~6 min
    python benchmarks/batch.py --quick --no-r  # smoke run with small sizes, ~1-2 min
    python benchmarks/batch.py --genes 5000 --sparse-cells 50000 --no-slope

Cells belong to 8 donors x 2 conditions (every donor in both conditions); each gene is
one response of ``~ condition + (1 | donor)`` (REML, Satterthwaite p for ``condition``).
Measured: lmmjax in a fresh process (cold compile, no persistent compilation cache) and
warm in-process, Kenward-Roger on top, the numpy "floor" (one pass computing ZᵀY, XᵀY and
column sums of squares), statsmodels MixedLM and lme4 + lmerTest (per gene, on a sample,
extrapolated), accuracy vs lmerTest / statsmodels / float32, a random-slope model and a
sparse 100k-cell run.  See benchmarks/README.md.  The report is printed and saved to
benchmarks/results/batch.md (text) and batch.json (all numbers).
"""
from __future__ import annotations

import argparse
import importlib.util
import contextlib
import faulthandler
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CompileCounter, cold_env, disable_persistent_cache, git_state, machine_info,  # noqa: E402
                     median, stderr_log, text_table, use_rscript, wall)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SEED = 20240701

N_DONORS = 8
CONDITIONS = ("ctrl", "stim")
COEF = "conditionstim"             # the condition coefficient (lmmjax and R name it alike)
FORMULA = "~ condition + (1 | donor)"
FORMULA_SLOPE = "~ condition + (1 + condition | donor)"

# targets from the issue
FRESH_TARGET = 5.0        # s, whole G-gene run in a fresh process
WARM_TARGET = 1.0         # s, whole G-gene run warm
R_SPEEDUP_TARGET = 500.0  # lme4 + lmerTest (extrapolated) / lmmjax
FLOOR_TARGET = 10.0       # lmmjax warm / numpy floor
KR_TARGET = 1.0           # KR time / fit time

R_TIMEOUT = 3600.0
FRESH_TIMEOUT = 1800.0
SLOPE_WARM_BUDGET = 90.0  # s of warm random-slope repetitions (reps reduced to fit)
SINGLE_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"


def child_env() -> dict:
    """cold_env(), keeping the single-threaded-Eigen XLA flag when this run uses it."""
    env = cold_env()
    if SINGLE_EIGEN_FLAG in os.environ.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = SINGLE_EIGEN_FLAG
    return env


# ----------------------------------------------------------------------------- data
def cells(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Donor (0..7) and condition (0/1) of n cells: uneven shares of the 16 donor x condition
    groups (Dirichlet), every group with at least max(2, n / 64) cells, order shuffled."""
    k = 2 * N_DONORS
    m = max(2, n // (4 * k))
    if n < k * m:
        raise SystemExit(f"need at least {k * m} cells for {N_DONORS} donors x 2 conditions")
    counts = m + rng.multinomial(n - k * m, rng.dirichlet(np.full(k, 4.0)))
    grp = rng.permutation(np.repeat(np.arange(k), counts))
    return grp // 2, grp % 2


def obs_frame(donor: np.ndarray, cond: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"donor": pd.Categorical(np.array([f"d{i + 1}" for i in range(N_DONORS)])[donor]),
                         "condition": pd.Categorical(np.array(CONDITIONS)[cond], categories=list(CONDITIONS))})


def gene_params(G: int, rng, zero_frac=0.2, de_frac=0.1) -> dict:
    """Donor SD (exactly round(zero_frac * G) genes with 0), condition effect (exactly
    round(de_frac * G) genes with one, the rest 0)."""
    donor_sd = rng.uniform(0.1, 1.0, G)
    donor_sd[rng.permutation(G) < round(zero_frac * G)] = 0.0
    de = rng.permutation(G) < round(de_frac * G)
    effect = np.where(de, rng.choice([-1.0, 1.0], G) * rng.uniform(0.1, 0.5, G), 0.0)
    return dict(donor_sd=donor_sd, de=de, effect=effect)


def simulate_dense(n: int, G: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """n x G float64: gene mean + donor effect (SD by gene) + condition effect + noise (SD by gene)."""
    rng = np.random.default_rng(seed)
    donor, cond = cells(n, rng)
    gp = gene_params(G, rng)
    noise_sd = rng.uniform(0.5, 2.0, G)
    b = rng.standard_normal((N_DONORS, G)) * gp["donor_sd"] * noise_sd
    Y = rng.standard_normal((n, G))
    Y *= noise_sd
    Y += rng.normal(0.0, 2.0, G)
    Y += b[donor]
    Y[cond == 1] += gp["effect"] * noise_sd
    return obs_frame(donor, cond), Y, gp


def simulate_sparse(n: int, G: int, density: float, seed: int, block: int = 1000):
    """n x G CSR count matrix (float32 values), built gene block by gene block in CSC
    form (the dense matrix is never allocated).  Gene g is detected in a cell with
    probability p_g (mean `density`); nonzero positions come from geometric gaps, values are
    1 + Poisson(level_g * size_c * exp(donor effect + condition effect) * Gamma(2, 1/2))."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    donor, cond = cells(n, rng)
    gp = gene_params(G, rng)
    p = np.clip(density * rng.lognormal(0.0, 0.5, G) / np.exp(0.125), 1e-4, 0.6)
    level = rng.lognormal(0.0, 1.0, G)
    size = rng.lognormal(0.0, 0.3, n)
    b = rng.standard_normal((N_DONORS, G)) * gp["donor_sd"] * 0.5
    eff = gp["effect"]
    indptr, indices, data = [np.zeros(1, np.int64)], [], []
    nnz = 0
    for g0 in range(0, G, block):
        gs = np.arange(g0, min(G, g0 + block))
        pg = p[gs]
        m = np.ceil(n * pg + 6.0 * np.sqrt(n * pg * (1 - pg)) + 20).astype(np.int64)
        seg = np.repeat(np.arange(len(gs)), m)
        pos = np.cumsum(rng.geometric(pg[seg]))
        ends = np.cumsum(m)
        before = np.concatenate([[0], pos[ends[:-1] - 1]])
        pos = pos - np.repeat(before, m) - 1         # positions within each gene, increasing
        keep = pos < n
        rows, gcol = pos[keep], seg[keep]
        gg = gs[gcol]
        lam = level[gg] * size[rows] * np.exp(b[donor[rows], gg] + eff[gg] * cond[rows])
        lam *= rng.gamma(2.0, 0.5, lam.size)
        indices.append(rows.astype(np.int32))
        data.append((1.0 + rng.poisson(lam)).astype(np.float32))
        indptr.append(nnz + np.cumsum(np.bincount(gcol, minlength=len(gs))))
        nnz += rows.size
    Yc = sp.csc_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n, G))
    del data, indices
    return obs_frame(donor, cond), Yc.tocsr(), gp


def design_matrices(obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Donor codes and X = [1, condition == stim]."""
    d = obs["donor"].cat.codes.to_numpy()
    x = (obs["condition"] == CONDITIONS[1]).to_numpy(float)
    return d, np.column_stack([np.ones(len(obs)), x])


# ----------------------------------------------------------------------------- floor
def dense_floor(obs: pd.DataFrame, Y: np.ndarray, reps: int) -> dict:
    """Plain numpy: ZᵀY (donor indicator), XᵀY, column sums of squares of Y."""
    d, X = design_matrices(obs)
    Z = np.zeros((len(d), N_DONORS))
    Z[np.arange(len(d)), d] = 1.0
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        ZtY = Z.T @ Y
        XtY = X.T @ Y
        ss = np.einsum("ij,ij->j", Y, Y)
        times.append(time.perf_counter() - t0)
    del ZtY, XtY, ss
    return dict(times=times, med=median(times))


def sparse_floor(obs: pd.DataFrame, Y, reps: int) -> dict:
    """scipy.sparse on the CSR as given: ZᵀY, XᵀY, column sums of squares."""
    import scipy.sparse as sp

    d, X = design_matrices(obs)
    n, G = Y.shape
    Zt = sp.csr_matrix((np.ones(n), (d, np.arange(n))), shape=(N_DONORS, n))
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        ZtY = (Zt @ Y).toarray()
        XtY = Y.T @ X
        ss = np.bincount(Y.indices, weights=np.square(Y.data, dtype=np.float64), minlength=G)
        times.append(time.perf_counter() - t0)
    del ZtY, XtY, ss
    return dict(times=times, med=median(times))


# ----------------------------------------------------------------------------- lmmjax
FRESH_CHILD = """\
import json, resource, time, warnings
t0 = time.perf_counter()
def peak_mb():  # VmHWM starts afresh at exec (ru_maxrss would include the forking parent's RSS)
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import numpy as np, pandas as pd
import lmmjax
t1 = time.perf_counter()
warnings.simplefilter("ignore")
obs = pd.read_csv({obs!r}, dtype={{"donor": "category", "condition": "category"}})
{load}
rss_load = peak_mb()
t2 = time.perf_counter()
res = lmmjax.lmer_batch({formula!r}, obs, Y, progress=False)
t3 = time.perf_counter()
tab = res.coef_table("condition")
t4 = time.perf_counter()
np.save({out!r}, tab[["estimate", "se", "df", "p"]].to_numpy())
print("RESULT " + json.dumps(dict(
    imports=t1 - t0, load=t2 - t1, fit=t3 - t2, table=t4 - t3, inside=t4 - t1,
    rss_load_mb=rss_load, rss_peak_mb=peak_mb(),
    converged=int(res.converged.sum()), singular=int(res.is_singular.sum()),
    failed=int(res.errors.notna().sum()))))
"""


def lmmjax_fresh(formula: str, obs_csv: Path, y_path: Path, out: Path, reps: int) -> dict:
    """`reps` fresh `python -c` processes (cold_env: no persistent compilation cache), each:
    import lmmjax, load obs CSV + responses (.npy / .npz), lmer_batch, Satterthwaite coef_table."""
    load = (f"import scipy.sparse as sp\nY = sp.load_npz({str(y_path)!r})" if y_path.suffix == ".npz"
            else f"Y = np.load({str(y_path)!r})")
    code = FRESH_CHILD.format(obs=str(obs_csv), load=load, formula=formula, out=str(out))
    runs = []
    for _ in range(reps):
        dt, stdout = wall([sys.executable, "-c", code], env=child_env(), timeout=FRESH_TIMEOUT, tail=3000)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"fresh lmmjax process printed no result:\n{stdout[-1000:]}")
        r = json.loads(line[len("RESULT "):])
        r["total"] = dt
        runs.append(r)
    best = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]   # the median run
    return dict(best, runs=[r["total"] for r in runs], results=np.load(out))


@contextlib.contextmanager
def quiet_lmmjax(store: dict):
    """Record (not show) warnings; keep the distinct messages in store['warnings']."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        yield
    msgs = store.setdefault("warnings", [])
    for w in rec:
        m = f"{w.category.__name__}: {str(w.message)[:160]}"
        if m not in msgs:
            msgs.append(m)


def lmmjax_main(obs, Y, reps, counter, log) -> dict:
    """Warm in-process: one warm-up (fit + Satterthwaite + KR, compiles), then `reps` times a
    new lmer_batch + coef_table(Satterthwaite), and coef_table(KR) on that fresh result."""
    import lmmjax

    out: dict = {}
    with quiet_lmmjax(out):
        c0 = counter.n
        t0 = time.perf_counter()
        res = lmmjax.lmer_batch(FORMULA, obs, Y, progress=False)
        t1 = time.perf_counter()
        res.coef_table("condition")
        t2 = time.perf_counter()
        res.coef_table("condition", ddf="kenward-roger")
        t3 = time.perf_counter()
        out["first"] = dict(fit=t1 - t0, satt=t2 - t1, kr=t3 - t2, compiles=counter.n - c0)
        log(f"  warm-up: fit {t1 - t0:.2f} s, Satterthwaite {t2 - t1:.2f} s, KR {t3 - t2:.2f} s "
            f"({counter.n - c0} compilations)")
        c0 = counter.n
        fit_t, satt_t, kr_t = [], [], []
        for _ in range(reps):
            del res
            gc.collect()
            t0 = time.perf_counter()
            res = lmmjax.lmer_batch(FORMULA, obs, Y, progress=False)
            t1 = time.perf_counter()
            satt = res.coef_table("condition")
            t2 = time.perf_counter()
            fit_t.append(t1 - t0)
            satt_t.append(t2 - t1)
            gc.collect()
            t0 = time.perf_counter()
            kr = res.coef_table("condition", ddf="kenward-roger")
            kr_t.append(time.perf_counter() - t0)
        out["recompiles"] = counter.n - c0
    total = [a + b for a, b in zip(fit_t, satt_t)]
    out.update(fit_all=fit_t, satt_all=satt_t, total_all=total, kr_all=kr_t, fit=median(fit_t),
               satt=median(satt_t), total=median(total), kr=median(kr_t), satt_table=satt, kr_table=kr,
               loglik=res.loglik.to_numpy(), theta=res.theta.to_numpy()[:, 0], converged=int(res.converged.sum()),
               singular_mask=res.is_singular.to_numpy(), singular=int(res.is_singular.sum()),
               failed=int(res.errors.notna().sum()))
    return out


def pertpy_compare(obs, Y, G: int, seed: int) -> dict:
    """lmmjax.LmerDE (random donor effect) against pertpy's own Statsmodels method (OLS per
    gene) on the same AnnData of counts (pertpy's Statsmodels requires integer data):
    warm fit + one contrast each; pertpy on at most 200 genes (it loops in Python)."""
    import anndata as ad
    import pertpy

    import lmmjax

    rng = np.random.default_rng(seed + 4)
    counts = rng.poisson(np.exp(np.clip(Y[:, :G] / 4.0, -3, 3)) * 3.0).astype(float)
    a = ad.AnnData(X=counts, obs=obs.reset_index(drop=True).set_axis([f"c{i}" for i in range(len(obs))]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(G)]))

    def lmerde():
        de = lmmjax.LmerDE(a, "~ condition + (1 | donor)")
        de.fit()
        return de.test_contrasts(de.contrast("condition", "ctrl", "stim"))

    lmerde()
    t0 = time.perf_counter()
    lmerde()
    t_lmm = time.perf_counter() - t0
    sm_G = min(G, 200)
    sub = a[:, :sm_G].copy()
    t0 = time.perf_counter()
    model = pertpy.tl.Statsmodels(sub, design="~condition")
    model.fit()
    model.test_contrasts(model.contrast("condition", "ctrl", "stim"))
    t_sm = time.perf_counter() - t0
    return dict(G=G, sm_G=sm_G, lmerde=t_lmm, statsmodels=t_sm, version=pertpy.__version__)


def lmmjax_warm_simple(formula, obs, Y, reps, counter, log, budget=None, **kw) -> dict:
    """Warm-up (compiles), then up to `reps` timed lmer_batch + Satterthwaite coef_table
    (fewer if they would exceed `budget` seconds)."""
    import lmmjax

    out: dict = {}
    with quiet_lmmjax(out):
        c0 = counter.n
        t0 = time.perf_counter()
        res = lmmjax.lmer_batch(formula, obs, Y, progress=False, **kw)
        res.coef_table("condition")
        first = time.perf_counter() - t0
        out["first"], out["first_compiles"] = first, counter.n - c0
        log(f"  warm-up {first:.2f} s ({counter.n - c0} compilations)")
        c0 = counter.n
        times = []
        for i in range(reps):
            if budget is not None and times and sum(times) + times[-1] > budget:
                break
            del res
            gc.collect()
            t0 = time.perf_counter()
            res = lmmjax.lmer_batch(formula, obs, Y, progress=False, **kw)
            tab = res.coef_table("condition")
            times.append(time.perf_counter() - t0)
        out["recompiles"] = counter.n - c0
    out.update(times=times, med=median(times), table=tab, loglik=res.loglik.to_numpy(),
               theta=res.theta.to_numpy()[:, 0], converged=int(res.converged.sum()),
               singular=int(res.is_singular.sum()), failed=int(res.errors.notna().sum()))
    return out


# ----------------------------------------------------------------------------- statsmodels
def statsmodels_genes(obs: pd.DataFrame, Y: np.ndarray, genes: np.ndarray) -> dict:
    """MixedLM per gene, smf.mixedlm("y ~ condition", groups="donor").fit(reml=True); timed
    in this process (imports and a warm-up fit excluded)."""
    import statsmodels.formula.api as smf

    base = pd.DataFrame({"donor": obs["donor"].astype(str), "condition": obs["condition"].astype(str)})
    rows, n_warn = [], 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        smf.mixedlm("y ~ condition", base.assign(y=Y[:, genes[0]]), groups="donor").fit(reml=True)  # warm-up
        n0 = len(rec)
        t0 = time.perf_counter()
        fits = []
        for g in genes:
            fits.append(smf.mixedlm("y ~ condition", base.assign(y=Y[:, g]), groups="donor").fit(reml=True))
        elapsed = time.perf_counter() - t0
        n_warn = len(rec) - n0
        kinds = sorted({w.category.__name__ for w in rec[n0:]})
        name = "condition[T.stim]"
        for f in fits:
            rows.append(dict(estimate=float(f.fe_params[name]), se=float(f.bse_fe[name]), p=float(f.pvalues[name]),
                             loglik=float(f.llf), converged=bool(f.converged)))
    return dict(time=elapsed, per_gene=elapsed / len(genes), n=len(genes), warnings=n_warn, warning_kinds=kinds,
                table=pd.DataFrame(rows, index=genes))


# ----------------------------------------------------------------------------- R
R_SCRIPT = r"""
suppressPackageStartupMessages({{library(lmerTest); library(pbkrtest)}})
d <- read.csv("{csv}")
d$donor <- factor(d$donor)
d$condition <- factor(d$condition, levels = c("{c0}", "{c1}"))
genes <- setdiff(names(d), c("donor", "condition"))
ns <- {n_satt}; nk <- {n_kr}
f <- y ~ condition + (1 | donor)
fit1 <- function(g) {{ d$y <- d[[g]]; suppressMessages(lmer(f, data = d, REML = TRUE)) }}
# warm-up, not timed
invisible(summary(fit1(genes[1]), ddf = "Satterthwaite"))
invisible(summary(fit1(genes[1]), ddf = "Kenward-Roger"))
# lme4 + lmerTest, Satterthwaite, per gene
fits <- vector("list", ns); satt <- matrix(NA_real_, ns, 5)
t0 <- proc.time()[["elapsed"]]
for (i in seq_len(ns)) {{
  fits[[i]] <- fit1(genes[i])
  satt[i, ] <- coef(summary(fits[[i]], ddf = "Satterthwaite"))["{coef}", ]
}}
t_satt <- proc.time()[["elapsed"]] - t0
# lme4 + lmerTest, Kenward-Roger summary (pbkrtest), per gene
kr <- matrix(NA_real_, nk, 5)
t0 <- proc.time()[["elapsed"]]
for (i in seq_len(nk)) {{
  fit <- fit1(genes[i])
  kr[i, ] <- coef(summary(fit, ddf = "Kenward-Roger"))["{coef}", ]
}}
t_kr <- proc.time()[["elapsed"]] - t0
ll <- sapply(fits, function(m) as.numeric(logLik(m)))
sing <- sapply(fits, function(m) as.integer(isSingular(m)))
th <- sapply(fits, function(m) lme4::getME(m, "theta")[[1]])
colnames(satt) <- colnames(kr) <- c("estimate", "se", "df", "t", "p")
write.csv(data.frame(gene = genes[seq_len(ns)], satt, loglik = ll, singular = sing, theta = th),
          "{out_satt}", row.names = FALSE)
write.csv(data.frame(gene = genes[seq_len(nk)], kr), "{out_kr}", row.names = FALSE)
cat("TIME_SATT", t_satt, "\n")
cat("TIME_KR", t_kr, "\n")
cat("VERSIONS", as.character(getRversion()), as.character(packageVersion("lme4")),
    as.character(packageVersion("lmerTest")), as.character(packageVersion("pbkrtest")), "\n")
"""


def r_genes(obs: pd.DataFrame, Y: np.ndarray, genes: np.ndarray, n_kr: int, tmp: Path) -> dict:
    """One Rscript: lmer + summary(ddf = "Satterthwaite") per gene for `genes`, then lmer +
    summary(ddf = "Kenward-Roger") for the first `n_kr`; loops timed inside R (proc.time)."""
    csv = tmp / "r_genes.csv"
    cols = {f"g{g}": Y[:, g] for g in genes}
    pd.DataFrame({"donor": obs["donor"].astype(str), "condition": obs["condition"].astype(str), **cols}) \
        .to_csv(csv, index=False, float_format="%.17g")
    out_s, out_k = tmp / "r_satt.csv", tmp / "r_kr.csv"
    script = R_SCRIPT.format(csv=csv, c0=CONDITIONS[0], c1=CONDITIONS[1], n_satt=len(genes), n_kr=n_kr,
                             coef=COEF, out_satt=out_s, out_kr=out_k)
    rfile = tmp / "genes.R"
    rfile.write_text(script)
    dt, stdout = wall(["Rscript", str(rfile)], timeout=R_TIMEOUT, tail=3000)
    lines = {ln.split()[0]: ln.split()[1:] for ln in stdout.splitlines() if ln.strip()}
    satt = pd.read_csv(out_s).set_index("gene")
    kr = pd.read_csv(out_k).set_index("gene")
    satt.index = genes
    kr.index = genes[:n_kr]
    t_s, t_k = float(lines["TIME_SATT"][0]), float(lines["TIME_KR"][0])
    return dict(satt=satt, kr=kr, time_satt=t_s, time_kr=t_k, per_gene_satt=t_s / len(genes),
                per_gene_kr=t_k / max(n_kr, 1), n_satt=len(genes), n_kr=n_kr, versions=lines.get("VERSIONS"),
                wall=dt)


# ----------------------------------------------------------------------------- comparisons
def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(a - b) / np.abs(b)


def _mx(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.max(x)) if x.size else float("nan")


def _md(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def compare_tables(j: pd.DataFrame, r: pd.DataFrame, cols=("estimate", "se", "df", "p"), mask=None) -> dict:
    """max / median relative difference |j - r| / |r| per column (rows where `mask`), and the
    estimate difference in units of r's se."""
    mask = np.ones(len(r), bool) if mask is None else np.asarray(mask, bool)
    out = {"n": int(mask.sum())}
    for c in cols:
        d = rel(j[c].to_numpy()[mask], r[c].to_numpy()[mask])
        out[c] = dict(max=_mx(d), median=_md(d))
    out["estimate_in_se"] = _mx(np.abs(j["estimate"].to_numpy()[mask] - r["estimate"].to_numpy()[mask])
                                / r["se"].to_numpy()[mask])
    return out


def float32_compare(t32: pd.DataFrame, t64: pd.DataFrame, ll32, ll64) -> dict:
    out = {}
    dll = np.asarray(ll32) - np.asarray(ll64)
    out["dll_min"], out["dll_max"] = -_mx(-dll), _mx(dll)
    out["dll_below_1e-2"] = int(np.sum(dll < -1e-2))
    for c in ("estimate", "se", "df", "p"):
        d = rel(t32[c].to_numpy(), t64[c].to_numpy())
        out[c] = dict(max=_mx(d), median=_md(d))
    out["estimate_in_se"] = _mx(np.abs(t32["estimate"] - t64["estimate"]) / t64["se"])
    dp = rel(t32["p"].to_numpy(), t64["p"].to_numpy())
    out["p_rel_gt_1e-3"] = int(np.sum(~(dp <= 1e-3)))
    out["p_abs_max"] = _mx(np.abs(t32["p"] - t64["p"]))
    sig32, sig64 = t32["p_adj"].to_numpy() < 0.05, t64["p_adj"].to_numpy() < 0.05
    out["calls_differ"] = int(np.sum(sig32 != sig64))
    out["not_converged_32"] = int((~t32["converged"].astype(bool)).sum())
    out["not_converged_64"] = int((~t64["converged"].astype(bool)).sum())
    return out


def de_calls(tab: pd.DataFrame, de: np.ndarray, alpha=0.05) -> dict:
    sig = tab["p_adj"].to_numpy() < alpha
    return dict(true_pos=int(np.sum(sig & de)), n_de=int(de.sum()), false_pos=int(np.sum(sig & ~de)),
                n_null=int((~de).sum()), null_p_below_05=float(np.mean(tab["p"].to_numpy()[~de] < 0.05)))


# ----------------------------------------------------------------------------- report
def fs(x):
    """Seconds, compact."""
    if x is None or not np.isfinite(x):
        return "-"
    if x < 0.1:
        return f"{x * 1000:.1f} ms"
    if x < 100:
        return f"{x:.2f} s"
    if x < 7200:
        return f"{x:.0f} s ({x / 60:.1f} min)"
    return f"{x:.0f} s ({x / 3600:.1f} h)"


def fr(a, b):
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x"


def fe(x):
    return "-" if x is None or not np.isfinite(x) else f"{x:.1e}"


def runs(xs):
    return "(" + ", ".join(f"{x:.3f}" for x in xs) + ")"


def report(R: dict, args, sections: dict, wall_total: float) -> str:  # noqa: C901
    out = []
    w = out.append
    rv = R.get("r", {}).get("versions")
    w(f"lmmjax.lmer_batch benchmark  ({machine_info()}"
      + (f"; R {rv[0]}, lme4 {rv[1]}, lmerTest {rv[2]}, pbkrtest {rv[3]})" if rv else ")"))
    w(f"lmmjax source: {git_state()}"
      + (f"; XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    dd = R.get("data", {})
    w(f"data: {dd.get('n')} cells x {dd.get('G')} genes (float64), {N_DONORS} donors x 2 conditions, cells per "
      f"donor x condition {dd.get('group_min')}-{dd.get('group_max')}; donor SD 0 for {dd.get('zero_sd')} genes, "
      f"condition effect for {dd.get('n_de')} genes")
    w(f"model {FORMULA!r}, REML, Satterthwaite t test of {COEF}; wall clock; warm = median of {args.reps} after a "
      f"warm-up; fresh = new python process, no persistent compilation cache")
    w("")

    # 1-2. lmmjax
    w("== lmmjax, main model ==")
    G = dd.get("G")
    fr_ = R.get("fresh")
    if fr_:
        w(f"  fresh process: total {fs(fr_['total'])} {runs(fr_['runs'])}  = python + imports {fs(fr_['imports'])}"
          f" + load data -> done {fs(fr_['inside'])} (load {fs(fr_['load'])}, lmer_batch {fs(fr_['fit'])}, "
          f"coef_table {fs(fr_['table'])});  peak RSS {fr_['rss_peak_mb']:.0f} MB")
        if "fresh_vs_warm_p" in R:
            w(f"    same p values as the warm run: max |diff| {R['fresh_vs_warm_p']:.1e}")
    m = R.get("main")
    if m:
        w(f"  warm: lmer_batch + Satterthwaite coef_table {fs(m['total'])} {runs(m['total_all'])} -> "
          f"{G / m['total']:,.0f} genes/s  (lmer_batch {fs(m['fit'])}, coef_table {fs(m['satt'])}); "
          f"recompilations during the timed runs: {m['recompiles']}")
        f0 = m["first"]
        w(f"    warm-up (compiles {f0['compiles']}): lmer_batch {fs(f0['fit'])}, Satterthwaite {fs(f0['satt'])}, "
          f"KR {fs(f0['kr'])}")
        w(f"  Kenward-Roger coef_table on a fresh result (warm): {fs(m['kr'])} {runs(m['kr_all'])}; "
          f"KR / lmer_batch = {m['kr'] / m['fit']:.2f}")
        w(f"  fits: {m['converged']}/{G} converged, {m['singular']} singular, {m['failed']} failed")
        if "calls" in R:
            c = R["calls"]
            w(f"  BH 5%: {c['true_pos']}/{c['n_de']} true condition effects found, {c['false_pos']}/{c['n_null']} "
              f"false positives; null genes with p < 0.05: {c['null_p_below_05']:.3f}")
        if m.get("warnings"):
            w("  warnings: " + " | ".join(m["warnings"][:4]))
    w("")

    # 3. floor
    fl = R.get("floor")
    if fl:
        w("== floor: one numpy pass, ZᵀY + XᵀY + column sums of squares of the n x G float64 Y ==")
        w(f"  {fs(fl['med'])} {runs(fl['times'])};  lmmjax warm / floor = {fr(m['total'], fl['med']) if m else '-'}"
          + (f";  fresh process (load -> done) / floor = {fr(fr_['inside'], fl['med'])}" if fr_ else ""))
        w("")

    # 4. peers
    w("== peers (per gene on a sample, extrapolated to all genes) ==")
    rows = []
    sm, rr = R.get("statsmodels"), R.get("r")
    jw = m["total"] if m else float("nan")
    jf = fr_["total"] if fr_ else float("nan")
    jkr = (m["fit"] + m["satt"] + m["kr"]) if m else float("nan")
    if sm:
        ext = sm["per_gene"] * G
        rows.append(["statsmodels MixedLM (Wald z)", str(sm["n"]), fs(sm["per_gene"]), fs(ext), fr(ext, jw), fr(ext, jf)])
    if rr:
        ext = rr["per_gene_satt"] * G
        rows.append(["lme4 + lmerTest, Satterthwaite", str(rr["n_satt"]), fs(rr["per_gene_satt"]), fs(ext),
                     fr(ext, jw), fr(ext, jf)])
        ext = rr["per_gene_kr"] * G
        rows.append(["lme4 + lmerTest, Kenward-Roger", str(rr["n_kr"]), fs(rr["per_gene_kr"]), fs(ext),
                     fr(ext, jkr), "-"])
    if rows:
        out.extend("  " + ln for ln in text_table(
            ["tool", "genes timed", "per gene", f"all {G} genes", "/ lmmjax warm", "/ lmmjax fresh"], rows))
        w("  peer times exclude R / Python start-up and imports (a warm-up fit first); lmmjax warm = lmer_batch + "
          "Satterthwaite table;")
        w("  the Kenward-Roger row is divided by lmmjax warm lmer_batch + Satterthwaite + KR tables"
          + (f" ({fs(jkr)})" if m else ""))
        if sm and sm["warnings"]:
            w(f"  statsmodels: {sm['warnings']} warnings ({', '.join(sm['warning_kinds'])}), "
              f"{int((~sm['table']['converged']).sum())} not converged, over {sm['n']} genes")
    else:
        w("  (no peers run)")
    w("")

    # 5. accuracy
    w("== accuracy on the sampled genes ==")
    acc = R.get("acc_r")
    if acc:
        w("  vs lme4 + lmerTest, Satterthwaite (rel. diff |lmmjax - R| / |R|, max / median; est in R se units = "
          "max |diff| / se)")
        rows = []
        for label, key in (("all genes", "all"), ("non-singular in both", "nonsing"), ("singular in either", "sing")):
            c = acc.get(key)
            if not c or c["n"] == 0:
                continue
            rows.append([label, str(c["n"])] + [f"{fe(c[k]['max'])} / {fe(c[k]['median'])}"
                                                for k in ("estimate", "se", "df", "p")] + [fe(c["estimate_in_se"])])
        ck = R.get("acc_r_kr")
        if ck:
            rows.append(["Kenward-Roger (all)", str(ck["n"])] + [f"{fe(ck[k]['max'])} / {fe(ck[k]['median'])}"
                                                               for k in ("estimate", "se", "df", "p")]
                        + [fe(ck["estimate_in_se"])])
        out.extend("  " + ln for ln in text_table(["genes", "n", "estimate", "se", "df", "p", "est/se"], rows))
        a = R["acc_r_ll"]
        w(f"  REML logLik lmmjax - lme4: max {a['max']:+.1e}, min {a['min']:+.1e}; |diff| > 1e-6 in {a['n_diff']} genes "
          f"(lmmjax higher in {a['jax_higher']}); singular: lmmjax {a['sing_jax']}, lme4 {a['sing_r']}, "
          f"disagree {a['sing_disagree']}")
        for ln in R.get("acc_r_worst", []):
            w("    " + ln)
    else:
        w("  lmerTest: not run")
    accs = R.get("acc_sm")
    if accs:
        w(f"  vs statsmodels ({accs['n']} genes): estimate rel. diff max {fe(accs['estimate']['max'])} / median "
          f"{fe(accs['estimate']['median'])} (max {fe(accs['estimate_in_se'])} se); se rel. diff max "
          f"{fe(accs['se']['max'])} / median {fe(accs['se']['median'])}; REML logLik lmmjax - statsmodels max "
          f"{accs['ll_max']:+.1e}, min {accs['ll_min']:+.1e} (lmmjax higher by > 1e-4 in {accs['ll_jax_higher']}"
          + (f"; statsmodels logLik not finite in {accs['ll_nonfinite']}" if accs["ll_nonfinite"] else "") + ")")
        w("    (statsmodels' se comes from the joint Hessian of fixed effects and variance parameters, so it is "
          "not expected to match lme4/lmmjax exactly)")
    w("")

    # 6. float32
    f32 = R.get("float32")
    if f32:
        c = f32["cmp"]
        w("== float32 (lmer_batch(..., dtype='float32'), same data) vs float64 ==")
        w(f"  warm {fs(f32['med'])} {runs(f32['times'])} (float64 {fs(m['total']) if m else '-'}); warm-up "
          f"{fs(f32['first'])}")
        rows = [[k, fe(c[k]["max"]), fe(c[k]["median"])] for k in ("estimate", "se", "df", "p")]
        out.extend("  " + ln for ln in text_table(["relative error", "max", "median"], rows))
        w(f"  estimate error in se units: max {fe(c['estimate_in_se'])}; p: max |diff| {fe(c['p_abs_max'])}, "
          f"{c['p_rel_gt_1e-3']} genes with rel. diff > 1e-3; BH 5% calls differ for {c['calls_differ']} genes")
        w(f"  converged = False: float32 {c['not_converged_32']}, float64 {c['not_converged_64']} (of {G})")
        w(f"  REML logLik float32 - float64: min {c['dll_min']:+.1e}, max {c['dll_max']:+.1e}; float32 lower by > 1e-2 "
          f"in {c['dll_below_1e-2']} genes (an optimum missed, not round-off)")
        for x in c.get("worst", []):
            w(f"    largest p diff: gene {x['gene']}: p {x['p64']:.4g} -> {x['p32']:.4g}, df {x['df64']:.5g} -> "
              f"{x['df32']:.5g}, theta {x['theta64']:.3g} -> {x['theta32']:.3g}, dlogLik {x['dll']:+.2g}")
        w("")

    # 6b. prior weights
    wt = R.get("weights")
    if wt:
        base = wt["none"]["med"]
        w("== prior weights (lmer_batch(..., weights=)), same data, each against an unweighted run here ==")
        w(f"  unweighted        {fs(base)} {runs(wt['none']['times'])}")
        for key, label in (("shared", "one shared vector"), ("per_gene", "n x G (voom-like)")):
            x = wt[key]
            w(f"  {label:<17} {fs(x['med'])} {runs(x['times'])}  = {x['med'] / base:.2f}x unweighted; "
              f"converged {x['converged']}, failed {x['failed']} of {G}")
        w("")

    # 6c. the pertpy interface
    pp = R.get("pertpy")
    if pp:
        w(f"== pertpy-style DE on {pp['G']} count genes (pertpy {pp['version']}) ==")
        w(f"  lmmjax.LmerDE('~ condition + (1 | donor)') fit + test_contrasts: {fs(pp['lmerde'])} "
          f"({pp['G'] / pp['lmerde']:,.0f} genes/s)")
        w(f"  pertpy Statsmodels('~ condition', OLS per gene, no donor effect) on {pp['sm_G']} genes: "
          f"{fs(pp['statsmodels'])} -> {pp['sm_G'] / pp['statsmodels']:,.0f} genes/s; "
          f"LmerDE is {pp['G'] / pp['lmerde'] / (pp['sm_G'] / pp['statsmodels']):.1f}x faster per gene")
        w("")

    # 7a. random slopes
    sl = R.get("slope")
    if sl:
        w(f"== random slopes {FORMULA_SLOPE!r}, {sl['G']} genes" + (f" (of {G}: --slope-genes)" if sl["G"] < G else "")
          + " ==")
        if "fresh" in sl:
            f = sl["fresh"]
            w(f"  fresh process: total {fs(f['total'])} (imports {fs(f['imports'])}, load -> done {fs(f['inside'])}: "
              f"lmer_batch {fs(f['fit'])}, coef_table {fs(f['table'])})")
        if "warm" in sl:
            ww = sl["warm"]
            w(f"  warm: {fs(ww['med'])} {runs(ww['times'])} -> {sl['G'] / ww['med']:,.0f} genes/s; warm-up "
              f"{fs(ww['first'])}; recompilations {ww['recompiles']}; {ww['converged']} converged, {ww['singular']} "
              f"singular, {ww['failed']} failed")
            if len(ww["times"]) < args.reps:
                w(f"  (only {len(ww['times'])} warm repetition(s): {SLOPE_WARM_BUDGET:.0f} s budget)")
        w("")

    # 7b. sparse
    spr = R.get("sparse")
    if spr:
        w(f"== sparse: {spr['n']} cells x {spr['G']} genes CSR counts (float32 values), {100 * spr['density']:.1f}% "
          f"nonzero ({spr['nnz']:,} nonzeros, {spr['bytes'] / 1e9:.2f} GB), {FORMULA!r} ==")
        w(f"  simulated in {fs(spr['build'])}")
        if "fresh" in spr:
            f = spr["fresh"]
            w(f"  fresh process: total {fs(f['total'])} = python + imports {fs(f['imports'])} + load -> done "
              f"{fs(f['inside'])} (load .npz {fs(f['load'])}, lmer_batch {fs(f['fit'])}, coef_table {fs(f['table'])})")
            w(f"    peak RSS {f['rss_peak_mb']:,.0f} MB (after loading the matrix {f['rss_load_mb']:,.0f} MB: "
              f"lmer_batch adds {f['rss_peak_mb'] - f['rss_load_mb']:,.0f} MB)")
        if "warm" in spr:
            ww = spr["warm"]
            w(f"  warm: {fs(ww['med'])} {runs(ww['times'])} -> {spr['G'] / ww['med']:,.0f} genes/s; recompilations "
              f"{ww['recompiles']}; {ww['converged']} converged, {ww['singular']} singular, {ww['failed']} failed")
        if "floor" in spr:
            w(f"  floor (scipy.sparse ZᵀY, XᵀY, sums of squares): {fs(spr['floor']['med'])} "
              f"{runs(spr['floor']['times'])}; lmmjax warm / floor = "
              f"{fr(spr['warm']['med'], spr['floor']['med']) if 'warm' in spr else '-'}")
        if "calls" in spr:
            c = spr["calls"]
            w(f"  BH 5%: {c['true_pos']}/{c['n_de']} true condition effects found, {c['false_pos']}/{c['n_null']} "
              f"false positives (raw counts fitted as a Gaussian response)")
        w("")

    # errors
    if R.get("errors"):
        w("== sections that failed ==")
        for k, v in R["errors"].items():
            w(f"  {k}: {v}")
        w("")

    # 8. targets
    w(f"== targets ({G} genes, main model) ==")
    rows = []

    def target(label, value, ok, note=""):
        rows.append([label, value, "-" if ok is None else ("PASS" if ok else "FAIL"), note])

    if fr_:
        target(f"fresh process < {FRESH_TARGET:g} s (total wall incl. python + imports)", fs(fr_["total"]),
               fr_["total"] < FRESH_TARGET, f"load -> done {fs(fr_['inside'])}")
    else:
        target(f"fresh process < {FRESH_TARGET:g} s", "-", None, "not measured")
    if m:
        target(f"warm < {WARM_TARGET:g} s (lmer_batch + Satterthwaite table)", fs(m["total"]), m["total"] < WARM_TARGET,
               f"{G / m['total']:,.0f} genes/s")
    if rr and m:
        ext = rr["per_gene_satt"] * G
        target(f">= {R_SPEEDUP_TARGET:g}x faster than lme4 + lmerTest (lmmjax warm)", fr(ext, m["total"]),
               ext / m["total"] >= R_SPEEDUP_TARGET, f"R {fs(ext)} extrapolated")
        if fr_:   # the issue ties the 500x to the warm run ("under 1 s warm (>= 500x ...)")
            target("speed-up over lme4 + lmerTest, lmmjax fresh (information)", fr(ext, fr_["total"]), None,
                   "fresh total wall, compile included")
    else:
        target(f">= {R_SPEEDUP_TARGET:g}x faster than lme4 + lmerTest", "-", None, "R not run")
    if fl and m:
        target(f"within {FLOOR_TARGET:g}x of the numpy floor (warm / floor)", fr(m["total"], fl["med"]),
               m["total"] / fl["med"] <= FLOOR_TARGET, f"floor {fs(fl['med'])}")
    if m:
        target("Kenward-Roger adds <= the fit (KR / lmer_batch, warm)", f"{m['kr'] / m['fit']:.2f}",
               m["kr"] <= KR_TARGET * m["fit"], f"KR {fs(m['kr'])}, fit {fs(m['fit'])}")
    out.extend("  " + ln for ln in text_table(["target", "measured", "", "note"], rows))
    w("")
    w("section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()))
    w(f"total benchmark wall time {wall_total:.0f} s")
    return "\n".join(out)


# ----------------------------------------------------------------------------- json
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, pd.DataFrame):
        return None if len(x) > 200 else json.loads(x.to_json(orient="split"))
    if isinstance(x, np.ndarray):
        return None if x.size > 200 else _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, default=10_000, help="genes of the dense design (default 10000)")
    p.add_argument("--cells", type=int, default=2_000, help="cells of the dense design (default 2000)")
    p.add_argument("--sparse-cells", type=int, default=100_000, help="cells of the sparse run (default 100000)")
    p.add_argument("--sparse-genes", type=int, default=20_000, help="genes of the sparse run (default 20000)")
    p.add_argument("--sparse-density", type=float, default=0.06, help="mean fraction of nonzeros (default 0.06)")
    p.add_argument("--slope-genes", type=int, default=None, help="genes for the random-slope model (default: --genes)")
    p.add_argument("--sm-genes", type=int, default=20, help="genes fitted with statsmodels (default 20)")
    p.add_argument("--r-genes", type=int, default=100, help="genes fitted with lme4 + lmerTest (default 100)")
    p.add_argument("--r-kr-genes", type=int, default=30, help="of those, with the Kenward-Roger summary (default 30)")
    p.add_argument("--reps", type=int, default=3, help="warm repetitions (default 3)")
    p.add_argument("--fresh-reps", type=int, default=1, help="fresh processes per measurement (default 1)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--no-r", action="store_true", help="skip lme4 + lmerTest (Rscript)")
    p.add_argument("--no-statsmodels", action="store_true")
    p.add_argument("--no-slope", action="store_true", help="skip the random-slope model")
    p.add_argument("--no-sparse", action="store_true", help="skip the sparse run")
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-process timings")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 500 cells x 1000 genes, sparse 5000 x 1000, 200 slope genes, few peer genes")
    p.add_argument("--hang-timeout", type=float, default=900.0,
                   help="seconds after which a section counts as hung: dump all threads' stacks, save a partial "
                        "report and exit with status 3 (default 900)")
    p.add_argument("--single-thread-eigen", action="store_true",
                   help=f"run with XLA_FLAGS={SINGLE_EIGEN_FLAG} (here and in the fresh processes): the "
                        "workaround for XLA CPU's Eigen pool occasionally wedging on large vmapped programs")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where batch.md / batch.json go")
    args = p.parse_args(argv)
    if args.single_thread_eigen:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_EIGEN_FLAG).strip()
    if args.quick:
        args.genes, args.cells = 1000, 500
        args.sparse_cells, args.sparse_genes = 5000, 1000
        args.slope_genes = args.slope_genes or 200
        args.sm_genes, args.r_genes, args.r_kr_genes = 5, 10, 5
    args.slope_genes = min(args.slope_genes or args.genes, args.genes)
    args.r_kr_genes = min(args.r_kr_genes, args.r_genes)

    disable_persistent_cache()     # in-process: no persistent compilation cache (before lmmjax is imported)
    t_start = time.perf_counter()
    log = stderr_log(t_start)
    use_r = use_rscript(args.no_r, "lme4 + lmerTest")
    use_sm = not args.no_statsmodels
    if use_sm:
        try:
            import statsmodels  # noqa: F401
        except ImportError:
            log("statsmodels not importable: skipped")
            use_sm = False
    import lmmjax  # noqa: F401

    R: dict = {"args": vars(args).copy(), "errors": {}}
    R["args"]["out_dir"] = str(args.out_dir)
    sections: dict[str, float] = {}

    def save(text):
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "batch.md").write_text("# lmmjax.lmer_batch benchmark\n\n```text\n" + text + "\n```\n")
        R["sections"] = sections
        R["wall_total"] = time.perf_counter() - t_start
        with open(args.out_dir / "batch.json", "w") as f:
            json.dump(_jsonable(R), f, indent=1)

    def hung(name, t0):
        """Watchdog: a section ran past --hang-timeout (seen: XLA CPU waiting forever for a vmapped
        program's result, every worker thread idle).  Stacks to stderr, partial report, exit 3."""
        log(f"{name}: no progress after {args.hang_timeout:.0f} s; stacks of all threads follow")
        faulthandler.dump_traceback(all_threads=True)
        R["errors"][name] = f"hung (> {args.hang_timeout:.0f} s); benchmark stopped, report partial"
        sections[name] = time.perf_counter() - t0
        try:
            text = report(R, args, sections, time.perf_counter() - t_start)
            print(text, flush=True)
            save(text)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os._exit(3)

    @contextlib.contextmanager
    def section(name):
        log(name)
        t0 = time.perf_counter()
        dog = threading.Timer(args.hang_timeout, hung, (name, t0))
        dog.daemon = True
        dog.start()
        try:
            yield
        except Exception as e:  # keep going: report what failed
            traceback.print_exc()
            R["errors"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        finally:
            dog.cancel()
            sections[name] = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="lmmjax_batchbench_"))
    counter = CompileCounter()
    rng = np.random.default_rng(args.seed + 1)
    try:
        # ---------------------------------------------------------------- data
        with section("simulate"):
            obs0, Y, gp = simulate_dense(args.cells, args.genes, args.seed)
            obs_csv, y_npy = tmp / "obs.csv", tmp / "Y.npy"
            obs0.to_csv(obs_csv, index=False)
            np.save(y_npy, Y)
            obs = pd.read_csv(obs_csv, dtype={"donor": "category", "condition": "category"})  # as the child reads it
            grp = pd.crosstab(obs["donor"], obs["condition"]).to_numpy()
            R["data"] = dict(n=args.cells, G=args.genes, group_min=int(grp.min()), group_max=int(grp.max()),
                             zero_sd=int((gp["donor_sd"] == 0).sum()), n_de=int(gp["de"].sum()))
            sample = rng.choice(args.genes, size=min(args.genes, max(args.r_genes, args.sm_genes)), replace=False)

        # ---------------------------------------------------------------- lmmjax
        if not args.no_fresh:
            with section("lmmjax fresh"):
                R["fresh"] = lmmjax_fresh(FORMULA, obs_csv, y_npy, tmp / "fresh_out.npy", args.fresh_reps)
                log(f"  fresh process total {R['fresh']['total']:.2f} s, load -> done {R['fresh']['inside']:.2f} s")
        with section("lmmjax warm + KR"):
            m = R["main"] = lmmjax_main(obs, Y, args.reps, counter, log)
            log(f"  warm {m['total']:.3f} s, KR {m['kr']:.3f} s")
            R["calls"] = de_calls(m["satt_table"], gp["de"])
            if "fresh" in R:
                R["fresh_vs_warm_p"] = _mx(np.abs(R["fresh"]["results"][:, 3] - m["satt_table"]["p"].to_numpy()))
        with section("floor"):
            R["floor"] = dense_floor(obs, Y, args.reps)

        # ---------------------------------------------------------------- peers
        if use_sm:
            with section("statsmodels"):
                R["statsmodels"] = sm = statsmodels_genes(obs, Y, sample[:args.sm_genes])
                log(f"  {sm['per_gene'] * 1000:.0f} ms per gene")
                if "main" in R:
                    jt = R["main"]["satt_table"].iloc[sm["table"].index]
                    c = compare_tables(jt, sm["table"].set_axis(jt.index), cols=("estimate", "se"))
                    dll = R["main"]["loglik"][sm["table"].index] - sm["table"]["loglik"].to_numpy()
                    c.update(ll_max=_mx(dll), ll_min=-_mx(-dll), ll_jax_higher=int(np.sum(dll > 1e-4)),
                             ll_nonfinite=int(np.sum(~np.isfinite(sm["table"]["loglik"].to_numpy()))))
                    R["acc_sm"] = c
        if use_r:
            with section("R lme4 + lmerTest"):
                R["r"] = rr = r_genes(obs, Y, sample[:args.r_genes], args.r_kr_genes, tmp)
                log(f"  Satterthwaite {rr['per_gene_satt'] * 1000:.0f} ms per gene, KR {rr['per_gene_kr'] * 1000:.0f} ms")
                if "main" in R:
                    mm = R["main"]
                    idx = rr["satt"].index
                    jt = mm["satt_table"].iloc[idx]
                    rt = rr["satt"].set_axis(jt.index)
                    sj = mm["singular_mask"][idx]
                    sr = rt["singular"].to_numpy().astype(bool)
                    R["acc_r"] = {"all": compare_tables(jt, rt), "nonsing": compare_tables(jt, rt, mask=~sj & ~sr),
                                  "sing": compare_tables(jt, rt, mask=sj | sr)}
                    kt = mm["kr_table"].iloc[rr["kr"].index]
                    R["acc_r_kr"] = compare_tables(kt, rr["kr"].set_axis(kt.index))
                    dll = mm["loglik"][idx] - rt["loglik"].to_numpy()
                    R["acc_r_ll"] = dict(max=float(dll.max()), min=float(dll.min()),
                                         n_diff=int(np.sum(np.abs(dll) > 1e-6)), jax_higher=int(np.sum(dll > 1e-6)),
                                         sing_jax=int(sj.sum()), sing_r=int(sr.sum()), sing_disagree=int(np.sum(sj != sr)))
                    # the genes with the largest df and p differences
                    worst = []
                    for col in ("df", "p", "se"):
                        d = rel(jt[col].to_numpy(), rt[col].to_numpy())
                        if not np.isfinite(d).any():
                            continue
                        i = int(np.nanargmax(d))
                        worst.append(f"largest {col} diff: gene {jt.index[i]}: lmmjax {jt[col].iloc[i]:.6g} vs R "
                                     f"{rt[col].iloc[i]:.6g} (rel {d[i]:.1e}); singular lmmjax {bool(sj[i])} / R "
                                     f"{bool(sr[i])}, R theta {rt['theta'].iloc[i]:.3g}, dlogLik {dll[i]:+.1e}")
                    R["acc_r_worst"] = worst

        # ---------------------------------------------------------------- float32
        with section("float32"):
            f32 = lmmjax_warm_simple(FORMULA, obs, Y, args.reps, counter, log, dtype="float32")
            R["float32"] = dict(first=f32["first"], times=f32["times"], med=f32["med"], recompiles=f32["recompiles"])
            if "main" in R:
                R["float32"]["cmp"] = c = float32_compare(f32["table"], R["main"]["satt_table"], f32["loglik"],
                                                          R["main"]["loglik"])
                worst = np.argsort(np.abs(f32["table"]["p"].to_numpy() - R["main"]["satt_table"]["p"].to_numpy()))
                c["worst"] = [dict(gene=R["main"]["satt_table"].index[i], p64=R["main"]["satt_table"]["p"].iloc[i],
                                   p32=f32["table"]["p"].iloc[i], df64=R["main"]["satt_table"]["df"].iloc[i],
                                   df32=f32["table"]["df"].iloc[i], theta64=R["main"]["theta"][i],
                                   theta32=f32["theta"][i], dll=f32["loglik"][i] - R["main"]["loglik"][i])
                              for i in worst[::-1][:3]]
            log(f"  float32 warm {f32['med']:.3f} s")
            del f32

        # ---------------------------------------------------------------- prior weights
        with section("weights"):
            wrng = np.random.default_rng(args.seed + 3)
            obs_w = obs.assign(w=wrng.uniform(0.3, 2.5, len(obs)))
            Wm = wrng.uniform(0.3, 2.5, size=Y.shape)      # per-gene precision weights, like voom's
            R["weights"] = {}
            for key, kw in (("none", {}), ("shared", dict(weights="w")), ("per_gene", dict(weights=Wm))):
                r_ = lmmjax_warm_simple(FORMULA, obs_w, Y, args.reps, counter, log, **kw)
                R["weights"][key] = {k: r_[k] for k in ("times", "med", "converged", "failed")}
                log(f"  {key}: warm {r_['med']:.3f} s")
            del Wm

        # ---------------------------------------------------------------- pertpy interface
        if importlib.util.find_spec("pertpy") is not None:
            with section("pertpy"):
                R["pertpy"] = pertpy_compare(obs, Y, min(args.genes, 2000), args.seed)
                log(f"  LmerDE {R['pertpy']['lmerde']:.2f} s, pertpy Statsmodels {R['pertpy']['statsmodels']:.2f} s "
                    f"on {R['pertpy']['sm_G']} genes")

        # ---------------------------------------------------------------- random slopes
        if not args.no_slope:
            Ys = Y[:, :args.slope_genes] if args.slope_genes < args.genes else Y
            R["slope"] = {"G": args.slope_genes}
            if not args.no_fresh:
                with section("slope fresh"):
                    ys_path = y_npy
                    if args.slope_genes < args.genes:
                        ys_path = tmp / "Y_slope.npy"
                        np.save(ys_path, np.ascontiguousarray(Ys))
                    R["slope"]["fresh"] = lmmjax_fresh(FORMULA_SLOPE, obs_csv, ys_path, tmp / "slope_out.npy",
                                                       args.fresh_reps)
                    log(f"  fresh total {R['slope']['fresh']['total']:.2f} s")
            with section("slope warm"):
                sw = lmmjax_warm_simple(FORMULA_SLOPE, obs, Ys, args.reps, counter, log, budget=SLOPE_WARM_BUDGET)
                for k in ("table", "loglik", "theta"):
                    sw.pop(k)
                R["slope"]["warm"] = sw
                log(f"  warm {sw['med']:.2f} s")
        del Y

        # ---------------------------------------------------------------- sparse
        if not args.no_sparse:
            import scipy.sparse as sp

            S = None
            with section("sparse simulate"):
                t0 = time.perf_counter()
                sobs, S, sgp = simulate_sparse(args.sparse_cells, args.sparse_genes, args.sparse_density, args.seed + 2)
                build = time.perf_counter() - t0
                s_csv, s_npz = tmp / "sparse_obs.csv", tmp / "sparse_Y.npz"
                sobs.to_csv(s_csv, index=False)
                sp.save_npz(s_npz, S, compressed=False)
                sobs = pd.read_csv(s_csv, dtype={"donor": "category", "condition": "category"})
                R["sparse"] = dict(n=args.sparse_cells, G=args.sparse_genes, nnz=int(S.nnz),
                                   density=S.nnz / (S.shape[0] * S.shape[1]),
                                   bytes=S.data.nbytes + S.indices.nbytes + S.indptr.nbytes, build=build)
                log(f"  {S.nnz:,} nonzeros ({R['sparse']['density']:.3f}) in {build:.1f} s")
            if S is not None:
                if not args.no_fresh:
                    with section("sparse fresh"):
                        R["sparse"]["fresh"] = lmmjax_fresh(FORMULA, s_csv, s_npz, tmp / "sparse_out.npy",
                                                            args.fresh_reps)
                        log(f"  fresh total {R['sparse']['fresh']['total']:.2f} s")
                with section("sparse warm"):
                    sw = lmmjax_warm_simple(FORMULA, sobs, S, args.reps, counter, log)
                    R["sparse"]["calls"] = de_calls(sw.pop("table"), sgp["de"])
                    sw.pop("loglik"), sw.pop("theta")
                    R["sparse"]["warm"] = sw
                    log(f"  warm {sw['med']:.2f} s")
                with section("sparse floor"):
                    R["sparse"]["floor"] = sparse_floor(sobs, S, args.reps)
                del S
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text = report(R, args, sections, time.perf_counter() - t_start)
    print(text)
    save(text)
    print(f"\nsaved to {args.out_dir / 'batch.md'} and batch.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
