"""lmer_batch against R, gene by gene (tests/fixtures/batch, made by
tests/r/make_batch_reference.R: lme4 + lmerTest + pbkrtest on a single-cell-like design
of 365 cells, 8 donors × 2 conditions, 60 genes; 20 genes with no donor variance, 12
with missing values: random cells, 30 %, a whole donor, a whole donor × condition).

R's reference is its best of several tight bobyqa fits per gene.  Tolerances:
* REML criterion: never more than 1e-6 above R's (observed |Δ| ≤ 5e-12);
* estimate: 1e-6 SE (intercept model), 1e-5 SE (slope model); observed ≤ 2.2e-7 SE;
* SE (lmerTest's and pbkrtest's adjusted): 1e-6 relative (observed ≤ 3.3e-7);
* Kenward-Roger df 1e-6, p 1e-5 relative (observed ≤ 1.5e-7, 2e-6);
* Satterthwaite df / p: 1e-6 / 1e-5 relative for the intercept model (observed
  1.1e-7 / 4.3e-7); 1e-3 / 2e-3 for the slope model, where lmerTest's
  finite-difference Hessian at nearly singular optima is the less accurate side
  (observed 2.1e-4 / 4.3e-4; lmmjax's Hessian is exact autodiff);
* singular flags (lme4's isSingular, tol 1e-4) and nobs: exact.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax

HERE = Path(__file__).parent / "fixtures" / "batch"
MODELS = {
    "intercept": ("~ condition + (1 | donor)", dict(est=1e-6, satt_df=1e-6, satt_p=1e-5)),
    "slope": ("~ condition + (1 + condition | donor)", dict(est=1e-5, satt_df=1e-3, satt_p=2e-3)),
}


@pytest.fixture(scope="module")
def reference():
    ref = json.loads((HERE / "reference.json").read_text())
    obs = pd.read_csv(HERE / "obs.csv")
    Y = pd.read_csv(HERE / "Y.csv").set_index("cell")
    assert (Y.index == obs["cell"]).all()
    return ref, obs, Y


@pytest.mark.parametrize("model", list(MODELS))
def test_every_gene_matches_lmerTest_and_pbkrtest(reference, model):
    ref, obs, Y = reference
    rhs, tol = MODELS[model]
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    satt = res.coef_table("condition")
    kr = res.coef_table("condition", ddf="kenward-roger")
    genes = ref["models"][model]["genes"]
    assert set(genes) == set(Y.columns) and res.errors.isna().all()
    n_missing = 0
    for g, r in genes.items():
        assert r["status"] == "ok"
        assert res.nobs[g] == r["nobs"], g
        n_missing += r["nobs"] < len(obs)
        assert -2 * res.loglik[g] <= r["REMLcrit"] + 1e-6, g
        assert bool(res.is_singular[g]) == bool(r["is_singular"]), g
        assert res.converged[g], g
        rs, rk = r["satterthwaite"]["conditiontrt"], r["kenward_roger"]["conditiontrt"]
        assert abs(satt.loc[g, "estimate"] - rs["estimate"]) <= tol["est"] * rs["se"], g
        np.testing.assert_allclose(satt.loc[g, "se"], rs["se"], rtol=1e-6, err_msg=g)
        np.testing.assert_allclose(satt.loc[g, "df"], rs["df"], rtol=tol["satt_df"], err_msg=g)
        np.testing.assert_allclose(satt.loc[g, "p"], rs["p"], rtol=tol["satt_p"], err_msg=g)
        np.testing.assert_allclose(kr.loc[g, "se"], rk["se"], rtol=1e-6, err_msg=g)
        np.testing.assert_allclose(kr.loc[g, "df"], rk["df"], rtol=1e-6, err_msg=g)
        np.testing.assert_allclose(kr.loc[g, "p"], rk["p"], rtol=1e-5, err_msg=g)
        np.testing.assert_allclose(res.sigma[g], r["sigma"], rtol=1e-5, err_msg=g)
    assert n_missing == 12
    assert res.is_singular.sum() == sum(bool(r["is_singular"]) for r in genes.values()) > 5
