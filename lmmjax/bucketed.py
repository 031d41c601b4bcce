r"""The design as data: statistics padded to shape buckets and Λ(θ) as an index template,
so one compiled program serves every design of a bucket.

lmmjax's blocked criterion (:mod:`lmmjax.likelihood`) takes the covariance structures and
level counts as *static* arguments, so every new design used to compile its programs
(seconds each).  Here they are data.  lme4's Λ(θ) is linear in θ (Bates et al. 2015,
JSS 67(1), sec. 2.2: θ fills fixed positions of a block-diagonal template), so

* the first term's template T₁ (q₁ × q₁) is a scatter of θ through an index array
  (padded to q₁(q₁+1)/2 entries: us, diag and homdiag terms of one q₁ share a program);
* the later terms' Λ_r (q_r × q_r, block diagonal) is a scatter too, applied as a dense
  matrix (or a vector when every later term is scalar);
* every array is padded to a bucket (powers of two, :func:`bucket`: ℓ₁ from 32, p from 4;
  k by :func:`theta_bucket`: 1, 3, then powers of two) of ℓ₁ (first-term levels), p (fixed
  effects), k (θ entries), q_r and the template lengths; n and the true p are arrays
  (REML's n − p), not shapes.

Padding changes nothing, exactly: a padded first-term level has D₁ = 0, Z₁ᵀX = 0,
Z₁ᵀy = 0, Z₁ᵀZ_r = 0, so its block of ΛᵀZᵀZΛ + I is I (log-determinant 0) and it meets
nothing; a padded later level has a zero row in Z_rᵀZ_r and no Λ entry (its block of S₂₂
is I); a padded fixed-effect column has an identity block in XᵀX and zeros elsewhere
(its block of M_XX is I, β̂ = 0 there); a padded θ entry fills no position.
tests/test_bucketed.py checks this against the unpadded criterion.

One evaluation (:func:`evaluate`) gives the profiled criterion c(θ), its gradient and
Hessian, β̂, Var(β̂) and lmerTest's Satterthwaite derivatives (the Hessian of the
unprofiled deviance d(θ, σ) at σ̂ and ∂(XᵀV⁻¹X)/∂θ), from exact forward-mode first
derivatives of log-determinants and r² at θ and θ ± hᵢeᵢ.  :func:`newton` runs the
whole damped Newton on it inside one program and returns the solution too, so a fit is one
dispatch (:func:`lmmjax.optimize.newton_minimize` adds boundary probes through
:func:`crit_many`) and ``summary()``'s Satterthwaite table needs no other program.  REML is
a traced 0/1 flag, not a static argument: REML and ML fits share the programs.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _export
from ._linalg import UNROLL_MAX, chol_small, tril_inv_small
from .likelihood import UNROLL_P, Layout, criterion, dense_rest, eliminate_first, finish_fixed, solve_from
from .start import moment_theta

__all__ = ["bucket", "eligible", "bucket_stats", "factorize", "crit", "evaluate", "solve", "fit"]

#: designs whose later terms have at most this many random effects (bucketed) use this engine;
#: beyond, its evaluation (2k + 1 forward-mode passes through the dense later block) costs
#: more than the layout engine's L-BFGS: warm, 60 × 40 crossed (1 + c1 + c2 | subj) +
#: (1 + c1 | item) (q_r = 80) 8.8 s vs 0.16 s, (1 | subj) + (1 + c1 | item) 0.61 s vs 0.054 s.
#: Up to 64 the bucketed fit is slower warm but compiles nothing for a new design: (x || g)
#: and (1 | g/h) with 38–53 later levels, warm 0.02–0.05 s vs 0.006–0.014 s, but a first fit
#: of each new design 0.03–0.06 s vs 0.6–0.8 s (the layout engine's program per layout, even
#: from the persistent cache; seconds without it)
SMALL_QR_MAX = 64
#: the smallest θ bucket beyond :func:`theta_bucket`'s small ones
K_MIN = 4
#: the smallest first-term levels bucket: designs of up to 32 groups share their programs
#: (padding levels costs a small program next to nothing; each bucket is a compilation)
L1_MIN = 32
#: the smallest fixed-effects bucket: p ≤ 4 share one, factorized without LAPACK (the
#: unrolled 4 × 4 Cholesky, :data:`lmmjax.likelihood.UNROLL_P`), so the derivative points
#: are vmapped (:func:`_lapack_free`).  A separate p ≤ 2 bucket compiled ~2.5 s faster
#: but doubled the buckets a stream of small designs meets (half of 20 designs compiled)
P_MIN = 4


def bucket(n: int, lo: int) -> int:
    """The shape bucket of a size: the next power of two, at least ``lo``."""
    return max(lo, 1 << max(0, int(math.ceil(math.log2(max(n, 1))))))


def theta_bucket(k: int) -> int:
    """The θ bucket: 1 (a random intercept), 3 for k = 2, 3 (a correlated or diagonal
    slope term, two intercepts), else a power of two ≥ :data:`K_MIN`.  Each padded θ entry
    costs the Newton program two derivative points and a tangent: padding k = 3 to 4 made
    sleepstudy's program ~20% slower."""
    return 1 if k <= 1 else 3 if k <= 3 else bucket(k, K_MIN)


