"""Design construction and bad-input errors: clear messages, no JAX tracebacks."""
import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import DataError


@pytest.fixture
def sleep():
    return lmmjax.datasets.sleepstudy()


def test_missing_column_named(sleep):
    with pytest.raises(DataError, match=r"\['Dayz'\].*available columns"):
        lmmjax.lmer("Reaction ~ Dayz + (1 | Subject)", sleep)
    with pytest.raises(DataError, match="grouping factor.*Subj"):
        lmmjax.lmer("Reaction ~ Days + (1 | Subj)", sleep)


def test_non_numeric_response(sleep):
    with pytest.raises(DataError, match="response column 'Subject' must be numeric"):
        lmmjax.lmer("Subject ~ Days + (1 | Subject)", sleep)


def test_no_random_term(sleep):
    with pytest.raises(DataError, match="no random-effects term"):
        lmmjax.lmer("Reaction ~ Days", sleep)


def test_too_many_levels(sleep):
    d = sleep.assign(row=np.arange(len(sleep)))
    with pytest.raises(DataError, match="must be less than the number of observations"):
        lmmjax.lmer("Reaction ~ Days + (1 | row)", d)


def test_infinite_value_reported_with_row(sleep):
    d = sleep.assign(Days=sleep["Days"].astype(float))
    d.loc[7, "Days"] = np.inf
    with pytest.raises(DataError, match="non-finite.*row 7"):
        lmmjax.lmer("Reaction ~ Days + (1 | Subject)", d)


def test_not_a_dataframe():
    with pytest.raises(DataError, match="pandas DataFrame"):
        lmmjax.lmer("y ~ x + (1 | g)", {"y": [1.0]})


def test_missing_rows_dropped_like_na_omit(sleep):
    d = sleep.assign(Days=sleep["Days"].astype(float))
    d.loc[[3, 50, 51], "Reaction"] = np.nan
    d.loc[100, "Days"] = np.nan
    m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", d)
    ref = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", d.dropna())
    assert m.nobs == 176
    np.testing.assert_allclose(m.fixef, ref.fixef, rtol=1e-10)
    assert len(m.fitted) == 176
    assert "4 observations deleted due to missingness" in m.summary(print_=False)


def test_rank_deficient_columns_dropped(sleep):
    d = sleep.assign(Days2=2 * sleep["Days"])
    with pytest.warns(UserWarning, match="rank deficient so dropping 1 column"):
        m = lmmjax.lmer("Reaction ~ Days + Days2 + (1 | Subject)", d)
    assert list(m.fixef.index) == ["(Intercept)", "Days"]


def test_grouping_column_types_give_same_fit(sleep):
    base = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep)
    for col in (sleep["Subject"].astype(str), sleep["Subject"].astype(str).astype(int),
                sleep["Subject"].astype(str).astype(object)):
        m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep.assign(Subject=col))
        np.testing.assert_allclose(m.theta, base.theta, rtol=1e-8)
        assert list(m.ranef()["Subject"].index) == list(base.ranef()["Subject"].index)


def test_categorical_level_order_sets_reference():
    df = lmmjax.datasets.orthodont()
    m1 = lmmjax.lmer("distance ~ age + Sex + (1 | Subject)", df)
    assert "SexFemale" in m1.fixef.index
    df2 = df.assign(Sex=df["Sex"].cat.reorder_categories(["Female", "Male"]))
    m2 = lmmjax.lmer("distance ~ age + Sex + (1 | Subject)", df2)
    assert "SexMale" in m2.fixef.index
    np.testing.assert_allclose(m2.fixef["SexMale"], -m1.fixef["SexFemale"], rtol=1e-8)
    np.testing.assert_allclose(m1.loglik, m2.loglik, rtol=1e-10)


def test_categorical_predictor_in_random_term(sleep):
    d = sleep.assign(half=pd.Categorical(np.where(sleep.Days < 5, "early", "late")))
    m = lmmjax.lmer("Reaction ~ Days + (0 + half | Subject)", d)
    assert list(m.ranef()["Subject"].columns) == ["halfearly", "halflate"]
    assert m.theta.size == 3 and m.converged
    m2 = lmmjax.lmer("Reaction ~ Days + (1 + half | Subject)", d)
    assert list(m2.ranef()["Subject"].columns) == ["(Intercept)", "halflate"]
    # the same model in two parametrizations
    np.testing.assert_allclose(m.reml_criterion, m2.reml_criterion, rtol=1e-9)
