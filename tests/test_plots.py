"""lmmjax.plots: every plot renders headless (Agg) with warnings as errors, and what it
draws is checked against the model and against R (``tests/r/make_plot_cases.R`` →
``tests/fixtures/plots/plot_cases.json``: lme4 1.1 fits with bobyqa, rhoend 1e-12).

Tolerances: qqnorm's theoretical quantiles and qqmath's normal quantiles are pure
arithmetic (1e-12); fitted values, scaled Pearson residuals, conditional modes and
conditional SDs follow the fit (1e-5 relative, as the lme4 reference tests, with an
absolute floor of 1e-6 of the quantity's scale for values near zero); the qqline
through the quartiles 1e-5 of the residuals' scale."""
from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lmmjax  # noqa: E402
from lmmjax import InputError, plots  # noqa: E402

FIX = json.loads((Path(__file__).parent / "fixtures" / "plots" / "plot_cases.json").read_text())
RTOL = 1e-5
SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _strict(tmp_path, name, draw):
    """Draw with every warning an error, save a PNG, return what ``draw`` returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = draw()
        fig = out if isinstance(out, mpl.figure.Figure) else out.figure
        fig.savefig(tmp_path / f"{name}.png", dpi=60)
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    return out


_MODELS: dict = {}


def _model(case: str):
    if case not in _MODELS:
        if case == "penicillin":
            _MODELS[case] = lmmjax.lmer(FIX[case]["formula"], lmmjax.datasets.penicillin())
        else:
            df = lmmjax.datasets.sleepstudy()
            w = None
            if case == "sleepstudy_weighted":
                df["w"] = 1 + (df["Days"] % 3) / 2         # the R script's weights_rule
                w = "w"
            _MODELS[case] = lmmjax.lmer(SLEEP, df, weights=w)
    return _MODELS[case]


def _by_rank_up_to_ties(actual, expected, key):
    """Equal, except that values of R's ``key`` tied (within 1e-9 of its scale: lme4 and
    lmmjax break exact ties by rounding noise) may have theirs in any order."""
    key = np.asarray(key, float)
    groups = np.round(key / (1e-9 * np.max(np.abs(key))))
    for g in np.unique(groups):
        sel = groups == g
        np.testing.assert_allclose(np.sort(actual[sel]), np.sort(np.asarray(expected)[sel]), rtol=0, atol=1e-12)


def _close(actual, expected, rtol=RTOL):
    expected = np.asarray(expected, float)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-6 * np.max(np.abs(expected)))


@pytest.mark.parametrize("case", ["sleepstudy", "sleepstudy_weighted", "penicillin"])
def test_residual_panels_match_r(case, tmp_path):
    m, ref = _model(case), FIX[case]
    ax = _strict(tmp_path, "rvf", lambda: plots.residuals_vs_fitted(m))
    pts = ax.collections[0].get_offsets()
    assert pts.shape == (m.nobs, 2)
    _close(pts[:, 0], ref["fitted"])
    assert ax.get_xlabel() == "Fitted values" and ax.get_title() == "Residuals vs Fitted"
    # the binned-mean smoother: 10 bins, each the mean of its points
    bx, by = ax.lines[1].get_data()
    bins = np.array_split(np.argsort(m.fitted, kind="stable"), 10)
    np.testing.assert_allclose(by, [m.residuals[b].mean() for b in bins], rtol=1e-12)
    np.testing.assert_allclose(bx, [m.fitted[b].mean() for b in bins], rtol=1e-12)
    assert ax.lines[0].get_ydata()[0] == 0.0                   # the dotted zero line

    ax = _strict(tmp_path, "qq", lambda: plots.qq_residuals(m))
    pts = ax.collections[0].get_offsets()
    assert pts.shape == (m.nobs, 2)
    _by_rank_up_to_ties(pts[:, 0], ref["qqnorm_x"], ref["scaled_pearson"])
    _close(pts[:, 1], ref["scaled_pearson"])
    (x0, x1), (y0, y1) = ax.lines[0].get_data()
    slope = (y1 - y0) / (x1 - x0)
    a_ref, b_ref = ref["qqline"]
    scale = np.std(ref["scaled_pearson"])
    assert abs(slope - b_ref) < 1e-5 * scale and abs(y0 - slope * x0 - a_ref) < 1e-5 * scale
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Theoretical Quantiles", "Standardized residuals")

    ax = _strict(tmp_path, "sl", lambda: plots.scale_location(m))
    _close(ax.collections[0].get_offsets()[:, 1], np.sqrt(np.abs(ref["scaled_pearson"])))


@pytest.mark.parametrize("case,group", [("sleepstudy", None), ("sleepstudy_weighted", "Subject"),
                                        ("penicillin", "plate"), ("penicillin", "sample")])
def test_caterpillar_matches_lme4_dotplot(case, group, tmp_path):
    m = _model(case)
    g = group or "Subject"
    ref = FIX[case]["ranef"][g]
    fig = _strict(tmp_path, "cat", lambda: plots.caterpillar(m, group=group, level=0.95))
    cols = list(ref["columns"])
    assert [a.get_title() for a in fig.axes] == cols
    z = 1.959963984540054
    sd, re = m.ranef_sd()[g], m.ranef()[g]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(ref["levels"])
    # lme4's order (reorder by the first column); plates with identical data tie exactly,
    # so where R's modes tie the order among them is free
    first = dict(zip(ref["levels"], ref["columns"][cols[0]]["values"]))
    r_first = np.array([first[lv] for lv in labels])
    assert np.all(np.diff(r_first) >= -1e-9 * np.max(np.abs(r_first)))
    if np.min(np.diff(np.sort(r_first))) > 1e-6 * np.max(np.abs(r_first)):
        assert labels == ref["dotplot_order"]
    for a, col in zip(fig.axes, cols):
        pts = a.collections[-1].get_offsets()
        assert len(pts) == len(ref["levels"])                 # one point per level
        np.testing.assert_array_equal(pts[:, 1], np.arange(len(pts)))
        order = [list(re.index).index(lv) for lv in labels]
        np.testing.assert_allclose(pts[:, 0], re[col].to_numpy()[order], rtol=1e-12)
        if col == cols[0]:
            assert np.all(np.diff(pts[:, 0]) >= 0)             # sorted
        segs = np.array(a.collections[-2].get_segments())     # (level, 2 ends, xy)
        half = (segs[:, 1, 0] - segs[:, 0, 0]) / 2
        np.testing.assert_allclose(half, z * sd[col].to_numpy()[order], rtol=1e-12)
        # against R: modes and conditional SDs, matched by level name
        rmap = dict(zip(ref["levels"], zip(ref["columns"][col]["values"], ref["columns"][col]["se"])))
        _close(pts[:, 0], [rmap[lv][0] for lv in labels])
        _close(half / z, [rmap[lv][1] for lv in labels])


@pytest.mark.parametrize("case,group", [("sleepstudy", "Subject"), ("penicillin", "sample")])
def test_qq_ranef_matches_lme4_qqmath(case, group, tmp_path):
    m, ref = _model(case), FIX[case]["ranef"][group]
    fig = _strict(tmp_path, "qqre", lambda: plots.qq_ranef(m, group=group))
    assert len(fig.axes) == len(ref["columns"])
    assert fig.axes[0].get_ylabel() == "Standard normal quantiles"
    sd = m.ranef_sd()[group]
    for a, (col, rc) in zip(fig.axes, ref["columns"].items()):
        pts = a.collections[-1].get_offsets()
        np.testing.assert_allclose(pts[:, 1], rc["qq_quantiles"], rtol=0, atol=1e-12)
        _close(pts[:, 0], rc["qq_sorted"])
        order = np.argsort(m.ranef()[group][col].to_numpy(), kind="stable")
        segs = np.array(a.collections[-2].get_segments())
        np.testing.assert_allclose((segs[:, 1, 0] - segs[:, 0, 0]) / 2, 1.959963984540054 * sd[col].to_numpy()[order],
                                   rtol=1e-12)
        np.testing.assert_allclose((segs[:, 1, 0] + segs[:, 0, 0]) / 2, pts[:, 0], rtol=1e-12)


def test_spaghetti_lines(tmp_path):
    m = _model("sleepstudy")
    ax = _strict(tmp_path, "sp", lambda: plots.spaghetti(m, "Days"))
    assert len(ax.lines) == 18 + 1                        # one per subject + population
    assert sum(len(c.get_offsets()) for c in ax.collections) == m.nobs
    x, y = ax.lines[-1].get_data()
    np.testing.assert_allclose(x, np.arange(10))
    np.testing.assert_allclose(y, m.fixef["(Intercept)"] + m.fixef["Days"] * x, rtol=1e-12)
    # each subject's line is its conditional fit: coef(fit) intercept + slope · Days
    cf = m.coef()["Subject"]
    x1, y1 = ax.lines[0].get_data()
    first = cf.iloc[0]
    np.testing.assert_allclose(y1, first["(Intercept)"] + first["Days"] * x1, rtol=1e-10)
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 1],
                               lmmjax.datasets.sleepstudy().query("Subject == '308'")["Reaction"], rtol=1e-12)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Days", "Reaction")
    ax = _strict(tmp_path, "sp5", lambda: plots.spaghetti(m, "Days", group="Subject", max_groups=5))
    assert len(ax.lines) == 6 and sum(len(c.get_offsets()) for c in ax.collections) == 50
    # another column of the data, passed through data=
    df = lmmjax.datasets.sleepstudy().assign(hours=lambda d: 24.0 * d["Days"])
    ax = plots.spaghetti(m, "hours", data=df)
    np.testing.assert_allclose(ax.lines[-1].get_data()[0], 24.0 * np.arange(10))


def test_diagnostics_figure(tmp_path):
    m = _model("sleepstudy")
    fig = _strict(tmp_path, "diag", lambda: m.plot(figsize=(8, 7)))
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["Residuals vs Fitted", "Normal Q-Q", "Subject: (Intercept)", "Scale-Location"]
    assert all(len(a.collections[-1].get_offsets()) == m.nobs for a in np.array(fig.axes)[[0, 1, 3]])
    assert len(fig.axes[2].collections[-1].get_offsets()) == 18
    np.testing.assert_allclose(fig.get_size_inches(), (8, 7))


def test_model_without_random_effects(tmp_path):
    """Duck typing: fitted, residuals and sigma are enough (an OLS fit here); the random-
    effect panels are skipped and asking for them is a clear error."""
    df = lmmjax.datasets.sleepstudy()
    X = np.column_stack([np.ones(len(df)), df["Days"]])
    y = df["Reaction"].to_numpy()
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    fit = X @ beta
    ols = types.SimpleNamespace(fitted=fit, residuals=y - fit, sigma=np.sqrt(np.sum((y - fit) ** 2) / (len(y) - 2)),
                                formula="Reaction ~ Days")
    fig = _strict(tmp_path, "ols", lambda: plots.diagnostics(ols))
    assert [a.get_title() for a in fig.axes] == ["Residuals vs Fitted", "Normal Q-Q", "Scale-Location"]
    rs = fig.axes[1].collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(rs, (y - fit) / ols.sigma, rtol=1e-12)
    with pytest.raises(InputError, match="no random effects"):
        plots.caterpillar(ols)
    with pytest.raises(InputError, match="no .fitted"):
        plots.qq_residuals(types.SimpleNamespace(residuals=y, sigma=1.0))


def test_gls_diagnostics(tmp_path):
    g = lmmjax.gls("distance ~ age", lmmjax.datasets.orthodont(),
                   residual=lmmjax.cov.CompoundSymmetry(group="Subject"))
    if getattr(g, "fitted", None) is None:
        pytest.skip("GroupedResult has no .fitted/.residuals yet")
    fig = _strict(tmp_path, "gls", lambda: plots.diagnostics(g))
    assert len(fig.axes) == 3 and len(fig.axes[0].collections[0].get_offsets()) == g.nobs


_BATCH = {}


def _batch():
    """30 responses on sleepstudy's design (half with a Days effect), one constant (failed)."""
    if not _BATCH:
        df = lmmjax.datasets.sleepstudy()
        rng = np.random.default_rng(12)
        subj = df["Subject"].cat.codes.to_numpy()
        G = 30
        slope = np.where(np.arange(G) < 15, rng.uniform(0.3, 1.0, G), 0.0)
        u = rng.normal(size=(18, G))
        Y = 5 + np.outer(df["Days"], slope) + u[subj] + rng.normal(size=(len(df), G))
        Y[:, 7] = 3.0
        res = lmmjax.lmer_batch("~ Days + (1 | Subject)", df, pd.DataFrame(Y, columns=[f"g{i}" for i in range(G)]),
                                progress=False)
        _BATCH["res"] = res
    return _BATCH["res"]