def _entries(s):
    """(row, col, parameter) of each entry of a structure's template T, or None when T
    is not a scatter of its parameters (cs, ar1, kernels keep the layout engine)."""
    if hasattr(s, "positions"):
        return [(r, c, i) for i, (r, c) in enumerate(s.positions)]
    if type(s).__name__ == "HomDiagonal":   # |θ|·I; Λ enters only as ΛΛᵀ, so θ·I is the same
        return [(a, a, 0) for a in range(s.q)]
    return None


def eligible(stats: dict, layout: Layout) -> bool:
    """Dense (not sparse) statistics, template structures, a small later-terms block."""
    return ("tr_j" not in stats and all(_entries(s) is not None for s in layout.structures)
            and (layout.q_rest == 0 or bucket(layout.q_rest, 8) <= SMALL_QR_MAX))


def _pad(a, shape, fill=0.0):
    out = np.full(shape, fill, dtype=np.asarray(a).dtype if np.issubdtype(np.asarray(a).dtype, np.integer) else float)
    out[tuple(slice(0, n) for n in np.shape(a))] = a
    return out


def bucket_stats(stats: dict, layout: Layout) -> dict:
    """The design's statistics padded to its bucket, with the Λ templates (host arrays)."""
    l1, q1 = layout.n_levels[0], layout.q[0]
    p, k, qr = np.asarray(stats["XX"]).shape[0], layout.n_theta, layout.q_rest
    l1b, pb, kb = bucket(l1, L1_MIN), bucket(p, P_MIN), theta_bucket(k)
    XX = np.eye(pb)
    XX[:p, :p] = stats["XX"]
    S = dict(D1=_pad(stats["D1"], (l1b, q1, q1)), Z1X=_pad(stats["Z1X"], (l1b, q1, pb)),
             Z1y=_pad(stats["Z1y"], (l1b, q1)), XX=XX, Xy=_pad(stats["Xy"], (pb,)),
             yy=np.asarray(stats["yy"], float), n=np.asarray(stats["n"], float), p=np.asarray(p, float))
    if "R1" in stats:              # square-root statistics of a single-term design (lmmjax.scaling)
        WXX = np.eye(pb)
        WXX[:p, :p] = stats["WXX"]
        S.update(R1=_pad(stats["R1"], (l1b, q1, q1)), A1X=_pad(stats["A1X"], (l1b, q1, pb)),
                 A1y=_pad(stats["A1y"], (l1b, q1)), WXX=WXX, WXy=_pad(stats["WXy"], (pb,)),
                 Wyy=np.asarray(stats["Wyy"], float))
    S["canon"] = _pad(_canon_index(layout), (kb,)).astype(np.int32)
    S["canon"][k:] = np.arange(k, kb)
    e1 = _entries(layout.structures[0])
    m1 = q1 * (q1 + 1) // 2
    S["t1_i"] = _pad(np.array([r * q1 + c for r, c, _ in e1], np.int32), (m1,))
    S["t1_t"] = _pad(np.array([i for *_, i in e1], np.int32), (m1,))
    S["t1_w"] = _pad(np.ones(len(e1)), (m1,))
    if qr:
        qrb = bucket(qr, 8)
        S.update(Z1Zr=_pad(stats["Z1Zr"], (l1b, q1, qrb)), ZrZr=_pad(stats["ZrZr"], (qrb, qrb)),
                 ZrX=_pad(stats["ZrX"], (qrb, pb)), Zry=_pad(stats["Zry"], (qrb,)))
        rows, cols, idx = [], [], []
        off_u, off_t = 0, layout.structures[0].n_params
        for s, l in zip(layout.structures[1:], layout.n_levels[1:]):
            base = off_u + np.arange(l) * s.q
            for r, c, i in _entries(s):
                rows.append(base + r)
                cols.append(base + c)
                idx.append(np.full(l, off_t + i))
            off_u += l * s.q
            off_t += s.n_params
        rows, cols, idx = (np.concatenate(a).astype(np.int32) for a in (rows, cols, idx))
        if all(q == 1 for q in layout.q[1:]):      # Λ_r diagonal: a vector, one entry per level
            S["lrd_t"] = _pad(idx, (qrb,))
            S["lrd_w"] = _pad(np.ones(idx.size), (qrb,))
        else:
            er = bucket(rows.size, 8)
            S.update(lr_r=_pad(rows, (er,)), lr_c=_pad(cols, (er,)), lr_t=_pad(idx, (er,)),
                     lr_w=_pad(np.ones(rows.size), (er,)))
    return S


