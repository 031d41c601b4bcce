"""The result API of residual-structure fits (GroupedResult: lmmjax.gls and lmmjax.lmer(...,
residual=)) against nlme, from tests/r/make_gls_api_cases.R (tests/fixtures/gls_api/cases.json,
nlme fits converged to 1e-12): fitted values and residuals (gls; lme at level 1), predictions
at levels 0 and 1 for new rows, ranef, nlme's denominator df, nlme's sequential F tests and
anova(fit, L=), intervals(fit) for the fixed effects, and nlme's anova(m1, m2) likelihood-ratio
tables through lmmjax.compare (gls with gls, gls with lme, lmer with lmer + AR1, ML refits).

Tolerance: 1e-4 relative for every quantity (an absolute floor of 1e-4 for values near 0,
e.g. residuals and random effects, which are differences of numbers ~20); df and term counts
exactly.  Fits share module-scoped fixtures: each design compiles once.
"""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import cov
from lmmjax.compare import CompareTable

FIX = Path(__file__).parent / "fixtures"
REF = json.loads((FIX / "gls_api" / "cases.json").read_text())
RTOL = 1e-4


def _close(actual, expected, atol=1e-4):
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float), rtol=RTOL, atol=atol)


def _orthodont():
    df = pd.read_csv(FIX / "reference" / "data" / "Orthodont.csv")
    df["Sex"] = pd.Categorical(df["Sex"], categories=["Male", "Female"])
    return df


def _bodyweight():
    df = pd.read_csv(FIX / "gls_api" / "data" / "BodyWeight.csv")
    df["Diet"] = pd.Categorical(df["Diet"].astype(str), categories=["1", "2", "3"])
    return df


def _newdata(name, like):
    nd = pd.DataFrame(REF["newdata"][name])
    for c in nd.columns:
        if isinstance(like[c].dtype, pd.CategoricalDtype):
            nd[c] = pd.Categorical(nd[c].astype(str), categories=like[c].cat.categories)
        elif pd.api.types.is_integer_dtype(like[c]) and not pd.api.types.is_integer_dtype(nd[c]):
            nd[c] = nd[c].astype(float)         # ages 8.5 in new rows of an integer column
        else:
            nd[c] = nd[c].astype(like[c].dtype)
    return nd


FORM = "distance ~ age * Sex"
MODELS = {
    "orth_gls_ar1": lambda: lmmjax.gls(FORM, _orthodont(), residual=cov.AR1(group="Subject")),
    "orth_gls_ar1_varident": lambda: lmmjax.gls(FORM, _orthodont(),
                                                residual=cov.AR1(group="Subject") * cov.VarIdent(by="Sex")),
    "orth_gls_ar1_additive": lambda: lmmjax.gls("distance ~ age + Sex", _orthodont(),
                                                residual=cov.AR1(group="Subject")),
    "orth_lme_ar1": lambda: lmmjax.lmer(FORM + " + (1 | Subject)", _orthodont(), residual=cov.AR1(group="Subject")),
    "orth_lme_slope": lambda: lmmjax.lmer(FORM + " + (age | Subject)", _orthodont()),
    "bw_lme_varpower": lambda: lmmjax.lmer("weight ~ Time * Diet + (Time | Rat)", _bodyweight(),
                                           residual=cov.VarPower(covariate="Time")),
}
DATA = {"orth": ("orthodont", _orthodont), "bw": ("bodyweight", _bodyweight)}


@pytest.fixture(scope="module")
def fits():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = MODELS[name]()
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["orth_gls_ar1", "orth_gls_ar1_varident", "orth_lme_ar1", "orth_lme_slope",
                                  "bw_lme_varpower"])
