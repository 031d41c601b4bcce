"""Estimated marginal means and contrasts against R's emmeans 1.8.4-1 (lmer.df = "satterthwaite",
"kenward-roger", "asymptotic"), from tests/r/make_emmeans_cases.R: Orthodont with random slopes
(EMMs of Sex at the mean age and at ages 8 and 14), nlme's Oats (split plot, factor(nitro)),
lme4's cake, and Oats with one cell missing (a rank-deficient fit: non-estimable means are NaN).

Tolerances: EMMs / contrast estimates, SE, df, t, CI limits and p-values 1e-4 relative.  One
exception, stated: p-values adjusted through the studentized range ("tukey", "dunnettx") are
compared with an absolute floor of 1e-12 besides — R's ``ptukey(lower.tail = FALSE)`` is computed
as 1 − CDF, so values below ~1e-9 carry R's ~3e-13 integration error (e.g. R gives 4.276e-12 for
Oats' nitro 0 − 0.6 where the studentized range's upper tail is 3.999e-12); lmmjax uses scipy's
upper tail directly.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.emmeans import _label, p_adjust

FIX = Path(__file__).parent / "fixtures"
REF = json.loads((FIX / "emmeans" / "emmeans.json").read_text())
RTOL = 1e-4
PTUKEY_ATOL = 1e-12


def _data(case: dict) -> pd.DataFrame:
    src = case["data"]
    if src == "lmmjax:orthodont":
        return lmmjax.datasets.orthodont()
    if src == "oats.csv":
        d = pd.read_csv(FIX / "emmeans" / "oats.csv")
        d["Block"] = pd.Categorical(d["Block"], categories=["I", "II", "III", "IV", "V", "VI"])
        d["Variety"] = pd.Categorical(d["Variety"], categories=["Golden Rain", "Marvellous", "Victory"])
        drop = case.get("drop")
        if drop:
            d = d[~((d["Variety"] == drop["Variety"]) & np.isclose(d["nitro"], drop["nitro"]))]
        return d.reset_index(drop=True)
    d = pd.read_csv(FIX / "extra" / "data" / "cake.csv")
    d["recipe"] = pd.Categorical(d["recipe"], categories=["A", "B", "C"])
    d["temperature"] = pd.Categorical(d["temperature"].astype(str), categories=[str(t) for t in range(175, 226, 10)])
    d["replicate"] = pd.Categorical(d["replicate"])
    return d


@lru_cache(maxsize=None)
def _model(name: str):
    case = REF["cases"][name]
    with pytest.warns(UserWarning, match="rank deficient") if name == "oats_missing_cell" else nullcontext():
        return lmmjax.lmer(case["formula"], _data(case), reml=case["REML"])


def _queries():
    for name, case in REF["cases"].items():
        for i, q in enumerate(case["queries"]):
            for ddf in q["results"]:
                yield pytest.param(name, i, ddf, id=f"{name}-{i}-{ddf}")


def _close(mine, ref, what, atol=0.0):
    ref = np.array([np.inf if v is None else v for v in ref], float) if what.endswith("df") else \
        np.array([np.nan if v is None else v for v in ref], float)
    mine = np.asarray(mine, float)
    np.testing.assert_array_equal(np.isnan(mine), np.isnan(ref), err_msg=f"{what}: NaN pattern")
    np.testing.assert_allclose(mine, ref, rtol=RTOL, atol=atol, err_msg=what)


def _col(tab: pd.DataFrame, *names):
    for n in names:
        if n in tab.columns:
            return tab[n].tolist()
    raise KeyError(names)


def _labels_equal(mine, ref):
    assert [_label(v) for v in mine] == [_label(v) for v in ref]


def _call(emm, cn: dict):
    method = cn["method"]
    kw = {"adjust": cn["adjust"]} if cn.get("adjust") is not None else {}
    if method == "pairs":
        return emm.pairs(reverse=bool(cn.get("reverse", False)), **kw)
    if cn.get("ref") is not None:
        kw["ref"] = int(cn["ref"]) - 1                       # R counts from 1
    return emm.contrast(method, **kw)


@pytest.mark.parametrize("name,qi,ddf", list(_queries()))
def test_against_emmeans(name, qi, ddf):
    q = REF["cases"][name]["queries"][qi]
    res = q["results"][ddf]
    m = _model(name)
    emm = m.emmeans(q["specs"], by=q["by"], at=q["at"], ddf=ddf, level=q["level"])
    tab = emm.table
    ref = pd.DataFrame(res["emm"])
    for v in emm.specs + emm.by:
        _labels_equal(tab[v], ref[v])
    _close(tab["emmean"], ref["emmean"], "emmean")
    _close(tab["SE"], ref["SE"], "SE")
    _close(tab["df"], ref["df"], "df")
    _close(tab["lower"], _col(ref, "lower.CL", "asymp.LCL"), "lower")
    _close(tab["upper"], _col(ref, "upper.CL", "asymp.UCL"), "upper")
    _close(tab["t"], _col(ref, "t.ratio", "z.ratio"), "t")
    _close(tab["p"], ref["p.value"], "p")
    assert "emmean" in repr(emm) and f"Degrees-of-freedom method: {ddf}" in repr(emm)
    for cn in res["contrasts"]:
        ct = _call(emm, cn)
        mine = ct.table
        r = pd.DataFrame(cn["table"])
        what = f"{cn['method']} adjust={cn.get('adjust')}"
        assert list(mine["contrast"]) == list(r["contrast"]), what
        for v in ct.by:
            _labels_equal(mine[v], r[v])
        for col, rcol in (("estimate", ["estimate"]), ("SE", ["SE"]), ("df", ["df"]),
                          ("t", ["t.ratio", "z.ratio"]), ("lower", ["lower.CL", "asymp.LCL"]),
                          ("upper", ["upper.CL", "asymp.UCL"])):
            _close(mine[col], _col(r, *rcol), f"{what} {col}")
        studentized = ct.adjust in ("tukey", "dunnettx")
        _close(mine["p"], r["p.value"], f"{what} p", atol=PTUKEY_ATOL if studentized else 0.0)
        # the adjustment emmeans reports using is the one applied
        used = " ".join(cn["adjust_used"] or [])
        if "P value adjustment" in used:
            assert f"P value adjustment: {ct.adjust} method" in used, (what, used)
        else:
            assert ct.adjust == "none", (what, used)
        if "Conf-level adjustment" in used:
            assert f"Conf-level adjustment: {ct.ci_adjust} method" in used, (what, used)
        else:
            assert ct.ci_adjust == "none", (what, used)


@pytest.mark.parametrize("method", ["holm", "hochberg", "BH", "BY", "bonferroni"])
def test_p_adjust_matches_r(method):
    got = p_adjust(np.array(REF["p_adjust"]["p"]), method)
    np.testing.assert_allclose(got, REF["p_adjust"][method], rtol=1e-12)
    assert np.array_equal(p_adjust(np.array(REF["p_adjust"]["p"]), "fdr"),
                          p_adjust(np.array(REF["p_adjust"]["p"]), "BH"))


def test_p_adjust_counts_nan_in_family():
    p = np.array([0.01, np.nan, 0.02])
    np.testing.assert_allclose(p_adjust(p, "holm", 3)[[0, 2]], [0.03, 0.04])
    assert np.isnan(p_adjust(p, "holm", 3)[1])


@pytest.mark.parametrize("ddf", ["satterthwaite", "kenward-roger"])
def test_one_row_test_reports_t_and_ci(ddf):
    """m.test on one contrast row = the EMM (R's numbers) and F = t², p unchanged."""
    m = _model("orthodont")
    q = REF["cases"]["orthodont"]["queries"][1]
    emm = m.emmeans("Sex", by="age", at={"age": [8, 14]}, ddf=ddf)
    ref = pd.DataFrame(q["results"][ddf]["emm"])
    for i in range(len(ref)):
        r = m.test(emm.L[i], ddf=ddf)
        _close([r["estimate"]], [ref["emmean"][i]], "estimate")
        _close([r["se"]], [ref["SE"][i]], "se")
        _close([r["df"]], [ref["df"][i]], "df")
        _close([r["lower"], r["upper"]], [ref["lower.CL"][i], ref["upper.CL"][i]], "CI")
        _close([r["t"]], [ref["t.ratio"][i]], "t")
        np.testing.assert_allclose(r["F"], r["t"] ** 2, rtol=1e-10)
        np.testing.assert_allclose(r["den_df"], r["df"], rtol=1e-12)
    # a coefficient name: the coef_table row
    r = m.test("SexFemale", ddf=ddf, level=0.9)
    row = m.coef_table(ddf, level=0.9).loc["SexFemale"]
    for k in ("estimate", "se", "df", "t", "p", "lower", "upper"):
        np.testing.assert_allclose(r[k], row[k], rtol=1e-10, err_msg=k)
    # several rows: the F test only, as before
    assert "estimate" not in m.test(["SexFemale", "age:SexFemale"], ddf=ddf)


def test_repr_and_defaults():
    m = _model("oats")
    emm = m.emmeans("nitro")
    text = repr(emm)
    assert "Results are averaged over the levels of: Variety" in text and "satterthwaite" in text
    assert emm.contrast("trt.vs.ctrl").adjust == "dunnettx"
    assert emm.contrast("eff").adjust == "fdr"
    assert emm.contrast("consec").adjust == "sidak"       # emmeans' "mvt" is not computed
    assert emm.contrast({"lin": [-3, -1, 1, 3]}).adjust == "none"
    c = emm.contrast("pairwise", adjust="tukey")
    assert "P value adjustment: tukey method for comparing a family of 4 estimates" in repr(c)
    # tukey outside a pairwise family becomes sidak, as in emmeans
    assert emm.contrast("trt.vs.ctrl", adjust="tukey").adjust == "sidak"
    # a reference level by label equals the one by position
    a = emm.contrast("trt.vs.ctrl", ref="0.2").table
    b = emm.contrast("trt.vs.ctrl", ref=1).table
    pd.testing.assert_frame_equal(a, b)
    # contrasts within groups given at contrast time
    cells = m.emmeans(["Variety", "nitro"])
    by_nitro = m.emmeans("Variety", by="nitro").pairs().table
    regroup = cells.pairs(by="nitro").table
    np.testing.assert_allclose(regroup["estimate"], by_nitro["estimate"], rtol=1e-10)
    np.testing.assert_allclose(regroup["p"], by_nitro["p"], rtol=1e-8)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.emmeans("Variet"), "not variables of the fixed part"),
    (lambda m: m.emmeans("Variety", by="Variety"), "distinct"),
    (lambda m: m.emmeans("Variety", at={"Variety": ["Nope"]}), "not levels of 'Variety'"),
    (lambda m: m.emmeans("Variety", level=95), "level"),
    (lambda m: m.emmeans("Variety", ddf="bogus"), "ddf"),
    (lambda m: m.emmeans("nitro").pairs(adjust="mvt"), "Monte-Carlo"),
    (lambda m: m.emmeans("nitro").contrast({"x": [1, -1]}), "has 2 weights; each group has 4 means"),
    (lambda m: m.emmeans("nitro").contrast("poly"), "unknown contrast method"),
    (lambda m: m.emmeans("nitro").contrast("trt.vs.ctrl", ref=7), "out of range"),
    (lambda m: m.emmeans("nitro").contrast("trt.vs.ctrl", ref="0.9"), "neither a position nor a level"),
])
def test_bad_input(call, match):
    with pytest.raises(lmmjax.InputError, match=match):
        call(_model("oats"))


