"""The single-model engine against lme-python, mixedlm and lme4, in one run.

    python benchmarks/engine.py [--no-r] [--quick]

Rows (each tool in fresh subprocesses; ratios are peer time / lmmjax time, so > 1 means
lmmjax is faster; this machine is shared and noisy, so only same-run ratios mean much):

* ``sleepstudy warm``: median of 30 fits of ``Reaction ~ Days + (Days | Subject)`` after a
  first one, in one process;
* ``fresh: fit + summary``: a new process that imports the tool, fits sleepstudy and prints
  its summary with Satterthwaite p-values (lme4: lmerTest); lmmjax with its persistent
  compilation cache filled (run once before) and with no cache at all;
* ``20 new designs, median``: 20 different small designs (random group counts, sizes,
  covariates and random-effects terms) fitted one after another in one process, median
  seconds per design — lmmjax with no persistent cache, so each new shape bucket compiles;
* ``100k (1 + x | g)`` and ``100k (1 | g1) + (1 | g2)``: 100,000 rows, 1,000 (× 100)
  groups, the second fit in a process;
* ``150 designs RSS``: lmmjax's resident memory after 150 different designs in one process.

The REML criteria each tool reports are printed side by side (lower is better; they
should agree to ~1e-6 relative).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, cold_env, machine_info, text_table, use_rscript  # noqa: E402

SLEEP = "Reaction ~ Days + (Days | Subject)"
STRUCTS = ["(1 | g)", "(1 + x1 | g)", "(1 | g) + (1 | h)"]


def small_designs(n: int, seed: int = 7) -> list[tuple[str, pd.DataFrame]]:
    """n different small designs: group counts 5–60, 3–12 rows per group, 1–3 covariates,
    one of three random-effects structures."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ng, per, ncov = int(rng.integers(5, 61)), int(rng.integers(3, 13)), int(rng.integers(1, 4))
        g = np.repeat(np.arange(ng), per)
        nobs = g.size
        h = rng.integers(0, int(rng.integers(3, 9)), nobs)
        df = pd.DataFrame({f"x{j + 1}": rng.normal(size=nobs) for j in range(ncov)})
        df["y"] = (df.sum(axis=1) + rng.normal(size=ng)[g] * 1.5 + 0.5 * rng.normal(size=ng)[g] * df.x1
                   + rng.normal(size=8)[h] + rng.normal(size=nobs))
        df["g"], df["h"] = [f"g{v}" for v in g], [f"h{v}" for v in h]
        fixed = " + ".join(f"x{j + 1}" for j in range(ncov))
        out.append((f"y ~ {fixed} + {STRUCTS[i % 3]}", df))
    return out


def big(name: str) -> tuple[str, pd.DataFrame]:
    rng = np.random.default_rng(11)
    n = 100_000
    g1, g2 = rng.integers(0, 1000, n), rng.integers(0, 100, n)
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=1000)[g1] + 0.4 * rng.normal(size=1000)[g1] * x + rng.normal(size=n)
    if name == "slopes":
        return "y ~ x + (1 + x | g1)", pd.DataFrame(dict(y=y, x=x, g1=[f"a{v}" for v in g1]))
    y = y + 0.6 * rng.normal(size=100)[g2]
    return "y ~ x + (1 | g1) + (1 | g2)", pd.DataFrame(dict(y=y, x=x, g1=[f"a{v}" for v in g1],
                                                            g2=[f"b{v}" for v in g2]))


