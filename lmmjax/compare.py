"""Likelihood-ratio comparison of models: ``lmmjax.compare(m1, m2, ...)``, like lme4's
``anova(m1, m2, ...)`` for lmer fits and nlme's ``anova(m1, m2, ...)`` when a model has a
residual structure (:class:`~lmmjax.gls.GroupedResult`, from ``gls`` or ``lmer(...,
residual=)``); the two kinds mix (an lmer random-slope model against lmer + AR(1))."""
from __future__ import annotations

import math
import warnings

import numpy as np

from ._dist import chi2_sf
from .design import DataError
from .tables import Table

__all__ = ["compare", "CompareTable"]


class CompareTable(Table):
    """:func:`compare`'s table: printed whole (never wrapped or cut at pandas' display width)
    and followed by its notes (``.notes``, also in ``.attrs["notes"]``): ML refits, REML
    comparisons, boundary tests.  Tables derived from it (``tab[["AIC"]]``, ``tab.loc[...]``)
    are plain pandas."""


def _same_data(a, b) -> bool:
    return a.nobs == b.nobs and np.array_equal(a.design.y, b.design.y) and np.array_equal(
        _rows(a), _rows(b)) and np.array_equal(_w(a), _w(b))


def _rows(m):
    """Positions of the used rows in the data as given (a residual-structure fit drops
    rows with missing structure columns first)."""
    return getattr(m, "data_rows", m.design.rows)


def _w(m):
    w = getattr(getattr(m, "design", None), "weights", None)
    return np.ones(m.nobs) if w is None else w


def _grouped(m) -> bool:
    from .gls import GroupedResult

    return isinstance(m, GroupedResult)


#: residual-structure parameters whose null value (independence) lies on the boundary of
#: their space: CAR1's φ ∈ (0, 1) and the exponential range (0 at independence) and nugget
#: (0 without one).  ρ of AR1/compound symmetry/unstructured, variance ratios and powers
#: have interior nulls.  A user structure may set ``n_boundary``.
def _residual_boundary(part) -> int:
    from .residual import CAR1, Exponential

    if hasattr(part, "n_boundary"):
        return int(part.n_boundary)
    if isinstance(part, Exponential):
        return 1 + bool(part.nugget)
    return int(isinstance(part, CAR1))


def _n_boundary(m) -> int:
    """Variance-type parameters with a boundary at their null value: the random-effect
    variances (each structure's ``boundary`` entries) and :func:`_residual_boundary`'s."""
    if _grouped(m):
        n = sum(len(np.atleast_1d(s.boundary)) for s in m._spec.structures)
        return n + sum(_residual_boundary(p) for p in getattr(m.residual, "parts", [m.residual]))
    return sum(len(np.atleast_1d(s.boundary)) for s in m.layout.structures)


def _refit_ml(m):
    return m.refit(reml=False)


def compare(*models, refit: bool | None = None, names=None) -> CompareTable:
    """Compare models fitted to the same data, ordered by number of parameters.

    Columns: npar, AIC, BIC, logLik, deviance, chisq, df, p (χ² likelihood-ratio test of
    each model against the previous row; R's Chisq, Df, Pr(>Chisq)).  Models may be
    :class:`~lmmjax.results.LmerResult` and :class:`~lmmjax.gls.GroupedResult` alike.

    REML fits: likelihoods of REML fits are comparable only when the fixed effects are
    the same.  ``refit=None`` (default) follows lme4 for lmer-only comparisons (every
    REML fit is refitted by ML) and nlme's ``anova`` when a residual-structure fit takes
    part: REML fits with the same fixed-effects columns are compared as they are (BIC
    then uses n − p observations, as nlme), and otherwise the REML fits are refitted by ML.
    ``refit=True`` always refits by ML; ``refit=False`` never does (and refuses REML fits
    with different fixed effects).

    The result is a :class:`CompareTable`; its notes (printed under the table, and in
    ``.attrs["notes"]``) say what was refitted and when a test puts variance parameters
    on the boundary of their space (the χ² p-value is then conservative; a correlation
    or variance ratio with an interior null value draws no such note).
    """
    if len(models) < 2:
        raise ValueError("compare needs at least two fitted models")
    names = list(names) if names is not None else [f"m{i + 1}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models")
    for nm, m in zip(names[1:], models[1:]):
        if not _same_data(models[0], m):
            raise DataError(
                f"models {names[0]!r} and {nm!r} were fitted to different data "
                f"(n = {models[0].nobs} and {m.nobs}, or different responses / rows); "
                "likelihood-ratio tests need the same observations"
            )
    notes = []
    any_reml = any(m.reml for m in models)
    cols = [list(m.fixef.index) for m in models]
    same_fixed = all(c == cols[0] for c in cols)
    nlme_rule = any(_grouped(m) for m in models)
    if refit is None:
        refit = not (nlme_rule and same_fixed and all(m.reml for m in models))
    reml_compare = False
    if any_reml and refit:
        fitted = []
        for m in models:
            if m.reml:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fitted.append(_refit_ml(m))
            else:
                fitted.append(m)
        models = fitted
        notes.append("refitting model(s) with ML (instead of REML)")
    elif any_reml:
        if not all(m.reml for m in models):
            raise ValueError("cannot compare REML and ML fits without refit=True")
        if not same_fixed:
            raise ValueError("REML likelihoods of models with different fixed effects are not "
                             "comparable; use refit=True (the default) to compare ML fits")
        reml_compare = True
        notes.append("comparing REML fits (same fixed effects)")
    order = np.argsort([m.npar for m in models], kind="stable")
    rows = []
    prev = None
    for i in order:
        m = models[i]
        dev = -2 * m.loglik
        bic = m.bic
        if reml_compare and nlme_rule:      # nlme's REML BIC: n − p observations
            bic = dev + math.log(m.nobs - len(m.fixef)) * m.npar
        row = dict(npar=m.npar, AIC=m.aic, BIC=bic, logLik=m.loglik, deviance=dev,
                   chisq=np.nan, df=np.nan, p=np.nan)
        if prev is not None:
            chisq = -2 * prev.loglik - dev
            ddf = m.npar - prev.npar
            row.update(chisq=chisq, df=ddf, p=chi2_sf(chisq, ddf) if ddf > 0 else np.nan)
            if _n_boundary(m) > _n_boundary(prev):
                notes.append(f"{names[i]}: variance parameters are tested on the boundary of their "
                             "space; the χ² p-value is conservative")
        rows.append(row)
        prev = m
    out = CompareTable(rows, index=[names[i] for i in order])
    out.attrs["notes"] = notes
    return out
