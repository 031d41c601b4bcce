r"""Profiled REML / ML criteria of a linear mixed model as pure JAX functions.

Model (Bates, Mächler, Bolker & Walker 2015, JSS 67(1), sec. 3):
``y = Xβ + Zb + ε``, ``b = Λ(θ)u``, ``u ~ N(0, σ²I)``, ``ε ~ N(0, σ²I)``.

Everything is computed from the cross-products of the design (``ZᵀZ``,
``ZᵀX``, ``XᵀX``) and of the response (``Zᵀy``, ``Xᵀy``, ``yᵀy``), so one
evaluation costs nothing in ``n`` and the same compiled function serves every
response of a batch (vmap over the response statistics).

Blocked Cholesky (as in MixedModels.jl): random-effects terms are ordered by
decreasing number of levels; the first term's block of ``ΛᵀZᵀZΛ + I`` is
block diagonal (one ``q₁ × q₁`` block per level), so

    L₁₁ⱼ  = chol(T₁ᵀ Dⱼ T₁ + I)                 (batched tiny Cholesky)
    Kⱼ    = L₁₁ⱼ⁻¹ T₁ᵀ (Z₁ᵀZ_r)ⱼ Λ_r              (so L₂₁ = [K₁ … K_ℓ]ᵀ)
    L₂₂   = chol(Λ_rᵀ Z_rᵀ Z_r Λ_r + I − Σⱼ KⱼᵀKⱼ)  (dense, only the later terms)

and the fixed effects and response are eliminated by the same forward solves,
leaving the Schur complement ``M = [[Mxx, Mxy], [Mxyᵀ, Myy]]``.  With
``R_X = chol(Mxx)``, ``β̂ = Mxx⁻¹Mxy`` and penalized RSS ``r² = Myy − Mxyᵀβ̂``:

    ML:   −2ℓ(θ)   = log|L_Z|² + n (1 + log(2π r²/n))
    REML: −2ℓ_R(θ) = log|L_Z|² + log|R_X|² + (n−p)(1 + log(2π r²/(n−p)))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ._linalg import chol_inv, chol_small, logdet_quad, spd_cholesky, tril_inv_small

__all__ = ["Layout", "factorize", "objective", "solve"]

#: fixed-effects counts up to this use the unrolled p × p Cholesky (fast under vmap,
#: bigger programs); larger p uses LAPACK.  4 = the bucketed engine's smallest
#: fixed-effects bucket, so its usual designs factorize LAPACK-free (vmappable)
UNROLL_P = 4


@dataclass(frozen=True)
class Layout:
    """Static description of Λ: one covariance structure and level count per term,
    in lme4's term order (decreasing number of levels).  Hashable, so it can be a
    static argument of jitted functions: one compilation per layout and ``p``."""

    structures: tuple
    n_levels: tuple[int, ...]

    @property
    def q(self) -> tuple[int, ...]:
        return tuple(s.q for s in self.structures)

    @property
    def n_theta(self) -> int:
        return sum(s.n_params for s in self.structures)

    @property
    def theta_offsets(self) -> list[int]:
        return list(np.cumsum([0] + [s.n_params for s in self.structures]))

    @property
    def q_rest(self) -> int:
        return sum(l * q for l, q in zip(self.n_levels[1:], self.q[1:]))

    def factors(self, theta):
        off = self.theta_offsets
        return [s.factor(theta[off[k] : off[k + 1]]) for k, s in enumerate(self.structures)]

    def factors_host(self, theta) -> list[np.ndarray]:
        """The templates T_k at θ as numpy arrays (template structures without device work)."""
        off, out = self.theta_offsets, []
        for k, s in enumerate(self.structures):
            t = np.asarray(theta[off[k]: off[k + 1]], float)
            if hasattr(s, "positions"):
                T = np.zeros((s.q, s.q))
                for i, (r, c) in enumerate(s.positions):
                    T[r, c] = t[i]
            else:
                T = np.asarray(s.factor(jnp.asarray(t)), float)
            out.append(T)
        return out

    def init_theta(self) -> np.ndarray:
        return np.concatenate([s.init() for s in self.structures])

    def boundary(self) -> np.ndarray:
        off = self.theta_offsets
        return np.concatenate(
            [np.asarray(s.boundary, int) + off[k] for k, s in enumerate(self.structures)]
        ).astype(int)

    def canonical(self, theta: np.ndarray) -> np.ndarray:
        off = self.theta_offsets
        return np.concatenate(
            [s.canonical(np.asarray(theta[off[k] : off[k + 1]])) for k, s in enumerate(self.structures)]
        )


def _right_apply_rest(M, Ts, layout: Layout):
    """``M Λ_r`` for the later terms (columns of M laid out level-major per term)."""
    out, start = [], 0
    for T, l, q in zip(Ts[1:], layout.n_levels[1:], layout.q[1:]):
        blk = M[..., start : start + l * q]
        blk = blk.reshape(blk.shape[:-1] + (l, q)) @ T
        out.append(blk.reshape(blk.shape[:-2] + (l * q,)))
        start += l * q
    return jnp.concatenate(out, axis=-1)


def _sparse_rest(G, c1x, c1y, stats, Ts, layout: Layout):
    r"""The later terms' Schur complement and right-hand sides from the co-occurrence
    pattern of Z₁ᵀZ_r (:func:`lmmjax.design.sparse_cross_pattern`):

        S₂₂ = Λ_rᵀ (Z_rᵀZ_r − Σⱼ BⱼᵀWⱼBⱼ) Λ_r + I,     Wⱼ = GⱼᵀGⱼ = T₁A₁₁ⱼ⁻¹T₁ᵀ
        B₂  = Λ_rᵀ ([Z_rᵀX, Z_rᵀy] − Σⱼ BⱼᵀGⱼᵀ[c₁ₓ, c₁ᵧ]ⱼ)

    (Bⱼ = rows of level j of Z₁ᵀZ_r), so that ``c₂ᵀc₂ = B₂ᵀS₂₂⁻¹B₂`` as in the dense
    blocked form.  The update costs one multiply per co-occurring column pair, not
    ℓ₁ · q_r² (a student meets ~25 of InstEval's 1,128 lecturers)."""
    W, V = _weights(G, c1x, c1y)
    return _assemble_rest(Ts, _triple_map(W, stats, layout.q_rest), _pair_map(V, stats, layout.q_rest),
                          stats, layout)


def _weights(G, c1x, c1y):
    """Wⱼ = GⱼᵀGⱼ and Vⱼ = Gⱼᵀ[c₁ₓ, c₁ᵧ]ⱼ: what the sparse maps are linear in."""
    return (jnp.einsum("jab,jac->jbc", G, G),
            jnp.einsum("jab,jam->jbm", G, jnp.concatenate([c1x, c1y[..., None]], axis=-1)))


def _triple_map(W, stats, qr):
    """Σⱼ BⱼᵀWⱼBⱼ (q_r × q_r) from the triples: linear in W."""
    vals = jnp.einsum("tab,tab->t", W[stats["tr_j"]], stats["tr_v"])
    udst = stats["tr_udst"]
    agg = jax.ops.segment_sum(vals, stats["tr_seg"], num_segments=udst.shape[0], indices_are_sorted=True)
    # both triangles written directly (a transposed read of a q_r² matrix is slow on CPU);
    # padded destinations lie past q_r² and are sliced off
    U = jnp.zeros((qr * qr + udst.shape[0],), W.dtype).at[udst].set(agg, unique_indices=True, indices_are_sorted=True)
    return U.at[stats["tr_udst_t"]].set(agg, unique_indices=True)[: qr * qr].reshape(qr, qr)


def _pair_map(V, stats, qr):
    """Σⱼ BⱼᵀVⱼ (q_r × m) from the nonzero (j, c) pairs: linear in V."""
    return jax.ops.segment_sum(jnp.einsum("ta,tam->tm", stats["sp_v"], V[stats["sp_j"]]),
                               stats["sp_c"], num_segments=qr)


def _rest_scale(Ts, layout: Layout):
    """Λ_r's diagonal when every later term is scalar (q = 1), else None."""
    if all(q == 1 for q in layout.q[1:]):
        return jnp.concatenate([jnp.broadcast_to(T[0, 0], (l,)) for T, l in zip(Ts[1:], layout.n_levels[1:])])
    return None


def _assemble_rest(Ts, BWB, BV, stats, layout: Layout):
    """S₂₂ = Λ_rᵀ(Z_rᵀZ_r − BWB)Λ_r + I and B₂ = Λ_rᵀ([Z_rᵀX, Z_rᵀy] − BV).  With scalar
    later terms Λ_r is diagonal and both are elementwise scalings (no transposes, which
    XLA-CPU does slowly for a 1,000² matrix)."""
    qr = layout.q_rest
    A = stats["ZrZr"] - BWB
    rhs = jnp.concatenate([stats["ZrX"], stats["Zry"][:, None]], axis=1) - BV
    lam = _rest_scale(Ts, layout)
    if lam is not None:
        return lam[:, None] * A * lam[None, :] + jnp.eye(qr, dtype=A.dtype), lam[:, None] * rhs
    S = _right_apply_rest(A, Ts, layout)
    S22 = _right_apply_rest(S.T, Ts, layout) + jnp.eye(qr, dtype=BWB.dtype)
    B2 = _right_apply_rest(rhs.T, Ts, layout).T
    return S22, B2


def _first_term(theta, stats, layout: Layout):
    """Eliminate the first (largest) term: its batched tiny Cholesky, the forward
    solves of X and y, and what is left of XᵀX, Xᵀy, yᵀy."""
    Ts = layout.factors(theta)
    return (Ts,) + eliminate_first(Ts[0], stats)


def eliminate_first(T1, stats):
    """:func:`_first_term` for a given template T₁ (q₁ × q₁)."""
    q1 = T1.shape[0]
    eye1 = jnp.eye(q1, dtype=T1.dtype)
    A11 = jnp.einsum("ab,jac,cd->jbd", T1, stats["D1"], T1) + eye1
    L11 = chol_small(A11)
    G = jnp.einsum("jab,cb->jac", tril_inv_small(L11), T1)  # L11ⱼ⁻¹ T1ᵀ
    c1x = jnp.einsum("jac,jcp->jap", G, stats["Z1X"])
    c1y = jnp.einsum("jac,jc->ja", G, stats["Z1y"])
    Mxx = stats["XX"] - jnp.einsum("jap,jaq->pq", c1x, c1x)
    Mxy = stats["Xy"] - jnp.einsum("jap,ja->p", c1x, c1y)
    Myy = stats["yy"] - jnp.sum(c1y * c1y)
    logdet_z = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L11, axis1=-2, axis2=-1)))
    return L11, G, c1x, c1y, Mxx, Mxy, Myy, logdet_z