def _canon_index(layout: Layout) -> np.ndarray:
    """For each θ entry, the entry on the diagonal of its template column: the canonical
    form flips a column whose diagonal is negative (ΛΛᵀ is unchanged)."""
    out, off = [], 0
    for s in layout.structures:
        e = _entries(s)
        diag = {c: i for r, c, i in e if r == c}
        col = {}
        for r, c, i in e:
            col.setdefault(i, c)
        out.extend(off + diag[col[i]] for i in range(s.n_params))
        off += s.n_params
    return np.asarray(out, np.int32)


def factorize(theta, S):
    """The blocked factorization (:func:`lmmjax.likelihood.factorize`'s output) of the
    padded system at θ (length ``bucket(k)``)."""
    T1 = _template_T1(theta, S)
    if "R1" in S:
        return finish_fixed(*_eliminate_first_sqrt(T1, S))
    L11, G, c1x, c1y, Mxx, Mxy, Myy, logdet_z = eliminate_first(T1, S)
    out = dict(L11=L11, c1x=c1x, c1y=c1y)
    if "lrd_t" in S:
        lam = S["lrd_w"] * theta[S["lrd_t"]]
        return dense_rest(out, G, Mxx, Mxy, Myy, logdet_z, S, lambda M: M * lam)
    if "lr_r" in S:
        qrb = S["ZrZr"].shape[0]
        Lr = jnp.zeros((qrb, qrb), theta.dtype).at[S["lr_r"], S["lr_c"]].add(S["lr_w"] * theta[S["lr_t"]])
        return dense_rest(out, G, Mxx, Mxy, Myy, logdet_z, S, lambda M: M @ Lr)
    return finish_fixed(out, Mxx, Mxy, Myy, logdet_z)


def _template_T1(theta, S):
    q1 = S["D1"].shape[-1]
    return jnp.zeros((q1 * q1,), theta.dtype).at[S["t1_i"]].add(S["t1_w"] * theta[S["t1_t"]]).reshape(q1, q1)


def _eliminate_first_sqrt(T1, S):
    """The first term from square-root statistics (:func:`lmmjax.scaling.within_stats`):
    B_j = I + R_jTTᵀR_jᵀ = L_BjL_Bjᵀ, c_j = L_Bj⁻¹[a_Xj, a_yj], M = W + Σⱼ c_jᵀc_j."""
    q1 = T1.shape[0]
    RT = jnp.einsum("jab,bc->jac", S["R1"], T1)
    LB = chol_small(jnp.einsum("jac,jbc->jab", RT, RT) + jnp.eye(q1, dtype=T1.dtype))
    LBi = tril_inv_small(LB)
    cx = jnp.einsum("jab,jbp->jap", LBi, S["A1X"])
    cy = jnp.einsum("jab,jb->ja", LBi, S["A1y"])
    Mxx = S["WXX"] + jnp.einsum("jap,jaq->pq", cx, cx)
    Mxy = S["WXy"] + jnp.einsum("jap,ja->p", cx, cy)
    Myy = S["Wyy"] + jnp.sum(cy * cy)
    logdet_z = 2.0 * jnp.sum(jnp.log(jnp.diagonal(LB, axis1=-2, axis2=-1)))
    return dict(LBi=LBi, RT=RT, cx=cx, cy=cy, T1=T1), Mxx, Mxy, Myy, logdet_z


