"""Covariance structures for random-effects terms.

A random-effects term with ``q`` coefficients per level has covariance
``Σ = σ² T Tᵀ`` where ``T`` (``q × q``, lower triangular) is the *relative
covariance factor* template of Bates et al. (2015, JSS 67(1), sec. 2.2); the
full ``Λ(θ)`` repeats ``T`` once per level of the grouping factor.

A structure is a small frozen (hashable) object that knows

* ``q`` and ``n_params``,
* ``factor(params) -> T``: a pure, differentiable JAX function,
* ``positions``: the (row, col) of T that each parameter fills,
* ``init()``: starting values (lme4's: 1 on the diagonal, 0 elsewhere),
* ``boundary``: indices of parameters that are variances-on-the-SD-scale,
  i.e. may legitimately sit at exactly 0 (a singular fit),
* ``canonical(params)``: the representative of the parameters with
  non-negative diagonal (``T Tᵀ`` does not see column signs),
* ``param_names(colnames)``,
* ``n_natural``, ``natural_from_cov(Σ)``, ``cov_from_natural(φ)``: the natural
  parameters φ (variances/covariances, or for nonlinear structures e.g. σ² and ρ)
  used by Kenward-Roger.

* ``linear``: whether Σ is linear in the natural parameters.  When it is not
  (compound symmetry, AR(1): φ = (variances, ρ)), Kenward-Roger adds the
  second-derivative terms R_ij = Xᵀ V⁻¹ (∂²V/∂φ_i∂φ_j) V⁻¹ X (see :mod:`lmmjax.inference`).

Structures with a correlation parameter (:class:`CompoundSymmetry`, :class:`AR1`)
parameterize T = diag(|s|) L_R(ρ) with L_R the Cholesky factor of the correlation
matrix, in closed form (no LAPACK, so they vmap), s the relative SDs (≥ 0 is the
canonical sign; s = 0 is the singular boundary) and ρ an unconstrained transform.
glmmTMB's keywords: ``cs`` (heterogeneous variances), ``homcs``, ``ar1``
(homogeneous variance, lag-k correlation ρᵏ over the term's columns in order),
``hetar1``, ``homdiag``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Unstructured", "Diagonal", "HomDiagonal", "CompoundSymmetry", "AR1", "KernelCorrelation",
           "make_structure"]


@dataclass(frozen=True)
class Unstructured:
    """General ``q × q`` covariance; θ = lower triangle of T in column-major order (lme4)."""

    q: int
    correlated = True  # VarCorr lists covariances/correlations
    linear = True      # Σ is linear in the natural parameters

    @property
    def n_params(self) -> int:
        return self.q * (self.q + 1) // 2

    def _tril(self):
        # column-major lower-triangle positions, lme4's order
        rows, cols = [], []
        for j in range(self.q):
            for i in range(j, self.q):
                rows.append(i)
                cols.append(j)
        return np.array(rows), np.array(cols)

    def factor(self, params):
        r, c = self._tril()
        return jnp.zeros((self.q, self.q), params.dtype).at[r, c].set(params)

    def init(self) -> np.ndarray:
        r, c = self._tril()
        return (r == c).astype(float)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """(row, col) in T of each parameter."""
        return list(zip(*(a.tolist() for a in self._tril())))

    @property
    def boundary(self) -> np.ndarray:
        r, c = self._tril()
        return np.flatnonzero(r == c)

    def canonical(self, params: np.ndarray) -> np.ndarray:
        r, c = self._tril()
        out = np.array(params, dtype=float)
        for j in range(self.q):
            d = np.flatnonzero((r == j) & (c == j))[0]
            if out[d] < 0:
                out[c == j] *= -1.0
        return out

    def param_names(self, colnames) -> list[str]:
        r, c = self._tril()
        return [
            colnames[i] if i == j else f"{colnames[i]}.{colnames[j]}" for i, j in zip(r, c)
        ]

    # natural (variance-covariance) parameters, in which Σ is linear (Kenward-Roger)
    @property
    def n_natural(self) -> int:
        return self.n_params

    def natural_from_cov(self, Sigma: np.ndarray) -> np.ndarray:
        r, c = self._tril()
        return Sigma[..., r, c]  # numpy or JAX arrays alike

    def cov_from_natural(self, phi):
        r, c = self._tril()
        S = jnp.zeros((self.q, self.q), phi.dtype).at[r, c].set(phi)
        return S + jnp.tril(S, -1).T


@dataclass(frozen=True)
class Diagonal:
    """Independent coefficients with their own variances: ``diag(1 + x | g)``."""

    q: int
    correlated = False
    linear = True

    @property
    def n_params(self) -> int:
        return self.q

    def factor(self, params):
        return jnp.diag(params)

    def init(self) -> np.ndarray:
        return np.ones(self.q)

    @property
    def positions(self) -> list[tuple[int, int]]:
        return [(i, i) for i in range(self.q)]

    @property
    def boundary(self) -> np.ndarray:
        return np.arange(self.q)

    def canonical(self, params: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(params, dtype=float))

    def param_names(self, colnames) -> list[str]:
        return list(colnames)

    @property
    def n_natural(self) -> int:
        return self.q

    def natural_from_cov(self, Sigma: np.ndarray) -> np.ndarray:
        i = np.arange(self.q)
        return Sigma[..., i, i]  # numpy or JAX arrays alike

    def cov_from_natural(self, phi):
        return jnp.diag(phi)


@dataclass(frozen=True)
class HomDiagonal:
    """Independent coefficients with one common variance: ``homdiag(1 + x | g)``."""

    q: int
    correlated = False
    linear = True
    n_params = 1

    def factor(self, params):
        return jnp.abs(params[0]) * jnp.eye(self.q, dtype=params.dtype)

    def init(self) -> np.ndarray:
        return np.ones(1)

    @property
    def boundary(self) -> np.ndarray:
        return np.arange(1)

    def canonical(self, params: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(params, dtype=float))

    def param_names(self, colnames) -> list[str]:
        return ["sd"]

    n_natural = 1

    def natural_from_cov(self, Sigma):
        i = np.arange(self.q)
        return Sigma[..., i, i].mean(axis=-1, keepdims=True)

    def cov_from_natural(self, phi):
        return phi[0] * jnp.eye(self.q, dtype=phi.dtype)


def _xp(a):
    """numpy for numpy input (host-side results keep float64 without JAX's x64 mode), else jax.numpy."""
    return np if isinstance(a, (np.ndarray, np.generic, float)) else jnp


def _safe_ratio(num, den):
    """num / den, and 0 where den is 0 (a correlation at a zero variance)."""
    xp = _xp(num)
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)