def _sparse_factor(small, logdet_2, C):
    """The factorization's scalars (``logdet_z``, ``logdet_x``, ``r2``, ``Mxx``) from the small
    pieces left after the first term (``small = (log|L₁₁|², Mxx₀, Mxy₀, Myy₀)``), log|S₂₂|
    and C = B₂ᵀS₂₂⁻¹B₂ (:func:`_sparse_rest`)."""
    logdet_z, Mxx, Mxy, Myy = small
    p = Mxx.shape[0]
    Mxx, Mxy, Myy = Mxx - C[:p, :p], Mxy - C[:p, p], Myy - C[p, p]
    if p:
        RX = jnp.linalg.cholesky(Mxx)
        z = jsl.solve_triangular(RX, Mxy, lower=True)
        logdet_x = 2.0 * jnp.sum(jnp.log(jnp.diagonal(RX)))
    else:
        z, logdet_x = Mxy, jnp.zeros((), Mxx.dtype)
    return dict(logdet_z=logdet_z + logdet_2, logdet_x=logdet_x, r2=Myy - z @ z, Mxx=Mxx)


def sparse_criterion(small, logdet_2, C, n, reml: bool):
    """The profiled criterion from the sparse path's pieces (:func:`_sparse_factor`)."""
    return criterion(_sparse_factor(small, logdet_2, C), n, small[1].shape[0], reml)


