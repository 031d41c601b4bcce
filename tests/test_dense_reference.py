"""Property test: the blocked-Cholesky criterion equals a plain dense-matrix
marginal likelihood, for random designs with 1–3 terms (nested or crossed),
q ∈ {1, 2}, random θ including zeros, ML and REML.

Dense reference (relative to σ²): V = ZΛΛᵀZᵀ + I,
β̂ = (XᵀV⁻¹X)⁻¹XᵀV⁻¹y, r² = (y − Xβ̂)ᵀV⁻¹(y − Xβ̂),
ML   = log|V| + n(1 + log(2πr²/n)),
REML = log|V| + log|XᵀV⁻¹X| + (n−p)(1 + log(2πr²/(n−p))).
Tolerance 1e-9 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmjax.design import build_design, design_stats, response_stats
from lmmjax.likelihood import objective


def dense_criterion(design, theta, reml):
    Z = design.Z().toarray()
    with jax.enable_x64(True):
        Ts = [np.asarray(T) for T in design.layout.factors(jnp.asarray(theta))]
    Lam = np.zeros((Z.shape[1], Z.shape[1]))
    off = 0
    for b, T in zip(design.blocks, Ts):
        for j in range(b.n_levels):
            s = off + j * b.q
            Lam[s : s + b.q, s : s + b.q] = T
        off += b.n_levels * b.q
    X, y = design.X, design.y
    n, p = X.shape
    V = Z @ Lam @ Lam.T @ Z.T + np.eye(n)
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    beta = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ beta
    r2 = r @ Vi @ r
    ld = np.linalg.slogdet(V)[1]
    if reml:
        return ld + np.linalg.slogdet(XVX)[1] + (n - p) * (1 + np.log(2 * np.pi * r2 / (n - p)))
    return ld + n * (1 + np.log(2 * np.pi * r2 / n))


@st.composite
def designs(draw):
    n = draw(st.integers(30, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    k = draw(st.integers(1, 3))
    df = pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n)})
    terms = []
    for i in range(k):
        lv = draw(st.integers(2, 7))
        df[f"g{i}"] = rng.integers(0, lv, size=n).astype(str)
        lhs = draw(st.sampled_from(["1", "1 + x", "0 + x", "x || "]))
        if lhs == "x || ":
            terms.append(f"(x || g{i})")
        else:
            terms.append(f"({lhs} | g{i})")
    if draw(st.booleans()):
        terms.append("(1 | g0:g1)" if k > 1 else "(1 | g0)")
    fixed = draw(st.sampled_from(["1", "x", "x + z"]))
    df["y"] = rng.normal(size=n) + rng.normal(size=n).round()
    formula = f"y ~ {fixed} + " + " + ".join(terms)
    return formula, df, rng


@settings(max_examples=40, deadline=None)
@given(designs(), st.booleans(), st.data())
def test_matches_dense_reference(d, reml, data):
    formula, df, rng = d
    design = build_design(formula, df)
    k = design.layout.n_theta
    theta = np.array(data.draw(st.lists(
        st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5, -0.7]), min_size=k, max_size=k)))
    stats = {**design_stats(design), **response_stats(design, design.y)}
    with jax.enable_x64(True):
        got = float(objective(jnp.asarray(theta), {a: jnp.asarray(v) for a, v in stats.items()},
                              design.layout, reml))
    want = dense_criterion(design, theta, reml)
    np.testing.assert_allclose(got, want, rtol=1e-9)
