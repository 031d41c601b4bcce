r"""Variance partitioning: the fraction of variance each model term explains, per response
(variancePartition's ``fitExtractVarPartModel`` / ``calcVarPart`` for lmer fits; Hoffman &
Schadt 2016, BMC Bioinformatics 17:483).

For a fit with random-effects covariances Σ_k = σ²T_kT_kᵀ, residual variance σ² and fixed
effects β, the components are

* each random-effects column c of each term k: (Σ_k)_cc (named ``group`` for an intercept,
  ``group.column`` otherwise);
* each non-intercept fixed-effects column j (optional): with fⱼ = Xⱼβⱼ over the rows used,
  vⱼ = Var_w(fⱼ) · Var_w(Σⱼ fⱼ) / Σⱼ Var_w(fⱼ) — the variance of the whole fixed part shared
  out in proportion to the columns' own variances (Var_w: the prior-weighted population
  variance over the rows the response was fitted on);
* ``Residuals``: σ²;

and the fractions are the components over their sum (each row sums to one).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["variance_components", "fractions"]


def _weighted_var(F: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Population variance of the columns of F (n, …) with row weights w (n, …)."""
    sw = w.sum(axis=0)
    mean = (w * F).sum(axis=0) / sw
    return (w * (F - mean) ** 2).sum(axis=0) / sw


def variance_components(design, Ts, sigma2, beta, row_weights, fixed: bool = True) -> pd.DataFrame:
    """Components (responses × names) from per-response templates ``Ts`` (one array
    (G, q_k, q_k) per term), σ² (G,), β (G, p) and row weights (n, G) (prior weight × row
    used; 0 for rows a response was not fitted on)."""
    cols, names = [], []
    seen: dict[str, int] = {}
    for b, T in zip(design.blocks, Ts):
        S = sigma2[:, None, None] * np.einsum("gab,gcb->gac", T, T)
        for c, cn in enumerate(b.colnames):
            nm = b.group if cn == "(Intercept)" else f"{b.group}.{cn}"
            if nm in seen:                       # e.g. (1 | g) + (1 | g): lme4 numbers them
                seen[nm] += 1
                nm = f"{nm}.{seen[nm]}"
            else:
                seen[nm] = 0
            cols.append(S[:, c, c])
            names.append(nm)
    if fixed:
        X = design.X
        fx = [j for j, nm in enumerate(design.xnames) if nm != "(Intercept)"]
        if fx:
            parts = [_weighted_var(X[:, j, None] * beta[None, :, j], row_weights) for j in fx]
            total = _weighted_var(X[:, fx] @ beta[:, fx].T, row_weights)
            own = np.sum(parts, axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(own > 0, total / own, 0.0)
            for j, v in zip(fx, parts):
                cols.append(v * share)
                names.append(design.xnames[j])
    cols.append(np.asarray(sigma2, float))
    names.append("Residuals")
    return pd.DataFrame(np.column_stack(cols), columns=names)


def fractions(components: pd.DataFrame) -> pd.DataFrame:
    """Each row divided by its sum."""
    return components.div(components.sum(axis=1), axis=0)
