"""Bad input gets a specific error (an ``lmmjax.InputError``: a ValueError naming the column,
term or count and the fix), never a NaN result or a traceback from inside pandas/JAX; and
formulas R users write mean what they mean in R (``I(x^2)`` a power, dotted names,
``offset()``), checked against lme4 (tests/r/make_input_cases.R).

One test per row of README's "Bad input" table."""
import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import DataError, FitError, FormulaError, InputError

R = json.loads((pathlib.Path(__file__).parent / "fixtures" / "input" / "r_formulas.json").read_text())
F = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep():
    d = lmmjax.datasets.load("sleepstudy")
    d["days.x"] = d["Days"]
    d["group.id"] = d["Subject"]
    d["z"] = d["Days"] ** 1.5
    d["w"] = np.log1p(d["Days"])
    return d


def _raises(cls, match, formula, data, **kw):
    with pytest.raises(cls, match=match) as info:
        lmmjax.lmer(formula, data, **kw)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    return str(info.value)


# ---------------------------------------------------------------- R's formula language
@pytest.mark.parametrize("case", ["power", "dotted", "offset", "offset2"])
def test_r_formulas_match_lme4(sleep, case):
    """lme4's REML criterion (1e-8 relative), fixed effects, θ, σ (1e-6), fitted
    values, residuals and predictions on new data (1e-6) — offsets included."""
    ref = R[case]
    m = lmmjax.lmer(ref["formula"], sleep)
    assert m.optinfo.criterion == pytest.approx(ref["REML"], rel=1e-8)
    assert list(m.fixef.index) == list(ref["fixef"])
    np.testing.assert_allclose(m.fixef.to_numpy(), list(ref["fixef"].values()), rtol=1e-6)
    np.testing.assert_allclose(m.optinfo.theta, ref["theta"], rtol=1e-5, atol=1e-6)
    assert m.sigma == pytest.approx(ref["sigma"], rel=1e-6)
    np.testing.assert_allclose(m.fitted, ref["fitted"], rtol=1e-6)
    np.testing.assert_allclose(m.residuals, ref["resid"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.predict(sleep.iloc[[0, 49, 99]]), ref["predict_new"], rtol=1e-6)


def test_power_is_not_xor(sleep):
    """I(Days^2) is Days² (Python's ^ would be XOR: Days XOR 2)."""
    a = lmmjax.lmer("Reaction ~ Days + I(Days^2) + (Days | Subject)", sleep)
    b = lmmjax.lmer("Reaction ~ Days + I(Days**2) + (Days | Subject)", sleep)
    assert a.optinfo.criterion == b.optinfo.criterion
    assert a.fixef.iloc[2] == pytest.approx(0.337022327441191, rel=1e-6)


def test_offset_in_simulate_and_batch(sleep):
    """simulate() includes the offset; lmer_batch with offset() equals lmer per response."""
    m = lmmjax.lmer("Reaction ~ Days + offset(z) + (Days | Subject)", sleep)
    sims = m.simulate(400, seed=1)
    # the simulated mean per row is Xβ̂ + offset (up to Monte Carlo error: σ_total ≈ 50 / √400)
    np.testing.assert_allclose(sims.mean(axis=1), m.predict(re_form=False), atol=12.0)
    rng = np.random.default_rng(3)
    Y = np.column_stack([sleep.Reaction + rng.normal(0, 10, len(sleep)) for _ in range(3)])
    res = lmmjax.lmer_batch("~ Days + offset(z) + (Days | Subject)", sleep, Y, progress=False)
    for j in range(3):
        s = lmmjax.lmer("y ~ Days + offset(z) + (Days | Subject)", sleep.assign(y=Y[:, j]))
        assert res.loglik.iloc[j] == pytest.approx(s.loglik, rel=1e-9)
        np.testing.assert_allclose(res.fixef.iloc[j].to_numpy(), s.fixef.to_numpy(), rtol=1e-6)


def test_offset_errors(sleep):
    _raises(DataError, r"offset\(zz\)", "Reaction ~ Days + offset(zz) + (1 | Subject)", sleep)
    _raises(FormulaError, "offset", "Reaction ~ Days + offset() + (1 | Subject)", sleep)
    _raises(FormulaError, "term of its own", "Reaction ~ Days * offset(z) + (1 | Subject)", sleep)


# ---------------------------------------------------------------- the bad-input table
def test_single_level_grouping_factor(sleep):
    msg = _raises(DataError, "single level", "Reaction ~ Days + (1 | g)", sleep.assign(g="a"))
    assert "'g'" in msg and "180" in msg


def test_constant_response(sleep):
    msg = _raises(DataError, "constant", "y ~ Days + (1 | Subject)", sleep.assign(y=3.0))
    assert "'y'" in msg and "180" in msg


def test_response_reproduced_exactly(sleep):
    # y = 2·Days + 1: σ̂ = 0, the criterion is −∞
    _raises(DataError, "reproduce the response exactly", "y ~ Days + (1 | Subject)", sleep.assign(y=2.0 * sleep.Days + 1.0))


def test_numbers_stored_as_text(sleep):
    msg = _raises(DataError, "numbers stored as text", "Reaction ~ x + (1 | Subject)",
                  sleep.assign(x=sleep.Reaction.astype(str)))
    assert "pd.to_numeric" in msg and "'x'" in msg


def test_numbers_in_object_column(sleep):
    _raises(DataError, "numbers stored as Python number objects", "Reaction ~ x + (1 | Subject)",
            sleep.assign(x=sleep.Days.astype(object)))
    # asked for as a factor, it is one (10 levels: 9 contrasts)
    m = lmmjax.lmer("Reaction ~ factor(x) + (1 | Subject)", sleep.assign(x=sleep.Days.astype(object)))
    assert m.fixef.size == 10


def test_text_columns_still_factors(sleep):
    """Strings that are not numbers are a factor, as in R; so are a few integer codes
    stored as text (InstEval's service "0"/"1"), but not 10 distinct decimals."""
    d = sleep.assign(grp=np.where(sleep.Days < 5, "early", "late"))
    m = lmmjax.lmer("Reaction ~ grp + (1 | Subject)", d)
    assert list(m.fixef.index) == ["(Intercept)", "grplate"]
    m = lmmjax.lmer("Reaction ~ svc + (1 | Subject)", sleep.assign(svc=(sleep.Days % 2).astype(str)))
    assert list(m.fixef.index) == ["(Intercept)", "svc1"]
    _raises(DataError, "numbers stored as text", "Reaction ~ x + (1 | Subject)",
            sleep.assign(x=(sleep.Days / 4).astype(str)))


def test_response_numbers_as_text(sleep):
    _raises(DataError, "pd.to_numeric", "y ~ Days + (1 | Subject)", sleep.assign(y=sleep.Reaction.astype(str)))


def test_duplicate_column_names(sleep):
    d = pd.concat([sleep, sleep[["Days"]]], axis=1)
    _raises(DataError, r"duplicate column names \['Days'\]", F, d)


def test_datetime_predictor(sleep):
    d = sleep.assign(t=pd.Timestamp("2020-01-01") + pd.to_timedelta(sleep.Days, unit="D"))
    msg = _raises(DataError, "dates/times", "Reaction ~ t + (1 | Subject)", d)
    assert ".dt.days" in msg


def test_unbalanced_parenthesis_is_pointed_at(sleep):
    msg = _raises(FormulaError, r"the '\)' at position 29 has no matching", "Reaction ~ Days + 1 | Subject)", sleep)
    assert msg.splitlines()[-1].index("^") == msg.splitlines()[-2].index(")")
    _raises(FormulaError, "never closed", "Reaction ~ Days + (1 | Subject", sleep)


def test_bad_theta(sleep):
    _raises(InputError, "3 finite entries", F, sleep, theta=[1.0, 2.0])
    _raises(InputError, "3 finite entries", F, sleep, start=[1.0, np.nan, 1.0])


@pytest.mark.parametrize("maker", [
    lambda d: d.Subject.astype(int),                       # integer codes
    lambda d: d.Subject.astype(str),                       # strings
    lambda d: "S" + d.Subject.astype(str),                 # text labels
    lambda d: pd.Categorical(d.Subject.astype(str), categories=list(d.Subject.astype(str).unique()) + ["unused"]),
])
def test_group_codings_give_the_same_fit(sleep, maker):
    ref = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep)
    m = lmmjax.lmer("Reaction ~ Days + (1 | g)", sleep.assign(g=maker(sleep)))
    assert m.optinfo.criterion == pytest.approx(ref.optinfo.criterion, rel=1e-12)


