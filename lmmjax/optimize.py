"""Minimize the profiled criterion over θ: one compiled program per design.

:func:`fit_program` is a single jit-compiled XLA program (no host round trips):

1. **L-BFGS** — optax's ``scale_by_lbfgs`` two-loop direction with a backtracking
   Armijo line search, inside ``lax.while_loop``, on the autodiff gradient, from
   lme4's start (θ = 1 on template diagonals, 0 elsewhere).  θ is unconstrained; the
   criterion only sees ``T Tᵀ``, so each template column is afterwards flipped to a
   non-negative diagonal (the canonical form).
2. **Hessian** by central differences of the exact gradient (2k points, ``lax.map``) — for the convergence report (lme4 checks convergence the same way) and
   the Newton polish.  It avoids compiling a second-order program.
3. **Boundary probes** — the criterion at inward steps and at exactly 0 for every
   diagonal entry.  At a zero diagonal the gradient vanishes by symmetry, so L-BFGS
   can stop there although moving inward lowers the criterion (the "θ = 0 trap",
   design notes sec. 7).  The host restarts from a better probe if there is one, and
   sets tiny diagonals to exactly 0 when that does not raise the criterion, so
   singular fits (Dyestuff2) report exact zeros like lme4.

The host then runs a few Newton steps on the free parameters (each one call of the
same program with ``maxiter = 0``) and writes the convergence report.  The program
is vmappable over the statistics, which is what the batch path builds on.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _export
from .likelihood import Layout, objective, sparse_value_grad_hess
from .start import moment_theta

__all__ = ["OptimizeResult", "minimize_theta", "evaluate_theta", "fit_program",
           "ConvergenceWarning", "SingularFitWarning", "is_singular"]


class ConvergenceWarning(UserWarning):
    """The optimizer did not reach a point that passes the convergence checks."""


class SingularFitWarning(UserWarning):
    """The fit is singular: a variance is zero or a correlation is ±1 (lme4's isSingular)."""


SINGULAR_TOL = 1e-4   # lme4::isSingular default
PROBE_STEPS = (1e-3, 1e-2, 1e-1, 1.0)
BOUNDARY_CHECK = 1e-3  # diagonal entries below this are probed


@dataclass
class OptimizeResult:
    theta: np.ndarray
    criterion: float
    iterations: int
    evaluations: int
    grad_norm: float          # max |gradient| over the free parameters
    hessian: np.ndarray       # Hessian of the criterion in θ (central differences of the gradient)
    hessian_pd: bool          # positive definite on the free parameters
    at_boundary: np.ndarray   # indices of θ fixed at 0
    converged: bool
    message: str


@lru_cache(maxsize=None)
def _direction():
    """optax's L-BFGS direction (imported on first use: a bucketed fit never needs it)."""
    import optax

    return optax.scale_by_lbfgs(memory_size=10)


def _lbfgs_loop(vg, theta0, maxiter, gtol):
    """L-BFGS with backtracking Armijo search; returns (θ, f, g, iterations, evaluations)."""
    v0, g0 = vg(theta0)
    init = (theta0, v0, g0, _direction().init(theta0), 0, 1, 0, jnp.max(jnp.abs(g0)) < gtol)

    def cond(c):
        return (~c[7]) & (c[4] < maxiter)

    def body(c):
        theta, v, g, state, it, nfev, stall, _ = c
        d, new_state = _direction().update(g, state, theta)
        slope = -jnp.vdot(d, g)
        bad = ~(slope < 0)
        d = jnp.where(bad, g / jnp.maximum(1.0, jnp.linalg.norm(g)), d)
        slope = -jnp.vdot(d, g)
        new_state = jax.tree.map(lambda a, b: jnp.where(bad, a, b), _direction().init(theta), new_state)

        def ls_cond(ls):
            return (~ls[4]) & (ls[3] < 40)

        def ls_body(ls):
            alpha, _, _, k, _ = ls
            t = theta - alpha * d
            vt, gt = vg(t)
            ok = jnp.isfinite(vt) & (vt <= v + 1e-4 * alpha * slope)
            nxt = jnp.where(ok, alpha, alpha * jnp.where(jnp.isfinite(vt), 0.5, 0.1))
            return nxt, vt, gt, k + 1, ok

        alpha, vt, gt, k, ok = jax.lax.while_loop(
            ls_cond, ls_body, (jnp.ones((), theta.dtype), v, g, 0, jnp.zeros((), bool)))
        t = jnp.where(ok, theta - alpha * d, theta)
        vn = jnp.where(ok, vt, v)
        gn = jnp.where(ok, gt, g)
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        small = (v - vn) <= 1e-14 * jnp.maximum(1.0, jnp.abs(vn))
        stall = jnp.where(small, stall + 1, 0)
        done = (~ok) | (stall >= 3) | (jnp.max(jnp.abs(gn)) < gtol)
        return t, vn, gn, state, it + 1, nfev + k, stall, done

    theta, v, g, _, it, nfev, _, _ = jax.lax.while_loop(cond, body, init)
    return theta, v, g, it, nfev


def _probe_points(theta, layout: Layout):
    """Points where the boundary is probed: for each template diagonal d, θ_d + step
    (inward steps) and θ_d = 0.  Shape (n_boundary · (len(steps)+1), k)."""
    b = layout.boundary()
    pts = []
    for d in b:
        for s in PROBE_STEPS:
            pts.append(theta.at[d].add(s))
        pts.append(theta.at[d].set(0.0))
    return jnp.stack(pts) if pts else jnp.zeros((0, theta.shape[0]), theta.dtype)


@partial(jax.jit, static_argnames=("layout", "reml"))
def fit_program(theta0, stats, maxiter, gtol, layout: Layout, reml: bool):
    """One compiled fit: L-BFGS from ``theta0`` (``maxiter = 0`` just evaluates), then the
    central-difference Hessian and the boundary probes at the end point."""
    def vg(th):
        return jax.value_and_grad(objective)(th, stats, layout, reml)

    theta, v, g, it, nfev = _lbfgs_loop(vg, theta0, maxiter, gtol)
    k = theta.shape[0]
    h = 1e-5 * jnp.maximum(1.0, jnp.abs(theta))
    E = jnp.eye(k, dtype=theta.dtype) * h[None, :]
    # lax.map, not vmap: batched LAPACK custom calls inside this program hung
    # XLA-CPU sporadically (jaxlib 0.10.2); the points are few and the calls cheap.
    grads = jax.lax.map(lambda t: vg(t)[1], jnp.concatenate([theta + E, theta - E]))
    H = (grads[:k] - grads[k:]).T / (2 * h[None, :])
    H = 0.5 * (H + H.T)
    probes = jax.lax.map(lambda t: objective(t, stats, layout, reml), _probe_points(theta, layout))
    return dict(theta=theta, f=v, g=g, H=H, probes=probes, iterations=it, evaluations=nfev)


def _run(theta0, stats, layout, reml, maxiter, gtol):
    dtype = stats["XX"].dtype
    out = _export.call(fit_program, jax.device_put(np.asarray(theta0, dtype)), stats, maxiter, gtol,
                       layout=layout, reml=reml)
    out = jax.device_get(out)
    res = {k: np.asarray(out[k], float) for k in ("theta", "g", "H", "probes")}
    res.update(f=float(out["f"]), iterations=int(out["iterations"]), evaluations=int(out["evaluations"]))
    return res


_objective = jax.jit(objective, static_argnames=("layout", "reml"))

#: the start grid of the sparse Newton: multiples of the default θ
SPARSE_START = (1.0, 0.5, 0.25, 0.125)


def _pd_relative(H, theta) -> bool:
    """Positive definiteness of the Hessian on the free parameters, judged per *relative*
    change of θ (H scaled by max(|θᵢ|, 1) on both sides): the criterion's curvature in a
    θ of 10⁶ (a residual SD 10⁻⁶ of the random effects') is ~10⁻¹², and an absolute
    threshold called that optimum indefinite."""
    if H.size == 0:
        return True
    d = np.maximum(np.abs(np.asarray(theta, float)), 1.0)
    Hs = H * d[:, None] * d[None, :]
    return bool(np.all(np.linalg.eigvalsh(Hs) > 1e-10 * max(1.0, np.abs(Hs).max())))


def _newton_step(g, H):
    """Newton step with the Hessian's eigenvalues replaced by their absolute values
    (floored), so a non-convex region still gives a descent direction."""
    w, U = np.linalg.eigh(H)
    pd = bool(np.all(w > 0))
    w = np.maximum(np.abs(w), 1e-8 * max(1.0, np.abs(w).max()))
    return -U @ ((U.T @ g) / w), pd


def _host_newton(crit_, vgh_, layout: Layout, theta, free, maxiter: int):
    """The damped Newton iterations on the host from θ with the parameters outside ``free``
    held fixed: (θ, f, g, H, iterations).  ``crit_``/``vgh_`` count their own calls."""
    f, g, H = vgh_(theta, free)
    it = 0
    while it < maxiter:
        it += 1
        step, pd = _newton_step(g, H)
        dec = -float(g @ step)
        if dec < 1e-13 * max(1.0, abs(f)):
            # converged (PD), or stationary where H is not PD: the probes decide.  At a PD
            # Hessian one more full step costs one evaluation and squares the gradient
            # (Newton's quadratic convergence); it is taken when f stays within round-off.
            if pd and np.max(np.abs(g)) > 1e-9:
                t = layout.canonical(theta + step)
                ft, gt, Ht = vgh_(t, free)
                if np.isfinite(ft) and ft <= f + 1e-13 * max(1.0, abs(f)) and np.max(np.abs(gt)) < np.max(np.abs(g)):
                    theta, f, g, H = t, ft, gt, Ht
                else:
                    f, g, H = vgh_(theta, free)    # the payload belongs to θ
            break
        # the full step is tried with the gradient and Hessian (usually accepted: the
        # evaluation is reused); shorter steps with the criterion alone
        t = layout.canonical(theta + step)   # same criterion; the final θ needs no re-evaluation
        ft, gt, Ht = vgh_(t, free)
        if np.isfinite(ft) and ft <= f - 1e-4 * dec:
            theta, f, g, H = t, ft, gt, Ht
            continue
        alpha, accepted = 0.5, False
        for _ in range(30):
            t = theta + alpha * step
            ft = crit_(t)
            if np.isfinite(ft) and ft <= f - 1e-4 * alpha * dec:
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        theta = layout.canonical(t)
        f, g, H = vgh_(theta, free)
    theta_final = layout.canonical(theta)
    if not np.array_equal(theta_final, theta):
        theta = theta_final
        f, g, H = vgh_(theta, free)
    return theta, f, g, H, it


def newton_minimize(crit, vgh, layout: Layout, theta0=None, maxiter: int = 100,
                    start_scales=SPARSE_START, label: str = "Newton", batched: bool = False,
                    inner=None, extra_start=None):
    """Damped Newton with an exact gradient and Hessian, for programs where one
    evaluation of both is cheap relative to many L-BFGS steps: the sparse path (big
    crossed factors, where lme4 needs 74 evaluations for InstEval) and the bucketed
    engine of small designs (:mod:`lmmjax.bucketed`).

    ``crit(θ) -> f``; ``vgh(θ) -> (f, g, H, payload)`` (payload: whatever the caller
    wants back from the evaluation at the final θ; unused, may be None, with ``inner``).  Start at the best of
    ``start_scales`` × the default θ, backtrack on the criterion, stop on the Newton
    decrement gᵀH⁻¹g < 1e-13 · max(1, |f|) at a positive-definite Hessian (Newton
    converges quadratically: the step before is ~1e-6); then probe the boundary for
    diagonals near zero and snap them to exactly 0 when that does not raise the
    criterion (as lme4 reports singular fits).  ``batched``: ``crit`` also takes a 2-D
    array of points (one dispatch for the start grid and the probes).

    ``inner(θ or None, free, maxiter) -> (θ, f, g, H, payload, iterations, n_vgh, n_crit)``
    replaces the host iterations (:func:`_host_newton`) by a compiled loop (``None``:
    start from the grid); the boundary probes and the report stay here.  ``extra_start``:
    one more grid point (:func:`lmmjax.start.moment_theta`).
    Returns (OptimizeResult, payload)."""
    n_crit = n_vgh = 0

    def crit_(t):
        nonlocal n_crit
        n_crit += 1
        return float(crit(np.asarray(t, float)))

    def crit_rows(ts):
        nonlocal n_crit
        if not batched:
            return [crit_(t) for t in ts]
        n_crit += len(ts)
        return list(np.asarray(crit(np.asarray(ts, float)), float))

    def vgh_(t, free):
        nonlocal n_vgh, payload
        n_vgh += 1
        f, g, H, payload = vgh(np.asarray(t, float))
        g, H = np.array(g, float), np.array(H, float)
        g[~free] = 0.0
        H[~free] = 0.0
        H[:, ~free] = 0.0
        H[~free, ~free] = 1.0
        return float(f), g, H

    def run(theta, free, left):
        nonlocal n_crit, n_vgh, payload
        if inner is not None:
            theta, f, g, H, payload, it_, nv, nc = inner(theta, free, left)
            n_vgh += nv
            n_crit += nc
            return np.asarray(theta, float), float(f), np.asarray(g, float), np.asarray(H, float), it_
        if theta is None:
            base = layout.init_theta()
            cands = [c * base for c in start_scales] + ([np.asarray(extra_start, float)] if extra_start is not None else [])
            theta = cands[int(np.nanargmin(crit_rows(cands)))]
        return _host_newton(crit_, vgh_, layout, np.asarray(theta, float), free, left)

    payload = None
    theta = None if theta0 is None else np.asarray(theta0, float)
    bidx = layout.boundary()
    free = np.ones(layout.n_theta, bool)
    it = 0
    for _round in range(6):
        theta, f, g, H, it_ = run(theta, free, maxiter - it)
        it += it_
        # boundary: a diagonal near zero is snapped to 0 if that does not raise the criterion;
        # if an inward step lowers it instead, restart from there
        # (inward probes first: at θ_d = 0 the gradient vanishes by symmetry, and a start
        # there must not be mistaken for a boundary optimum)
        restart = False
        for d in bidx:
            if free[d] and abs(theta[d]) < BOUNDARY_CHECK:
                z = theta.copy()
                z[d] = 0.0
                *probes, fz = crit_rows([np.where(np.arange(theta.size) == d, theta[d] + s_, theta)
                                         for s_ in PROBE_STEPS] + [z])
                j = int(np.argmin(probes))
                if probes[j] < f - 1e-8 * max(1.0, abs(f)):
                    theta = theta.copy()
                    theta[d] += PROBE_STEPS[j]
                    restart = True
                    break
                if fz <= f + 1e-12 * max(1.0, abs(f)):
                    theta, free[d] = z, False
                    restart = True
        if not restart or it >= maxiter:
            break
    if restart:     # out of rounds or iterations: report at the last point
        theta, f, g, H, _ = run(theta, free, 0)
    gmax, hpd, ok, msg = convergence_report(f, g, H, theta, free)
    res = OptimizeResult(
        theta=layout.canonical(theta), criterion=f, iterations=it, evaluations=n_crit + n_vgh,
        grad_norm=gmax, hessian=H, hessian_pd=hpd, at_boundary=np.flatnonzero(~free), converged=ok,
        message=msg or f"converged ({label}: {n_vgh} gradient+Hessian and {n_crit} criterion evaluations)",
    )
    return res, payload


#: converged when the Newton decrement gᵀH⁻¹g (twice the criterion's predicted further fall)
#: is below this times max(1, |criterion|): a scale-free test, where a fixed bound on |g|
#: called fits at the optimum unconverged (|g| ~ 1 for θ of 10⁻³ scale) — issue 11
DECREMENT_TOL = 1e-6


def convergence_report(f, g, H, theta, free) -> tuple[float, bool, bool, str]:
    """(max|g|, H PD, converged, message) on the free parameters: converged when the
    Hessian is positive definite (per relative change of θ, :func:`_pd_relative`) and
    the Newton decrement is below ``DECREMENT_TOL`` · max(1, |f|); the message says by
    how much the criterion may still fall."""
    free = np.asarray(free, bool)
    g = np.where(free, np.asarray(g, float), 0.0)
    H = np.where(free[:, None] & free[None, :], np.asarray(H, float), 0.0) + np.diag((~free).astype(float))
    gmax = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    hpd = _pd_relative(H[np.ix_(free, free)], np.asarray(theta, float)[free])
    step, _ = _newton_step(g, H)
    dec = -float(g @ step)
    small = dec < DECREMENT_TOL * max(1.0, abs(f))
    msgs = []
    if not small:
        msgs.append(f"Newton decrement {dec:.3g}: the criterion may still fall by about {dec / 2:.3g}")
    if not hpd:
        msgs.append("Hessian of the criterion is not positive definite on the free parameters")
    return gmax, hpd, hpd and small, "; ".join(msgs)


def minimize_sparse(stats, layout: Layout, reml: bool, theta0=None, maxiter: int = 100) -> OptimizeResult:
    """:func:`newton_minimize` on the sparse path's criterion and
    :func:`~lmmjax.likelihood.sparse_value_grad_hess` (exact gradient and Hessian), from
    ``theta0`` or the best of its start grid and the moment estimate
    (:func:`lmmjax.start.moment_theta`)."""
    dtype = stats["XX"].dtype
    extra_start = moment_theta(stats, layout) if theta0 is None else None

    # through the exported programs (:mod:`lmmjax._export`): a fresh process skips their
    # tracing and lowering (InstEval's first fit: ~0.9 s of ~3 s)
    def crit(t):
        return _export.call(_objective, np.asarray(t, dtype), stats, layout=layout, reml=reml)

    def vgh(t):
        f, g, H = jax.device_get(_export.call(sparse_value_grad_hess, np.asarray(t, dtype), stats,
                                              layout=layout, reml=reml))
        return f, g, H, None

    return newton_minimize(crit, vgh, layout, theta0, maxiter, SPARSE_START, "sparse Newton",
                           extra_start=extra_start)[0]


def minimize_theta(stats, layout: Layout, reml: bool, theta0=None, maxiter: int = 1000,
                   gtol: float = 1e-6) -> OptimizeResult:
    """Minimize the profiled REML/ML criterion; see the module docstring."""
    theta = layout.init_theta() if theta0 is None else np.asarray(theta0, float)
    if theta.shape != (layout.n_theta,):
        raise ValueError(f"start must have {layout.n_theta} entries (lme4's θ order), got shape {theta.shape}")
    if "tr_j" in stats and layout.q_rest:
        return minimize_sparse(stats, layout, reml, theta0, maxiter=min(maxiter, 100))
    bidx = layout.boundary()
    nprobe = len(PROBE_STEPS) + 1
    iters = evals = 0

    def run(th, mi):
        nonlocal iters, evals
        r = _run(th, stats, layout, reml, mi, gtol)
        iters += r["iterations"]
        evals += r["evaluations"] + 2 * th.size + r["probes"].size  # + Hessian, probes
        return r

    r = run(theta, maxiter)
    # -- boundary: escape the θ = 0 trap (restart from a better inward probe)
    for _ in range(5):
        theta = r["theta"]
        probes = r["probes"].reshape(len(bidx), nprobe) if len(bidx) else np.zeros((0, nprobe))
        best, start = r["f"], None
        for i, d in enumerate(bidx):
            if abs(theta[d]) < BOUNDARY_CHECK:
                j = int(np.argmin(probes[i, :-1]))
                if probes[i, j] < best - 1e-8 * max(1.0, abs(r["f"])):
                    best, start = probes[i, j], theta.copy()
                    start[d] = theta[d] + PROBE_STEPS[j]
        if start is None:
            break
        r = run(start, maxiter)
    # -- canonical signs, then exact zeros where they do not raise the criterion
    theta = layout.canonical(r["theta"])
    zero = np.zeros(theta.size, bool)
    fval = r["f"]
    snapped = theta.copy()
    probes = r["probes"].reshape(len(bidx), nprobe) if len(bidx) else np.zeros((0, nprobe))
    for i, d in enumerate(bidx):
        if theta[d] < BOUNDARY_CHECK and probes[i, -1] <= fval + 1e-12 * max(1.0, abs(fval)):
            snapped[d] = 0.0
            zero[d] = True
    if zero.any() or not np.array_equal(theta, r["theta"]):
        r = run(snapped, 0)
    theta = snapped
    # -- Newton polish on the free parameters
    free = ~zero
    for _ in range(10):
        g, H = r["g"], r["H"]
        gf = g[free]
        if gf.size == 0 or np.max(np.abs(gf)) < 1e-9:
            break
        Hf = H[np.ix_(free, free)]
        try:
            np.linalg.cholesky(Hf)
        except np.linalg.LinAlgError:
            break
        t = theta.copy()
        t[free] -= np.linalg.solve(Hf, gf)
        rn = run(t, 0)
        if rn["f"] <= r["f"] + 1e-12 * max(1.0, abs(r["f"])) and np.max(np.abs(rn["g"][free])) < np.max(np.abs(gf)):
            theta, r = t, rn
        else:
            break
    theta = layout.canonical(theta)
    g, H = r["g"], r["H"]
    gmax, hpd, ok, msg = convergence_report(r["f"], g, H, theta, free)
    return OptimizeResult(
        theta=theta, criterion=r["f"], iterations=iters, evaluations=evals, grad_norm=gmax,
        hessian=H, hessian_pd=hpd, at_boundary=np.flatnonzero(zero), converged=ok,
        message=msg or "converged",
    )


def evaluate_theta(stats, layout: Layout, reml: bool, theta) -> OptimizeResult:
    """An :class:`OptimizeResult` for a user-fixed θ (no optimization)."""
    theta = np.asarray(theta, float)
    if theta.shape != (layout.n_theta,):
        raise ValueError(f"theta must have {layout.n_theta} entries (lme4's order), got shape {theta.shape}")
    theta = layout.canonical(theta)
    r = _run(theta, stats, layout, reml, 0, 0.0)
    return OptimizeResult(
        theta=theta, criterion=r["f"], iterations=0, evaluations=1,
        grad_norm=float(np.max(np.abs(r["g"]))) if theta.size else 0.0, hessian=r["H"],
        hessian_pd=bool(np.all(np.linalg.eigvalsh(r["H"]) > 0)), at_boundary=np.array([], int),
        converged=True, message="theta fixed by the caller",
    )


def is_singular(theta: np.ndarray, layout: Layout, tol: float = SINGULAR_TOL) -> bool:
    """lme4's ``isSingular``: a diagonal entry of some template below ``tol``."""
    b = layout.boundary()
    return bool(np.any(np.asarray(theta)[b] < tol))
