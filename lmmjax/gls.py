r"""Models with a residual covariance structure: ``lmmjax.gls`` and ``lmmjax.lmer(...,
residual=...)`` (nlme's ``gls`` and ``lme`` with ``correlation=``/``weights=``).

The marginal covariance is block diagonal over the groups i of the residual structure:

    Var(y_i) = σ² V_i,   V_i = W_i C_i W_i + Z_i D Z_iᵀ

(C_i correlation, W_i SD multipliers, D = ⊕_k T_kT_kᵀ the relative covariance of the
random effects, whose grouping factor must be the residual group).  Groups are padded to
the largest group size m (padded rows get V = 1 and zero X, y), and for each group the
Gauss-Jordan solve of V_i against [X_i y_i] (no LAPACK, vmapped over groups) gives

    S = Σ_i [X_i y_i]ᵀ V_i⁻¹ [X_i y_i],   log|V| = Σ_i log|V_i|.

With r² = S_yy − S_xyᵀS_xx⁻¹S_xy the profiled criteria are (Pinheiro & Bates 2000, 2.2)

    ML:   log|V| + n (1 + log(2π r²/n))
    REML: log|V| + log|S_xx| + (n−p)(1 + log(2π r²/(n−p)))

and Var(β̂) = σ̂² S_xx⁻¹.  Satterthwaite df use the observed Hessian of the unprofiled
criterion in (ψ, σ) (central differences of its autodiff gradient) and ∂Var(β̂)/∂(ψ, σ) — for every structure,
built-in or user-defined.  Kenward-Roger is the full K&R (1997) adjustment, with the
second-derivative terms R_ij = XᵀV⁻¹(∂²V/∂φ_i∂φ_j)V⁻¹X, from per-group autodiff
derivatives of V_g (:func:`_kr_pieces`), in φ = (random-effect natural parameters, the
residual structure's own unconstrained parameters, σ²) — like mmrm's "Kenward-Roger",
which also works in its internal parameters.
"""
from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._cache import no_persistent_cache
from ._compute import precision
from ._linalg import gauss_jordan, spd_solve
from .design import DataError, build_design, check_response_varies
from .inference import (_satt_df_rows, kr_adjusted, kr_test, normalize_ddf, t_columns, unprofiled_deviance,
                        vcov_varpar)
from .likelihood import criterion
from .residual import ResidualStructure, combine

__all__ = ["gls", "fit_grouped", "GroupedResult"]

_ONE = "_lmmjax_one_"


class _Spec:
    """Static description of a grouped model for jit, hashed by value (the random-effect
    structures, the prepared residual structure's :meth:`key`, p): one compilation per
    design, reused by refits.  ``residual`` is the fit's own copy, never prepared again."""

    def __init__(self, structures, residual, n_theta, p):
        self.structures, self.residual, self.n_theta, self.p = tuple(structures), residual, n_theta, p
        self._key = (self.structures, residual.key(), n_theta, p)

    def __eq__(self, other):
        return isinstance(other, _Spec) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


def _group_parts(psi, data, spec: _Spec):
    """(S, log|V|): the [X y] cross-product through V⁻¹ and the log-determinant."""
    theta, rp = psi[: spec.n_theta], psi[spec.n_theta:]
    Ts, off = [], 0
    for s in spec.structures:
        Ts.append(s.factor(theta[off: off + s.n_params]))
        off += s.n_params

    def one(rows, XY, mask, Z):
        m = mask.shape[0]
        C = spec.residual.correlation(rp, rows)
        C = jnp.eye(m, dtype=XY.dtype) if C is None else C
        sd = spec.residual.sd(rp, rows)
        V = C if sd is None else C * sd[:, None] * sd[None, :]
        if Ts:
            D = jax.scipy.linalg.block_diag(*[T @ T.T for T in Ts])
            V = V + Z @ D @ Z.T
        mm = mask[:, None] & mask[None, :]
        V = jnp.where(mm, V, jnp.eye(m, dtype=V.dtype))
        sol, logdet = spd_solve(V, XY)
        return XY.T @ sol, logdet

    S, ld = jax.vmap(one)(data["rows"], data["XY"], data["mask"], data["Z"])
    return S.sum(axis=0), ld.sum()


