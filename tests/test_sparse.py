"""The sparse path for crossed and nested designs (issue: scale).

``design_stats(..., sparse=True)`` stores Z₁ᵀZ_r by its co-occurrence pattern and builds
the later terms' Schur complement with one segment sum per evaluation;
``sparse_value_grad_hess`` gives the exact gradient and Hessian for the sparse Newton, and
``sparse_satterthwaite`` the Satterthwaite derivatives.
Checked here against the dense blocked path (1e-10 relative: both are exact, they
differ only in the order of floating-point sums) on random crossed, nested and
partially crossed designs with random slopes on both factors, against jax's own
autodiff of the criterion, and — fitted end to end through ``lmer`` — against lme4 on
every multi-term lme4 reference case.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import design as design_mod
from lmmjax._compute import precision, to_device
from lmmjax.design import build_design, design_stats, response_stats
from lmmjax.inference import _satterthwaite_program
from lmmjax.likelihood import objective, solve, sparse_satterthwaite, sparse_value_grad_hess

from conftest import LME4_CASES, case_data, load_case, python_formula, r_optima

REL = 1e-10

# jitted once (un-jitted, the likelihood runs op by op: minutes)
_vg = jax.jit(jax.value_and_grad(objective), static_argnames=("layout", "reml"))
_hess = jax.jit(jax.hessian(objective), static_argnames=("layout", "reml"))


def _data(kind: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 500
    if kind == "crossed":
        g1, g2 = rng.integers(0, 45, n), rng.integers(0, 15, n)
    elif kind == "nested":                       # class within school: g2 = school of g1
        g1 = rng.integers(0, 45, n)
        g2 = g1 // 5
    else:                                        # partially crossed: g2 mostly follows g1
        g1 = rng.integers(0, 45, n)
        g2 = np.where(rng.random(n) < 0.8, g1 // 4, rng.integers(0, 12, n))
    df = pd.DataFrame(dict(g1=g1.astype(str), g2=g2.astype(str), g3=rng.integers(0, 4, n).astype(str),
                           x=rng.normal(size=n), z=rng.normal(size=n)))
    u = rng.normal(size=(45, 2))
    v = rng.normal(size=(45, 2))
    df["y"] = (1 + df.x + u[g1, 0] + u[g1, 1] * df.x + v[g2 % 45, 0] + 0.5 * v[g2 % 45, 1] * df.z
               + rng.normal(size=n))
    return df


FORMULAS = [
    "y ~ x + (1 | g1) + (1 | g2)",
    "y ~ x + (1 + x | g1) + (1 + z | g2)",                     # slopes on both factors
    "y ~ x + z + (1 + x + z | g1) + (1 + x | g2) + (1 | g3)",
    "y ~ x + (x || g1) + (1 | g2) + (1 | g2:g3)",
    "y ~ 0 + x + (1 | g1) + (1 | g2)",
]


# (kind, formula): every formula and every kind at least once (each pair compiles ~10 s)
CASES = [("crossed", FORMULAS[0]), ("nested", FORMULAS[0]), ("crossed", FORMULAS[1]), ("partial", FORMULAS[1]),
         ("nested", FORMULAS[2]), ("partial", FORMULAS[3]), ("crossed", FORMULAS[4])]


@pytest.mark.parametrize("kind,formula", CASES)
def test_sparse_equals_dense(kind, formula):
    df = _data(kind, seed=hash((kind, formula)) % 1000)
    d = build_design(formula, df)
    rng = np.random.default_rng(0)
    with precision() as dt:
        rs = response_stats(d, d.y)
        dense = to_device({**design_stats(d, sparse=False), **rs}, dt)
        sparse = to_device({**design_stats(d, sparse=True), **rs}, dt)
        assert "Z1Zr" not in sparse and "tr_j" in sparse
        for reml in (False, True):
            th = jnp.asarray(d.layout.init_theta() * rng.uniform(0.3, 1.5, d.layout.n_theta)
                             + 0.1 * rng.normal(size=d.layout.n_theta))
            v0, g0 = _vg(th, dense, d.layout, reml)
            v1, g1 = _vg(th, sparse, d.layout, reml)
            np.testing.assert_allclose(float(v1), float(v0), rtol=REL)
            np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(g0))))
            # exact gradient and Hessian of the sparse Newton against autodiff of the dense path
            if not reml:      # the Hessian check once per design (compilation is the cost)
                continue
            f2, g2, H2 = sparse_value_grad_hess(th, sparse, d.layout, reml)
            H0 = _hess(th, dense, d.layout, reml)
            np.testing.assert_allclose(float(f2), float(v0), rtol=REL)
            np.testing.assert_allclose(np.asarray(g2), np.asarray(g0), rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(g0))))
            np.testing.assert_allclose(np.asarray(H2), np.asarray(H0), rtol=1e-7, atol=1e-8 * float(jnp.max(jnp.abs(H0))))
            # Satterthwaite's pieces (Hessian of d(θ, σ), ∂M, M) from the closed forms
            vp = jnp.concatenate([th, jnp.asarray([0.9])])
            for a, b in zip(_satterthwaite_program(vp, dense, d.layout, reml),
                            sparse_satterthwaite(vp, sparse, d.layout, reml)):
                a, b = np.asarray(a), np.asarray(b)
                np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-8 * float(np.abs(a).max()))
            s0, s1 = solve(th, dense, d.layout, reml), solve(th, sparse, d.layout, reml)
            for key in ("beta", "vcov", "u1", "u2", "Ainv1", "Ainv_rest", "sigma2"):
                a, b = np.asarray(s0[key]), np.asarray(s1[key])
                np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(a).max(initial=0))))


@pytest.mark.parametrize("kind,formula", [("crossed", FORMULAS[0]), ("partial", FORMULAS[3])])
def test_sparse_hessian_scalar_later_terms_at_boundary(kind, formula):
    """Scalar later terms use closed forms for ∂ᵢⱼ log|S| that divide by each λ_t; with a
    λ_t = 0 the evaluation falls back to the general products: finite everywhere, and equal
    to autodiff of the dense path on the free parameters."""
    d = build_design(formula, _data(kind, seed=5))
    with precision() as dt:
        rs = response_stats(d, d.y)
        dense = to_device({**design_stats(d, sparse=False), **rs}, dt)
        sparse = to_device({**design_stats(d, sparse=True), **rs}, dt)
        for zero in (False, True):
            th = d.layout.init_theta() * 0.7 + 0.05
            th[-1] = 0.0 if zero else th[-1]
            th = jnp.asarray(th)
            H2 = np.asarray(sparse_value_grad_hess(th, sparse, d.layout, True)[2])
            H0 = np.asarray(_hess(th, dense, d.layout, True))
            assert np.isfinite(H2).all()
            f = slice(0, -1) if zero else slice(None)
            np.testing.assert_allclose(H2[f, f], H0[f, f], rtol=1e-7, atol=1e-8 * float(np.abs(H0).max()))


@pytest.fixture
def force_sparse(monkeypatch):
    monkeypatch.setattr(design_mod, "SPARSE_MIN_ENTRIES", 0)
    monkeypatch.setattr(design_mod, "SPARSE_DENSITY", 1.0)


MULTI_TERM = [p for p in LME4_CASES if "(" in load_case(str(p))["formula"].split("|", 1)[1]]


@pytest.mark.parametrize("path", MULTI_TERM, ids=lambda p: p.stem)
def test_sparse_newton_fit_matches_lme4(path: Path, force_sparse):
    """lmer through the sparse path and its Newton optimizer reaches lme4's best optimum."""
    case = load_case(str(path))
    df = case_data(path, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmmjax.SingularFitWarning)
        m = lmmjax.lmer(python_formula(case["formula"]), df, reml=case["REML"])
    assert "tr_j" in m.stats
    assert m.converged, m.optinfo.message
    best = r_optima(case)[0]
    ours = m.reml_criterion if case["REML"] else m.deviance
    r_crit = best["REMLcrit"] if best["REML"] else best["deviance"]
    np.testing.assert_allclose(ours, r_crit, rtol=1e-9)
    assert ours <= r_crit + 1e-9 * abs(r_crit)
    se = np.sqrt(np.diag(m.vcov.to_numpy()))
    assert np.all(np.abs(m.fixef.to_numpy() - best["fixed"]["estimate"]) <= 1e-3 * se)
    assert m.optinfo.evaluations < 40


