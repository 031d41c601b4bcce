"""t, F, χ² and normal tail probabilities and quantiles from ``scipy.special`` (the same
routines scipy.stats calls), so that importing lmmjax does not pay for scipy.stats."""
from __future__ import annotations

import numpy as np
import scipy.special as sc


def t_sf(t, df):
    """P(T > t) for Student's t with ``df`` degrees of freedom (df = inf: normal)."""
    t, df = np.broadcast_arrays(np.asarray(t, float), np.asarray(df, float))
    return np.where(np.isinf(df), sc.ndtr(-t), sc.stdtr(np.where(np.isinf(df), 1.0, df), -t))


def t_ppf(p, df):
    p, df = np.broadcast_arrays(np.asarray(p, float), np.asarray(df, float))
    return np.where(np.isinf(df), sc.ndtri(p), sc.stdtrit(np.where(np.isinf(df), 1.0, df), p))


def f_sf(F, dfn, dfd):
    """P(F > x) for the F(dfn, dfd) distribution (dfd = inf: χ²_dfn / dfn); a float
    for scalar input, else an array (broadcast)."""
    F, dfn, dfd = np.broadcast_arrays(np.asarray(F, float), np.asarray(dfn, float), np.asarray(dfd, float))
    out = np.where(np.isinf(dfd), sc.chdtrc(dfn, dfn * F), sc.fdtrc(dfn, np.where(np.isinf(dfd), 1.0, dfd), F))
    return float(out) if out.ndim == 0 else out


def chi2_sf(x, k):
    return float(sc.chdtrc(k, x))


def chi2_ppf(p, k):
    return float(sc.chdtri(k, 1.0 - p))


def norm_ppf(p):
    return sc.ndtri(p)
