"""Plots (matplotlib, an optional extra: ``pip install lmmjax[plots]``).  Every function
returns the matplotlib Axes it drew on and takes ``ax=`` to draw into an existing one."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["variance_partition"]


def _axes(ax, figsize=(6, 4)):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("lmmjax.plots needs matplotlib: pip install 'lmmjax[plots]'") from None
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def variance_partition(vp, ax=None, percent: bool = True):
    """variancePartition's figure: for a batch (a responses × components DataFrame from
    :meth:`lmmjax.BatchResult.variance_partition`) one violin per component with its
    median marked, components ordered by median (Residuals last); for one model (a Series
    from :meth:`lmmjax.LmerResult.variance_partition`) a horizontal bar per component."""
    scale = 100.0 if percent else 1.0
    label = "Variance explained (%)" if percent else "Fraction of variance explained"
    if isinstance(vp, pd.Series):
        ax = _axes(ax, (5, 0.4 * len(vp) + 1))
        ax.barh(list(vp.index)[::-1], vp.to_numpy()[::-1] * scale, color="0.4")
        ax.set_xlabel(label)
        ax.set_xlim(0, scale)
        return ax
    if not isinstance(vp, pd.DataFrame):
        raise TypeError(f"variance_partition plots a DataFrame or Series of fractions, got {type(vp).__name__}")
    vp = vp.dropna(how="all")
    cols = [c for c in vp.columns if c != "Residuals"]
    cols = sorted(cols, key=lambda c: -float(np.nanmedian(vp[c]))) + (["Residuals"] if "Residuals" in vp else [])
    ax = _axes(ax, (max(4, 0.8 * len(cols) + 1), 4))
    data = [vp[c].dropna().to_numpy() * scale for c in cols]
    parts = ax.violinplot(data, showmedians=True, showextrema=False)
    for body in parts["bodies"]:
        body.set_alpha(0.6)
    ax.set_xticks(np.arange(1, len(cols) + 1), cols, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_ylim(0, scale)
    return ax
