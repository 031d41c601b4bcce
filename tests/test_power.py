"""lmmjax.power: power by simulation against closed forms.  In a balanced design the
Satterthwaite t test of a between-subject effect (random intercept) or of the mean slope
(random slopes) is the exact t test on subject means / per-subject slopes, so its power is a
noncentral-t probability; the simulation's 99% Clopper-Pearson interval must contain it."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import lmmjax


def _nct_power(delta, se, df, alpha=0.05):
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, delta / se) + stats.nct.cdf(-crit, df, delta / se)


def test_power_between_subject_effect_matches_noncentral_t():
    ns, m, sb, s, delta = 12, 5, 2.0, 2.0, 2.2
    d = pd.DataFrame({"id": np.repeat(np.arange(ns), m).astype(str), "trt": np.repeat(np.arange(ns) % 2, m)})
    r = lmmjax.power("~ trt + (1 | id)", d, test="trt", fixef={"(Intercept)": 10.0, "trt": delta},
                     covariance={"id": sb**2}, sigma=s, nsim=600, seed=1, level=0.99)
    want = _nct_power(delta, np.sqrt((sb**2 + s**2 / m) * 4 / ns), ns - 2)
    assert r.lower <= want <= r.upper, (r, want)
    assert 0.3 < r.power < 0.9 and r.nsim == 600 and r.pvalues.shape == (600,)
    assert "Power for 'trt'" in repr(r)
    # the same seed gives the same answer
    r2 = lmmjax.power("~ trt + (1 | id)", d, test="trt", fixef={"(Intercept)": 10.0, "trt": delta},
                      covariance={"id": sb**2}, sigma=s, nsim=600, seed=1, level=0.99)
    assert r2.power == r.power


def test_power_from_a_fit_with_a_smaller_slope():
    """sleepstudy (Days | Subject) with the Days effect set to 3: per-subject OLS slopes have
    variance σ_slope² + σ²/Sxx, so the mean slope's t test on 17 df has noncentral-t power."""
    m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())
    r = m_power = lmmjax.power(m, test="Days", fixef={"Days": 3.0}, nsim=500, seed=2, level=0.99)
    sxx = np.sum((np.arange(10) - 4.5) ** 2)
    var_slope = m.covariance_matrices()[0].iloc[1, 1]
    se = np.sqrt((var_slope + m.sigma**2 / sxx) / 18)
    want = _nct_power(3.0, se, 17)
    assert r.lower <= want <= r.upper, (m_power, want)
    np.testing.assert_allclose(np.nanmean(r.estimates), 3.0, atol=4 * se / np.sqrt(500))


def test_power_input_errors():
    d = pd.DataFrame({"id": np.repeat(np.arange(6), 3).astype(str), "x": np.tile([0.0, 1.0, 2.0], 6)})
    kw = dict(test="x", covariance={"id": 1.0}, sigma=1.0, nsim=10)
    with pytest.raises(lmmjax.DataError, match="lacks coefficient"):
        lmmjax.power("~ x + (1 | id)", d, fixef={"x": 1.0}, **kw)
    with pytest.raises(lmmjax.DataError, match="not coefficients"):
        lmmjax.power("~ x + (1 | id)", d, fixef={"(Intercept)": 0, "x": 1.0, "z": 2}, **kw)
    with pytest.raises(lmmjax.DataError, match="2 × 2"):
        lmmjax.power("~ x + (x | id)", d, fixef={"(Intercept)": 0, "x": 1.0}, **kw)
    with pytest.raises(lmmjax.DataError, match="lacks the random term"):
        lmmjax.power("~ x + (1 | id)", d, fixef={"(Intercept)": 0, "x": 1.0}, test="x", covariance={},
                     sigma=1.0, nsim=10)
    with pytest.raises(lmmjax.InputError, match="nsim"):
        lmmjax.power("~ x + (1 | id)", d, fixef={"(Intercept)": 0, "x": 1.0}, test="x",
                     covariance={"id": 1.0}, sigma=1.0, nsim=0)
