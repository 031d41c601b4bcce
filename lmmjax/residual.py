"""Residual covariance structures (``lmmjax.cov``): correlation within groups and
variance functions, as in nlme (Pinheiro & Bates 2000, ch. 5).

The residuals of group i have covariance ``σ² W_i C_i W_i`` with ``C_i`` a correlation
matrix (AR(1), continuous-time AR(1), compound symmetry, unstructured) and ``W_i`` a
diagonal of SD multipliers (varIdent, varPower).  Structures combine with ``*``
(``Unstructured(...) * VarIdent(...)``) or a list.

**The protocol** — a structure is a small object with

* ``n_params`` and ``param_names()``; ``init()`` (unconstrained starting values);
* ``columns`` (the data columns it reads) and ``group`` (grouping column or None);
* ``prepare(frame) -> dict`` of per-row numeric arrays (host side, once per fit);
* ``correlation(params, rows) -> (m, m)`` for one group, from the padded per-group
  arrays ``rows`` (each prepared array, shape (m,)); return None if it has none;
* ``sd(params, rows) -> (m,)`` SD multipliers (ones if it has none);
* ``natural(params) -> dict`` its parameters on the natural scale (ρ, ratios, …).

``correlation`` and ``sd`` must be pure JAX functions of ``params``: everything else —
fitting, standard errors, Satterthwaite df — comes from autodiff.  Subclass
:class:`Correlation` and write ``kernel`` to get a new correlation in time (see
notebooks/user_structure.ipynb).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd

__all__ = ["ResidualStructure", "Correlation", "AR1", "CAR1", "Exponential", "CompoundSymmetry", "Unstructured",
           "VarIdent", "VarPower", "Combined", "combine"]


class ResidualStructure:
    """Base class: no parameters, identity correlation, unit SDs."""

    group: str | None = None
    n_params: int = 0

    @property
    def columns(self) -> list[str]:
        return []

    def param_names(self) -> list[str]:
        return []

    def init(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def prepare(self, frame: pd.DataFrame) -> dict:
        return {}

    def correlation(self, params, rows):
        return None

    def sd(self, params, rows):
        return None

    def natural(self, params) -> dict:
        return {}

    def __mul__(self, other):
        return combine([self, other])

    def _slot(self, kind: str) -> str:
        """Key of a prepared per-row array: the same for equal structures, so a refit of
        the same design reuses the compiled programs."""
        return f"{type(self).__name__}.{kind}:{','.join(map(str, self.columns))}"

    def key(self) -> tuple:
        """Value identity (class and attributes, including what ``prepare`` learned from
        the data): equal keys mean the same compiled program serves both."""
        def frozen(v):
            if isinstance(v, ResidualStructure):
                return v.key()
            if isinstance(v, (list, tuple)):
                return tuple(frozen(x) for x in v)
            if isinstance(v, np.generic):
                return v.item()
            if isinstance(v, np.ndarray):
                return (v.shape, tuple(v.ravel().tolist()))
            if isinstance(v, dict):
                return tuple(sorted((k, frozen(x)) for k, x in v.items()))
            return v
        return (type(self),) + tuple(sorted((k, frozen(v)) for k, v in vars(self).items()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Correlation(ResidualStructure):
    """A one-parameter correlation that depends on a per-row position/time ``t``:
    C_jk = kernel(|t_j − t_k|, value); subclasses define ``kernel`` and ``transform``
    (unconstrained → natural), and the name of the parameter."""

    name = "Phi"
    n_params = 1

    def __init__(self, group: str, time: str | None = None):
        self.group, self.time = group, time

    @property
    def columns(self):
        return [self.group] + ([self.time] if self.time else [])

    def param_names(self):
        return [self.name]

    def prepare(self, frame):
        if self.time is None:   # positions = row order within group
            t = frame.groupby(self.group, sort=False, observed=True).cumcount().to_numpy(float)
        else:
            t = pd.to_numeric(frame[self.time], errors="raise").to_numpy(float)
        return {self._slot("t"): t}

    def transform(self, u):
        return jnp.tanh(u)

    def kernel(self, d, value):
        raise NotImplementedError

    def correlation(self, params, rows):
        t = rows[self._slot("t")]
        eye = jnp.eye(t.shape[0], dtype=bool)
        # the diagonal is overwritten: evaluate it at d = 1 so kernels like ρ^d keep
        # finite derivatives (d = 0 elsewhere, tied times, is the kernel's to handle)
        d = jnp.where(eye, 1.0, jnp.abs(t[:, None] - t[None, :]))
        C = self.kernel(d, self.transform(params[0]))
        return jnp.where(eye, 1.0, C)

    def natural(self, params):
        return {self.name: float(self.transform(jnp.asarray(params[0])))}


class AR1(Correlation):
    """AR(1): ρ^|k−l| over positions within ``group`` (row order, or ``time=`` an
    integer visit index, so gaps count).  nlme's corAR1; ρ = tanh(u)."""

    def kernel(self, d, rho):
        # lag 1 written as ρ itself: the |ρ|-form has a zero derivative at ρ = 0 (the
        # start), where the optimizer would then stop
        # (and lags below 1, i.e. 0 between tied or padded rows, kept out of the power,
        # whose derivative there is NaN)
        dd = jnp.maximum(d, 1.0)
        return jnp.where(d == 0, 1.0, jnp.where(d == 1, rho, jnp.sign(rho) ** dd * jnp.abs(rho) ** dd))


