r"""Small-sample inference for fixed effects: Satterthwaite (autodiff) and Kenward-Roger.

**Satterthwaite** (Kuznetsova, Brockhoff & Christensen 2017, lmerTest).  With
variance parameters ψ = (θ, σ) and the *unprofiled* criterion

    d(ψ) = log|L_Z|² + r²(θ)/σ² + n log(2πσ²)   [ML]
    d(ψ) += log|R_X|² − p log(2πσ²)             [REML]

(r² the penalized RSS at β̂(θ)), A = 2 H⁻¹ with H the *observed* Hessian of d at ψ̂
(pseudo-inverse over eigenvalues > 1e-8, as lmerTest) and C(ψ) = σ² R_X⁻¹R_X⁻ᵀ.
For a contrast l: df = 2 (lᵀCl)² / (gᵀAg), g_i = lᵀ (∂C/∂ψ_i) l.  H and ∂C/∂ψ are
exact (jax.hessian / jax.jacfwd), where lmerTest uses finite differences.
Multi-row L: eigen-decompose LCLᵀ into q independent t-tests and pool their dfs
(lmerTest's ``contestMD``).

**Kenward-Roger** (Kenward & Roger 1997; pbkrtest, Halekoh & Højsgaard 2014), the
variant pbkrtest implements: natural parameters φ = (entries of each Σ_k, σ²), in
which V(φ) = Σ_k Z_k(I⊗Σ_k)Z_kᵀ + σ²I is *linear*, so the second-derivative terms
R_ij vanish; *expected* information.  With M(φ) = XᵀV⁻¹X, Φ = M⁻¹:

    P_i  = ∂M/∂φ_i
    Σ_ij W_ij Q_ij = ½ Σ_ij W_ij ∂²M/∂φ_i∂φ_j     (exact when V is linear)
    I_E  = ½ tr(P G_i P G_j) = −½ ∂²[log|V| + log|M|]/∂φ_i∂φ_j   (P the REML projection)
    W    = I_E⁻¹,   Φ_A = Φ + 2Φ[Σ W_ij (Q_ij − P_iΦP_j)]Φ

and the scaled F / denominator df of K&R's eq. (1997, sec. 4).

**Structures nonlinear in their parameters** (cs, ar1: φ_k = (variances, ρ)): the full
K&R (1997) adjustment, which pbkrtest never needs, in the structures' natural
parameters —

    Φ_A = Φ + 2Φ[Σ W_ij (Q_ij − P_iΦP_j − ¼R_ij)]Φ,   R_ij = XᵀV⁻¹(∂²V/∂φ_i∂φ_j)V⁻¹X,
    I_E = ½ tr(P V_i P V_j)  (expected information, not −½ ∂²ld, which adds ½tr(P V_ij)),

with R obtained by the chain rule through the coordinates s in which V is linear.  The R terms make the adjustment depend on the
parameterization: ours is (variances, correlation), as K&R's own examples.  For linear
structures R = 0 and this is exactly pbkrtest.  The pieces (M, P, ∂²M, I_E,
R) come in closed form from the q × q cross-products (:mod:`lmmjax.kenward_roger`, the
same code as the batch's); nothing of size n × n is formed.
"""
from __future__ import annotations

from functools import partial

import jax
import numpy as np

from . import _export
from .tables import Table
from ._compute import precision, to_device
from ._dist import f_sf, t_ppf, t_sf
from .kenward_roger import kr_structured
from .likelihood import Layout, factorize, sparse_satterthwaite, unprofiled_deviance

__all__ = ["satterthwaite_derivatives", "satterthwaite_test", "kr_test", "kr_adjusted",
           "natural_parameters", "dense_crossproducts"]

EIG_TOL = 1e-8  # lmerTest's tolerance for the eigenvalues of H