def test_volcano_highlights_bh_significant(tmp_path):
    res = _batch()
    tab = res.coef_table("Days")
    fitted = (res.status != "failed").to_numpy()
    assert fitted.sum() == 29
    ax = _strict(tmp_path, "volcano", lambda: plots.volcano(res, "Days", alpha=0.05))
    grey, red = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    n_sig = int((tab["p_adj"] < 0.05).sum())
    assert 0 < n_sig < 29 and len(red) == n_sig and len(grey) + len(red) == 29
    np.testing.assert_allclose(np.sort(red[:, 0]), np.sort(tab.loc[tab["p_adj"] < 0.05, "estimate"]), rtol=1e-12)
    np.testing.assert_allclose(np.sort(np.r_[grey[:, 1], red[:, 1]]), np.sort(-np.log10(tab["p"].dropna())), rtol=1e-12)
    # unadjusted: the count of p < alpha, and the threshold line at -log10(alpha)
    ax = plots.volcano(res, "Days", alpha=0.01, fdr=False)
    assert len(ax.collections[1].get_offsets()) == int((tab["p"] < 0.01).sum())
    assert ax.lines[0].get_ydata()[0] == pytest.approx(2.0)
    # a table (estimate_table) works too
    ax = plots.volcano(res.estimate_table(pd.Series({"Days": 2.0})), alpha=0.05)
    assert len(ax.collections[1].get_offsets()) == n_sig      # same p-values, scaled estimates


