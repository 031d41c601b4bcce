"""lmmjax.effectsize against performance::r2_nakagawa / performance::icc / insight::get_variance
(tests/fixtures/effectsize/cases.json, written by tests/r/make_effectsize_cases.R), and center().

Tolerances: the R² / ICC formulas are checked with every model evaluated at lme4's θ
(``lmer(..., theta=)``), relative 1e-10 (observed: 1e-13; what is left is σ̂² and β̂ at a given
θ); the free fits of the four models the issue names agree with R to 1e-4 relative.
A quantity R reports as exactly 0 (σ²_f of an intercept-only fixed part) must be 0 to 1e-12.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import effectsize
from lmmjax.formula import InputError
from lmmjax.design import DataError

FIX = Path(__file__).parent / "fixtures" / "effectsize"
CASES = json.loads((FIX / "cases.json").read_text())["cases"]
RTOL_AT_THETA = 1e-10
RTOL_FREE = 1e-4
ATOL_ZERO = 1e-12
FREE_FIT = ["sleepstudy_intercept", "sleepstudy_slopes", "penicillin_crossed", "oats_factorial"]
# performance counts a repeated grouping factor's first term only: compared to Johnson's sum below
REGULAR = [k for k, c in CASES.items() if not c["singular"] and k != "sleepstudy_uncorrelated"]


def _data(name: str) -> pd.DataFrame:
    return pd.read_csv(FIX / "oats.csv") if name == "oats" else lmmjax.datasets.load(name)


_FITS: dict = {}


def _fit(key: str, at_theta: bool = True):
    if (key, at_theta) not in _FITS:
        c = CASES[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _FITS[key, at_theta] = lmmjax.lmer(c["formula"], _data(c["data"]), reml=c["reml"],
                                               theta=c["theta"] if at_theta else None)
    return _FITS[key, at_theta]


def _close(got, want, rtol):
    if want == 0:
        assert abs(got) <= ATOL_ZERO, (got, want)
    else:
        assert got == pytest.approx(want, rel=rtol), (got, want)


def _check(m, c, rtol):
    r, i = effectsize.r2(m), effectsize.icc(m)
    _close(r["marginal"], c["r2_marginal"], rtol)
    _close(r["conditional"], c["r2_conditional"], rtol)
    _close(i["adjusted"], c["icc_adjusted"], rtol)
    _close(i["conditional"], c["icc_conditional"], rtol)
    v = effectsize.variances(m)
    for name in ("var_fixed", "var_random", "var_residual"):
        _close(v[name], c[name], rtol)
    pd.testing.assert_series_equal(r.attrs["variances"], v)
    pd.testing.assert_series_equal(i.attrs["variances"], v)


@pytest.mark.parametrize("key", REGULAR)
def test_matches_performance_at_lme4_theta(key):
    m = _fit(key)
    _check(m, CASES[key], RTOL_AT_THETA)
    assert m.nobs == CASES[key]["nobs"]


@pytest.mark.parametrize("key", FREE_FIT)
def test_free_fit_matches_performance(key):
    _check(_fit(key, at_theta=False), CASES[key], RTOL_FREE)


def test_result_methods_delegate():
    m = _fit("oats_factorial")
    pd.testing.assert_series_equal(m.r2(), effectsize.r2(m))
    pd.testing.assert_series_equal(m.icc(), effectsize.icc(m))
    assert list(m.r2().index) == ["marginal", "conditional"]
    assert list(m.icc().index) == ["adjusted", "conditional"]
    assert lmmjax.center is effectsize.center


def test_random_variance_is_johnson_sum_over_terms():
    """(Days || Subject): lmmjax sums both terms (Johnson 2014, computed in R from lme4's
    per-term model matrices); performance 0.10 keeps only the intercept term."""
    c = CASES["sleepstudy_uncorrelated"]
    m = _fit("sleepstudy_uncorrelated")
    v = effectsize.variances(m)
    _close(v["var_random"], c["var_random_johnson"], RTOL_AT_THETA)
    _close(v["var_fixed"], c["var_fixed"], RTOL_AT_THETA)
    _close(v["var_residual"], c["var_residual"], RTOL_AT_THETA)
    assert v["var_random"] > 2 * c["var_random"]        # performance's first-term-only value
    total = v.sum()
    r = effectsize.r2(m)
    assert r["marginal"] == pytest.approx(v["var_fixed"] / total, rel=1e-12)
    assert r["conditional"] == pytest.approx((v["var_fixed"] + v["var_random"]) / total, rel=1e-12)
    # the Johnson value also equals performance's own formula for every regular case
    for key in REGULAR:
        _close(CASES[key]["var_random"], CASES[key]["var_random_johnson"], 1e-10)
        _close(CASES[key]["var_fixed"], CASES[key]["var_fixed_direct"], 1e-10)


def test_random_slope_variance_by_hand():
    """σ²_r of (Days | Subject) = mean over rows of [1, Days] Σ [1, Days]ᵀ."""
    m = _fit("sleepstudy_slopes")
    S = m.covariance_matrices()[0].to_numpy()
    days = _data("sleepstudy")["Days"].to_numpy(float)
    want = np.mean(S[0, 0] + 2 * S[0, 1] * days + S[1, 1] * days**2)
    assert effectsize.variances(m)["var_random"] == pytest.approx(want, rel=1e-12)
    assert effectsize.variances(m)["var_random"] != pytest.approx(S[0, 0], rel=1e-3)


def test_singular_fit_as_performance():
    c = CASES["dyestuff2_singular"]
    m = _fit("dyestuff2_singular")
    assert c["r2_conditional"] is None and c["icc_adjusted"] is None   # NA in R
    with pytest.warns(UserWarning, match="singular"):
        r = effectsize.r2(m)
    with pytest.warns(UserWarning, match="singular"):
        i = effectsize.icc(m)
    _close(r["marginal"], c["r2_marginal"], RTOL_AT_THETA)
    assert np.isnan(r["conditional"]) and i.isna().all()
    _close(effectsize.variances(m)["var_residual"], c["var_residual"], RTOL_AT_THETA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r0 = effectsize.r2(m, tolerance=0)                      # the estimated (zero) variance
    assert r0["conditional"] == 0.0
    with pytest.raises(InputError, match="tolerance"):
        effectsize.icc(m, tolerance=-1)


def test_weighted_fit_refused():
    df = _data("sleepstudy")
    w = np.where(df["Days"] % 2 == 0, 1.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df, weights=w, theta=CASES["sleepstudy_intercept"]["theta"])
    for f in (effectsize.r2, effectsize.icc, effectsize.variances):
        with pytest.raises(InputError, match="prior weights"):
            f(m)


def test_not_a_fit():
    with pytest.raises(InputError, match="LmerResult"):
        effectsize.r2(pd.DataFrame({"a": [1.0]}))


# ---------------------------------------------------------------- center()
def _panel():
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"g": np.repeat(list("abcd"), 5), "h": np.tile([1, 2], 10),
                       "x": rng.normal(size=20), "z": rng.integers(0, 9, 20), "s": ["u"] * 20})
    df.loc[[0, 7], "x"] = np.nan
    df.loc[15:19, "x"] = np.nan      # group d: x all missing
    return df


def test_center_means_and_within():
    df = _panel()
    before = df.copy()
    out = lmmjax.center(df, ["x", "z"], by="g")
    pd.testing.assert_frame_equal(df, before)             # input untouched
    assert list(out.columns) == list(df.columns) + ["x_between", "x_within", "z_between", "z_within"]
    for col in ("x", "z"):
        for g, rows in df.groupby("g").groups.items():
            vals = df.loc[rows, col].to_numpy(float)
            obs = vals[~np.isnan(vals)]
            mean = math.fsum(obs) / len(obs) if len(obs) else np.nan   # correctly rounded sum
            between = out.loc[rows, f"{col}_between"].to_numpy()
            within = out.loc[rows, f"{col}_within"].to_numpy()
            np.testing.assert_allclose(between, mean, rtol=1e-15, atol=1e-16)  # NaN where all missing
            np.testing.assert_array_equal(np.isnan(within), np.isnan(vals) | np.isnan(mean))
            if len(obs):
                assert abs(np.nansum(within)) < 1e-12
                np.testing.assert_allclose((between + within)[~np.isnan(vals)], obs, rtol=1e-14)
    assert out["x_between"].iloc[0] == pytest.approx(np.nanmean(df["x"].iloc[:5]), rel=1e-15)
    assert out["x_between"].iloc[15:].isna().all() and out["x_within"].iloc[15:].isna().all()


def test_center_groups_by_several_columns_and_missing_group():
    df = _panel()
    df["x"] = np.arange(20.0)
    df.loc[3, "g"] = None
    out = lmmjax.center(df, "x", by=["g", "h"], names=["xx"])
    assert {"xx_between", "xx_within"} <= set(out.columns)
    assert np.isnan(out.loc[3, "xx_between"]) and np.isnan(out.loc[3, "xx_within"])
    # group (a, 1): rows 0, 2, 4
    assert out.loc[0, "xx_between"] == pytest.approx(2.0) and out.loc[4, "xx_within"] == pytest.approx(2.0)
    # group (a, 2): rows 1 (row 3 has no group)
    assert out.loc[1, "xx_between"] == 1.0 and out.loc[1, "xx_within"] == 0.0
    out2 = lmmjax.center(df, ["x", "z"], by="g", names={"x": "xs"})
    assert {"xs_between", "z_within"} <= set(out2.columns)


def test_center_categorical_group():
    df = lmmjax.datasets.sleepstudy()
    out = lmmjax.center(df, "Days", "Subject")
    np.testing.assert_array_equal(out["Days_between"].to_numpy(), 4.5)
    np.testing.assert_array_equal(out["Days_within"].to_numpy(), df["Days"].to_numpy() - 4.5)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"x": "nope", "by": "g"}, DataError, "'nope'"),
    ({"x": "x", "by": "grp"}, DataError, "by column"),
    ({"x": "s", "by": "g"}, DataError, "'s' is not numeric"),
    ({"x": "x", "by": "g", "names": ["a", "b"]}, InputError, "2 entries"),
    ({"x": "x", "by": "g", "names": {"q": "a"}}, InputError, "not in x"),
    ({"x": "x", "by": "x"}, InputError, "both x and by"),
    ({"x": [], "by": "g"}, InputError, "x is empty"),
])
def test_center_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        lmmjax.center(_panel(), **kwargs)


def test_center_refuses_bool_and_existing_output():
    df = _panel()
    df["b"] = df["h"] == 1
    with pytest.raises(DataError, match="'b' is not numeric"):
        lmmjax.center(df, "b", "g")
    df["x_within"] = 0.0
    with pytest.raises(DataError, match="already exist"):
        lmmjax.center(df, "x", "g")
    out = lmmjax.center(df, "x", "g", names=["x2"])
    assert {"x2_between", "x2_within"} <= set(out.columns)
    with pytest.raises(InputError, match="DataFrame"):
        lmmjax.center(df.to_dict(), "x", "g")
