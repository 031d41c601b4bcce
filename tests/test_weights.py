"""Prior weights (lme4's ``weights=``: Var(εᵢ) = σ²/wᵢ) in ``lmer`` and ``lmer_batch``,
against lme4 1.1 + lmerTest (``tests/r/make_weights_cases.R`` →
``tests/fixtures/weights/weights.json``).  Tolerances as for the unweighted lme4 cases:
criterion and log-likelihood 1e-6 absolute (lme4 run with bobyqa, rhoend 1e-12), estimates,
SEs, θ, σ, fitted values 1e-5 relative, Satterthwaite df 1e-4 relative."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import DataError

FIX = json.loads((Path(__file__).parent / "fixtures" / "weights" / "weights.json").read_text())
RTOL = 1e-5


def _frame(name: str) -> pd.DataFrame:
    df = pd.DataFrame(FIX["data"][name])
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].astype("category")
    return df


CASES = {"sleep_reml": "sleepstudy", "sleep_ml": "sleepstudy", "sleep_int": "sleepstudy",
         "penicillin": "penicillin"}


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_lmer_matches_lme4(case):
    ref = FIX["single"][case]
    df = _frame(CASES[case])
    m = lmmjax.lmer(ref["formula"], df, reml=ref["REML"], weights=ref["weights"])
    crit = m.reml_criterion if ref["REML"] else m.deviance
    assert abs(crit - ref["criterion"]) < 1e-6 * max(1.0, abs(ref["criterion"]))
    assert abs(m.loglik - ref["logLik"]) < 1e-6 * max(1.0, abs(ref["logLik"]))
    np.testing.assert_allclose(m.fixef.to_numpy(), list(ref["fixef"].values()), rtol=RTOL)
    np.testing.assert_allclose(m.theta, ref["theta"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(m.sigma, ref["sigma"], rtol=RTOL)
    np.testing.assert_allclose(m.fitted, ref["fitted"], rtol=RTOL)
    np.testing.assert_allclose(m.residuals, ref["resid"], rtol=RTOL, atol=1e-6 * np.std(ref["resid"]))
    tab = m.coef_table()
    np.testing.assert_allclose(tab["se"].to_numpy(), ref["se"], rtol=RTOL)
    np.testing.assert_allclose(tab["df"].to_numpy(), ref["df"], rtol=1e-4)
    # an array of weights is the same as the column
    m2 = lmmjax.lmer(ref["formula"], df, reml=ref["REML"], weights=df[ref["weights"]].to_numpy())
    assert m2.loglik == pytest.approx(m.loglik, rel=1e-12, abs=1e-9)


def test_unit_weights_change_nothing():
    df = lmmjax.datasets.sleepstudy()
    m0 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", df)
    m1 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", df, weights=np.ones(len(df)))
    assert m1.reml_criterion == pytest.approx(m0.reml_criterion, rel=1e-12)
    np.testing.assert_allclose(m1.fixef, m0.fixef, rtol=1e-9)


def test_weights_refits_keep_weights():
    """compare()'s ML refits and profile intervals refit with the same weights."""
    ref = FIX["single"]["sleep_ml"]
    df = _frame("sleepstudy")
    m_reml = lmmjax.lmer(ref["formula"], df, weights="w")
    small = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df, weights="w")
    tab = lmmjax.compare(small, m_reml)
    assert tab["logLik"].iloc[-1] == pytest.approx(ref["logLik"], abs=1e-6)
    with pytest.raises(DataError, match="different data"):
        lmmjax.compare(lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df), m_reml)


@pytest.mark.parametrize("bad,match", [
    ("nope", "not in the data"), (np.ones(5), "one value per data row"),
    ("neg", "positive and finite"),
])
def test_bad_weights(bad, match):
    df = _frame("sleepstudy")
    df["neg"] = df["w"].where(df.index != 7, -1.0)
    with pytest.raises(DataError, match=match):
        lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df, weights=bad)


def test_missing_weights_drop_rows():
    df = _frame("sleepstudy")
    df.loc[[3, 10], "w"] = np.nan
    m = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df, weights="w")
    m_drop = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", df.drop(index=[3, 10]), weights="w")
    assert m.nobs == len(df) - 2
    assert m.reml_criterion == pytest.approx(m_drop.reml_criterion, rel=1e-12)


