"""lmer_batch: every response's result equals the single-model lmer result
(1e-6 relative on estimates, SEs, Satterthwaite df; logLik 1e-9), singular flags included."""
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmjax


def _sim(G, seed=0, donors=8, cells=30):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(donors), cells)
    cond = np.where(np.arange(donors * cells) % 2 == 0, "ctl", "trt")
    obs = pd.DataFrame(dict(donor=donor.astype(str), condition=cond))
    sd = rng.choice([0.0, 0.2, 1.0], size=G)          # some genes with no donor variance
    Y = rng.normal(size=(len(obs), G)) + sd * rng.normal(size=(donors, G))[donor]
    Y += 0.5 * (cond == "trt")[:, None] * (rng.random(G) < 0.3)
    return obs, pd.DataFrame(Y, columns=[f"gene{i}" for i in range(G)])


@pytest.mark.parametrize("rhs", ["~ condition + (1 | donor)", "~ condition + (1 + condition | donor)"])
def test_each_response_equals_single_fit(rhs):
    obs, Y = _sim(24)
    res = lmmjax.lmer_batch(rhs, obs, Y)
    tab = res.coef_table("condition")
    assert list(tab.index) == list(Y.columns)
    for g in Y.columns:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lmmjax.lmer("y " + rhs, obs.assign(y=Y[g]))
        ct = m.coef_table().loc["conditiontrt"]
        for k in ("estimate", "se", "df"):
            np.testing.assert_allclose(tab.loc[g, k], ct[k], rtol=1e-6)
        np.testing.assert_allclose(res.loglik[g], m.loglik, rtol=1e-9)
        assert res.is_singular[g] == m.is_singular
        assert res.converged[g]
    # the full single-model object for one response
    one = res["gene3"]
    np.testing.assert_allclose(one.fixef.to_numpy(), res.fixef.loc["gene3"].to_numpy(), rtol=1e-6)


def test_benjamini_hochberg_and_errors():
    obs, Y = _sim(40, seed=1)
    res = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y)
    tab = res.coef_table("conditiontrt")
    p = tab["p"].to_numpy()
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    expect = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1)
    np.testing.assert_allclose(tab["p_adj"].to_numpy()[order], expect, rtol=1e-12)
    with pytest.raises(lmmjax.DataError, match="rows but data has"):
        lmmjax.lmer_batch("~ condition + (1 | donor)", obs.iloc[:-1], Y)
    Yn = Y.copy()
    Yn.iloc[3, 5] = np.nan
    with pytest.raises(lmmjax.DataError, match="gene5"):
        lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Yn)
