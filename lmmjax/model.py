"""``lmer``: formula + data -> fitted model.

The pipeline mirrors lme4's ``lFormula -> mkLmerDevfun -> optimizeLmer -> mkMerMod``:
:func:`~lmmjax.design.build_design` (formula and data),
:func:`~lmmjax.scaling.standardize` (the fit's X, y and random-effects columns, transformed
back exactly afterwards), :func:`~lmmjax.design.design_stats` /
:func:`~lmmjax.design.response_stats` (the cross-products the criterion needs), the fit —
:func:`lmmjax.engine.fit_stats` (the bucketed Newton, programs compiled once per shape
bucket, for the usual structures; the layout engine for the rest) — and
:class:`~lmmjax.results.LmerResult`.  ``optinfo.hessian`` is in the fit's θ
coordinates (the user's, unless a random-effects term was standardized).

Precision: fits run in float64 inside ``jax.enable_x64(True)``, a context
manager, so the global ``jax_enable_x64`` flag — and any float32 JAX code of
the caller — is left untouched.  ``dtype="float32"`` is an explicit speed option.
"""
from __future__ import annotations

import collections
import dataclasses
import warnings
import weakref

import numpy as np
import pandas as pd

from . import bucketed
from ._compute import precision  # noqa: F401  (lmmjax.precision)
from .design import build_design, check_response_varies, design_stats, response_stats, x_stats
from .engine import fit_stats
from .formula import InputError
from .optimize import ConvergenceWarning, SingularFitWarning
from .results import LmerResult
from .scaling import standardize, standardize_terms, within_stats

__all__ = ["lmer", "precision"]


