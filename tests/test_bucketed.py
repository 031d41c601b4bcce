"""The bucketed engine: padding changes nothing, derivatives are exact, and a new design of
a bucket seen before compiles nothing.

Tolerances: the padded criterion equals the layout engine's at the same θ to 1e-12
relative (the same arithmetic up to summation order); gradients and Hessians equal
autodiff of the unpadded criterion to 1e-8 relative (forward-over-reverse vs the
Schur-complement identity of the profiled Hessian: round-off only).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import bucketed
from lmmjax._compute import precision, to_device
from lmmjax.design import build_design, design_stats, response_stats
from lmmjax.inference import satterthwaite_derivatives
from lmmjax.likelihood import objective


def _data(seed, n_g=13, n_h=5, per=6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_g), per)
    h = rng.integers(0, n_h, g.size)
    x = rng.normal(size=g.size)
    y = (1.0 + 0.5 * x + rng.normal(size=n_g)[g] + 0.7 * rng.normal(size=n_g)[g] * x
         + 0.8 * rng.normal(size=n_h)[h] + 0.3 * rng.normal(size=n_h)[h] * x + rng.normal(size=g.size))
    return pd.DataFrame(dict(y=y, x=x, z=rng.normal(size=g.size), g=[f"g{i}" for i in g], h=[f"h{i}" for i in h]))


FORMULAS = [
    "y ~ x + (x | g)",                      # one unstructured term
    "y ~ x + z + (1 | g) + (1 | h)",        # crossed scalar terms (Λ_r diagonal)
    "y ~ x + (x | g) + (x || h)",           # crossed with slopes (Λ_r a dense template)
    "y ~ 1 + diag(1 + x | g)",              # diagonal structure, p = 1
    "y ~ x + homdiag(1 + x | g) + (1 | h)", # one common variance
    "y ~ 0 + x + (1 | g)",                  # no intercept
]


def _setup(formula, df):
    design = build_design(formula, df)
    stats = {**design_stats(design), **response_stats(design, design.y)}
    return design, stats


@pytest.mark.parametrize("formula", FORMULAS)
def test_padding_changes_nothing(formula):
    df = _data(1)
    design, stats = _setup(formula, df)
    layout = design.layout
    assert bucketed.eligible(stats, layout)
    k = layout.n_theta
    kb = bucketed.theta_bucket(k)
    rng = np.random.default_rng(5)
    with precision("float64"):
        S = jax.device_put(bucketed.bucket_stats(stats, layout))
        dev = to_device(stats, np.float64)
        assert S["D1"].shape[0] > layout.n_levels[0] or S["XX"].shape[0] > design.p  # something is padded
        for _ in range(3):
            th = np.abs(rng.normal(size=k)) + 0.1
            thb = jnp.asarray(np.r_[th, rng.normal(size=kb - k)])   # padded θ entries: any value
            for reml in (True, False):
                ref = float(objective(jnp.asarray(th), dev, layout, reml))
                got = float(bucketed.crit(thb, S, reml))
                assert got == pytest.approx(ref, rel=1e-12)
                ev = bucketed.evaluate(thb, S, reml)
                g = jax.grad(objective)(jnp.asarray(th), dev, layout, reml)
                H = jax.hessian(objective)(jnp.asarray(th), dev, layout, reml)
                np.testing.assert_allclose(ev["g"][:k], g, rtol=1e-8, atol=1e-8 * np.abs(g).max())
                np.testing.assert_allclose(ev["H"][:k, :k], H, rtol=1e-8, atol=1e-8 * np.abs(H).max())
                assert np.all(np.asarray(ev["g"][k:]) == 0.0)     # the criterion ignores padded θ
                assert float(ev["f"]) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("formula,n_g", [(f, 13) for f in FORMULAS[:3]] + [("y ~ x + (x || g)", 49)])
def test_fit_and_satterthwaite_match_layout_engine(formula, n_g):
    """The bucketed fit reaches the layout engine's optimum, and its Satterthwaite
    derivatives (from the fit's last evaluation) equal the exact forward-over-reverse
    program of lmmjax.inference at that point (49 groups: a later-terms block of 49,
    bucket 64 = SMALL_QR_MAX)."""
    df = _data(2, n_g=n_g)
    m = lmmjax.lmer(formula, df)
    assert m.optinfo.message.startswith("converged (Newton")
    design, stats = _setup(formula, df)
    from lmmjax.optimize import minimize_theta

    with precision("float64"):
        dev = to_device(stats, np.float64)
        ref = minimize_theta(dev, design.layout, True)
        assert m.reml_criterion <= ref.criterion + 1e-9 * abs(ref.criterion)
        vp = jnp.asarray(np.r_[m.theta, m.sigma])
        H, J = satterthwaite_derivatives(vp, dev, design.layout, True)
    _, Jm, _, Hm = m._satterthwaite()
    np.testing.assert_allclose(Hm, H, rtol=1e-7, atol=1e-9 * np.abs(H).max())
    np.testing.assert_allclose(Jm, J, rtol=1e-7, atol=1e-9 * np.abs(J).max())


def test_new_design_in_a_seen_bucket_compiles_nothing():
    """Different data, level counts, fixed-effect counts and covariance structures of the
    same buckets share every program: fit, summary with Satterthwaite p-values."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    lmmjax.lmer("y ~ x + (x | g)", _data(3, n_g=20)).summary(print_=False)
    n0 = len(compiles)
    # 20 → 30 groups (bucket 32), another response, unstructured → diagonal, p = 2 → 2
    m = lmmjax.lmer("y ~ z + diag(1 + x | g)", _data(4, n_g=30))
    m.summary(print_=False)
    assert len(compiles) == n0, compiles[n0:]
    # ML shares the REML programs (REML is a traced flag, not a static argument)
    lmmjax.lmer("y ~ z + diag(1 + x | g)", _data(4, n_g=30), reml=False).summary(print_=False)
    assert len(compiles) == n0, compiles[n0:]
    # a new bucket (900 groups: 1,024) costs at most two programs: the Newton program (which
    # returns the solution and the Satterthwaite derivatives) and the boundary probes
    n_new = len(compiles)
    lmmjax.lmer("y ~ x + (1 | g)", _data(8, n_g=900)).summary(print_=False)
    assert len(compiles) - n_new <= 2, compiles[n_new:]
    # and crossed designs: 5 and 7 levels of h share the later-terms bucket (8)
    lmmjax.lmer("y ~ x + (1 | g) + (1 | h)", _data(5, n_g=20, n_h=5))
    n1 = len(compiles)
    lmmjax.lmer("y ~ z + (1 | g) + (1 | h)", _data(6, n_g=25, n_h=7)).summary(print_=False)
    assert len(compiles) == n1, compiles[n1:]


def test_buckets():
    assert [bucketed.bucket(n, 8) for n in (1, 8, 9, 18, 33)] == [8, 8, 16, 32, 64]
    assert [bucketed.bucket(n, 2) for n in (0, 1, 2, 3, 5)] == [2, 2, 2, 4, 8]