def _profiled(psi, data, spec: _Spec, reml: bool):
    S, logdet_v = _group_parts(psi, data, spec)
    p = spec.p
    Sxx, Sxy, Syy = S[:p, :p], S[:p, p], S[p, p]
    L = jnp.linalg.cholesky(Sxx)
    z = jax.scipy.linalg.solve_triangular(L, Sxy, lower=True)
    r2 = Syy - z @ z
    logdet_x = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
    return S, r2, logdet_v, logdet_x


def _pieces(psi, data, spec: _Spec, reml: bool) -> dict:
    """The factorization pieces the shared criterion formulas read (log|V| plays log|L_Z|²)."""
    _, r2, ldv, ldx = _profiled(psi, data, spec, reml)
    return dict(logdet_z=ldv, logdet_x=ldx, r2=r2)


def grouped_criterion(psi, data, spec: _Spec, reml: bool):
    return criterion(_pieces(psi, data, spec, reml), data["n"], spec.p, reml)


def _unprofiled(vp, data, spec: _Spec, reml: bool):
    """d(ψ, σ) at β̂(ψ) (the Satterthwaite criterion, as lmerTest's for lmer fits)."""
    return unprofiled_deviance(_pieces(vp[:-1], data, spec, reml), data["n"], spec.p, vp[-1], reml)


def _vcov_beta(vp, data, spec: _Spec):
    S, _ = _group_parts(vp[:-1], data, spec)
    p = spec.p
    return vp[-1] ** 2 * jnp.linalg.inv(S[:p, :p])


def _criterion_and_solution(psi, data, spec: _Spec, reml: bool):
    """The profiled criterion and, as auxiliary output, β̂, σ̂² and Var(β̂) at ψ."""
    S, r2, ldv, ldx = _profiled(psi, data, spec, reml)
    p, n = spec.p, data["n"]
    Sxx_inv = jnp.linalg.inv(S[:p, :p])
    sigma2 = r2 / (n - p if reml else n)
    crit = criterion(dict(logdet_z=ldv, logdet_x=ldx, r2=r2), n, p, reml)
    return crit, dict(beta=Sxx_inv @ S[:p, p], sigma2=sigma2, vcov=sigma2 * Sxx_inv)


@partial(jax.jit, static_argnames=("spec", "reml"))
def _value_and_grad(psi, data, spec, reml):
    """((criterion, solution), gradient): one compiled program serves the optimizer and
    the final solution (a second program would add its compile to every cold fit)."""
    return jax.value_and_grad(_criterion_and_solution, has_aux=True)(psi, data, spec, reml)


def _hessian(fg, psi, dtype):
    """Central differences of the exact gradient: no second-order program to compile
    (that compile was the largest part of a cold gls fit); steps ε^(1/3) of ``dtype``."""
    k = psi.size
    h = float(np.finfo(dtype).eps) ** (1.0 / 3.0) * np.maximum(1.0, np.abs(psi))
    H = np.empty((k, k))
    for i in range(k):
        e = np.zeros(k)
        e[i] = h[i]
        H[:, i] = (fg(psi + e)[1] - fg(psi - e)[1]) / (2 * h[i])
    return 0.5 * (H + H.T)


@partial(jax.jit, static_argnames=("spec", "reml"))
def _unprofiled_grad(vp, data, spec, reml):
    return jax.grad(_unprofiled)(vp, data, spec, reml)


_vcov_beta_jit = jax.jit(_vcov_beta, static_argnames=("spec",))


def _kr_varcov(phi, data, spec: _Spec):
    """Var(y_g) = σ² W_g C_g W_g + Z_g (⊕_k Σ_k) Z_gᵀ per group in the Kenward-Roger
    parameters φ = (each random-effect term's natural parameters, the residual
    structure's own parameters, σ²), padded rows with unit variance: (G, m, m)."""
    off, Sig = 0, []
    for s in spec.structures:
        Sig.append(s.cov_from_natural(phi[off: off + s.n_natural]))
        off += s.n_natural
    rp, s2 = phi[off:-1], phi[-1]

    def one(rows, mask, Z):
        m = mask.shape[0]
        C = spec.residual.correlation(rp, rows)
        C = jnp.eye(m, dtype=phi.dtype) if C is None else C
        sd = spec.residual.sd(rp, rows)
        V = s2 * (C if sd is None else C * sd[:, None] * sd[None, :])
        if Sig:
            V = V + Z @ jax.scipy.linalg.block_diag(*Sig) @ Z.T
        return jnp.where(mask[:, None] & mask[None, :], V, jnp.eye(m, dtype=V.dtype))

    return jax.vmap(one)(data["rows"], data["mask"], data["Z"])


