r"""Effect sizes for fitted linear mixed models: R², ICC and the within/between decomposition.

**Variance components** (Nakagawa & Schielzeth 2013, *Methods Ecol. Evol.* 4:133; random
slopes by Johnson 2014, *Methods Ecol. Evol.* 5:944; Nakagawa, Johnson & Schielzeth 2017,
*J. R. Soc. Interface* 14:20170213), computed from a fit over its n used rows:

* σ²_f, the fixed-effect variance: the sample variance (denominator n − 1) of the fixed
  part Xβ̂ (no offset, rank-deficient columns dropped), as ``insight::get_variance``;
* σ²_r, the random-effect variance: for every random term k with covariance Σ_k and
  model-matrix rows z_ik, the mean over observations of z_ikᵀ Σ_k z_ik, summed over the
  terms — for a random intercept just its variance;
* σ²_ε = σ̂², the residual variance.

Then (``performance::r2_nakagawa`` and ``performance::icc`` for an lmer fit)

    R²_marginal    = σ²_f / (σ²_f + σ²_r + σ²_ε)
    R²_conditional = (σ²_f + σ²_r) / (σ²_f + σ²_r + σ²_ε)
    ICC_adjusted   = σ²_r / (σ²_r + σ²_ε)
    ICC_conditional = σ²_r / (σ²_f + σ²_r + σ²_ε)

As performance does, a fit with a random-effect standard deviation (relative to σ̂, a
diagonal of a term's Cholesky template, lme4's θ on the diagonal) below ``tolerance`` is
treated as singular: a warning, R²_conditional and both ICCs NaN, and R²_marginal
σ²_f / (σ²_f + σ²_ε).  ``tolerance=0`` uses the estimated (near-zero) variances instead.

Where lmmjax follows Johnson's definition and performance 0.10 does not: a grouping factor
that appears in several terms (``(x || g)``, ``(1 | g) + (0 + x | g)``) — performance
counts only its first term — and a random slope whose column is not in the fixed part —
performance leaves that column out (and warns).  lmmjax sums every term with its own columns.

**Prior weights** make Var(εᵢ) = σ²/wᵢ differ by row, so σ̂² is the residual variance of a
row of weight one and R² would change with the scale of the weights; performance ignores
the weights.  :func:`r2`, :func:`icc` and :func:`variances` refuse weighted fits.

**Centering** (:func:`center`): the within/between decomposition of a predictor x for groups
j, x_ij = x̄_j + (x_ij − x̄_j), so a model can carry the between-group effect (x̄_j) and the
within-group effect (x_ij − x̄_j) separately (Enders & Tofighi 2007, *Psychol. Methods*
12:121; ``datawizard::demean``'s ``x_between`` / ``x_within``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from .design import DataError
from .formula import InputError

__all__ = ["variances", "r2", "icc", "center"]

#: performance's default: a relative random-effect SD below this makes the fit singular
TOLERANCE = 1e-5


def _check_fit(m, what: str) -> None:
    if not (hasattr(m, "design") and hasattr(m, "_Ts") and hasattr(m.design, "blocks")):
        raise InputError(f"{what} needs a fitted lmmjax.lmer model (an LmerResult), got {type(m).__name__}; "
                         "models with a residual= structure are not supported")
    w = m.design.weights
    if w is not None and not np.all(np.asarray(w) == 1.0):
        raise InputError(
            f"{what} is not defined for a fit with prior weights: Var(eps_i) = sigma^2 / w_i differs by row, so "
            "there is no single residual variance (performance::r2_nakagawa ignores the weights, and its value "
            "changes with their scale); refit without weights= to get the Nakagawa-Schielzeth values")


def variances(m) -> pd.Series:
    """The variance components behind :func:`r2` and :func:`icc` for a fitted ``lmer`` model:
    ``var_fixed`` (sample variance of Xβ̂, denominator n − 1), ``var_random`` (Σ_k mean_i
    z_ikᵀ Σ_k z_ik, Johnson 2014) and ``var_residual`` (σ̂²), as ``insight::get_variance``'s
    ``var.fixed``, ``var.random``, ``var.residual``.  Always computed, also for singular fits."""
    _check_fit(m, "variances()")
    X = np.asarray(m.design.X, float)
    eta = X @ m.fixef.to_numpy()
    # a constant fixed part (intercept only) has variance 0 exactly, not a rounding residue
    var_fixed = 0.0 if np.ptp(eta) == 0 else float(np.var(eta, ddof=1))
    var_random = 0.0
    for blk, S in zip(m.design.blocks, m.covariance_matrices()):
        Z = np.asarray(blk.Zq, float)
        var_random += float(np.mean(np.einsum("na,ab,nb->n", Z, S.to_numpy(), Z)))
    return pd.Series({"var_fixed": var_fixed, "var_random": var_random, "var_residual": m.sigma**2},
                     name="variance")


def _singular(m, tolerance: float) -> bool:
    if not (tolerance >= 0):
        raise InputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return any(np.any(np.abs(np.diag(T)) < tolerance) for T in m._Ts)


def _warn_singular(what: str, tolerance: float) -> None:
    warnings.warn(f"{what}: a random-effect variance is (near) zero (relative SD < {tolerance:g}), a singular fit; "
                  "the random-effect variance is left out as performance does (pass tolerance=0 to use the "
                  "estimated variances, or simplify the random effects)", stacklevel=3)


def r2(m, tolerance: float = TOLERANCE) -> pd.Series:
    """Marginal and conditional R² of a fitted ``lmer`` model (Nakagawa & Schielzeth 2013;
    random slopes by Johnson 2014), as ``performance::r2_nakagawa``:

        marginal = σ²_f / (σ²_f + σ²_r + σ²_ε),  conditional = (σ²_f + σ²_r) / (σ²_f + σ²_r + σ²_ε)

    with the components of :func:`variances` (also in ``.attrs["variances"]``).  A singular
    fit (a relative random-effect SD below ``tolerance``) warns and gives conditional = NaN,
    marginal = σ²_f / (σ²_f + σ²_ε), as performance does."""
    v = variances(m)
    vf, vr, ve = v["var_fixed"], v["var_random"], v["var_residual"]
    if _singular(m, tolerance):
        _warn_singular("r2()", tolerance)
        out = pd.Series({"marginal": vf / (vf + ve), "conditional": np.nan}, name="r2")
    else:
        total = vf + vr + ve
        out = pd.Series({"marginal": vf / total, "conditional": (vf + vr) / total}, name="r2")
    out.attrs["variances"] = v
    return out


def icc(m, tolerance: float = TOLERANCE) -> pd.Series:
    """Adjusted and conditional intraclass correlation of a fitted ``lmer`` model, as
    ``performance::icc``:

        adjusted = σ²_r / (σ²_r + σ²_ε),  conditional = σ²_r / (σ²_f + σ²_r + σ²_ε)

    with the components of :func:`variances` (also in ``.attrs["variances"]``).  With random
    slopes σ²_r is Johnson's (2014) average over the observations.  A singular fit (a
    relative random-effect SD below ``tolerance``) warns and gives NaN, as performance does."""
    v = variances(m)
    vf, vr, ve = v["var_fixed"], v["var_random"], v["var_residual"]
    if _singular(m, tolerance):
        _warn_singular("icc()", tolerance)
        out = pd.Series({"adjusted": np.nan, "conditional": np.nan}, name="icc")
    else:
        out = pd.Series({"adjusted": vr / (vr + ve), "conditional": vr / (vf + vr + ve)}, name="icc")
    out.attrs["variances"] = v
    return out


def _as_list(arg, name: str) -> list:
    if isinstance(arg, str):
        return [arg]
    try:
        out = list(arg)
    except TypeError:
        raise InputError(f"{name} must be a column name or a list of column names, got {arg!r}") from None
    if not out:
        raise InputError(f"{name} is empty: give at least one column name")
    return out


def center(data: pd.DataFrame, x, by, names=None) -> pd.DataFrame:
    """Within/between decomposition: a copy of ``data`` with, for every column in ``x``,

    * ``{name}_between`` = x̄_j, the mean of x in the row's group j of ``by`` (NaN ignored);
    * ``{name}_within`` = x − x̄_j, the deviation from it (NaN where x is NaN),

    so x = between + within and the within parts sum to zero in every group (Enders &
    Tofighi 2007; ``datawizard::demean``'s naming).  Rows with a missing ``by`` get NaN in both.

    Parameters
    ----------
    data : pandas DataFrame (not modified).
    x : a numeric column name or a list of them.
    by : the grouping column, or a list of columns (their combinations are the groups).
    names : output base names, one per ``x`` (a list, or a dict ``{x: name}``); default the
        column names themselves.
    """
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"center() needs a pandas DataFrame, got {type(data).__name__}")
    xs, bys = _as_list(x, "x"), _as_list(by, "by")
    for arg, cols in (("x", xs), ("by", bys)):
        missing = [c for c in cols if c not in data.columns]
        if missing:
            raise DataError(f"center(): {arg} column(s) {missing} not in data; available: {list(data.columns)}")
    if len(set(xs)) != len(xs):
        raise InputError(f"center(): x lists a column twice: {xs}")
    for c in xs:
        if c in bys:
            raise InputError(f"center(): column {c!r} is both x and by")
        col = data[c]
        if isinstance(col, pd.DataFrame):
            raise DataError(f"center(): data has duplicate columns named {c!r}")
        if is_bool_dtype(col.dtype) or not is_numeric_dtype(col.dtype):
            raise DataError(f"center(): column {c!r} is not numeric (dtype {col.dtype}); convert it with "
                            f"pd.to_numeric or .astype(float) (a factor has no within/between decomposition)")
    if names is None:
        base = list(xs)
    elif isinstance(names, dict):
        unknown = [k for k in names if k not in xs]
        if unknown:
            raise InputError(f"center(): names has keys {unknown} that are not in x {xs}")
        base = [str(names.get(c, c)) for c in xs]
    else:
        base = [str(nm) for nm in _as_list(names, "names")]
        if len(base) != len(xs):
            raise InputError(f"center(): names has {len(base)} entries for {len(xs)} x columns {xs}")
    new = [f"{b}_{part}" for b in base for part in ("between", "within")]
    clash = [c for c in new if c in data.columns]
    if clash or len(set(new)) != len(new):
        raise DataError(f"center(): output column(s) {clash or new} already exist or repeat; pass names= to "
                        "choose other base names")
    out = data.copy()
    grouped = data[xs].astype(float).groupby([data[b] for b in bys], observed=True, dropna=True, sort=False)
    means = grouped.transform("mean")            # NaN-ignoring; NaN for rows with a missing group
    for c, b in zip(xs, base):
        out[f"{b}_between"] = means[c].to_numpy()
        out[f"{b}_within"] = data[c].astype(float).to_numpy() - means[c].to_numpy()
    return out
