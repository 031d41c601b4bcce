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
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ._linalg import chol_inv, chol_small, tril_inv_small

__all__ = ["Layout", "factorize", "objective", "solve"]

#: fixed-effects counts up to this use the unrolled p × p Cholesky (fast under vmap,
#: bigger programs); larger p uses LAPACK
UNROLL_P = 3


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


def factorize(theta, stats, layout: Layout):
    """Blocked Cholesky of the penalized system at ``theta``.

    Returns a dict of pieces used by :func:`objective` and :func:`solve`.
    """
    Ts = layout.factors(theta)
    T1 = Ts[0]
    q1 = layout.q[0]
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
    out = dict(Ts=Ts, L11=L11, c1x=c1x, c1y=c1y)
    if layout.q_rest:
        K = jnp.einsum("jac,jcr->jar", G, _right_apply_rest(stats["Z1Zr"], Ts, layout))
        K2 = K.reshape(-1, layout.q_rest)  # (ℓ₁q₁, q_r): the products below are plain GEMMs
        ZrZr = _right_apply_rest(stats["ZrZr"], Ts, layout)
        ZrZr = _right_apply_rest(ZrZr.T, Ts, layout)
        S22 = ZrZr + jnp.eye(layout.q_rest, dtype=T1.dtype) - K2.T @ K2
        L22, L22i = chol_inv(S22)
        ZrX = _right_apply_rest(stats["ZrX"].T, Ts, layout).T
        Zry = _right_apply_rest(stats["Zry"], Ts, layout)
        c2x = L22i @ (ZrX - K2.T @ c1x.reshape(K2.shape[0], -1))
        c2y = L22i @ (Zry - K2.T @ c1y.reshape(-1))
        Mxx = Mxx - c2x.T @ c2x
        Mxy = Mxy - c2x.T @ c2y
        Myy = Myy - c2y @ c2y
        logdet_z = logdet_z + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L22)))
        out.update(K=K, L22=L22, L22i=L22i, c2x=c2x, c2y=c2y)
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
    """−2 log-likelihood (ML) or REML criterion from a factorization ``f``."""
    if reml:
        nu = n - p
        return f["logdet_z"] + f["logdet_x"] + nu * (1.0 + jnp.log(2.0 * math.pi * f["r2"] / nu))
    return f["logdet_z"] + n * (1.0 + jnp.log(2.0 * math.pi * f["r2"] / n))


def objective(theta, stats, layout: Layout, reml: bool):
    """Profiled deviance (ML) or REML criterion as a function of θ."""
    p = stats["XX"].shape[-1]
    return criterion(factorize(theta, stats, layout), stats["n"], p, reml)


@partial(jax.jit, static_argnames=("layout", "reml"))
def solve(theta, stats, layout: Layout, reml: bool):
    """Everything a fitted model reports at θ: β̂, σ², Var(β̂), u, the
    conditional covariance blocks of the spherical effects, the criterion."""
    f = factorize(theta, stats, layout)
    n = stats["n"]
    p = stats["XX"].shape[-1]
    crit = criterion(f, n, p, reml)
    sigma2 = f["r2"] / (n - p if reml else n)
    if p:
        RXi = f["RXi"]
        beta = RXi.T @ f["z"]
        vcov = sigma2 * (RXi.T @ RXi)
        w1 = f["c1y"] - f["c1x"] @ beta
    else:
        beta = jnp.zeros((0,))
        vcov = jnp.zeros((0, 0))
        w1 = f["c1y"]
    L11i = tril_inv_small(f["L11"])
    if layout.q_rest:
        L22 = f["L22"]
        w2 = f["c2y"] - f["c2x"] @ beta
        u2 = jsl.solve_triangular(L22.T, w2, lower=False)
        w1 = w1 - jnp.einsum("jar,r->ja", f["K"], u2)
        # diagonal blocks of A⁻¹ = L⁻ᵀL⁻¹ (A = ΛᵀZᵀZΛ + I)
        L22i = f["L22i"]
        M = jnp.einsum("rs,jas->jra", L22i, f["K"])  # L22⁻¹ L21 block j: (qr, q1)
        inner = jnp.eye(layout.q[0], dtype=L22.dtype) + jnp.einsum("jra,jrb->jab", M, M)
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
        logdet_x=f["logdet_x"], Ts=f["Ts"],
    )
