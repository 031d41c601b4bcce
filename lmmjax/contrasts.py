"""Hypothesis matrices L for the terms of the fixed-effects formula.

* **Type III** (lmerTest's ``anova(type = 3)``, SAS-style): express the columns of a
  full, rank-deficient dummy coding of every term (each factor with all its levels)
  in the coefficients of the fitted treatment-coded X, L₀ = (X⁺ X_full)ᵀ; then, from
  the highest-order terms down, make each term's columns orthogonal to those of the
  terms that contain it; the rows of term t's hypothesis are L₀'s columns for t,
  restricted to the rows that name fitted coefficients.  The result does not depend
  on the contrast coding (Goodnight 1980; Kuznetsova et al. 2017).
* **Type I** (sequential): rows of Uᵀ where XᵀX = U D Uᵀ with U unit lower
  triangular (the normalized Doolittle factorization).
"""
from __future__ import annotations

import numpy as np
from formulaic import model_matrix

from .design import FORMULA_CONTEXT, Design, r_name

__all__ = ["term_columns", "type3_contrasts", "type1_contrasts"]


def _zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    mx = np.max(np.abs(x)) if x.size else 0.0
    if mx > 0:
        digits = max(0, digits - int(np.ceil(np.log10(mx))))
    return np.round(x, digits)


def term_columns(design: Design) -> dict:
    """Model term (without the intercept) -> positions of its columns in the fitted X."""
    pos = {int(full): i for i, full in enumerate(design.x_keep)}
    out = {}
    for term, idx in design.fixed_spec.term_indices.items():
        name = str(term)
        if name == "1":
            continue
        cols = [pos[i] for i in idx if i in pos]
        if cols:
            out[name] = cols
    return out


def _term_variables(design: Design) -> dict:
    return {str(t): {str(f) for f in t.factors} for t in design.fixed_spec.terms if str(t) != "1"}


def type1_contrasts(design: Design) -> dict:
    X = design.X
    p = X.shape[1]
    R = np.linalg.cholesky(X.T @ X)          # XᵀX = R Rᵀ
    U = R / np.diag(R)[None, :]              # unit lower triangular
    Lt = U.T
    return {t: Lt[cols] for t, cols in term_columns(design).items()} if p else {}


def type3_contrasts(design: Design) -> dict:
    cmap = term_columns(design)
    if design.p <= 1 or len(cmap) <= 1:
        return type1_contrasts(design)
    frame = design.frame
    has_icpt = "(Intercept)" in design.xnames
    full_cols, full_names = [], []
    if has_icpt:
        full_cols.append(np.ones((design.n, 1)))
        full_names.append("(Intercept)")
    for term in cmap:
        mm = model_matrix(f"0 + {term}", frame, ensure_full_rank=False, na_action="ignore",
                          context=FORMULA_CONTEXT)
        full_cols.append(np.asarray(mm, float))
        full_names.extend(r_name(c) for c in mm.columns)
    Xfull = np.hstack(full_cols)
    L = _zapsmall((np.linalg.pinv(design.X) @ Xfull).T)   # rows: full params, cols: coefficients
    variables = _term_variables(design)
    containing = {
        t: [u for u in cmap if u != t and variables[t] < variables[u]] for t in cmap
    }
    for t in sorted(cmap, key=lambda u: len(variables[u]), reverse=True):
        if containing[t]:
            C = L[:, sorted({c for u in containing[t] for c in cmap[u]})]
            Y = L[:, cmap[t]]
            coef, *_ = np.linalg.lstsq(C, Y, rcond=None)
            L[:, cmap[t]] = _zapsmall(Y - C @ coef)
    index = {n: i for i, n in enumerate(full_names)}
    missing = [n for n in design.xnames if n not in index]
    if missing:
        raise NotImplementedError(f"type III contrasts could not match coefficients {missing}")
    L = L[[index[n] for n in design.xnames]]
    out = {}
    for t, cols in cmap.items():
        Lt = L[:, cols].T
        out[t] = Lt[np.abs(Lt).sum(axis=1) > 1e-8]
    return out