def test_instEval_shape_stand_in_few_evaluations(force_sparse):
    """A crossed design with InstEval's structure (students × lecturers × departments,
    scaled down): the sparse Newton converges in a handful of exact-derivative steps."""
    rng = np.random.default_rng(3)
    ns, nd, ndept, n = 300, 110, 6, 6000
    s = rng.integers(0, ns, n)
    d = rng.integers(0, nd, n)
    dept = d % ndept
    df = pd.DataFrame(dict(s=s.astype(str), d=d.astype(str), dept=dept.astype(str),
                           service=rng.integers(0, 2, n).astype(str)))
    df["y"] = (3 + 0.3 * rng.normal(size=ns)[s] + 0.5 * rng.normal(size=nd)[d]
               + 0.1 * rng.normal(size=ndept)[dept] + rng.normal(size=n))
    f = "y ~ service + (1 | s) + (1 | d) + (1 | dept)"
    m = lmmjax.lmer(f, df)
    assert "tr_j" in m.stats and m.converged
    assert m.optinfo.iterations <= 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        design_mod.SPARSE_MIN_ENTRIES = 10**12
        try:
            m_dense = lmmjax.lmer(f, df)
        finally:
            design_mod.SPARSE_MIN_ENTRIES = 0
    assert "Z1Zr" in m_dense.stats
    np.testing.assert_allclose(m.reml_criterion, m_dense.reml_criterion, rtol=1e-10)
    assert m.reml_criterion <= m_dense.reml_criterion + 1e-9 * abs(m_dense.reml_criterion)
    np.testing.assert_allclose(m.theta, m_dense.theta, rtol=1e-4, atol=1e-6)
    tab_s, tab_d = m.coef_table(), m_dense.coef_table()
    np.testing.assert_allclose(tab_s.to_numpy(float), tab_d.to_numpy(float), rtol=1e-4)


