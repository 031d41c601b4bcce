"""Big crossed designs: lmmjax against mixedlm, lme-python, lme4 and statsmodels, in one run.

    python benchmarks/scale.py [--designs insteval,big1m,slopes] [--no-r] [--cap 300]

Each tool fits each design in a fresh subprocess: ``cold`` is its first fit there
(compilation included for lmmjax, import excluded), ``warm`` a second fit of the same
model in that process, ``peak MB`` the subprocess's peak resident set, ``criterion``
the REML criterion it reports (all tools should agree to ~1e-6 relative; lower is
better).  Designs:

* ``insteval``: lme4's InstEval, ``y ~ service + (1 | s) + (1 | d) + (1 | dept)``;
* ``big1m``: 1,000,000 rows, ``y ~ x + (1 | g1) + (1 | g2)``, 100,000 × 2,000 crossed levels;
* ``slopes``: 60 subjects × 40 items, ``y ~ c1 + c2 + (1 + c1 + c2 | subj) + (1 + c1 | item)``.

statsmodels has no crossed random effects; it fits them as variance components of one
all-encompassing group (so no correlated slopes: on ``slopes`` it fits a smaller model and
its criterion differs), time-capped (``--cap`` seconds; reported as "> cap", as is lme-python), and not on
``big1m``, whose dense 1M × 102,000 random-effects matrix it cannot hold.
Ratios are wall-time ratios to lmmjax in the same run (this machine is shared and noisy).
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
from _common import machine_info, text_table  # noqa: E402

FORMULAS = {
    "insteval": "y ~ service + (1 | s) + (1 | d) + (1 | dept)",
    "big1m": "y ~ x + (1 | g1) + (1 | g2)",
    "slopes": "y ~ c1 + c2 + (1 + c1 + c2 | subj) + (1 + c1 | item)",
}
FACTORS = {"insteval": ["s", "d", "dept", "service"], "big1m": ["g1", "g2"], "slopes": ["subj", "item"]}


def make_data(name: str, tmp: Path) -> Path:
    rng = np.random.default_rng(2026)
    if name == "insteval":
        import lmmjax.datasets

        df = lmmjax.datasets.insteval()[["s", "d", "dept", "service", "y"]]
    elif name == "big1m":
        n = 1_000_000
        g1, g2 = rng.integers(0, 100_000, n), rng.integers(0, 2_000, n)
        df = pd.DataFrame(dict(g1=g1, g2=g2, x=rng.normal(size=n)))
        df["y"] = 0.5 * df.x + 0.7 * rng.normal(size=100_000)[g1] + 0.4 * rng.normal(size=2_000)[g2] + rng.normal(size=n)
    else:
        subj, item = np.meshgrid(np.arange(60), np.arange(40), indexing="ij")
        subj, item = subj.ravel(), item.ravel()
        n = subj.size
        c1, c2 = rng.choice([-0.5, 0.5], n), rng.normal(size=n)
        S = rng.multivariate_normal([0, 0, 0], [[1, .3, .1], [.3, .5, 0], [.1, 0, .3]], 60)
        I = rng.multivariate_normal([0, 0], [[.6, -.2], [-.2, .4]], 40)
        y = (1 + 0.5 * c1 + 0.2 * c2 + S[subj, 0] + S[subj, 1] * c1 + S[subj, 2] * c2
             + I[item, 0] + I[item, 1] * c1 + rng.normal(size=n))
        df = pd.DataFrame(dict(subj=subj, item=item, c1=c1, c2=c2, y=y))
    path = tmp / f"{name}.csv"
    df.to_csv(path, index=False)
    return path


PY_RUNNER = r'''
import json, resource, sys, time
import pandas as pd
tool, csv, formula, factors, cap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), float(sys.argv[5])
df = pd.read_csv(csv, dtype={f: str for f in factors})
for f in factors:
    df[f] = df[f].astype("category")
if tool == "lmmjax":
    import lmmjax
    def fit():
        m = lmmjax.lmer(formula, df)
        return m.reml_criterion, m.optinfo.evaluations
elif tool == "lme-python":
    import lme_python
    def fit():
        m = lme_python.lmer(formula, df)
        c = m.reml_criterion
        return float(c() if callable(c) else c), None
elif tool == "mixedlm":
    import mixedlm
    def fit():
        m = mixedlm.lmer(formula, df)
        return float(m.REMLcrit() if callable(m.REMLcrit) else m.REMLcrit), None
else:
    import statsmodels.formula.api as smf
    import re
    fixed = formula.split("+ (")[0]
    vc = {g: f"0 + C({g})" for g in re.findall(r"\| (\w+)\)", formula)}
    df["_one"] = 1
    def fit():
        r = smf.mixedlm(fixed, df, groups="_one", vc_formula=vc, re_formula="0").fit(reml=True)
        return -2 * r.llf, None
t = time.perf_counter(); crit, ev = fit(); cold = time.perf_counter() - t
warm = None
if cold < cap:
    t = time.perf_counter(); fit(); warm = time.perf_counter() - t
print(json.dumps(dict(cold=cold, warm=warm, crit=crit, evals=ev,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
'''

R_RUNNER = r'''
args <- commandArgs(TRUE)
suppressMessages(library(lme4))
df <- read.csv(args[1])
for (f in strsplit(args[3], ",")[[1]]) df[[f]] <- factor(df[[f]])
t0 <- Sys.time(); m <- lmer(as.formula(args[2]), df, REML = TRUE); cold <- as.numeric(Sys.time() - t0, units = "secs")
t0 <- Sys.time(); m <- lmer(as.formula(args[2]), df, REML = TRUE); warm <- as.numeric(Sys.time() - t0, units = "secs")
peak <- as.numeric(system(sprintf("grep VmHWM /proc/%d/status | awk '{print $2}'", Sys.getpid()), intern = TRUE)) / 1024
cat(sprintf('{"cold": %.6f, "warm": %.6f, "crit": %.10f, "evals": %d, "peak_mb": %.1f}\n', cold, warm,
            REMLcrit(m), m@optinfo$feval, peak))
'''


#: tools that are time-capped (``--cap``): statsmodels, and lme-python, whose InstEval fit ran
#: for more than 7 minutes here
CAPPED = ("statsmodels", "lme-python")


def run(tool: str, csv: Path, name: str, cap: float) -> dict | str:
    formula, factors = FORMULAS[name], ",".join(FACTORS[name])
    if tool == "statsmodels" and name == "big1m":
        return "not run (dense 1M × 102,000 Z)"
    if tool == "lme4":
        cmd = ["Rscript", "-e", R_RUNNER, str(csv), formula, factors]
    else:
        cmd = [sys.executable, "-c", PY_RUNNER, tool, str(csv), formula, factors, str(cap)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap + 30 if tool in CAPPED else 1800)
    except subprocess.TimeoutExpired:
        return f"> {cap:.0f} s"
    if out.returncode:
        return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:60]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--designs", default="insteval,big1m,slopes")
    ap.add_argument("--tools", default="lmmjax,mixedlm,lme-python,lme4,statsmodels")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--cap", type=float, default=180.0, help="time cap (s) of statsmodels and lme-python")
    a = ap.parse_args()
    tools = [t for t in a.tools.split(",") if not (t == "lme4" and (a.no_r or not _has_r()))]
    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.designs.split(","):
            csv = make_data(name, Path(tmp))
            res = {t: run(t, csv, name, a.cap if t in CAPPED else 3600) for t in tools}
            base = res.get("lmmjax")
            rows = []
            for t, r in res.items():
                if isinstance(r, str):
                    rows.append([t, r, "", "", "", "", ""])
                    continue
                ratio = (f"{r['warm'] / base['warm']:.2f}" if isinstance(base, dict) and r["warm"] and base["warm"] else "")
                rows.append([t, f"{r['cold']:.2f}", f"{r['warm']:.2f}" if r["warm"] else "-", ratio,
                             f"{r['peak_mb']:.0f}", f"{r['crit']:.6f}", str(r.get("evals") or "")])
            print(f"\n{name}: {FORMULAS[name]}")
            print("\n".join(text_table(["tool", "cold s", "warm s", "warm / lmmjax", "peak MB", "REML criterion", "evals"], rows)))


def _has_r() -> bool:
    from shutil import which

    return which("Rscript") is not None


if __name__ == "__main__":
    main()