def test_fitted_residuals_predict_ranef(fits, name):
    m, ref = fits(name), REF["cases"][name]
    data_name, data = DATA[name.split("_")[0]]
    assert m.loglik == pytest.approx(ref["logLik"], rel=1e-7)
    _close(m.fixef, list(ref["coef"].values()))
    nd = _newdata(data_name, data())
    if ref["engine"] == "gls":
        _close(m.fitted, ref["fitted"])
        _close(m.residuals, ref["residuals"])
        _close(m.predict(nd), ref["predict"])
        _close(m.predict(), ref["fitted"])
        with pytest.raises(lmmjax.InputError, match="no random effects"):
            m.ranef()
        assert m.ngroups == {"Subject": 27}
    else:
        _close(m.fitted, ref["fitted1"])
        _close(m.residuals, ref["residuals1"])
        _close(m.predict(re_form=False), ref["fitted0"])
        _close(m.design.y - m.predict(re_form=False), ref["residuals0"])
        _close(m.predict(nd), ref["predict1"])
        _close(m.predict(nd, re_form=False), ref["predict0"])
        (g, ranef), = m.ranef().items()
        assert m.ngroups == ref["ngroups"] and list(ranef.columns) == list(np.atleast_1d(ref["ranef"]["columns"]))
        ranef.index = ranef.index.astype(str)
        _close(ranef.loc[ref["ranef"]["levels"]].to_numpy(), ref["ranef"]["values"])
    assert m.nobs == ref["nobs"] and m.formula.startswith(FORM.split(" ~")[0] if "orth" in name else "weight")


@pytest.mark.parametrize("name", ["orth_gls_ar1", "orth_gls_ar1_varident", "orth_gls_ar1_additive",
                                  "orth_lme_ar1", "bw_lme_varpower"])
def test_f_tests_df_and_intervals(fits, name):
    """nlme's df (n − p; containment for lme), its sequential anova(fit) F values (our type 1
    in the GLS metric), anova(fit, L=) and intervals(fit): to 1e-4 relative; df exactly."""
    m, ref = fits(name), REF["cases"][name]
    per_coef, per_term = m.nlme_df()
    np.testing.assert_array_equal(per_coef.to_numpy(), ref["df"])
    seq = ref["anova_sequential"]
    tab = m.anova(type=1, ddf="nlme")
    assert len(tab) == len(seq["terms"]) - 1            # nlme also tests the intercept
    _close(tab["F"], seq["F"][1:], atol=0)
    np.testing.assert_array_equal(tab["num_df"], seq["numDF"][1:])
    np.testing.assert_array_equal(tab["den_df"], seq["denDF"][1:] if seq["denDF"] else ref["nobs"] - len(ref["coef"]))
    _close(tab["p"], seq["p"][1:], atol=1e-12)
    t = m.test(ref["L"], ddf="nlme")
    _close(t["F"], ref["anova_L"]["F"], atol=0)
    assert t["num_df"] == ref["anova_L"]["numDF"]
    if ref["anova_L"]["denDF"] is not None:
        assert t["den_df"] == ref["anova_L"]["denDF"]
    ci = m.confint()
    _close(ci["estimate"], ref["intervals"]["est"])
    _close(ci["lower"], ref["intervals"]["lower"])
    _close(ci["upper"], ref["intervals"]["upper"])
    # type III: the highest-order term's hypothesis is nlme's marginal one, whatever the coding
    last = m.anova(type=3, ddf="nlme").iloc[-1]
    _close(last["F"], ref["anova_marginal"]["F"][-1], atol=0)
    # the Satterthwaite/KR machinery answers the same hypotheses with its own df
    assert m.anova(type=1, ddf="residual")["F"].to_numpy() == pytest.approx(tab["F"].to_numpy(), rel=1e-12)