def test_same_size_data_sets_share_compiled_programs(force_sparse):
    """The pattern arrays are padded to size buckets (zero-valued pairs and triples, dummy
    destinations past the matrix), so a second data set with the same level counts and a
    similar pattern size fits without compiling anything; the padding changes nothing."""
    from lmmjax.design import size_bucket

    assert [size_bucket(n) for n in (1, 4, 5, 9, 100, 1826133)] == [1, 4, 5, 10, 112, 1835008]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)

    def data(seed):
        # 120 × 30 crossed, 10 distinct b per a; the seed relabels b, shuffles the rows and
        # draws new responses: another data set whose pattern has the same size
        rng = np.random.default_rng(seed)
        a = np.repeat(np.arange(120), 10)
        b = rng.permutation(30)[(a * 7 + np.tile(np.arange(10), 120) * 3) % 30]
        df = pd.DataFrame(dict(a=a.astype(str), b=b.astype(str), x=rng.normal(size=a.size)))
        df["y"] = df.x + rng.normal(size=120)[a] + rng.normal(size=30)[b] + rng.normal(size=a.size)
        if seed == 2:       # one student–lecturer pair fewer: fewer pairs and triples, same buckets
            df = df.iloc[1:]
        return df.sample(frac=1.0, random_state=seed)

    f = "y ~ x + (1 | a) + (1 | b)"
    m1 = lmmjax.lmer(f, data(1))
    n_first = len(compiles)
    m2 = lmmjax.lmer(f, data(2))
    assert "tr_j" in m2.stats and m1.stats["tr_j"].shape == m2.stats["tr_j"].shape
    qr = 30
    n_triples = [int(np.sum(m.stats["tr_udst"][m.stats["tr_seg"]] < qr * qr)) for m in (m1, m2)]
    assert n_triples[0] > n_triples[1], "the second pattern is smaller: padding is what makes the shapes equal"
    assert m2.stats["tr_udst"].max() >= qr * qr   # dummy destinations past the matrix
    assert len(compiles) == n_first, compiles[n_first:]
    # padding changes nothing: the same fit on the dense path
    design_mod.SPARSE_MIN_ENTRIES = 10**12
    try:
        m_dense = lmmjax.lmer(f, data(2))
    finally:
        design_mod.SPARSE_MIN_ENTRIES = 0
    np.testing.assert_allclose(m2.reml_criterion, m_dense.reml_criterion, rtol=1e-10)
    np.testing.assert_allclose(m2.ranef()["a"].to_numpy(), m_dense.ranef()["a"].to_numpy(), rtol=1e-5, atol=1e-8)
