r"""A starting θ from the design's statistics by the method of moments.

The optimizers start from a small grid of multiples of lme4's default θ (1 on template
diagonals) and keep the best point.  A moment estimate of each term's covariance is one
more grid point, usually close to the optimum: Newton then needs about half the
evaluations (sleepstudy 11 → 5, InstEval 8 → 5 gradient+Hessian evaluations).  Only a
start: the grid still competes, so a poor estimate costs one criterion evaluation.

From the cross-product statistics alone (dense or sparse, :mod:`lmmjax.design`): with the
OLS residuals r = y − Xβ̂₀ (β̂₀ = (XᵀX)⁻¹Xᵀy), each level l of term t gives its
least-squares coefficients b̂_tl = D_tl⁻¹Z_tlᵀr (D_tl = Z_tlᵀZ_tl, levels of full rank).
Ignoring the other terms, b̂_tl scatters as Σ_t + σ²D_tl⁻¹ (Swamy 1970, Econometrica
38(2), 311–323), so with V_t = mean_l b̂_tl b̂_tlᵀ and H_t = mean_l D_tl⁻¹

    Σ̂_t = V_t − σ̂² H_t,

and E[rᵀr] ≈ Σ_t tr(Σ_t G_t) + nσ² (G_t = Σ_l D_tl) gives the residual variance

    σ̂² = (rᵀr − Σ_t tr(V_t G_t)) / (n − Σ_t tr(H_t G_t)).

A single-term design uses the within-level residual variance instead (rᵀr − Σ_l b̂_lᵀD_l b̂_l
over n − p − mq), which is exact in that case.  Where every term is a scalar (crossed or
nested random intercepts) a level mean of term t also averages the other terms' effects:
V_t = σ²_t + Σ_u c_tu σ²_u + h_tσ² with c_tu = mean_l Σ_k (n_lk/n_l)² from the co-occurrence
counts, which with rᵀr/n = Σ_t σ²_t + σ² is a (T + 1)-square linear system (in the spirit of
Henderson's 1953 method 1, Biometrics 9(2), 226–252).  Each Σ̂_t/σ̂² (eigenvalues floored at 1e-4) is
mapped to its template: the Cholesky factor for unstructured terms, square roots of the
diagonal for diagonal ones; other structures keep their default start.
"""
from __future__ import annotations

import numpy as np

__all__ = ["moment_theta"]

#: eigenvalue floor of Σ̂_t/σ̂² (a start exactly on the boundary has a zero gradient there)
FLOOR = 1e-4


def _level_blocks(stats: dict, layout):
    """(D, ZX, Zy) per level of each term: (ℓ, q, q), (ℓ, q, p), (ℓ, q) arrays."""
    out = [(np.asarray(stats["D1"], float), np.asarray(stats["Z1X"], float), np.asarray(stats["Z1y"], float))]
    if layout.q_rest:
        ZrZr, ZrX, Zry = (np.asarray(stats[k], float) for k in ("ZrZr", "ZrX", "Zry"))
        off = 0
        for l, q in zip(layout.n_levels[1:], layout.q[1:]):
            idx = off + np.arange(l)[:, None] * q + np.arange(q)[None, :]
            out.append((ZrZr[idx[:, :, None], idx[:, None, :]], ZrX[idx], Zry[idx]))
            off += l * q
    return out


def _crossing(stats: dict, layout) -> np.ndarray:
    """c_tu = mean over the levels l of term t of Σ_k (n_lk/n_l)², n_lk the rows level l of
    term t shares with level k of term u (scalar terms): the share of term u's variance
    in a level mean of term t."""
    T = len(layout.q)
    bounds = np.cumsum([0] + list(layout.n_levels[1:]))
    ZrZr = np.asarray(stats["ZrZr"], float)
    n1 = np.asarray(stats["D1"], float)[:, 0, 0]
    nr = np.diag(ZrZr)
    if "sp_j" in stats:
        j, c, v = (np.asarray(stats[k]) for k in ("sp_j", "sp_c", "sp_v"))
        v = v[:, 0].astype(float)
    else:
        N1r = np.asarray(stats["Z1Zr"], float)[:, 0, :]
        j, c = np.nonzero(N1r)
        v = N1r[j, c]
    C = np.zeros((T, T))
    for u in range(1, T):
        a, b = bounds[u - 1], bounds[u]
        inu = (c >= a) & (c < b)
        C[0, u] = np.mean(np.bincount(j[inu], v[inu] ** 2, minlength=n1.size) / np.maximum(n1, 1) ** 2)
        C[u, 0] = np.mean(np.bincount(c[inu] - a, v[inu] ** 2, minlength=b - a) / np.maximum(nr[a:b], 1) ** 2)
        for w in range(1, T):
            if w != u:
                a2, b2 = bounds[w - 1], bounds[w]
                C[u, w] = np.mean(np.sum(ZrZr[a:b, a2:b2] ** 2, axis=1) / np.maximum(nr[a:b], 1) ** 2)
    return C