@dataclass(frozen=True)
class _Correlated:
    """T = diag(|s|) L_R(ρ): relative SDs s (one, or one per coefficient) and one
    correlation parameter; subclasses give ``rho(t)``, ``rho_inverse(ρ)`` and the
    closed-form Cholesky factor ``chol(ρ)`` of their correlation matrix R(ρ)."""

    q: int
    homogeneous: bool = False
    correlated = True
    linear = False

    @property
    def n_sd(self) -> int:
        return 1 if self.homogeneous else self.q

    @property
    def n_params(self) -> int:
        return self.n_sd + 1

    def _sd(self, params):
        s = jnp.abs(params[: self.n_sd])
        return jnp.broadcast_to(s, (self.q,)) if self.homogeneous else s

    def factor(self, params):
        return self._sd(params)[:, None] * self.chol(self.rho(params[-1]))

    def init(self) -> np.ndarray:
        return np.r_[np.ones(self.n_sd), self.rho_inverse(0.0)]

    @property
    def boundary(self) -> np.ndarray:
        return np.arange(self.n_sd)

    def canonical(self, params: np.ndarray) -> np.ndarray:
        out = np.array(params, dtype=float)
        out[: self.n_sd] = np.abs(out[: self.n_sd])
        return out

    def param_names(self, colnames) -> list[str]:
        sds = ["sd"] if self.homogeneous else list(colnames)
        return sds + [self.rho_name]

    # natural parameters φ = (variances, ρ); Σ is nonlinear in ρ
    @property
    def n_natural(self) -> int:
        return self.n_sd + 1

    def natural_from_cov(self, Sigma):
        i = np.arange(self.q)
        v = Sigma[..., i, i]
        rho = self.rho_from_cov(Sigma, v)
        v = v.mean(axis=-1, keepdims=True) if self.homogeneous else v
        return _xp(Sigma).concatenate([v, rho[..., None]], axis=-1)

    def cov_from_natural(self, phi):
        sd = jnp.sqrt(jnp.broadcast_to(phi[: self.n_sd], (self.q,)))
        return sd[:, None] * self.correlation(phi[-1]) * sd[None, :]

    def natural_from_params(self, params, sigma2):
        """φ from θ directly (σ²s², ρ(t)); host-side numpy."""
        from ._compute import precision

        params = np.asarray(params, float)
        with precision("float64"):   # ρ(t) is a JAX function: evaluate it in float64
            rho = float(self.rho(jnp.asarray(params[-1])))
        return np.r_[sigma2 * params[: self.n_sd] ** 2, rho]

    def correlation(self, rho):
        L = self.chol(rho)
        return L @ L.T


