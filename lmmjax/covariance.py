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

New structures (compound symmetry, AR(1), user kernels) implement the same
protocol and slot into the likelihood unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = ["Unstructured", "Diagonal", "make_structure"]


@dataclass(frozen=True)
class Unstructured:
    """General ``q × q`` covariance; θ = lower triangle of T in column-major order (lme4)."""

    q: int
    correlated = True  # VarCorr lists covariances/correlations

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


_KEYWORDS = {"us": Unstructured, "diag": Diagonal}


def make_structure(keyword: str, q: int):
    """The structure object for a formula keyword (``us``, ``diag``) and term size ``q``."""
    if q == 1:
        return Unstructured(1)
    try:
        return _KEYWORDS[keyword](q)
    except KeyError:
        raise NotImplementedError(
            f"covariance structure {keyword}(...) is not available yet; "
            f"use one of {sorted(_KEYWORDS)}"
        ) from None
