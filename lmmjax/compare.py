"""Likelihood-ratio comparison of nested models: ``lmmjax.compare(m1, m2, ...)``,
like lme4's ``anova(m1, m2, ...)``."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ._dist import chi2_sf
from .design import DataError

__all__ = ["compare"]


def _same_data(a, b) -> bool:
    return a.nobs == b.nobs and np.array_equal(a.design.y, b.design.y) and np.array_equal(
        a.design.rows, b.design.rows) and np.array_equal(_w(a), _w(b))


def _w(m):
    w = getattr(getattr(m, "design", None), "weights", None)
    return np.ones(m.nobs) if w is None else w


def compare(*models, refit: bool = True, names=None) -> pd.DataFrame:
    """Compare models fitted to the same data, ordered by number of parameters.

    Columns: npar, AIC, BIC, logLik, deviance, chisq, df, p (χ² test of each model
    against the previous row).  As in lme4, REML fits are refitted by ML first
    (``refit=True``): REML likelihoods are not comparable when the fixed effects
    differ.  ``refit=False`` compares REML fits as they are, which is allowed only
    when every model has the same fixed-effects columns.  ``df.attrs["notes"]``
    (also printed below the table by ``print``) says what was done, and notes when a
    variance parameter is tested on its boundary (the χ² p-value is then conservative).
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
    if any_reml and refit:
        from .model import lmer

        fitted = []
        for m in models:
            if m.reml:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fitted.append(lmer(m.formula, m.data, reml=False, weights=getattr(m, "weights_arg", None)))
            else:
                fitted.append(m)
        models = fitted
        notes.append("refitting model(s) with ML (instead of REML)")
    elif any_reml:
        if not all(m.reml for m in models):
            raise ValueError("cannot compare REML and ML fits without refit=True")
        cols = [list(m.fixef.index) for m in models]
        if any(c != cols[0] for c in cols):
            raise ValueError("REML likelihoods of models with different fixed effects are not "
                             "comparable; use refit=True (the default) to compare ML fits")
        notes.append("comparing REML fits (same fixed effects)")
    order = np.argsort([m.npar for m in models], kind="stable")
    rows = []
    prev = None
    for i in order:
        m = models[i]
        dev = -2 * m.loglik
        row = dict(npar=m.npar, AIC=m.aic, BIC=m.bic, logLik=m.loglik, deviance=dev,
                   chisq=np.nan, df=np.nan, p=np.nan)
        if prev is not None:
            chisq = -2 * prev.loglik - dev
            ddf = m.npar - prev.npar
            row.update(chisq=chisq, df=ddf, p=chi2_sf(chisq, ddf) if ddf > 0 else np.nan)
            if m.layout.n_theta != prev.layout.n_theta:
                notes.append(f"{names[i]}: variance parameters are tested on the boundary of their "
                             "space; the χ² p-value is conservative")
        rows.append(row)
        prev = m
    out = pd.DataFrame(rows, index=[names[i] for i in order])
    out.attrs["notes"] = notes
    return out