def unprofiled_deviance(f, n, p, sigma, reml: bool):
    """d(θ, σ) = log|L_Z|² + r²/σ² + n log(2πσ²) [+ log|R_X|² − p log(2πσ²) for REML]
    from a factorization's ``logdet_z``, ``logdet_x`` and ``r2`` (any model whose
    marginal covariance is σ² times a matrix: lmer's blocked factor, gls's grouped one)."""
    s2 = sigma * sigma
    dev = f["logdet_z"] + f["r2"] / s2 + n * jnp.log(2 * math.pi * s2)
    if reml:
        dev = dev + f["logdet_x"] - p * jnp.log(2 * math.pi * s2)
    return dev


@partial(jax.jit, static_argnames=("layout", "reml"))
def sparse_value_grad_hess(theta, stats, layout: Layout, reml: bool):
    """Profiled criterion, its exact gradient and exact Hessian in θ on the sparse path
    (:func:`_sparse_derivatives`)."""
    n = stats["n"]

    def outer(small, ld, C, extra):
        return sparse_criterion(small, ld, C, n, reml)

    f, g, H, _ = _sparse_derivatives(theta, jnp.zeros((0,), theta.dtype), stats, layout, outer)
    return f, g, H


@partial(jax.jit, static_argnames=("layout", "reml"))
def sparse_satterthwaite(vp, stats, layout: Layout, reml: bool):
    """Satterthwaite's pieces on the sparse path at ``vp = (θ, σ)``: the exact Hessian of the
    unprofiled deviance d(θ, σ) (:func:`unprofiled_deviance`), ∂M/∂(θ, σ) (σ slice zero) and
    M = XᵀV⁻¹Xσ² — from the closed forms of :func:`_sparse_derivatives`, not by
    differentiating a dense factorization twice (InstEval: 0.6 s instead of 9 s and 1.4 GB)."""
    n = stats["n"]
    p = stats["XX"].shape[-1]

    def outer(small, ld, C, extra):
        return unprofiled_deviance(_sparse_factor(small, ld, C), n, p, extra[0], reml)

    _, _, H, (v0, Ds, unravel) = _sparse_derivatives(vp[:-1], vp[-1:], stats, layout, outer)

    def m_of(v):
        small, _, C = unravel(v)
        return small[1] - C[:p, :p]

    dM = jax.vmap(lambda d: jax.jvp(m_of, (v0,), (d,))[1])(Ds)          # (k, p, p)
    dM = jnp.concatenate([dM, jnp.zeros((1, p, p), dM.dtype)])
    return H, jnp.moveaxis(dM, 0, -1), m_of(v0)