@partial(jax.jit, static_argnames=("spec",))
def _kr_pieces(phi, data, spec: _Spec):
    """Kenward & Roger's (1997) P_i, Q_ij, R_ij and expected information, summed over groups
    from V_g, V_g,i = ∂V_g/∂φ_i and V_g,ij (autodiff of :func:`_kr_varcov`) with
    A_g = V_g⁻¹X_g (Gauss-Jordan, vmapped):  M = Σ X_gᵀA_g,  P_i = −Σ A_gᵀV_g,iA_g,
    Q_ij = Σ A_gᵀV_g,iV_g⁻¹V_g,jA_g,  R_ij = Σ A_gᵀV_g,ijA_g,
    I_E,ij = ½[Σ tr(V_g⁻¹V_g,iV_g⁻¹V_g,j) − 2 tr(M⁻¹Q_ij) + tr(M⁻¹P_iM⁻¹P_j)] = ½ tr(ΠV_iΠV_j)."""
    p = spec.p
    X = data["XY"][..., :p]
    V = _kr_varcov(phi, data, spec)
    Vi = jnp.moveaxis(jax.jacfwd(_kr_varcov)(phi, data, spec), -1, 0)                       # (k, G, m, m)
    Vij = jnp.moveaxis(jax.jacfwd(jax.jacfwd(_kr_varcov))(phi, data, spec), (-2, -1), (0, 1))  # (k, k, G, m, m)
    m = V.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(m, dtype=V.dtype), V.shape)
    sol = jax.vmap(lambda a, b: gauss_jordan(a, b)[0])(V, jnp.concatenate([X, eye], axis=-1))
    A, Vinv = sol[..., :p], sol[..., p:]
    M = jnp.einsum("gap,gaq->pq", X, A)
    Minv = jnp.linalg.inv(M)
    VA = jnp.einsum("igab,gbp->igap", Vi, A)
    B = jnp.einsum("gab,igbc->igac", Vinv, Vi)                    # V⁻¹V_i
    P = -jnp.einsum("gap,igaq->pqi", A, VA)
    Q = jnp.einsum("igap,gab,jgbq->pqij", VA, Vinv, VA)
    R = jnp.einsum("gap,ijgab,gbq->pqij", A, Vij, A)
    tr_vv = jnp.einsum("igab,jgba->ij", B, B)
    IE = 0.5 * (tr_vv - 2.0 * jnp.einsum("qp,pqij->ij", Minv, Q)
                + jnp.einsum("ab,bci,cd,daj->ij", Minv, P, Minv, P))
    HM = Q + jnp.swapaxes(Q, -1, -2) - R                          # ∂²M/∂φ_i∂φ_j
    return M, P, HM, IE, R


def _satterthwaite(vp, data, spec, reml):
    """(H, J): Hessian of d(ψ, σ) and ∂Var(β̂)/∂(ψ, σ) by central differences of the exact
    gradient and of Var(β̂).  (One fused second-order program — hessian and jacfwd through
    the vmapped Gauss-Jordan — crashed XLA-CPU's compiler on clean CI runs, jaxlib 0.10.2.)"""
    vp = np.asarray(vp, float)
    k = vp.size
    h = 1e-5 * np.maximum(1.0, np.abs(vp))
    H = np.empty((k, k))
    J = None
    for i in range(k):
        e = np.zeros(k)
        e[i] = h[i]
        gp, gm = (np.asarray(_unprofiled_grad(jax.device_put(vp + s_ * e), data, spec, reml), float)
                  for s_ in (1.0, -1.0))
        H[:, i] = (gp - gm) / (2 * h[i])
        Cp, Cm = (np.asarray(_vcov_beta_jit(jax.device_put(vp + s_ * e), data, spec), float) for s_ in (1.0, -1.0))
        dC = (Cp - Cm) / (2 * h[i])
        J = np.empty(dC.shape + (k,)) if J is None else J
        J[..., i] = dC
    return 0.5 * (H + H.T), J