def _batch_inputs():
    b = FIX["batch"]
    obs = pd.DataFrame(b["obs"])
    for c in ("donor", "cond"):
        obs[c] = obs[c].astype("category")
    return b, obs, np.asarray(b["Y"], float), np.asarray(b["W"], float), np.asarray(b["shared_w"], float)


def _check_batch(res, refs, coef_names):
    for g, ref in enumerate(refs):
        assert abs(res.loglik.iloc[g] * -2 - ref["criterion"]) < 1e-6 * max(1.0, abs(ref["criterion"]))
        np.testing.assert_allclose(res.fixef.iloc[g].to_numpy(), ref["fixef"], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(res.theta.iloc[g].to_numpy(), ref["theta"], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(np.sqrt(res.sigma2.iloc[g]) if hasattr(res, "sigma2") else res.sigma.iloc[g],
                                   ref["sigma"], rtol=RTOL)
    for j, name in enumerate(coef_names):
        tab = res.coef_table(name)
        np.testing.assert_allclose(tab["se"].to_numpy(), [r["se"][j] for r in refs], rtol=RTOL)
        np.testing.assert_allclose(tab["df"].to_numpy(), [r["df"][j] for r in refs], rtol=1e-4)


def test_batch_per_response_weights_match_lme4():
    """voom-style: a different weight vector for every gene (n × G)."""
    b, obs, Y, W, _ = _batch_inputs()
    res = lmmjax.lmer_batch(b["formula"], obs, Y, weights=W, progress=False)
    assert res.status.isin(["ok", "singular"]).all()      # gene 6 is singular in lme4 too (θ = 0)
    _check_batch(res, b["per_gene"], b["coef_names"])


def test_batch_shared_weights_match_lme4_and_lmer():
    b, obs, Y, _, w = _batch_inputs()
    res = lmmjax.lmer_batch(b["formula"], obs.assign(w=w), Y, weights="w", progress=False)
    _check_batch(res, b["shared"], b["coef_names"])
    # the same shared vector given per response, and one gene through lmer
    res2 = lmmjax.lmer_batch(b["formula"], obs, Y, weights=np.repeat(w[:, None], Y.shape[1], axis=1), progress=False)
    np.testing.assert_allclose(res2.loglik.to_numpy(), res.loglik.to_numpy(), rtol=1e-9)
    m = lmmjax.lmer("y" + b["formula"], obs.assign(y=Y[:, 2], w=w), weights="w")
    assert m.loglik == pytest.approx(res.loglik.iloc[2], abs=1e-6)


def test_batch_weights_with_missing_values_and_bad_columns():
    """NaN responses and zero weights drop rows of that response only; a response with a
    negative weight fails alone (the others are bit-identical)."""
    b, obs, Y, W, _ = _batch_inputs()
    Y, W = Y.copy(), W.copy()
    Y[[2, 9], 1] = np.nan
    W[[4], 3] = 0.0
    W[0, 5] = -1.0
    res = lmmjax.lmer_batch(b["formula"], obs, Y, weights=W, progress=False)
    assert res.status.iloc[5] == "failed" and "weights" in res.errors.iloc[5]
    for g, drop in ((1, [2, 9]), (3, [4])):
        keep = np.setdiff1d(np.arange(len(obs)), drop)
        m = lmmjax.lmer("y" + b["formula"], obs.iloc[keep].assign(y=Y[keep, g], w=W[keep, g]), weights="w")
        assert m.loglik == pytest.approx(res.loglik.iloc[g], abs=1e-6)
        assert res.nobs.iloc[g] == len(keep)
    one = res[res.names[3]]                 # the single-model result of a weighted response
    assert one.loglik == pytest.approx(res.loglik.iloc[3], abs=1e-6) and one.nobs == len(obs) - 1
    ok = lmmjax.lmer_batch(b["formula"], obs, Y[:, :5], weights=W[:, :5], progress=False)
    np.testing.assert_array_equal(ok.fixef.to_numpy(), res.fixef.to_numpy()[:5])


# ---------------------------------------------------------------- variance partitioning
VP_TOL = 1e-6


@pytest.mark.parametrize("case", ["sleep_unweighted", "sleep_reml", "sleep_int", "penicillin"])
def test_variance_partition_lmer(case):
    """Fractions equal variancePartition's calcVarPart computed from lme4's VarCorr/fixef."""
    ref = FIX["single"][case]
    df = _frame(CASES.get(case, "sleepstudy"))
    w = None if ref["weights"] == "one" else ref["weights"]
    m = lmmjax.lmer(ref["formula"], df, reml=ref["REML"], weights=w)
    vp = m.variance_partition()
    assert vp.sum() == pytest.approx(1.0, abs=1e-12)
    assert set(vp.index) == set(ref["varpart"])
    for k, v in ref["varpart"].items():
        assert abs(vp[k] - v) < VP_TOL, k
    assert "Days" not in m.variance_partition(fixed=False).index


@pytest.mark.parametrize("kind", ["per_gene", "shared"])
def test_variance_partition_batch(kind):
    b, obs, Y, W, w = _batch_inputs()
    if kind == "shared":
        res = lmmjax.lmer_batch(b["formula"], obs.assign(w=w), Y, weights="w", progress=False)
    else:
        res = lmmjax.lmer_batch(b["formula"], obs, Y, weights=W, progress=False)
    vp = res.variance_partition()
    np.testing.assert_allclose(vp.sum(axis=1).to_numpy(), 1.0, atol=1e-12)
    ref = pd.DataFrame([r["varpart"] for r in b[kind]], index=vp.index)
    np.testing.assert_allclose(vp[ref.columns].to_numpy(), ref.to_numpy(), atol=VP_TOL)


def test_variance_partition_plots(tmp_path):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import warnings

    from lmmjax import plots

    b, obs, Y, W, _ = _batch_inputs()
    res = lmmjax.lmer_batch(b["formula"], obs, Y, weights=W, progress=False)
    m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = plots.variance_partition(res.variance_partition())
        assert [t.get_text() for t in ax.get_xticklabels()][-1] == "Residuals"
        ax.figure.savefig(tmp_path / "vp.png")
        ax2 = plots.variance_partition(m.variance_partition())
        assert len(ax2.patches) == 4
        ax2.figure.savefig(tmp_path / "vp1.png")
    assert (tmp_path / "vp.png").stat().st_size > 1000


def test_weighted_kenward_roger():
    """pbkrtest ignores prior weights (Σ = ZGZᵀ + σ²I); the reference is pbkrtest on the
    equivalent unweighted model of √w-scaled rows.  lmer and lmer_batch (shared weights)
    agree with it: SE 1e-5, df 1e-4."""
    ref = FIX["kr_weighted"]
    df = _frame("sleepstudy")
    m = lmmjax.lmer(ref["formula"], df, weights=ref["weights"])
    assert abs(m.reml_criterion - ref["criterion"]) < 1e-6 * abs(ref["criterion"])
    tab = m.coef_table(ddf="kenward-roger")
    np.testing.assert_allclose(tab["se"].to_numpy(), ref["se"], rtol=RTOL)
    np.testing.assert_allclose(tab["df"].to_numpy(), ref["df"], rtol=1e-4)
    res = lmmjax.lmer_batch("~ Days + (Days | Subject)", df, df[["Reaction"]].to_numpy(), weights="w", progress=False)
    bt = res.coef_table("Days", ddf="kenward-roger")
    np.testing.assert_allclose(bt[["se", "df"]].to_numpy()[0], [ref["se"][1], ref["df"][1]], rtol=1e-4)


def test_weighted_profile_intervals():
    """Profile intervals of σ_Subject and σ under weights equal lme4's (1e-4 relative); the
    profiles work on the √w-scaled statistics, whose deviance is the reported one + Σ log w."""
    ref = FIX["profile_weighted"]
    m = lmmjax.lmer(ref["formula"], _frame("sleepstudy"), weights=ref["weights"])
    ci = m.confint()
    np.testing.assert_allclose(ci["lower"].to_numpy()[:2], ref["lower"], rtol=1e-4)
    np.testing.assert_allclose(ci["upper"].to_numpy()[:2], ref["upper"], rtol=1e-4)