def _block_sums2(P, blocks):
    """The sums of P over every pair of index blocks ``[(start, stop), ...]`` (a small matrix)."""
    return jnp.stack([jnp.stack([jnp.sum(P[a:b, c:e]) for c, e in blocks]) for a, b in blocks])


def _d2_logdet(Si, dS):
    """∂ᵢⱼ log|S| (first-order part) = −tr(S⁻¹∂ᵢS S⁻¹∂ⱼS), one product S⁻¹∂ᵢS per parameter."""
    X = Si @ dS
    return -jnp.einsum("iab,jba->ij", X, X)


def _d2_logdet_scalar(Si, S, dS1, lam, bounds):
    r""":func:`_d2_logdet` when every later term is scalar: S = ΛAΛ + I with Λ = diag(λ),
    λ constant (λ_t) on term t's block E_t.  With N = S − I and M = S⁻¹N = I − S⁻¹ (they
    commute), ∂_tS = (E_tN + NE_t)/λ_t, so the later-term entries need no product at all:

        tr(S⁻¹∂_tS S⁻¹∂_uS) λ_tλ_u = 2⟨M∘M⟩_tu + ⟨S⁻¹∘(N − M)⟩_tu + ⟨S⁻¹∘(N − M)⟩_ut

    (⟨·⟩_tu: the sum over block t × block u), and with X_a = S⁻¹∂_aS for the first term's
    parameters (D_a = ∂_aS, ``dS1``),

        tr(X_a S⁻¹∂_tS) λ_t = 2 Σ_{i∈t} (X_a − X_a S⁻¹)_ii = 2 Σ_{i∈t} [diag X_a − rowsum(X_a∘S⁻¹)]_i,
        tr(X_a X_b) = Σ X_a∘X_bᵀ.

    InstEval: one 1,142³ product per evaluation instead of three.  Needs every λ_t ≠ 0 (the
    caller falls back to :func:`_d2_logdet` at the boundary)."""
    nS = S.shape[0]
    eye = jnp.eye(nS, dtype=S.dtype)
    M = eye - Si
    NM = S + Si - 2.0 * eye                       # N − M
    blocks = list(zip(bounds[:-1], bounds[1:]))
    Q = _block_sums2(Si * NM, blocks)
    tt = (2.0 * _block_sums2(M * M, blocks) + Q + Q.T) / (lam[:, None] * lam[None, :])
    k1 = dS1.shape[0]
    if k1 == 0:
        return -tt
    X = Si @ dS1                                   # (k1, nS, nS)
    aa = jnp.einsum("iab,jba->ij", X, X)
    r = jnp.diagonal(X, axis1=-2, axis2=-1) - jnp.einsum("kab,ab->ka", X, Si)
    at = 2.0 * jnp.stack([jnp.sum(r[:, a:b], axis=1) for a, b in blocks], axis=1) / lam[None, :]
    return -jnp.block([[aa, at], [at.T, tt]])


