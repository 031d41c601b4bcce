"""lmer_batch on an accelerator: 100,000 genes x 5,000 cells with Satterthwaite and
Kenward-Roger, float64 and the float32 data pass, and agreement with a CPU run.

    python benchmarks/gpu.py                  # the full run (on the default JAX backend: a GPU if present)
    python benchmarks/gpu.py --smoke          # a tiny run anywhere (the test suite runs it on CPU)
    python benchmarks/gpu.py --genes 20000 --cells 2000 --check-genes 500

Model: ``~ condition + (1 | donor)`` (16 donors, 8 per condition), responses simulated as
in ``benchmarks/batch.py`` (donor SD 0 for a fifth of the genes, a condition effect for a
tenth).  Timed: the first lmer_batch (compiles), a warm lmer_batch, the Satterthwaite and
the Kenward-Roger tables, and lmer_batch(dtype="float32").  Agreement: the first
``--check-genes`` genes refitted on the CPU backend (``devices=jax.devices("cpu")``):
max relative differences of estimate, SE, df and p, and of the REML log-likelihood.
Exit status 1 if the float64 agreement is worse than ``--tol`` (1e-6 relative on
estimate/SE/df; p-values 1e-6 absolute).  Results also go to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_DONORS = 16


def simulate(n: int, G: int, seed: int):
    rng = np.random.default_rng(seed)
    donor = np.sort(rng.integers(0, N_DONORS, n))
    cond = (donor >= N_DONORS // 2).astype(int)
    obs = pd.DataFrame(dict(donor=pd.Categorical([f"d{d:02d}" for d in donor]),
                            condition=pd.Categorical(np.where(cond == 1, "stim", "ctrl"))))
    donor_sd = np.where(rng.random(G) < 0.2, 0.0, rng.uniform(0.1, 1.0, G))
    effect = np.where(rng.random(G) < 0.1, rng.normal(0, 1.0, G), 0.0)
    Y = np.empty((n, G))
    for lo in range(0, G, 10_000):             # in gene blocks: no second n x G temporary
        hi = min(G, lo + 10_000)
        g = hi - lo
        noise = rng.uniform(0.5, 2.0, g)
        b = rng.standard_normal((N_DONORS, g)) * donor_sd[lo:hi] * noise
        Y[:, lo:hi] = rng.standard_normal((n, g)) * noise + rng.normal(0, 2.0, g) + b[donor] + \
            np.outer(cond, effect[lo:hi] * noise)
    return obs, Y


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300), initial=0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=100_000)
    ap.add_argument("--cells", type=int, default=5_000)
    ap.add_argument("--check-genes", type=int, default=1_000)
    ap.add_argument("--chunk-size", type=int, default=None, help="lmer_batch chunk_size (default: its own)")
    ap.add_argument("--smoke", action="store_true", help="200 genes x 300 cells, 50 checked (any backend)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.genes, a.cells, a.check_genes = 200, 300, 50
    import jax

    import lmmjax

    dev = jax.devices()[0]
    info = dict(backend=jax.default_backend(), device=str(getattr(dev, "device_kind", dev)), n_devices=len(jax.devices()),
                jax=jax.__version__, lmmjax=lmmjax.__version__, genes=a.genes, cells=a.cells)
    print(f"backend {info['backend']} ({info['device']}, {info['n_devices']} device(s)); "
          f"{a.genes:,} genes x {a.cells:,} cells; jax {info['jax']}", flush=True)
    t0 = time.perf_counter()
    obs, Y = simulate(a.cells, a.genes, a.seed)
    info["simulate_s"] = time.perf_counter() - t0
    f = "~ condition + (1 | donor)"
    kw = dict(progress=False, chunk_size=a.chunk_size)
    out = {}

    def timed(label, fn):
        t = time.perf_counter()
        r = fn()
        out[label] = time.perf_counter() - t
        print(f"  {label:<28} {out[label]:8.2f} s", flush=True)
        return r

    timed("first lmer_batch (compiles)", lambda: lmmjax.lmer_batch(f, obs, Y, **kw))
    res = timed("warm lmer_batch", lambda: lmmjax.lmer_batch(f, obs, Y, **kw))
    satt = timed("Satterthwaite table", lambda: res.coef_table("conditionstim"))
    kr = timed("Kenward-Roger table", lambda: res.coef_table("conditionstim", ddf="kenward-roger"))
    timed("first float32 lmer_batch", lambda: lmmjax.lmer_batch(f, obs, Y, dtype="float32", **kw))
    r32 = timed("warm float32 lmer_batch", lambda: lmmjax.lmer_batch(f, obs, Y, dtype="float32", **kw))
    s32 = r32.coef_table("conditionstim")
    rate = a.genes / (out["warm lmer_batch"] + out["Satterthwaite table"])
    print(f"  -> {rate:,.0f} genes/s with Satterthwaite p-values (warm)")
    ok_fit = int((res.status == "ok").sum() + (res.status == "singular").sum())
    print(f"  fits: {ok_fit}/{a.genes} ok or singular, {int((res.status == 'failed').sum())} failed")

    # agreement with the CPU backend on the first genes
    cpu = jax.devices("cpu")
    k = min(a.check_genes, a.genes)
    rc = lmmjax.lmer_batch(f, obs, Y[:, :k], devices=cpu, **kw)
    agree = {}
    for name, tab, ref in (("satterthwaite", satt.iloc[:k], rc.coef_table("conditionstim")),
                           ("kenward-roger", kr.iloc[:k], rc.coef_table("conditionstim", ddf="kenward-roger")),
                           ("float32 data pass", s32.iloc[:k], rc.coef_table("conditionstim"))):
        agree[name] = {c: rel(tab[c], ref[c]) for c in ("estimate", "se", "df")}
        agree[name]["p_abs"] = float(np.nanmax(np.abs(tab["p"].to_numpy() - ref["p"].to_numpy()), initial=0.0))
    agree["loglik"] = rel(res.loglik.iloc[:k], rc.loglik)
    print(f"agreement with the CPU backend on {k:,} genes (max relative difference; p: absolute):")
    for name, d in agree.items():
        print(f"  {name:<18} " + (f"{d:.1e}" if isinstance(d, float) else
                                  ", ".join(f"{c} {v:.1e}" for c, v in d.items())))
    bad = [n for n in ("satterthwaite", "kenward-roger")
           if max(agree[n]["estimate"], agree[n]["se"], agree[n]["df"]) > a.tol or agree[n]["p_abs"] > a.tol]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(info=info, times=out, genes_per_s=rate, agreement=agree), indent=1))
    if bad:
        print(f"FAIL: float64 {bad} differ from the CPU run by more than {a.tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
