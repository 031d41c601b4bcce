"""The method-of-moments start (lmmjax.start): close to the optimum on designs with a known
answer, None where it cannot be formed, and never changing where a fit ends."""
import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import bucketed, model, optimize, start


def _prepared(formula, df):
    prep = model._prepare(formula, df, None, None)
    return prep.fstats, prep.design.layout


def _slopes(seed=0, groups=150, per=12):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    b = rng.multivariate_normal([0, 0], [[2.0, 0.6], [0.6, 0.5]], size=groups)
    y = 1 + 0.5 * x + b[g, 0] + b[g, 1] * x + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g]})


def _crossed(seed=1, n=6000, l1=300, l2=60):
    rng = np.random.default_rng(seed)
    g1, g2 = rng.integers(0, l1, n), rng.integers(0, l2, n)
    y = rng.normal(size=l1)[g1] * 0.8 + rng.normal(size=l2)[g2] * 1.5 + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": rng.normal(size=n), "g1": [f"a{v}" for v in g1], "g2": [f"b{v}" for v in g2]})


@pytest.mark.parametrize("formula,make", [
    ("y ~ x + (1 + x | g)", _slopes),
    ("y ~ x + (1 | g1) + (1 | g2)", _crossed),
])
def test_moment_start_is_near_the_optimum(formula, make):
    df = make()
    stats, layout = _prepared(formula, df)
    t0 = start.moment_theta(stats, layout)
    m = lmmjax.lmer(formula, df)
    opt = np.asarray(m.optinfo.theta)
    # standardized fit coordinates equal the user's here (no far-off-scale columns)
    assert t0 is not None and t0.shape == opt.shape
    # a start, not an estimate: within 15% of the optimum (in θ's norm)
    assert np.linalg.norm(t0 - opt) < 0.15 * np.linalg.norm(opt), (t0, opt)


def test_moment_start_needs_enough_levels():
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"y": rng.normal(size=12), "x": rng.normal(size=12), "g": list("ab") * 6})
    stats, layout = _prepared("y ~ x + (1 + x | g)", df)
    assert start.moment_theta(stats, layout) is None        # 2 levels for a 2 × 2 covariance


def test_the_start_changes_no_optimum(monkeypatch):
    """The same optimum (1e-10 relative) with and without the moment point in the grid."""
    for formula, df in [("y ~ x + (1 + x | g)", _slopes(5)), ("y ~ x + (1 | g1) + (1 | g2)", _crossed(6)),
                        ("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())]:
        with_start = lmmjax.lmer(formula, df)
        model._PREPARED.clear()
        bucketed._PADDED.clear()
        monkeypatch.setattr(bucketed, "moment_theta", lambda *a: None)
        monkeypatch.setattr(optimize, "moment_theta", lambda *a: None)
        without = lmmjax.lmer(formula, df)
        monkeypatch.undo()
        model._PREPARED.clear()
        bucketed._PADDED.clear()
        assert abs(with_start.optinfo.criterion - without.optinfo.criterion) <= 1e-10 * abs(without.optinfo.criterion)
        np.testing.assert_allclose(with_start.optinfo.theta, without.optinfo.theta, rtol=1e-6, atol=1e-7)


def test_sleepstudy_needs_few_newton_evaluations():
    m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())
    # 11 gradient+Hessian and 18 criterion evaluations from the grid alone
    assert m.optinfo.evaluations <= 16, m.optinfo.message


def test_sparse_path_starts_from_the_moment_estimate():
    df = _crossed(7, n=20000, l1=2000, l2=300)
    stats, layout = _prepared("y ~ x + (1 | g1) + (1 | g2)", df)
    assert "tr_j" in stats                                   # the sparse path
    m = lmmjax.lmer("y ~ x + (1 | g1) + (1 | g2)", df)
    assert m.converged
    t0 = start.moment_theta(stats, layout)
    assert np.linalg.norm(t0 - m.optinfo.theta) < 0.15 * np.linalg.norm(m.optinfo.theta)
