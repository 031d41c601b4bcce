"""Property tests (hypothesis) on random designs: the fit reaches the optimum of a plain
dense n × n likelihood minimized from several starts, and transformations of the data
change the results exactly as theory says:

* y → a·y + b: θ unchanged, σ → |a|σ, β₀ → aβ₀ + b, β₁ → aβ₁, the criterion
  + 2ν log|a| (ν = n − p for REML, n for ML);
* x → x + c in a random-slope model (x | g): the same criterion and θ-implied
  covariance up to the linear change of the random-effect coordinates (criterion equal);
* permuting rows, relabelling groups: the same criterion and θ.

Designs stay in a few shape buckets (≤ 16 groups, p = 2) so that the examples share
compiled programs.  Tolerances: criteria 1e-8 relative, θ 1e-5 absolute, β 1e-6 relative.
"""
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import lmmjax
from test_dense_reference import dense_criterion

FORMULAS = ["y ~ x + (1 | g)", "y ~ x + (x | g)", "y ~ x + (1 | g) + (1 | h)"]


@st.composite
def designs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(range(len(FORMULAS))))
    n_g = draw(st.integers(4, 16))
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 9, n_g)                       # unbalanced
    g = np.repeat(np.arange(n_g), sizes)
    n = g.size
    x = rng.normal(size=n) * draw(st.sampled_from([1.0, 10.0]))
    sd_b = draw(st.sampled_from([0.0, 0.3, 2.0]))          # variances at zero included
    y = 1.0 + 0.5 * x + sd_b * rng.normal(size=n_g)[g] + rng.normal(size=n)
    if kind == 1:
        y = y + draw(st.sampled_from([0.0, 0.5])) * rng.normal(size=n_g)[g] * x
    df = pd.DataFrame(dict(y=y, x=x, g=[f"g{v:02d}" for v in g]))
    if kind == 2:
        h = rng.integers(0, 5, n)
        df["h"] = [f"h{v}" for v in h]
        df["y"] += draw(st.sampled_from([0.0, 1.0])) * rng.normal(size=5)[h]
    reml = draw(st.booleans())
    return FORMULAS[kind], df, reml


def _fit(formula, df, reml):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmmjax.lmer(formula, df, reml=reml)


COMMON = dict(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(**COMMON)
@given(designs())
def test_fit_reaches_dense_optimum(d):
    """lmmjax's criterion is at most the best of several dense-likelihood minimizations
    (L-BFGS-B from five starts, lower bounds 0 on the diagonals) + 1e-6 relative."""
    formula, df, reml = d
    m = _fit(formula, df, reml)
    design = m.design
    lb = np.full(design.layout.n_theta, -np.inf)
    lb[design.layout.boundary()] = 0.0
    best = np.inf
    base = design.layout.init_theta()
    for s in (0.05, 0.3, 1.0, 3.0, 10.0):
        r = minimize(lambda t: dense_criterion(design, t, reml), s * base, method="L-BFGS-B",
                     bounds=list(zip(lb, [None] * lb.size)), options=dict(ftol=1e-15, gtol=1e-10, maxiter=500))
        best = min(best, r.fun)
    assert m.optinfo.criterion <= best + 1e-6 * max(1.0, abs(best))
    # and the reported criterion is the dense one at the reported θ
    assert dense_criterion(design, m.optinfo.theta, reml) == pytest.approx(m.optinfo.criterion, rel=1e-9)


@settings(**COMMON)
@given(designs(), st.sampled_from([-3.0, 0.01, 250.0]), st.sampled_from([0.0, -7.0, 1e4]))
def test_affine_response(d, a, b):
    formula, df, reml = d
    m = _fit(formula, df, reml)
    t = _fit(formula, df.assign(y=a * df.y + b), reml)
    nu = m.nobs - (m.fixef.size if reml else 0)
    assert t.optinfo.criterion == pytest.approx(m.optinfo.criterion + 2 * nu * np.log(abs(a)), rel=1e-8, abs=1e-7)
    np.testing.assert_allclose(t.optinfo.theta, m.optinfo.theta, atol=1e-5)
    assert t.sigma == pytest.approx(abs(a) * m.sigma, rel=1e-6)
    expect = a * m.fixef.to_numpy()
    expect[0] += b
    np.testing.assert_allclose(t.fixef.to_numpy(), expect, rtol=1e-6, atol=1e-6 * abs(a) * (1 + abs(b)))


@settings(**COMMON)
@given(designs(), st.sampled_from([5.0, -40.0, 1e3]))
def test_shifted_predictor_in_slope_model(d, c):
    """(x | g) with x + c: Z's columns change by an invertible linear map absorbed by the
    unstructured covariance — the same criterion; the intercept moves by −β₁c."""
    _, df, reml = d
    m = _fit("y ~ x + (x | g)", df, reml)
    t = _fit("y ~ x + (x | g)", df.assign(x=df.x + c), reml)
    assert t.optinfo.criterion == pytest.approx(m.optinfo.criterion, rel=1e-8)
    assert t.fixef["x"] == pytest.approx(m.fixef["x"], rel=1e-6, abs=1e-8)
    assert t.fixef["(Intercept)"] == pytest.approx(m.fixef["(Intercept)"] - c * m.fixef["x"], rel=1e-6, abs=1e-6)


@settings(**COMMON)
@given(designs(), st.integers(0, 2**31 - 1))
def test_row_order_and_labels(d, seed):
    formula, df, reml = d
    m = _fit(formula, df, reml)
    rng = np.random.default_rng(seed)
    perm = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    labels = {v: f"L{k}" for k, v in enumerate(rng.permutation(sorted(df.g.unique())))}
    perm["g"] = perm.g.map(labels)
    t = _fit(formula, perm, reml)
    assert t.optinfo.criterion == pytest.approx(m.optinfo.criterion, rel=1e-8)
    np.testing.assert_allclose(t.optinfo.theta, m.optinfo.theta, atol=1e-5)
    np.testing.assert_allclose(t.fixef.to_numpy(), m.fixef.to_numpy(), rtol=1e-6, atol=1e-8)