def _lapack_free(S) -> bool:
    """Whether :func:`factorize` on these statistics calls no LAPACK routine (one
    random-effects term of q₁ ≤ 6, a fixed-effects bucket within the unrolled
    Cholesky): its points can then be vmapped, one batched pass instead of a
    sequential loop (batched LAPACK calls have hung XLA-CPU, so the rest map)."""
    return ("lrd_t" not in S and "lr_r" not in S and S["XX"].shape[0] <= UNROLL_P
            and S["D1"].shape[-1] <= UNROLL_MAX)


def _map(f, xs, S):
    """``f`` over the rows of ``xs``: vmapped where :func:`_lapack_free`, else ``lax.map``."""
    return jax.vmap(f)(xs) if _lapack_free(S) else jax.lax.map(f, xs)


def _nu(S, reml):
    """ν = n − p (REML) or n (ML); ``reml`` is a traced 0/1 flag in these programs (REML and
    ML fits of a bucket share them)."""
    return S["n"] - S["p"] * reml


@jax.jit
def crit(theta, S, reml: bool):
    """The profiled criterion at θ (line searches and boundary probes)."""
    return criterion(factorize(theta, S), S["n"], S["p"], reml)


def _first_derivatives(t, S, reml: bool):
    """At θ: (a, r²) with a = log|L_Z|² (+ log|R_X|² for REML), M = XᵀV⁻¹Xσ², and their
    exact first derivatives in θ (forward mode)."""
    def ar(t_):
        f = factorize(t_, S)
        a = f["logdet_z"] + reml * f["logdet_x"]
        return jnp.stack([a, f["r2"]]), (f["Mxx"], f["RXi"], f["z"])

    J, (dM, _, _) = jax.jacfwd(ar, has_aux=False)(t)
    val, (M, RXi, z) = ar(t)
    return val, J, M, dM, RXi, z


@jax.jit
def evaluate(theta, S, reml: bool):
    """c(θ), ∇c, ∇²c, β̂, σ̂², Var(β̂) and the Satterthwaite derivatives at θ.

    The exact first derivatives of a(θ) and r²(θ) (forward mode) at θ and θ ± hᵢeᵢ give
    their Hessians by central differences (~1e-10 relative; nested autodiff compiled twice
    as long), then, with ν = n − p (REML) or n and σ̂² = r²/ν,

        ∇c = ∇a + ν∇r²/r²,   ∇²c = ∇²a + ν(∇²r²/r² − ∇r²∇r²ᵀ/r⁴)

    and the Hessian of the unprofiled d(θ, σ) = a + r²/σ² + ν log(2πσ²) at σ̂ that
    lmerTest's Satterthwaite df use: ∂²d/∂θ² = ∇²a + ∇²r²/σ², ∂²d/∂θ∂σ = −2∇r²/σ³,
    ∂²d/∂σ² = 4ν/σ²; ``satt_dM`` = ∂M/∂(θ, σ) (M is free of σ), ``satt_M`` = M."""
    k = theta.shape[0]
    h = float(np.finfo(theta.dtype).eps) ** (1 / 3) * jnp.maximum(1.0, jnp.abs(theta))
    E = jnp.eye(k, dtype=theta.dtype) * h[None, :]
    pts = jnp.concatenate([theta[None], theta + E, theta - E])
    # one traced copy of the derivative program for all 2k + 1 points (compile time)
    out = _map(lambda t: _first_derivatives(t, S, reml), pts, S)
    val, J, M, dM, RXi, z = jax.tree.map(lambda a: a[0], out)
    Jpm = out[1][1:]
    dJ = (Jpm[:k] - Jpm[k:]) / (2.0 * h[:, None, None])          # dJ[i] = ∂J/∂θᵢ: (k, 2, k)
    Ha, Hr = _sym(dJ[:, 0, :]), _sym(dJ[:, 1, :])
    a, r2 = val[0], val[1]
    ga, gr = J[0], J[1]
    nu = _nu(S, reml)
    s2 = r2 / nu
    grad = ga + nu / r2 * gr
    hess = Ha + nu / r2 * Hr - nu / r2**2 * jnp.outer(gr, gr)
    Hs = jnp.zeros((k + 1, k + 1), theta.dtype)
    Hs = Hs.at[:k, :k].set(Ha + Hr / s2)
    Hs = Hs.at[:k, k].set(-2.0 * gr / (s2 * jnp.sqrt(s2))).at[k, :k].set(-2.0 * gr / (s2 * jnp.sqrt(s2)))
    Hs = Hs.at[k, k].set(4.0 * nu / s2)
    crit_val = a + nu * (1.0 + jnp.log(2.0 * math.pi * s2))
    return dict(f=crit_val, g=grad, H=hess, beta=RXi.T @ z, sigma2=s2, vcov=s2 * (RXi.T @ RXi),
                satt_H=Hs, satt_dM=jnp.concatenate([dM, jnp.zeros(dM.shape[:-1] + (1,), dM.dtype)], axis=-1),
                satt_M=M)