def _sparse_derivatives(theta, extra, stats, layout: Layout, outer):
    r"""Value, exact gradient and exact Hessian in (θ, e) of h(u(θ), e) for a sparse design,
    at the cost of one inverse of S₂₂ and k products S₂₂⁻¹ ∂ᵢS₂₂ (k = len θ), instead of
    differentiating through a dense Cholesky (reverse mode costs 7–9× the factor,
    and a second order 30×).  ``outer(small, log|S|, C, e)`` is cheap (the profiled
    criterion, or the unprofiled deviance with e = σ).

    With u(θ) = (small, S, B) (the first term's leftovers, S₂₂ and B₂: :func:`_sparse_rest`) and
    h = g(small, log|S|, C, e), C = BᵀS⁻¹B:

        ∂ᵢh  = ∇g · ∂ᵢs,   ∂ᵢ log|S| = ⟨S⁻¹, ∂ᵢS⟩,   ∂ᵢC = ∂ᵢBᵀW + Wᵀ∂ᵢB − Wᵀ∂ᵢS W   (W = S⁻¹B)
        ∂ᵢⱼh = ∂ᵢsᵀ ∇²g ∂ⱼs + g_ld ∂ᵢⱼlog|S| + ⟨g_C, ∂ᵢⱼC⟩ + ∂ᵢⱼ[⟨ḡ, u(θ)⟩]

    where the last term holds the adjoints ḡ = (g_small, g_ld S⁻¹ − W g_C Wᵀ, W(g_C + g_Cᵀ))
    fixed (second derivatives of the cheap sparse map u), ∂ᵢⱼlog|S| = −tr(S⁻¹∂ᵢS S⁻¹∂ⱼS)
    and, with Yᵢ = S⁻¹∂ᵢB, Vᵢ = ∂ᵢS W, Zᵢ = S⁻¹Vᵢ,

        ∂ᵢⱼC = ∂ⱼBᵀYᵢ + ∂ᵢBᵀYⱼ − (∂ⱼBᵀZᵢ + Zᵢᵀ∂ⱼB) − (∂ᵢBᵀZⱼ + Zⱼᵀ∂ᵢB) + ZᵢᵀVⱼ + VⱼᵀZᵢ.

    The e-rows of the Hessian come from g alone (u does not depend on e).  Returns
    (h, grad, Hessian, (v, D, unravel)): the flattened pieces v = (small, log|S|, C), their
    θ-derivatives D (k × len v) and the unflattening function, for callers that need
    derivatives of other functions of v."""
    k = theta.shape[0]
    ne = extra.shape[0]
    k1 = layout.structures[0].n_params
    qr = layout.q_rest
    t1 = theta[:k1]

    def WV(a):
        th = jnp.concatenate([a, theta[k1:]])
        _, _, G, c1x, c1y, *_ = _first_term(th, stats, layout)
        return _weights(G, c1x, c1y)

    # The sparse maps are linear in (W, V), which depend on the first term's θ only: apply
    # them once to W, V and their first and second derivatives, and let autodiff see the
    # exact second-order Taylor surrogate  A(a) = A₀ + Σ ∂ᵢA δᵢ + ½ Σ ∂ᵢⱼA δᵢδⱼ  (δ = a − θ₁).
    W0, V0 = WV(t1)
    dW, dV = jax.jacfwd(WV)(t1)
    d2W, d2V = jax.jacfwd(jax.jacfwd(WV))(t1)
    tmap = jax.vmap(lambda w: _triple_map(w, stats, qr), in_axes=-1)
    pmap_ = jax.vmap(lambda v: _pair_map(v, stats, qr), in_axes=-1)
    A0, dA, d2A = _triple_map(W0, stats, qr), tmap(dW), jax.vmap(tmap, in_axes=-1)(d2W)
    P0, dP, d2P = _pair_map(V0, stats, qr), pmap_(dV), jax.vmap(pmap_, in_axes=-1)(d2V)

    def up(th):
        Ts, L11, G, c1x, c1y, Mxx, Mxy, Myy, logdet_z = _first_term(th, stats, layout)
        d = th[:k1] - t1
        A = A0 + jnp.tensordot(d, dA + 0.5 * jnp.tensordot(d, d2A, 1), 1)
        P = P0 + jnp.tensordot(d, dP + 0.5 * jnp.tensordot(d, d2P, 1), 1)
        S22, B2 = _assemble_rest(Ts, A, P, stats, layout)
        return (logdet_z, Mxx, Mxy, Myy), S22, B2

    small, S, B = up(theta)
    d_small, dS, dB = jax.vmap(lambda e: jax.jvp(up, (theta,), (e,))[1])(jnp.eye(k, dtype=theta.dtype))
    nS = S.shape[0]
    L = spd_cholesky(S)
    Li = jsl.solve_triangular(L, jnp.eye(nS, dtype=S.dtype), lower=True)
    Si = Li.T @ Li
    W = Si @ B
    ld = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
    C = B.T @ W
    # first derivatives of log|S| and C
    dld = jnp.einsum("ab,kab->k", Si, dS)
    V = dS @ W
    BW = jnp.einsum("kam,an->kmn", dB, W)
    dC = BW + jnp.swapaxes(BW, 1, 2) - jnp.einsum("am,kan->kmn", W, V)
    # the small outer function and its derivatives, in z = (v, e)
    v0, unravel = jax.flatten_util.ravel_pytree((small, ld, C))
    nv = v0.shape[0]

    def g_flat(z):
        sm, l, c = unravel(z[:nv])
        return outer(sm, l, c, z[nv:])

    z0 = jnp.concatenate([v0, extra])
    f = g_flat(z0)
    gz = jax.grad(g_flat)(z0)
    Hz = jax.hessian(g_flat)(z0)
    Ds = jax.vmap(lambda a, b, c: jax.flatten_util.ravel_pytree((a, b, c))[0])(d_small, dld, dC)
    Dz = jnp.block([[Ds, jnp.zeros((k, ne), Ds.dtype)], [jnp.zeros((ne, nv), Ds.dtype), jnp.eye(ne, dtype=Ds.dtype)]])
    grad = Dz @ gz
    gs = gz[:nv]
    g_small, g_ld, g_C = unravel(gs)
    # second-order terms of log|S| and C along first-order tangents
    Ts_now = layout.factors(theta)
    scalar_rest = _rest_scale(Ts_now, layout) is not None
    if not scalar_rest:
        d2ld = _d2_logdet(Si, dS)
    else:      # scalar later terms: one product per first-term parameter, not per parameter
        lam = jnp.stack([T[0, 0] for T in Ts_now[1:]])
        bounds = np.cumsum([0] + list(layout.n_levels[1:]))
        d2ld = jax.lax.cond(jnp.all(lam != 0), lambda: _d2_logdet_scalar(Si, S, dS[:k1], lam, bounds),
                            lambda: _d2_logdet(Si, dS))
    Y = Si @ dB
    Z = Si @ V
    BY = jnp.einsum("jam,ian->ijmn", dB, Y)            # ∂ⱼBᵀYᵢ
    BZ = jnp.einsum("jam,ian->ijmn", dB, Z)            # ∂ⱼBᵀZᵢ
    ZV = jnp.einsum("iam,jan->ijmn", Z, V)             # ZᵢᵀVⱼ
    T = lambda a: jnp.swapaxes(a, -1, -2)
    d2C = (BY + jnp.swapaxes(BY, 0, 1) - (BZ + T(BZ)) - jnp.swapaxes(BZ + T(BZ), 0, 1) + ZV + T(ZV))
    Htt = g_ld * d2ld + jnp.einsum("mn,ijmn->ij", g_C, d2C)
    # second derivatives of the sparse map u, adjoints held fixed
    S_bar = g_ld * Si - W @ g_C @ W.T
    B_bar = W @ (g_C + g_C.T)

    g_small_flat = jax.flatten_util.ravel_pytree(g_small)[0]
    if not scalar_rest:
        def lin(th):
            sm, S_, B_ = up(th)
            return (jax.flatten_util.ravel_pytree(sm)[0] @ g_small_flat
                    + jnp.sum(S_bar * S_) + jnp.sum(B_bar * B_))
    else:
        # scalar later terms: S = λλᵀ∘A(θ₁) + I and B = λ∘R(θ₁) with λ constant on each
        # term's block, so ⟨S̄, S⟩ + ⟨B̄, B⟩ only needs the block sums of S̄∘A and B̄∘R and of
        # their θ₁-derivatives: a polynomial in a few numbers (no n² autodiff pass)
        bounds = np.cumsum([0] + [l * q for l, q in zip(layout.n_levels[1:], layout.q[1:])])
        blocks = list(zip(bounds[:-1], bounds[1:]))

        def bsum2(M):
            return _block_sums2(M, blocks)

        def bsum1(M):
            return jnp.stack([jnp.sum(M[a:b]) for a, b in blocks])

        rhs0 = jnp.concatenate([stats["ZrX"], stats["Zry"][:, None]], axis=1)
        sa = (bsum2(S_bar * (stats["ZrZr"] - A0)),
              jnp.stack([-bsum2(S_bar * dA[i]) for i in range(k1)]) if k1 else None,
              jnp.stack([jnp.stack([-bsum2(S_bar * d2A[i, j]) for j in range(k1)]) for i in range(k1)]) if k1 else None)
        sb = (bsum1(B_bar * (rhs0 - P0)),
              jnp.stack([-bsum1(B_bar * dP[i]) for i in range(k1)]) if k1 else None,
              jnp.stack([jnp.stack([-bsum1(B_bar * d2P[i, j]) for j in range(k1)]) for i in range(k1)]) if k1 else None)

        def lin(th):
            Ts, _, _, _, _, Mxx, Mxy, Myy, logdet_z = _first_term(th, stats, layout)
            lam = jnp.stack([T[0, 0] for T in Ts[1:]])
            d = th[:k1] - t1
            a = sa[0] + jnp.tensordot(d, sa[1] + 0.5 * jnp.tensordot(d, sa[2], 1), 1)
            b = sb[0] + jnp.tensordot(d, sb[1] + 0.5 * jnp.tensordot(d, sb[2], 1), 1)
            sm = jax.flatten_util.ravel_pytree((logdet_z, Mxx, Mxy, Myy))[0]
            return sm @ g_small_flat + lam @ a @ lam + lam @ b

    Htt = Htt + jax.hessian(lin)(theta)
    H = Dz @ Hz @ Dz.T + jnp.pad(Htt, ((0, ne), (0, ne)))
    return f, grad, 0.5 * (H + H.T), (v0, Ds, unravel)


