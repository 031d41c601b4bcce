"""Many responses for one design: reading them column-chunk by column-chunk.

``lmer_batch`` accepts an n × G numpy array, a pandas DataFrame (columns = response
names), a scipy.sparse matrix (cells × genes counts; never densified whole), or an
AnnData object (covariates from ``.obs``, responses from ``.X`` or ``.layers[layer]``,
names from ``.var_names``).  :class:`ResponseMatrix` hides the difference; each chunk
yields the per-response cross-products (Zᵀy, Xᵀy, yᵀy) and, where a response has
missing values (NaN), its observation mask.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import scipy.sparse as sp

from .design import DataError, _constant_message, _term_Z, response_faults

__all__ = ["ResponseMatrix", "from_anndata"]


def _is_anndata(obj) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obs") and hasattr(obj, "var_names")


def from_anndata(adata, layer=None):
    """(obs DataFrame, response matrix, names) of an AnnData object."""
    if layer is None:
        Y = adata.X
    else:
        if layer not in adata.layers:
            raise DataError(f"AnnData has no layer {layer!r}; its layers are {list(adata.layers.keys())}")
        Y = adata.layers[layer]
    if Y is None:
        raise DataError("AnnData.X is empty; give layer= the layer that holds the responses")
    return adata.obs, Y, list(map(str, adata.var_names))


class ResponseMatrix:
    """An n × G response matrix (dense or sparse) with response names."""

    def __init__(self, Y, names=None):
        if isinstance(Y, pd.DataFrame):
            names = list(map(str, Y.columns)) if names is None else names
            Y = Y.to_numpy(dtype=float)
        if sp.issparse(Y):
            self.sparse = True
            self.Y = sp.csc_matrix(Y, dtype=float)       # column slices are cheap
        else:
            self.sparse = False
            Y = np.asarray(Y)
            if Y.dtype.kind not in "biuf":
                raise DataError(f"responses must be numeric, got dtype {Y.dtype}")
            self.Y = Y
        if self.Y.ndim != 2:
            raise DataError(f"responses must be a 2-D (n × G) matrix, got shape {self.Y.shape}")
        self.n, self.G = self.Y.shape
        self.names = [f"y{i}" for i in range(self.G)] if names is None else list(map(str, names))
        if len(self.names) != self.G:
            raise DataError(f"{len(self.names)} names for {self.G} responses")
        if len(set(self.names)) != self.G:
            dup = pd.Index(self.names)[pd.Index(self.names).duplicated()][0]
            raise DataError(f"response names must be unique; {dup!r} appears more than once")

    def column(self, j: int) -> np.ndarray:
        """One response as a dense float vector (NaN = missing)."""
        c = self.Y[:, j]
        return np.asarray(c.toarray()).ravel() if self.sparse else np.asarray(c, float)

    def chunk_stats(self, design, cols: np.ndarray, dtype="float64", row_scale=None, weights=None) -> dict:
        """Cross-products of the responses ``cols`` with the design (the data pass in
        ``dtype``; the statistics are returned in float64).

        Returns dict(stats=…, mask=(n × c) or None, masked=bool (c,), bad=(c,) object
        array of error messages or None, logw=(c,) Σ log wᵢ over the rows each response uses).
        Missing values (NaN) count as 0 in the products and are recorded in the mask; ±inf
        is an error for that response.

        ``row_scale`` (n,): √w of one weight vector shared by all responses (``design`` is
        then the √w-scaled :meth:`~lmmjax.design.Design.weighted` design and each response is
        scaled the same way).  ``weights`` (n × c): per-response prior weights; every
        response then gets its own design statistics (its ``mask`` column holds its weights,
        0 where missing): Σ wᵢ zᵢzᵢᵀ, Zᵀ(w∘y), Σ wᵢyᵢ².
        """
        off = design.offset
        if weights is not None:
            return self._weighted_chunk(design, cols, np.asarray(weights, float))
        if self.sparse:
            Yc = self.Y[:, cols]
            vals = Yc.data
            if np.all(np.isfinite(vals)) and off is None:
                if row_scale is not None:
                    Yc = sp.csc_matrix(sp.diags(row_scale) @ Yc)
                return dict(stats=_sparse_response_stats(design, Yc), mask=None,
                            masked=np.zeros(len(cols), bool), bad=_sparse_faults(Yc), logw=None)
            Yc = Yc.toarray()          # only a chunk with non-finite entries (or an offset) is densified
            if off is not None:
                Yc = Yc - off[:, None]
            if row_scale is not None:
                Yc = Yc * row_scale[:, None]
        else:
            cols = np.asarray(cols)
            contiguous = len(cols) > 0 and cols[-1] - cols[0] + 1 == len(cols) and np.all(np.diff(cols) == 1)
            # a run of columns is a view (fancy indexing would copy the whole chunk)
            Yc = np.asarray(self.Y[:, cols[0]: cols[-1] + 1] if contiguous else self.Y[:, cols], dtype=dtype)
            if off is not None:             # the fits see the working response y − offset
                Yc = Yc - off.astype(Yc.dtype)[:, None]
            if row_scale is not None:       # shared prior weights: √w-scaled rows
                Yc = Yc * row_scale.astype(Yc.dtype)[:, None]
            from .design import response_stats

            with np.errstate(invalid="ignore", over="ignore"):
                st = (_shifted_float32_stats(design, Yc) if Yc.dtype == np.float32 else response_stats(design, Yc))
            # yᵀy is finite exactly when the column is (NaN and ±inf propagate; a square
            # overflowing to inf just takes the careful path below): no extra pass
            if np.isfinite(st["yy"]).all():            # the common case
                return dict(stats=st, mask=None,
                            masked=np.zeros(len(cols), bool),
                            bad=response_faults(design.X, Yc, st["Xy"], st["yy"]), logw=None)
        Yc = np.asarray(Yc, dtype=float)
        nan = np.isnan(Yc)
        inf = np.isinf(Yc)
        bad = np.full(len(cols), None, object)
        for j in np.flatnonzero(inf.any(axis=0)):
            bad[j] = f"{int(inf[:, j].sum())} infinite value(s); use NaN for missing values"
        masked = nan.any(axis=0) & ~inf.any(axis=0)
        M = (~nan & ~inf).astype(float)
        Y0 = np.where(M > 0, Yc, 0.0)
        finite = ~inf.any(axis=0)
        if finite.any():                 # constant (or exactly fitted) among the observed values
            sub = np.where(M[:, finite] > 0, Yc[:, finite], np.nan)
            faults = response_faults(design.X, sub)
            idx = np.flatnonzero(finite)
            for j, msg in zip(idx, faults):
                if msg is not None:
                    bad[j] = msg
        from .design import response_stats

        return dict(stats=response_stats(design, Y0), mask=M if masked.any() else None,
                    masked=masked, bad=bad, logw=None)

    def _weighted_chunk(self, design, cols, Wc) -> dict:
        """:meth:`chunk_stats` with per-response weights ``Wc`` (n × c): invalid weights
        (negative, non-finite) fail that response only; NaN responses and zero weights
        leave the row out of that response's fit."""
        if Wc.shape != (self.n, len(cols)):
            raise DataError(f"per-response weights must be n × G ({self.n} × {self.G}); a chunk had shape {Wc.shape}")
        run = len(cols) > 0 and cols[-1] - cols[0] + 1 == len(cols)
        Yc = self.Y[:, cols[0]: cols[-1] + 1] if run else self.Y[:, cols]      # a run of columns: a view
        Yc = np.asarray(Yc.toarray() if self.sparse else Yc, float)
        if design.offset is not None:
            Yc = Yc - design.offset[:, None]
        bad = np.full(len(cols), None, object)
        with np.errstate(invalid="ignore", over="ignore"):   # reductions: NaN/inf propagate (no n × c temporaries)
            fine = np.isfinite(Yc.sum(axis=0)) & (Wc.min(axis=0, initial=np.inf) > 0) & np.isfinite(Wc.sum(axis=0))
        if fine.all():                   # the common case: every row used, few passes over the data
            W, Y0, use = Wc, Yc, None
            # screened from the (unweighted) cross-products: the QR check only for candidates
            faults = response_faults(design.X, Yc, Yc.T @ design.X, np.einsum("ng,ng->g", Yc, Yc))
        else:
            with np.errstate(invalid="ignore"):
                wbad = ~np.isfinite(Wc) | (Wc < 0)
            for j in np.flatnonzero(wbad.any(axis=0)):
                i = int(np.flatnonzero(wbad[:, j])[0])
                bad[j] = f"weights must be finite and >= 0 (row {i} has {Wc[i, j]:g})"
            inf = np.isinf(Yc)
            for j in np.flatnonzero(inf.any(axis=0) & ~wbad.any(axis=0)):
                bad[j] = f"{int(inf[:, j].sum())} infinite value(s); use NaN for missing values"
            with np.errstate(invalid="ignore"):
                use = np.isfinite(Yc) & ~wbad & (Wc > 0)
            W = np.where(use, Wc, 0.0)
            Y0 = np.where(use, Yc, 0.0)
            faults = np.full(len(cols), None, object)
            ok = np.array([b is None for b in bad])
            full, part = ok & fine, ok & ~fine      # constant (or exactly fitted) among the used values
            if full.any():
                Yf = Yc[:, full]
                faults[full] = response_faults(design.X, Yf, Yf.T @ design.X, np.einsum("ng,ng->g", Yf, Yf))
            if part.any():
                faults[part] = response_faults(design.X, np.where(use[:, part], Yc[:, part], np.nan))
        for j, msg in enumerate(faults):
            if msg is not None and bad[j] is None:
                bad[j] = msg
        from .design import response_stats

        WY = W * Y0
        st = response_stats(design, WY)                  # Zᵀ(w∘y), Xᵀ(w∘y)
        st["yy"] = np.einsum("ng,ng->g", WY, Y0)         # Σ wᵢyᵢ²
        logw = _sum_log(W if use is None else np.where(use, W, 1.0))
        return dict(stats=st, mask=W, masked=np.ones(len(cols), bool), bad=bad, logw=logw)