def _sym(H):
    return 0.5 * (H + H.T)


@jax.jit
def crit_many(thetas, S, reml: bool):
    """The criterion at each row of ``thetas`` (one dispatch)."""
    return _map(lambda t: criterion(factorize(t, S), S["n"], S["p"], reml), thetas, S)


def _canonical(theta, S):
    return theta * jnp.where(theta[S["canon"]] < 0, -1.0, 1.0).astype(theta.dtype)


def _newton_step(g, H):
    """:func:`lmmjax.optimize._newton_step` in the program: the Newton step with H's
    eigenvalues replaced by their floored absolute values, and whether H is PD."""
    w, U = jnp.linalg.eigh(H)
    pd = jnp.all(w > 0)
    w = jnp.maximum(jnp.abs(w), 1e-8 * jnp.maximum(1.0, jnp.max(jnp.abs(w))))
    return -U @ ((U.T @ g) / w), pd


@jax.jit
def newton(theta0, grid, use_grid, free, maxiter, S, reml: bool):
    """The damped Newton iterations of :func:`lmmjax.optimize._host_newton` as one
    program (one dispatch per fit instead of one per evaluation).

    From ``theta0`` (or the best row of ``grid`` when ``use_grid``), with the entries
    outside ``free`` (and the padded ones) held fixed: try the full Newton step with a
    complete :func:`evaluate`, else backtrack on the criterion alone; stop on the Newton
    decrement < 1e-13 · max(1, |f|), after one polishing step at a PD Hessian.

    The loop evaluates exactly one candidate per pass (one traced copy of
    :func:`evaluate`: compile time), in one of three modes: 0 — accept (the start, or
    the point a backtracking search found), 1 — a full Newton step, accepted on
    sufficient decrease, 2 — the polishing step, accepted when f stays within round-off
    and |g| falls.  Returns one flat array (:func:`_unpack_newton`): θ, :func:`evaluate_packed`
    at θ with g and H masked, the Newton steps, evaluations of :func:`evaluate` and of the
    criterion, and :func:`solve` at θ.  ``reml`` is a traced flag: REML and ML share the program."""
    dt = theta0.dtype

    def crit1(t):
        return criterion(factorize(t, S), S["n"], S["p"], reml)

    def mask(g, H):
        return (jnp.where(free, g, 0.0),
                jnp.where(free[:, None] & free[None, :], H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0)))

    start = jax.lax.cond(use_grid, lambda: grid[jnp.argmin(jnp.nan_to_num(_map(crit1, grid, S), nan=jnp.inf))],
                         lambda: theta0)
    kb = theta0.shape[0]

    def cond(c):
        mode, stop, it = c[6], c[7], c[8]
        return (~stop) & ~((mode == 1) & (it > maxiter))

    def body(c):
        theta, f, g, H, pk, cand, mode, _, it, nv, nc, step, dec = c
        e = evaluate.__wrapped__(cand, S, reml)
        gt, Ht = mask(e["g"], e["H"])
        ft = e["f"]
        pkt = jnp.concatenate([jnp.ravel(dict(e, g=gt, H=Ht)[key]) for key in _PACKED])
        tol = 1e-13 * jnp.maximum(1.0, jnp.abs(f))
        gmax = jnp.max(jnp.abs(g))
        fin = jnp.isfinite(ft)
        accept = jnp.where(mode == 0, True,
                           jnp.where(mode == 1, fin & (ft <= f - 1e-4 * dec),
                                     fin & (ft <= f + tol) & (jnp.max(jnp.abs(gt)) < gmax)))
        theta, f, g, H, pk = jax.tree.map(lambda x, y: jnp.where(accept, x, y),
                                          (cand, ft, gt, Ht, pkt), (theta, f, g, H, pk))
        search = (mode == 1) & ~accept

        def backtrack(_):
            def lcond(s):
                return (~s[2]) & (s[1] < 30)

            def lbody(s):
                alpha, j, _ = s
                fa = crit1(theta + alpha * step)
                ok = jnp.isfinite(fa) & (fa <= f - 1e-4 * alpha * dec)
                return jnp.where(ok, alpha, 0.5 * alpha), j + 1, ok

            alpha, j, ok = jax.lax.while_loop(lcond, lbody, (jnp.asarray(0.5, dt), 0, jnp.asarray(False)))
            return ok, j, _canonical(theta + alpha * step, S)

        found, j, tb = jax.lax.cond(search, backtrack, lambda _: (jnp.asarray(False), 0, theta), None)
        # the next candidate: after an accepted point, the Newton step from it
        nstep, pd = _newton_step(g, H)
        ndec = -(g @ nstep)
        small = ndec < 1e-13 * jnp.maximum(1.0, jnp.abs(f))
        polish = small & pd & (jnp.max(jnp.abs(g)) > 1e-9)
        newton_next = (mode != 2) & ~search
        cand = jnp.where(search, tb, _canonical(theta + nstep, S))
        nmode = jnp.where(search, 0, jnp.where(small, 2, 1))
        stop = (mode == 2) | (search & ~found) | (newton_next & small & ~polish)
        step = jnp.where(newton_next, nstep, step)
        dec = jnp.where(newton_next, ndec, dec)
        it = it + (newton_next & ~small)
        return theta, f, g, H, pk, cand, nmode, stop, it, nv + 1, nc + j, step, dec

    inf = jnp.asarray(jnp.inf, dt)
    zeros = jnp.zeros(kb, dt)
    pk0 = jnp.zeros(jax.eval_shape(lambda t: evaluate_packed.__wrapped__(t, S, reml), theta0).shape, dt)
    init = (theta0, inf, zeros, jnp.eye(kb, dtype=dt), pk0, _canonical(start, S), 0, jnp.asarray(False), 0, 0,
            jnp.where(use_grid, grid.shape[0], 0), zeros, jnp.zeros((), dt))
    theta, f, g, H, pk, _, _, _, it, nv, nc, _, _ = jax.lax.while_loop(cond, body, init)
    sol = solve.__wrapped__(theta, S, reml)
    # one flat array: one device-to-host transfer (16 arrays cost ~0.2 ms of a 1.7 ms fit)
    return jnp.concatenate([theta, pk, jnp.stack([it, nv, nc]).astype(dt)] + [jnp.ravel(sol[key]) for key in _SOL])


