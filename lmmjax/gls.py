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

The result (:class:`GroupedResult`) has nlme's and lme4's API: conditional modes
b̂_g = D Z_gᵀ V_g⁻¹(y_g − X_gβ̂) (:func:`_blups`), fitted values, residuals and predictions
at the population or conditional level, F tests (type III, or nlme's sequential tests
in the GLS metric), nlme's containment df, Wald intervals and an nlme-style summary.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.linalg

from ._cache import no_persistent_cache
from ._compute import precision
from ._linalg import gauss_jordan, spd_solve
from ._dist import f_sf
from .contrasts import term_columns, type1_contrasts, type3_contrasts
from .design import DataError, build_design, check_response_varies
from .formula import InputError
from .inference import InferenceMixin, kr_adjusted, normalize_ddf, t_columns, unprofiled_deviance, vcov_varpar
from .likelihood import criterion
from .residual import ResidualStructure, combine
from .results import LmerResult
from .tables import Table

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


def _group_cov(psi, data, spec: _Spec):
    """V_g = W_gC_gW_g + Z_gDZ_gᵀ per group, σ² factored out, padded rows with unit
    variance: (G, m, m)."""
    theta, rp = psi[: spec.n_theta], psi[spec.n_theta:]
    Ts, off = [], 0
    for s in spec.structures:
        Ts.append(s.factor(theta[off: off + s.n_params]))
        off += s.n_params

    def one(rows, mask, Z):
        m = mask.shape[0]
        C = spec.residual.correlation(rp, rows)
        C = jnp.eye(m, dtype=psi.dtype) if C is None else C
        sd = spec.residual.sd(rp, rows)
        V = C if sd is None else C * sd[:, None] * sd[None, :]
        if Ts:
            V = V + Z @ jax.scipy.linalg.block_diag(*[T @ T.T for T in Ts]) @ Z.T
        return jnp.where(mask[:, None] & mask[None, :], V, jnp.eye(m, dtype=V.dtype))

    return jax.vmap(one)(data["rows"], data["mask"], data["Z"])


def _group_parts(psi, data, spec: _Spec):
    """(S, log|V|): the [X y] cross-product through V⁻¹ and the log-determinant."""
    def one(V, XY):
        sol, logdet = spd_solve(V, XY)
        return XY.T @ sol, logdet

    S, ld = jax.vmap(one)(_group_cov(psi, data, spec), data["XY"])
    return S.sum(axis=0), ld.sum()


_group_cov_jit = jax.jit(_group_cov, static_argnames=("spec",))


def _blups(psi, beta, D, data, spec: _Spec) -> np.ndarray:
    """Conditional modes per group, b̂_g = D Z_gᵀ V_g⁻¹ (y_g − X_gβ̂) with D the relative
    covariance of a group's random effects (σ² cancels; Pinheiro & Bates 2000, 2.2.3),
    shape (G, q).  V_g from JAX (one small program), the solves in numpy."""
    with precision("float64"), no_persistent_cache():
        V = np.asarray(_group_cov_jit(jax.device_put(np.asarray(psi, float)), data, spec), float)
    XY, Z = np.asarray(data["XY"], float), np.asarray(data["Z"], float)
    p = spec.p
    r = XY[..., p] - XY[..., :p] @ beta                                     # padded rows: 0
    w = np.linalg.solve(V, r[..., None])[..., 0]
    return np.einsum("ab,gmb,gm->ga", D, Z, w)


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


def _criterion_and_solution(psi, data, spec: _Spec, reml):
    """The profiled criterion and, as auxiliary output, β̂, σ̂² and Var(β̂) at ψ.  ``reml``
    may be a traced 0/1 flag (see :func:`_value_and_grad`)."""
    S, r2, ldv, ldx = _profiled(psi, data, spec, reml)
    p, n = spec.p, data["n"]
    Sxx_inv = jnp.linalg.inv(S[:p, :p])
    sigma2 = r2 / (n - p * reml)
    crit = criterion(dict(logdet_z=ldv, logdet_x=ldx, r2=r2), n, p, reml)
    return crit, dict(beta=Sxx_inv @ S[:p, p], sigma2=sigma2, vcov=sigma2 * Sxx_inv)