# ---------------------------------------------------------------- runners (one per tool)
PY = r'''
import json, resource, statistics, sys, time
t_start = time.perf_counter()
tool, task, path = sys.argv[1], sys.argv[2], sys.argv[3]
spec = json.loads(open(path).read())
if tool == "lmmjax":
    import lmmjax
    def fit(f, df):
        m = lmmjax.lmer(f, df, warn=False)
        return m, m.reml_criterion
    def summary(m):
        print(m.summary())
elif tool == "lme-python":
    import lme_python
    def fit(f, df):
        m = lme_python.lmer(f, df)
        c = m.reml_criterion
        return m, float(c() if callable(c) else c)
    def summary(m):
        print(m.summary())
        print(m.satterthwaite_p_values)
else:
    import mixedlm
    def fit(f, df):
        m = mixedlm.lmer(f, df)
        c = m.REMLcrit
        return m, float(c() if callable(c) else c)
    def summary(m):
        print(m.summary())
import pandas as pd
def load(p):
    df = pd.read_csv(p)
    for c in ("Subject", "g", "h", "g1", "g2"):
        if c in df:
            df[c] = df[c].astype(str)
    return df
out = {}
if task == "fresh":
    m, crit = fit(spec["formula"], load(spec["csv"]))
    summary(m)
    out = dict(seconds=time.perf_counter() - t_start, crit=crit)
elif task == "warm":
    df = load(spec["csv"])
    m, crit = fit(spec["formula"], df)
    ts = []
    for _ in range(spec["reps"]):
        t = time.perf_counter(); fit(spec["formula"], df); ts.append(time.perf_counter() - t)
    out = dict(seconds=statistics.median(ts), crit=crit)
else:   # "designs": each once, in order
    data = [(f, load(p)) for f, p in spec["designs"]]
    ts, crits = [], []
    for f, df in data:
        t = time.perf_counter(); _, c = fit(f, df); ts.append(time.perf_counter() - t); crits.append(c)
    rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    out = dict(seconds=statistics.median(ts), crits=crits, rss_mb=rss, total=sum(ts))
print("@@" + json.dumps(out))
'''

R = r'''
args <- commandArgs(TRUE); task <- args[1]; spec <- jsonlite::fromJSON(args[2])
t_start <- Sys.time()
suppressMessages({library(lme4); library(lmerTest)})
load <- function(p) { df <- read.csv(p); for (c in c("Subject", "g", "h", "g1", "g2")) if (!is.null(df[[c]])) df[[c]] <- factor(df[[c]]); df }
if (task == "fresh") {
  m <- lmer(as.formula(spec$formula), load(spec$csv)); print(summary(m))
  out <- sprintf('{"seconds": %.6f, "crit": %.10f}', as.numeric(Sys.time() - t_start, units = "secs"), REMLcrit(m))
} else if (task == "warm") {
  df <- load(spec$csv); f <- as.formula(spec$formula); m <- lme4::lmer(f, df)
  ts <- sapply(seq_len(spec$reps), function(i) { t0 <- Sys.time(); lme4::lmer(f, df); as.numeric(Sys.time() - t0, units = "secs") })
  out <- sprintf('{"seconds": %.6f, "crit": %.10f}', median(ts), REMLcrit(m))
} else {
  ds <- spec$designs; data <- lapply(ds[, 2], load); ts <- c(); cr <- c()
  for (i in seq_len(nrow(ds))) { t0 <- Sys.time(); m <- lme4::lmer(as.formula(ds[i, 1]), data[[i]]); ts <- c(ts, as.numeric(Sys.time() - t0, units = "secs")); cr <- c(cr, REMLcrit(m)) }
  out <- sprintf('{"seconds": %.6f, "crits": [%s], "total": %.4f}', median(ts), paste(sprintf("%.10f", cr), collapse = ", "), sum(ts))
}
cat("@@", out, "\n", sep = "")
'''