# ------------------------------------------------------------ Satterthwaite
def _unprofiled_criterion(vp, stats, layout: Layout, reml: bool):
    """d(θ, σ) and, as auxiliary output, M(θ) = XᵀV⁻¹X·σ² (both from one factorization)."""
    theta, sigma = vp[:-1], vp[-1]
    f = factorize(theta, stats, layout)
    return unprofiled_deviance(f, stats["n"], stats["XX"].shape[-1], sigma, reml), f["Mxx"]


def t_columns(beta, se, df, level: float = 0.95) -> dict:
    """t, two-sided p and the ``level`` confidence limits of estimates with SEs and dfs."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = beta / se
        crit = t_ppf(0.5 + level / 2, df)
        return {"t": t, "p": 2 * t_sf(np.abs(t), df), "lower": beta - crit * se, "upper": beta + crit * se}


@partial(jax.jit, static_argnames=("layout", "reml"))
def _satterthwaite_program(vp, stats, layout: Layout, reml: bool):
    grad_and_m = jax.grad(_unprofiled_criterion, has_aux=True)
    H, dM = jax.jacfwd(grad_and_m)(vp, stats, layout, reml)
    return H, dM, grad_and_m(vp, stats, layout, reml)[1]


def satterthwaite_derivatives(vp, stats, layout: Layout, reml: bool):
    """(H, J): the exact Hessian of d(θ, σ) and the Jacobian of C = Var(β̂) = σ²M⁻¹,
    shape (p, p, k+1), with ∂C/∂θ_i = −σ²M⁻¹(∂M/∂θ_i)M⁻¹ and ∂C/∂σ = 2σM⁻¹.  One
    compiled forward-over-reverse pass gives H and ∂M together."""
    program = sparse_satterthwaite if "tr_v" in stats else _satterthwaite_program
    H, dM, M = (np.asarray(a, float) for a in program(vp, stats, layout, reml))
    return H, satterthwaite_jacobian(dM, M, float(vp[-1]))


def satterthwaite_jacobian(dM, M, sigma: float) -> np.ndarray:
    """∂C/∂(θ, σ) for C = σ²M⁻¹ from ∂M/∂(θ, σ) (its σ slice is not used: M is free of σ)."""
    Minv = np.linalg.inv(M)
    J = -sigma**2 * np.einsum("ab,bci,cd->adi", Minv, dM, Minv)
    J[..., -1] = 2 * sigma * Minv
    return J


def vcov_varpar(H: np.ndarray) -> np.ndarray:
    """A = 2 H⁻¹ with lmerTest's Moore-Penrose treatment of tiny eigenvalues
    (``H`` may carry leading batch axes)."""
    w, U = np.linalg.eigh(0.5 * (H + np.swapaxes(H, -1, -2)))
    winv = np.where(w > EIG_TOL, 1.0 / np.where(w > EIG_TOL, w, 1.0), 0.0)
    return 2.0 * np.einsum("...ik,...k,...jk->...ij", U, winv, U)


def _satt_df_rows(L, C, J, A):
    """Satterthwaite df for each row of L (independent contrasts); C, J, A may carry
    leading batch axes (the result then has them too: (..., rows))."""
    var = np.einsum("ri,...ij,rj->...r", L, C, L)
    g = np.einsum("ri,...ijk,rj->...rk", L, J, L)
    denom = np.einsum("...rk,...kl,...rl->...r", g, A, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.0 * var**2 / denom


def pooled_ddf(nu: np.ndarray, tol: float = 1e-8, valid=None) -> np.ndarray:
    """Denominator df of an F statistic from q t-statistics' dfs (lmerTest's rule):
    equal dfs → that df; any df ≤ 2 → 2; else 2E/(E − q) with E = Σ ν/(ν − 2).
    ``nu`` (..., q); ``valid`` masks the entries that count (default all)."""
    nu = np.asarray(nu, float)
    valid = np.ones(nu.shape, bool) if valid is None else valid
    q = valid.sum(axis=-1)
    big = np.where(valid, nu, -np.inf).max(axis=-1)
    small = np.where(valid, nu, np.inf).min(axis=-1)
    mean = np.where(valid, nu, 0.0).sum(axis=-1) / np.maximum(q, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        E = np.where(valid, nu / (nu - 2), 0.0).sum(axis=-1)
        pooled = 2 * E / (E - q)
    out = np.where(small <= 2, 2.0, pooled)
    out = np.where((q == 1) | (big - small < tol), mean, out)
    return out if out.ndim else float(out)


def satterthwaite_test(L, beta, C, J, A) -> dict:
    """F test of Lβ = 0 with Satterthwaite df (lmerTest's ``contestMD``): LCLᵀ is
    eigen-decomposed into independent t-tests whose dfs are pooled.  ``beta``, C, J, A
    may carry a leading batch axis (one test per response; the values are then arrays)."""
    L = np.atleast_2d(np.asarray(L, float))
    single = np.ndim(beta) == 1
    beta, C, J, A = (np.asarray(a, float)[None] if single else np.asarray(a, float) for a in (beta, C, J, A))
    VL = np.einsum("ri,gij,sj->grs", L, C, L)
    d, P = np.linalg.eigh(VL)
    d, P = d[:, ::-1], P[:, :, ::-1]                       # descending
    pos = d > np.maximum(np.finfo(float).eps ** 0.5 * d[:, :1], 0)
    q = pos.sum(axis=1)
    PtL = np.einsum("grs,ri->gsi", P, L)                   # rows: the independent contrasts
    with np.errstate(divide="ignore", invalid="ignore"):
        t2 = np.where(pos, np.einsum("gsi,gi->gs", PtL, beta) ** 2 / d, 0.0)
    F = t2.sum(axis=1) / np.maximum(q, 1)
    var = np.einsum("gsi,gij,gsj->gs", PtL, C, PtL)
    gk = np.einsum("gsi,gijk,gsj->gsk", PtL, J, PtL)
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = 2.0 * var**2 / np.einsum("gsk,gkl,gsl->gs", gk, A, gk)
    ddf = pooled_ddf(nu, valid=pos)
    ddf = np.atleast_1d(ddf)
    out = dict(F=F, num_df=q, den_df=ddf, p=np.asarray(f_sf(F, q, ddf), float))
    return {k: (v[0].item() if single else v) for k, v in out.items()}


# ------------------------------------------------------------ multiplicity adjustments
def p_adjust(p, method: str, n: int | None = None) -> np.ndarray:
    """R's ``p.adjust`` for one family: "bonferroni", "holm", "hochberg", "BH" (= "fdr"),
    "BY", "none".  NaN entries stay NaN; ``n`` (default: the number of the others) is the
    family size, as emmeans passes it (a non-estimable contrast still counts)."""
    p = np.asarray(p, float)
    out = p.copy()
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    n = m if n is None else int(n)
    if method == "none" or m == 0:
        return out
    if method == "bonferroni":
        out[ok] = np.minimum(1.0, n * q)
        return out
    if method == "holm":                                   # ascending, factors n, n-1, ...
        o = np.argsort(q, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate((n - np.arange(m)) * q[o]))
    else:                                                  # descending, ranks m, m-1, ..., 1
        o = np.argsort(-q, kind="stable")
        rank = np.arange(m, 0, -1)
        if method == "hochberg":
            fac = n - rank + 1.0
        elif method in ("BH", "fdr"):
            fac = n / rank
        elif method == "BY":
            fac = np.sum(1.0 / np.arange(1, n + 1)) * n / rank
        else:
            raise ValueError(f"unknown p-value adjustment {method!r}")
        adj = np.minimum(1.0, np.minimum.accumulate(fac * q[o]))
    res = np.empty(m)
    res[o] = adj
    out[ok] = res
    return out


# ------------------------------------------------------------ Kenward-Roger
def natural_parameters(Ts, sigma: float, layout: Layout, theta=None) -> np.ndarray:
    """φ: for each term the free entries of Σ_k = σ²T_kT_kᵀ (the structure's own
    natural parameters, lme4 order), then σ².  ``Ts``: the fitted templates (numpy);
    structures with ``natural_from_params`` (variances and ρ) read them from ``theta``."""
    off = np.cumsum([0] + [s.n_params for s in layout.structures])
    out = [s.natural_from_params(theta[off[k]: off[k + 1]], sigma**2)
           if theta is not None and hasattr(s, "natural_from_params") else s.natural_from_cov(sigma**2 * T @ T.T)
           for k, (s, T) in enumerate(zip(layout.structures, Ts))]
    return np.concatenate(out + [np.array([sigma**2])])


def dense_crossproducts(stats: dict, layout: Layout) -> dict:
    """ZᵀZ (q × q), ZᵀX, XᵀX and n assembled from the blocked statistics (host side)."""
    D1 = np.asarray(stats["D1"])
    l1, q1, _ = D1.shape
    Z1X = np.asarray(stats["Z1X"]).reshape(l1 * q1, -1)
    blocks = np.zeros((l1 * q1, l1 * q1))
    for j in range(l1):
        blocks[j * q1 : (j + 1) * q1, j * q1 : (j + 1) * q1] = D1[j]
    if layout.q_rest:
        from .design import dense_z1zr

        Z1Zr = dense_z1zr(stats).reshape(l1 * q1, -1)
        ZtZ = np.block([[blocks, Z1Zr], [Z1Zr.T, np.asarray(stats["ZrZr"])]])
        ZtX = np.vstack([Z1X, np.asarray(stats["ZrX"])])
    else:
        ZtZ, ZtX = blocks, Z1X
    return dict(ZtZ=ZtZ, ZtX=ZtX, XX=np.asarray(stats["XX"]), n=float(stats["n"]))


def kr_adjusted(M, P, HM, IE, R=None):
    """Φ, Φ_A (pbkrtest's ``vcovAdj``; with K&R's −¼R_ij terms when ``R`` is given), W,
    and P (as (…, k, p, p)) as numpy arrays; every input may carry leading batch axes.

    Φ_A = Φ + 2Φ[Σ_ij W_ij (Q_ij − P_iΦP_j − ¼R_ij)]Φ with Σ W_ij Q_ij = ½ Σ W_ij (HM_ij + R_ij)
    (∂²M/∂φ_i∂φ_j = Q_ij + Q_ji − R_ij), i.e. the bracket is ½W·HM + ¼W·R − W·PΦP."""
    M, P, HM, IE = (np.asarray(a, float) for a in (M, P, HM, IE))
    Phi = np.linalg.inv(M)
    Phi = 0.5 * (Phi + np.swapaxes(Phi, -1, -2))
    IE2 = 2.0 * IE
    ev = np.linalg.eigvalsh(IE2)
    well = (np.min(np.abs(ev), axis=-1) > 1e-10)[..., None, None]
    W = 2.0 * np.where(well, np.linalg.inv(np.where(well, IE2, np.eye(IE2.shape[-1]))), np.linalg.pinv(IE2))
    Pk = np.moveaxis(P, -1, -3)                     # (…, k, p, p)
    PPhiP = np.einsum("...iab,...bc,...jcd->...ijad", Pk, Phi, Pk)
    U = 0.5 * np.einsum("...ij,...abij->...ab", W, HM) - np.einsum("...ij,...ijad->...ad", W, PPhiP)
    if R is not None:
        U = U + 0.25 * np.einsum("...ij,...abij->...ab", W, np.asarray(R, float))
    PhiA = Phi + 2.0 * Phi @ U @ Phi
    return Phi, 0.5 * (PhiA + np.swapaxes(PhiA, -1, -2)), W, Pk


def kr_test(L, beta, Phi, PhiA, W, Pk) -> dict:
    """Kenward-Roger F test of Lβ = 0 (scaled F and denominator df; pbkrtest's KRmodcomp).
    ``beta`` and the KR pieces may carry one leading batch axis (values are then arrays)."""
    L = np.atleast_2d(np.asarray(L, float))
    single = np.ndim(beta) == 1
    beta, Phi, PhiA, W, Pk = (np.asarray(a, float)[None] if single else np.asarray(a, float)
                              for a in (beta, Phi, PhiA, W, Pk))
    q = int(np.linalg.matrix_rank(L))
    Theta = np.einsum("ai,gab,bj->gij", L, np.linalg.inv(L @ Phi @ L.T), L)
    TP = Theta @ Phi
    U = np.einsum("gab,gibc,gcd->giad", TP, Pk, Phi)    # Θ Φ P_i Φ
    tr = np.einsum("giaa->gi", U)
    A1 = np.einsum("gij,gi,gj->g", W, tr, tr)
    A2 = np.einsum("gij,giab,gjba->g", W, U, U)
    B = (A1 + 6 * A2) / (2 * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0 = 1 + c1 * B
        V0 = np.where(np.abs(V0) < 1e-10, 0.0, V0)
        V1, V2 = 1 - c2 * B, 1 - c3 * B
        ratio = np.where(V1 == 0, 0.0, (1 - A2 / q) / V1)
        rho = ratio**2 * V0 / V2 / q
        ddf = 4 + (q + 2) / (q * rho - 1)
        scale = np.where(np.abs(ddf - 4) < 1e-2, 1.0, ddf * (1 - A2 / q) / (ddf - 2))
    Lb = beta @ L.T
    wald = np.einsum("ga,ga->g", Lb, np.linalg.solve(L @ PhiA @ L.T, Lb[..., None])[..., 0])
    F = scale * wald / q
    out = dict(F=F, num_df=np.full(F.shape, q), den_df=ddf, p=np.asarray(f_sf(F, q, ddf), float), F_scaling=scale)
    return {k: (v[0].item() if single else v) for k, v in out.items()}


# ------------------------------------------------------------ model-level API
_DDF = {
    "satterthwaite": "satterthwaite", "kenward-roger": "kenward-roger", "kr": "kenward-roger",
    "kenward_roger": "kenward-roger", "residual": "residual", "asymptotic": "asymptotic",
    "wald": "asymptotic", "z": "asymptotic",
}


def normalize_ddf(ddf: str) -> str:
    try:
        return _DDF[str(ddf).lower()]
    except KeyError:
        raise ValueError(
            f"ddf must be one of 'satterthwaite', 'kenward-roger', 'residual', 'asymptotic'; got {ddf!r}"
        ) from None


def contrast_matrix(L, names: list, design) -> np.ndarray:
    """A contrast matrix (rows × coefficients) from a matrix, a vector, a list of
    coefficient names, a {coefficient: weight} dict, or a model term (its type III L)."""
    if isinstance(L, str):
        from .contrasts import type3_contrasts

        L3 = type3_contrasts(design)
        if L in L3:
            return L3[L]
        if L in names:
            return np.eye(len(names))[[names.index(L)]]
        raise ValueError(f"{L!r} is neither a model term {sorted(L3)} nor a coefficient {names}")
    if isinstance(L, dict):
        row = np.zeros(len(names))
        for k, v in L.items():
            if k not in names:
                raise ValueError(f"unknown coefficient {k!r}; coefficients are {names}")
            row[names.index(k)] = v
        return row[None, :]
    if isinstance(L, (list, tuple)) and L and all(isinstance(x, str) for x in L):
        bad = [x for x in L if x not in names]
        if bad:
            raise ValueError(f"unknown coefficient(s) {bad}; coefficients are {names}")
        return np.eye(len(names))[[names.index(x) for x in L]]
    L = np.atleast_2d(np.asarray(L, float))
    if L.shape[1] != len(names):
        raise ValueError(f"L must have {len(names)} columns (one per coefficient), got shape {L.shape}")
    return L


class InferenceMixin:
    """t tables, F tests and anova for :class:`~lmmjax.results.LmerResult`."""

    def _inference_cache(self) -> dict:
        if not hasattr(self, "_icache"):
            self._icache = {}
        return self._icache

    def set_satterthwaite(self, H, dM, M):
        """Store the Satterthwaite derivatives an engine computed with the fit: H = ∇²d over
        (θ, σ), ∂M/∂(θ, σ) and M = XᵀV⁻¹Xσ² at the optimum (so no program runs later;
        the Jacobian and Var(θ, σ) are formed on first use: a fit need not pay for them)."""
        self._inference_cache()["satt_raw"] = (H, dM, M)

    def _satterthwaite(self):
        c = self._inference_cache()
        if "satt" not in c and "satt_raw" in c:
            H, dM, M = c["satt_raw"]
            J = satterthwaite_jacobian(np.asarray(dM, float), np.asarray(M, float), self.sigma)
            H = np.asarray(H, float)
            c["satt"] = (self.vcov.to_numpy(), J, vcov_varpar(H), H)
        if "satt" not in c:
            with precision("float64"):
                vp = jax.device_put(np.r_[self.theta, self.sigma].astype(np.float64))
                H, J = satterthwaite_derivatives(vp, to_device(self.stats, np.float64), self.layout, self.reml)
            c["satt"] = (self.vcov.to_numpy(), J, vcov_varpar(H), H)
        return c["satt"]

    def _kenward_roger(self):
        if not self.reml:
            raise ValueError("Kenward-Roger needs a REML fit (as in pbkrtest); refit with reml=True")
        c = self._inference_cache()
        if "kr" not in c:
            phi = natural_parameters(self._Ts, self.sigma, self.layout, self.theta)
            with precision("float64"):
                dense = to_device(dense_crossproducts(self.stats, self.layout), np.float64)
                Ts = [jax.device_put(np.asarray(T, np.float64)) for T in self._Ts]
                out = _export.call(kr_structured, Ts, jax.device_put(phi), dense, layout=self.layout)
                # materialize inside the context: dispatch is asynchronous, and the
                # one-thread BLAS limit must still hold while the program runs
                c["kr"] = kr_adjusted(*jax.device_get(out))
        return c["kr"]

    @property
    def vcov_kr(self):
        """Kenward-Roger adjusted Var(β̂) (pbkrtest's ``vcovAdj``), a DataFrame."""
        import pandas as pd

        PhiA = self._kenward_roger()[1]
        return pd.DataFrame(PhiA, index=self.fixef.index, columns=self.fixef.index)

    def coef_table(self, ddf: str = "satterthwaite", level: float = 0.95):
        """Fixed-effects table: estimate, se, df, t, p and a ``level`` confidence interval.

        ddf: "satterthwaite" (lmerTest), "kenward-roger" (pbkrtest: adjusted SEs and
        df), "residual" (n − p), "asymptotic" (z tests, as statsmodels reports — its SEs,
        though, come from the joint inverse Hessian of fixed and variance parameters).
        """
        import pandas as pd

        ddf = normalize_ddf(ddf)
        beta = self.fixef.to_numpy()
        p = beta.size
        eye = np.eye(p)
        if ddf == "kenward-roger":
            Phi, PhiA, W, Pk = self._kenward_roger()
            se = np.sqrt(np.diag(PhiA))
            df = np.array([kr_test(eye[i], beta, Phi, PhiA, W, Pk)["den_df"] for i in range(p)])
        else:
            se = np.sqrt(np.diag(self.vcov.to_numpy()))
            if ddf == "satterthwaite":
                C, J, A, _ = self._satterthwaite()
                df = _satt_df_rows(eye, C, J, A)
            elif ddf == "residual":
                df = np.full(p, float(self.nobs - p))
            else:
                df = np.full(p, np.inf)
        return Table({"estimate": beta, "se": se, "df": df, **t_columns(beta, se, df, level)},
                            index=self.fixef.index)

    def _contrast_matrix(self, L) -> np.ndarray:
        return contrast_matrix(L, list(self.fixef.index), self.design)

    @staticmethod
    def _one_row_t(l, beta, V, df, level: float) -> dict:
        """t test and confidence interval of one contrast lβ with Var(lβ̂) = lVlᵀ."""
        est = float(l @ beta)
        se = float(np.sqrt(max(l @ V @ l, 0.0)))
        tc = t_columns(np.array([est]), np.array([se]), np.array([float(df)]), level)
        return dict(estimate=est, se=se, df=float(df), t=float(tc["t"][0]), p=float(tc["p"][0]),
                    lower=float(tc["lower"][0]), upper=float(tc["upper"][0]))

    def test(self, L, ddf: str = "satterthwaite", level: float = 0.95):
        """F test of Lβ = 0 (lmerTest's ``contest``).

        L: a matrix (rows = contrasts), a vector, a list of coefficient names (joint
        test that all are 0), a dict {coefficient: weight}, or a model term name
        (its type III hypothesis).  Returns a Series with F, num_df, den_df, p and
        F_unscaled (the Wald F, Lβ̂ᵀ(LVLᵀ)⁻¹Lβ̂/q).  With ddf="kenward-roger", V is the
        adjusted Φ_A and F is K&R's scaled F with pbkrtest's df (``KRmodcomp``, which
        lmerTest's ``contest`` also reports); otherwise F = F_unscaled.

        For a single contrast (one row) the Series also holds its t test, as lmerTest's
        ``contest1D``: estimate lβ̂, se √(lVlᵀ), df (= den_df), t and the ``level``
        confidence interval lower/upper; then p is the two-sided t p-value (= the F test's,
        F = t² — also for Kenward-Roger, whose scaling is 1 for one row).
        """
        import pandas as pd

        ddf = normalize_ddf(ddf)
        Lm = self._contrast_matrix(L)
        beta = self.fixef.to_numpy()
        if ddf == "satterthwaite":
            C, J, A, _ = self._satterthwaite()
            out = satterthwaite_test(Lm, beta, C, J, A)
            out["F_unscaled"] = out["F"]
        elif ddf == "kenward-roger":
            Phi, PhiA, W, Pk = self._kenward_roger()
            kr = kr_test(Lm, beta, Phi, PhiA, W, Pk)
            out = dict(F=kr["F"], num_df=kr["num_df"], den_df=kr["den_df"], p=kr["p"],
                       F_unscaled=kr["F"] / kr["F_scaling"])
            C = PhiA
        else:
            C = self.vcov.to_numpy()
            q = int(np.linalg.matrix_rank(Lm))
            Lb = Lm @ beta
            F = float(Lb @ np.linalg.solve(Lm @ C @ Lm.T, Lb) / q)
            den = np.inf if ddf == "asymptotic" else float(self.nobs - beta.size)
            out = dict(F=F, num_df=q, den_df=den, p=f_sf(F, q, den), F_unscaled=F)
        if Lm.shape[0] == 1:
            out.update(self._one_row_t(Lm[0], beta, C, out["den_df"], level))
        return pd.Series(out)

    def anova(self, type: int | str = 3, ddf: str = "satterthwaite"):
        """Type III (default) or type I (sequential) F tests, one row per model term
        (lmerTest's ``anova(fit, type = ...)``): SumSq, MeanSq, num_df, den_df, F, p."""
        import pandas as pd

        from .contrasts import type1_contrasts, type3_contrasts

        kind = str(type).upper().replace("TYPE", "").strip()
        if kind in ("3", "III"):
            Ls = type3_contrasts(self.design)
        elif kind in ("1", "I"):
            Ls = type1_contrasts(self.design)
        else:
            raise ValueError(f"type must be 1 or 3, got {type!r}")
        rows = {}
        for term, L in Ls.items():
            r = self.test(L, ddf=ddf)
            ms = r["F_unscaled"] * self.sigma**2
            rows[term] = {"SumSq": ms * r["num_df"], "MeanSq": ms, "num_df": int(r["num_df"]),
                          "den_df": r["den_df"], "F": r["F"], "p": r["p"]}
        return Table(pd.DataFrame.from_dict(rows, orient="index",
                                            columns=["SumSq", "MeanSq", "num_df", "den_df", "F", "p"]))
