"""One model, many responses: ``lmmjax.lmer_batch``.

Responses that share X and Z share the design cross-products (ZᵀZ, ZᵀX, XᵀX,
computed once); each response adds only Zᵀy, Xᵀy, yᵀy — one matrix product over
the n × G response matrix, read once, chunk by chunk.  A response with missing
values (NaN) gets its own cross-products over its observed rows (mask-weighted
sums, one sparse product for all such responses: :func:`~lmmjax.design.masked_design_stats`)
and runs through the same compiled program with the design statistics mapped too.
After that, every per-response computation costs nothing in n.

The fit is a **damped Newton** on θ for a whole chunk at once, written on (B, k)
arrays: only the pure per-response evaluations are vmapped, never the loop.  One
evaluation per iteration — exact forward-mode derivatives of a(θ) = log|L_Z|²
(+ log|R_X|²) and r²(θ) at θ and θ ± hᵢeᵢ — gives the criterion, its gradient and
Hessian, β̂, Var(β̂) and the Satterthwaite derivatives, so the last iteration's
evaluation is the result.  Each iteration tries a ladder of step lengths in parallel
(the shorter ones only when some response needs them; a step that does not lower
the criterion is not taken); a Hessian that is not positive definite is shifted
(Levenberg–Marquardt); a step moves θ by at most 0.9.  The iterations stop when every
response of the chunk has converged, stalled or got stuck (at most 100).  The start is
the best of a few multiples of the default θ; the θ = 0 trap is handled as in the
single fit: the criterion is probed at inward points and at exactly 0 for every
diagonal entry and the Newton iterations continue from the best point, then tiny
diagonals are snapped to exactly 0.  Kenward-Roger pieces come on demand from a
second program, in closed form (:func:`_kr_linear`).

Chunks are sized to a memory budget, dispatched round-robin to every local device
(GPUs, or CPU devices), or handed to a Dask cluster; one bad response (infinite
values, a rank-deficient design on its observed rows, too few observations) gets an
error message in ``res.errors`` and NaN results, never the others' results.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._compute import precision
from ._linalg import UNROLL_MAX, chol_small, spd_solve, tril_inv_small
from .design import DataError, build_design, design_stats, masked_design_stats
from .inference import (_satt_df_rows, contrast_matrix, dense_crossproducts,
                        kr_adjusted, kr_test, normalize_ddf, p_adjust, satterthwaite_test, t_columns,
                        vcov_varpar)
from .likelihood import Layout, criterion, factorize, objective
from .optimize import DECREMENT_TOL, PROBE_STEPS, SINGULAR_TOL, _probe_points
from .responses import ResponseMatrix, _is_anndata, from_anndata

__all__ = ["lmer_batch", "BatchResult"]

STEP_LADDER = tuple(2.0 ** -np.array([0, 1, 2, 3, 5, 8, 11]))
START_SCALES = tuple(4.0 ** np.arange(-5, 2))
MAX_STEP = 0.9
STALL_RUN = 4
DEFAULT_MAX_CHUNK = 4096


# ---------------------------------------------------------------- compiled programs
def _central(fn, x, h):
    """``fn(x)`` and, for every output, its central-difference derivatives along each x_i
    (appended as a last axis), from ONE vmapped evaluation of ``fn`` at x and x ± h_i·e_i.

    Used for the fit's second derivatives (Newton Hessians, the Satterthwaite Hessian
    and ∂M) on top of exact forward-mode first derivatives: nested autodiff through the
    blocked Cholesky made the program take 2–3× longer to compile, while the
    differences are accurate to ~1e-10 relative.  Steps: ``h``."""
    k = x.shape[0]
    E = jnp.eye(k, dtype=x.dtype) * h[None, :]
    outs = jax.vmap(fn)(jnp.concatenate([x[None, :], x + E, x - E]))

    def deriv(o):
        d = (o[1: k + 1] - o[k + 1:]) / (2.0 * h.reshape((k,) + (1,) * (o.ndim - 1)))
        return jnp.moveaxis(d, 0, -1)

    return jax.tree.map(lambda o: o[0], outs), jax.tree.map(deriv, outs)


def _step(x):
    """Relative central-difference step for x's dtype: ε^(1/3) balances truncation and
    round-off (6e-6 in float64; 5e-3 in float32, where 1e-5 would leave ~1e-2 noise)."""
    return float(np.finfo(x.dtype).eps) ** (1.0 / 3.0)


def _sym(H):
    return 0.5 * (H + jnp.swapaxes(H, -1, -2))


class _Lanes:
    """The per-response functions of one design, vmapped over responses ("lanes").

    Everything here is written for a whole chunk at once: θ is (B, k).  Only these pure
    functions are vmapped; the Newton loop around them runs on batched arrays, so no
    control flow is traced through ``vmap`` (tracing batched while loops cost most of
    the program's trace time)."""

    def __init__(self, dstats, rstats, layout: Layout, reml: bool, mapped: bool):
        self.layout, self.reml = layout, reml
        self.d, self.r, self.dax = dstats, rstats, (0 if mapped else None)
        self.n, self.p = dstats["n"], dstats["XX"].shape[-1]   # n: scalar, or (B,) when mapped

    def _crit1(self, t, d, r):
        return objective(t, {**d, **r}, self.layout, self.reml)

    def crit(self, th):
        """The profiled criterion at θ (B, ..., k) -> (B, ...)."""
        f = self._crit1
        for _ in range(th.ndim - 2):
            f = jax.vmap(f, in_axes=(0, None, None))
        return jax.vmap(f, in_axes=(0, self.dax, 0))(th, self.d, self.r)

    def _first1(self, t, d, r):
        """For one response at θ: J = ∂(a, r²)/∂θ (forward mode), and as auxiliary output
        (a, r²), M = XᵀV⁻¹X·σ², β̂ and R_X⁻¹ — a = log|L_Z|² (+ log|R_X|² for REML)."""
        st = {**d, **r}

        def ar(t_):
            f = factorize(t_, st, self.layout)
            a = f["logdet_z"] + f["logdet_x"] if self.reml else f["logdet_z"]
            val = jnp.stack([a, f["r2"]])
            return val, (val, f["Mxx"], f["RXi"], f["z"])

        return jax.jacfwd(ar, has_aux=True)(t)

    def evaluate(self, th):
        """Everything the fit needs at θ (B, k), from ONE vmapped evaluation of exact
        first derivatives of a(θ) and r²(θ) at θ and θ ± h_i e_i (:func:`_central`):

            profiled criterion  c = a + ν(1 + log(2π r²/ν)),  ν = n − p (REML) or n
            ∇c  = ∇a + ν ∇r²/r²,   ∇²c = ∇²a + ν(∇²r²/r² − ∇r²∇r²ᵀ/r⁴)

        and, at σ̂² = r²/ν, the unprofiled d(θ, σ) = a + r²/σ² + ν log(2πσ²) that
        lmerTest's Satterthwaite df differentiate:

            ∂²d/∂θ² = ∇²a + ∇²r²/σ²,  ∂²d/∂θ∂σ = −2∇r²/σ³,  ∂²d/∂σ² = 4ν/σ²

        with M(θ) and ∂M/∂θ (σ does not enter M)."""
        h = _step(th) * jnp.maximum(1.0, jnp.abs(th))

        def one(t, hh, d, r):
            return _central(lambda x: self._first1(x, d, r), t, hh)

        (J, (val, M, RXi, z)), (dJ, (_, dM, _, _)) = jax.vmap(one, in_axes=(0, 0, self.dax, 0))(
            th, h, self.d, self.r)
        n = jnp.broadcast_to(jnp.asarray(self.n, th.dtype), val.shape[:1])
        nu = n - self.p if self.reml else n
        a, r2 = val[:, 0], val[:, 1]
        ga, gr = J[:, 0], J[:, 1]
        Ha, Hr = _sym(dJ[:, 0]), _sym(dJ[:, 1])
        crit = criterion(dict(logdet_z=a, logdet_x=0.0, r2=r2), n, self.p, self.reml)   # a holds log|R_X|²
        grad = ga + (nu / r2)[:, None] * gr
        hess = Ha + (nu / r2)[:, None, None] * Hr - (nu / r2**2)[:, None, None] * gr[:, :, None] * gr[:, None, :]
        s2 = r2 / nu
        s = jnp.sqrt(s2)
        k = th.shape[1]
        H = jnp.zeros((th.shape[0], k + 1, k + 1), th.dtype)
        H = H.at[:, :k, :k].set(Ha + Hr / s2[:, None, None])
        H = H.at[:, :k, k].set(-2.0 * gr / (s2 * s)[:, None]).at[:, k, :k].set(-2.0 * gr / (s2 * s)[:, None])
        H = H.at[:, k, k].set(4.0 * nu / s2)
        dM = jnp.concatenate([dM, jnp.zeros(dM.shape[:-1] + (1,), dM.dtype)], axis=-1)
        beta = jnp.einsum("gba,gb->ga", RXi, z)
        vcov = s2[:, None, None] * jnp.einsum("gca,gcb->gab", RXi, RXi)
        return dict(theta=th, criterion=crit, grad=grad, hess=hess, beta=beta, sigma2=s2, vcov=vcov,
                    satt_H=H, satt_dM=dM, satt_M=M)

    def empty(self, th):
        """Zeros shaped like :meth:`evaluate`'s output (a loop's initial carry)."""
        B, k = th.shape
        p = self.p
        shapes = dict(theta=(B, k), criterion=(B,), grad=(B, k), hess=(B, k, k), beta=(B, p), sigma2=(B,),
                      vcov=(B, p, p), satt_H=(B, k + 1, k + 1), satt_dM=(B, p, p, k + 1), satt_M=(B, p, p))
        return {key_: jnp.zeros(s, th.dtype) for key_, s in shapes.items()}


def _levenberg_direction(g, H):
    """Newton direction H⁻¹g for a batch (B, k), with H shifted to H + λI where it is not
    positive definite (Levenberg–Marquardt).  PD is read off an unrolled Cholesky (no
    LAPACK under vmap); λ is the smallest shift found by bisection between 0 and
    Gershgorin's (often loose) bound, times 1.5 — a loose shift crawls along flat ridges.
    Returns the direction and whether H itself was positive definite."""
    k = g.shape[-1]
    eye = jnp.eye(k, dtype=g.dtype)
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(H), axis=(-2, -1)))

    def is_pd(lam):
        c = chol_small(H + lam[:, None, None] * eye)
        return jnp.all(jnp.isfinite(c), axis=(-2, -1)) & jnp.all(
            jnp.diagonal(c, axis1=-2, axis2=-1) > 1e-6 * jnp.sqrt(scale)[:, None], axis=-1)

    pd_ = is_pd(jnp.zeros_like(scale))
    dg = jnp.diagonal(H, axis1=-2, axis2=-1)
    gersh = jnp.min(dg - (jnp.sum(jnp.abs(H), axis=-1) - jnp.abs(dg)), axis=-1)
    hi0 = jnp.maximum(0.0, -gersh) + 1e-3 * scale

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = is_pd(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    # the bisection runs only when some response needs a shift (a branch on the whole
    # batch, not per response: near the optimum every Hessian is PD and it is skipped)
    hi = jax.lax.cond(jnp.all(pd_), lambda h: h,
                      lambda h: jax.lax.fori_loop(0, 24, bisect, (jnp.zeros_like(h), h))[1], hi0)
    shift = jnp.where(pd_, 0.0, 1.5 * hi + 1e-6 * scale)
    Li = tril_inv_small(chol_small(H + shift[:, None, None] * eye))
    return jnp.einsum("gba,gb->ga", Li, jnp.einsum("gab,gb->ga", Li, g)), pd_


def _newton(lanes: _Lanes, th, free, iters, ev, settled):
    """Damped Newton on the parameters where ``free`` (B, k), for the responses not yet
    ``settled`` (their evaluation ``ev`` is kept); returns (θ, evaluation, iterations per
    response, settled).

    Each iteration evaluates :meth:`_Lanes.evaluate` at θ; a response whose free gradient
    is below round-off with a positive definite Hessian is done there (so the last
    evaluation is the result: no extra pass).  Otherwise a ladder of step lengths is
    tried in parallel and the best decrease taken (no line-search loop, so responses do
    not wait for each other within an iteration); near the optimum the full Newton step
    is taken when nothing rises beyond round-off (the single fit's Newton polish); a
    response with no acceptable step is done (settled), and so is one that has stalled
    (done, not settled: the next phase goes on with it).  The loop stops when every
    response is done, or after ``iters`` iterations."""
    ladder = jnp.asarray(STEP_LADDER, th.dtype)
    tiny = jnp.finfo(th.dtype).eps
    k = th.shape[1]
    fixed_eye = jnp.where(free, 0.0, 1.0)[:, :, None] * jnp.eye(k, dtype=th.dtype)
    both = free[:, :, None] & free[:, None, :]

    def step(carry):
        th, ev_old, it, n_it, done, settled, run = carry
        ev = lanes.evaluate(th)
        ev = jax.tree.map(lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), b, a), ev, ev_old)
        v = ev["criterion"]
        g = jnp.where(free, ev["grad"], 0.0)
        H = jnp.where(both, ev["hess"], 0.0) + fixed_eye
        d, pd_ = _levenberg_direction(g, H)
        rel = jnp.maximum(1.0, jnp.abs(v))
        converged = pd_ & (jnp.max(jnp.abs(g), axis=-1) < 1e5 * tiny * rel)
        # θ moves at most 0.9 per iteration — not 1: from the start grid's round values a
        # clipped step of exactly 1 lands a template diagonal on exactly 0, a saddle point
        # where its gradient vanishes and Newton can never leave it
        d = d / jnp.maximum(1.0, jnp.max(jnp.abs(d), axis=-1) / MAX_STEP)[:, None]
        cand = th[:, None, :] - ladder[None, :, None] * d[:, None, :]
        # the full step first; the shorter ones only when some response still needs them
        # (again one branch for the batch: late iterations take full steps everywhere)
        v1 = lanes.crit(cand[:, :1])
        v1 = jnp.where(jnp.isfinite(v1), v1, jnp.inf)
        # (a full step within round-off of v at a PD Hessian is taken as it is, below)
        need = ~done & ~converged & ~(v1[:, 0] < v) & ~(pd_ & (v1[:, 0] <= v + 1e4 * tiny * rel))
        vals = jax.lax.cond(jnp.any(need), lambda: jnp.concatenate([v1, lanes.crit(cand[:, 1:])], axis=1),
                            lambda: jnp.concatenate([v1, jnp.full(cand.shape[:2], jnp.inf, v1.dtype)[:, 1:]], axis=1))
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        j = jnp.argmin(vals, axis=-1)
        best = jnp.take_along_axis(vals, j[:, None], axis=-1)[:, 0]
        # near the optimum a full step cannot lower the criterion in floating point:
        # take it anyway when H is PD and it rises by no more than round-off
        full_ok = pd_ & (vals[:, 0] <= v + 1e4 * tiny * rel) & ~(best < v - 1e6 * tiny * rel)
        new = jnp.where((best < v)[:, None], jnp.take_along_axis(cand, j[:, None, None], axis=1)[:, 0], th)
        new = jnp.where(full_ok[:, None], cand[:, 0], new)
        stuck = jnp.all(new == th, axis=-1)
        # stalled: STALL_RUN iterations in a row that lowered the criterion by less than
        # 1e-11 of it without converging — a flat valley (e.g. a singular template whose
        # remaining entries can rotate freely).  It stops here unsettled: the probes and
        # the snap of the next phase decide it, and the next phase goes on with it.
        v_new = jnp.where(full_ok, vals[:, 0], jnp.minimum(best, v))
        run = jnp.where(v - v_new < 1e-11 * rel, run + 1, 0)
        stalled = run >= STALL_RUN
        settled = jnp.where(done, settled, converged | stuck)
        now_done = done | converged | stuck | stalled
        new = jnp.where(now_done[:, None], th, new)
        return new, ev, it + 1, n_it + (~done).astype(jnp.int32), now_done, settled, run

    zeros = jnp.zeros(th.shape[:1], jnp.int32)
    init = (th, ev, jnp.zeros((), jnp.int32), zeros, settled, settled, zeros)
    th, ev, _, n_it, _, settled, _ = jax.lax.while_loop(lambda c: (c[2] < iters) & ~jnp.all(c[4]), step, init)
    return th, ev, n_it, settled