def test_boolean_group(sleep):
    m = lmmjax.lmer("Reaction ~ Days + (1 | g)", sleep.assign(g=sleep.Subject.astype(int) % 2 == 0))
    assert m.design.blocks[0].n_levels == 2


def test_existing_checks_are_input_errors(sleep):
    """The older checks belong to the same family."""
    _raises(DataError, r"\['Dayz'\]", "Reaction ~ Dayz + (1 | Subject)", sleep)
    _raises(DataError, "no complete rows", "Reaction ~ x + (1 | Subject)", sleep.assign(x=np.nan))
    _raises(DataError, "must be less than the number of observations",
            "Reaction ~ Days + (1 | r)", sleep.assign(r=np.arange(len(sleep))))
    _raises(DataError, "non-finite value", "Reaction ~ x + (1 | Subject)",
            sleep.assign(x=np.where(sleep.Days == 3, np.inf, sleep.Days)))
    _raises(FormulaError, "exactly one '~'", "Reaction + (1 | Subject)", sleep)
    m = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep)
    with pytest.raises(InputError, match="not seen in the fit"):
        m.predict(sleep.assign(Subject="new").iloc[:3])


def test_predict_newdata_checks(sleep):
    m = lmmjax.lmer("Reaction ~ Days + offset(z) + (Days | Subject)", sleep)
    with pytest.raises(DataError, match=r"newdata lacks column\(s\) \['Days'\]"):
        m.predict(sleep.drop(columns="Days").iloc[:3])
    with pytest.raises(DataError, match=r"newdata lacks column\(s\) \['z'\]"):
        m.predict(sleep.drop(columns="z").iloc[:3], re_form=False)
    with pytest.raises(DataError, match=r"lacks grouping column\(s\) \['Subject'\]"):
        m.predict(sleep.drop(columns="Subject").iloc[:3])
    # population predictions need no grouping column; a missing predictor value gives NaN
    # for that row only (R's na.pass)
    nd = sleep.drop(columns="Subject").iloc[:3].assign(Days=[0.0, np.nan, 2.0])
    out = m.predict(nd, re_form=False)
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()