#: the solution's entries in :func:`newton`'s flat output, after θ, the packed evaluation
#: and the three counts
_SOL = ("criterion", "beta", "sigma2", "vcov", "u1", "u2", "Ainv1", "Ainv_rest", "r2", "logdet_z", "logdet_x")


def _unpack_newton(flat: np.ndarray, S, kb: int, pb: int):
    """(θ, packed evaluation, iterations, evaluations, criterion evaluations, solution) from
    :func:`newton`'s flat output."""
    l1b, q1 = S["D1"].shape[:2]
    qrb = S["ZrZr"].shape[0] if "ZrZr" in S else 0
    shapes = dict(criterion=(), beta=(pb,), sigma2=(), vcov=(pb, pb), u1=(l1b, q1), u2=(qrb,),
                  Ainv1=(l1b, q1, q1), Ainv_rest=(qrb, qrb), r2=(), logdet_z=(), logdet_x=())
    npk = sum(math.prod(sh) for sh in _packed_shapes(kb, pb).values())
    theta, pk, counts = flat[:kb], flat[kb: kb + npk], flat[kb + npk: kb + npk + 3]
    sol, i = {}, kb + npk + 3
    for key in _SOL:
        size = math.prod(shapes[key])
        sol[key] = flat[i: i + size].reshape(shapes[key])
        i += size
    for key in ("criterion", "sigma2", "r2", "logdet_z", "logdet_x"):
        sol[key] = float(sol[key])
    return theta, pk, int(counts[0]), int(counts[1]), int(counts[2]), sol


#: the order in which :func:`evaluate_packed` concatenates its outputs
_PACKED = ("f", "g", "H", "beta", "sigma2", "vcov", "satt_H", "satt_dM", "satt_M")


@jax.jit
def evaluate_packed(theta, S, reml: bool):
    """:func:`evaluate` as one flat array (one device-to-host transfer per Newton step)."""
    ev = evaluate.__wrapped__(theta, S, reml)
    return jnp.concatenate([jnp.ravel(ev[key]) for key in _PACKED])


def _packed_shapes(kb: int, pb: int) -> dict:
    return dict(f=(), g=(kb,), H=(kb, kb), beta=(pb,), sigma2=(), vcov=(pb, pb), satt_H=(kb + 1, kb + 1),
                satt_dM=(pb, pb, kb + 1), satt_M=(pb, pb))


