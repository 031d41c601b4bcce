"""Optimizer behaviour, precision isolation, prediction and printing."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmmjax


@pytest.fixture(scope="module")
def sleep():
    return lmmjax.datasets.sleepstudy()


@pytest.fixture(scope="module")
def fit(sleep):
    return lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep)


def test_escapes_theta_zero_trap(sleep):
    """At θ = 0 the gradient vanishes by symmetry; a start there must still
    reach the interior optimum (sleepstudy has a clearly positive variance)."""
    ref = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep)
    m = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep, start=[0.0])
    assert ref.theta[0] > 0.5
    np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-6)
    np.testing.assert_allclose(m.reml_criterion, ref.reml_criterion, rtol=1e-12)
    m3 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep, start=[0.0, 0.0, 0.0])
    ref3 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep)
    np.testing.assert_allclose(m3.reml_criterion, ref3.reml_criterion, rtol=1e-10)


def test_singular_fit_is_exactly_zero_and_warns():
    with pytest.warns(lmmjax.SingularFitWarning):
        m = lmmjax.lmer("Yield ~ 1 + (1 | Batch)", lmmjax.datasets.dyestuff2())
    assert m.theta[0] == 0.0 and m.is_singular and m.converged
    assert (m.ranef()["Batch"].to_numpy() == 0).all()
    assert "boundary (singular) fit" in m.summary(print_=False)


def test_float64_without_touching_global_flag(fit):
    assert not jax.config.jax_enable_x64
    assert jnp.ones(3).dtype == jnp.float32  # the user's default is untouched
    assert fit.fixef.dtype == np.float64


def test_float32_option_is_close(sleep, fit):
    m32 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep, dtype="float32", warn=False)
    se = np.sqrt(np.diag(fit.vcov))
    assert np.all(np.abs(m32.fixef - fit.fixef) < 1e-2 * se)
    with pytest.raises(ValueError, match="dtype"):
        lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep, dtype="float16")


def test_optinfo_reports_convergence(fit):
    o = fit.optinfo
    assert fit.converged and o.hessian_pd and o.grad_norm < 1e-6 and o.iterations > 0
    assert o.hessian.shape == (3, 3)


def test_predict_new_levels(sleep, fit):
    new = pd.DataFrame({"Days": [0.0, 5.0], "Subject": ["308", "999"]})
    with pytest.raises(lmmjax.DataError, match="not seen in the fit.*allow_new_levels=True"):
        fit.predict(new)
    p = fit.predict(new, allow_new_levels=True)
    pop = fit.fixef["(Intercept)"] + fit.fixef["Days"] * 5.0
    np.testing.assert_allclose(p[1], pop, rtol=1e-12)
    c = fit.coef()["Subject"].loc["308"]
    np.testing.assert_allclose(p[0], c["(Intercept)"], rtol=1e-12)
    np.testing.assert_allclose(fit.predict(new, re_form=False), fit.fixef.iloc[0] + fit.fixef.iloc[1] * new.Days)


def test_predict_re_form_subset():
    df = lmmjax.datasets.penicillin()
    m = lmmjax.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", df)
    only_plate = m.predict(df, re_form="~ (1 | plate)")
    expect = m.fixef.iloc[0] + m.ranef()["plate"].loc[df.plate.astype(str), "(Intercept)"].to_numpy()
    np.testing.assert_allclose(only_plate, expect, rtol=1e-12)
    with pytest.raises(lmmjax.DataError, match="not in the model"):
        m.predict(df, re_form="~ (1 | batch)")


def test_coef_adds_fixed_and_random(fit):
    c = fit.coef()["Subject"]
    r = fit.ranef()["Subject"]
    np.testing.assert_allclose(c["Days"], fit.fixef["Days"] + r["Days"], rtol=1e-12)


def test_summary_sections(fit):
    s = fit.summary(print_=False)
    for part in ("REML criterion at convergence: 1743.6", "Random effects:", "Fixed effects:",
                 "Correlation of Fixed Effects:", "Number of obs: 180, groups:  Subject, 18"):
        assert part in s
    assert "Random effects" in repr(fit)


def test_summary_displays_once(fit, capsys):
    """summary() returns its text without printing; its repr is the text itself (a notebook
    shows it once, not printed and then echoed as an escaped string)."""
    s = fit.summary()
    assert capsys.readouterr().out == ""
    assert repr(s) == str(s) and "\\n" not in repr(s) and s.startswith("Linear mixed model fit by REML")
    fit.summary(print_=True)
    assert capsys.readouterr().out == str(s) + "\n"


def test_tables_print_whole(fit):
    """coef_table/anova print every column at any display width (pandas would hide t and p
    behind '...' in a narrow terminal); derived frames are plain pandas."""
    import pandas as pd

    with pd.option_context("display.width", 40, "display.max_columns", 0):
        text = repr(fit.coef_table())
        anova = repr(fit.anova())
    assert "..." not in text and all(c in text.splitlines()[0] for c in ("estimate", "t", "p", "upper"))
    assert "den_df" in anova and "p" in anova.splitlines()[0]
    assert type(fit.coef_table()[["p"]]) is pd.DataFrame


def test_ml_summary_has_information_criteria(sleep):
    m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep, reml=False)
    s = m.summary(print_=False)
    assert "maximum likelihood" in s and "AIC" in s and "deviance" in s


def test_same_shape_refit_does_not_recompile(sleep, fit):
    from lmmjax.likelihood import solve
    from lmmjax.optimize import fit_program

    before = fit_program._cache_size(), solve._cache_size()
    y2 = sleep.assign(Reaction=sleep.Reaction * 1.1 + 3)
    lmmjax.lmer("Reaction ~ Days + (Days | Subject)", y2)
    assert (fit_program._cache_size(), solve._cache_size()) == before


def test_diag_structure_equals_double_bar(sleep):
    """diag(1 + Days | Subject) is one term with a diagonal template; (Days || Subject)
    is two scalar terms (lme4); the models are the same, so are all their numbers."""
    a = lmmjax.lmer("Reaction ~ Days + diag(1 + Days | Subject)", sleep)
    b = lmmjax.lmer("Reaction ~ Days + (Days || Subject)", sleep)
    np.testing.assert_allclose(a.reml_criterion, b.reml_criterion, rtol=1e-10)
    np.testing.assert_allclose(np.sort(a.theta), np.sort(b.theta), rtol=1e-5)
    for ddf in ("satterthwaite", "kenward-roger"):
        np.testing.assert_allclose(a.coef_table(ddf).to_numpy(), b.coef_table(ddf).to_numpy(), rtol=1e-5)
    assert list(a.varcorr["group"]) == ["Subject", "Subject", "Residual"]


def test_refit_reuses_the_prepared_design_until_the_data_change(monkeypatch):
    """A refit of the same formula on the same frame (an ML refit, start=, a repeat) skips
    the design; a column edited in place, a new frame or other weights rebuild it, and
    every fit equals a fit on a fresh copy of the data."""
    from lmmjax import model

    data = lmmjax.datasets.sleepstudy()
    f = "Reaction ~ Days + (Days | Subject)"
    calls = []
    orig = model._build_prepared
    monkeypatch.setattr(model, "_build_prepared", lambda *a: calls.append(1) or orig(*a))
    m1 = lmmjax.lmer(f, data)
    ml = lmmjax.lmer(f, data, reml=False)
    assert len(calls) == 1
    ref_ml = lmmjax.lmer(f, data.copy(), reml=False)
    assert len(calls) == 2
    assert ml.loglik == pytest.approx(ref_ml.loglik, rel=1e-12)
    np.testing.assert_allclose(ml.fixef, ref_ml.fixef, rtol=1e-10)
    # in-place edits of the response, a predictor and a grouping factor are all seen
    for col, new in [("Reaction", data.Reaction * 1.5), ("Days", np.random.default_rng(1).permutation(data.Days.to_numpy())),
                     ("Subject", np.roll(data.Subject.to_numpy(), 3))]:
        data[col] = new
        m = lmmjax.lmer(f, data)
        fresh = lmmjax.lmer(f, data.copy())
        assert m.reml_criterion == pytest.approx(fresh.reml_criterion, rel=1e-12)
        assert m.reml_criterion != pytest.approx(m1.reml_criterion, rel=1e-6)
        m1 = m
    n = len(calls)
    data.loc[0, "Reaction"] += 100.0            # a single value changed in place
    m = lmmjax.lmer(f, data)
    assert len(calls) == n + 1
    assert m.reml_criterion == pytest.approx(lmmjax.lmer(f, data.copy()).reml_criterion, rel=1e-12)
