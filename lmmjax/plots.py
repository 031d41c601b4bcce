"""Plots (matplotlib, an optional extra: ``pip install "lmmjax[plots]"``).

One-panel functions take ``ax=`` to draw into an existing Axes and return the Axes they
drew on; multi-panel ones (:func:`qq_ranef`, :func:`caterpillar`, :func:`diagnostics`)
return the Figure.  Nothing calls ``plt.show()``.  Titles and axis labels follow R's
defaults (``plot.lm``, ``qqnorm``, lme4's ``dotplot``/``qqmath`` methods for ``ranef``).

Model plots need only ``fitted``, ``residuals`` and ``sigma`` (optional ``weights``), so
they also draw gls fits; the random-effect plots need ``ranef()`` (their intervals
``ranef_sd()``), and :func:`diagnostics` leaves them out for a model without random effects.
Batch plots read :meth:`lmmjax.BatchResult.coef_table` (or a table like it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .formula import InputError

__all__ = ["variance_partition", "residuals_vs_fitted", "qq_residuals", "scale_location", "qq_ranef",
           "caterpillar", "spaghetti", "diagnostics", "volcano", "pvalue_histogram"]

_POINT = "0.25"     # colour of ordinary points
_HIGHLIGHT = "tab:red"


# ---------------------------------------------------------------- matplotlib plumbing
def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('lmmjax.plots needs matplotlib: pip install "lmmjax[plots]"') from None
    return plt


def _axes(ax, figsize=(6, 4)):
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _panels(ax, n: int, width: float = 3.2, height: float = 4.0):
    """n side-by-side Axes: new ones (ax=None), or the user's (one Axes when n == 1, or a
    sequence of n Axes).  Returns (figure, list of Axes, created)."""
    plt = _pyplot()
    if ax is None:
        fig, axs = plt.subplots(1, n, figsize=(width * n + 0.6, height), squeeze=False,
                                constrained_layout=True)
        return fig, list(axs[0]), True
    axs = [ax] if hasattr(ax, "figure") and not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
    if len(axs) != n:
        raise InputError(f"ax: this plot draws {n} panel(s) (one per random-effect column), got {len(axs)} "
                         "Axes; pass that many, or columns=[...] to draw fewer")
    return axs[0].figure, axs, False


# ---------------------------------------------------------------- model quantities
def _fitted_residuals(m):
    fitted = getattr(m, "fitted", None)
    resid = getattr(m, "residuals", None)
    if fitted is None or resid is None:
        raise InputError(f"residual plots need a fitted model with .fitted and .residuals; "
                         f"{type(m).__name__} has {'no .fitted' if fitted is None else 'no .residuals'}")
    f, r = np.asarray(fitted, float).ravel(), np.asarray(resid, float).ravel()
    if f.shape != r.shape:
        raise InputError(f"model's fitted ({f.size}) and residuals ({r.size}) differ in length")
    return f, r


def _standardized(m, r):
    """Scaled Pearson residuals √wᵢ rᵢ / σ̂ (lme4's ``residuals(fit, "pearson", scaled=TRUE)``)."""
    w = getattr(m, "weights", None)
    rs = r if w is None else r * np.sqrt(np.asarray(w, float))
    return rs / float(m.sigma)


def _ranef(m) -> dict:
    """The model's conditional modes per grouping factor ({} when it has none)."""
    if getattr(m, "has_random_effects", True) is False or not callable(getattr(m, "ranef", None)):
        return {}
    try:
        return dict(m.ranef())
    except InputError:         # a result type whose ranef() refuses: no random effects
        return {}


def _ranef_group(m, group, columns=None):
    """(group name, conditional modes, conditional SDs or None) of one grouping factor,
    as DataFrames (levels × columns), restricted to ``columns``."""
    re = _ranef(m)
    if not re:
        raise InputError(f"{type(m).__name__} has no random effects to plot")
    if group is None:
        group = next(iter(re))
    if group not in re:
        raise InputError(f"group={group!r} is not a grouping factor of the model; it has {list(re)}")
    modes = re[group]
    sds = m.ranef_sd()[group] if callable(getattr(m, "ranef_sd", None)) else None
    if columns is not None:
        columns = [columns] if isinstance(columns, str) else list(columns)
        unknown = [c for c in columns if c not in modes.columns]
        if unknown or not columns:
            raise InputError(f"columns={columns!r}: the random effects of {group!r} are {list(modes.columns)}")
        modes = modes[columns]
        sds = None if sds is None else sds[columns]
    return group, modes, sds


def _z(level: float) -> float:
    from scipy.stats import norm

    if not 0.0 < float(level) < 1.0:
        raise InputError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    return float(norm.ppf(0.5 + float(level) / 2.0))


def _binned_means(x, y, bins: int = 10):
    """A lowess-free smoother: means of (x, y) within ``bins`` quantile bins of x."""
    n = x.size
    k = int(min(bins, max(1, n // 5)))
    if k < 2:
        return np.array([]), np.array([])
    order = np.argsort(x, kind="stable")
    parts = np.array_split(order, k)
    return np.array([x[p].mean() for p in parts]), np.array([y[p].mean() for p in parts])


def _normal_scores(y):
    """qqnorm's theoretical quantiles Φ⁻¹(ppoints(n)) assigned to y by rank
    (ppoints: (i − a)/(n + 1 − 2a), a = 3/8 for n ≤ 10 else 1/2)."""
    from scipy.stats import norm

    n = y.size
    a = 3.0 / 8.0 if n <= 10 else 0.5
    q = norm.ppf((np.arange(1, n + 1) - a) / (n + 1 - 2 * a))
    ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
    return q[ranks]


def _qq_line(y):
    """qqline: the line through the first and third quartiles of y (type-7 quantiles)
    against Φ⁻¹(0.25), Φ⁻¹(0.75); returns (intercept, slope)."""
    from scipy.stats import norm

    yq = np.quantile(y, [0.25, 0.75])
    xq = norm.ppf([0.25, 0.75])
    slope = (yq[1] - yq[0]) / (xq[1] - xq[0])
    return float(yq[0] - slope * xq[0]), float(slope)


# ---------------------------------------------------------------- residual diagnostics
def residuals_vs_fitted(m, ax=None, smooth: bool = True):
    """Residuals yᵢ − ŷᵢ against conditional fitted values (R's ``plot.lm`` panel 1), with a
    dotted zero line and, if ``smooth``, the means of both within ten quantile bins of the
    fitted values (a lowess-free smoother)."""
    f, r = _fitted_residuals(m)
    ax = _axes(ax)
    ax.scatter(f, r, s=12, facecolors="none", edgecolors=_POINT, linewidths=0.8)
    ax.axhline(0.0, ls=":", color="gray")
    if smooth:
        bx, by = _binned_means(f, r)
        if bx.size:
            ax.plot(bx, by, color=_HIGHLIGHT, lw=1.2)
    ax.set_xlabel("Fitted values")
    ax.set_ylabel("Residuals")
    ax.set_title("Residuals vs Fitted")
    return ax


def qq_residuals(m, ax=None):
    """Normal QQ plot of the standardized residuals √wᵢ rᵢ/σ̂ (lme4's scaled Pearson
    residuals) against qqnorm's Φ⁻¹(ppoints(n)), with qqline's reference line through the
    quartiles."""
    f, r = _fitted_residuals(m)
    rs = _standardized(m, r)
    x = _normal_scores(rs)
    a, b = _qq_line(rs)
    ax = _axes(ax)
    ax.scatter(x, rs, s=12, facecolors="none", edgecolors=_POINT, linewidths=0.8)
    ends = np.array([x.min(), x.max()])
    ax.plot(ends, a + b * ends, color="gray", ls="--", lw=1.0)
    ax.set_xlabel("Theoretical Quantiles")
    ax.set_ylabel("Standardized residuals")
    ax.set_title("Normal Q-Q")
    return ax


def scale_location(m, ax=None, smooth: bool = True):
    """√|standardized residuals| against fitted values (R's ``plot.lm`` panel 3): a trend
    shows variance changing with the mean."""
    f, r = _fitted_residuals(m)
    s = np.sqrt(np.abs(_standardized(m, r)))
    ax = _axes(ax)
    ax.scatter(f, s, s=12, facecolors="none", edgecolors=_POINT, linewidths=0.8)
    if smooth:
        bx, by = _binned_means(f, s)
        if bx.size:
            ax.plot(bx, by, color=_HIGHLIGHT, lw=1.2)
    ax.set_xlabel("Fitted values")
    ax.set_ylabel(r"$\sqrt{|\mathrm{Standardized\ residuals}|}$")
    ax.set_title("Scale-Location")
    return ax


# ---------------------------------------------------------------- random effects
def qq_ranef(m, group=None, ax=None, level: float = 0.95, columns=None):
    """Normal QQ plot of the conditional modes of one grouping factor (default: the first),
    one panel per random-effect column, as lme4's ``qqmath(ranef(fit, condVar = TRUE))``:
    the sorted modes b̂₍ᵢ₎ (x) against Φ⁻¹((i − ½)/n) (y), each with the interval
    b̂ ± z·sd(b | y), z = Φ⁻¹(½ + level/2), from the conditional SDs
    (:meth:`~lmmjax.LmerResult.ranef_sd`; lme4 uses z = 1.96; no intervals for a model
    without ``ranef_sd``).  ``ax``: an Axes (one column) or one Axes per column.
    Returns the Figure."""
    from scipy.stats import norm

    group, modes, sds = _ranef_group(m, group, columns)
    z = _z(level)
    n = len(modes)
    yq = norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    fig, axs, created = _panels(ax, modes.shape[1])
    for a, col in zip(axs, modes.columns):
        v = modes[col].to_numpy()
        order = np.argsort(v, kind="stable")
        a.axvline(0.0, color="0.7", lw=0.8)
        if sds is not None:
            s = sds[col].to_numpy()
            a.hlines(yq, v[order] - z * s[order], v[order] + z * s[order], color="black", lw=0.8)
        a.scatter(v[order], yq, s=14, color="tab:blue", zorder=3)
        a.set_title(col)
        a.set_xlabel("Conditional mode")
    axs[0].set_ylabel("Standard normal quantiles")
    if created:
        fig.suptitle(group)
    return fig


def caterpillar(m, group=None, level: float = 0.95, ax=None, columns=None, max_labels: int = 60):
    """Caterpillar plot of one grouping factor's conditional modes (lme4's
    ``dotplot(ranef(fit, condVar = TRUE))``): one panel per random-effect column, the levels
    ordered by their mode in the first column (shared by all panels), each mode with the
    interval b̂ ± z·sd(b | y), z = Φ⁻¹(½ + level/2) (lme4 uses 1.96).  Level names label
    the y axis when there are at most ``max_labels``.  Returns the Figure."""
    group, modes, sds = _ranef_group(m, group, columns)
    z = _z(level)
    order = np.argsort(modes.iloc[:, 0].to_numpy(), kind="stable")
    n = len(modes)
    y = np.arange(n)
    fig, axs, created = _panels(ax, modes.shape[1], height=min(12.0, max(3.0, 0.18 * n + 1.2)))
    for i, (a, col) in enumerate(zip(axs, modes.columns)):
        v = modes[col].to_numpy()[order]
        a.axvline(0.0, color="0.7", lw=0.8)
        if sds is not None:
            s = sds[col].to_numpy()[order]
            a.hlines(y, v - z * s, v + z * s, color="black", lw=0.8)
        a.scatter(v, y, s=14, color="tab:blue", zorder=3)
        a.set_title(col)
        if n <= max_labels:
            a.set_yticks(y, [str(modes.index[j]) for j in order] if i == 0 else [""] * n)
        else:
            a.set_yticks([])
        a.set_ylim(-0.8, n - 0.2)
    if n > max_labels:
        axs[0].set_ylabel(f"{n} levels of {group}, ordered")
    if created:
        fig.suptitle(group)
    return fig


def _block_for(m, group):
    names = list(_ranef(m))
    if not names:
        raise InputError(f"spaghetti needs a grouping factor; {type(m).__name__} has no random effects")
    if group is None:
        group = names[0]
    if group not in names:
        raise InputError(f"group={group!r} is not a grouping factor of the model; it has {names}")
    return next(b for b in m.design.blocks if b.group == group)


def _x_values(m, x, data):
    n = int(m.nobs)
    if not isinstance(x, str):
        vals = np.asarray(x)
        if vals.shape != (n,):
            raise InputError(f"x: a column name or {n} values (one per row used in the fit), got shape {vals.shape}")
        name = getattr(x, "name", None) or "x"
    else:
        frame = getattr(m.design, "frame", None)
        if frame is not None and x in frame.columns:
            vals = frame[x].to_numpy()
        elif data is not None and x in data.columns:
            if len(data) != m.design.n_data:
                raise InputError(f"data has {len(data)} rows but the model was fitted to {m.design.n_data}; "
                                 "pass the data frame the model was fitted to")
            vals = data[x].to_numpy()[m.design.rows]
        else:
            have = [] if frame is None else list(frame.columns)
            raise InputError(f"x={x!r} is not a column of the model's data (it uses {have}); "
                             "pass data= (the data frame the model was fitted to) to plot against another column")
        name = x
    if not (np.issubdtype(vals.dtype, np.number) or np.issubdtype(vals.dtype, np.bool_)):
        raise InputError(f"x={name!r} must be numeric (got dtype {vals.dtype}) to draw lines along it")
    return np.asarray(vals, float), name


def spaghetti(m, x, group=None, ax=None, max_groups: int = 30, data=None):
    """Per-level trajectories: the observed responses of each level of ``group`` (default:
    the first grouping factor) against ``x`` (a column of the model's data, of ``data``, or
    n values), each level's conditional fitted values Xβ̂ + Zb̂ as a line, and the
    population line Xβ̂ (``m.predict(re_form=False)``, averaged over rows sharing an x)
    in black.  Levels beyond the first ``max_groups`` (level order) are left out."""
    blk = _block_for(m, group)
    xv, xname = _x_values(m, x, data)
    f, r = _fitted_residuals(m)
    y = f + r
    pop = np.asarray(m.predict(re_form=False), float)
    if int(max_groups) < 1:
        raise InputError(f"max_groups must be a positive integer, got {max_groups!r}")
    shown = range(min(blk.n_levels, int(max_groups)))
    ax = _axes(ax, (7, 4.5))
    colors = _pyplot().get_cmap("tab20")
    for k in shown:
        rows = np.flatnonzero(blk.index == k)
        o = rows[np.argsort(xv[rows], kind="stable")]
        c = colors(k % 20)
        ax.scatter(xv[o], y[o], s=10, color=c, alpha=0.8)
        ax.plot(xv[o], f[o], color=c, lw=1.0, alpha=0.9)
    ux, inv = np.unique(xv, return_inverse=True)
    pop_mean = np.bincount(inv, weights=pop) / np.bincount(inv)
    ax.plot(ux, pop_mean, color="black", lw=2.5, label="population")
    ax.legend(loc="best", frameon=False)
    ax.set_xlabel(xname)
    ax.set_ylabel(getattr(m.design, "response_name", "response"))
    more = "" if blk.n_levels <= int(max_groups) else f" (first {int(max_groups)} of {blk.n_levels})"
    ax.set_title(f"{blk.group}{more}")
    return ax


# ---------------------------------------------------------------- the default panel
def diagnostics(m, figsize=None):
    """The default diagnostic figure (``m.plot()``): a 2×2 grid of residuals vs fitted,
    normal QQ of the standardized residuals, normal QQ of the first grouping factor's
    first random-effect column, and scale-location.  A model without random effects gets
    the three residual panels."""
    plt = _pyplot()
    fig, axs = plt.subplots(2, 2, figsize=figsize or (9, 7.5), constrained_layout=True)
    residuals_vs_fitted(m, ax=axs[0, 0])
    qq_residuals(m, ax=axs[0, 1])
    re = _ranef(m)
    if re:
        group = next(iter(re))
        col = re[group].columns[0]
        qq_ranef(m, group=group, ax=axs[1, 0], columns=[col])
        axs[1, 0].set_title(f"{group}: {col}")
        scale_location(m, ax=axs[1, 1])
    else:
        scale_location(m, ax=axs[1, 0])
        fig.delaxes(axs[1, 1])
    formula = getattr(m, "formula", None)
    if isinstance(formula, str):
        fig.suptitle(formula)
    return fig


# ---------------------------------------------------------------- batch results
def _batch_table(res, coef, ddf):
    """The per-response table (estimate, p, p_adj) of ``coef`` from a BatchResult, or
    ``res`` itself when it already is such a table."""
    if isinstance(res, pd.DataFrame):
        missing = [c for c in ("estimate", "p", "p_adj") if c not in res.columns]
        if missing:
            raise InputError(f"the table lacks column(s) {missing}; pass a BatchResult or a "
                             "coef_table/estimate_table result")
        return res, coef or "estimate"
    if not callable(getattr(res, "coef_table", None)):
        raise InputError(f"expected a BatchResult (lmmjax.lmer_batch) or its coef_table, got {type(res).__name__}")
    if coef is None:
        raise InputError(f"name the coefficient to plot: coef= one of {list(res.fixef.columns)}")
    try:
        return res.coef_table(coef, ddf=ddf), coef
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"coef={coef!r}: {exc}") from None


def volcano(res, coef=None, alpha: float = 0.05, ax=None, fdr: bool = True, ddf: str = "satterthwaite"):
    """Volcano plot: each fitted response's estimate of ``coef`` against −log₁₀ p, those
    with Benjamini–Hochberg adjusted p < ``alpha`` (``fdr=False``: unadjusted p) in red,
    a dashed line at the significance threshold on the p scale.  ``res``: a BatchResult
    (then the table is ``res.coef_table(coef, ddf)``) or such a table.  Failed responses
    (NaN p) are left out; p = 0 is drawn at the smallest positive p."""
    if not 0.0 < float(alpha) < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    tab, label = _batch_table(res, coef, ddf)
    est, p = tab["estimate"].to_numpy(float), tab["p"].to_numpy(float)
    padj = tab["p_adj"].to_numpy(float) if fdr else p
    ok = np.isfinite(est) & np.isfinite(p)
    est, p, padj = est[ok], p[ok], padj[ok]
    floor = p[p > 0].min() if np.any(p > 0) else np.finfo(float).tiny
    lp = -np.log10(np.maximum(p, floor))
    sig = padj < alpha
    ax = _axes(ax)
    ax.scatter(est[~sig], lp[~sig], s=10, color="0.6", label=f"not significant ({int((~sig).sum())})")
    what = "BH-adjusted p" if fdr else "p"
    ax.scatter(est[sig], lp[sig], s=12, color=_HIGHLIGHT, label=f"{what} < {alpha:g} ({int(sig.sum())})")
    cut = (p[sig].max() if sig.any() else None) if fdr else alpha
    if cut is not None:
        ax.axhline(-np.log10(max(cut, floor)), ls="--", color="gray", lw=0.8)
    ax.axvline(0.0, color="0.8", lw=0.8)
    ax.set_xlabel(f"Estimate ({label})")
    ax.set_ylabel(r"$-\log_{10}(p)$")
    ax.set_title(f"{label}: {int(sig.sum())} of {int(ok.sum())} responses with {what} < {alpha:g}")
    ax.legend(loc="best", frameon=False, fontsize="small")
    return ax


def pvalue_histogram(res, coef=None, ax=None, bins: int = 20, ddf: str = "satterthwaite"):
    """Histogram of the p-values of ``coef`` over the fitted responses (failed ones, with
    NaN p, left out) on ``bins`` equal bins of [0, 1], with the dashed line n/bins that a
    uniform (all-null) distribution would fill: an excess near 0 is signal, a hump
    elsewhere a miscalibrated test."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise InputError(f"bins must be a positive integer, got {bins!r}")
    tab, label = _batch_table(res, coef, ddf)
    p = tab["p"].to_numpy(float)
    p = p[np.isfinite(p)]
    ax = _axes(ax)
    ax.hist(p, bins=np.linspace(0.0, 1.0, int(bins) + 1), color="0.6", edgecolor="white")
    ax.axhline(p.size / bins, ls="--", color=_HIGHLIGHT, lw=1.0, label="uniform")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("p-value")
    ax.set_ylabel("Frequency")
    ax.set_title(f"{label}: p-values of {p.size} responses")
    ax.legend(loc="best", frameon=False, fontsize="small")
    return ax


# ---------------------------------------------------------------- variance partition
def variance_partition(vp, ax=None, percent: bool = True):
    """variancePartition's figure: for a batch (a responses × components DataFrame from
    :meth:`lmmjax.BatchResult.variance_partition`) one violin per component with its
    median marked, components ordered by median (Residuals last); for one model (a Series
    from :meth:`lmmjax.LmerResult.variance_partition`) a horizontal bar per component."""
    scale = 100.0 if percent else 1.0
    label = "Variance explained (%)" if percent else "Fraction of variance explained"
    if isinstance(vp, pd.Series):
        ax = _axes(ax, (5, 0.4 * len(vp) + 1))
        ax.barh(list(vp.index)[::-1], vp.to_numpy()[::-1] * scale, color="0.4")
        ax.set_xlabel(label)
        ax.set_xlim(0, scale)
        return ax
    if not isinstance(vp, pd.DataFrame):
        raise TypeError(f"variance_partition plots a DataFrame or Series of fractions, got {type(vp).__name__}")
    vp = vp.dropna(how="all")
    cols = [c for c in vp.columns if c != "Residuals"]
    cols = sorted(cols, key=lambda c: -float(np.nanmedian(vp[c]))) + (["Residuals"] if "Residuals" in vp else [])
    ax = _axes(ax, (max(4, 0.8 * len(cols) + 1), 4))
    data = [vp[c].dropna().to_numpy() * scale for c in cols]
    parts = ax.violinplot(data, showmedians=True, showextrema=False)
    for body in parts["bodies"]:
        body.set_alpha(0.6)
    ax.set_xticks(np.arange(1, len(cols) + 1), cols, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_ylim(0, scale)
    return ax