def _canonical(theta, layout: Layout):
    """θ (B, k) with non-negative template diagonals (T Tᵀ does not see column signs)."""
    out, off = [], 0
    for s in layout.structures:
        t = theta[:, off: off + s.n_params]
        rows, cols = (np.array(a, int) for a in zip(*s.positions))
        T = jnp.zeros((t.shape[0], s.q, s.q), t.dtype).at[:, rows, cols].set(t)
        sign = jnp.where(jnp.diagonal(T, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(t.dtype)
        out.append((T * sign[:, None, :])[:, rows, cols])
        off += s.n_params
    return jnp.concatenate(out, axis=-1)


@partial(jax.jit, static_argnames=("layout", "reml", "design_mapped", "iters", "satterthwaite"))
def batch_fit_program(theta0, dstats, rstats, layout: Layout, reml: bool, design_mapped: bool = False,
                      iters: int = 100, satterthwaite: bool = True):
    """Fit every response (leading axis of ``rstats``, and of ``dstats`` when
    ``design_mapped``): θ, criterion, gradient, Hessian, β̂, σ², Var(β̂), the
    Satterthwaite derivatives and the Newton iterations of each.

    Three phases through one traced loop, each a transition and Newton iterations: the
    best of a few multiples of the default θ, Newton (``iters``); boundary probes (inward
    points and exact zeros of every template diagonal, continue from the best), Newton
    (8); snap (tiny diagonals become exactly 0 where that does not raise the criterion, as
    in the single fit), Newton (8) with the snapped ones fixed."""
    lanes = _Lanes(dstats, rstats, layout, reml, design_mapped)
    B = rstats["yy"].shape[0]
    tiny = jnp.finfo(theta0.dtype).eps
    bidx = layout.boundary()
    nb = len(bidx)
    n_cand = max(len(START_SCALES), 1 + len(PROBE_STEPS) * nb + nb)

    def padded(c, th):
        return jnp.concatenate([c, jnp.repeat(th[:, None, :], n_cand - c.shape[1], axis=1)], axis=1)

    def candidates(p, th):
        """(B, n_cand, k) points whose criterion decides the phase's starting point:
        p = 0, multiples of the default θ; p = 1, θ and the boundary probes (inward steps
        and exact zeros of every template diagonal); p = 2, θ and θ with one diagonal 0."""
        grid = jnp.asarray(START_SCALES, th.dtype)[None, :, None] * theta0[None, None, :]
        grid = padded(jnp.broadcast_to(grid, (B,) + grid.shape[1:]), th)
        probes = padded(jnp.concatenate([th[:, None, :], jax.vmap(lambda t: _probe_points(t, layout))(th)], 1), th)
        zeros = padded(jnp.concatenate([th[:, None, :]] + [th.at[:, d].set(0.0)[:, None, :] for d in bidx], 1), th)
        return jnp.select([p == 0, p == 1], [grid, probes], zeros)

    def phase(p, carry):
        th, free, ev, n_it, settled = carry
        # one criterion call site for all three transitions (each copy of the criterion
        # costs ~0.15 s of compile time)
        cand = candidates(p, th)
        vals = lanes.crit(cand)
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        best = jnp.take_along_axis(cand, jnp.argmin(vals, axis=-1)[:, None, None], axis=1)[:, 0]
        # snap (as the single fit): each diagonal below 1e-3 whose zero does not raise the
        # criterion becomes exactly 0 and stays fixed in the last phase
        tol = 1e4 * tiny * jnp.maximum(1.0, jnp.abs(vals[:, 0]))
        ok = (jnp.abs(th[:, bidx]) < 1e-3) & (vals[:, 1: 1 + nb] <= (vals[:, 0] + tol)[:, None])
        snapped = th.at[:, bidx].set(jnp.where(ok, 0.0, th[:, bidx]))
        th_new = jnp.where(p == 2, snapped, best)
        free = jnp.where(p == 2, free.at[:, bidx].set(~ok), free)
        # a response the transition moved is fitted on; the others keep their result
        settled = settled & jnp.all(th_new == th, axis=-1)
        th, ev, n, settled = _newton(lanes, th_new, free, jnp.where(p == 0, iters, 8), ev, settled)
        return th, free, ev, n_it + n, settled

    th0 = jnp.broadcast_to(theta0, (B,) + theta0.shape)
    _, _, ev, n_it, _ = jax.lax.fori_loop(0, 3, phase, (th0, jnp.ones(th0.shape, bool), lanes.empty(th0),
                                                       jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)))
    # the last evaluation (phase 3, at its final θ) is the result; θ canonical (T Tᵀ is
    # blind to column signs, and so is every evaluated quantity)
    ev = dict(ev, theta=_canonical(ev["theta"], layout), iterations=n_it)
    if not satterthwaite:
        for key_ in ("satt_H", "satt_dM", "satt_M"):
            ev.pop(key_)
    return ev


def _basis_matrices(layout: Layout) -> np.ndarray:
    """E_i = ∂(I_ℓ ⊗ Σ_k)/∂φ_i placed in Λ's q × q layout, one per random-effect natural
    parameter φ_i (Σ_k is linear in φ for the structures lmer_batch fits): (m, q, q)."""
    q_tot = sum(l * s.q for s, l in zip(layout.structures, layout.n_levels))
    out, start = [], 0
    with jax.ensure_compile_time_eval():
        for s, l in zip(layout.structures, layout.n_levels):
            for i in range(s.n_natural):
                e = np.zeros(s.n_natural)
                e[i] = 1.0
                Ei = np.asarray(s.cov_from_natural(jnp.asarray(e)), float)
                full = np.zeros((q_tot, q_tot))
                full[start: start + l * s.q, start: start + l * s.q] = np.kron(np.eye(l), Ei)
                out.append(full)
            start += l * s.q
    return np.stack(out)


def _spd_inverse(A, blocks=None):
    """A⁻¹ for one small SPD matrix without LAPACK (vmapped over thousands of responses):
    block by block when A is block diagonal with ``blocks = (ℓ, b)`` blocks of size
    b ≤ 6, else :func:`~lmmjax._linalg.spd_solve`."""
    q = A.shape[-1]
    if q > UNROLL_MAX and blocks is not None and blocks[1] <= UNROLL_MAX:
        ell, bsz = blocks
        idx = np.arange(ell)
        Ab = A.reshape(ell, bsz, ell, bsz)[idx, :, idx, :]                  # (ℓ, b, b)
        Li = tril_inv_small(chol_small(Ab))
        inv = jnp.einsum("jba,jbc->jac", Li, Li)
        out = jnp.zeros((ell, bsz, ell, bsz), A.dtype).at[idx, :, idx, :].set(inv)
        return out.reshape(q, q)
    return spd_solve(A, jnp.eye(q, dtype=A.dtype))[0]


def _kr_linear(theta, sigma, dense, E, layout: Layout):
    r"""Kenward-Roger pieces for one response whose V is linear in pbkrtest's natural
    parameters φ = (entries of each Σ_k, σ²), in closed form — no autodiff, no
    differences.  V = Σ_i φ_i G_i with G_i = Z E_i Zᵀ and G_σ² = I.

    With Λ from θ, A = ΛᵀZᵀZΛ + I and N = ΛA⁻¹Λᵀ, σ²V⁻¹ = I − ZNZᵀ (Woodbury), so every
    product of V⁻¹ with Z and X reduces to q × q and q × p algebra on the cross-products:
    σ²ZᵀV⁻¹Z = ZᵀZ − ZᵀZNZᵀZ, σ²ZᵀV⁻¹X = ZᵀX − ZᵀZNZᵀX, σ²XᵀV⁻¹X = XᵀX − XᵀZNZᵀX,
    σ²V⁻¹X = X − ZNZᵀX (its Gram matrix and Z-products give XᵀV⁻²X, ZᵀV⁻²X, XᵀV⁻³X).
    Then, with U = ZᵀV⁻¹X, Ω = ZᵀV⁻¹Z, Φ = M⁻¹ and Π = V⁻¹ − V⁻¹XΦXᵀV⁻¹
    (Kenward & Roger 1997; Halekoh & Højsgaard 2014, pbkrtest):

        M    = XᵀV⁻¹X                       P_i = −UᵀE_iU,        P_σ = −XᵀV⁻²X
        Q_ij = UᵀE_iΩE_jU,  Q_iσ = UᵀE_iZᵀV⁻²X,  Q_σσ = XᵀV⁻³X,  ∂²M/∂φ_i∂φ_j = Q_ij + Q_ji
        I_E  = ½tr(ΠG_iΠG_j):  ½tr(E_iΨE_jΨ) with Ψ = ZᵀΠZ;  ½tr(E_iZᵀΠ²Z);  ½tr(Π²)

    Returns (M, P (p, p, k), ∂²M (p, p, k, k), I_E (k, k)) as :func:`kr_adjusted` takes them."""
    ZtZ, ZtX, XX, n = dense["ZtZ"], dense["ZtX"], dense["XX"], dense["n"]
    q = ZtZ.shape[0]
    s2 = sigma * sigma
    Lam = jsl.block_diag(*[jnp.kron(jnp.eye(l, dtype=theta.dtype), T)
                           for T, l in zip(layout.factors(theta), layout.n_levels)])
    A = Lam.T @ ZtZ @ Lam + jnp.eye(q, dtype=theta.dtype)
    single = len(layout.structures) == 1
    N = Lam @ _spd_inverse(A, (layout.n_levels[0], layout.q[0]) if single else None) @ Lam.T
    ZN = ZtZ @ N                                   # ZᵀZ N
    I_ZN = jnp.eye(q, dtype=theta.dtype) - ZN
    Rz = ZtZ - ZN @ ZtZ                            # σ² ZᵀV⁻¹Z
    Ux = ZtX - ZN @ ZtX                            # σ² ZᵀV⁻¹X
    Mx = XX - ZtX.T @ N @ ZtX                      # σ² XᵀV⁻¹X
    X2 = Mx - ZtX.T @ N @ Ux                       # σ⁴ XᵀV⁻²X
    X3 = X2 - Ux.T @ N @ Ux                        # σ⁶ XᵀV⁻³X
    M = Mx / s2
    Phi = _spd_inverse(M)
    U, Om = Ux / s2, Rz / s2
    ZW2Z, ZW2X = I_ZN @ Rz / s2**2, I_ZN @ Ux / s2**2
    XW2X, XW3X = X2 / s2**2, X3 / s2**3
    trW2 = (n - 2.0 * jnp.trace(ZN) + jnp.sum(ZN * ZN.T)) / s2**2

    EU = jnp.einsum("iab,bp->iap", E, U)                                   # (m, q, p)
    P_re = -jnp.einsum("aq,iap->iqp", U, EU)
    P = jnp.concatenate([P_re, -XW2X[None]])                               # (k, p, p)
    Q_re = jnp.einsum("iap,ab,jbr->ijpr", EU, Om, EU)
    Q_rs = jnp.einsum("iap,ar->ipr", EU, ZW2X)                             # Q_iσ
    m = E.shape[0]
    Q = jnp.zeros((m + 1, m + 1) + M.shape, M.dtype)
    Q = Q.at[:m, :m].set(Q_re).at[:m, m].set(Q_rs).at[m, :m].set(jnp.swapaxes(Q_rs, -1, -2)).at[m, m].set(XW3X)
    HM = Q + jnp.swapaxes(Q, 0, 1)
    UPhi = U @ Phi
    Psi = Om - UPhi @ U.T                                                  # ZᵀΠZ
    Pi2 = (ZW2Z - ZW2X @ UPhi.T - UPhi @ ZW2X.T + UPhi @ XW2X @ UPhi.T)   # ZᵀΠ²Z
    EPsi = jnp.einsum("iab,bc->iac", E, Psi)
    IE_re = 0.5 * jnp.einsum("iab,jba->ij", EPsi, EPsi)
    IE_rs = 0.5 * jnp.einsum("iab,ba->i", E, Pi2)
    PhiX2 = Phi @ XW2X
    IE_ss = 0.5 * (trW2 - 2.0 * jnp.trace(Phi @ XW3X) + jnp.sum(PhiX2 * PhiX2.T))
    IE = jnp.zeros((m + 1, m + 1), M.dtype)
    IE = IE.at[:m, :m].set(IE_re).at[:m, m].set(IE_rs).at[m, :m].set(IE_rs).at[m, m].set(IE_ss)
    return M, jnp.moveaxis(P, 0, -1), jnp.moveaxis(HM, (0, 1), (-2, -1)), IE


@partial(jax.jit, static_argnames=("layout", "design_mapped", "batch_size"))
def batch_kr_program(theta, sigma, dense, layout: Layout, design_mapped: bool = False, batch_size=None):
    """Kenward-Roger pieces (M, ∂M, ∂²M, expected information) for every response,
    in pbkrtest's natural parameters φ (entries of each Σ_k, then σ²): :func:`_kr_linear`
    mapped over responses, ``batch_size`` at a time (vmapped within a batch; memory: a few
    q × q matrices per response)."""
    E = jnp.asarray(_basis_matrices(layout), theta.dtype)
    if design_mapped:
        return jax.lax.map(lambda a: _kr_linear(a[0], a[1], a[2], E, layout), (theta, sigma, dense),
                           batch_size=batch_size)
    return jax.lax.map(lambda a: _kr_linear(a[0], a[1], dense, E, layout), (theta, sigma), batch_size=batch_size)


# ---------------------------------------------------------------- chunks
@dataclass
class _Chunk:
    """Responses fitted together: their positions, and the statistics they need."""

    idx: np.ndarray        # positions in the response list
    dstats: dict           # design cross-products (leading axis when ``mapped``)
    rstats: dict           # response cross-products (leading axis)
    mapped: bool           # per-response design statistics (responses with missing values)

    def padded(self, size: int):
        """Statistics padded to ``size`` responses by repeating the last one (static shapes)."""
        pad = size - len(self.idx)

        def grow(a):
            a = np.asarray(a)
            return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a

        d = {k: grow(v) for k, v in self.dstats.items()} if self.mapped else self.dstats
        return d, {k: grow(v) for k, v in self.rstats.items()}


def _pad_sizes(chunks) -> dict:
    """Chunks of a kind (shared or per-response design statistics) are padded to the
    kind's largest, so that they share one compiled program: {mapped: size}."""
    out = {}
    for ch in chunks:
        out[ch.mapped] = max(out.get(ch.mapped, 0), len(ch.idx))
    return out


def _take(stats: dict, rows) -> dict:
    return {k: np.asarray(v)[rows] for k, v in stats.items()}


def _parse_memory(x) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(x).lower())
    if not m:
        raise ValueError(f"max_memory must be bytes or a string like '2GB', got {x!r}")
    unit = m.group(2).rstrip("b").rstrip("i")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit]


