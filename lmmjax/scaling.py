r"""Internal standardization of the fixed effects and the response, transformed back exactly.

The criterion is computed from cross-products (XᵀX, Xᵀy, yᵀy, ...) and Schur complements
of them, so a predictor offset far from zero (a year, a timestamp: x ≈ 10⁶ with spread 1)
or a response far from zero (y ≈ 10⁹) loses its digits to cancellation: XᵀX holds n·10¹²
where the information is n·1, and M_XX = XᵀX − c_Xᵀc_X cancels the rest.  So the fit runs
on

    X' = X C,   C = columns centred on their means (when there is an intercept column)
                    and scaled by their standard deviations,
    y' = (y − X b₀) / s_y,   b₀ the least-squares coefficients, s_y the residuals' RMS,

which is a reparametrization β = b₀ + s_y C β', σ = s_y σ', b = s_y b', θ unchanged,
and every reported quantity is transformed back exactly:

    REML:  c(θ) = c'(θ) − 2 log|det C| + (n − p) log s_y²
    ML:    c(θ) = c'(θ) + n log s_y²

(X'ᵀV⁻¹X' = Cᵀ XᵀV⁻¹X C; r² = s_y² r'²), Var(β̂) = s_y² C Var'(β̂') Cᵀ, and for
Satterthwaite M = XᵀV⁻¹Xσ² = C⁻ᵀM'C⁻¹ with the Hessian in (θ, σ) rescaled in σ.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Scale", "standardize"]


@dataclasses.dataclass(frozen=True)
class Scale:
    C: np.ndarray        # β = b0 + s_y C β'
    b0: np.ndarray
    s_y: float

    @property
    def logdet_C(self) -> float:
        return float(np.sum(np.log(np.abs(np.diag(self.C))))) if self.C.size else 0.0

    def criterion(self, c: float, n: int, p: int, reml: bool) -> float:
        """The criterion in the user's units from the standardized one."""
        if reml:
            return c - 2.0 * self.logdet_C + (n - p) * math.log(self.s_y**2)
        return c + n * math.log(self.s_y**2)

    def solution(self, sol: dict, n: int, p: int, reml: bool) -> dict:
        """A :func:`lmmjax.likelihood.solve`-style solution in the user's units."""
        s = self.s_y
        out = dict(sol)
        out["beta"] = self.b0 + s * self.C @ np.asarray(sol["beta"], float)
        out["vcov"] = s**2 * self.C @ np.asarray(sol["vcov"], float) @ self.C.T
        out["sigma2"] = s**2 * float(sol["sigma2"])
        out["r2"] = s**2 * float(sol["r2"])
        out["u1"] = s * np.asarray(sol["u1"], float)
        out["u2"] = s * np.asarray(sol["u2"], float)
        out["criterion"] = self.criterion(float(sol["criterion"]), n, p, reml)
        if reml:
            out["logdet_x"] = float(sol["logdet_x"]) - 2.0 * self.logdet_C
        return out

    def satterthwaite(self, H, dM, M):
        """(∇²d over (θ, σ), ∂M/∂(θ, σ), M) in the user's units: M = XᵀV⁻¹Xσ² = C⁻ᵀM'C⁻¹
        (σ-free), and σ = s_y σ' scales the σ row and column of the Hessian."""
        Ci = np.linalg.inv(self.C)
        M = Ci.T @ M @ Ci
        dM = np.einsum("ab,bck,cd->adk", Ci.T, dM, Ci)
        H = np.array(H, float)
        H[-1, :] /= self.s_y
        H[:, -1] /= self.s_y
        return H, dM, M


def standardize(X: np.ndarray, y: np.ndarray):
    """(X', y', Scale) for a fixed-effects matrix and a response (module docstring).

    Centring needs an intercept column (all ones): the column means are then absorbed
    by the intercept; without one, columns are only scaled (by their RMS)."""
    n, p = X.shape
    if p == 0:
        s_y = float(np.sqrt(np.mean(y * y))) or 1.0
        return X, y / s_y, Scale(np.zeros((0, 0)), np.zeros(0), s_y)
    ones = np.flatnonzero(np.all(X == 1.0, axis=0))
    if ones.size:
        i0 = ones[0]
        mean = X.mean(axis=0)
        sd = X.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        others = np.array([j for j in range(p) if j != i0], int)
        C = np.eye(p)
        C[others, others] = 1.0 / sd[others]
        C[i0, others] = -mean[others] / sd[others]
        Xs = (X - mean) / sd          # centred directly: (x − m)/s keeps the digits x/s − m/s loses
        Xs[:, i0] = 1.0
    else:
        rms = np.sqrt(np.mean(X * X, axis=0))
        C = np.diag(1.0 / np.where(rms > 0, rms, 1.0))
        Xs = X @ C
    # with an intercept, first subtract one constant (y − m is exact where y ≈ m, so a
    # response around 10⁹ keeps its digits); then least squares on X' by QR with one
    # refinement step (residuals to full precision)
    shift = np.zeros(p)
    if ones.size:
        m = float(np.mean(y))
        y = y - m
        shift[ones[0]] = m
    Q, R = np.linalg.qr(Xs)
    c = np.linalg.solve(R, Q.T @ y)
    r = y - Xs @ c
    c = c + np.linalg.solve(R, Q.T @ r)
    r = y - Xs @ c
    s_y = float(np.sqrt(np.mean(r * r)))
    if not np.isfinite(s_y) or s_y == 0.0:
        s_y = 1.0
    return Xs, r / s_y, Scale(C, C @ c + shift, s_y)