def lmer(formula: str, data: pd.DataFrame, reml: bool = True, *, dtype: str = "float64",
         start=None, theta=None, maxiter: int = 1000, warn: bool = True, residual=None,
         structures: dict | None = None, weights=None) -> LmerResult:
    """Fit a linear mixed model by REML (default) or ML, like ``lme4::lmer``.

    Parameters
    ----------
    formula : lme4 syntax, e.g. ``"Reaction ~ Days + (Days | Subject)"``;
        random terms ``(x | g)``, ``(x || g)``, ``(1 | a/b)``, ``(1 | a:b)``, and
        structured ``diag(x | g)``, ``homdiag``, ``cs(0 + f | g)``, ``homcs``, ``ar1(0 + f | g)``,
        ``hetar1`` (glmmTMB's keywords).
    data : pandas DataFrame. Rows with a missing value in a used column are dropped.
    reml : REML (True, lme4's default) or maximum likelihood.
    dtype : "float64" (default) or "float32" (faster on GPUs, less accurate).
    start : starting θ (lme4 order); default 1 on template diagonals, 0 elsewhere.
    theta : evaluate the model at this θ without optimizing (like lme4's
        ``devFunOnly`` + ``mkMerMod``): every reported quantity is then conditional on it.
    warn : emit ConvergenceWarning / SingularFitWarning.
    residual : a residual covariance structure from :mod:`lmmjax.cov` (e.g.
        ``lmmjax.cov.AR1(group="Mare")``, ``CAR1(time="age", group="Subject") * VarIdent(by="Sex")``),
        like nlme's ``lme(..., correlation=, weights=)``; returns a
        :class:`~lmmjax.gls.GroupedResult`.
    structures : extra random-effect structure keywords for the formula, e.g.
        ``{"ou": MyKernel()}`` with ``ou(0 + factor(visit) | subject)``: a
        :class:`lmmjax.cov.Correlation` subclass instance (its kernel across the term's
        coefficients at unit spacing, one common variance) or a callable ``q -> structure``
        following :mod:`lmmjax.covariance`'s protocol.
    weights : prior weights, like lme4's ``weights=``: a column name or one positive value per
        data row, Var(εᵢ) = σ²/wᵢ (e.g. inverse variances, or counts behind averaged rows).
        The criterion and log-likelihood include −Σ log wᵢ as lme4's do.
    """
    if residual is not None:
        if weights is not None:
            raise InputError("weights= with residual= is not supported: model the variances in the residual "
                             "structure instead (e.g. lmmjax.cov.VarIdent, VarPower)")
        from .gls import fit_grouped

        return fit_grouped(formula, data, residual, reml=reml, dtype=dtype, engine="lmer", structures=structures)
    prep = _prepare(formula, data, structures, weights)
    user_design, design, stats, fstats = prep.user_design, prep.design, prep.stats, prep.fstats
    Xs, ys, scale, blocks, tscale, sdesign = prep.Xs, prep.ys, prep.scale, prep.blocks, prep.tscale, prep.sdesign
    layout = design.layout
    to_fit = tscale.inverse()

    def user_theta(t):     # a user's start or θ in the fit's coordinates
        return None if t is None else to_fit.theta(_check_theta(t, layout), layout)

    def fit_pass(st, theta0):
        return fit_stats(st, layout, reml, dtype, theta0=theta0, maxiter=maxiter,
                         theta=None if theta is None else user_theta(theta))

    opt, sol, satt = fit_pass(fstats, user_theta(start))
    # a second pass where β̂ still explains much of the (standardized) y: r² = Myy − zᵀz
    # cancels there (a tiny σ), and y − Xβ̂ has the same criterion with nothing to cancel
    beta1 = np.asarray(sol["beta"], float)
    fit_part = Xs @ beta1
    if fit_part @ fit_part > 1e4 * float(sol["r2"]):
        y2 = ys - fit_part
        st2 = {**fstats, **response_stats(sdesign, y2)}
        if "R1" in fstats:
            st2.update(within_stats(blocks[0], Xs, y2))
        opt2, sol, satt = fit_pass(st2, opt.theta)
        opt = dataclasses.replace(opt2, iterations=opt.iterations + opt2.iterations,
                                  evaluations=opt.evaluations + opt2.evaluations)
        scale = dataclasses.replace(scale, b0=scale.b0 + scale.s_y * scale.C @ beta1)
    n, p = design.n, design.p
    if satt is not None:
        satt = scale.satterthwaite(*satt)
    sol = scale.solution(sol, n, p, reml)
    if tscale.any():
        sol = tscale.solution(sol, opt.theta, layout)
        opt = dataclasses.replace(opt, theta=tscale.theta(opt.theta, layout))
    if theta is not None:
        opt = dataclasses.replace(opt, theta=layout.canonical(_check_theta(theta, layout)))
    opt = dataclasses.replace(opt, criterion=scale.criterion(opt.criterion, n, p, reml) - user_design.log_weights)
    if user_design.weights is not None:
        sol = {**sol, "criterion": np.asarray(sol["criterion"], float) - user_design.log_weights}
    if not np.isfinite(opt.criterion):
        raise FitError(
            f"the {'REML' if reml else 'ML'} criterion is not finite at θ = {np.round(opt.theta, 6).tolist()}: "
            "the fixed effects reproduce the response exactly (no residual variance) or the data hold "
            "extreme values; check the response and the model")
    m = LmerResult(user_design, stats, opt, sol, reml, data_name=getattr(data, "_lmmjax_name", None))
    m.weights_arg = weights     # as given, for refits (compare, profile)
    m._fitter = lmer            # m.refit() (results sit below this module: no import back)
    # (the evaluation's Satterthwaite derivatives are in the fit's θ coordinates: the same df
    # at an optimum, where the gradient vanishes, but not at a caller's θ — computed later then)
    if satt is not None and not (theta is not None and tscale.any()):
        m.set_satterthwaite(*satt)
    m.data = data  # a reference (not a copy), for refits such as compare()'s ML refits
    if warn:
        if not m.converged:
            warnings.warn(f"Model failed to converge: {opt.message}. Try refitting from start=m.optinfo.theta, "
                          "or centre and scale the predictors", ConvergenceWarning, stacklevel=2)
        if m.is_singular:
            warnings.warn("boundary (singular) fit: see lmmjax docs on is_singular",
                          SingularFitWarning, stacklevel=2)
    return m


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What a fit needs before the optimizer, all pure functions of (formula, data,
    weights): the design, its statistics, and the standardized copies the fit runs on."""
    user_design: object
    design: object
    stats: dict
    Xs: np.ndarray
    ys: np.ndarray
    scale: object
    blocks: list
    tscale: object
    sdesign: object
    fstats: dict


def _build_prepared(formula, data, structures, weights) -> _Prepared:
    user_design = build_design(formula, data, structures=structures, weights=weights)
    # prior weights: the likelihood sees rows scaled by √wᵢ (an unweighted model whose
    # criterion is the weighted one's + Σ log wᵢ); results keep the user's rows
    design = user_design.weighted()
    check_response_varies(design)
    stats = {**design_stats(design), **response_stats(design, design.y)}
    # the fit runs on standardized X and y (lmmjax.scaling): exact on badly scaled data
    # and on centred, scaled columns of unstructured random-effects terms (a slope on a
    # predictor offset by 10⁶ would otherwise sit at θ ~ 10⁵ with a correlation near −1)
    Xs, ys, scale = standardize(design.X, design.y)
    blocks, tscale = standardize_terms(design.blocks)
    sdesign = dataclasses.replace(design, X=Xs, y=ys, blocks=blocks)
    if tscale.any():
        fstats = {**design_stats(sdesign), **response_stats(sdesign, ys)}
    else:
        fstats = {**stats, **x_stats(sdesign, Xs), **response_stats(sdesign, ys)}
    if len(design.blocks) == 1 and bucketed.eligible(fstats, design.layout):
        fstats.update(within_stats(blocks[0], Xs, ys))      # no cancellation for a tiny σ
    return _Prepared(user_design, design, stats, Xs, ys, scale, blocks, tscale, sdesign, fstats)


#: the last few prepared designs, keyed by (formula, id(data), weights column): a refit of
#: the same model to the same data frame (an ML refit for a comparison, ``start=``/``theta=``
#: refits, repeated fits) skips the formula, the model matrices and the statistics.  An
#: entry is used only while its data frame is alive and every used column (and the index)
#: still equals the copy taken at the fit: a frame edited in place is rebuilt.
_PREPARED: "collections.OrderedDict" = collections.OrderedDict()
PREPARED_MAX = 4
#: frames with more rows are not cached (the entry holds copies of the used columns and
#: the standardized matrices beside the result's own)
PREPARED_MAX_ROWS = 250_000


def _prepare(formula, data, structures, weights) -> _Prepared:
    cacheable = (structures is None and (weights is None or isinstance(weights, str))
                 and isinstance(data, pd.DataFrame) and isinstance(formula, str) and len(data) <= PREPARED_MAX_ROWS)
    if not cacheable:
        return _build_prepared(formula, data, structures, weights)
    key = (formula, id(data), weights, _settings())
    hit = _PREPARED.get(key)
    if hit is not None:
        ref, index, columns, prep = hit
        if ref() is data and _same_columns(data, index, columns):
            _PREPARED.move_to_end(key)
            return prep
        del _PREPARED[key]
    prep = _build_prepared(formula, data, structures, weights)
    used = list(prep.user_design.frame.columns) + ([weights] if weights is not None else [])
    try:
        ref = weakref.ref(data)
    except TypeError:
        return prep
    _PREPARED[key] = (ref, data.index.copy(), {c: data[c].copy() for c in dict.fromkeys(used)}, prep)
    while len(_PREPARED) > PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return prep


def _settings() -> tuple:
    """The module settings a prepared design depends on (the sparse/dense choice, the
    scaling threshold, the bucketed engine's eligibility): part of the cache key."""
    from . import design, scaling

    return (design.SPARSE_MIN_ENTRIES, design.SPARSE_DENSITY, design.TEXT_CODES_MAX, scaling.FAR,
            bucketed.SMALL_QR_MAX)


def _same_columns(data, index, columns) -> bool:
    """Whether ``data`` still has the index and the used columns' dtypes and values."""
    if not data.index.equals(index):
        return False
    for c, old in columns.items():
        if c not in data.columns:
            return False
        col = data[c]
        if not isinstance(col, pd.Series) or col.dtype != old.dtype or not col.equals(old):
            return False
    return True


class FitError(InputError):
    """The model cannot be fitted to these data (e.g. a response the fixed effects
    reproduce exactly)."""


def _check_theta(theta, layout):
    """A user's θ (start or fixed), checked."""
    theta = np.asarray(theta, float)
    if theta.shape != (layout.n_theta,) or not np.all(np.isfinite(theta)):
        raise InputError(f"start and theta must have {layout.n_theta} finite entries (lme4's θ order), got "
                         f"{theta.tolist() if theta.size <= 10 else f'shape {theta.shape}'}")
    return theta
