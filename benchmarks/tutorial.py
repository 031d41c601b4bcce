"""The LMM tutorial workflow in a fresh process: lmmjax against lme4 + lmerTest + pbkrtest.

    python benchmarks/tutorial.py [--reps 3] [--no-r]

One script per tool, run as a new process (imports included), on the bundled sleepstudy data:
three models (random intercept; uncorrelated intercept and slope; correlated), their
likelihood-ratio comparison (ML refits), the Satterthwaite and the Kenward-Roger tables of the
largest model, and its profile confidence intervals.  lmmjax is timed with its persistent
compilation cache filled (a second run) and empty (``cold_env``); R with ``Rscript``.  The
printed ratios are R time / lmmjax time (> 1: lmmjax faster), medians of ``--reps`` runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_env, cold_env, machine_info, median, text_table, use_rscript, wall  # noqa: E402

PY = r'''
import lmmjax
d = lmmjax.datasets.sleepstudy()
m0 = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", d)
m1 = lmmjax.lmer("Reaction ~ Days + (Days || Subject)", d)
m2 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", d)
cmp = lmmjax.compare(m0, m1, m2)
satt = m2.coef_table()
kr = m2.coef_table(ddf="kenward-roger")
ci = m2.confint()
print(cmp.round(4).to_string()); print(satt.round(4).to_string()); print(kr.round(4).to_string()); print(ci.round(4).to_string())
print("KEY", float(cmp["p"].iloc[-1]), float(satt["df"].iloc[1]), float(kr["df"].iloc[1]), float(ci["upper"].iloc[0]))
'''

R = r'''
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest)})
d <- sleepstudy
m0 <- lmer(Reaction ~ Days + (1 | Subject), d)
m1 <- lmer(Reaction ~ Days + (Days || Subject), d)
m2 <- lmer(Reaction ~ Days + (Days | Subject), d)
cmp <- anova(m0, m1, m2)
satt <- summary(m2)$coefficients
kr <- summary(m2, ddf = "Kenward-Roger")$coefficients
ci <- suppressMessages(confint(m2))
print(cmp); print(satt); print(kr); print(ci)
cat("KEY", cmp[["Pr(>Chisq)"]][3], satt[2, "df"], kr[2, "df"], ci[1, 2], "\n")
'''


def key(out: str) -> list[float]:
    line = [ln for ln in out.splitlines() if ln.startswith("KEY")][-1]
    return [float(x) for x in line.split()[1:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-r", action="store_true")
    a = ap.parse_args(argv)
    print(machine_info())
    rows, keys = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_env = clean_env()
        cache_env["LMMJAX_CACHE_DIR"] = str(Path(tmp) / "xla")
        wall([sys.executable, "-c", PY], env=cache_env)           # fills the persistent cache
        runs = {"lmmjax (filled cache)": ([sys.executable, "-c", PY], cache_env),
                "lmmjax (empty cache)": ([sys.executable, "-c", PY], cold_env())}
        if use_rscript(a.no_r, "lme4 + lmerTest + pbkrtest"):
            runs["lme4 + lmerTest + pbkrtest"] = (["Rscript", "-e", R], dict(os.environ))
        times = {}
        for name, (cmd, env) in runs.items():
            ts = []
            for _ in range(a.reps):
                dt, out = wall(cmd, env=env, timeout=900)
                ts.append(dt)
            times[name], keys[name] = median(ts), key(out)
    r_time = times.get("lme4 + lmerTest + pbkrtest")
    for name, t in times.items():
        rows.append([name, f"{t:.2f}", f"{r_time / t:.2f}" if r_time else "-",
                     ", ".join(f"{v:.6g}" for v in keys[name])])
    print("tutorial workflow in a fresh process (3 models, LRT, Satterthwaite + KR tables, profile CIs)")
    print("\n".join(text_table(["tool", "wall s", "R / tool", "LRT p, Satt df, KR df, CI upper"], rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