def _sum_log(W: np.ndarray, block: int = 8) -> np.ndarray:
    """Σᵢ log Wᵢ per column (W > 0) with one log per ``block`` rows: the logs of products of
    ``block`` weights (exact to a few ulps; ~8× fewer logs), and the plain sum for a column
    where such a product over- or underflows."""
    n = W.shape[0]
    m = n - n % block
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        P = W[:m].reshape(m // block, block, -1).prod(axis=1)
        out = np.log(P).sum(axis=0) + np.log(W[m:]).sum(axis=0)
    bad = ~np.isfinite(out) | (P == 0).any(axis=0) | ~np.isfinite(P).all(axis=0) | (P < 1e-290).any(axis=0)
    if bad.any():
        out[bad] = np.log(W[:, bad]).sum(axis=0)
    return out


def _sparse_faults(Yc) -> np.ndarray:
    """Constant columns of a sparse chunk (all zero: genes detected in no cell)."""
    Yc = sp.csc_matrix(Yc)
    lo = np.asarray(Yc.min(axis=0).toarray()).ravel()
    hi = np.asarray(Yc.max(axis=0).toarray()).ravel()
    bad = np.full(Yc.shape[1], None, object)
    for j in np.flatnonzero(lo == hi):
        bad[j] = _constant_message(lo[j])
    return bad


def _shifted_float32_stats(design, Yc: np.ndarray) -> dict:
    """float32 cross-products of y − c (c: each response's mean over its first rows), shifted
    back in float64: y = y' + c·1 gives Zᵀy = Zᵀy' + c·Zᵀ1, Xᵀy = Xᵀy' + c·Xᵀ1 and
    yᵀy = y'ᵀy' + 2c·1ᵀy' + c²n.  Without the shift, float32 round-off in yᵀy and Xᵀy grows
    with (mean/SD)² and reached 2e-3 relative in p-values for responses with mean 50."""
    from .design import response_stats

    c = Yc[: min(16, Yc.shape[0])].mean(axis=0, dtype=np.float64).astype(np.float32)
    Ys = Yc - c
    st = {k: np.asarray(v, np.float64) for k, v in response_stats(design, Ys).items()}
    ones = response_stats(design, np.ones(Yc.shape[0]))
    c64, s = c.astype(np.float64), Ys.sum(axis=0, dtype=np.float64)
    out = dict(Z1y=st["Z1y"] + c64[:, None, None] * ones["Z1y"][None], Xy=st["Xy"] + c64[:, None] * ones["Xy"][None],
               yy=st["yy"] + 2.0 * c64 * s + c64**2 * Yc.shape[0])
    if "Zry" in st:
        out["Zry"] = st["Zry"] + c64[:, None] * ones["Zry"][None]
    return out


def _sparse_response_stats(design, Yc) -> dict:
    """Zᵀy, Xᵀy, yᵀy of a sparse (n × c) chunk without densifying it."""
    c = Yc.shape[1]
    b1 = design.blocks[0]
    out = dict(
        Z1y=np.asarray((_term_Z(b1).T @ Yc).toarray()).T.reshape(c, b1.n_levels, b1.q),
        Xy=np.asarray((Yc.T @ design.X)),
        yy=np.asarray(Yc.multiply(Yc).sum(axis=0)).ravel(),
    )
    if len(design.blocks) > 1:
        Zr = sp.hstack([_term_Z(b) for b in design.blocks[1:]], format="csr")
        out["Zry"] = np.asarray((Zr.T @ Yc).toarray()).T
    return out