def factorize(theta, stats, layout: Layout):
    """Blocked Cholesky of the penalized system at ``theta``.

    Returns a dict of pieces used by :func:`objective` and :func:`solve`.
    """
    Ts, L11, G, c1x, c1y, Mxx, Mxy, Myy, logdet_z = _first_term(theta, stats, layout)
    out = dict(Ts=Ts, L11=L11, c1x=c1x, c1y=c1y)
    if layout.q_rest and "tr_j" in stats:
        S22, B2 = _sparse_rest(G, c1x, c1y, stats, Ts, layout)
        p = Mxx.shape[0]
        logdet_2, C = logdet_quad(S22, B2)
        Mxx = Mxx - C[:p, :p]
        Mxy = Mxy - C[:p, p]
        Myy = Myy - C[p, p]
        logdet_z = logdet_z + logdet_2
        out.update(G=G, S22=S22, B2=B2)
        return finish_fixed(out, Mxx, Mxy, Myy, logdet_z)
    if layout.q_rest:
        return dense_rest(out, G, Mxx, Mxy, Myy, logdet_z, stats, lambda M: _right_apply_rest(M, Ts, layout))
    return finish_fixed(out, Mxx, Mxy, Myy, logdet_z)


def dense_rest(out, G, Mxx, Mxy, Myy, logdet_z, stats, right_lam):
    """The later terms as one dense block (``right_lam(M) = M Λ_r``), then the fixed effects:

        Kⱼ = Gⱼ(Z₁ᵀZ_r)ⱼΛ_r,  S₂₂ = Λ_rᵀZ_rᵀZ_rΛ_r + I − Σⱼ KⱼᵀKⱼ = L₂₂L₂₂ᵀ,
        c₂ = L₂₂⁻¹(Λ_rᵀ[Z_rᵀX, Z_rᵀy] − Σⱼ Kⱼᵀ[c₁ₓ, c₁ᵧ]ⱼ)."""
    c1x, c1y = out["c1x"], out["c1y"]
    K = jnp.einsum("jac,jcr->jar", G, right_lam(stats["Z1Zr"]))
    qr = K.shape[-1]
    K2 = K.reshape(-1, qr)  # (ℓ₁q₁, q_r): the products below are plain GEMMs
    ZrZr = right_lam(right_lam(stats["ZrZr"]).T)
    S22 = ZrZr + jnp.eye(qr, dtype=K2.dtype) - K2.T @ K2
    L22, L22i = chol_inv(S22)
    ZrX = right_lam(stats["ZrX"].T).T
    Zry = right_lam(stats["Zry"])
    c2x = L22i @ (ZrX - K2.T @ c1x.reshape(K2.shape[0], -1))
    c2y = L22i @ (Zry - K2.T @ c1y.reshape(-1))
    Mxx = Mxx - c2x.T @ c2x
    Mxy = Mxy - c2x.T @ c2y
    Myy = Myy - c2y @ c2y
    logdet_z = logdet_z + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L22)))
    out.update(K=K, L22=L22, L22i=L22i, c2x=c2x, c2y=c2y)
    return finish_fixed(out, Mxx, Mxy, Myy, logdet_z)