# ---------------------------------------------------------------- random-effects columns
@dataclasses.dataclass(frozen=True)
class TermScale:
    """Per random-effects term k: the fit used Z_k' = Z_k C_k (C_k None: unchanged), so
    b_k = C_k b_k' level by level.

    An unstructured Σ_k is closed under Σ = C Σ' Cᵀ, so the fitted T' (Σ' = σ²T'T'ᵀ)
    maps back through the LQ factorization C T' = T Q (T lower triangular with a
    non-negative diagonal, Q orthogonal): θ is T's lower triangle, the spherical effects
    u = Q u', and the conditional covariance blocks of u are Q A'⁻¹ Qᵀ."""

    C: tuple

    def any(self) -> bool:
        return any(c is not None for c in self.C)

    def _lq(self, Ts):
        out = []
        for C, T in zip(self.C, Ts):
            if C is None:
                out.append((T, None))
                continue
            Qt, R = np.linalg.qr((C @ T).T)          # C T = Rᵀ Qtᵀ
            L, Q = R.T, Qt.T
            sign = np.where(np.diag(L) < 0, -1.0, 1.0)
            out.append((L * sign[None, :], Q * sign[:, None]))
        return out

    def theta(self, theta_fit, layout) -> np.ndarray:
        """θ in the user's columns from the fitted θ'."""
        off = layout.theta_offsets
        parts = []
        for k, (s, (L, Q)) in enumerate(zip(layout.structures, self._lq(layout.factors_host(theta_fit)))):
            if Q is None:
                parts.append(np.asarray(theta_fit[off[k]: off[k + 1]], float))
            else:
                parts.append(np.array([L[r, c] for r, c in s.positions]))
        return np.concatenate(parts)

    def inverse(self) -> "TermScale":
        """The map from the user's θ to the fit's (for a user-given start or θ)."""
        return TermScale(tuple(None if C is None else np.linalg.inv(C) for C in self.C))

    def solution(self, sol: dict, theta_fit, layout) -> dict:
        """u, the A⁻¹ blocks and the templates in the user's columns."""
        lq = self._lq(layout.factors_host(theta_fit))
        out = dict(sol, Ts=[L for L, _ in lq])
        Q1 = lq[0][1]
        if Q1 is not None:
            out["u1"] = np.asarray(sol["u1"]) @ Q1.T
            out["Ainv1"] = np.einsum("ab,jbc,dc->jad", Q1, np.asarray(sol["Ainv1"]), Q1)
        if len(lq) > 1 and any(Q is not None for _, Q in lq[1:]):
            blocks = [np.kron(np.eye(l), Q if Q is not None else np.eye(s.q))
                      for (_, Q), s, l in zip(lq[1:], layout.structures[1:], layout.n_levels[1:])]
            B = np.zeros((layout.q_rest, layout.q_rest))
            i = 0
            for b in blocks:
                B[i:i + b.shape[0], i:i + b.shape[0]] = b
                i += b.shape[0]
            out["u2"] = B @ np.asarray(sol["u2"])
            out["Ainv_rest"] = B @ np.asarray(sol["Ainv_rest"]) @ B.T
        return out


#: a random-effects column whose SD (RMS for scaled-only terms) is beyond FAR or below
#: 1/FAR is rescaled: exact, and θ then lives on the scale the Newton steps and the
#: Hessian's difference steps assume
FAR = 1e2