def _bytes_per_response(design, mapped: bool) -> float:
    """Rough working set of one response in the fit program (float64)."""
    lay = design.layout
    l1, q1, p, qr = lay.n_levels[0], lay.q[0], design.p, lay.q_rest
    k = lay.n_theta
    per = l1 * q1 * (q1 + p + 2) + qr * (l1 * q1 + qr + p + 1) + p * p + k * k
    work = 8.0 * per * (len(STEP_LADDER) + 4) * (2 * k + 2)
    return work + (8.0 * per if mapped else 0.0)


def _even_chunks(idx: np.ndarray, size: int) -> list[np.ndarray]:
    """Split ``idx`` into the fewest chunks of at most ``size``, of (nearly) equal length."""
    if len(idx) == 0:
        return []
    n_chunks = -(-len(idx) // size)
    return np.array_split(idx, n_chunks)


def _fit_chunk_arrays(theta0, dstats, rstats, layout, reml, mapped, dtype, device=None):
    """Dispatch one chunk's program (asynchronously) on ``device``."""
    put = (lambda a: jax.device_put(np.asarray(a, dtype), device))  # noqa: E731
    d = {k: put(v) for k, v in dstats.items()}
    r = {k: put(v) for k, v in rstats.items()}
    return batch_fit_program(put(theta0), d, r, layout=layout, reml=reml, design_mapped=mapped)


def _fit_chunk_task(theta0, dstats, rstats, layout, reml, mapped, dtype):
    """A whole chunk fit, run where it is called (a Dask worker): numpy in, numpy out."""
    with precision(dtype) as dt:
        out = jax.device_get(_fit_chunk_arrays(theta0, dstats, rstats, layout, reml, mapped, dt))
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- results
def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values over the responses (NaN kept as NaN)."""
    return p_adjust(np.asarray(p, float), "BH")


def _theta_names(design) -> list[str]:
    """lme4's ``theta_names``: ``<group>.<coef>`` / ``<group>.<coef2>.<coef1>``."""
    return [f"{b.group}.{n}" for b in design.blocks for n in b.structure.param_names(b.colnames)]


class BatchResult:
    """Per-response results of :func:`lmer_batch` (Series/DataFrames indexed by response).

    Attributes: ``fixef``, ``theta`` (DataFrames), ``sigma``, ``loglik``, ``nobs``,
    ``converged``, ``is_singular``, ``status``, ``errors``, ``iterations`` (Newton iterations; Series); ``vcov`` (G × p × p array);
    methods ``coef_table``, ``test``, ``anova``, ``varcorr``, ``to_anndata`` and
    ``res[name]`` for the full single-model result of one response.
    """

    def __init__(self, design, responses: ResponseMatrix, data, formula, reml, dtype, chunks, fit, errors):
        self.design, self.reml, self.dtype = design, reml, dtype
        self.names = list(responses.names)
        self._responses, self._data, self._formula, self._chunks = responses, data, formula, chunks
        idx = pd.Index(self.names, name="response")
        theta = fit["theta"]
        self.theta = pd.DataFrame(theta, index=idx, columns=_theta_names(design))
        self.sigma = pd.Series(np.sqrt(fit["sigma2"]), index=idx, name="sigma")
        self.loglik = pd.Series(-0.5 * fit["criterion"], index=idx, name="loglik")
        self.fixef = pd.DataFrame(fit["beta"], index=idx, columns=design.xnames)
        self.nobs = pd.Series(fit["nobs"], index=idx, name="nobs")
        self.iterations = pd.Series(fit["iterations"], index=idx, name="iterations")
        self.vcov = fit["vcov"]
        self.errors = pd.Series(errors, index=idx, name="error", dtype=object)
        ok = self.errors.isna().to_numpy()
        b = design.layout.boundary()
        self.is_singular = pd.Series(ok & np.any(np.nan_to_num(theta[:, b], nan=1.0) < SINGULAR_TOL, axis=1),
                                     index=idx, name="singular")
        self.converged = pd.Series(ok & self._converged(theta, fit["grad"], fit["hess"], fit["criterion"]), index=idx,
                                   name="converged")
        #: per response: "ok", "singular" (converged to a boundary fit), "not converged", or
        #: "failed" (not fitted; ``errors`` says why)
        self.status = pd.Series(np.where(~ok, "failed", np.where(~self.converged, "not converged",
                                                                 np.where(self.is_singular, "singular", "ok"))),
                                index=idx, name="status")
        self._fit = fit
        self._satt = None
        self._kr = None

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        n_err = int(self.errors.notna().sum())
        return (f"<BatchResult: {len(self)} responses of {self._formula!r} ({'REML' if self.reml else 'ML'}); "
                f"{int(self.converged.sum())} converged, {int(self.is_singular.sum())} singular, {n_err} failed>")

    def _converged(self, theta, grad, hess, crit):
        """:func:`lmmjax.optimize.convergence_report` per response, vectorized: the
        Hessian positive definite on the free parameters (per relative change of θ) and
        the Newton decrement gᵀH⁻¹g below ``DECREMENT_TOL`` · max(1, |criterion|)."""
        b = self.design.layout.boundary()
        free = np.ones_like(theta, bool)
        free[:, b] = theta[:, b] > 0
        finite = np.isfinite(crit) & np.all(np.isfinite(grad), axis=1) & np.all(np.isfinite(hess), axis=(1, 2))
        k = theta.shape[1]
        g = np.where(free, np.nan_to_num(grad), 0.0)
        Hf = np.where(free[:, :, None] & free[:, None, :], np.nan_to_num(hess), 0.0)
        Hf = Hf + np.where(free, 0.0, 1.0)[:, :, None] * np.eye(k)
        d = np.where(free, np.maximum(np.abs(np.nan_to_num(theta)), 1.0), 1.0)
        Hs = Hf * d[:, :, None] * d[:, None, :]          # H in relative changes of θ
        w, U = np.linalg.eigh(Hs)
        scale = np.maximum(1.0, np.max(np.abs(Hs), axis=(1, 2)))
        pd_ = np.all(w > 1e-10 * scale[:, None], axis=1)
        wa = np.maximum(np.abs(w), 1e-8 * np.maximum(1.0, np.max(np.abs(w), axis=1, keepdims=True)))
        dec = np.sum(np.einsum("gij,gi->gj", U, g * d) ** 2 / wa, axis=1)
        return finite & pd_ & (dec < DECREMENT_TOL * np.maximum(1.0, np.abs(np.nan_to_num(crit))))

    # ------------------------------------------------------------ inference pieces
    def _satterthwaite(self):
        """(C, J, A) for every response: Var(β̂), its Jacobian in (θ, σ), Var(θ̂, σ̂)."""
        if self._satt is None:
            f = self._fit
            sig = np.sqrt(f["sigma2"])
            M, dM = f["satt_M"], f["satt_dM"]
            with np.errstate(invalid="ignore"):
                Minv = np.linalg.inv(np.where(np.isfinite(M), M, np.eye(M.shape[-1])))
            J = -(sig**2)[:, None, None, None] * np.einsum("gab,gbci,gcd->gadi", Minv, dM, Minv)
            J[..., -1] = 2 * sig[:, None, None] * Minv
            A = vcov_varpar(np.nan_to_num(f["satt_H"]))
            self._satt = (self.vcov, J, A)
        return self._satt

    def _kenward_roger(self):
        """(Φ, Φ_A, W, P) for every response (pbkrtest's vcovAdj pieces), computed chunk
        by chunk with one vmapped program."""
        if not self.reml:
            raise ValueError("Kenward-Roger needs a REML fit (as in pbkrtest); refit with reml=True")
        if self._kr is None:
            G, p = len(self), self.design.p
            k = sum(s.n_natural for s in self.design.layout.structures) + 1
            out = [np.full((G, p, p), np.nan), np.full((G, p, p), np.nan), np.full((G, k, k), np.nan),
                   np.full((G, k, p, p), np.nan)]
            theta, sigma = self.theta.to_numpy(), self.sigma.to_numpy()
            lay = self.design.layout
            # a few q × q matrices per response: map in batches that keep them near 1 GB
            q_tot = sum(l * s.q for s, l in zip(lay.structures, lay.n_levels))
            per = 8.0 * (16 + 2 * k) * q_tot**2 + 8.0 * k * k * p * p * 4
            pad_to = _pad_sizes(self._chunks)
            with precision(self.dtype) as dt:
                for ch in self._chunks:
                    size = pad_to[ch.mapped]
                    bs = size if size * per <= 1e9 else max(1, int(1e9 // per))
                    d_, _ = ch.padded(size)
                    dense = _dense_batch(d_, lay) if ch.mapped else dense_crossproducts(ch.dstats, lay)
                    dense = {k_: jax.device_put(np.asarray(v, dt)) for k_, v in dense.items()}
                    rows = np.concatenate([ch.idx, np.repeat(ch.idx[-1:], size - len(ch.idx))])
                    res = batch_kr_program(jax.device_put(np.nan_to_num(theta[rows]).astype(dt)),
                                           jax.device_put(np.nan_to_num(sigma[rows], nan=1.0).astype(dt)), dense,
                                           layout=lay, design_mapped=ch.mapped, batch_size=bs)
                    pieces = kr_adjusted(*(np.asarray(a)[: len(ch.idx)] for a in jax.device_get(res)))
                    valid = np.isfinite(theta[ch.idx]).all(axis=1) & np.isfinite(sigma[ch.idx])
                    for o, v in zip(out, pieces):
                        o[ch.idx[valid]] = v[valid]     # failed responses stay NaN
            self._kr = tuple(out)
        return self._kr

    def _coef_index(self, coef: str) -> int:
        names = list(self.fixef.columns)
        if coef in names:
            return names.index(coef)
        from .contrasts import type3_contrasts

        L3 = type3_contrasts(self.design)
        if coef in L3 and L3[coef].shape[0] == 1 and np.count_nonzero(L3[coef]) == 1:
            return int(np.flatnonzero(L3[coef][0])[0])
        if coef in L3:
            raise ValueError(f"term {coef!r} has {L3[coef].shape[0]} coefficients; use res.anova({coef!r}) "
                             f"for its F test, or name one coefficient of {names}")
        raise ValueError(f"{coef!r} is neither a coefficient {names} nor a model term {sorted(L3)}")

    def coef_table(self, coef: str, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """One coefficient (its name, or a one-coefficient model term such as
        ``"condition"``) for every response: estimate, se, df, t, p, p_adj
        (Benjamini–Hochberg over the responses), lower/upper CI, converged, singular.
        ddf: "satterthwaite" (lmerTest), "kenward-roger" (pbkrtest: adjusted SE and df),
        "residual" (n − p), "asymptotic" (z)."""
        j = self._coef_index(coef)
        return self.estimate_table(np.eye(self.design.p)[j], ddf, level)

    def estimate_table(self, contrast, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """:meth:`coef_table` for a linear combination cᵀβ of the coefficients (``contrast``:
        p weights in coefficient order, or a Series or dict keyed by coefficient name): estimate,
        se, df, t, p, p_adj, CI, converged, singular for every response."""
        if isinstance(contrast, dict):
            contrast = pd.Series(contrast, dtype=float)
        if isinstance(contrast, pd.Series):
            unknown = set(contrast.index) - set(self.fixef.columns)
            if unknown:
                raise ValueError(f"contrast names {sorted(unknown)} are not coefficients {list(self.fixef.columns)}")
            contrast = contrast.reindex(self.fixef.columns, fill_value=0.0)
        c = np.asarray(contrast, float).ravel()
        if c.shape != (self.design.p,):
            raise ValueError(f"a contrast has one weight per coefficient ({self.design.p}: "
                             f"{list(self.fixef.columns)}), got {c.size}")
        ddf = normalize_ddf(ddf)
        est = self.fixef.to_numpy() @ c
        L = c[None, :]
        if ddf == "kenward-roger":
            Phi, PhiA, W, Pk = self._kenward_roger()
            se = np.sqrt(np.einsum("i,gij,j->g", c, PhiA, c))
            with np.errstate(invalid="ignore", divide="ignore"):
                df = kr_test(L, np.nan_to_num(self.fixef.to_numpy()), *map(np.nan_to_num, (Phi, PhiA, W, Pk)))["den_df"]
        else:
            se = np.sqrt(np.einsum("i,gij,j->g", c, self.vcov, c))
            if ddf == "satterthwaite":
                C, J, A = self._satterthwaite()
                df = _satt_df_rows(L, C, J, A)[:, 0]
            elif ddf == "residual":
                df = self.nobs.to_numpy() - self.design.p
            else:
                df = np.full(est.shape, np.inf)
        bad = self.errors.notna().to_numpy()
        df = np.where(bad, np.nan, df)
        cols = t_columns(est, se, df, level)
        return pd.DataFrame({"estimate": est, "se": se, "df": df, "t": cols["t"], "p": cols["p"],
                             "p_adj": _bh(cols["p"]), "lower": cols["lower"], "upper": cols["upper"],
                             "converged": self.converged.to_numpy(), "singular": self.is_singular.to_numpy()},
                            index=self.fixef.index)

    def test(self, L, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F test of Lβ = 0 for every response (lmerTest's ``contest``; with
        ddf="kenward-roger", pbkrtest's scaled F).  L: a matrix, a coefficient name or
        list of names, a {coefficient: weight} dict, or a model term (type III)."""
        Lm = contrast_matrix(L, list(self.fixef.columns), self.design)
        ddf = normalize_ddf(ddf)
        beta = np.nan_to_num(self.fixef.to_numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            if ddf == "satterthwaite":
                C, J, A = self._satterthwaite()
                out = satterthwaite_test(Lm, beta, np.nan_to_num(C), np.nan_to_num(J), A)
            elif ddf == "kenward-roger":
                out = kr_test(Lm, beta, *map(np.nan_to_num, self._kenward_roger()))
                out.pop("F_scaling")
            else:
                from ._dist import f_sf

                q = int(np.linalg.matrix_rank(Lm))
                Lb = beta @ Lm.T
                V = np.einsum("ai,gij,bj->gab", Lm, np.nan_to_num(self.vcov), Lm)
                V = V + np.where(self.errors.notna().to_numpy(), 1.0, 0.0)[:, None, None] * np.eye(len(Lm))
                F = np.einsum("ga,ga->g", Lb, np.linalg.solve(V, Lb[..., None])[..., 0]) / q
                den = np.full(F.shape, np.inf) if ddf == "asymptotic" else self.nobs.to_numpy() - self.design.p
                out = dict(F=F, num_df=np.full(F.shape, q), den_df=den, p=f_sf(F, q, den))
        tab = pd.DataFrame(out, index=self.fixef.index)
        bad = self.errors.notna().to_numpy()
        tab.loc[bad, ["F", "den_df", "p"]] = np.nan
        tab["p_adj"] = _bh(tab["p"].to_numpy())
        return tab

    def anova(self, term: str | None = None, type: int | str = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F tests of model terms for every response (lmerTest's ``anova``): for one
        ``term``, a table indexed by response (F, num_df, den_df, p, p_adj); for all
        terms, a long table indexed by (term, response)."""
        from .contrasts import type1_contrasts, type3_contrasts

        kind = str(type).upper().replace("TYPE", "").strip()
        if kind not in ("1", "I", "3", "III"):
            raise ValueError(f"type must be 1 or 3, got {type!r}")
        Ls = (type3_contrasts if kind in ("3", "III") else type1_contrasts)(self.design)
        if term is not None:
            if term not in Ls:
                raise ValueError(f"{term!r} is not a model term; terms are {list(Ls)}")
            return self.test(Ls[term], ddf=ddf)
        return pd.concat({t: self.test(L, ddf=ddf) for t, L in Ls.items()}, names=["term"])

    def varcorr(self) -> pd.DataFrame:
        """Variance components of every response, long format like
        ``as.data.frame(VarCorr(fit))``: response, group, term1, term2, vcov, sdcor."""
        s2 = self.sigma.to_numpy() ** 2
        lay, frames = self.design.layout, []
        for b, s, T in zip(self.design.blocks, lay.structures, self._templates()):
            S = s2[:, None, None] * T @ np.swapaxes(T, 1, 2)
            sd = np.sqrt(np.maximum(np.diagonal(S, axis1=1, axis2=2), 0.0))
            for i, nm in enumerate(b.colnames):
                frames.append(pd.DataFrame({"group": b.group, "term1": nm, "term2": None,
                                            "vcov": S[:, i, i], "sdcor": sd[:, i]}, index=self.theta.index))
            for j in range(s.q if s.correlated else 0):
                for i in range(j + 1, s.q):
                    with np.errstate(invalid="ignore", divide="ignore"):
                        cor = np.where(sd[:, i] * sd[:, j] > 0, S[:, i, j] / (sd[:, i] * sd[:, j]), np.nan)
                    frames.append(pd.DataFrame({"group": b.group, "term1": b.colnames[j], "term2": b.colnames[i],
                                                "vcov": S[:, i, j], "sdcor": cor}, index=self.theta.index))
        frames.append(pd.DataFrame({"group": "Residual", "term1": None, "term2": None, "vcov": s2,
                                    "sdcor": np.sqrt(s2)}, index=self.theta.index))
        return pd.concat(frames).reset_index()

    def _templates(self) -> list[np.ndarray]:
        """Every response's Λ template per term (G, q, q), from θ."""
        theta, Ts, off = self.theta.to_numpy(), [], 0
        for s in self.design.layout.structures:
            rows, cols = (np.array(a, int) for a in zip(*s.positions))
            T = np.zeros((len(self), s.q, s.q))
            T[:, rows, cols] = theta[:, off: off + s.n_params]
            off += s.n_params
            Ts.append(T)
        return Ts

    def variance_partition(self, fixed: bool = True, fractions: bool = True) -> pd.DataFrame:
        """Fraction of variance explained by each random-effects column, each fixed-effects
        column (``fixed``) and the residual, per response (rows sum to one; ``fractions=False``
        gives the variances) — variancePartition's ``fitExtractVarPartModel``; see
        :mod:`lmmjax.varpart`.  Failed responses are NaN."""
        from .varpart import fractions as to_fractions, variance_components

        s2 = self.sigma.to_numpy() ** 2
        comp = variance_components(self.design, self._templates(), s2, self.fixef.to_numpy(), self._row_weights(),
                                   fixed)
        comp.index = self.theta.index
        return to_fractions(comp) if fractions else comp

    def _row_weights(self) -> np.ndarray:
        """(n, G): prior weight × whether the response was fitted on the row."""
        R, G = self._responses, len(self)
        W = getattr(self, "_weights", None)
        shared = self.design.weights
        out = np.empty((R.n, G))
        for start in range(0, G, 1024):
            cols = np.arange(start, min(G, start + 1024))
            Yc = R.Y[:, cols]
            Yc = np.asarray(Yc.toarray() if R.sparse else Yc, float)
            w = np.isfinite(Yc).astype(float)
            if shared is not None:
                w *= shared[:, None]
            if W is not None:
                Wc = _weight_columns(W, cols)
                w *= np.where(np.isfinite(Wc) & (Wc > 0), Wc, 0.0)
            out[:, cols] = w
        return out

    def to_anndata(self, adata, coef: str, ddf: str = "satterthwaite", key: str = "lmmjax"):
        """Write the coefficient table into ``adata.varm[key]`` (rows aligned with
        ``adata.var_names``) and the model description into ``adata.uns[key]``."""
        tab = self.coef_table(coef, ddf=ddf)
        names = list(map(str, adata.var_names))
        if set(names) != set(tab.index):
            raise DataError("adata.var_names are not the responses of this result")
        adata.varm[key] = tab.reindex(names).set_axis(adata.var_names).astype(float)
        adata.uns[key] = dict(formula=self._formula, reml=self.reml, coef=str(tab.index.name or coef),
                              coefficient=coef, ddf=normalize_ddf(ddf), columns=list(tab.columns))
        return adata

    def __getitem__(self, name):
        """The full single-model result for one response (refitted with :func:`lmmjax.lmer`
        on that response's observed rows)."""
        from .model import lmer

        try:
            i = self.names.index(name)
        except ValueError:
            raise KeyError(f"no response named {name!r}") from None
        resp = self.design.response_name or "_response_"
        data = self._data.assign(**{resp: self._responses.column(i)})
        w = self.design.weights                               # shared prior weights, or
        if getattr(self, "_weights", None) is not None:       # this response's (0: row not used)
            w = _weight_columns(self._weights, np.array([i]))[:, 0]
            w = np.where(w > 0, w, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lmer(f"{resp} ~ {self._formula.split('~', 1)[1]}", data, reml=self.reml, dtype=self.dtype,
                        weights=w)


def _dense_batch(dstats: dict, layout: Layout) -> dict:
    """:func:`~lmmjax.inference.dense_crossproducts` for per-response design statistics."""
    G = len(np.asarray(dstats["n"]))
    parts = [dense_crossproducts({k: np.asarray(v)[g] for k, v in dstats.items()}, layout) for g in range(G)]
    return {k: np.stack([np.asarray(p_[k]) for p_ in parts]) for k in parts[0]}


def _batch_weights(weights, data: pd.DataFrame, R: ResponseMatrix):
    """(shared n-vector or None, per-response n × G matrix or None) from ``lmer_batch``'s
    ``weights=``."""
    if weights is None:
        return None, None
    if isinstance(weights, pd.DataFrame):
        weights = weights.to_numpy(dtype=float)
    if isinstance(weights, str) or np.ndim(weights) == 1 and not sp.issparse(weights):
        from .design import _weight_values

        w = _weight_values(weights, data)
        if np.isnan(w).any():
            raise DataError(f"weights have {int(np.isnan(w).sum())} missing value(s); every row needs a weight")
        return w, None
    if np.shape(weights) != (R.n, R.G):
        raise DataError(f"per-response weights must be n × G = {R.n} × {R.G} (like the responses), "
                        f"got shape {np.shape(weights)}")
    return None, weights


def _weight_columns(W, cols) -> np.ndarray:
    """Columns ``cols`` of a per-response weight matrix (dense or sparse) as a dense array."""
    sub = W[:, cols[0]: cols[-1] + 1] if np.all(np.diff(cols) == 1) else W[:, cols]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, float)


# ---------------------------------------------------------------- checks on masked responses
def _masked_problems(design, ds: dict) -> np.ndarray:
    """Why a response with missing values cannot be fitted (None where it can): lme4's
    level-count rules on its observed rows, and a full-rank X there."""
    G = len(ds["n"])
    msg = np.full(G, None, object)
    nobs = ds["n"]
    p = design.p
    XX = ds["XX"]
    scale = np.maximum(np.max(np.abs(np.diagonal(XX, axis1=1, axis2=2)), axis=1), 1e-300)
    ev = np.linalg.eigvalsh(XX / scale[:, None, None])
    lev = [(design.blocks[0], np.einsum("glaa->gl", ds["D1"]) > 0)]
    if len(design.blocks) > 1:
        diag = np.diagonal(ds["ZrZr"], axis1=1, axis2=2)
        start = 0
        for b in design.blocks[1:]:
            w = b.n_levels * b.q
            lev.append((b, diag[:, start: start + w].reshape(G, b.n_levels, b.q).sum(axis=2) > 0))
            start += w
    for g in range(G):
        if nobs[g] <= p:
            msg[g] = f"only {int(nobs[g])} observed value(s) for {p} fixed-effects coefficients"
        elif ev[g, 0] <= 1e-10 * ev[g, -1]:
            msg[g] = (f"the fixed-effects columns are linearly dependent on its {int(nobs[g])} observed rows "
                      "(e.g. a level of a factor has no observations)")
        else:
            for b, seen in lev:
                nl = int(seen[g].sum())
                if nl < 2:
                    msg[g] = f"grouping factor {b.group!r} has {nl} observed level(s); it needs at least 2"
                elif nl >= nobs[g]:
                    msg[g] = (f"number of observed levels of {b.group!r} ({nl}) must be less than the "
                              f"number of observations ({int(nobs[g])})")
                elif nl * b.q >= nobs[g]:
                    msg[g] = (f"number of observations ({int(nobs[g])}) <= number of random effects "
                              f"({nl * b.q}) for term {b.term}")
                if msg[g]:
                    break
    return msg


# ---------------------------------------------------------------- driver
def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; be robust anyway
        return None
    return tqdm(total=total, unit="resp", desc="lmer_batch", smoothing=0.1)


def lmer_batch(formula: str, data=None, responses=None, reml: bool = True, *, names=None, layer=None,
               dtype: str = "float64", chunk_size: int | None = None, max_memory="2GB",
               progress: bool = True, devices=None, client=None, checkpoint_dir=None,
               weights=None) -> BatchResult:
    """Fit one linear mixed model to every response of a matrix.

    ``formula`` has no response: ``"~ condition + (1 | donor)"``.  ``data``: the
    covariates (pandas DataFrame, n rows), or an AnnData object (covariates from
    ``.obs``, responses from ``.X`` or ``.layers[layer]``, names from ``.var_names``).
    ``responses``: n × G numpy array, DataFrame (columns = names), scipy.sparse matrix
    (never densified whole) or AnnData.  NaN marks a missing value of one response:
    that response is fitted on its observed rows (as lme4 with na.omit would).

    Chunks of at most ``chunk_size`` responses (default: what fits ``max_memory``, at
    most 4096) are fitted by one vmapped program each, round-robin over ``devices``
    (default: every local device of JAX's default backend), or as tasks of a Dask
    ``client``.  ``progress`` shows a tqdm bar (responses/s, ETA).  ``dtype="float32"``
    makes the data pass (the n × G cross-products, the only part that grows with n) single
    precision; the per-response fits always run in float64, because the profiled criterion
    (~10³ in size) cannot resolve the optimum in float32 — fitting in float32 left half the
    responses unconverged (measured error of this option: benchmarks/README.md).

    ``checkpoint_dir``: a folder where each finished chunk is written as it completes
    (:mod:`lmmjax.checkpoint`); rerun with the same folder after an interruption and the
    finished chunks are loaded, not refitted (results byte-identical to an uninterrupted
    run); a folder written for other inputs is refused.

    ``weights``: prior weights as in ``lmer(..., weights=)`` (Var(εᵢ) = σ²/wᵢ): one vector
    for all responses (a column of ``data``/``.obs``, or n values), or one per response —
    an n × G array or DataFrame, or the name of an AnnData layer (voom-style precision
    weights).  Per-response weights give every response its own design cross-products
    (Σ wᵢzᵢzᵢᵀ: the NaN-mask machinery with real weights); a zero weight leaves the row out.

    Returns a :class:`BatchResult`.
    """
    adata = data if _is_anndata(data) else responses if _is_anndata(responses) else None
    if _is_anndata(data):
        if responses is not None and not _is_anndata(responses):
            raise DataError("give either an AnnData object or data= plus responses=, not both")
        data, Y, anames = from_anndata(data, layer)
        names = anames if names is None else names
    elif _is_anndata(responses):
        obs, Y, anames = from_anndata(responses, layer)
        data = obs if data is None else data
        names = anames if names is None else names
    else:
        Y = responses
    if (adata is not None and isinstance(weights, str) and weights in adata.layers
            and not (isinstance(data, pd.DataFrame) and weights in data.columns)):
        weights = adata.layers[weights]
    if data is None or Y is None:
        raise DataError("lmer_batch needs covariates (data=) and responses (responses=)")
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame or AnnData, got {type(data).__name__}")
    R = ResponseMatrix(Y, names)
    if R.n != len(data):
        raise DataError(f"responses have {R.n} rows but data has {len(data)}; they must match row by row")
    rhs = formula.split("~", 1)[-1]
    if "_response_" in data.columns:
        raise DataError("data must not have a column named '_response_' (lmer_batch uses that name)")
    design = build_design("_response_ ~" + rhs, data.assign(_response_=0.0))
    if design.n != len(data):
        raise DataError(f"{len(data) - design.n} rows of data have missing covariates; drop those rows from "
                        "data and responses first")
    layout = design.layout
    other = sorted({str(b.term) for b in design.blocks if not hasattr(b.structure, "positions")})
    if other:
        raise NotImplementedError(f"lmer_batch fits us/diag random-effect terms; {other} is not supported "
                                  "in batch yet (fit it per response with lmmjax.lmer)")
    shared_w, W = _batch_weights(weights, data, R)
    user_design = design
    if shared_w is not None:        # one weight vector: the likelihood sees √w-scaled rows
        user_design = dataclasses.replace(design, weights=shared_w)
        design = user_design.weighted()
    data_dtype = str(np.dtype(dtype))
    if data_dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    dtype = "float64"          # the fits; see the docstring
    budget = _parse_memory(max_memory)

    # ---- one pass over the responses: their cross-products (and masks)
    G, n = R.G, R.n
    errors = np.full(G, None, object)
    ds_shared = design_stats(design, sparse=False)  # the batch programs use the dense blocked form
    read = max(1, min(G, int(budget / (3 * 8.0 * n))))
    shared_idx, shared_stats, masked_idx, masked_r, masked_d = [], [], [], [], []
    logw = np.full(G, 0.0 if shared_w is None else float(np.sum(np.log(shared_w))))
    for start in range(0, G, read):
        cols = np.arange(start, min(G, start + read))
        ch = R.chunk_stats(design, cols, data_dtype, row_scale=None if shared_w is None else np.sqrt(shared_w),
                           weights=None if W is None else _weight_columns(W, cols))
        if ch["logw"] is not None:
            logw[cols] = ch["logw"]
        errors[cols] = ch["bad"]
        ok = np.array([b is None for b in ch["bad"]])
        full = ok & ~ch["masked"]
        shared_idx.append(cols[full])
        shared_stats.append(_take(ch["stats"], full))
        if (ch["masked"] & ok).any():
            mk = ch["masked"] & ok            # (a masked response already failed keeps its reason)
            dsm = masked_design_stats(design, ch["mask"] if mk.all() else ch["mask"][:, mk])
            prob = _masked_problems(design, dsm)
            good = np.array([m is None for m in prob])
            errors[cols[mk]] = prob
            masked_idx.append(cols[mk][good])
            masked_r.append(_take(_take(ch["stats"], mk), good))
            masked_d.append(_take(dsm, good))

    def cat(parts):
        return {k: np.concatenate([p_[k] for p_ in parts]) for k in parts[0]} if parts else {}

    shared_idx = np.concatenate(shared_idx) if shared_idx else np.zeros(0, int)
    sh_r = cat(shared_stats)
    chunks: list[_Chunk] = []
    size = chunk_size or max(1, min(DEFAULT_MAX_CHUNK, int(budget / _bytes_per_response(design, False))))
    for part in _even_chunks(np.arange(len(shared_idx)), size):
        chunks.append(_Chunk(shared_idx[part], ds_shared, _take(sh_r, part), False))
    if masked_idx:
        m_idx = np.concatenate(masked_idx)
        m_r, m_d = cat(masked_r), cat(masked_d)
        msize = chunk_size or max(1, min(DEFAULT_MAX_CHUNK, int(budget / _bytes_per_response(design, True))))
        for part in _even_chunks(np.arange(len(m_idx)), msize):
            chunks.append(_Chunk(m_idx[part], _take(m_d, part), _take(m_r, part), True))

    # ---- fit the chunks
    k, p = layout.n_theta, design.p
    fit = dict(theta=np.full((G, k), np.nan), criterion=np.full(G, np.nan), grad=np.full((G, k), np.nan),
               hess=np.full((G, k, k), np.nan), beta=np.full((G, p), np.nan), sigma2=np.full(G, np.nan),
               vcov=np.full((G, p, p), np.nan), satt_H=np.full((G, k + 1, k + 1), np.nan),
               satt_dM=np.full((G, p, p, k + 1), np.nan), satt_M=np.full((G, p, p), np.nan),
               nobs=np.full(G, float(n)), iterations=np.zeros(G, int))
    theta0 = layout.init_theta()
    bar = _progress_bar(G, progress)
    if bar is not None and (errors != None).any():  # noqa: E711
        bar.update(int((errors != None).sum()))  # noqa: E711

    def store(ch, out):
        m = len(ch.idx)
        for key_, v in out.items():
            fit[key_][ch.idx] = np.asarray(v)[:m]
        if ch.mapped:
            fit["nobs"][ch.idx] = np.asarray(ch.dstats["n"])
        if bar is not None:
            bar.update(m)

    pad_to = _pad_sizes(chunks)
    ckpt = None
    if checkpoint_dir is not None:
        from .checkpoint import Checkpoint

        ckpt = Checkpoint(checkpoint_dir, chunks, dict(
            formula=formula, reml=bool(reml), dtype=data_dtype, G=G, n=n,
            pad_to={str(k): v for k, v in pad_to.items()}, theta0=theta0.tolist()))

    def finish(i, ch, out):
        if ckpt is not None:
            ckpt.save(i, out)
        store(ch, out)

    todo = []
    for i, ch in enumerate(chunks):
        saved = ckpt.load(i) if ckpt is not None else None
        if saved is not None:
            store(ch, saved)
        else:
            todo.append((i, ch))
    try:
        if client is not None:
            futures = {}
            for i, ch in todo:
                d, r = ch.padded(pad_to[ch.mapped])
                fut = client.submit(_fit_chunk_task, theta0, d, r, layout, reml, ch.mapped, dtype, pure=False)
                futures[fut] = (i, ch)
            from dask.distributed import as_completed

            for fut in as_completed(list(futures)):
                finish(*futures[fut], jax.device_get(fut.result()))
        else:
            devs = _devices(devices)
            with precision(dtype) as dt:
                pending = []
                for j, (i, ch) in enumerate(todo):
                    d, r = ch.padded(pad_to[ch.mapped])
                    pending.append((i, ch, _fit_chunk_arrays(theta0, d, r, layout, reml, ch.mapped, dt,
                                                             devs[j % len(devs)])))
                    if len(pending) >= len(devs):   # one chunk in flight per device
                        i0, c0, o0 = pending.pop(0)
                        finish(i0, c0, jax.device_get(o0))
                for i0, c0, o0 in pending:
                    finish(i0, c0, jax.device_get(o0))
    finally:
        if bar is not None:
            bar.close()
    fit["criterion"] = fit["criterion"] - logw        # −2ℓ of the weighted model (lme4's, with Σ log wᵢ)
    failed = np.isnan(fit["criterion"]) & np.array([e is None for e in errors])
    errors[failed] = "numerical failure in the fit (non-finite criterion)"
    res = BatchResult(user_design, R, data, formula, reml, dtype, chunks, fit, errors)
    res._weights = W                 # per-response weights (a reference), for variance_partition
    res.data_dtype = data_dtype
    return res


def _devices(devices):
    if devices is None:
        return jax.local_devices()
    if isinstance(devices, (list, tuple)):
        return list(devices)
    return [devices]