def finish_fixed(out, Mxx, Mxy, Myy, logdet_z):
    """Eliminate the fixed effects from the Schur complement [[Mxx, Mxy], [Mxyᵀ, Myy]]:
    R_X = chol(Mxx), z = R_X⁻¹Mxy, r² = Myy − zᵀz."""
    if Mxx.shape[0]:
        # p is small: unrolled Cholesky/inverse (LAPACK calls become serial loops under vmap)
        if Mxx.shape[0] <= UNROLL_P:
            RX = chol_small(Mxx)
            RXi = tril_inv_small(RX)
        else:
            RX = jnp.linalg.cholesky(Mxx)
            RXi = jsl.solve_triangular(RX, jnp.eye(Mxx.shape[0], dtype=Mxx.dtype), lower=True)
        z = RXi @ Mxy
        logdet_x = 2.0 * jnp.sum(jnp.log(jnp.diagonal(RX)))
    else:
        RX, RXi, z, logdet_x = Mxx, Mxx, Mxy, jnp.zeros((), Mxx.dtype)
    r2 = Myy - z @ z
    out.update(RX=RX, RXi=RXi, z=z, r2=r2, logdet_z=logdet_z, logdet_x=logdet_x, Mxx=Mxx, Mxy=Mxy)
    return out


def criterion(f, n, p, reml: bool):
    """−2 log-likelihood (ML) or REML criterion from a factorization ``f``.  ``reml``: a
    bool, or a traced 0/1 flag (one compiled program serves both; ×1 and +0 are exact,
    so the numbers are those of the two formulas)."""
    if isinstance(reml, (bool, np.bool_)):
        if reml:
            nu = n - p
            return f["logdet_z"] + f["logdet_x"] + nu * (1.0 + jnp.log(2.0 * math.pi * f["r2"] / nu))
        return f["logdet_z"] + n * (1.0 + jnp.log(2.0 * math.pi * f["r2"] / n))
    nu = n - p * reml
    return f["logdet_z"] + reml * f["logdet_x"] + nu * (1.0 + jnp.log(2.0 * math.pi * f["r2"] / nu))


def objective(theta, stats, layout: Layout, reml: bool):
    """Profiled deviance (ML) or REML criterion as a function of θ."""
    p = stats["XX"].shape[-1]
    return criterion(factorize(theta, stats, layout), stats["n"], p, reml)