def test_covariate_at_values_and_errors():
    m = _model("orthodont")
    emm = m.emmeans("age", at={"age": [8, 11, 14]})
    # with Sex averaged: the line through the equally weighted Sex lines
    b = m.fixef
    slope = b["age"] + 0.5 * b["age:SexFemale"]
    np.testing.assert_allclose(np.diff(emm.table["emmean"]), 3 * slope, rtol=1e-10)
    with pytest.raises(lmmjax.InputError, match="must be numbers"):
        m.emmeans("Sex", at={"age": "old"})


def test_estimable_contrast_of_non_estimable_means():
    """age2 = 2·age is dropped; at age = 9 (age2 at its mean 22) the means are not estimable,
    their difference is (as emmeans' estimability check on the contrast's own function)."""
    d = lmmjax.datasets.orthodont()
    d["age2"] = 2.0 * d["age"]
    with pytest.warns(UserWarning, match="rank deficient"):
        m = lmmjax.lmer("distance ~ Sex + age + age2 + (1 | Subject)", d)
    assert np.isfinite(m.emmeans("Sex").table["emmean"]).all()
    emm = m.emmeans("Sex", at={"age": 9})
    assert np.isnan(emm.table["emmean"]).all() and np.isnan(emm.table["SE"]).all()
    pr = emm.pairs().table
    np.testing.assert_allclose(pr["estimate"], -m.fixef["SexFemale"], rtol=1e-12)
    np.testing.assert_allclose(pr["SE"], np.sqrt(m.vcov.loc["SexFemale", "SexFemale"]), rtol=1e-12)