@partial(jax.jit, static_argnames=("spec",))
def _value_and_grad(psi, data, spec, reml):
    """((criterion, solution), gradient): one compiled program serves the optimizer and
    the final solution (a second program would add its compile to every cold fit), and
    REML and ML alike: ``reml`` is traced (pass :func:`_flag`; ×1 and +0 are exact), so an
    ML refit of a REML fit (compare()) compiles nothing."""
    return jax.value_and_grad(_criterion_and_solution, has_aux=True)(psi, data, spec, reml)


def _flag(reml: bool, dtype):
    """REML as the traced 1.0/0.0 of :func:`_value_and_grad` (one dtype: one program)."""
    return np.asarray(1.0 if reml else 0.0, dtype)


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
    """(H, J): Hessian of d(ψ, σ) and ∂Var(β̂)/∂(ψ, σ), Var(β̂) = σ² S_xx(ψ)⁻¹: central
    differences of the exact gradient and of S_xx⁻¹ (read from the fit's own compiled
    program, so no second program compiles for it), ∂Var(β̂)/∂σ = 2σ S_xx⁻¹ exactly.
    (One fused second-order program — hessian and jacfwd through the vmapped
    Gauss-Jordan — crashed XLA-CPU's compiler on clean CI runs, jaxlib 0.10.2.)"""
    vp = np.asarray(vp)
    k, sigma = vp.size, float(vp[-1])
    h = 1e-5 * np.maximum(1.0, np.abs(vp))

    def sxx_inv(psi):
        sol = _value_and_grad(jax.device_put(psi), data, spec, _flag(reml, psi.dtype))[0][1]
        return np.asarray(sol["vcov"], float) / float(sol["sigma2"])

    H = np.empty((k, k))
    J = np.empty((spec.p, spec.p, k))
    J[..., -1] = 2.0 * sigma * sxx_inv(vp[:-1])
    for i in range(k):
        e = np.zeros(k, vp.dtype)
        e[i] = h[i]
        gp, gm = (np.asarray(_unprofiled_grad(jax.device_put(vp + s_ * e), data, spec, reml), float)
                  for s_ in (1.0, -1.0))
        H[:, i] = (gp - gm) / (2 * h[i])
        if i < k - 1:
            J[..., i] = sigma**2 * (sxx_inv(vp[:-1] + e[:-1]) - sxx_inv(vp[:-1] - e[:-1])) / (2 * h[i])
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
    source = dict(formula=formula, data=data, residual=residual, structures=structures)
    # a private copy: prepare() below stores what it learns from this data set on it
    residual = copy.deepcopy(combine(residual if isinstance(residual, (list, tuple)) else [residual]))
    cols = residual.columns
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise DataError(f"the residual structure uses column(s) {missing} that are not in the data")
    kept = np.flatnonzero(data[cols].notna().all(axis=1).to_numpy()) if cols else np.arange(len(data))
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
            (v, sol), g = _value_and_grad(jax.device_put(np.asarray(x, dt)), dev, spec, _flag(reml, dt))
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
    source.update(rows=kept[design.rows], codes=codes)
    return GroupedResult(design, frame, residual, spec, dev, psi, v, g, sol, reml, dtype, engine, m, source)


def gls(formula: str, data: pd.DataFrame, reml: bool = True, residual=None, dtype: str = "float64"):
    """Generalized least squares with a residual covariance structure (nlme's ``gls``):
    ``lmmjax.gls("distance ~ age * Sex", df, residual=lmmjax.cov.CompoundSymmetry(group="Subject"))``.
    ``residual``: a structure from :mod:`lmmjax.cov`, a product of them, or a list."""
    if "|" in formula:
        raise DataError("gls has no random effects; use lmmjax.lmer(formula, data, residual=...)")
    if residual is None:
        raise DataError("gls needs a residual structure (residual=lmmjax.cov.AR1(group=...), ...)")
    return fit_grouped(formula, data, residual, reml=reml, dtype=dtype, engine="gls")