# ---------------------------------------------------------------- data preparation
def _padded(design, frame: pd.DataFrame, residual: ResidualStructure, group_codes: np.ndarray):
    """Per-group padded arrays: rows (prepared structure arrays), XY, mask, Z."""
    n = len(frame)
    order = np.argsort(group_codes, kind="stable")
    codes = group_codes[order]
    n_groups = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_groups)
    m = int(counts.max())
    pos = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)

    def pad(a, fill=None):
        # padded rows repeat the first row's value, a valid input for any structure
        # (a zero covariate would give VarPower 0**δ = inf and NaN gradients)
        a = np.asarray(a, float)
        fill = (a[0] if len(a) else 0.0) if fill is None else fill
        out = np.full((n_groups, m) + a.shape[1:], fill)
        out[codes, pos] = a[order]
        return out

    prepared = dict(residual.prepare(frame), _pos=pos[np.argsort(order)].astype(float))  # position in group
    XY = np.column_stack([design.X, design.y])
    Zs = [b.Zq for b in design.blocks if b.group != _ONE]
    Z = np.column_stack(Zs) if Zs else np.zeros((n, 0))
    mask = np.zeros((n_groups, m), bool)
    mask[codes, pos] = True
    return dict(rows={k: pad(v) for k, v in prepared.items()}, XY=pad(XY, 0.0), Z=pad(Z, 0.0), mask=mask,
                n=float(n)), m


def _residual_groups(design, frame, residual) -> np.ndarray:
    blocks = [b for b in design.blocks if b.group != _ONE]
    rg = residual.group
    for b in blocks:
        if len(b.term.factors) != 1 or (rg is not None and b.term.factors[0] != rg):
            raise NotImplementedError(
                f"random term {b.term} with residual group {rg!r}: random effects must be grouped by the "
                "residual structure's group (nlme's lme with a correlation structure); other designs are not "
                "supported yet")
    if len({b.term.factors[0] for b in blocks}) > 1:
        raise NotImplementedError("residual structures with more than one grouping factor are not supported yet")
    if rg is None and blocks:
        rg = blocks[0].term.factors[0]
    if rg is None:
        return np.arange(len(frame))
    return pd.factorize(frame[rg], sort=False)[0]


def fit_grouped(formula: str, data: pd.DataFrame, residual, reml: bool = True, dtype: str = "float64",
                engine: str = "lmer", structures: dict | None = None):
    """Fit a (mixed) model with a residual covariance structure; see :func:`gls`."""
    # a private copy: prepare() below stores what it learns from this data set on it
    residual = copy.deepcopy(combine(residual if isinstance(residual, (list, tuple)) else [residual]))
    cols = residual.columns
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise DataError(f"the residual structure uses column(s) {missing} that are not in the data")
    data = data.dropna(subset=cols) if cols else data
    has_bar = "|" in formula
    f = formula if has_bar else f"{formula} + (1 | {_ONE})"
    design = build_design(f, data.assign(**{_ONE: "1"}) if not has_bar else data, structures=structures,
                          single_level_ok=() if has_bar else (_ONE,))
    check_response_varies(design)
    frame = data.iloc[design.rows].reset_index(drop=True)
    codes = _residual_groups(design, frame, residual)
    arrays, m = _padded(design, frame, residual, codes)
    structures = [b.structure for b in design.blocks if b.group != _ONE]
    n_theta = sum(s.n_params for s in structures)
    spec = _Spec(structures, residual, n_theta, design.p)
    psi0 = np.concatenate([np.concatenate([s.init() for s in structures] + [np.zeros(0)]), residual.init()])
    from scipy.optimize import minimize

    with precision(dtype) as dt, no_persistent_cache():
        dev = jax.tree.map(lambda a: jax.device_put(np.asarray(a, dt) if np.asarray(a).dtype != bool else a), arrays)

        def fg(x, solution=False):
            (v, sol), g = _value_and_grad(jax.device_put(np.asarray(x, dt)), dev, spec, reml)
            if solution:
                return jax.tree.map(lambda a: np.asarray(a, float), sol)
            v, g = float(v), np.asarray(g, float)
            if not np.isfinite(v):
                return 1e300, np.zeros_like(x)
            return v, g

        best = None
        for start in (psi0, psi0 + 0.1):   # the second start only when the first one stalls
            r = minimize(fg, start, jac=True, method="L-BFGS-B", options=dict(maxiter=2000, ftol=1e-15, gtol=1e-9))
            if best is None or r.fun < best.fun:
                best = r
            if best.success and best.fun < 1e299 and np.max(np.abs(best.jac), initial=0.0) < 1e-4:
                break
        psi = best.x
        # Newton polish (central-difference Hessian of the exact gradient)
        for _ in range(5):
            v, g = fg(psi)
            if np.max(np.abs(g)) < 1e-8:
                break
            H = _hessian(fg, psi, dt)
            try:
                step = np.linalg.solve(H, g)
            except np.linalg.LinAlgError:
                break
            if not np.all(np.isfinite(step)) or fg(psi - step)[0] > v:
                break
            psi = psi - step
        v, g = fg(psi)
        sol = fg(psi, solution=True)
    return GroupedResult(design, frame, residual, spec, dev, psi, v, g, sol, reml, dtype, engine, m)


