"""Minimize the profiled criterion over θ: L-BFGS, boundary checks, Newton polish.

1. **L-BFGS** (optax's ``scale_by_lbfgs`` direction, backtracking Armijo line
   search on the host) on the jit-compiled value and autodiff gradient, from lme4's start (θ = 1 on template diagonals, 0 elsewhere).
   θ is unconstrained; the criterion only sees ``T Tᵀ``, so afterwards each
   template column is flipped to a non-negative diagonal (the canonical form).
2. **Boundary.** At a zero diagonal entry the gradient vanishes by symmetry, so
   L-BFGS can stop there (or next to it) although moving inward lowers the
   criterion — the "θ = 0 trap" (design notes, sec. 7).  For every diagonal
   entry below ``1e-3`` we (a) try inward steps and restart L-BFGS if one is
   better, and (b) set it to exactly 0 when that does not raise the
   criterion, so singular fits (Dyestuff2) report exact zeros like lme4.
3. **Newton polish** on the free parameters with a Hessian from central
   differences of the exact gradient, which also tells whether the Hessian is
   positive definite (lme4 checks convergence the same way).  Only one program
   is compiled per design (value and gradient), which keeps cold starts short.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .likelihood import Layout, objective

__all__ = ["OptimizeResult", "minimize_theta", "ConvergenceWarning", "SingularFitWarning"]


class ConvergenceWarning(UserWarning):
    """The optimizer did not reach a point that passes the convergence checks."""


class SingularFitWarning(UserWarning):
    """The fit is singular: a variance is zero or a correlation is ±1 (lme4's isSingular)."""


SINGULAR_TOL = 1e-4  # lme4::isSingular default


@dataclass
class OptimizeResult:
    theta: np.ndarray
    criterion: float
    iterations: int
    evaluations: int
    grad_norm: float          # max |gradient| over the free parameters
    hessian: np.ndarray       # exact Hessian of the criterion in θ
    hessian_pd: bool          # positive definite on the free parameters
    at_boundary: np.ndarray   # indices of θ fixed at 0
    converged: bool
    message: str


_DIRECTION = optax.scale_by_lbfgs(memory_size=10)


@jax.jit
def _lbfgs_init(theta):
    return _DIRECTION.init(theta)


@jax.jit
def _lbfgs_direction(grad, state, theta):
    """optax's two-loop recursion: the preconditioned gradient H⁻¹g (descend along −d)."""
    return _DIRECTION.update(grad, state, theta)


@partial(jax.jit, static_argnames=("layout", "reml"))
def value_and_grad(theta, stats, layout: Layout, reml: bool):
    return jax.value_and_grad(objective)(theta, stats, layout, reml)


@partial(jax.jit, static_argnames=("layout", "reml"))
def hessian(theta, stats, layout: Layout, reml: bool):
    """Exact autodiff Hessian of the criterion in θ (compiled on first use)."""
    return jax.hessian(objective)(theta, stats, layout, reml)


def fd_hessian(grad_fn, theta: np.ndarray) -> np.ndarray:
    """Central differences of the exact gradient (used for the convergence check,
    like lme4's derivative check; it avoids compiling a second-order program)."""
    k = theta.size
    H = np.empty((k, k))
    for j in range(k):
        h = 1e-5 * max(1.0, abs(theta[j]))
        e = np.zeros(k)
        e[j] = h
        H[:, j] = (grad_fn(theta + e) - grad_fn(theta - e)) / (2 * h)
    return 0.5 * (H + H.T)


def _lbfgs(f, theta, maxiter, gtol):
    """L-BFGS (optax's direction) with a backtracking Armijo line search on the host.

    ``f(theta) -> (value, grad)`` is the jit-compiled criterion. Returns (theta, iterations).
    """
    theta = np.asarray(theta, float)
    v, g = f(theta)
    dt = np.float64 if jax.config.jax_enable_x64 else np.float32
    state = _lbfgs_init(jax.device_put(theta.astype(dt)))
    stall = 0
    it = 0
    for it in range(1, maxiter + 1):
        if np.max(np.abs(g)) < gtol:
            break
        d, new_state = _lbfgs_direction(jax.device_put(g.astype(dt)), state, jax.device_put(theta.astype(dt)))
        d = np.asarray(d)
        slope = -float(d @ g)
        if not np.isfinite(slope) or slope >= 0:  # lost curvature information: restart
            new_state = _lbfgs_init(jax.device_put(theta.astype(dt)))
            d = g / max(1.0, np.linalg.norm(g))
            slope = -float(d @ g)
        alpha, accepted = 1.0, False
        for _ in range(40):
            t = theta - alpha * d
            vt, gt = f(t)
            if np.isfinite(vt) and vt <= v + 1e-4 * alpha * slope:
                accepted = True
                break
            alpha *= 0.5 if np.isfinite(vt) else 0.1
        if not accepted:
            break
        state = new_state
        decrease = v - vt
        theta, v, g = t, vt, gt
        stall = stall + 1 if decrease <= 1e-14 * max(1.0, abs(v)) else 0
        if stall >= 3:
            break
    return theta, it


def minimize_theta(stats, layout: Layout, reml: bool, theta0=None, maxiter: int = 1000,
                   gtol: float = 1e-6) -> OptimizeResult:
    """Minimize the profiled REML/ML criterion; see the module docstring."""
    theta = layout.init_theta() if theta0 is None else np.asarray(theta0, float)
    if theta.shape != (layout.n_theta,):
        raise ValueError(f"start must have {layout.n_theta} entries (lme4's θ order), got shape {theta.shape}")
    dtype = stats["XX"].dtype
    bidx = layout.boundary()
    nfev = 0

    def f(th):
        nonlocal nfev
        nfev += 1
        v, g = value_and_grad(jax.device_put(np.asarray(th, dtype)), stats, layout, reml)
        return float(v), np.asarray(g, float)

    theta, iters = _lbfgs(f, theta, maxiter, gtol)
    theta = layout.canonical(theta)
    fval, _ = f(theta)
    # -- boundary: escape the θ = 0 trap, then snap tiny diagonals to exactly 0
    for _ in range(5):
        best = (fval, None)
        for d in bidx:
            if theta[d] < 1e-3:
                for step in (1e-3, 1e-2, 1e-1, 1.0):
                    t = theta.copy()
                    t[d] = theta[d] + step
                    v, _ = f(t)
                    if v < best[0] - 1e-8 * max(1.0, abs(fval)):
                        best = (v, t)
        if best[1] is None:
            break
        theta, more = _lbfgs(f, best[1], maxiter, gtol)
        iters += more
        theta = layout.canonical(theta)
        fval, _ = f(theta)
    zero = np.zeros(theta.size, bool)
    for d in bidx:
        if theta[d] < 1e-3:
            t = theta.copy()
            t[d] = 0.0
            v, _ = f(t)
            if v <= fval + 1e-12 * max(1.0, abs(fval)):
                theta, fval, zero[d] = t, v, True
    # -- Newton polish on the free parameters
    free = ~zero

    def grad(th):
        return f(th)[1]

    H = fd_hessian(grad, theta)
    fval, g = f(theta)
    for _ in range(20):
        gf = g[free]
        if gf.size == 0 or np.max(np.abs(gf)) < 1e-9:
            break
        Hf = H[np.ix_(free, free)]
        try:
            np.linalg.cholesky(Hf)
            step = np.linalg.solve(Hf, gf)
        except np.linalg.LinAlgError:
            break
        accepted = False
        for scale in (1.0, 0.5, 0.25, 0.1):
            t = theta.copy()
            t[free] -= scale * step
            v, gn = f(t)
            if v <= fval + 1e-12 * max(1.0, abs(fval)) and np.max(np.abs(gn[free])) < np.max(np.abs(gf)):
                theta, fval, g, accepted = t, v, gn, True
                break
        if not accepted:
            break
        H = fd_hessian(grad, theta)
    theta = layout.canonical(theta)
    gmax = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    Hf = H[np.ix_(free, free)]
    hpd = bool(Hf.size == 0 or np.all(np.linalg.eigvalsh(Hf) > 1e-10 * max(1.0, np.abs(Hf).max())))
    gok = gmax < max(gtol, 1e-4) * 10
    msgs = []
    if not gok:
        msgs.append(f"max|grad| = {gmax:.3g} on the free parameters (tolerance {max(gtol, 1e-4) * 10:g})")
    if not hpd:
        msgs.append("Hessian of the criterion is not positive definite on the free parameters")
    return OptimizeResult(
        theta=theta, criterion=fval, iterations=iters, evaluations=nfev, grad_norm=gmax,
        hessian=H, hessian_pd=hpd, at_boundary=np.flatnonzero(zero), converged=gok and hpd,
        message="; ".join(msgs) or "converged",
    )


def evaluate_theta(stats, layout: Layout, reml: bool, theta) -> OptimizeResult:
    """An :class:`OptimizeResult` for a user-fixed θ (no optimization)."""
    theta = np.asarray(theta, float)
    if theta.shape != (layout.n_theta,):
        raise ValueError(f"theta must have {layout.n_theta} entries (lme4's order), got shape {theta.shape}")
    theta = layout.canonical(theta)
    dtype = stats["XX"].dtype

    def vg(t):
        return value_and_grad(jax.device_put(np.asarray(t, dtype)), stats, layout, reml)

    v, g = vg(theta)
    H = fd_hessian(lambda t: np.asarray(vg(t)[1], float), theta)
    return OptimizeResult(
        theta=theta, criterion=float(v), iterations=0, evaluations=1,
        grad_norm=float(np.max(np.abs(np.asarray(g)))) if theta.size else 0.0, hessian=H,
        hessian_pd=bool(np.all(np.linalg.eigvalsh(H) > 0)), at_boundary=np.array([], int),
        converged=True, message="theta fixed by the caller",
    )


def is_singular(theta: np.ndarray, layout: Layout, tol: float = SINGULAR_TOL) -> bool:
    """lme4's ``isSingular``: a diagonal entry of some template below ``tol``."""
    b = layout.boundary()
    return bool(np.any(np.asarray(theta)[b] < tol))