def _unpack(flat: np.ndarray, kb: int, pb: int) -> dict:
    shapes = _packed_shapes(kb, pb)
    out, i = {}, 0
    for key in _PACKED:
        size = math.prod(shapes[key])
        out[key] = flat[i: i + size].reshape(shapes[key])
        i += size
    return out


@jax.jit
def solve(theta, S, reml: bool):
    """:func:`lmmjax.likelihood.solve` on the padded system."""
    f = factorize(theta, S)
    if "R1" not in S:
        return solve_from(f, S, S["p"], reml)
    # square-root statistics: u_j = TᵀR_jᵀB_j⁻¹(a_yj − a_Xjβ̂) (push-through identity); the
    # conditional covariance blocks (ΛᵀZᵀZΛ + I)⁻¹ from the cross-products as usual
    n, p = S["n"], S["p"]
    sigma2 = f["r2"] / (n - p * reml)
    beta = f["RXi"].T @ f["z"]
    w = f["cy"] - f["cx"] @ beta
    u1 = jnp.einsum("jba,jb->ja", f["RT"], jnp.einsum("jba,jb->ja", f["LBi"], w))
    T1 = f["T1"]
    L11 = chol_small(jnp.einsum("ab,jac,cd->jbd", T1, S["D1"], T1) + jnp.eye(T1.shape[0], dtype=T1.dtype))
    L11i = tril_inv_small(L11)
    return dict(criterion=criterion(f, n, p, reml), beta=beta, sigma2=sigma2,
                vcov=sigma2 * (f["RXi"].T @ f["RXi"]), u1=u1, u2=jnp.zeros((0,), T1.dtype),
                Ainv1=jnp.einsum("jba,jbc->jac", L11i, L11i), Ainv_rest=jnp.zeros((0, 0), T1.dtype),
                r2=f["r2"], logdet_z=f["logdet_z"], logdet_x=f["logdet_x"], Ts=None)


def _unpad_solution(sol: dict, layout: Layout, p: int) -> dict:
    l1, qr = layout.n_levels[0], layout.q_rest
    return dict(criterion=float(sol["criterion"]), beta=sol["beta"][:p], sigma2=float(sol["sigma2"]),
                vcov=sol["vcov"][:p, :p], u1=sol["u1"][:l1], Ainv1=sol["Ainv1"][:l1], u2=sol["u2"][:qr],
                Ainv_rest=sol["Ainv_rest"][:qr, :qr], r2=float(sol["r2"]), logdet_z=float(sol["logdet_z"]),
                logdet_x=float(sol["logdet_x"]))


#: the padded statistics of the last few statistics dicts (a refit of a prepared design,
#: :mod:`lmmjax.model`, hands over the same dict): (stats, layout, dtype) -> result, used only
#: while that very dict is the argument (an identity check; the dicts are never mutated)
_PADDED: list = []


def _device_stats(stats: dict, layout: Layout, dtype):
    for st, lay, dt, out in _PADDED:
        if st is stats and lay == layout and dt == dtype:
            return out
    host = bucket_stats(stats, layout)
    # on the device once per prepared design (a refit's dispatch then moves nothing)
    S = jax.device_put({key: v if np.issubdtype(v.dtype, np.integer) else np.asarray(v, dtype) for key, v in host.items()})
    # the last entry: per-design memo (programs bound to these statistics,
    # :func:`lmmjax._export.bind`; the moment start, formed when a fit needs it)
    out = S, theta_bucket(layout.n_theta), host["XX"].shape[0], {}
    _PADDED.insert(0, (stats, layout, dtype, out))
    del _PADDED[4:]
    return out


