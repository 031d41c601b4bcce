"""The fitted model users touch: estimates, variance components, conditional
modes, fitted values, prediction and an lme4-style summary.

Everything here is numpy/pandas post-processing of one call to
:func:`lmmjax.likelihood.solve` at the optimum; nothing is refitted.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

from .design import FORMULA_CONTEXT, DataError, Design, _variables, level_index, offset_values
from .formula import parse_formula
from .inference import InferenceMixin
from .optimize import OptimizeResult

__all__ = ["LmerResult"]


class LmerResult(InferenceMixin):
    """A fitted linear mixed model (what :func:`lmmjax.lmer` returns).

    Attribute names follow lme4: ``fixef``, ``vcov``, ``sigma``, ``theta``,
    ``varcorr`` (``as.data.frame(VarCorr(fit))``), ``loglik``, ``aic``, ``bic``,
    ``ranef()``, ``coef()``, ``fitted``, ``residuals``, ``predict()``, ``summary()``.
    """

    def __init__(self, design: Design, stats: dict, opt: OptimizeResult, sol: dict, reml: bool,
                 data_name: str | None = None):
        self.design = design
        self.stats = stats
        self.optinfo = opt
        self.reml = bool(reml)
        self.data_name = data_name
        self.layout = design.layout
        self.theta = np.asarray(opt.theta, dtype=float)
        self.nobs = design.n
        self.sigma = float(np.sqrt(sol["sigma2"]))
        self._beta = np.asarray(sol["beta"], float)
        self._vcov = np.asarray(sol["vcov"], float)
        crit = float(sol["criterion"])
        self.loglik = -0.5 * crit
        self.reml_criterion = crit if self.reml else float("nan")
        self.deviance = crit if not self.reml else float("nan")
        self.npar = design.p + self.layout.n_theta + 1
        self.aic = crit + 2.0 * self.npar
        self.bic = crit + math.log(self.nobs) * self.npar
        self.converged = bool(opt.converged)
        from .optimize import is_singular

        self.is_singular = is_singular(self.theta, self.layout)
        # spherical effects u and conditional covariance blocks, split per term
        self._u, self._Ainv = _split_terms(design, sol)
        self._Ts = [np.asarray(T, float) for T in sol["Ts"]]
        self._b = [u @ T.T for u, T in zip(self._u, self._Ts)]  # b = Λu, per term (levels, q)

    # ------------------------------------------------------------ basics
    @functools.cached_property
    def fixef(self) -> pd.Series:
        """The fixed-effect estimates β̂ (lme4's ``fixef``), named by X's columns."""
        return pd.Series(self._beta, index=self.design.xnames, name="estimate")

    @functools.cached_property
    def vcov(self) -> pd.DataFrame:
        """Var(β̂) = σ̂²(XᵀV⁻¹X)⁻¹ at θ̂ (lme4's ``vcov``)."""
        return pd.DataFrame(self._vcov, index=self.design.xnames, columns=self.design.xnames)

    @property
    def ngroups(self) -> dict:
        """Number of levels per grouping factor (lme4's ``ngrps``)."""
        out = {}
        for b in self.design.blocks:
            out.setdefault(b.group, b.n_levels)
        return out

    @property
    def formula(self) -> str:
        return self.design.formula.text

    @property
    def df_resid(self) -> int:
        return self.nobs - self.npar

    def _group_labels(self) -> list[str]:
        """VarCorr group names: repeated grouping factors get ``.1``, ``.2`` (lme4)."""
        seen: dict[str, int] = {}
        out = []
        for b in self.design.blocks:
            k = seen.get(b.group, 0)
            out.append(b.group if k == 0 else f"{b.group}.{k}")
            seen[b.group] = k + 1
        return out

    def covariance_matrices(self) -> list[pd.DataFrame]:
        """Σ_k = σ² T_k T_kᵀ for every random-effects term, in term order."""
        return [
            pd.DataFrame(self.sigma**2 * T @ T.T, index=b.colnames, columns=b.colnames)
            for T, b in zip(self._Ts, self.design.blocks)
        ]

    @property
    def varcorr(self) -> pd.DataFrame:
        """Tidy variance components like ``as.data.frame(VarCorr(fit))``:
        variances (``term2`` missing) then covariances/correlations per term, then Residual."""
        rows = []
        for g, S, blk in zip(self._group_labels(), self.covariance_matrices(), self.design.blocks):
            names = list(S.index)
            v = np.diag(S.to_numpy())
            sd = np.sqrt(np.maximum(v, 0.0))
            for i, nm in enumerate(names):
                rows.append((g, nm, None, v[i], sd[i]))
            for j in range(len(names) if blk.structure.correlated else 0):
                for i in range(j + 1, len(names)):
                    c = S.iat[i, j]
                    denom = sd[i] * sd[j]
                    rows.append((g, names[j], names[i], c, c / denom if denom > 0 else np.nan))
        rows.append(("Residual", None, None, self.sigma**2, self.sigma))
        return pd.DataFrame(rows, columns=["group", "term1", "term2", "vcov", "sdcor"])

    # ------------------------------------------------------------ random effects
    def _per_group(self, values) -> dict:
        out: dict[str, pd.DataFrame] = {}
        for b, val in zip(self.design.blocks, values):
            df = pd.DataFrame(val, index=pd.Index(b.levels, name=b.group), columns=b.colnames)
            out[b.group] = pd.concat([out[b.group], df], axis=1) if b.group in out else df
        return out

    def ranef(self) -> dict:
        """Conditional modes of the random effects: grouping factor -> DataFrame (levels × terms)."""
        return self._per_group(self._b)

    def ranef_condcov(self) -> list[np.ndarray]:
        """Conditional covariance of b for every term: arrays (levels, q, q) —
        σ² T (ΛᵀZᵀZΛ + I)⁻¹ Tᵀ blocks, lme4's ``condVar``/``postVar``."""
        s2 = self.sigma**2
        return [s2 * np.einsum("ab,jbc,dc->jad", T, A, T) for T, A in zip(self._Ts, self._Ainv)]

    def ranef_sd(self) -> dict:
        """Conditional SDs of the random effects (same shape as :meth:`ranef`)."""
        sds = [np.sqrt(np.maximum(np.diagonal(C, axis1=1, axis2=2), 0.0)) for C in self.ranef_condcov()]
        return self._per_group(sds)

    def coef(self) -> dict:
        """Per-level coefficients: fixed effects plus the level's random effects (lme4's ``coef``)."""
        out = {}
        for g, re in self.ranef().items():
            df = pd.DataFrame(np.tile(self.fixef.to_numpy(), (len(re), 1)), index=re.index,
                              columns=self.fixef.index)
            for c in re.columns:
                df[c] = (df[c] if c in df.columns else 0.0) + re[c]
            out[g] = df
        return out

    def variance_partition(self, fixed: bool = True, fractions: bool = True) -> pd.Series:
        """Fraction of variance explained by each random-effects column, each fixed-effects
        column (``fixed``) and the residual (sums to one; ``fractions=False`` gives the
        variances), as variancePartition's ``calcVarPart``; see :mod:`lmmjax.varpart`."""
        from .varpart import fractions as to_fractions, variance_components

        w = np.ones(self.nobs) if self.weights is None else self.weights
        comp = variance_components(self.design, [T[None] for T in self._Ts], np.array([self.sigma**2]),
                                   self.fixef.to_numpy()[None], w[:, None], fixed)
        out = to_fractions(comp) if fractions else comp
        return out.iloc[0].rename("fraction" if fractions else "variance")

    @property
    def weights(self) -> np.ndarray | None:
        """The prior weights of the rows used in the fit (lme4's ``weights(fit)``; None: unweighted)."""
        return self.design.weights

    # ------------------------------------------------------------ fitted values
    def _re_contribution(self) -> np.ndarray:
        z = np.zeros(self.nobs)
        for blk, b in zip(self.design.blocks, self._b):
            z += np.einsum("nq,nq->n", blk.Zq, b[blk.index])
        return z

    def _offset(self) -> np.ndarray | float:
        return 0.0 if self.design.offset is None else self.design.offset

    @property
    def fitted(self) -> np.ndarray:
        """Conditional fitted values Xβ̂ + Zb̂ (+ the offset) for the rows used in the fit,
        in data order."""
        return self.design.X @ self.fixef.to_numpy() + self._re_contribution() + self._offset()

    @property
    def residuals(self) -> np.ndarray:
        """Response minus conditional fitted values (rows used in the fit, data order)."""
        return self.design.y + self._offset() - self.fitted

    def predict(self, newdata: pd.DataFrame | None = None, re_form=None, allow_new_levels: bool = False,
                se_fit: bool = False, interval: str | None = None, level: float = 0.95,
                ddf: str = "satterthwaite"):
        """Predictions like lme4's ``predict.merMod``, with standard errors and intervals.

        re_form: ``None`` — all random effects; ``False``/``"~0"``/``np.nan`` — fixed
        effects only (population); a formula such as ``"~ (1 | Subject)"`` — only the
        random terms on those grouping factors.
        allow_new_levels: levels not seen in the fit contribute 0 (population
        prediction) when True; otherwise they raise an error naming them.

        Without ``se_fit``/``interval`` returns the predictions (numpy).  Otherwise a
        DataFrame with ``fit``, ``se`` (and ``lower``, ``upper``):

        * population level (no random term kept): se² = xᵀVar(β̂)x; ``interval="confidence"``
          uses t with the row's Satterthwaite (or ``ddf="kenward-roger"``) df, as emmeans does
          for a reference-grid row;
        * with random effects: se² is the prediction-error variance of xᵀβ + zᵀb at θ̂
          (Henderson 1975): σ̂² gᵀA⁻¹g with g = (Λᵀz, x) and A = [[ΛᵀZᵀZΛ + I, ΛᵀZᵀX],
          [XᵀZΛ, XᵀX]] — the uncertainty of β̂, of b̂ and their covariance; a new level adds
          zᵀΣz;
        * ``interval="prediction"``: a new observation, adding σ̂²/w and, for random terms not
          conditioned on (re_form, new levels), zᵀΣ_kz; normal quantiles whenever random effects
          or a new observation enter (as merTools' predictInterval), t otherwise.
        """
        if interval not in (None, "confidence", "prediction"):
            raise DataError(f"interval must be None, 'confidence' or 'prediction', got {interval!r}")
        groups = self._re_groups(re_form)
        X, offset, kept, dropped = self._prediction_rows(newdata, groups, allow_new_levels,
                                                         need_dropped=interval == "prediction")
        out = X @ self.fixef.to_numpy() + offset
        for blk, Zn, idx in kept:
            b = self._b[self.design.blocks.index(blk)]
            out = out + np.where(idx < 0, 0.0, np.einsum("nq,nq->n", Zn, b[np.maximum(idx, 0)]))
        if not se_fit and interval is None:
            return out
        var_fit = self._prediction_variance(X, kept)
        extra = np.zeros_like(out)
        for blk, Zn, idx in kept:        # new levels of a kept term: their b is unknown
            S = self._term_covariance(blk)
            extra += np.where(idx < 0, np.einsum("na,ab,nb->n", Zn, S, Zn), 0.0)
        var_fit = var_fit + extra
        table = pd.DataFrame({"fit": out, "se": np.sqrt(var_fit)})
        if interval is None:
            return table
        var = var_fit
        if interval == "prediction":
            w = 1.0 if newdata is not None or self.design.weights is None else self.design.weights
            var = var + self.sigma**2 / w
            for blk, Zn in dropped:
                var = var + np.einsum("na,ab,nb->n", Zn, self._term_covariance(blk), Zn)
        from ._dist import norm_ppf, t_ppf
        from .inference import _satt_df_rows, kr_test, normalize_ddf

        population = not kept and interval == "confidence"
        if population and normalize_ddf(ddf) == "satterthwaite":
            C, J, A, _ = self._satterthwaite()
            df = _satt_df_rows(X, C, J, A)
            q = t_ppf(0.5 + level / 2, df)
        elif population and normalize_ddf(ddf) == "kenward-roger":
            Phi, PhiA, W, Pk = self._kenward_roger()
            beta = self.fixef.to_numpy()
            df = np.array([kr_test(x, beta, Phi, PhiA, W, Pk)["den_df"] for x in X])
            var = np.einsum("na,ab,nb->n", X, PhiA, X)
            table["se"] = np.sqrt(var)
            q = t_ppf(0.5 + level / 2, df)
        else:
            df = np.full(len(out), np.inf)
            q = norm_ppf(0.5 + level / 2)
        half = q * np.sqrt(var)
        table["df"] = df
        table["lower"], table["upper"] = out - half, out + half
        return table

    def _prediction_rows(self, newdata, groups, allow_new_levels, need_dropped=False):
        """(X, offset, [(block, Z rows, level index)] for kept terms, [(block, Z rows)] for
        the other terms (only when ``need_dropped``)) of the rows to predict."""
        d = self.design
        if newdata is None:
            kept = [(b, b.Zq, b.index) for b in d.blocks if b.group in groups]
            dropped = [(b, b.Zq) for b in d.blocks if b.group not in groups]
            return d.X, self._offset(), kept, dropped
        if not isinstance(newdata, pd.DataFrame):
            raise DataError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        pf = d.formula
        use = [b for b in d.blocks if b.group in groups or need_dropped]
        need = set().union(_variables(pf.fixed), *(_variables(f"I({o})") for o in pf.offset),
                           *(_variables(b.term.lhs) for b in use))
        missing = sorted(v for v in need if v not in newdata.columns)
        if missing:
            why = " (a prediction interval needs every random term's columns)" if need_dropped else ""
            raise DataError(f"newdata lacks column(s) {missing} that the model uses{why}; it has "
                            f"{list(newdata.columns)}")
        try:
            Xn = np.asarray(d.fixed_spec.get_model_matrix(newdata, na_action="ignore", context=FORMULA_CONTEXT), float)
        except Exception as exc:
            raise DataError(f"cannot build the fixed-effects matrix for newdata: {exc}") from None
        X = Xn[:, d.x_keep]
        offset = offset_values(pf.offset, newdata) if pf.offset else 0.0
        kept, dropped = [], []
        for blk in use:
            Zn = np.asarray(blk.spec.get_model_matrix(newdata, na_action="ignore", context=FORMULA_CONTEXT), float)
            if blk.group not in groups:
                dropped.append((blk, Zn))
                continue
            missing = [f for f in blk.term.factors if f not in newdata.columns]
            if missing:
                raise DataError(f"newdata lacks grouping column(s) {missing} needed by {blk.term}")
            idx = level_index(blk, newdata)
            new = idx < 0
            if new.any() and not allow_new_levels:
                vals = newdata.loc[new, list(blk.term.factors)].drop_duplicates().head(5)
                raise DataError(
                    f"newdata has {int(new.sum())} row(s) with level(s) of {blk.group!r} not seen in "
                    f"the fit (e.g. {vals.to_dict('records')}); pass allow_new_levels=True to predict "
                    "them at the population level"
                )
            kept.append((blk, Zn, idx))
        return X, offset, kept, dropped

    def _term_covariance(self, blk) -> np.ndarray:
        """Σ_k = σ²T_kT_kᵀ of a random term (q × q)."""
        T = self._Ts[self.design.blocks.index(blk)]
        return self.sigma**2 * T @ T.T

    #: largest random-effects dimension for which conditional prediction SEs are formed
    #: (dense (q + p)² matrices: ~200 MB each at this size)
    PEV_MAX_Q = 5_000

    def _prediction_variance(self, X, kept) -> np.ndarray:
        """Var of the fitted part of each row: xᵀVar(β̂)x at the population level, else the
        prediction-error variance σ²gᵀA⁻¹g of Henderson's mixed-model equations (θ fixed)."""
        if not kept:
            return np.einsum("na,ab,nb->n", X, self.vcov.to_numpy(), X)
        from .inference import dense_crossproducts

        d = self.design
        sizes = [b.n_levels * b.q for b in d.blocks]
        q = int(sum(sizes))
        if q > self.PEV_MAX_Q:
            raise DataError(f"standard errors of predictions with random effects need a dense system of "
                            f"{q} random effects (at most {self.PEV_MAX_Q}); use re_form=False for "
                            "population-level SEs")
        dense = dense_crossproducts(self.stats, self.layout)
        lam = np.zeros((q, q))
        offs = np.cumsum([0] + sizes)
        for k, (b, T) in enumerate(zip(d.blocks, self._Ts)):
            lam[offs[k]:offs[k + 1], offs[k]:offs[k + 1]] = np.kron(np.eye(b.n_levels), T)
        LZZL = lam.T @ dense["ZtZ"] @ lam + np.eye(q)
        LZX = lam.T @ dense["ZtX"]
        A = np.block([[LZZL, LZX], [LZX.T, dense["XX"]]])
        G = np.zeros((len(X), q + X.shape[1]))
        G[:, q:] = X
        for blk, Zn, idx in kept:
            k = d.blocks.index(blk)
            cols = offs[k] + np.maximum(idx, 0)[:, None] * blk.q + np.arange(blk.q)[None, :]
            rows = np.broadcast_to(np.arange(len(X))[:, None], cols.shape)
            np.add.at(G, (rows, cols), np.where((idx >= 0)[:, None], Zn, 0.0))
        G[:, :q] = G[:, :q] @ lam       # (Λᵀz)ᵀ = zᵀΛ
        L = np.linalg.cholesky(A)
        H = np.linalg.solve(L, G.T)
        return self.sigma**2 * np.sum(H * H, axis=0)

    def _re_groups(self, re_form) -> set:
        all_groups = {b.group for b in self.design.blocks}
        if re_form is None:
            return all_groups
        if re_form is False or (isinstance(re_form, float) and math.isnan(re_form)):
            return set()
        if isinstance(re_form, str):
            text = re_form.strip()
            if text in ("~0", "~ 0", "NA", "~1", "~ 1"):
                return set()
            pf = parse_formula(text if text.startswith(("~", " ~")) or "~" in text else "~" + text)
            groups = {t.group_name for t in pf.random}
            unknown = groups - all_groups
            if unknown:
                raise DataError(f"re_form names grouping factor(s) {sorted(unknown)} that are not in the model")
            return groups
        raise DataError(f"re_form must be None, False/NaN, or a formula string; got {re_form!r}")

    # ------------------------------------------------------------ refits
    def refit(self, reml: bool | None = None) -> "LmerResult":
        """The same model refitted to the same data (formula, weights), by REML
        (``reml=True``) or ML (``False``; lme4's ``refitML``); ``None`` keeps the fit's."""
        fitter = getattr(self, "_fitter", None)
        if fitter is None or getattr(self, "data", None) is None:
            raise ValueError("this result was not made by lmmjax.lmer on a data frame: nothing to refit")
        return fitter(self.formula, self.data, reml=self.reml if reml is None else bool(reml),
                      weights=getattr(self, "weights_arg", None))

    # ------------------------------------------------------------ intervals, simulation
    def confint(self, method: str = "profile", level: float = 0.95, nsim: int = 500, seed=None):
        """Confidence intervals like lme4's ``confint``; see :func:`lmmjax.confint.confint`."""
        from .confint import confint

        return confint(self, method=method, level=level, nsim=nsim, seed=seed)

    def simulate(self, nsim: int = 1, seed=None, re_form=False) -> np.ndarray:
        """Responses simulated from the fitted model, shape (n, nsim); ``re_form`` as lme4's
        ``re.form`` (default: new random effects for every term; ``None``: conditional on all
        fitted ones). See :func:`lmmjax.confint.simulate`."""
        from .confint import simulate

        return simulate(self, nsim, seed, re_form=re_form)

    # ------------------------------------------------------------ printing
    def summary(self, ddf: str | None = "satterthwaite", print_: bool = False) -> "SummaryText":
        """lme4/lmerTest-style summary; ``ddf`` picks the df method for the fixed-effects
        table ("satterthwaite" default, "kenward-roger", "residual", "asymptotic",
        or None for lme4's table without p-values).

        Returns the text as a :class:`~lmmjax.summary.SummaryText` (a ``str`` that displays
        as itself, so a notebook or REPL shows it once); ``print(m.summary())`` in scripts,
        or ``print_=True``."""
        from .inference import normalize_ddf
        from .summary import SummaryText, format_summary

        text = SummaryText(format_summary(self, None if ddf is None else normalize_ddf(ddf)))
        if print_:
            print(text)
        return text

    # ------------------------------------------------------------ effect sizes, EMMs, plots
    def r2(self) -> pd.Series:
        """Marginal and conditional R² (Nakagawa & Schielzeth 2013; random slopes by Johnson
        2014), as ``performance::r2_nakagawa``; see :func:`lmmjax.effectsize.r2`."""
        from .effectsize import r2

        return r2(self)

    def icc(self) -> pd.Series:
        """Adjusted and conditional ICC, as ``performance::icc``; see :func:`lmmjax.effectsize.icc`."""
        from .effectsize import icc

        return icc(self)

    def emmeans(self, specs, **kwargs):
        """Estimated marginal means (R's ``emmeans``); see :func:`lmmjax.emmeans.emmeans`."""
        from .emmeans import emmeans

        return emmeans(self, specs, **kwargs)

    def plot(self, **kwargs):
        """The default diagnostic panel (matplotlib); see :func:`lmmjax.plots.diagnostics`."""
        from .plots import diagnostics

        return diagnostics(self, **kwargs)

    def __repr__(self) -> str:
        from .summary import format_short

        return format_short(self)


def _split_terms(design: Design, sol: dict):
    """Split the solver's u and A⁻¹ blocks into per-term arrays (levels, q) / (levels, q, q)."""
    blocks = design.blocks
    us = [np.asarray(sol["u1"], float)]
    Ainv = [np.asarray(sol["Ainv1"], float)]
    u2 = np.asarray(sol["u2"], float)
    Ar = np.asarray(sol["Ainv_rest"], float)
    start = 0
    for b in blocks[1:]:
        l, q = b.n_levels, b.q
        us.append(u2[start : start + l * q].reshape(l, q))
        sub = Ar[start : start + l * q, start : start + l * q].reshape(l, q, l, q)
        Ainv.append(np.einsum("jajb->jab", sub))
        start += l * q
    return us, Ainv
