"""Single-cell helpers around :func:`lmmjax.lmer_batch`: pseudobulk aggregation and a
differential-expression class with pertpy's interface (``pertpy.tl.PyDESeq2``, ``EdgeR``,
``Statsmodels``: ``Method(adata, design=..., layer=...)``, ``fit()``, ``cond()``,
``contrast()``, ``test_contrasts()``), whose design may hold random effects — cells nested
in donors, without pseudoreplication."""
from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .design import FORMULA_CONTEXT, DataError
from .responses import _is_anndata

__all__ = ["pseudobulk", "LmerDE"]


def pseudobulk(data, by, *, responses=None, layer=None, func: str = "sum"):
    """Aggregate cells to one row per combination of the ``by`` columns (e.g. donor ×
    condition): the sum (default) or mean of each response over the group's cells.

    ``data``: an AnnData object (groups from ``.obs``, values from ``.X`` or
    ``.layers[layer]``; returns an AnnData with the groups' ``obs`` — the ``by`` columns,
    their other constant columns and ``n_cells`` — and the same ``var``), or an obs
    DataFrame with ``responses`` (n × G array, DataFrame or sparse matrix; returns
    ``(obs, values)``).  Sums are exact sums of the cells' values (float64)."""
    if func not in ("sum", "mean"):
        raise ValueError(f"func must be 'sum' or 'mean', got {func!r}")
    adata = data if _is_anndata(data) else None
    if adata is not None:
        obs = adata.obs
        Y = adata.X if layer is None else adata.layers[layer]
    else:
        if not isinstance(data, pd.DataFrame) or responses is None:
            raise DataError("pseudobulk takes an AnnData object, or an obs DataFrame and responses=")
        obs, Y = data, responses
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in obs.columns]
    if missing:
        raise DataError(f"pseudobulk: column(s) {missing} are not in obs; it has {list(obs.columns)}")
    if obs[by].isna().any().any():
        raise DataError(f"pseudobulk: the grouping columns {by} have missing values")
    names = None
    if isinstance(Y, pd.DataFrame):
        names, Y = Y.columns, Y.to_numpy(dtype=float)
    if Y.shape[0] != len(obs):
        raise DataError(f"responses have {Y.shape[0]} rows but obs has {len(obs)}")
    groups = obs.groupby(by, observed=True, sort=True).ngroup().to_numpy()
    n_groups = int(groups.max()) + 1
    A = sp.csr_matrix((np.ones(len(obs)), (groups, np.arange(len(obs)))), shape=(n_groups, len(obs)))
    counts = np.asarray(A.sum(axis=1)).ravel()
    vals = A @ (Y.astype(float) if sp.issparse(Y) else np.asarray(Y, float))
    vals = np.asarray(vals.toarray() if sp.issparse(vals) else vals)
    if func == "mean":
        vals = vals / counts[:, None]
    first = np.zeros(n_groups, int)
    first[groups[::-1]] = np.arange(len(obs))[::-1]          # first cell of each group
    keep = [c for c in obs.columns
            if c in by or obs.groupby(groups, observed=True)[c].nunique(dropna=False).max() <= 1]
    pobs = obs.iloc[first][keep].reset_index(drop=True)
    for c in keep:               # unused categories dropped (each remaining level has a pseudobulk row)
        if isinstance(pobs[c].dtype, pd.CategoricalDtype):
            pobs[c] = pobs[c].cat.remove_unused_categories()
    pobs["n_cells"] = counts.astype(int)
    pobs.index = pobs[by].astype(str).agg("_".join, axis=1).to_numpy()
    if adata is not None:
        import anndata as ad

        return ad.AnnData(X=vals, obs=pobs, var=adata.var.copy())
    return pobs, (pd.DataFrame(vals, index=pobs.index, columns=names) if names is not None else vals)


def _pertpy_base():
    """pertpy's LinearModelBase when pertpy is installed (so its comparison and plotting
    helpers accept :class:`LmerDE`), else ``object``."""
    if importlib.util.find_spec("pertpy") is None:
        return object
    try:
        from pertpy.tools._differential_gene_expression._base import LinearModelBase
    except Exception:       # a pertpy without that module (or failing to import)
        return object
    return LinearModelBase


