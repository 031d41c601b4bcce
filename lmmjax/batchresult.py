"""What :func:`lmmjax.lmer_batch` returns: per-response estimates, tests and variance
components (:class:`BatchResult`), with Satterthwaite and Kenward-Roger inference computed
from the batch engine's outputs (:mod:`lmmjax.batchfit`)."""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._compute import precision
from .batchfit import _pad_sizes, batch_kr_program
from .design import DataError
from .inference import (_satt_df_rows, contrast_matrix, dense_crossproducts, kr_adjusted, kr_test,
                        normalize_ddf, p_adjust, satterthwaite_test, t_columns, vcov_varpar)
from .likelihood import Layout
from .optimize import DECREMENT_TOL, SINGULAR_TOL
from .responses import ResponseMatrix

__all__ = ["BatchResult"]

# ---------------------------------------------------------------- results
def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values over the responses (NaN kept as NaN)."""
    return p_adjust(np.asarray(p, float), "BH")


def _theta_names(design) -> list[str]:
    """lme4's ``theta_names``: ``<group>.<coef>`` / ``<group>.<coef2>.<coef1>``."""
    return [f"{b.group}.{n}" for b in design.blocks for n in b.structure.param_names(b.colnames)]


class BatchResult:
    """Per-response results of :func:`lmer_batch` (Series/DataFrames indexed by response).

    Attributes: ``fixef``, ``theta`` (DataFrames), ``sigma``, ``loglik``, ``nobs``,
    ``converged``, ``is_singular``, ``status``, ``errors``, ``iterations`` (Newton iterations; Series); ``vcov`` (G × p × p array);
    methods ``coef_table``, ``test``, ``anova``, ``varcorr``, ``to_anndata`` and
    ``res[name]`` for the full single-model result of one response.
    """

    def __init__(self, design, responses: ResponseMatrix, data, formula, reml, dtype, chunks, fit, errors,
                 fitter=None):
        self.design, self.reml, self.dtype = design, reml, dtype
        self._fitter = fitter                 # lmmjax.lmer, for res[name]
        self.names = list(responses.names)
        self._responses, self._data, self._formula, self._chunks = responses, data, formula, chunks
        idx = pd.Index(self.names, name="response")
        theta = fit["theta"]
        self.theta = pd.DataFrame(theta, index=idx, columns=_theta_names(design))
        self.sigma = pd.Series(np.sqrt(fit["sigma2"]), index=idx, name="sigma")
        self.loglik = pd.Series(-0.5 * fit["criterion"], index=idx, name="loglik")
        self.fixef = pd.DataFrame(fit["beta"], index=idx, columns=design.xnames)
        self.nobs = pd.Series(fit["nobs"], index=idx, name="nobs")
        self.iterations = pd.Series(fit["iterations"], index=idx, name="iterations")
        self.vcov = fit["vcov"]
        self.errors = pd.Series(errors, index=idx, name="error", dtype=object)
        ok = self.errors.isna().to_numpy()
        b = design.layout.boundary()
        self.is_singular = pd.Series(ok & np.any(np.nan_to_num(theta[:, b], nan=1.0) < SINGULAR_TOL, axis=1),
                                     index=idx, name="singular")
        self.converged = pd.Series(ok & self._converged(theta, fit["grad"], fit["hess"], fit["criterion"]), index=idx,
                                   name="converged")
        #: per response: "ok", "singular" (converged to a boundary fit), "not converged", or
        #: "failed" (not fitted; ``errors`` says why)
        self.status = pd.Series(np.where(~ok, "failed", np.where(~self.converged, "not converged",
                                                                 np.where(self.is_singular, "singular", "ok"))),
                                index=idx, name="status")
        self._fit = fit
        self._satt = None
        self._kr = None

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        n_err = int(self.errors.notna().sum())
        return (f"<BatchResult: {len(self)} responses of {self._formula!r} ({'REML' if self.reml else 'ML'}); "
                f"{int(self.converged.sum())} converged, {int(self.is_singular.sum())} singular, {n_err} failed>")

    def _converged(self, theta, grad, hess, crit):
        """:func:`lmmjax.optimize.convergence_report` per response, vectorized: the
        Hessian positive definite on the free parameters (per relative change of θ) and
        the Newton decrement gᵀH⁻¹g below ``DECREMENT_TOL`` · max(1, |criterion|)."""
        b = self.design.layout.boundary()
        free = np.ones_like(theta, bool)
        free[:, b] = theta[:, b] > 0
        finite = np.isfinite(crit) & np.all(np.isfinite(grad), axis=1) & np.all(np.isfinite(hess), axis=(1, 2))
        k = theta.shape[1]
        g = np.where(free, np.nan_to_num(grad), 0.0)
        Hf = np.where(free[:, :, None] & free[:, None, :], np.nan_to_num(hess), 0.0)
        Hf = Hf + np.where(free, 0.0, 1.0)[:, :, None] * np.eye(k)
        d = np.where(free, np.maximum(np.abs(np.nan_to_num(theta)), 1.0), 1.0)
        Hs = Hf * d[:, :, None] * d[:, None, :]          # H in relative changes of θ
        w, U = np.linalg.eigh(Hs)
        scale = np.maximum(1.0, np.max(np.abs(Hs), axis=(1, 2)))
        pd_ = np.all(w > 1e-10 * scale[:, None], axis=1)
        wa = np.maximum(np.abs(w), 1e-8 * np.maximum(1.0, np.max(np.abs(w), axis=1, keepdims=True)))
        dec = np.sum(np.einsum("gij,gi->gj", U, g * d) ** 2 / wa, axis=1)
        return finite & pd_ & (dec < DECREMENT_TOL * np.maximum(1.0, np.abs(np.nan_to_num(crit))))

    # ------------------------------------------------------------ inference pieces
    def _satterthwaite(self):
        """(C, J, A) for every response: Var(β̂), its Jacobian in (θ, σ), Var(θ̂, σ̂)."""
        if self._satt is None:
            f = self._fit
            sig = np.sqrt(f["sigma2"])
            M, dM = f["satt_M"], f["satt_dM"]
            with np.errstate(invalid="ignore"):
                Minv = np.linalg.inv(np.where(np.isfinite(M), M, np.eye(M.shape[-1])))
            J = -(sig**2)[:, None, None, None] * np.einsum("gab,gbci,gcd->gadi", Minv, dM, Minv)
            J[..., -1] = 2 * sig[:, None, None] * Minv
            A = vcov_varpar(np.nan_to_num(f["satt_H"]))
            self._satt = (self.vcov, J, A)
        return self._satt

    def _kenward_roger(self):
        """(Φ, Φ_A, W, P) for every response (pbkrtest's vcovAdj pieces), computed chunk
        by chunk with one vmapped program."""
        if not self.reml:
            raise ValueError("Kenward-Roger needs a REML fit (as in pbkrtest); refit with reml=True")
        if self._kr is None:
            G, p = len(self), self.design.p
            k = sum(s.n_natural for s in self.design.layout.structures) + 1
            out = [np.full((G, p, p), np.nan), np.full((G, p, p), np.nan), np.full((G, k, k), np.nan),
                   np.full((G, k, p, p), np.nan)]
            theta, sigma = self.theta.to_numpy(), self.sigma.to_numpy()
            lay = self.design.layout
            # a few q × q matrices per response: map in batches that keep them near 1 GB
            q_tot = sum(l * s.q for s, l in zip(lay.structures, lay.n_levels))
            per = 8.0 * (16 + 2 * k) * q_tot**2 + 8.0 * k * k * p * p * 4
            pad_to = _pad_sizes(self._chunks)
            with precision(self.dtype) as dt:
                for ch in self._chunks:
                    size = pad_to[ch.mapped]
                    bs = size if size * per <= 1e9 else max(1, int(1e9 // per))
                    d_, _ = ch.padded(size)
                    dense = _dense_batch(d_, lay) if ch.mapped else dense_crossproducts(ch.dstats, lay)
                    dense = {k_: jax.device_put(np.asarray(v, dt)) for k_, v in dense.items()}
                    rows = np.concatenate([ch.idx, np.repeat(ch.idx[-1:], size - len(ch.idx))])
                    res = batch_kr_program(jax.device_put(np.nan_to_num(theta[rows]).astype(dt)),
                                           jax.device_put(np.nan_to_num(sigma[rows], nan=1.0).astype(dt)), dense,
                                           layout=lay, design_mapped=ch.mapped, batch_size=bs)
                    pieces = kr_adjusted(*(np.asarray(a)[: len(ch.idx)] for a in jax.device_get(res)))
                    valid = np.isfinite(theta[ch.idx]).all(axis=1) & np.isfinite(sigma[ch.idx])
                    for o, v in zip(out, pieces):
                        o[ch.idx[valid]] = v[valid]     # failed responses stay NaN
            self._kr = tuple(out)
        return self._kr

    def _coef_index(self, coef: str) -> int:
        names = list(self.fixef.columns)
        if coef in names:
            return names.index(coef)
        from .contrasts import type3_contrasts

        L3 = type3_contrasts(self.design)
        if coef in L3 and L3[coef].shape[0] == 1 and np.count_nonzero(L3[coef]) == 1:
            return int(np.flatnonzero(L3[coef][0])[0])
        if coef in L3:
            raise ValueError(f"term {coef!r} has {L3[coef].shape[0]} coefficients; use res.anova({coef!r}) "
                             f"for its F test, or name one coefficient of {names}")
        raise ValueError(f"{coef!r} is neither a coefficient {names} nor a model term {sorted(L3)}")

    def coef_table(self, coef: str, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """One coefficient (its name, or a one-coefficient model term such as
        ``"condition"``) for every response: estimate, se, df, t, p, p_adj
        (Benjamini–Hochberg over the responses), lower/upper CI, converged, singular.
        ddf: "satterthwaite" (lmerTest), "kenward-roger" (pbkrtest: adjusted SE and df),
        "residual" (n − p), "asymptotic" (z)."""
        j = self._coef_index(coef)
        return self.estimate_table(np.eye(self.design.p)[j], ddf, level)

    def estimate_table(self, contrast, ddf: str = "satterthwaite", level: float = 0.95) -> pd.DataFrame:
        """:meth:`coef_table` for a linear combination cᵀβ of the coefficients (``contrast``:
        p weights in coefficient order, or a Series or dict keyed by coefficient name): estimate,
        se, df, t, p, p_adj, CI, converged, singular for every response."""
        if isinstance(contrast, dict):
            contrast = pd.Series(contrast, dtype=float)
        if isinstance(contrast, pd.Series):
            unknown = set(contrast.index) - set(self.fixef.columns)
            if unknown:
                raise ValueError(f"contrast names {sorted(unknown)} are not coefficients {list(self.fixef.columns)}")
            contrast = contrast.reindex(self.fixef.columns, fill_value=0.0)
        c = np.asarray(contrast, float).ravel()
        if c.shape != (self.design.p,):
            raise ValueError(f"a contrast has one weight per coefficient ({self.design.p}: "
                             f"{list(self.fixef.columns)}), got {c.size}")
        ddf = normalize_ddf(ddf)
        est = self.fixef.to_numpy() @ c
        L = c[None, :]
        if ddf == "kenward-roger":
            Phi, PhiA, W, Pk = self._kenward_roger()
            se = np.sqrt(np.einsum("i,gij,j->g", c, PhiA, c))
            with np.errstate(invalid="ignore", divide="ignore"):
                df = kr_test(L, np.nan_to_num(self.fixef.to_numpy()), *map(np.nan_to_num, (Phi, PhiA, W, Pk)))["den_df"]
        else:
            se = np.sqrt(np.einsum("i,gij,j->g", c, self.vcov, c))
            if ddf == "satterthwaite":
                C, J, A = self._satterthwaite()
                df = _satt_df_rows(L, C, J, A)[:, 0]
            elif ddf == "residual":
                df = self.nobs.to_numpy() - self.design.p
            else:
                df = np.full(est.shape, np.inf)
        bad = self.errors.notna().to_numpy()
        df = np.where(bad, np.nan, df)
        cols = t_columns(est, se, df, level)
        return pd.DataFrame({"estimate": est, "se": se, "df": df, "t": cols["t"], "p": cols["p"],
                             "p_adj": _bh(cols["p"]), "lower": cols["lower"], "upper": cols["upper"],
                             "converged": self.converged.to_numpy(), "singular": self.is_singular.to_numpy()},
                            index=self.fixef.index)

    def test(self, L, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F test of Lβ = 0 for every response (lmerTest's ``contest``; with
        ddf="kenward-roger", pbkrtest's scaled F).  L: a matrix, a coefficient name or
        list of names, a {coefficient: weight} dict, or a model term (type III)."""
        Lm = contrast_matrix(L, list(self.fixef.columns), self.design)
        ddf = normalize_ddf(ddf)
        beta = np.nan_to_num(self.fixef.to_numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            if ddf == "satterthwaite":
                C, J, A = self._satterthwaite()
                out = satterthwaite_test(Lm, beta, np.nan_to_num(C), np.nan_to_num(J), A)
            elif ddf == "kenward-roger":
                out = kr_test(Lm, beta, *map(np.nan_to_num, self._kenward_roger()))
                out.pop("F_scaling")
            else:
                from ._dist import f_sf

                q = int(np.linalg.matrix_rank(Lm))
                Lb = beta @ Lm.T
                V = np.einsum("ai,gij,bj->gab", Lm, np.nan_to_num(self.vcov), Lm)
                V = V + np.where(self.errors.notna().to_numpy(), 1.0, 0.0)[:, None, None] * np.eye(len(Lm))
                F = np.einsum("ga,ga->g", Lb, np.linalg.solve(V, Lb[..., None])[..., 0]) / q
                den = np.full(F.shape, np.inf) if ddf == "asymptotic" else self.nobs.to_numpy() - self.design.p
                out = dict(F=F, num_df=np.full(F.shape, q), den_df=den, p=f_sf(F, q, den))
        tab = pd.DataFrame(out, index=self.fixef.index)
        bad = self.errors.notna().to_numpy()
        tab.loc[bad, ["F", "den_df", "p"]] = np.nan
        tab["p_adj"] = _bh(tab["p"].to_numpy())
        return tab

    def anova(self, term: str | None = None, type: int | str = 3, ddf: str = "satterthwaite") -> pd.DataFrame:
        """F tests of model terms for every response (lmerTest's ``anova``): for one
        ``term``, a table indexed by response (F, num_df, den_df, p, p_adj); for all
        terms, a long table indexed by (term, response)."""
        from .contrasts import type1_contrasts, type3_contrasts

        kind = str(type).upper().replace("TYPE", "").strip()
        if kind not in ("1", "I", "3", "III"):
            raise ValueError(f"type must be 1 or 3, got {type!r}")
        Ls = (type3_contrasts if kind in ("3", "III") else type1_contrasts)(self.design)
        if term is not None:
            if term not in Ls:
                raise ValueError(f"{term!r} is not a model term; terms are {list(Ls)}")
            return self.test(Ls[term], ddf=ddf)
        return pd.concat({t: self.test(L, ddf=ddf) for t, L in Ls.items()}, names=["term"])

    def varcorr(self) -> pd.DataFrame:
        """Variance components of every response, long format like
        ``as.data.frame(VarCorr(fit))``: response, group, term1, term2, vcov, sdcor."""
        s2 = self.sigma.to_numpy() ** 2
        lay, frames = self.design.layout, []
        for b, s, T in zip(self.design.blocks, lay.structures, self._templates()):
            S = s2[:, None, None] * T @ np.swapaxes(T, 1, 2)
            sd = np.sqrt(np.maximum(np.diagonal(S, axis1=1, axis2=2), 0.0))
            for i, nm in enumerate(b.colnames):
                frames.append(pd.DataFrame({"group": b.group, "term1": nm, "term2": None,
                                            "vcov": S[:, i, i], "sdcor": sd[:, i]}, index=self.theta.index))
            for j in range(s.q if s.correlated else 0):
                for i in range(j + 1, s.q):
                    with np.errstate(invalid="ignore", divide="ignore"):
                        cor = np.where(sd[:, i] * sd[:, j] > 0, S[:, i, j] / (sd[:, i] * sd[:, j]), np.nan)
                    frames.append(pd.DataFrame({"group": b.group, "term1": b.colnames[j], "term2": b.colnames[i],
                                                "vcov": S[:, i, j], "sdcor": cor}, index=self.theta.index))
        frames.append(pd.DataFrame({"group": "Residual", "term1": None, "term2": None, "vcov": s2,
                                    "sdcor": np.sqrt(s2)}, index=self.theta.index))
        return pd.concat(frames).reset_index()

    def _templates(self) -> list[np.ndarray]:
        """Every response's Λ template per term (G, q, q), from θ."""
        theta, Ts, off = self.theta.to_numpy(), [], 0
        for s in self.design.layout.structures:
            rows, cols = (np.array(a, int) for a in zip(*s.positions))
            T = np.zeros((len(self), s.q, s.q))
            T[:, rows, cols] = theta[:, off: off + s.n_params]
            off += s.n_params
            Ts.append(T)
        return Ts

    def variance_partition(self, fixed: bool = True, fractions: bool = True) -> pd.DataFrame:
        """Fraction of variance explained by each random-effects column, each fixed-effects
        column (``fixed``) and the residual, per response (rows sum to one; ``fractions=False``
        gives the variances) — variancePartition's ``fitExtractVarPartModel``; see
        :mod:`lmmjax.varpart`.  Failed responses are NaN."""
        from .varpart import fractions as to_fractions, variance_components

        s2 = self.sigma.to_numpy() ** 2
        comp = variance_components(self.design, self._templates(), s2, self.fixef.to_numpy(), self._row_weights(),
                                   fixed)
        comp.index = self.theta.index
        return to_fractions(comp) if fractions else comp

    def _row_weights(self) -> np.ndarray:
        """(n, G): prior weight × whether the response was fitted on the row."""
        R, G = self._responses, len(self)
        W = getattr(self, "_weights", None)
        shared = self.design.weights
        out = np.empty((R.n, G))
        for start in range(0, G, 1024):
            cols = np.arange(start, min(G, start + 1024))
            Yc = R.Y[:, cols]
            Yc = np.asarray(Yc.toarray() if R.sparse else Yc, float)
            w = np.isfinite(Yc).astype(float)
            if shared is not None:
                w *= shared[:, None]
            if W is not None:
                Wc = _weight_columns(W, cols)
                w *= np.where(np.isfinite(Wc) & (Wc > 0), Wc, 0.0)
            out[:, cols] = w
        return out

    def to_anndata(self, adata, coef: str, ddf: str = "satterthwaite", key: str = "lmmjax"):
        """Write the coefficient table into ``adata.varm[key]`` (rows aligned with
        ``adata.var_names``) and the model description into ``adata.uns[key]``."""
        tab = self.coef_table(coef, ddf=ddf)
        names = list(map(str, adata.var_names))
        if set(names) != set(tab.index):
            raise DataError("adata.var_names are not the responses of this result")
        adata.varm[key] = tab.reindex(names).set_axis(adata.var_names).astype(float)
        adata.uns[key] = dict(formula=self._formula, reml=self.reml, coef=str(tab.index.name or coef),
                              coefficient=coef, ddf=normalize_ddf(ddf), columns=list(tab.columns))
        return adata

    def __getitem__(self, name):
        """The full single-model result for one response (refitted with :func:`lmmjax.lmer`
        on that response's observed rows; :func:`lmmjax.lmer_batch` hands over the fitting
        function, so results never import the fitting modules)."""
        lmer = self._fitter
        try:
            i = self.names.index(name)
        except ValueError:
            raise KeyError(f"no response named {name!r}") from None
        resp = self.design.response_name or "_response_"
        data = self._data.assign(**{resp: self._responses.column(i)})
        w = self.design.weights                               # shared prior weights, or
        if getattr(self, "_weights", None) is not None:       # this response's (0: row not used)
            w = _weight_columns(self._weights, np.array([i]))[:, 0]
            w = np.where(w > 0, w, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lmer(f"{resp} ~ {self._formula.split('~', 1)[1]}", data, reml=self.reml, dtype=self.dtype,
                        weights=w)


def _dense_batch(dstats: dict, layout: Layout) -> dict:
    """:func:`~lmmjax.inference.dense_crossproducts` for per-response design statistics."""
    G = len(np.asarray(dstats["n"]))
    parts = [dense_crossproducts({k: np.asarray(v)[g] for k, v in dstats.items()}, layout) for g in range(G)]
    return {k: np.stack([np.asarray(p_[k]) for p_ in parts]) for k in parts[0]}


def _weight_columns(W, cols) -> np.ndarray:
    """Columns ``cols`` of a per-response weight matrix (dense or sparse) as a dense array."""
    sub = W[:, cols[0]: cols[-1] + 1] if np.all(np.diff(cols) == 1) else W[:, cols]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, float)