def run(tool: str, task: str, spec: dict, tmp: Path, env=None, timeout=1800) -> dict | str:
    path = tmp / f"spec_{tool}_{task}.json"
    path.write_text(json.dumps(spec))
    if tool == "lme4":
        cmd = ["Rscript", "-e", R, task, str(path)]
    else:
        cmd = [sys.executable, "-c", PY, tool, task, str(path)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    except subprocess.TimeoutExpired:
        return f"> {timeout} s"
    line = [x for x in p.stdout.splitlines() if x.startswith("@@")]
    if p.returncode != 0 or not line:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:80]
    return json.loads(line[-1][2:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the 100k-row and 150-design rows")
    ap.add_argument("--tools", default="lmmjax,lme-python,mixedlm,lme4")
    args = ap.parse_args()
    tools = [t for t in args.tools.split(",") if t != "lme4" or use_rscript(args.no_r, "lme4")]
    tmp = Path(tempfile.mkdtemp(prefix="lmmjax_engine_"))
    cache = tmp / "xla"
    filled = dict(clean_env(), LMMJAX_CACHE_DIR=str(cache))

    import lmmjax.datasets

    sleep = lmmjax.datasets.sleepstudy()
    sleep = pd.DataFrame(dict(Reaction=sleep.Reaction.to_numpy(float), Days=sleep.Days.to_numpy(float),
                              Subject=sleep.Subject.astype(str)))
    sleep.to_csv(tmp / "sleep.csv", index=False, float_format="%.17g")
    s_spec = dict(formula=SLEEP, csv=str(tmp / "sleep.csv"), reps=30)
    designs = []
    for i, (f, df) in enumerate(small_designs(150)):
        df.to_csv(tmp / f"d{i}.csv", index=False, float_format="%.17g")
        designs.append((f, str(tmp / f"d{i}.csv")))
    rows = []   # (label, {tool: result})

    res = {t: run(t, "warm", s_spec, tmp) for t in tools}
    rows.append(("sleepstudy warm fit", res))
    if "lmmjax" in tools:
        run("lmmjax", "fresh", s_spec, tmp, env=filled)           # fills the cache
    fresh = {t: run(t, "fresh", s_spec, tmp, env=filled if t == "lmmjax" else None) for t in tools}
    rows.append(("fresh: fit + summary (cache filled)", fresh))
    if "lmmjax" in tools:
        rows.append(("fresh: fit + summary (no cache)", {"lmmjax": run("lmmjax", "fresh", s_spec, tmp, env=cold_env()),
                                                         **{t: fresh[t] for t in tools if t != "lmmjax"}}))
    d20 = {t: run(t, "designs", dict(designs=designs[:20]), tmp, env=cold_env() if t == "lmmjax" else None)
           for t in tools}
    rows.append(("20 new designs, median per design", d20))
    if not args.quick:
        for name in ("slopes", "crossed"):
            f, df = big(name)
            df.to_csv(tmp / f"{name}.csv", index=False, float_format="%.17g")
            spec = dict(formula=f, csv=str(tmp / f"{name}.csv"), reps=3)
            rows.append((f"100k {f.split(' + ', 1)[1]} warm", {t: run(t, "warm", spec, tmp) for t in tools}))
        rows.append(("150 designs (RSS MB after)",
                     {"lmmjax": run("lmmjax", "designs", dict(designs=designs), tmp, env=filled)}))

    print(f"# engine benchmark — {machine_info()}")
    hdr = ["work"] + tools + [f"{t}/lmmjax" for t in tools if t != "lmmjax"]
    table = []
    for label, res in rows:
        key = "rss_mb" if label.startswith("150") else "seconds"
        cells, base = [], res.get("lmmjax")
        for t in tools:
            r = res.get(t)
            cells.append("—" if r is None else r if isinstance(r, str) else
                         (f"{r[key]:.0f}" if key == "rss_mb" else f"{r[key]:.4g} s"))
        for t in tools:
            if t == "lmmjax":
                continue
            r = res.get(t)
            ok = isinstance(r, dict) and isinstance(base, dict) and key == "seconds"
            cells.append(f"{r[key] / base[key]:.2f}" if ok else "—")
        table.append([label] + cells)
    print("\n".join(text_table(hdr, table)))
    print("\nREML criteria (sleepstudy; 20 designs: max |difference| to the best of all tools)")
    for t in tools:
        r = next((res[t] for label, res in rows if label == "sleepstudy warm fit"), None)
        print(f"  {t:11s} sleepstudy {r['crit'] if isinstance(r, dict) else r}")
    best = None
    crits = {t: np.array(d20[t]["crits"]) for t in tools if isinstance(d20.get(t), dict)}
    if crits:
        best = np.min(np.vstack(list(crits.values())), axis=0)
        for t, c in crits.items():
            print(f"  {t:11s} 20 designs: max(criterion - best) = {np.max(c - best):.3g}")


if __name__ == "__main__":
    main()