class LmerDE(_pertpy_base()):
    """Per-gene linear mixed models with pertpy's differential-expression interface.

    >>> de = LmerDE(adata, design="~ condition + (1 | donor)", layer="logcounts")
    >>> de.fit()
    >>> de.test_contrasts(de.contrast("condition", "ctrl", "stim"))

    ``design``: an lme4-style right-hand side (random-effects terms allowed); ``layer``:
    the values to model (default ``.X``; log-normalized expression, as for limma/dream);
    ``mask``: a boolean column of ``adata.var`` selecting genes; ``weights``: prior weights
    (an ``.obs`` column, or the name of a layer of per-gene weights such as voom's);
    ``reml``, ``ddf`` ("satterthwaite" or "kenward-roger").  ``fit(**kwargs)`` passes
    ``kwargs`` to :func:`lmmjax.lmer_batch`; ``self.result`` is its
    :class:`~lmmjax.BatchResult`.

    ``test_contrasts`` returns pertpy's columns (``variable``, ``log_fc``, ``p_value``,
    ``adj_p_value`` (Benjamini–Hochberg), ``t_value``, ``sd``, ``contrast``) plus ``se``
    (= ``sd``), ``df``, ``converged``, ``singular``, sorted by p-value.  ``log_fc`` is the
    contrast's estimate on the scale of the modelled values (log2 fold change for
    log2-expression)."""

    def __init__(self, adata, design: str, *, mask=None, layer=None, weights=None, reml: bool = True,
                 ddf: str = "satterthwaite", **kwargs):
        if not _is_anndata(adata):
            raise DataError(f"LmerDE takes an AnnData object, got {type(adata).__name__}")
        if not isinstance(design, str):
            raise DataError("LmerDE's design is a formula string such as '~ condition + (1 | donor)'")
        if mask is not None:
            if mask not in adata.var.columns:
                raise DataError(f"mask {mask!r} is not a column of adata.var")
            adata = adata[:, adata.var[mask].to_numpy(bool)]
        self.adata, self.layer, self.weights = adata, layer, weights
        self.formula = design if design.strip().startswith("~") else "~ " + design
        self.reml, self.ddf = reml, ddf
        self.result = None
        self.factor_storage = None       # (pertpy's attributes; cond() here uses lmmjax's design)
        self.variable_to_factors = None
        from .design import build_design

        self._design = build_design("_response_ " + self.formula,
                                    adata.obs.assign(_response_=0.0))
        self.design = pd.DataFrame(self._design.X, index=adata.obs_names[self._design.rows],
                                   columns=self._design.xnames)

    @property
    def data(self):
        return self.adata.X if self.layer is None else self.adata.layers[self.layer]

    @property
    def variables(self) -> list[str]:
        """obs columns of the fixed-effects part (what ``cond`` takes)."""
        from .design import _variables

        return sorted(_variables(self._design.formula.fixed))

    def _check_counts(self):      # pertpy's hook: any numeric matrix is fine for an LMM
        return None

    def fit(self, **kwargs) -> None:
        from .batch import lmer_batch

        kwargs.setdefault("progress", False)
        self.result = lmer_batch(self.formula, self.adata, reml=self.reml, layer=self.layer,
                                 weights=self.weights, **kwargs)

    def cond(self, **kwargs) -> pd.Series:
        """The fixed-effects design row for the given obs values (others at their reference
        level, or 0 for numeric columns), indexed by coefficient: contrasts are differences
        of these."""
        unknown = set(kwargs) - set(self.variables)
        if unknown:
            raise ValueError(f"{sorted(unknown)} not in the model's fixed effects; variables: {self.variables}")
        frame = self._design.frame
        row = {}
        for v in self.variables:
            col = frame[v]
            if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_bool_dtype(col):
                cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(col.unique())
                val = kwargs.get(v, cats[0])
                if val not in cats:
                    raise ValueError(f"{val!r} is not a level of {v!r}; levels: {cats}")
                row[v] = pd.Categorical([val], categories=cats)
            else:
                row[v] = [float(kwargs.get(v, 0.0))]
        mm = self._design.fixed_spec.get_model_matrix(pd.DataFrame(row), context=FORMULA_CONTEXT)
        vals = np.asarray(mm, float)[0, self._design.x_keep]
        return pd.Series(vals, index=self._design.xnames)

    def contrast(self, column: str, baseline, group_to_compare) -> pd.Series:
        """``cond(column=group_to_compare) − cond(column=baseline)``."""
        return self.cond(**{column: group_to_compare}) - self.cond(**{column: baseline})

    def _test_single_contrast(self, contrast, **kwargs) -> pd.DataFrame:
        if self.result is None:
            raise RuntimeError("call fit() before testing contrasts")
        if not isinstance(contrast, pd.Series):
            contrast = pd.Series(np.asarray(contrast, float).ravel(), index=self._design.xnames)
        tab = self.result.estimate_table(contrast, ddf=kwargs.get("ddf", self.ddf))
        out = pd.DataFrame({
            "variable": tab.index.to_numpy(), "p_value": tab["p"].to_numpy(), "t_value": tab["t"].to_numpy(),
            "sd": tab["se"].to_numpy(), "log_fc": tab["estimate"].to_numpy(), "adj_p_value": tab["p_adj"].to_numpy(),
            "se": tab["se"].to_numpy(), "df": tab["df"].to_numpy(), "converged": tab["converged"].to_numpy(),
            "singular": tab["singular"].to_numpy()})
        return out.sort_values("p_value", kind="stable").reset_index(drop=True)

    def test_contrasts(self, contrasts, **kwargs) -> pd.DataFrame:
        """One contrast (a vector or Series over the coefficients) or a dict of named ones;
        the tables stacked with a ``contrast`` column (None for a single unnamed one)."""
        if not isinstance(contrasts, dict):
            contrasts = {None: contrasts}
        return pd.concat([self._test_single_contrast(c, **kwargs).assign(contrast=name)
                          for name, c in contrasts.items()], ignore_index=True)

    @classmethod
    def compare_groups(cls, adata, column, baseline, groups_to_compare, *, paired_by=None, mask=None,
                       layer=None, fit_kwargs=None, test_kwargs=None):
        """pertpy's one-call comparison: ``~ column`` (+ ``(1 | paired_by)``: pairs as a random
        effect), each group in ``groups_to_compare`` against ``baseline``."""
        design = f"~ {column}" + (f" + (1 | {paired_by})" if paired_by is not None else "")
        if paired_by is None:
            raise DataError("LmerDE.compare_groups needs paired_by= (the random-effects grouping, e.g. donor)")
        groups = [groups_to_compare] if isinstance(groups_to_compare, str) else list(groups_to_compare)
        model = cls(adata, design=design, mask=mask, layer=layer)
        model.fit(**(fit_kwargs or {}))
        return model.test_contrasts({g: model.contrast(column, baseline, g) for g in groups}, **(test_kwargs or {}))
