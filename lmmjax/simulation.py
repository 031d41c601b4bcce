r"""Power by simulation: draw responses from a model, refit them all as one batch.

Like R's simr (Green & MacLeod 2016, *Methods Ecol. Evol.* 7:493): power is the share of
simulated data sets in which the test rejects at ``alpha``, with an exact (Clopper-Pearson)
binomial confidence interval for that share.  The difference is the refit: every simulated
response is fitted by :func:`lmmjax.lmer_batch` (one compiled program per chunk of
responses, Satterthwaite or Kenward-Roger df per response), so 1,000 refits cost about what
a few single fits cost.

The model comes either from a fit (``power(m, ...)``: its design, θ̂, σ̂ and β̂, with
``fixef=`` overriding coefficients — e.g. the smallest effect of interest) or from a design
and parameters (``power(formula, data, fixef=..., covariance=..., sigma=...)``: the data hold
only the covariates), and responses are drawn as y = Xβ + Σₖ Zₖbₖ + ε with bₖ ~ N(0, Σₖ) per
level and ε ~ N(0, σ²).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .design import DataError, build_design
from .formula import InputError

__all__ = ["power", "PowerResult", "simulate_design"]


@dataclasses.dataclass
class PowerResult:
    """Estimated power of a test, with its simulation confidence interval.

    ``pvalues``/``estimates``: per simulated data set (NaN where the refit failed, counted as
    not rejecting, as simr counts errors); ``fits``: the :class:`~lmmjax.BatchResult`."""
    test: str
    power: float
    lower: float
    upper: float
    level: float
    nsim: int
    alpha: float
    n_failed: int
    pvalues: np.ndarray
    estimates: np.ndarray
    fits: object = dataclasses.field(repr=False, default=None)

    def __repr__(self) -> str:
        failed = f"; {self.n_failed} refits failed (counted as not rejecting)" if self.n_failed else ""
        return (f"Power for {self.test!r} at alpha = {self.alpha:g} ({self.level:.0%} confidence interval):\n"
                f"  {100 * self.power:.2f}% ({100 * self.lower:.2f}, {100 * self.upper:.2f})\n"
                f"Based on {self.nsim} simulations{failed}.")


def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    from scipy.stats import beta

    a = 1 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def _covariance_matrix(value, blk) -> np.ndarray:
    S = np.atleast_2d(np.asarray(value, float))
    if S.shape == (1, 1) and blk.q > 1:
        raise DataError(f"covariance for {blk.group!r} must be a {blk.q} × {blk.q} matrix (columns "
                        f"{list(blk.colnames)}), got one number")
    if S.shape != (blk.q, blk.q) or not np.allclose(S, S.T) or np.linalg.eigvalsh(S).min() < -1e-10 * max(1.0, np.abs(S).max()):
        raise DataError(f"covariance for {blk.group!r} must be a symmetric positive semi-definite {blk.q} × {blk.q} "
                        f"matrix of variances/covariances (columns {list(blk.colnames)}), got {S.tolist()}")
    return S


def simulate_design(design, beta, covariances, sigma: float, nsim: int, rng) -> np.ndarray:
    """(n, nsim) responses y = Xβ + Σₖ Zₖbₖ + ε, bₖ ~ N(0, Σₖ) per level, ε ~ N(0, σ²)."""
    Y = np.repeat((design.X @ beta + (0.0 if design.offset is None else design.offset))[:, None], nsim, axis=1)
    for blk, S in zip(design.blocks, covariances):
        w, U = np.linalg.eigh(S)
        root = U * np.sqrt(np.clip(w, 0.0, None))
        b = rng.standard_normal((nsim, blk.n_levels, blk.q)) @ root.T      # (nsim, levels, q)
        Y += np.einsum("nq,snq->ns", blk.Zq, b[:, blk.index, :])
    return Y + sigma * rng.standard_normal(Y.shape)


def _from_parameters(formula: str, data: pd.DataFrame, fixef, covariance, sigma):
    if not isinstance(formula, str) or "~" not in formula:
        raise InputError(f"formula must be a model formula such as '~ x + (1 | g)', got {formula!r}")
    rhs = formula.split("~", 1)[1]
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame of the covariates, got {type(data).__name__}")
    frame = data.assign(_lmmjax_sim_y=0.0)
    design = build_design("_lmmjax_sim_y ~" + rhs, frame)
    if fixef is None or sigma is None or covariance is None:
        raise InputError("power(formula, data, ...) needs fixef= (every coefficient), covariance= (per grouping "
                         "factor) and sigma= (residual SD)")
    beta = _fixef_vector(fixef, design.xnames, {})
    cov = dict(covariance)
    unknown = set(cov) - {b.group for b in design.blocks}
    if unknown:
        raise DataError(f"covariance names grouping factor(s) {sorted(unknown)} that are not random terms "
                        f"({[b.group for b in design.blocks]})")
    missing = [b.group for b in design.blocks if b.group not in cov]
    if missing:
        raise DataError(f"covariance= lacks the random term(s) on {missing}: give each term's variance "
                        "(q = 1) or covariance matrix, in the term's column order")
    covs = [_covariance_matrix(cov[b.group], b) for b in design.blocks]
    if not (np.isfinite(sigma) and sigma > 0):
        raise DataError(f"sigma must be a positive residual SD, got {sigma!r}")
    return rhs, frame, design, beta, covs, float(sigma)


def _fixef_vector(fixef, names, base: dict) -> np.ndarray:
    values = dict(base)
    if fixef is not None:
        fixef = {("(Intercept)" if k == "Intercept" and "(Intercept)" in names else k): v for k, v in fixef.items()}
        unknown = set(fixef) - set(names)
        if unknown:
            raise DataError(f"fixef names {sorted(unknown)} are not coefficients of the model: {list(names)}")
        values.update(fixef)
    missing = [n for n in names if n not in values]
    if missing:
        raise DataError(f"fixef= lacks coefficient(s) {missing}; give every coefficient of {list(names)}")
    return np.array([float(values[n]) for n in names])


def power(model, data: pd.DataFrame | None = None, *, test: str, fixef: dict | None = None,
          covariance: dict | None = None, sigma: float | None = None, nsim: int = 1000,
          alpha: float = 0.05, seed=None, ddf: str = "satterthwaite", level: float = 0.95,
          reml: bool = True, progress: bool = False) -> PowerResult:
    """Power of the t test of one coefficient (``test``: its name, or a one-coefficient term)
    by simulation.

    ``model``: a fitted :class:`~lmmjax.LmerResult` (simulate from it; ``fixef=`` overrides
    some coefficients, e.g. ``{"Days": 5}``), or a formula (``"~ time + (1 + time | id)"``,
    a response on the left is ignored) with ``data`` holding the covariates, ``fixef`` (every
    coefficient), ``covariance`` ({grouping factor: variance or q × q covariance matrix of the
    term's columns}) and ``sigma`` (residual SD).  Each of ``nsim`` data sets is refitted (REML
    by default) in one :func:`lmmjax.lmer_batch` run; the p-value uses ``ddf``
    ("satterthwaite", "kenward-roger", ...).  Returns a :class:`PowerResult`."""
    from .batch import lmer_batch
    from .results import LmerResult

    if not (isinstance(nsim, (int, np.integer)) and nsim >= 1):
        raise InputError(f"nsim must be a positive integer, got {nsim!r}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    rng = np.random.default_rng(seed)
    if isinstance(model, LmerResult):
        if model.design.weights is not None:
            raise InputError("power() from a weighted fit is not supported; give the design and parameters instead")
        design = model.design
        base = dict(zip(design.xnames, model.fixef.to_numpy()))
        beta = _fixef_vector(fixef, design.xnames, base)
        covs = [model._term_covariance(b) for b in design.blocks]
        sig = model.sigma if sigma is None else float(sigma)
        rhs = model.formula.split("~", 1)[1]
        frame = model.data if data is None else data
        if len(frame) != design.n_data:
            raise DataError(f"data= has {len(frame)} rows; the model was fitted to {design.n_data}")
        frame = frame.iloc[design.rows]        # the rows the fit used (missing values dropped)
    else:
        rhs, frame, design, beta, covs, sig = _from_parameters(model, data, fixef, covariance, sigma)
    Y = simulate_design(design, beta, covs, sig, nsim, rng)
    fits = lmer_batch("~" + rhs, frame, Y, reml=reml, progress=progress)
    table = fits.coef_table(test, ddf=ddf)
    p = table["p"].to_numpy(float)
    failed = ~np.isfinite(p)
    k = int(np.sum(p[~failed] < alpha))
    lo, hi = _clopper_pearson(k, nsim, level)
    return PowerResult(test=test, power=k / nsim, lower=lo, upper=hi, level=level, nsim=nsim, alpha=alpha,
                       n_failed=int(failed.sum()), pvalues=p, estimates=table["estimate"].to_numpy(float), fits=fits)