def test_compare_matches_nlme_anova(fits):
    """nlme's anova(m1, m2): REML fits with the same fixed effects compared as they are (gls vs
    gls, gls vs lme, an lmer random-slope model vs lmer + AR1); different fixed effects refitted
    by ML.  AIC, BIC, logLik, L.Ratio, p to 1e-4 relative."""
    def check(tab, key, names):
        r = REF["lrt"][key]
        assert list(tab.index) == names
        np.testing.assert_array_equal(tab["npar"], r["df"])
        for ours, theirs in (("AIC", "AIC"), ("BIC", "BIC"), ("logLik", "logLik")):
            _close(tab[ours], r[theirs], atol=0)
        _close(tab["deviance"], -2 * np.asarray(r["logLik"]), atol=0)
        _close(tab["chisq"].iloc[1], r["L.Ratio"][1], atol=0)
        _close(tab["p"].iloc[1], r["p"][1], atol=0)
        return tab.attrs["notes"]

    ar1, vi, lme = fits("orth_gls_ar1"), fits("orth_gls_ar1_varident"), fits("orth_lme_ar1")
    notes = check(lmmjax.compare(vi, ar1, names=["vi", "ar1"]), "gls_ar1_vs_varident_reml", ["ar1", "vi"])
    assert notes == ["comparing REML fits (same fixed effects)"]      # a variance ratio: no boundary note
    notes = check(lmmjax.compare(ar1, lme, names=["gls", "lme"]), "gls_ar1_vs_lme_ar1_reml", ["gls", "lme"])
    assert any(n.startswith("lme: variance parameters are tested on the boundary") for n in notes)
    slope = fits("orth_lme_slope")
    assert type(slope).__name__ == "LmerResult"
    check(lmmjax.compare(slope, lme, names=["slope", "ar1"]), "lme_slope_vs_lme_ar1_reml", ["ar1", "slope"])
    add = fits("orth_gls_ar1_additive")
    tab = lmmjax.compare(slope, add, names=["slope", "add"])      # both refitted by ML (lmer and gls)
    notes = check(tab, "lme_slope_vs_gls_ar1_additive_ml", ["add", "slope"])
    assert notes[0] == "refitting model(s) with ML (instead of REML)"
    with pytest.raises(ValueError, match="not comparable"):
        lmmjax.compare(add, ar1, refit=False)


def test_compare_table_prints_whole_with_notes(fits):
    tab = lmmjax.compare(fits("orth_gls_ar1"), fits("orth_lme_ar1"), names=["gls", "lme"])
    assert isinstance(tab, CompareTable)
    with pd.option_context("display.width", 30, "display.max_columns", 3):
        text = repr(tab)
        assert str(tab) == text and "Note: lme: variance parameters" in tab._repr_html_()
    header = text.splitlines()[0].split()
    assert header == ["npar", "AIC", "BIC", "logLik", "deviance", "chisq", "df", "p"]   # one line, all columns
    assert len(text.splitlines()) == 3 + len(tab.notes)
    assert text.splitlines()[-1].startswith("Note: lme: variance parameters are tested on the boundary")
    assert type(tab[["AIC"]]) is pd.DataFrame                 # derived tables are plain pandas


def test_summary_and_repr(fits):
    m = fits("orth_lme_ar1")
    s = m.summary()
    assert isinstance(s, lmmjax.summary.SummaryText) and repr(s) == str(s)
    ct = m.coef_table()
    for part in ("Linear mixed-effects model fit by REML", "Model: distance ~ age * Sex + (1 | Subject)",
                 "Residual structure: AR1", "Phi", "Random effects:", "Subject", "Fixed effects:",
                 "Satterthwaite", "Residual standard error", "Number of observations: 108, groups: Subject 27",
                 f"{m.loglik:.4f}", f"{m.aic:.4f}", f"{m.bic:.4f}", f"{ct['df'].iloc[2]:.4g}",
                 f"{m.residual_params['Phi']:.6g}"):
        assert part in s, part
    s2 = fits("orth_gls_ar1_varident").summary(ddf="nlme")
    assert s2.startswith("Generalized least squares fit by REML") and "ratio:Female" in s2
    assert "Random effects" not in s2 and re.search(r"\s104\s", s2)     # nlme's n − p df column
    r = repr(m)
    assert len(r.splitlines()) < 15 and "df" not in r and "Phi" in r


def test_errors(fits):
    m = fits("orth_gls_ar1")
    with pytest.raises(lmmjax.InputError, match="method 'profile' is not available"):
        m.confint("profile")
    with pytest.raises(lmmjax.InputError, match="type must be 1 or 3"):
        m.anova(type=2)
    with pytest.raises(ValueError, match="ddf must be one of"):
        m.coef_table(ddf="between-within")
    with pytest.raises(lmmjax.DataError, match="newdata lacks column"):
        m.predict(pd.DataFrame({"age": [8.0]}))
    nd = _newdata("orthodont", _orthodont()).assign(Subject="X99")
    lme = fits("orth_lme_ar1")
    with pytest.raises(lmmjax.DataError, match="not seen in the fit"):
        lme.predict(nd)
    _close(lme.predict(nd, allow_new_levels=True), REF["cases"]["orth_lme_ar1"]["predict0"])
