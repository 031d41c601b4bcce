"""Confidence intervals like lme4's ``confint.merMod``: Wald, profile, parametric bootstrap.

Parameters are reported on lme4's scale and with its names: for each random-effects
term ``sd_<coef>|<group>`` and ``cor_<coef2>.<coef1>|<group>`` (in θ's order), then
``sigma``, then the fixed effects.

**Profile** (Bates et al. 2015, sec. 5.1), as lme4 does it: on the **ML** deviance —
a REML fit is first refitted by ML (lme4's ``devfun2`` calls ``refitML``).  For a
variance parameter ψ_j, d_j(v) = min over the other parameters of the ML deviance
d(ψ | ψ_j = v) in (sd, cor, σ) with β profiled; for a fixed effect, β_j is fixed
through an offset and θ refitted (the response cross-products are updated
algebraically, no pass over the data).  The interval is where
d_j(v) − d(ψ̂) ≤ χ²₁(level).  Inner minimizations use the exact JAX gradient
(L-BFGS-B with sd ≥ 0, |cor| ≤ 1); end points by Brent's method (lme4 interpolates
a spline through profile points instead, which agrees to ~1e-4).

**Bootstrap**: simulate ``nsim`` responses from the fitted model (``seed``), refit each
with the compiled fit program for this design (one compilation), take percentiles.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import _export
from ._compute import precision, to_device
from ._dist import chi2_ppf, norm_ppf
from ._linalg import chol_small
from .inference import _unprofiled_criterion
from .likelihood import Layout

__all__ = ["confint", "simulate", "varpar_names", "varpar_values"]


# ------------------------------------------------------------ (sd, cor, σ) scale
def _term_slots(layout: Layout):
    """For each θ entry: (term k, row i, col j) of its template position."""
    other = sorted({type(s).__name__ for s in layout.structures if not hasattr(s, "positions")})
    if other:
        raise NotImplementedError(
            f"confidence intervals and simulation on the (sd, cor) scale are not available for "
            f"{', '.join(other)} random-effect terms yet (only us/diag terms); their natural "
            "parameters are in m.varcorr")
    return [(k, i, j) for k, s in enumerate(layout.structures) for i, j in s.positions]


def varpar_names(m) -> list[str]:
    names = []
    groups = m._group_labels()
    for (k, i, j) in _term_slots(m.layout):
        cn = m.design.blocks[k].colnames
        g = groups[k]
        names.append(f"sd_{cn[i]}|{g}" if i == j else f"cor_{cn[i]}.{cn[j]}|{g}")
    return names + ["sigma"]


def varpar_values(m) -> np.ndarray:
    return _varpar_from(m.layout, [np.asarray(T, float) for T in m._Ts], m.sigma)


def _varpar_from(layout: Layout, Ts, sigma: float) -> np.ndarray:
    """(sd, cor, σ) in :func:`varpar_names`' order from the templates T_k and σ
    (Σ_k = σ²T_kT_kᵀ)."""
    vals = []
    covs = [sigma**2 * T @ T.T for T in Ts]
    for (k, i, j) in _term_slots(layout):
        C = covs[k]
        if i == j:
            vals.append(math.sqrt(max(C[i, i], 0.0)))
        else:
            d = math.sqrt(C[i, i] * C[j, j])
            vals.append(C[i, j] / d if d > 0 else 0.0)
    return np.array(vals + [sigma])


def _theta_from_varpar(psi, layout: Layout):
    """θ (lme4 order) from (sd, cor, σ): T_k = chol(D R D)/σ, differentiable."""
    sigma = psi[-1]
    slots = _term_slots(layout)
    out, pos = [], 0
    for k, s in enumerate(layout.structures):
        n = s.n_params
        sub = [(i, j) for (kk, i, j) in slots if kk == k]
        vals = psi[pos : pos + n]
        q = s.q
        if len(sub) == q and all(i == j for i, j in sub):  # diagonal template
            out.append(vals / sigma)
        else:
            sd = jnp.zeros(q, psi.dtype)
            R = jnp.eye(q, dtype=psi.dtype)
            for v_idx, (i, j) in enumerate(sub):
                if i == j:
                    sd = sd.at[i].set(vals[v_idx])
                else:
                    R = R.at[i, j].set(vals[v_idx]).at[j, i].set(vals[v_idx])
            Sig = sd[:, None] * R * sd[None, :] / sigma**2
            T = chol_small(Sig + 1e-300 * jnp.eye(q, dtype=psi.dtype))
            out.append(jnp.stack([T[i, j] for (i, j) in sub]))
        pos += n
    return jnp.concatenate(out)


def _criterion_varpar(psi, stats, layout: Layout, reml: bool):
    """The unprofiled (θ, σ) criterion of :mod:`lmmjax.inference`, in (sd, cor, σ)."""
    vp = jnp.concatenate([_theta_from_varpar(psi, layout), psi[-1:]])
    return _unprofiled_criterion(vp, stats, layout, reml)[0]


_vg_varpar = jax.jit(jax.value_and_grad(_criterion_varpar), static_argnames=("layout", "reml"))


def _bounds(names):
    return [(1e-10, None) if n.startswith("sd_") or n == "sigma" else (-1 + 1e-10, 1 - 1e-10) for n in names]


def _profile_varpar(m, j, level, dev0, psi0, stats):
    import scipy.optimize as so

    names = varpar_names(m)
    bounds = _bounds(names)
    others = [i for i in range(len(psi0)) if i != j]
    crit = chi2_ppf(level, 1)
    start = {"x": psi0[others]}

    def dmin(v):
        def fun(x):
            psi = psi0.copy()
            psi[others] = x
            psi[j] = v
            val, g = _export.call(_vg_varpar, jax.device_put(psi), stats, layout=m.layout, reml=m.reml)
            return float(val), np.asarray(g, float)[others]
        if not others:
            return fun(np.zeros(0))[0]
        r = so.minimize(fun, start["x"], jac=True, method="L-BFGS-B",
                        bounds=[bounds[i] for i in others], options=dict(ftol=1e-13, gtol=1e-8))
        start["x"] = r.x
        return float(r.fun)

    def excess(v):
        return dmin(v) - dev0 - crit

    lo_b, hi_b = bounds[j]
    v0 = psi0[j]
    ends = []
    for direction in (-1, 1):
        start["x"] = psi0[others]
        step = 0.5 * max(abs(v0), 1e-3) if names[j] != "sigma" and not names[j].startswith("cor_") else 0.2 * max(abs(v0), 1e-2)
        prev, v = v0, v0
        found, undefined = None, False
        for _ in range(60):
            v = v + direction * step
            if lo_b is not None and v <= lo_b:
                v = lo_b
            if hi_b is not None and v >= hi_b:
                v = hi_b
            e = excess(v)
            if not np.isfinite(e):       # the profile is undefined there (e.g. a correlation of a
                undefined = True         # zero-variance term in a singular fit)
                break
            if e > 0:
                found = (prev, v)
                break
            if (lo_b is not None and v == lo_b) or (hi_b is not None and v == hi_b):
                break
            prev = v
            step *= 1.6
        if undefined:
            ends.append(np.nan)
            continue
        if found is None:
            ends.append(lo_b if direction < 0 else (hi_b if hi_b is not None else np.inf))
            continue
        a, b = found
        start["x"] = psi0[others]
        try:
            ends.append(so.brentq(excess, min(a, b), max(a, b), xtol=1e-10 * max(1.0, abs(v0)), rtol=1e-12))
        except ValueError:              # a non-finite profile inside the bracket
            ends.append(np.nan)
    if np.isnan(ends).any():
        warnings.warn(f"the profile of {names[j]} is not defined everywhere (a singular fit?): its interval "
                      "end is NaN, as lme4 reports NA; see m.is_singular", RuntimeWarning, stacklevel=4)
    return ends[0], ends[1]


def _profile_fixed(m, j, level, dev0):
    """Profile β_j of an ML fit: offset y − b·x_j, refit θ by ML on the other columns
    (through :func:`lmmjax.engine.fit_stats`, the engine of every fit)."""
    import scipy.optimize as so

    from .design import SPARSE_KEYS
    from .engine import fit_stats

    st = {k: np.asarray(v, float) for k, v in m.stats.items() if k not in SPARSE_KEYS}
    p = st["XX"].shape[0]
    keep = [i for i in range(p) if i != j]
    base = dict(D1=st["D1"], Z1X=st["Z1X"][:, :, keep], XX=st["XX"][np.ix_(keep, keep)], n=st["n"])
    if m.layout.q_rest:
        base.update({k: m.stats[k] for k in ("Z1Zr",) + SPARSE_KEYS if k in m.stats})
        base.update(ZrZr=st["ZrZr"], ZrX=st["ZrX"][:, keep])
    crit = chi2_ppf(level, 1)
    se = math.sqrt(m.vcov.iat[j, j])
    b0 = m.fixef.iat[j]
    start = {"theta": m.theta}

    def dmin(b):
        s = dict(base)
        s["Z1y"] = st["Z1y"] - b * st["Z1X"][:, :, j]
        s["Xy"] = st["Xy"][keep] - b * st["XX"][keep, j]
        s["yy"] = st["yy"] - 2 * b * st["Xy"][j] + b * b * st["XX"][j, j]
        if m.layout.q_rest:
            s["Zry"] = st["Zry"] - b * st["ZrX"][:, j]
        opt, _, _ = fit_stats(s, m.layout, False, theta0=start["theta"])
        return opt.criterion

    def excess(b):
        return dmin(b) - dev0 - crit

    ends = []
    for direction in (-1, 1):
        a, step = b0, 1.5 * se
        bracket = None
        for _ in range(40):
            b = a + direction * step
            if excess(b) > 0:
                bracket = (a, b)
                break
            a, step = b, step * 1.5
        ends.append(so.brentq(excess, min(bracket), max(bracket), xtol=1e-12 * max(1.0, abs(b0)), rtol=1e-12)
                    if bracket else direction * np.inf)
    return ends[0], ends[1]


def _profile(m, level):
    mml = m
    if m.reml:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mml = m.refit(reml=False)
    # the profiles evaluate the criterion on the fit's statistics, which under prior weights
    # are those of the √w-scaled rows: the deviance there is the reported one + Σ log wᵢ
    dev0 = mml.deviance + mml.design.log_weights
    psi0 = varpar_values(mml)
    rows = {}
    with precision():
        stats = to_device(mml.stats, np.float64)
        for j, name in enumerate(varpar_names(mml)):
            rows[name] = _profile_varpar(mml, j, level, dev0, psi0, stats)
    for j, name in enumerate(mml.fixef.index):
        rows[name] = _profile_fixed(mml, j, level, dev0)
    return rows


def _wald(m, level):
    z = norm_ppf(0.5 + level / 2)
    rows = {n: (np.nan, np.nan) for n in varpar_names(m)}
    se = np.sqrt(np.diag(m.vcov.to_numpy()))
    for name, b, s in zip(m.fixef.index, m.fixef.to_numpy(), se):
        rows[name] = (b - z * s, b + z * s)
    return rows


def simulate(m, nsim: int, seed=None, re_form=False) -> np.ndarray:
    """``nsim`` responses from the fitted model (lme4's ``simulate``): y = Xβ̂ + Zb + ε with
    εᵢ ~ N(0, σ̂²/wᵢ) (w: prior weights, 1 without) and, for each random term, b ~ N(0,
    σ̂²ΛΛᵀ) drawn anew — or b = b̂, the conditional modes, for the terms ``re_form`` keeps
    (lme4's ``re.form``: ``False``/NaN/``"~0"``, the default, draws every term, like lme4's
    ``re.form = NA``; ``None`` conditions on all; ``"~ (1 | g)"`` on g's terms).  Returns an
    (n, nsim) array."""
    rng = np.random.default_rng(seed)
    n = m.nobs
    off = 0.0 if m.design.offset is None else m.design.offset
    keep = m._re_groups(re_form)
    Y = np.repeat((m.design.X @ m.fixef.to_numpy() + off)[:, None], nsim, axis=1)
    for blk, T, bhat in zip(m.design.blocks, m._Ts, m._b):
        if blk.group in keep:
            Y += np.einsum("nq,nq->n", blk.Zq, bhat[blk.index])[:, None]
            continue
        u = rng.standard_normal((nsim, blk.n_levels, blk.q)) * m.sigma
        b = u @ T.T                                      # (nsim, levels, q)
        Y += np.einsum("nq,snq->ns", blk.Zq, b[:, blk.index, :])
    eps = m.sigma * rng.standard_normal((n, nsim))
    if m.design.weights is not None:       # Var(εᵢ) = σ²/wᵢ
        eps /= np.sqrt(m.design.weights)[:, None]
    return Y + eps


def _bootstrap(m, level, nsim, seed):
    """Percentile intervals from parametric-bootstrap refits, each through
    :func:`lmmjax.engine.fit_stats` — the engine the model was fitted with, from its θ̂
    (the bucketed engine's programs, or this layout's, compile once for all replicates)."""
    from .design import response_stats
    from .engine import fit_stats

    Y = simulate(m, nsim, seed)
    if m.design.offset is not None:     # the fits see the working response y − offset
        Y = Y - m.design.offset[:, None]
    dstats = {k: v for k, v in m.stats.items() if k not in ("Z1y", "Zry", "Xy", "yy")}
    wd = m.design.weighted()           # the likelihood's rows (scaled by √w under prior weights)
    rs = response_stats(wd, Y if m.design.weights is None else Y * np.sqrt(m.design.weights)[:, None])
    names = varpar_names(m) + list(m.fixef.index)
    draws = np.empty((nsim, len(names)))
    for i in range(nsim):
        st = {**dstats, **{k: v[i] for k, v in rs.items()}}
        opt, sol, _ = fit_stats(st, m.layout, m.reml, theta0=m.theta)
        Ts = m.layout.factors_host(np.asarray(opt.theta, float))
        draws[i] = np.r_[_varpar_from(m.layout, Ts, math.sqrt(float(sol["sigma2"]))),
                         np.asarray(sol["beta"], float)]
    a = (1 - level) / 2
    lo, hi = np.nanquantile(draws, [a, 1 - a], axis=0)
    return {n: (l, h) for n, l, h in zip(names, lo, hi)}, draws


def confint(m, method: str = "profile", level: float = 0.95, nsim: int = 500, seed=None):
    """Confidence intervals (lme4's ``confint``): DataFrame indexed by parameter with
    columns ``lower``/``upper``.  method: "profile" (default), "wald" (fixed effects
    only; NaN for variance parameters, as lme4), "bootstrap" (parametric, ``nsim``, ``seed``)."""
    method = method.lower()
    if method == "profile":
        rows = _profile(m, level)
    elif method == "wald":
        rows = _wald(m, level)
    elif method in ("bootstrap", "boot"):
        rows, _ = _bootstrap(m, level, nsim, seed)
    else:
        raise ValueError(f"method must be 'profile', 'wald' or 'bootstrap', got {method!r}")
    a = (1 - level) / 2
    cols = [f"{100 * a:.1f} %", f"{100 * (1 - a):.1f} %"]
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])
    out.attrs["columns_lme4"] = cols
    return out