def _scalar_variances(terms, C, rr, n):
    """Henderson-type moment equations for scalar terms: V_t = σ²_t + Σ_u c_tu σ²_u + h_t σ²
    (level means of term t also average the other terms' effects and the noise) and
    rᵀr/n = Σ_t σ²_t + σ², solved for (σ²_1, …, σ²_T, σ²)."""
    T = len(terms)
    A = np.zeros((T + 1, T + 1))
    A[:T, :T] = C + np.eye(T)
    A[:T, T] = [float(H[0, 0]) for _, H, *_ in terms]
    A[T, :] = 1.0
    rhs = np.r_[[float(V[0, 0]) for V, *_ in terms], rr / n]
    return np.linalg.solve(A, rhs)


def _theta_of(structure, C: np.ndarray):
    """θ of one term whose T Tᵀ should be C, or its default start for a structure that is
    not a scatter of θ into a lower-triangular or diagonal template."""
    pos = getattr(structure, "positions", None)
    q = C.shape[0]
    if type(structure).__name__ == "HomDiagonal":
        return np.array([np.sqrt(np.mean(np.diag(C)))])
    if pos is None:
        return np.asarray(structure.init(), float)
    k = structure.n_params
    theta = np.zeros(k)
    if all(r == c for r, c in pos):
        cnt = np.zeros(k)
        for i, (r, _) in enumerate(pos):
            theta[i] += C[r, r]
            cnt[i] += 1
        return np.sqrt(theta / np.maximum(cnt, 1))
    if len(pos) == q * (q + 1) // 2 and all(r >= c for r, c in pos):
        L = np.linalg.cholesky(C)
        return np.array([L[r, c] for r, c in pos])
    return np.asarray(structure.init(), float)


def moment_theta(stats: dict, layout):
    """The moment estimate of θ (module docstring), or None where it cannot be formed
    (too few levels of full rank, no residual degrees of freedom, non-finite numbers)."""
    try:
        XX, Xy = np.asarray(stats["XX"], float), np.asarray(stats["Xy"], float)
        n, p = float(stats["n"]), XX.shape[0]
        beta = np.linalg.lstsq(XX, Xy, rcond=None)[0] if p else np.zeros(0)
        rr = float(stats["yy"]) - beta @ Xy
        terms = []
        for D, ZX, Zy in _level_blocks(stats, layout):
            q = D.shape[-1]
            s = Zy - np.einsum("lqp,p->lq", ZX, beta)
            w = np.linalg.eigvalsh(D)
            ok = w[:, 0] > 1e-8 * np.maximum(w[:, -1], 1e-300)
            m = int(ok.sum())
            if m < q + 1:
                return None
            Dinv = np.linalg.inv(D[ok])
            b = np.einsum("lab,lb->la", Dinv, s[ok])
            terms.append((b.T @ b / m, Dinv.mean(axis=0), D[ok].sum(axis=0), np.einsum("la,la->", s[ok], b), m * q))
        scalar = None
        if len(terms) == 1:
            s2 = (rr - terms[0][3]) / (n - p - terms[0][4])
        elif all(q == 1 for q in layout.q):
            sol = _scalar_variances(terms, _crossing(stats, layout), rr, n)
            s2, scalar = sol[-1], sol[:-1]
        else:
            s2 = (rr - sum(np.trace(V @ G) for V, _, G, _, _ in terms)) / (n - sum(np.trace(H @ G) for _, H, G, _, _ in terms))
            if not s2 > 0:      # the other terms' variance swamps the total: the first term's within variance
                s2 = (rr - terms[0][3]) / (n - p - terms[0][4])
        if not (np.isfinite(s2) and s2 > 0):
            return None
        out = []
        for t, ((V, H, _, _, _), structure) in enumerate(zip(terms, layout.structures)):
            C = (V - s2 * H) / s2 if scalar is None else np.array([[scalar[t] / s2]])
            wc, U = np.linalg.eigh(0.5 * (C + C.T))
            out.append(_theta_of(structure, (U * np.maximum(wc, FLOOR)) @ U.T))
        theta = np.concatenate(out)
    except (np.linalg.LinAlgError, ValueError, KeyError):
        return None
    return theta if theta.shape == (layout.n_theta,) and np.all(np.isfinite(theta)) else None