def standardize_terms(blocks) -> tuple[list, TermScale]:
    """Blocks whose unstructured terms have their columns centred and scaled (when a column
    is far from centred: |mean| > 4 sd, or its scale is far from 1), whose other
    unstructured and diagonal terms have columns of RMS > 10² or < 10⁻² scaled, and the
    :class:`TermScale` that maps the fit back."""
    new, Cs = [], []
    for b in blocks:
        Zq = b.Zq
        C = None
        if type(b.structure).__name__ == "Unstructured" and Zq.shape[1] > 1:
            ones = np.flatnonzero(np.all(Zq == 1.0, axis=0))
            mean, sd = Zq.mean(axis=0), Zq.std(axis=0)
            others = np.array([j for j in range(Zq.shape[1]) if j not in set(ones[:1])], int)
            if ones.size and others.size and np.any((np.abs(mean[others]) > 4 * sd[others]) | (sd[others] > FAR)
                                                      | (sd[others] < 1 / FAR)):
                i0 = ones[0]
                sdo = np.where(sd > 0, sd, 1.0)
                C = np.eye(Zq.shape[1])
                C[others, others] = 1.0 / sdo[others]
                C[i0, others] = -mean[others] / sdo[others]
                Zs = (Zq - mean) / sdo       # = Zq C, centred directly (keeps the digits)
                Zs[:, i0] = 1.0
                new.append(dataclasses.replace(b, Zq=Zs))
                Cs.append(C)
                continue
        if type(b.structure).__name__ in ("Unstructured", "Diagonal"):
            # columns far from unit scale (a slope on a predictor around 10⁶ in (x || g)):
            # scaled only — a diagonal C keeps the structure (θ_c ↦ θ_c / s_c), and θ back
            # on the unit scale keeps the Hessian's difference steps (≈ 6e-6) well inside it
            rms = np.sqrt(np.mean(Zq * Zq, axis=0))
            far = (rms > FAR) | ((rms < 1 / FAR) & (rms > 0))
            if far.any():
                s = np.where(far, rms, 1.0)
                new.append(dataclasses.replace(b, Zq=Zq / s))
                Cs.append(np.diag(1.0 / s))
                continue
        new.append(b)
        Cs.append(C)
    return new, TermScale(tuple(Cs))


# ---------------------------------------------------------------- square-root statistics
def within_stats(block, X: np.ndarray, y: np.ndarray) -> dict:
    r"""Square-root statistics of a single-term design (no cross-products to cancel).

    Per level j, Z_j = Q_jR_j (thin QR, by modified Gram–Schmidt with one
    re-orthogonalization, vectorized over levels), a_Xj = Q_jᵀX_j, a_yj = Q_jᵀy_j, and the
    within-level residual cross-products W = Σⱼ [X_j y_j]ᵀ(I − Q_jQ_jᵀ)[X_j y_j] formed from
    the residuals themselves.  Then, with B_j = I + R_jTTᵀR_jᵀ (Woodbury, Sylvester),

        XᵀV̄⁻¹X = W_XX + Σⱼ a_Xjᵀ B_j⁻¹ a_Xj,   log|ΛᵀZᵀZΛ + I| = Σⱼ log|B_j|

    — sums of positive terms, where the cross-product form subtracts two numbers that agree
    to 1/(λ²n_j) (a residual SD 10⁻⁶ of the random effects' loses 12 digits there)."""
    idx, Z = block.index, block.Zq
    n, q = Z.shape
    L = block.n_levels
    Q = np.zeros((n, q))
    R = np.zeros((L, q, q))
    for a in range(q):
        v = Z[:, a].copy()
        for _ in range(2):                          # Gram–Schmidt twice ("twice is enough")
            for b in range(a):
                c = np.bincount(idx, Q[:, b] * v, minlength=L)
                R[:, b, a] += c
                v -= Q[:, b] * c[idx]
        nrm = np.sqrt(np.bincount(idx, v * v, minlength=L))
        ref = np.sqrt(np.bincount(idx, Z[:, a] * Z[:, a], minlength=L))
        ok = nrm > 1e-12 * np.maximum(ref, np.finfo(float).tiny)
        R[:, a, a] = np.where(ok, nrm, 0.0)
        Q[:, a] = np.where(ok[idx], v / np.where(ok, nrm, 1.0)[idx], 0.0)
    M = np.column_stack([X, y])
    A = np.stack([np.stack([np.bincount(idx, Q[:, a] * M[:, k], minlength=L) for k in range(M.shape[1])], -1)
                  for a in range(q)], 1)            # (L, q, p + 1)
    E = M - np.einsum("na,nak->nk", Q, A[idx])
    # one refinement of the projection (the residuals are small where σ is)
    A2 = np.stack([np.stack([np.bincount(idx, Q[:, a] * E[:, k], minlength=L) for k in range(M.shape[1])], -1)
                   for a in range(q)], 1)
    A, E = A + A2, E - np.einsum("na,nak->nk", Q, A2[idx])
    W = E.T @ E
    p = X.shape[1]
    return dict(R1=R, A1X=A[:, :, :p], A1y=A[:, :, p], WXX=W[:p, :p], WXy=W[:p, p], Wyy=W[p, p])
