"""Satterthwaite (lmerTest), Kenward-Roger (pbkrtest) and type III anova against R,
on every lme4 case in tests/fixtures, at our optimum against R's optimum (as in
test_lme4_reference.py: the tight refit always, R's default fit where it converged).

Tolerances (issue 3): Satterthwaite SE, df and p 1e-3 relative; Kenward-Roger SE
1e-4 relative and df 1e-3 relative; type III F and denominator df (both methods)
1e-3 relative.  p-values are compared relative to max(p, 1e-300).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import norm_name, r_optima


def _close(a, b, rtol):
    a, b = np.asarray(a, float), np.asarray(b, float)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def test_satterthwaite_table(lme4_case):
    case, _, m = lme4_case
    tab = m.coef_table("satterthwaite")
    for ref in r_optima(case):
        s = ref["fixed"]["satterthwaite"]
        _close(tab["se"], s["se"], 1e-3)
        _close(tab["df"], s["df"], 1e-3)
        _close(tab["p"], s["p"], 1e-3)
        _close(tab["t"], s["t"], 1e-3)


def test_kenward_roger_table(lme4_case):
    case, _, m = lme4_case
    if not case["REML"]:
        with pytest.raises(ValueError, match="REML"):
            m.coef_table("kenward-roger")
        return
    tab = m.coef_table("kenward-roger")
    for ref in r_optima(case):
        k = ref["fixed"]["kenward_roger"]
        _close(tab["se"], k["se"], 1e-4)
        _close(tab["df"], k["df"], 1e-3)
        _close(tab["p"], k["p"], 1e-3)
        Vr = np.array(k["vcov_adj"])
        scale = np.sqrt(np.outer(np.diag(Vr), np.diag(Vr)))
        assert np.all(np.abs(m.vcov_kr.to_numpy() - Vr) <= 1e-4 * scale)


@pytest.mark.parametrize("ddf,key", [("satterthwaite", "satterthwaite"), ("kenward-roger", "kenward_roger")])
def test_type3_anova(lme4_case, ddf, key):
    case, _, m = lme4_case
    if key == "kenward_roger" and not case["REML"]:
        return
    a = m.anova(type=3, ddf=ddf)
    for ref in r_optima(case):
        r = pd.DataFrame(ref["anova_type3"][key])
        if r.empty:
            assert a.empty
            continue
        r = r.set_index("term")
        assert [norm_name(t) for t in a.index] == [norm_name(t) for t in r.index]
        assert list(a["num_df"]) == list(r["NumDF"])
        _close(a["F"], r["F"], 1e-3)
        _close(a["den_df"], r["DenDF"], 1e-3)
        _close(a["p"], r["p"], 1e-3)
        _close(a["MeanSq"], r["MeanSq"], 1e-3)


def test_satterthwaite_at_r_theta_is_exact(lme4_case_at_r_theta):
    """At R's own θ our exact-derivative df agree with lmerTest's finite-difference
    df to 1e-6 relative (R's numDeriv accuracy)."""
    case, _, m = lme4_case_at_r_theta
    _close(m.coef_table("satterthwaite")["df"], case["fixed"]["satterthwaite"]["df"], 1e-6)
    if case["REML"]:
        k = case["fixed"]["kenward_roger"]
        _close(m.coef_table("kenward-roger")["se"], k["se"], 1e-7)
        _close(m.coef_table("kenward-roger")["df"], k["df_pbkrtest_Lb_ddf"], 1e-7)


def test_compare_lrt_matches_lme4():
    """lme4's anova(m_small, m_big): ML refits, chisq within 1e-4 relative."""
    import lmmjax
    from conftest import FIXTURES, case_data, load_case

    path = FIXTURES / "reference" / "cases" / "sleepstudy_compare_intercept_vs_slope.json"
    case = load_case(str(path))
    df = case_data(path, case)
    small = lmmjax.lmer(case["models"]["m_small"], df)
    big = lmmjax.lmer(case["models"]["m_big"], df)
    tab = lmmjax.compare(big, small, names=["m_big", "m_small"])
    assert list(tab.index) == ["m_small", "m_big"]
    assert "refitting model(s) with ML (instead of REML)" in tab.attrs["notes"]
    assert any("boundary" in n for n in tab.attrs["notes"])
    for r in case["anova"]:
        row = tab.loc[r["model"]]
        assert row["npar"] == r["npar"]
        for k in ("AIC", "BIC", "logLik", "deviance"):
            np.testing.assert_allclose(row[k], r[k], rtol=1e-6)
        if r["Chisq"] is not None:
            np.testing.assert_allclose(row["chisq"], r["Chisq"], rtol=1e-4)
            assert row["df"] == r["Df"]
            np.testing.assert_allclose(row["p"], r["p"], rtol=1e-3)


def test_compare_refuses_different_data():
    import lmmjax

    ss = lmmjax.datasets.sleepstudy()
    m1 = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", ss)
    m2 = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", ss.iloc[:-10])
    with pytest.raises(lmmjax.DataError, match="different data"):
        lmmjax.compare(m1, m2)
    m3 = lmmjax.lmer("Reaction ~ 1 + (1 | Subject)", ss)
    with pytest.raises(ValueError, match="not comparable"):
        lmmjax.compare(m1, m3, refit=False)
    same = lmmjax.compare(m1, lmmjax.lmer("Reaction ~ Days + (Days | Subject)", ss), refit=False)
    assert same.attrs["notes"][0].startswith("comparing REML fits")


@pytest.mark.parametrize("case_name", ["sim_factor_interactions_reml", "orthodont_lmer_age_sex_reml", "cake_reml"])
@pytest.mark.parametrize("ddf", ["Satterthwaite", "Kenward-Roger"])
def test_type1_anova(case_name, ddf):
    """lmerTest's anova(fit, type = 1) (tests/r/make_anova_type1.R, tightly converged
    fits): F, den df and p within 1e-3 relative."""
    import json

    from conftest import FIXTURES, fitted_case

    ref = json.loads((FIXTURES / "extra" / "anova_type1.json").read_text())[case_name]
    sub = "reference" if (FIXTURES / "reference" / "cases" / f"{case_name}.json").exists() else "extra"
    _, _, m = fitted_case(str(FIXTURES / sub / "cases" / f"{case_name}.json"))
    a = m.anova(type=1, ddf=ddf.lower())
    r = pd.DataFrame(ref["anova_type1"][ddf]).set_index("term")
    assert list(a.index) == list(r.index)
    assert list(a["num_df"]) == list(r["NumDF"])
    _close(a["F"], r["F"], 1e-3)
    _close(a["den_df"], r["DenDF"], 1e-3)
    _close(a["p"], r["p"], 1e-3)
