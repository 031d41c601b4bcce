"""Exact criteria on badly scaled data (lmmjax.scaling).

The reference is a different method in higher precision: the penalized least-squares
problem as one QR of the augmented matrix [[ZΛ, X, y], [I, 0, 0]] in numpy's extended
precision (80-bit long double), whose R gives log|ΛᵀZᵀZΛ + I|, log|R_X|² and r² without
forming any cross-product (no cancellation).  Tolerance: 1e-9 relative for the criterion at
a given θ (the issue's requirement); optima compared on the same data standardized by hand
to 1e-9 relative in the criterion.
"""
import numpy as np
import pandas as pd
import pytest

import lmmjax

LD = np.longdouble


def _householder_r(A):
    """R of a Householder QR, in long double (column by column; A is small)."""
    A = np.array(A, dtype=LD)
    m, k = A.shape
    for j in range(k):
        x = A[j:, j]
        alpha = -np.sign(x[0] if x[0] != 0 else 1) * np.sqrt(np.sum(x * x))
        v = x.copy()
        v[0] -= alpha
        vv = np.sum(v * v)
        if vv == 0:
            continue
        A[j:, j:] -= np.outer(v, (2 / vv) * (v @ A[j:, j:]))
    return A[:k, :k]


def reference_criterion(m, theta, reml):
    """−2 log (restricted) likelihood at θ from the augmented QR (module docstring)."""
    d = m.design
    n, p = d.n, d.p
    Zs, lams = [], []
    off = np.cumsum([0] + [s.n_params for s in m.layout.structures])
    for k, b in enumerate(d.blocks):
        Z = np.zeros((n, b.n_levels * b.q))
        for a in range(b.q):
            Z[np.arange(n), b.index * b.q + a] = b.Zq[:, a]
        Zs.append(Z)
        s = b.structure
        T = np.zeros((s.q, s.q))
        for i, (r, c) in enumerate(s.positions):
            T[r, c] = theta[off[k] + i]
        lams.append(np.kron(np.eye(b.n_levels), T))
    Z = np.hstack(Zs)
    Lam = np.zeros((Z.shape[1], Z.shape[1]))
    start = 0
    for L in lams:
        Lam[start:start + L.shape[0], start:start + L.shape[0]] = L
        start += L.shape[0]
    q = Z.shape[1]
    top = np.hstack([np.array(Z, LD) @ np.array(Lam, LD), np.array(d.X, LD), np.array(d.y, LD)[:, None]])
    bottom = np.hstack([np.eye(q, dtype=LD), np.zeros((q, p + 1), LD)])
    R = _householder_r(np.vstack([top, bottom]))
    dg = np.abs(np.diag(R))
    logdet_z = 2 * np.sum(np.log(dg[:q]))
    logdet_x = 2 * np.sum(np.log(dg[q:q + p]))
    r2 = dg[q + p] ** 2
    nu = n - p if reml else n
    c = logdet_z + nu * (1 + np.log(2 * np.pi * r2 / nu))
    return float(c + logdet_x if reml else c)


def _design(kind, seed=3):
    rng = np.random.default_rng(seed)
    ng, per = 15, 10
    g = np.repeat(np.arange(ng), per)
    u = rng.uniform(0, 10, g.size)
    b0, b1 = rng.normal(size=ng) * 2.0, rng.normal(size=ng) * 0.5
    eps = rng.normal(size=g.size)
    df = pd.DataFrame(dict(g=[f"s{i}" for i in g]))
    if kind == "offset-x":            # predictor offset by 1e6, random slopes
        df["x"] = 1e6 + u
        df["y"] = 2.0 + 0.5 * u + b0[g] + b1[g] * u + eps
        return "y ~ x + (x | g)", df
    if kind == "big-y":               # response around 1e9
        df["x"] = u
        df["y"] = 1e9 + 0.5 * u + b0[g] + b1[g] * u + eps
        return "y ~ x + (x | g)", df
    if kind == "tiny-y":              # response around 1e-9
        df["x"] = u
        df["y"] = 1e-9 * (3.0 + 0.5 * u + b0[g] + b1[g] * u + eps)
        return "y ~ x + (x | g)", df
    if kind == "tiny-sigma":          # residual SD 1e-6 of the response's
        df["x"] = u
        df["y"] = 5.0 + 0.5 * u + b0[g] + 1e-6 * eps
        return "y ~ x + (1 | g)", df
    raise ValueError(kind)


KINDS = ["offset-x", "big-y", "tiny-y", "tiny-sigma"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reml", [True, False])
def test_criterion_equals_extended_precision_reference(kind, reml):
    f, df = _design(kind)
    m = lmmjax.lmer(f, df, reml=reml, warn=False)
    crit = m.reml_criterion if reml else m.deviance
    assert crit == pytest.approx(reference_criterion(m, m.theta, reml), rel=1e-9)
    for scale in (0.7, 1.3):       # other θ, through lmer(theta=)
        th = m.theta * scale
        mt = lmmjax.lmer(f, df, reml=reml, theta=th, warn=False)
        got = mt.reml_criterion if reml else mt.deviance
        assert got == pytest.approx(reference_criterion(m, th, reml), rel=1e-9)


def test_offset_predictor_reaches_the_centred_optimum():
    """Shifting x by 10⁶ reparametrizes (x | g) without changing the model: the REML
    optimum is the same as on centred x, and β̂ for x is the same."""
    f, df = _design("offset-x")
    m = lmmjax.lmer(f, df)
    mc = lmmjax.lmer(f, df.assign(x=df.x - 1e6))
    assert m.converged and mc.converged
    assert m.reml_criterion == pytest.approx(mc.reml_criterion, rel=1e-9)
    assert m.fixef["x"] == pytest.approx(mc.fixef["x"], rel=1e-7)
    assert m.vcov.loc["x", "x"] == pytest.approx(mc.vcov.loc["x", "x"], rel=1e-6)


def test_response_scale_is_exact():
    """y → 10⁻⁹ y changes θ not at all and the criterion by exactly (n − p) log 10⁻¹⁸."""
    f, df = _design("big-y")
    df = df.assign(y=df.y - 1e9)
    m = lmmjax.lmer(f, df)
    ms = lmmjax.lmer(f, df.assign(y=df.y * 1e-9))
    np.testing.assert_allclose(ms.theta, m.theta, rtol=1e-7)
    shift = (m.nobs - 2) * np.log(1e-18)
    assert ms.reml_criterion == pytest.approx(m.reml_criterion + shift, rel=1e-11)
    np.testing.assert_allclose(ms.fixef.to_numpy(), 1e-9 * m.fixef.to_numpy(), rtol=1e-8)
    assert ms.sigma == pytest.approx(1e-9 * m.sigma, rel=1e-9)
