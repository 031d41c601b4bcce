r"""Kenward-Roger's pieces for a model whose V has the mixed-model form ZDZᵀ + σ²I, in
closed form: one implementation for :func:`lmmjax.lmer` (:class:`~lmmjax.inference.InferenceMixin`)
and :func:`lmmjax.lmer_batch` (:func:`lmmjax.batchfit.batch_kr_program`, vmapped over responses).

pbkrtest's natural parameters φ = (entries of each Σ_k, σ²) make V linear, V = Σ_i φ_i G_i
(:func:`kr_linear`: M = XᵀV⁻¹X, P_i = ∂M/∂φ_i, ∂²M and the expected information, from the
q × q cross-products by the Woodbury identity; Kenward & Roger 1997, Halekoh & Højsgaard
2014).  Structures nonlinear in their own parameters (cs, ar1: variances and ρ) are handled
by the chain rule through the coordinates s in which V is linear (:func:`kr_structured`):
with J = ∂s/∂φ and S_a = ∂²s_a/∂φ∂φᵀ,

    P_φ = P_s J,   ∂²M_φ = Jᵀ ∂²M_s J + Σ_a P_s,a S_a,   R = −Σ_a P_s,a S_a,   I_E,φ = Jᵀ I_E,s J

(R_ij = XᵀV⁻¹V_ijV⁻¹X: K&R's second-derivative terms; I_E stays the expected information
½ tr(ΠV_iΠV_j), in which V_ij does not enter).  Residual-structure models (V_g not of this
form) have their own pieces in :mod:`lmmjax.gls`; all of them meet in
:func:`lmmjax.inference.kr_adjusted`.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ._linalg import UNROLL_MAX, chol_small, spd_solve, tril_inv_small
from .covariance import Unstructured
from .likelihood import Layout

__all__ = ["basis_matrices", "kr_linear", "kr_structured", "linear_coordinates"]


def basis_matrices(layout: Layout) -> np.ndarray:
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


def kr_linear(Ts, sigma, dense, E, n_levels):
    r"""Kenward-Roger pieces for one response whose V is linear in pbkrtest's natural
    parameters φ = (entries of each Σ_k, σ²), in closed form — no autodiff, no
    differences.  V = Σ_i φ_i G_i with G_i = Z E_i Zᵀ and G_σ² = I.

    With Λ = blockdiag_k(I_ℓk ⊗ T_k) (``Ts``: the terms' templates, Σ_k = σ²T_kT_kᵀ), A = ΛᵀZᵀZΛ + I and N = ΛA⁻¹Λᵀ, σ²V⁻¹ = I − ZNZᵀ (Woodbury), so every
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
    dt = ZtZ.dtype
    Lam = jsl.block_diag(*[jnp.kron(jnp.eye(l, dtype=dt), T) for T, l in zip(Ts, n_levels)])
    A = Lam.T @ ZtZ @ Lam + jnp.eye(q, dtype=dt)
    single = len(Ts) == 1
    N = Lam @ _spd_inverse(A, (n_levels[0], Ts[0].shape[0]) if single else None) @ Lam.T
    ZN = ZtZ @ N                                   # ZᵀZ N
    I_ZN = jnp.eye(q, dtype=dt) - ZN
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


def linear_coordinates(layout: Layout):
    """For a layout with nonlinear structures (cs, ar1): the map φ → s (each Σ_k's
    lower triangle, then σ²) and the all-unstructured layout in which V is linear in s;
    ``None`` when every structure is linear already."""
    if all(getattr(s, "linear", True) for s in layout.structures):
        return None
    lin = Layout(tuple(Unstructured(s.q) for s in layout.structures), layout.n_levels)

    def s_of(phi):
        out, off = [], 0
        for st, u in zip(layout.structures, lin.structures):
            out.append(u.natural_from_cov(st.cov_from_natural(phi[off: off + st.n_natural])))
            off += st.n_natural
        return jnp.concatenate(out + [phi[-1:]])

    return s_of, lin


@partial(jax.jit, static_argnames=("layout",))
def kr_structured(Ts, phi, dense, layout: Layout):
    """(M, P, ∂²M, I_E, R) at φ (the structures' natural parameters, then σ²) for one
    model: :func:`kr_linear` in the coordinates where V is linear, then the chain rule
    (module docstring).  ``Ts``: the fitted templates; ``dense``: the cross-products of
    :func:`lmmjax.inference.dense_crossproducts`."""
    sigma = jnp.sqrt(phi[-1])
    lin = linear_coordinates(layout)
    if lin is None:
        M, P, HM, IE = kr_linear(Ts, sigma, dense, jnp.asarray(basis_matrices(layout), phi.dtype), layout.n_levels)
        return M, P, HM, IE, jnp.zeros_like(HM)
    s_of, lay = lin
    M, Ps, HMs, IEs = kr_linear(Ts, sigma, dense, jnp.asarray(basis_matrices(lay), phi.dtype), layout.n_levels)
    J = jax.jacfwd(s_of)(phi)                       # (n_s, k)
    S = jax.hessian(s_of)(phi)                      # (n_s, k, k)
    PS = jnp.einsum("pqa,aij->pqij", Ps, S)
    P = jnp.einsum("pqa,ai->pqi", Ps, J)
    HM = jnp.einsum("pqab,ai,bj->pqij", HMs, J, J) + PS
    IE = J.T @ IEs @ J
    return M, P, HM, IE, -PS