def at_theta(stats: dict, layout: Layout, reml: bool, dtype, theta):
    """(OptimizeResult, sol, satt) at a given θ (no optimization; lmer's ``theta=``)."""
    from .optimize import OptimizeResult

    S, kb, pb, _ = _device_stats(stats, layout, dtype)
    k, p = layout.n_theta, int(np.asarray(stats["XX"]).shape[0])
    theta = layout.canonical(np.asarray(theta, float))
    t = jax.device_put(np.r_[theta, np.zeros(kb - k)].astype(dtype))
    ev = _unpack(np.asarray(evaluate_packed(t, S, reml), float), kb, pb)
    keep = np.r_[np.arange(k), kb]
    satt = (ev["satt_H"][np.ix_(keep, keep)], ev["satt_dM"][:p, :p][..., keep], ev["satt_M"][:p, :p])
    H = ev["H"][:k, :k]
    opt = OptimizeResult(theta=theta, criterion=float(ev["f"]), iterations=0, evaluations=1,
                         grad_norm=float(np.max(np.abs(ev["g"][:k]))) if k else 0.0, hessian=H,
                         hessian_pd=bool(np.all(np.linalg.eigvalsh(H) > 0)), at_boundary=np.array([], int),
                         converged=True, message="theta fixed by the caller")
    sol = _unpad_solution(jax.device_get(solve(t, S, reml)), layout, p)
    sol["Ts"] = layout.factors_host(theta)
    return opt, sol, satt


def fit(stats: dict, layout: Layout, reml: bool, dtype, theta0=None, maxiter: int = 200):
    """Fit a design through its bucket's programs: :func:`lmmjax.optimize.newton_minimize`
    with :func:`newton` as its iterations (and :func:`crit_many` for boundary probes).

    Returns (OptimizeResult, sol, satt): ``sol`` in :func:`lmmjax.likelihood.solve`'s
    format, ``satt`` = (∇²d, ∂M, M) at the optimum for Satterthwaite."""
    from .optimize import newton_minimize

    S, kb, pb, memo = _device_stats(stats, layout, dtype)
    k, p = layout.n_theta, int(np.asarray(stats["XX"]).shape[0])
    keep = np.r_[np.arange(k), kb]          # θ, then σ

    def pad(t):
        t = np.atleast_2d(np.asarray(t, float))
        return np.concatenate([t, np.zeros((t.shape[0], kb - k))], axis=1).astype(dtype)

    def crit_(t):
        # always CRIT_ROWS points (one program shape; the start grid and the probes fill it)
        t = np.asarray(t, float)
        rows = np.atleast_2d(t)
        v = np.concatenate([np.asarray(_export.call(crit_many, pad(np.resize(rows[i: i + CRIT_ROWS], (CRIT_ROWS, k))), S, reml),
                                       float)[: len(rows[i: i + CRIT_ROWS])] for i in range(0, len(rows), CRIT_ROWS)])
        return v if t.ndim == 2 else float(v[0])

    grid = np.resize(np.outer(START_SCALES, layout.init_theta()), (CRIT_ROWS, k))
    if theta0 is None:          # (a refit from a given θ, e.g. a bootstrap draw, needs no start)
        if "start" not in memo:
            memo["start"] = moment_theta(stats, layout)
        if memo["start"] is not None:
            grid[len(START_SCALES)] = memo["start"]     # the row np.resize filled with a repeat

    def inner(theta, free, left):
        use_grid = theta is None
        t0 = grid[0] if use_grid else np.asarray(theta, float)
        fr = np.zeros(kb, bool)
        fr[:k] = free
        args = (pad(t0)[0], pad(grid), use_grid, fr, np.int32(left), S, reml)
        if "newton" not in memo:
            memo["newton"] = _export.bind(newton)
        flat = np.asarray(memo["newton"](*args), float)
        theta, packed, it, nv, nc, sol = _unpack_newton(flat, S, kb, pb)
        ev = _unpack(packed, kb, pb)
        satt = (ev["satt_H"][np.ix_(keep, keep)], ev["satt_dM"][:p, :p][..., keep], ev["satt_M"][:p, :p])
        return (np.asarray(theta, float)[:k], float(ev["f"]), ev["g"][:k], ev["H"][:k, :k], (satt, sol),
                int(it), int(nv), int(nc))

    # the last call of ``inner`` is at the final θ (newton_minimize re-evaluates after a snap),
    # so its solution is the fit's: no separate solve program
    opt, (satt, sol) = newton_minimize(crit_, None, layout, theta0, maxiter, START_SCALES, "Newton",
                                       batched=True, inner=inner)
    sol = _unpad_solution(sol, layout, p)
    sol["Ts"] = layout.factors_host(np.asarray(opt.theta, float))
    return opt, sol, satt


#: the criterion is evaluated at this many points per call (the start grid, the probes)
CRIT_ROWS = 8

#: the start grid: multiples of lme4's default θ, and in the last of the CRIT_ROWS rows the
#: moment estimate (:func:`lmmjax.start.moment_theta`); Newton starts from the best
START_SCALES = tuple(4.0 ** np.arange(-5, 2))
assert len(START_SCALES) < CRIT_ROWS