class CAR1(Correlation):
    """Continuous-time AR(1): φ^|t−t'| for irregular times ``time`` within ``group``
    (nlme's corCAR1); φ = logistic(u) ∈ (0, 1)."""

    def __init__(self, time: str, group: str):
        super().__init__(group, time)

    def transform(self, u):
        return 1.0 / (1.0 + jnp.exp(-u))

    def kernel(self, d, phi):
        return phi ** d


class Exponential(Correlation):
    """Exponential correlation exp(−d/range) in ``time`` within ``group`` (nlme's corExp),
    optionally with a nugget: (1 − nugget)·exp(−d/range) for d > 0 (``nugget=True``).
    range = exp(u₁), nugget = logistic(u₂)."""

    name = "range"

    def __init__(self, group: str, time: str | None = None, nugget: bool = False):
        super().__init__(group, time)
        self.nugget = nugget

    @property
    def n_params(self):
        return 2 if self.nugget else 1

    def param_names(self):
        return ["range", "nugget"] if self.nugget else ["range"]

    def transform(self, u):
        return jnp.exp(u)

    def kernel(self, d, rng):
        return jnp.exp(-d / rng)

    def correlation(self, params, rows):
        C = super().correlation(params, rows)
        if not self.nugget:
            return C
        scale = 1.0 / (1.0 + jnp.exp(-params[1]))
        return jnp.where(jnp.eye(C.shape[0], dtype=bool), 1.0, (1.0 - scale) * C)

    def natural(self, params):
        out = {"range": float(jnp.exp(jnp.asarray(params[0])))}
        if self.nugget:
            out["nugget"] = float(1.0 / (1.0 + jnp.exp(-jnp.asarray(params[1]))))
        return out


class CompoundSymmetry(ResidualStructure):
    """Equal correlation ρ between all residuals of a group (nlme's corCompSymm)."""

    n_params = 1

    def __init__(self, group: str):
        self.group = group
        self._m = 2

    @property
    def columns(self):
        return [self.group]

    def param_names(self):
        return ["Rho"]

    def prepare(self, frame):
        self._m = max(2, int(frame.groupby(self.group, observed=True).size().max()))
        return {}

    def _rho(self, u):
        lo = -1.0 / (self._m - 1)                   # ρ > −1/(m−1) keeps C positive definite
        return lo + (1.0 - lo) / (1.0 + jnp.exp(-u))

    def init(self):
        lo = -1.0 / (self._m - 1)
        return np.array([np.log((0.0 - lo) / (1.0 - 0.0))])  # ρ = 0

    def correlation(self, params, rows):
        m = rows["_pos"].shape[0]       # every group's padded rows carry their position
        rho = self._rho(params[0])
        return jnp.where(jnp.eye(m, dtype=bool), 1.0, rho)

    def natural(self, params):
        return {"Rho": float(self._rho(jnp.asarray(params[0])))}


class Unstructured(ResidualStructure):
    """A general correlation matrix over the visits of a group (nlme's corSymm, the
    MMRM's unstructured covariance with VarIdent).  Visits are the sorted values of
    ``time`` (or positions in row order); subjects may miss visits.  C = normalized AAᵀ
    with A unit lower triangular (its K(K−1)/2 free entries are the parameters)."""

    def __init__(self, group: str, time: str | None = None):
        self.group, self.time = group, time
        self._levels = None

    @property
    def columns(self):
        return [self.group] + ([self.time] if self.time else [])

    @property
    def n_params(self):
        K = len(self._levels) if self._levels is not None else 0
        return K * (K - 1) // 2

    def prepare(self, frame):
        if self.time is None:
            v = frame.groupby(self.group, sort=False, observed=True).cumcount().to_numpy()
        else:
            v = frame[self.time].to_numpy()
        self._levels = sorted(pd.unique(v))
        return {self._slot("v"): pd.Index(self._levels).get_indexer(v).astype(float)}

    def _pairs(self):
        K = len(self._levels)
        return [(i, j) for j in range(K) for i in range(j + 1, K)]

    def param_names(self):
        lab = [str(x.item() if hasattr(x, "item") else x) for x in self._levels]
        if self.time is None:
            lab = [str(i + 1) for i in range(len(self._levels))]
        return [f"cor({lab[j]},{lab[i]})" for i, j in sorted(self._pairs(), key=lambda p: (p[1], p[0]))]

    def full(self, params):
        K = len(self._levels)
        pairs = sorted(self._pairs(), key=lambda p: (p[1], p[0]))
        A = jnp.eye(K, dtype=params.dtype)
        if pairs:
            r, c = (np.array(x) for x in zip(*pairs))
            A = A.at[r, c].set(params)
        S = A @ A.T
        d = 1.0 / jnp.sqrt(jnp.diagonal(S))
        return S * d[:, None] * d[None, :]

    def correlation(self, params, rows):
        v = rows[self._slot("v")].astype(jnp.int32)
        return self.full(params)[v[:, None], v[None, :]]

    def natural(self, params):
        C = np.asarray(self.full(jnp.asarray(params)))
        names = self.param_names()
        pairs = sorted(self._pairs(), key=lambda p: (p[1], p[0]))
        return {n: float(C[i, j]) for n, (i, j) in zip(names, pairs)}