def gls(formula: str, data: pd.DataFrame, reml: bool = True, residual=None, dtype: str = "float64"):
    """Generalized least squares with a residual covariance structure (nlme's ``gls``):
    ``lmmjax.gls("distance ~ age * Sex", df, residual=lmmjax.cov.CompoundSymmetry(group="Subject"))``.
    ``residual``: a structure from :mod:`lmmjax.cov`, a product of them, or a list."""
    if "|" in formula:
        raise DataError("gls has no random effects; use lmmjax.lmer(formula, data, residual=...)")
    if residual is None:
        raise DataError("gls needs a residual structure (residual=lmmjax.cov.AR1(group=...), ...)")
    return fit_grouped(formula, data, residual, reml=reml, dtype=dtype, engine="gls")


class GroupedResult:
    """A fitted model with a residual structure: fixef, vcov, sigma, loglik, aic, bic,
    residual_params (natural scale), varcorr, coef_table(ddf)."""

    def __init__(self, design, frame, residual, spec, data, psi, crit, grad, sol, reml, dtype, engine, m):
        self.design, self.frame, self.residual, self._spec, self._data = design, frame, residual, spec, data
        self.psi, self.criterion, self.reml, self.dtype, self.engine = psi, float(crit), reml, dtype, engine
        self._grad = grad
        names = design.xnames
        self.fixef = pd.Series(sol["beta"], index=names, name="estimate")
        self.vcov = pd.DataFrame(sol["vcov"], index=names, columns=names)
        self.sigma = float(np.sqrt(sol["sigma2"]))
        self.nobs = len(frame)
        self.max_group_size = m
        self.converged = bool(np.max(np.abs(grad), initial=0.0) < 1e-3)
        if not self.converged:
            warnings.warn(f"model failed to converge: max|gradient| = {np.max(np.abs(grad)):.2g}", stacklevel=3)

    @property
    def loglik(self) -> float:
        return -0.5 * self.criterion

    @property
    def npar(self) -> int:
        return self.design.p + len(self.psi) + 1

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.npar

    @property
    def bic(self) -> float:
        n = self.nobs - (self.design.p if self.reml else 0)
        return -2 * self.loglik + math.log(n) * self.npar

    @property
    def residual_params(self) -> pd.Series:
        """The residual structure's parameters on the natural scale (ρ, φ, ratios, power)."""
        with precision(self.dtype):
            nat = self.residual.natural(self.psi[self._spec.n_theta:])
        return pd.Series(nat, dtype=float, name="estimate")

    def _blocks(self):
        return [b for b in self.design.blocks if b.group != _ONE]

    def covariance_matrices(self) -> list[pd.DataFrame]:
        out, off = [], 0
        for b, s in zip(self._blocks(), self._spec.structures):
            with precision(self.dtype):
                T = np.asarray(s.factor(jnp.asarray(self.psi[off: off + s.n_params])), float)
            off += s.n_params
            out.append(pd.DataFrame(self.sigma**2 * T @ T.T, index=b.colnames, columns=b.colnames))
        return out

    @property
    def varcorr(self) -> pd.DataFrame:
        rows = []
        for b, S in zip(self._blocks(), self.covariance_matrices()):
            v = np.diag(S.to_numpy())
            for i, nm in enumerate(S.index):
                rows.append((b.group, nm, None, v[i], np.sqrt(max(v[i], 0.0))))
        rows.append(("Residual", None, None, self.sigma**2, self.sigma))
        return pd.DataFrame(rows, columns=["group", "term1", "term2", "vcov", "sdcor"])

    def kr_parameters(self) -> np.ndarray:
        """φ at the fit: each random-effect term's natural parameters (entries of Σ_k, or
        variances and ρ), the residual structure's own parameters, σ²."""
        covs = [C.to_numpy() for C in self.covariance_matrices()]
        nat, off = [], 0
        for s, C in zip(self._spec.structures, covs):
            th = self.psi[off: off + s.n_params]
            off += s.n_params
            nat.append(s.natural_from_params(th, self.sigma**2) if hasattr(s, "natural_from_params")
                       else s.natural_from_cov(C))
        return np.concatenate(nat + [self.psi[self._spec.n_theta:], [self.sigma**2]])

    def _kenward_roger(self):
        """(Φ, Φ_A, W, P) of Kenward & Roger (1997) with the second-derivative terms R_ij
        (V is nonlinear in correlation and variance-function parameters)."""
        if not self.reml:
            raise ValueError("Kenward-Roger needs a REML fit; refit with reml=True")
        if not hasattr(self, "_kr"):
            with precision("float64"), no_persistent_cache():
                out = _kr_pieces(jax.device_put(self.kr_parameters()), self._data, self._spec)
                self._kr = kr_adjusted(*jax.device_get(out))
        return self._kr

    def coef_table(self, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """Fixed effects: estimate, se, df, t, p, CI.  ddf: "satterthwaite" (autodiff, any
        structure), "kenward-roger" (K&R 1997 with the R_ij terms, in the parameters of
        :meth:`kr_parameters`: adjusted SEs and df), "residual" (n − p, what nlme's gls
        reports), "asymptotic" (z)."""
        ddf = normalize_ddf(ddf)
        beta = self.fixef.to_numpy()
        C = self.vcov.to_numpy()
        se = np.sqrt(np.diag(C))
        p = beta.size
        if ddf == "satterthwaite":
            vp = np.r_[self.psi, self.sigma]
            with precision(self.dtype) as dt, no_persistent_cache():
                H, J = _satterthwaite(vp.astype(dt), self._data, self._spec, self.reml)
            df = _satt_df_rows(np.eye(p), C, np.asarray(J, float), vcov_varpar(np.asarray(H, float)))
        elif ddf == "residual":
            df = np.full(p, float(self.nobs - p))
        elif ddf == "asymptotic":
            df = np.full(p, np.inf)
        else:
            Phi, PhiA, W, Pk = self._kenward_roger()
            se = np.sqrt(np.diag(PhiA))
            df = np.array([kr_test(np.eye(p)[i], beta, Phi, PhiA, W, Pk)["den_df"] for i in range(p)])
        return pd.DataFrame({"estimate": beta, "se": se, "df": df, **t_columns(beta, se, df, level)},
                            index=self.fixef.index)

    def __repr__(self):
        lines = [f"{'Generalized least squares' if self.engine == 'gls' else 'Linear mixed model'} fit by "
                 f"{'REML' if self.reml else 'ML'} with residual structure {self.residual!r}",
                 f"  logLik {self.loglik:.4f}   AIC {self.aic:.4f}   BIC {self.bic:.4f}   nobs {self.nobs}",
                 "Residual structure:", self.residual_params.to_string(), "Variance components:",
                 self.varcorr.to_string(index=False), "Fixed effects (Satterthwaite df):",
                 self.coef_table().to_string()]
        return "\n".join(lines)