def test_simple_matrices_equal_formulaic(sleep):
    """The fast path for plain numeric right-hand sides builds what formulaic builds."""
    from formulaic import model_matrix

    from lmmjax.design import _simple_matrix

    d = sleep.assign(a=np.arange(len(sleep)) % 7, b=np.cos(np.arange(len(sleep))))
    for rhs in ["Days", "1 + Days", "0 + Days", "Days + a + b", "b + Days - 1".replace(" - 1", " + -1"),
                "a + b + 0", "`days.x` + b"]:
        X, names = _simple_matrix(rhs, d)
        mm = model_matrix(rhs, d)
        np.testing.assert_array_equal(X, np.asarray(mm, float))
        assert [n.replace("Intercept", "(Intercept)") for n in mm.columns] == names
    assert _simple_matrix("Days * a", d) is None
    assert _simple_matrix("log(a + 1)", d) is None


# ---------------------------------------------------------------- batch faults
def test_batch_faults_are_reported_and_isolated(sleep):
    """Responses that cannot be fitted get status 'failed' and a reason; the others'
    results are bit-identical to a run without them; no warning leaks."""
    rng = np.random.default_rng(0)
    n = len(sleep)
    good = np.column_stack([sleep.Reaction + rng.normal(0, 10, n) for _ in range(3)])
    bad = {
        "zero": (np.zeros(n), "constant"),
        "const": (np.full(n, 5.0), "constant"),
        "allnan": (np.full(n, np.nan), "observed"),
        "few": (np.where(np.arange(n) < 3, np.arange(n) + 1.0, np.nan), "observed level"),
        "inf": (np.where(np.arange(n) == 5, np.inf, sleep.Reaction), "infinite"),
        "exact": (2.0 * sleep.Days + 1.0, "reproduce the response exactly"),
        "const_obs": (np.where(np.arange(n) % 3 == 0, np.nan, 7.0), "constant"),
    }
    Y = np.column_stack([good[:, 0], *[v for v, _ in bad.values()], good[:, 1:]])
    names = ["g0", *bad, "g1", "g2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lmmjax.lmer_batch("~ Days + (Days | Subject)", sleep, Y, names=names, progress=False)
        tab = res.coef_table("Days")
    for name, (_, why) in bad.items():
        assert res.status[name] == "failed", name
        assert why in res.errors[name], (name, res.errors[name])
        assert np.isnan(res.loglik[name]) and np.isnan(tab.loc[name, "p"])
    ref = lmmjax.lmer_batch("~ Days + (Days | Subject)", sleep, good, names=["g0", "g1", "g2"], progress=False)
    ref_tab = ref.coef_table("Days")
    for g in ["g0", "g1", "g2"]:
        assert res.status[g] == "ok"
        assert res.loglik[g] == ref.loglik[g]
        np.testing.assert_array_equal(res.fixef.loc[g].to_numpy(), ref.fixef.loc[g].to_numpy())
        np.testing.assert_array_equal(res.theta.loc[g].to_numpy(), ref.theta.loc[g].to_numpy())
        for col in ["estimate", "se", "df", "t", "p"]:
            assert tab.loc[g, col] == ref_tab.loc[g, col], (g, col)


def test_batch_sparse_zero_genes(sleep):
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    n = len(sleep)
    Y = np.column_stack([rng.poisson(3.0, n), np.zeros(n), rng.poisson(1.0, n)]).astype(float)
    res = lmmjax.lmer_batch("~ Days + (1 | Subject)", sleep, sp.csr_matrix(Y), progress=False)
    assert list(res.status) [1] == "failed" and "every observed value is 0" in res.errors.iloc[1]
    assert res.status.iloc[0] in ("ok", "singular") and res.status.iloc[2] in ("ok", "singular")