@dataclass(frozen=True)
class CompoundSymmetry(_Correlated):
    """Compound symmetry: corr(b_i, b_j) = ρ for i ≠ j, ρ ∈ (−1/(q−1), 1), with
    heterogeneous (glmmTMB's ``cs``) or one common (``homcs``) variance.
    ρ = −a + (1 + a)·logistic(t), a = 1/(q − 1)."""

    rho_name = "rho"

    def _a(self):
        return 1.0 / (self.q - 1)

    def rho(self, t):
        a = self._a()
        return -a + (1.0 + a) * jax.nn.sigmoid(t)

    def rho_inverse(self, rho):
        a = self._a()
        u = (rho + a) / (1.0 + a)
        return float(np.log(u / (1.0 - u)))

    def chol(self, rho):
        # R = (1 − ρ)I + ρ11ᵀ: every column j has one value c_j below its diagonal d_j,
        # d_j² = 1 − Σ_{k<j} c_k²,  c_j = (ρ − Σ_{k<j} c_k²) / d_j
        d, c, acc = [], [], jnp.zeros_like(rho)
        for _ in range(self.q):
            dj = jnp.sqrt(1.0 - acc)
            cj = (rho - acc) / dj
            d.append(dj)
            c.append(cj)
            acc = acc + cj * cj
        d, c = jnp.stack(d), jnp.stack(c)
        i = jnp.arange(self.q)
        return jnp.where(i[:, None] > i[None, :], c[None, :], 0.0) + jnp.diag(d)

    def rho_from_cov(self, Sigma, v):
        sd = _xp(v).sqrt(v)
        r, c = np.tril_indices(self.q, -1)
        return _safe_ratio(Sigma[..., r, c], sd[..., r] * sd[..., c]).mean(axis=-1)


@dataclass(frozen=True)
class AR1(_Correlated):
    """AR(1) across the term's coefficients in order (e.g. the levels of a visit factor):
    corr(b_i, b_j) = ρ^|i−j|, ρ = tanh(t); homogeneous variance (glmmTMB's ``ar1``) or
    one per coefficient (``hetar1``).  Cholesky factor: L_{i0} = ρⁱ,
    L_{ij} = ρ^{i−j}·√(1 − ρ²) for 1 ≤ j ≤ i."""

    homogeneous: bool = True
    rho_name = "phi"

    def rho(self, t):
        return jnp.tanh(t)

    def rho_inverse(self, rho):
        return float(np.arctanh(rho))

    def chol(self, rho):
        i = np.arange(self.q)
        lag = np.maximum(i[:, None] - i[None, :], 0)
        powers = jnp.stack([rho**k if k else jnp.ones_like(rho) for k in range(self.q)])[lag]
        scale = jnp.where(i == 0, 1.0, jnp.sqrt(1.0 - rho * rho))[None, :]
        return jnp.where(i[:, None] >= i[None, :], powers * scale, 0.0)

    def rho_from_cov(self, Sigma, v):
        sd = _xp(v).sqrt(v)
        return _safe_ratio(Sigma[..., 1, 0], sd[..., 0] * sd[..., 1])


@dataclass(frozen=True)
class KernelCorrelation(_Correlated):
    """A user-defined correlation as a random-effect template: ``corr`` is a
    :class:`lmmjax.cov.Correlation` (its ``kernel(d, value)`` and ``transform``), evaluated
    across the term's coefficients at unit spacing, corr(b_i, b_j) = kernel(|i − j|, value),
    with one common variance.  Its Cholesky factor is computed (unrolled for q ≤ 6)."""

    homogeneous: bool = True
    corr: object = None

    @property
    def rho_name(self) -> str:
        return self.corr.name

    def rho(self, t):
        return self.corr.transform(t)

    def init(self) -> np.ndarray:
        return np.r_[np.ones(self.n_sd), np.asarray(self.corr.init(), float)]

    def correlation(self, value):
        i = np.arange(self.q)
        # lag 1 on the diagonal, which is then overwritten: kernels like ρ^d have NaN
        # derivatives at d = 0, ρ = 0 that would leak through jnp.where
        d = np.abs(i[:, None] - i[None, :])
        d = jnp.asarray(np.where(d == 0, 1, d), dtype=jnp.result_type(value))
        return jnp.where(jnp.eye(self.q, dtype=bool), 1.0, self.corr.kernel(d, value))

    def chol(self, value):
        from ._linalg import chol_small

        return chol_small(self.correlation(value))

    def natural_from_cov(self, Sigma):
        raise NotImplementedError("a kernel template's parameters come from θ: use natural_from_params")


_KEYWORDS = {
    "us": Unstructured,
    "diag": Diagonal,
    "homdiag": HomDiagonal,
    "cs": CompoundSymmetry,
    "homcs": lambda q: CompoundSymmetry(q, homogeneous=True),
    "ar1": AR1,
    "hetar1": lambda q: AR1(q, homogeneous=False),
}


def make_structure(keyword: str, q: int, user: dict | None = None):
    """The structure object for a formula keyword and term size ``q``.  ``user`` maps
    extra keywords to a :class:`lmmjax.cov.Correlation` (used through
    :class:`KernelCorrelation`) or to a callable ``q -> structure`` implementing this
    module's protocol."""
    if user and keyword in user:
        spec = user[keyword]
        if hasattr(spec, "kernel"):
            return KernelCorrelation(q, corr=spec) if q > 1 else Unstructured(1)
        return spec(q)
    if q == 1:
        return Unstructured(1)
    try:
        return _KEYWORDS[keyword](q)
    except KeyError:
        raise NotImplementedError(
            f"covariance structure {keyword}(...) is not available; "
            f"use one of {sorted(_KEYWORDS)} or pass structures={{{keyword!r}: ...}}"
        ) from None