def _sparse_solve(f, stats, layout: Layout, beta, w1, L11i):
    """u₂, the corrected w₁ and the conditional-covariance blocks of the sparse path:
    u₂ = S₂₂⁻¹(B₂ᵧ − B₂ₓβ̂), w₁ⱼ −= GⱼBⱼΛ_r u₂ and, with P = Λ_r S₂₂⁻¹ Λ_rᵀ,
    (A⁻¹)₁ⱼ = L₁₁ⱼ⁻ᵀ(I + Gⱼ BⱼPBⱼᵀ Gⱼᵀ)L₁₁ⱼ⁻¹ — the triples give BⱼPBⱼᵀ without any
    ℓ₁ × q_r array."""
    qr, l1 = layout.q_rest, layout.n_levels[0]
    S22, B2, G = f["S22"], f["B2"], f["G"]
    p = B2.shape[1] - 1
    Li = jsl.solve_triangular(spd_cholesky(S22), jnp.eye(qr, dtype=S22.dtype), lower=True)
    Si = Li.T @ Li
    u2 = Si @ (B2[:, p] - B2[:, :p] @ beta)
    TsT = [T.T for T in f["Ts"]]
    v = _right_apply_rest(u2, TsT, layout)                      # Λ_r u₂
    Bv = jax.ops.segment_sum(stats["sp_v"] * v[stats["sp_c"]][:, None], stats["sp_j"], num_segments=l1)
    w1 = w1 - jnp.einsum("jab,jb->ja", G, Bv)
    P = _right_apply_rest(_right_apply_rest(Si, TsT, layout).T, TsT, layout).T
    dst = stats["tr_udst"][stats["tr_seg"]]
    off = (dst // qr != dst % qr).astype(S22.dtype)
    tv = stats["tr_v"]
    Pd = P.reshape(-1).at[dst].get(mode="fill", fill_value=0.0)   # 0 at padded triples
    E = jax.ops.segment_sum(Pd[:, None, None] * (tv + off[:, None, None] * jnp.swapaxes(tv, 1, 2)),
                            stats["tr_j"], num_segments=l1)
    inner = jnp.eye(layout.q[0], dtype=S22.dtype) + jnp.einsum("jab,jbc,jdc->jad", G, E, G)
    Ainv1 = jnp.einsum("jba,jbc,jcd->jad", L11i, inner, L11i)
    return u2, w1, Ainv1, Si


@partial(jax.jit, static_argnames=("layout", "reml"))
def solve(theta, stats, layout: Layout, reml: bool):
    """Everything a fitted model reports at θ: β̂, σ², Var(β̂), u, the
    conditional covariance blocks of the spherical effects, the criterion."""
    f = factorize(theta, stats, layout)
    sparse = bool(layout.q_rest) and "tr_j" in stats
    return solve_from(f, stats, stats["XX"].shape[-1], reml,
                      (lambda f_, beta, w1, L11i: _sparse_solve(f_, stats, layout, beta, w1, L11i)) if sparse else None)


def solve_from(f, stats, p, reml: bool, sparse_solve=None):
    """:func:`solve` from a factorization (``p`` the number of fixed effects; a traced
    value is fine).  ``sparse_solve``: the sparse path's later-term solve, if any."""
    n = stats["n"]
    crit = criterion(f, n, p, reml)
    sigma2 = f["r2"] / ((n - p if reml else n) if isinstance(reml, (bool, np.bool_)) else n - p * reml)
    if f["RXi"].shape[-1]:
        RXi = f["RXi"]
        beta = RXi.T @ f["z"]
        vcov = sigma2 * (RXi.T @ RXi)
        w1 = f["c1y"] - f["c1x"] @ beta
    else:
        beta = jnp.zeros((0,))
        vcov = jnp.zeros((0, 0))
        w1 = f["c1y"]
    L11i = tril_inv_small(f["L11"])
    q1 = f["L11"].shape[-1]
    if sparse_solve is not None:
        u2, w1, Ainv1, Ainv_rest = sparse_solve(f, beta, w1, L11i)
    elif "L22" in f:
        L22 = f["L22"]
        w2 = f["c2y"] - f["c2x"] @ beta
        u2 = jsl.solve_triangular(L22.T, w2, lower=False)
        w1 = w1 - jnp.einsum("jar,r->ja", f["K"], u2)
        # diagonal blocks of A⁻¹ = L⁻ᵀL⁻¹ (A = ΛᵀZᵀZΛ + I)
        L22i = f["L22i"]
        M = jnp.einsum("rs,jas->jra", L22i, f["K"])  # L22⁻¹ L21 block j: (qr, q1)
        inner = jnp.eye(q1, dtype=L22.dtype) + jnp.einsum("jra,jrb->jab", M, M)
        Ainv1 = jnp.einsum("jba,jbc,jcd->jad", L11i, inner, L11i)
        Ainv_rest = L22i.T @ L22i
    else:
        u2 = jnp.zeros((0,))
        Ainv1 = jnp.einsum("jba,jbc->jac", L11i, L11i)
        Ainv_rest = jnp.zeros((0, 0))
    u1 = jnp.einsum("jba,jb->ja", L11i, w1)
    return dict(
        criterion=crit, beta=beta, sigma2=sigma2, vcov=vcov, u1=u1, u2=u2,
        Ainv1=Ainv1, Ainv_rest=Ainv_rest, r2=f["r2"], logdet_z=f["logdet_z"],
        logdet_x=f["logdet_x"], Ts=f.get("Ts"),
    )