class VarIdent(ResidualStructure):
    """A residual SD ratio per stratum of ``by`` (nlme's varIdent(~ 1 | by)); the first
    stratum in data order is the reference (ratio 1).  ratio = exp(u)."""

    def __init__(self, by: str):
        self.by = by
        self._levels = None

    @property
    def columns(self):
        return [self.by]

    @property
    def n_params(self):
        return 0 if self._levels is None else len(self._levels) - 1

    def prepare(self, frame):
        v = frame[self.by].to_numpy()
        self._levels = list(pd.unique(v))
        return {self._slot("s"): pd.Index(self._levels).get_indexer(v).astype(float)}

    def param_names(self):
        return [f"ratio:{x.item() if hasattr(x, 'item') else x}" for x in self._levels[1:]]

    def sd(self, params, rows):
        s = rows[self._slot("s")].astype(jnp.int32)
        ratios = jnp.concatenate([jnp.ones(1, params.dtype), jnp.exp(params)])
        return ratios[s]

    def natural(self, params):
        return dict(zip(self.param_names(), np.exp(np.asarray(params, float)).tolist()))


class VarPower(ResidualStructure):
    """Residual SD ∝ |v|^δ for a covariate v (nlme's varPower(~ v)); δ unconstrained."""

    n_params = 1

    def __init__(self, covariate: str):
        self.covariate = covariate

    @property
    def columns(self):
        return [self.covariate]

    def param_names(self):
        return ["power"]

    def prepare(self, frame):
        v = pd.to_numeric(frame[self.covariate], errors="raise").to_numpy(float)
        if np.any(v == 0):
            raise ValueError(f"VarPower: column {self.covariate!r} has zeros; |v|^δ is then 0 or infinite")
        return {self._slot("p"): np.abs(v)}

    def sd(self, params, rows):
        return rows[self._slot("p")] ** params[0]

    def natural(self, params):
        return {"power": float(params[0])}


class Combined(ResidualStructure):
    """A correlation structure and variance functions together (at most one correlation)."""

    def __init__(self, parts):
        self.parts = list(parts)
        groups = {p.group for p in self.parts if p.group is not None}
        if len(groups) > 1:
            raise ValueError(f"residual structures use different groups {sorted(groups)}")
        self.group = groups.pop() if groups else None

    @property
    def n_params(self):
        return sum(p.n_params for p in self.parts)

    @property
    def columns(self):
        return [c for p in self.parts for c in p.columns]

    def _split(self, params):
        out, off = [], 0
        for p in self.parts:
            out.append(params[off: off + p.n_params])
            off += p.n_params
        return out

    def param_names(self):
        return [n for p in self.parts for n in p.param_names()]

    def init(self):
        return np.concatenate([np.asarray(p.init(), float) for p in self.parts] + [np.zeros(0)])

    def prepare(self, frame):
        out = {}
        for p in self.parts:
            out.update(p.prepare(frame))
        return out

    def correlation(self, params, rows):
        Cs = [C for p, th in zip(self.parts, self._split(params)) if (C := p.correlation(th, rows)) is not None]
        if len(Cs) > 1:
            raise ValueError("combine at most one correlation structure with variance functions")
        return Cs[0] if Cs else None

    def sd(self, params, rows):
        out = None
        for p, th in zip(self.parts, self._split(params)):
            s = p.sd(th, rows)
            if s is not None:
                out = s if out is None else out * s
        return out

    def natural(self, params):
        out = {}
        for p, th in zip(self.parts, self._split(params)):
            out.update(p.natural(th))
        return out

    def __repr__(self):
        return " * ".join(map(repr, self.parts))


def combine(structures) -> ResidualStructure:
    if isinstance(structures, ResidualStructure) and not isinstance(structures, Combined):
        return Combined([structures])
    if isinstance(structures, Combined):
        return structures
    parts = []
    for s in structures:
        parts.extend(s.parts if isinstance(s, Combined) else [s])
    return Combined(parts)