class GroupedResult(InferenceMixin):
    """A fitted model with a residual structure (what :func:`gls` and ``lmer(...,
    residual=...)`` return), with nlme's and lme4's result API:

    fixef, vcov, sigma, loglik, aic, bic, npar, nobs, formula, ngroups, residual_params
    (natural scale), varcorr, covariance_matrices(), ranef(), fitted, residuals,
    predict(newdata, re_form), coef_table(ddf), test(L, ddf), anova(type, ddf),
    confint("wald"), summary(ddf), refit(reml).

    ``ddf`` takes lmer's methods ("satterthwaite", "kenward-roger", "residual",
    "asymptotic") and "nlme": nlme's own denominator df — n − p for gls, the containment
    ("between/within") df of Pinheiro & Bates (2000, 4.2.3) for lme.
    """

    # the lme4-style helpers of LmerResult that only read design, fixef and _b (and
    # LmerResult._prediction_rows, called in predict: new rows' X, Z and level indices)
    _offset = LmerResult._offset
    _re_groups = LmerResult._re_groups
    _per_group = LmerResult._per_group
    _group_labels = LmerResult._group_labels

    def __init__(self, design, frame, residual, spec, data, psi, crit, grad, sol, reml, dtype, engine, m,
                 source=None):
        self.design, self.frame, self.residual, self._spec, self._data = design, frame, residual, spec, data
        self.psi, self.criterion, self.reml, self.dtype, self.engine = psi, float(crit), reml, dtype, engine
        self._grad = grad
        names = design.xnames
        self.fixef = pd.Series(sol["beta"], index=names, name="estimate")
        self.vcov = pd.DataFrame(sol["vcov"], index=names, columns=names)
        self.sigma = float(np.sqrt(sol["sigma2"]))
        self.nobs = len(frame)
        self.max_group_size = m
        source = source or {}
        self._source = source
        self.data = source.get("data")               # a reference, for refits (compare)
        self.data_rows = source.get("rows", design.rows)   # positions of the used rows in ``data``
        self._codes = source.get("codes")
        self.data_name = getattr(self.data, "_lmmjax_name", None)
        self.converged = bool(np.max(np.abs(grad), initial=0.0) < 1e-3)
        if not self.converged:
            warnings.warn(f"model failed to converge: max|gradient| = {np.max(np.abs(grad)):.2g}", stacklevel=3)

    # ------------------------------------------------------------ basics
    @property
    def formula(self) -> str:
        """The model formula as given."""
        return self._source.get("formula", self.design.formula.text)

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
    def weights(self):
        return None

    @property
    def residual_params(self) -> pd.Series:
        """The residual structure's parameters on the natural scale (ρ, φ, ratios, power)."""
        with precision(self.dtype):
            nat = self.residual.natural(self.psi[self._spec.n_theta:])
        return pd.Series(nat, dtype=float, name="estimate")

    def _blocks(self):
        return [b for b in self.design.blocks if b.group != _ONE]

    @property
    def has_random_effects(self) -> bool:
        return bool(self._blocks())

    @property
    def ngroups(self) -> dict:
        """Levels per grouping factor: the random-effect terms' (lme), else the residual
        structure's group (gls); {} when the structure has no groups."""
        if self.has_random_effects:
            return {b.group: b.n_levels for b in self._blocks()}
        if self.residual.group is None or self._codes is None:
            return {}
        return {self.residual.group: int(self._codes.max()) + 1}

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

    def refit(self, reml: bool) -> "GroupedResult":
        """The same model (formula, data, residual structure) fitted by REML or ML."""
        src = self._source
        if src.get("data") is None:
            raise InputError("this result does not know its data; fit it with lmmjax.gls / lmmjax.lmer")
        return fit_grouped(src["formula"], src["data"], src["residual"], reml=reml, dtype=self.dtype,
                           engine=self.engine, structures=src.get("structures"))

    # ------------------------------------------------------------ random effects, fitted values
    @property
    def _b(self) -> list:
        """Conditional modes per random-effect term, arrays (levels, q) (lme4's layout)."""
        if "_b_cache" not in self.__dict__:
            blocks = self._blocks()
            out = []
            if blocks:
                D = scipy.linalg.block_diag(*[C.to_numpy() for C in self.covariance_matrices()]) / self.sigma**2
                bg = _blups(self.psi, self.fixef.to_numpy(), D, self._data, self._spec)
                off = 0
                for blk in blocks:
                    vals = np.zeros((blk.n_levels, blk.q))
                    vals[blk.index] = bg[self._codes, off: off + blk.q]   # one group = one level
                    out.append(vals)
                    off += blk.q
            self.__dict__["_b_cache"] = out
        return self.__dict__["_b_cache"]

    def ranef(self) -> dict:
        """Conditional modes (BLUPs) b̂_g = D Z_gᵀ V_g⁻¹ (y_g − X_gβ̂) given the residual
        structure (nlme's ``ranef(lme)``): grouping factor -> DataFrame (levels × terms)."""
        if not self.has_random_effects:
            raise InputError("this model has no random effects (a gls fit); ranef() needs lmmjax.lmer(...) "
                             "with a random term such as (1 | group)")
        return self._per_group(self._b)

    def _re_contribution(self) -> np.ndarray:
        z = np.zeros(self.nobs)
        for blk, b in zip(self._blocks(), self._b):
            z += np.einsum("nq,nq->n", blk.Zq, b[blk.index])
        return z

    @property
    def fitted(self) -> np.ndarray:
        """Fitted values of the rows used, in data order: Xβ̂ + Zb̂ (conditional on the random
        effects, nlme's ``fitted(lme)`` default level) or Xβ̂ for gls."""
        return self.design.X @ self.fixef.to_numpy() + self._re_contribution() + self._offset()

    @property
    def residuals(self) -> np.ndarray:
        """Response minus :attr:`fitted` (nlme's ``residuals(fit, type = "response")``)."""
        return self.design.y + self._offset() - self.fitted

    def predict(self, newdata: pd.DataFrame | None = None, re_form=None, allow_new_levels: bool = False):
        """Predictions: Xβ̂ for gls fits and ``re_form=False`` (nlme's level 0), with the
        conditional random effects otherwise (level 1); ``newdata`` rows of unseen levels
        need ``allow_new_levels=True`` (they get the population value).  The residual
        correlation is not used to predict (as nlme's ``predict``)."""
        groups = self._re_groups(re_form if self.has_random_effects else False)
        X, offset, kept, _ = LmerResult._prediction_rows(self, newdata, groups, allow_new_levels)
        out = X @ self.fixef.to_numpy() + offset
        for blk, Zn, idx in kept:
            b = self._b[next(k for k, o in enumerate(self._blocks()) if o is blk)]
            out = out + np.where(idx < 0, 0.0, np.einsum("nq,nq->n", Zn, b[np.maximum(idx, 0)]))
        return out

    # ------------------------------------------------------------ inference
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
        c = self._inference_cache()
        if "kr" not in c:
            with precision("float64"), no_persistent_cache():
                out = _kr_pieces(jax.device_put(self.kr_parameters()), self._data, self._spec)
                c["kr"] = kr_adjusted(*jax.device_get(out))
        return c["kr"]

    def _satterthwaite(self):
        """(C, J, A, H) for the Satterthwaite df (see :func:`_satterthwaite`)."""
        c = self._inference_cache()
        if "satt" not in c:
            vp = np.r_[self.psi, self.sigma]
            with precision(self.dtype) as dt, no_persistent_cache():
                H, J = _satterthwaite(vp.astype(dt), self._data, self._spec, self.reml)
            H = np.asarray(H, float)
            c["satt"] = (self.vcov.to_numpy(), np.asarray(J, float), vcov_varpar(H), H)
        return c["satt"]

    def nlme_df(self) -> tuple[pd.Series, dict]:
        """nlme's denominator df: (per coefficient, per model term).  gls: n − p.  lme
        (one grouping level, Pinheiro & Bates 2000, 4.2.3): a column varying within some
        group is a within-group column, else (non-constant) a between-group one; with M
        groups the within df are n − M − (#within columns) and the between df M − 1 −
        (#between columns) (−1 for the intercept; +1 to the within df without one); a
        term's df are those of its stratum (within if any column is), the intercept's the
        larger of the two."""
        X, n, p = self.design.X, self.nobs, self.design.p
        terms = term_columns(self.design)
        if not self.has_random_effects:
            return pd.Series(float(n - p), index=self.fixef.index), {t: float(n - p) for t in terms}
        if len({b.group for b in self._blocks()}) > 1:
            raise NotImplementedError("nlme's containment df are implemented for one grouping level")
        codes = self._codes
        M = int(codes.max()) + 1
        tol = np.sqrt(np.finfo(float).eps)
        scale = np.maximum(np.abs(X).max(axis=0), 1.0)
        const = np.ptp(X, axis=0) <= tol * scale
        frame = pd.DataFrame(X)
        g = frame.groupby(codes)
        inner = ((g.max() - g.min()).to_numpy() > tol * scale).any(axis=0)
        has_int = bool(const.any())

        def strata(counts):
            df = {"between": float(M), "within": float(n - M)}
            for k, c in counts.items():
                df[k] -= c
            if has_int:
                df["between"] -= 1
            else:
                df["within"] += 1
            return df

        col_strat = np.where(inner, "within", "between")
        dfX = strata({k: int(np.sum((col_strat == k) & ~const)) for k in ("between", "within")})
        per_col = np.where(const, max(dfX.values()), [dfX[s] for s in col_strat])
        term_strat = {t: ("within" if inner[c].any() else "between") for t, c in terms.items()
                      if not const[c].all()}
        dfT = strata({k: sum(len(terms[t]) for t, s in term_strat.items() if s == k)
                            for k in ("between", "within")})
        per_term = {t: dfT[term_strat[t]] if t in term_strat else max(dfT.values()) for t in terms}
        return pd.Series(per_col.astype(float), index=self.fixef.index), per_term

    @staticmethod
    def _is_nlme(ddf) -> bool:
        return str(ddf).lower() in ("nlme", "containment")

    def coef_table(self, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """Fixed effects: estimate, se, df, t, p, CI.  ddf: "satterthwaite" (autodiff, any
        structure), "kenward-roger" (K&R 1997 with the R_ij terms, in the parameters of
        :meth:`kr_parameters`: adjusted SEs and df), "residual" (n − p), "nlme" (nlme's df:
        n − p for gls, containment df for lme), "asymptotic" (z)."""
        if not self._is_nlme(ddf):
            return super().coef_table(ddf, level)
        beta = self.fixef.to_numpy()
        se = np.sqrt(np.diag(self.vcov.to_numpy()))
        df = self.nlme_df()[0].to_numpy()
        return Table({"estimate": beta, "se": se, "df": df, **t_columns(beta, se, df, level)},
                            index=self.fixef.index)

    def _wald_f(self, Lm, den_df: float) -> pd.Series:
        beta, C = self.fixef.to_numpy(), self.vcov.to_numpy()
        q = int(np.linalg.matrix_rank(Lm))
        Lb = Lm @ beta
        F = float(Lb @ np.linalg.solve(Lm @ C @ Lm.T, Lb) / q)
        return pd.Series(dict(F=F, num_df=q, den_df=den_df, p=float(f_sf(F, q, den_df)), F_unscaled=F))

    def test(self, L, ddf: str = "satterthwaite") -> pd.Series:
        """F test of Lβ = 0 (L as in :meth:`LmerResult.test`: matrix, vector, coefficient
        names, {name: weight} or a model term).  ddf="nlme" gives nlme's ``anova(fit, L=)``:
        the Wald F on nlme's df (the smallest df of the coefficients L involves)."""
        if not self._is_nlme(ddf):
            return super().test(L, ddf)
        Lm = self._contrast_matrix(L)
        per_col = self.nlme_df()[0].to_numpy()
        return self._wald_f(Lm, float(per_col[np.abs(Lm).sum(axis=0) > 0].min()))

    def anova(self, type: int | str = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F tests per model term: SumSq, MeanSq, num_df, den_df, F, p.  type=3: lmerTest's
        type III hypotheses; type=1: sequential tests in the GLS metric — the Doolittle
        rows of XᵀV⁻¹X (∝ Var(β̂)⁻¹), whose F values are nlme's ``anova(fit)`` (its
        "sequential" type; lmer fits use XᵀX, as lmerTest).  ddf as :meth:`coef_table`;
        with "nlme" each term gets nlme's term df."""
        kind = str(type).upper().replace("TYPE", "").strip()
        if kind in ("3", "III"):
            Ls = type3_contrasts(self.design)
        elif kind in ("1", "I"):
            M = np.linalg.inv(self.vcov.to_numpy())
            Ls = type1_contrasts(dataclasses.replace(self.design, X=np.linalg.cholesky(0.5 * (M + M.T)).T))
        else:
            raise InputError(f"type must be 1 or 3, got {type!r}")
        term_df = self.nlme_df()[1] if self._is_nlme(ddf) else None
        rows = {}
        for term, L in Ls.items():
            r = self._wald_f(L, term_df[term]) if term_df is not None else self.test(L, ddf=ddf)
            ms = r["F_unscaled"] * self.sigma**2
            rows[term] = {"SumSq": ms * r["num_df"], "MeanSq": ms, "num_df": int(r["num_df"]),
                          "den_df": r["den_df"], "F": r["F"], "p": r["p"]}
        return Table(pd.DataFrame.from_dict(rows, orient="index", columns=["SumSq", "MeanSq", "num_df", "den_df", "F", "p"]))

    def confint(self, method: str = "wald", level: float = 0.95, ddf: str = "nlme") -> pd.DataFrame:
        """Confidence intervals for the fixed effects, β̂ ± t_{df}(1 − α/2)·SE (nlme's
        ``intervals(fit, which = "fixed")`` with the default ddf="nlme"; any ``ddf`` of
        :meth:`coef_table`): columns lower, estimate, upper."""
        if str(method).lower() != "wald":
            raise InputError(f"confint method {method!r} is not available for residual-structure fits: use "
                             "method='wald' (fixed effects, t quantiles on ddf='nlme', 'satterthwaite', "
                             "'kenward-roger', ...)")
        if not 0 < level < 1:
            raise InputError(f"level must be between 0 and 1, got {level!r}")
        ct = self.coef_table(ddf, level)
        return ct[["lower", "estimate", "upper"]]

    # ------------------------------------------------------------ printing
    def _title(self) -> str:
        kind = "Generalized least squares" if not self.has_random_effects else "Linear mixed-effects model"
        return f"{kind} fit by {'REML' if self.reml else 'maximum likelihood'} [lmmjax]"

    def _structure_lines(self) -> list[str]:
        par = self.residual_params
        lines = [f"Residual structure: {self.residual!r}"]
        if len(par):
            lines += [" Parameter estimate(s):"] + [" " + ln for ln in par.to_frame().T.to_string(
                index=False, float_format=lambda v: f"{v:.6g}").splitlines()]
        return lines

    def summary(self, ddf: str | None = "satterthwaite", print_: bool = False):
        """nlme-style summary (``summary.gls`` / ``summary.lme``): criterion, AIC/BIC/logLik,
        the residual structure's parameters, random effects (lme), the fixed-effects table
        with df and p for ``ddf`` (as :meth:`coef_table`; None: no df and p), residual SE,
        observations and groups.  Returns a :class:`~lmmjax.summary.SummaryText`."""
        from .summary import SummaryText, _fixed_corr, _fixed_table, _random_table

        if ddf is not None and not self._is_nlme(ddf):
            ddf = normalize_ddf(ddf)
        crit = pd.DataFrame([[self.aic, self.bic, self.loglik]], columns=["AIC", "BIC", "logLik"])
        lines = [self._title(), f"  Model: {self.formula}"]
        if self.data_name:
            lines.append(f"  Data: {self.data_name}")
        lines += [""] + crit.to_string(index=False, float_format=lambda v: f"{v:.4f}").splitlines()
        lines += [""] + self._structure_lines()
        if self.has_random_effects:
            lines += ["", "Random effects:"] + _random_table(self)[:-1]
        lines += ["", "Fixed effects:"] + _fixed_table(self, ddf) + _fixed_corr(self)
        grp = ", ".join(f"{g} {k}" for g, k in self.ngroups.items())
        lines += ["", f"Residual standard error: {self.sigma:.6g}",
                  f"Number of observations: {self.nobs}" + (f", groups: {grp}" if grp else "")]
        if not self.converged:
            lines += ["", f"Model failed to converge: max|gradient| = {np.max(np.abs(self._grad)):.2g}"]
        text = SummaryText("\n".join(lines))
        if print_:
            print(text)
        return text

    def __repr__(self):
        lines = [self._title(), f"  Model: {self.formula}",
                 f"  logLik {self.loglik:.4f}   AIC {self.aic:.4f}   BIC {self.bic:.4f}   nobs {self.nobs}"]
        lines += self._structure_lines()
        if self.has_random_effects:
            lines += ["Random effects (SD):"] + [
                f"  {r.group} {r.term1}: {r.sdcor:.4g}" for r in self.varcorr.itertuples() if r.group != "Residual"]
        lines += [f"Residual SD: {self.sigma:.4g}", "Fixed effects:",
                  self.fixef.to_frame().T.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
        return "\n".join(lines)
