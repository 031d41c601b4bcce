"""One entry point for fitting a design's statistics: the fit stage of the pipeline.

    formula → design → covariance → likelihood → **engine** → inference → results

:func:`fit_stats` takes the cross-product statistics of a design (:mod:`lmmjax.design`) and
its :class:`~lmmjax.likelihood.Layout` and returns the optimum, the solution there and,
where the engine computed them, the Satterthwaite derivatives.  It picks the optimizer:

* the bucketed damped Newton (:mod:`lmmjax.bucketed`: exact gradient and Hessian, one
  compiled program per shape bucket) for dense statistics whose structures are templates
  and whose later terms hold at most :data:`lmmjax.bucketed.SMALL_QR_MAX` effects;
* the layout engine (:func:`lmmjax.optimize.minimize_theta`: L-BFGS compiled per layout,
  or the sparse Newton for big crossed factors) for the rest.

:func:`lmmjax.lmer` fits through it, and so do the parametric bootstrap's refits
(:mod:`lmmjax.confint`), so a bootstrap replicate is fitted exactly as the model was.
"""
from __future__ import annotations

import jax
import numpy as np

from . import _export, bucketed
from ._compute import precision, to_device
from .likelihood import Layout, solve
from .optimize import evaluate_theta, minimize_theta

__all__ = ["fit_stats"]


def fit_stats(stats: dict, layout: Layout, reml: bool, dtype="float64", *, theta0=None, theta=None,
              maxiter: int = 1000):
    """Fit (or, with ``theta``, evaluate at a fixed θ) the model whose statistics are ``stats``.

    Returns (OptimizeResult, sol, satt): ``sol`` as :func:`lmmjax.likelihood.solve` gives it
    (host arrays), ``satt`` = (∇²d over (θ, σ), ∂M/∂(θ, σ), M) at the returned θ from the
    bucketed engine in float64, else None (computed on demand by the result)."""
    with precision(dtype) as dt:
        if bucketed.eligible(stats, layout):
            if theta is None:
                o, s_, sa = bucketed.fit(stats, layout, reml, dt, theta0=theta0, maxiter=min(maxiter, 200))
            else:
                o, s_, sa = bucketed.at_theta(stats, layout, reml, dt, theta)
            return o, s_, (sa if dt == np.float64 else None)
        dev_stats = to_device(stats, dt)
        if theta is None:
            o = minimize_theta(dev_stats, layout, reml, theta0=theta0, maxiter=maxiter)
        else:
            o = evaluate_theta(dev_stats, layout, reml, theta)
        s_ = _export.call(solve, np.asarray(o.theta, dt), dev_stats, layout=layout, reml=reml)
        return o, jax.tree.map(np.asarray, s_), None