def test_pvalue_histogram_counts(tmp_path):
    res = _batch()
    ax = _strict(tmp_path, "hist", lambda: plots.pvalue_histogram(res, "(Intercept)", bins=10))
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 10 and sum(heights) == int((res.status != "failed").sum()) == 29
    assert ax.lines[0].get_ydata()[0] == pytest.approx(2.9)     # uniform: 29 / 10 per bin
    p = res.coef_table("(Intercept)")["p"].dropna()
    np.testing.assert_array_equal(heights, np.histogram(p, bins=np.linspace(0, 1, 11))[0])


def test_bad_arguments():
    m, res = _model("sleepstudy"), _batch()
    with pytest.raises(InputError, match=r"group='Plate'.*\['Subject'\]"):
        plots.caterpillar(m, group="Plate")
    with pytest.raises(InputError, match=r"group='Plate'"):
        plots.qq_ranef(m, group="Plate")
    with pytest.raises(InputError, match=r"group='Plate'"):
        plots.spaghetti(m, "Days", group="Plate")
    with pytest.raises(InputError, match=r"x='Hours'.*data="):
        plots.spaghetti(m, "Hours")
    with pytest.raises(InputError, match=r"data has 10 rows.*180"):
        plots.spaghetti(m, "hours", data=pd.DataFrame({"hours": np.arange(10.0)}))
    with pytest.raises(InputError, match=r"x='Subject' must be numeric"):
        plots.spaghetti(m, "Subject")
    with pytest.raises(InputError, match=r"columns=\['day'\]"):
        plots.caterpillar(m, columns=["day"])
    with pytest.raises(InputError, match="2 panel"):
        plots.qq_ranef(m, ax=plt.subplots()[1])
    with pytest.raises(InputError, match="level must be in"):
        plots.caterpillar(m, level=95)
    with pytest.raises(InputError, match=r"coef='days'.*Days"):
        plots.volcano(res, "days")
    with pytest.raises(InputError, match=r"coef='day'"):
        plots.pvalue_histogram(res, "day")
    with pytest.raises(InputError, match="coef= one of"):
        plots.volcano(res)
    with pytest.raises(InputError, match="bins must be"):
        plots.pvalue_histogram(res, "Days", bins=0)
    with pytest.raises(InputError, match="alpha must be"):
        plots.volcano(res, "Days", alpha=5)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "lmmjax\[plots\]"'):
        plots.residuals_vs_fitted(_model("sleepstudy"))
