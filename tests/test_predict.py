"""predict(se_fit=, interval=) and simulate(re_form=) against R (tests/r/make_predict_cases.R):
population-level SEs, Satterthwaite/KR df and CIs as emmeans on the reference grid; conditional
prediction-error variances as Henderson's equations formed densely from lme4's X, Z, Λ."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax

REF = json.loads((Path(__file__).parent / "fixtures" / "predict" / "predict.json").read_text())
RTOL = 1e-4       # lmmjax's own optimum vs lme4's (bobyqa, rhoend 1e-12): θ agree to ~1e-6


@pytest.fixture(scope="module")
def sleep_fit():
    return lmmjax.lmer("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())


@pytest.mark.parametrize("ddf,key", [("satterthwaite", "emm_satt"), ("kenward-roger", "emm_kr")])
def test_population_confidence_intervals_match_emmeans(sleep_fit, ddf, key):
    ref = pd.DataFrame(REF["sleepstudy"][key])
    out = sleep_fit.predict(pd.DataFrame({"Days": ref["Days"]}), re_form=False, interval="confidence", ddf=ddf)
    np.testing.assert_allclose(out["fit"], ref["emmean"], rtol=RTOL)
    np.testing.assert_allclose(out["se"], ref["SE"], rtol=RTOL)
    np.testing.assert_allclose(out["df"], ref["df"], rtol=RTOL)
    np.testing.assert_allclose(out[["lower", "upper"]], ref[["lower.CL", "upper.CL"]], rtol=RTOL)


def test_conditional_prediction_error_variance(sleep_fit):
    r = REF["sleepstudy"]
    rows = np.array(r["rows"]) - 1
    out = sleep_fit.predict(se_fit=True)
    np.testing.assert_allclose(out["fit"].to_numpy()[rows], r["fit_rows"], rtol=RTOL)
    np.testing.assert_allclose(out["se"].to_numpy()[rows] ** 2, r["pev_rows"], rtol=RTOL)
    nd = pd.DataFrame(r["newdata"])
    new = sleep_fit.predict(nd, se_fit=True)
    np.testing.assert_allclose(new["fit"], r["fit_new"], rtol=RTOL)
    np.testing.assert_allclose(new["se"] ** 2, r["pev_new"], rtol=RTOL)
    # without se_fit: the plain array, equal to the table's fit
    np.testing.assert_allclose(sleep_fit.predict(nd), new["fit"], rtol=1e-12)


def test_prediction_interval_for_a_new_subject(sleep_fit):
    r = REF["sleepstudy"]
    nd = pd.DataFrame({"Days": r["grid"], "Subject": "new"})
    out = sleep_fit.predict(nd, re_form=False, interval="prediction")
    var = ((out["upper"] - out["lower"]) / (2 * 1.959963984540054)) ** 2
    np.testing.assert_allclose(var, r["pop_pred_var"], rtol=RTOL)
    # a new level kept in re_form: the same variance (its b is unknown: zᵀΣz), same centre
    alt = sleep_fit.predict(nd, allow_new_levels=True, interval="prediction")
    np.testing.assert_allclose(alt[["fit", "lower", "upper"]], out[["fit", "lower", "upper"]], rtol=1e-10)


def test_crossed_design_and_partial_re_form():
    r = REF["penicillin"]
    m = lmmjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", lmmjax.datasets.penicillin())
    rows = np.array(r["rows"]) - 1
    full = m.predict(se_fit=True)
    np.testing.assert_allclose(full["se"].to_numpy()[rows] ** 2, r["pev_rows"], rtol=RTOL)
    plate = m.predict(re_form="~ (1 | plate)", interval="prediction")
    np.testing.assert_allclose(plate["fit"].to_numpy()[rows], r["fit_plate"], rtol=RTOL)
    pev = m.predict(re_form="~ (1 | plate)", se_fit=True)["se"].to_numpy()[rows] ** 2
    np.testing.assert_allclose(pev, r["pev_plate"], rtol=RTOL)
    var = ((plate["upper"] - plate["lower"]).to_numpy()[rows] / (2 * 1.959963984540054)) ** 2
    np.testing.assert_allclose(var, np.array(r["pev_plate"]) + r["var_sample"] + r["sigma"] ** 2, rtol=RTOL)


def test_bad_interval_and_missing_columns(sleep_fit):
    with pytest.raises(lmmjax.DataError, match="interval must be"):
        sleep_fit.predict(interval="credible")
    with pytest.raises(lmmjax.DataError, match="Days"):
        sleep_fit.predict(pd.DataFrame({"Subject": ["308"]}), interval="prediction")
    with pytest.raises(lmmjax.DataError, match="not seen in the fit"):
        sleep_fit.predict(pd.DataFrame({"Days": [1.0], "Subject": ["new"]}), se_fit=True)
    # a population prediction interval needs no grouping column (zᵀΣz uses the term's columns)
    out = sleep_fit.predict(pd.DataFrame({"Days": [1.0]}), re_form=False, interval="prediction")
    assert np.isfinite(out[["lower", "upper"]].to_numpy()).all()


def test_simulate_re_form(sleep_fit):
    """re_form=None keeps b̂: the simulations scatter around the conditional fit with variance
    σ²; the default draws new random effects: per-row variance zᵀΣz + σ²."""
    nsim = 4000
    cond = sleep_fit.simulate(nsim, seed=3, re_form=None)
    dev = cond - sleep_fit.fitted[:, None]
    s = sleep_fit.sigma
    assert np.max(np.abs(dev.mean(axis=1))) < 5 * s / np.sqrt(nsim)
    np.testing.assert_allclose(dev.var(axis=1).mean(), s**2, rtol=0.02)
    # within a subject, conditional draws are independent; unconditional ones share b
    same = sleep_fit.design.blocks[0].index == 0
    c_cond = np.corrcoef(dev[same][:2])[0, 1]
    unc = sleep_fit.simulate(nsim, seed=3)
    c_unc = np.corrcoef(unc[same][:2])[0, 1]
    assert abs(c_cond) < 0.06 and c_unc > 0.3
    S = sleep_fit._term_covariance(sleep_fit.design.blocks[0])
    Z = sleep_fit.design.blocks[0].Zq
    want = np.einsum("na,ab,nb->n", Z, S, Z) + s**2
    np.testing.assert_allclose(unc.var(axis=1), want, rtol=0.1)
    # the same seed and default re_form reproduce the draws
    np.testing.assert_array_equal(unc, sleep_fit.simulate(nsim, seed=3, re_form=False))
