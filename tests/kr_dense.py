"""Kenward & Roger (1997) written out on n × n matrices — the test reference for the
cross-product (lmer) and per-group (gls) implementations in lmmjax."""
import jax
import jax.numpy as jnp
import numpy as np


def dense_kr(V_of, phi, X):
    """For V(φ) (an n × n function) at φ: V_i and V_ij by autodiff, P_i = −XᵀV⁻¹V_iV⁻¹X,
    Q_ij = XᵀV⁻¹V_iV⁻¹V_jV⁻¹X, R_ij = XᵀV⁻¹V_ijV⁻¹X, I_E = ½ tr(ΠV_iΠV_j) (Π the REML
    projection), W = I_E⁻¹, Φ_A = Φ + 2Φ[Σ W_ij (Q_ij − P_iΦP_j − ¼R_ij)]Φ.
    Returns Φ_A, W and Φ_A without the R terms (call under float64)."""
    V = V_of(phi)
    Vi = jnp.moveaxis(jax.jacfwd(V_of)(phi), -1, 0)                               # (k, n, n)
    Vij = jnp.moveaxis(jax.jacfwd(jax.jacfwd(V_of))(phi), (-2, -1), (0, 1))       # (k, k, n, n)
    Vinv = jnp.linalg.inv(V)
    VX = Vinv @ X
    Phi = jnp.linalg.inv(X.T @ VX)
    Pi = -jnp.einsum("na,knm,mb->kab", VX, Vi, VX)
    Q = jnp.einsum("na,inm,ml,jlo,ob->ijab", VX, Vi, Vinv, Vi, VX)
    R = jnp.einsum("na,ijnm,mb->ijab", VX, Vij, VX)
    Proj = Vinv - VX @ Phi @ VX.T
    PV = jnp.einsum("nm,kml->knl", Proj, Vi)
    IE = 0.5 * jnp.einsum("inm,jmn->ij", PV, PV)
    W = jnp.linalg.inv(IE)
    U = jnp.einsum("ij,ijab->ab", W, Q) - jnp.einsum("ij,iab,bc,jcd->ad", W, Pi, Phi, Pi)
    PhiA = Phi + 2.0 * Phi @ (U - 0.25 * jnp.einsum("ij,ijab->ab", W, R)) @ Phi
    PhiA_no_R = Phi + 2.0 * Phi @ U @ Phi
    return np.asarray(PhiA), np.asarray(W), np.asarray(PhiA_no_R)
