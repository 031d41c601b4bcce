"""The batch engine: one compiled program fits a chunk of responses that share a design.

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
second program, in closed form (:func:`lmmjax.kenward_roger.kr_linear`).

Chunks (:class:`_Chunk`) are the unit of work: sized to a memory budget and padded to
one size per kind, so every chunk of a kind runs the same compiled program.  The driver
(:func:`lmmjax.batch.lmer_batch`) and the result (:class:`lmmjax.batchresult.BatchResult`)
sit above this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ._compute import precision
from ._linalg import chol_small, tril_inv_small
from .kenward_roger import basis_matrices, kr_linear
from .likelihood import Layout, criterion, factorize, objective
from .optimize import PROBE_STEPS, _probe_points

__all__ = ["batch_fit_program", "batch_kr_program"]

STEP_LADDER = tuple(2.0 ** -np.array([0, 1, 2, 3, 5, 8, 11]))
START_SCALES = tuple(4.0 ** np.arange(-5, 2))
MAX_STEP = 0.9
STALL_RUN = 4


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


@partial(jax.jit, static_argnames=("layout", "design_mapped", "batch_size"))
def batch_kr_program(theta, sigma, dense, layout: Layout, design_mapped: bool = False, batch_size=None):
    """Kenward-Roger pieces (M, ∂M, ∂²M, expected information) for every response,
    in pbkrtest's natural parameters φ (entries of each Σ_k, then σ²): :func:`lmmjax.kenward_roger.kr_linear`
    mapped over responses, ``batch_size`` at a time (vmapped within a batch; memory: a few
    q × q matrices per response)."""
    E = jnp.asarray(basis_matrices(layout), theta.dtype)
    if design_mapped:
        return jax.lax.map(lambda a: kr_linear(layout.factors(a[0]), a[1], a[2], E, layout.n_levels), (theta, sigma, dense),
                           batch_size=batch_size)
    return jax.lax.map(lambda a: kr_linear(layout.factors(a[0]), a[1], dense, E, layout.n_levels), (theta, sigma),
                       batch_size=batch_size)


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
