"""One model, many responses: ``lmmjax.lmer_batch``.

Responses that share X and Z share the design cross-products (ZᵀZ, ZᵀX, XᵀX,
computed once); each response adds only Zᵀy, Xᵀy, yᵀy — one matrix product over
the n × G response matrix, read once, chunk by chunk.  A response with missing
values (NaN) gets its own cross-products over its observed rows (mask-weighted
sums, one sparse product for all such responses: :func:`~lmmjax.design.masked_design_stats`)
and runs through the same compiled program with the design statistics mapped too.
After that, every per-response computation costs nothing in n.

The fit itself is the batch engine's (:mod:`lmmjax.batchfit`: a damped Newton on θ for a
whole chunk in one compiled program); the result is :class:`lmmjax.batchresult.BatchResult`.

Chunks are sized to a memory budget, dispatched round-robin to every local device
(GPUs, or CPU devices), or handed to a Dask cluster; one bad response (infinite
values, a rank-deficient design on its observed rows, too few observations) gets an
error message in ``res.errors`` and NaN results, never the others' results.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._compute import precision
from .batchfit import (_bytes_per_response, _Chunk, _even_chunks, _fit_chunk_arrays, _fit_chunk_task,
                       _pad_sizes, _parse_memory, _take)
from .batchresult import BatchResult, _weight_columns
from .design import DataError, build_design, design_stats, masked_design_stats
from .model import lmer
from .responses import ResponseMatrix, _is_anndata, from_anndata

__all__ = ["lmer_batch", "BatchResult"]

DEFAULT_MAX_CHUNK = 4096


def _batch_weights(weights, data: pd.DataFrame, R: ResponseMatrix):
    """(shared n-vector or None, per-response n × G matrix or None) from ``lmer_batch``'s
    ``weights=``."""
    if weights is None:
        return None, None
    if isinstance(weights, pd.DataFrame):
        weights = weights.to_numpy(dtype=float)
    if isinstance(weights, str) or np.ndim(weights) == 1 and not sp.issparse(weights):
        from .design import _weight_values

        w = _weight_values(weights, data)
        if np.isnan(w).any():
            raise DataError(f"weights have {int(np.isnan(w).sum())} missing value(s); every row needs a weight")
        return w, None
    if np.shape(weights) != (R.n, R.G):
        raise DataError(f"per-response weights must be n × G = {R.n} × {R.G} (like the responses), "
                        f"got shape {np.shape(weights)}")
    return None, weights


# ---------------------------------------------------------------- checks on masked responses
def _masked_problems(design, ds: dict) -> np.ndarray:
    """Why a response with missing values cannot be fitted (None where it can): lme4's
    level-count rules on its observed rows, and a full-rank X there."""
    G = len(ds["n"])
    msg = np.full(G, None, object)
    nobs = ds["n"]
    p = design.p
    XX = ds["XX"]
    scale = np.maximum(np.max(np.abs(np.diagonal(XX, axis1=1, axis2=2)), axis=1), 1e-300)
    ev = np.linalg.eigvalsh(XX / scale[:, None, None])
    lev = [(design.blocks[0], np.einsum("glaa->gl", ds["D1"]) > 0)]
    if len(design.blocks) > 1:
        diag = np.diagonal(ds["ZrZr"], axis1=1, axis2=2)
        start = 0
        for b in design.blocks[1:]:
            w = b.n_levels * b.q
            lev.append((b, diag[:, start: start + w].reshape(G, b.n_levels, b.q).sum(axis=2) > 0))
            start += w
    for g in range(G):
        if nobs[g] <= p:
            msg[g] = f"only {int(nobs[g])} observed value(s) for {p} fixed-effects coefficients"
        elif ev[g, 0] <= 1e-10 * ev[g, -1]:
            msg[g] = (f"the fixed-effects columns are linearly dependent on its {int(nobs[g])} observed rows "
                      "(e.g. a level of a factor has no observations)")
        else:
            for b, seen in lev:
                nl = int(seen[g].sum())
                if nl < 2:
                    msg[g] = f"grouping factor {b.group!r} has {nl} observed level(s); it needs at least 2"
                elif nl >= nobs[g]:
                    msg[g] = (f"number of observed levels of {b.group!r} ({nl}) must be less than the "
                              f"number of observations ({int(nobs[g])})")
                elif nl * b.q >= nobs[g]:
                    msg[g] = (f"number of observations ({int(nobs[g])}) <= number of random effects "
                              f"({nl * b.q}) for term {b.term}")
                if msg[g]:
                    break
    return msg


# ---------------------------------------------------------------- driver
def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; be robust anyway
        return None
    return tqdm(total=total, unit="resp", desc="lmer_batch", smoothing=0.1)


def lmer_batch(formula: str, data=None, responses=None, reml: bool = True, *, names=None, layer=None,
               dtype: str = "float64", chunk_size: int | None = None, max_memory="2GB",
               progress: bool = True, devices=None, client=None, checkpoint_dir=None,
               weights=None) -> BatchResult:
    """Fit one linear mixed model to every response of a matrix.

    ``formula`` has no response: ``"~ condition + (1 | donor)"``.  ``data``: the
    covariates (pandas DataFrame, n rows), or an AnnData object (covariates from
    ``.obs``, responses from ``.X`` or ``.layers[layer]``, names from ``.var_names``).
    ``responses``: n × G numpy array, DataFrame (columns = names), scipy.sparse matrix
    (never densified whole) or AnnData.  NaN marks a missing value of one response:
    that response is fitted on its observed rows (as lme4 with na.omit would).

    Chunks of at most ``chunk_size`` responses (default: what fits ``max_memory``, at
    most 4096) are fitted by one vmapped program each, round-robin over ``devices``
    (default: every local device of JAX's default backend), or as tasks of a Dask
    ``client``.  ``progress`` shows a tqdm bar (responses/s, ETA).  ``dtype="float32"``
    makes the data pass (the n × G cross-products, the only part that grows with n) single
    precision; the per-response fits always run in float64, because the profiled criterion
    (~10³ in size) cannot resolve the optimum in float32 — fitting in float32 left half the
    responses unconverged (measured error of this option: benchmarks/README.md).

    ``checkpoint_dir``: a folder where each finished chunk is written as it completes
    (:mod:`lmmjax.checkpoint`); rerun with the same folder after an interruption and the
    finished chunks are loaded, not refitted (results byte-identical to an uninterrupted
    run); a folder written for other inputs is refused.

    ``weights``: prior weights as in ``lmer(..., weights=)`` (Var(εᵢ) = σ²/wᵢ): one vector
    for all responses (a column of ``data``/``.obs``, or n values), or one per response —
    an n × G array or DataFrame, or the name of an AnnData layer (voom-style precision
    weights).  Per-response weights give every response its own design cross-products
    (Σ wᵢzᵢzᵢᵀ: the NaN-mask machinery with real weights); a zero weight leaves the row out.

    Returns a :class:`BatchResult`.
    """
    adata = data if _is_anndata(data) else responses if _is_anndata(responses) else None
    if _is_anndata(data):
        if responses is not None and not _is_anndata(responses):
            raise DataError("give either an AnnData object or data= plus responses=, not both")
        data, Y, anames = from_anndata(data, layer)
        names = anames if names is None else names
    elif _is_anndata(responses):
        obs, Y, anames = from_anndata(responses, layer)
        data = obs if data is None else data
        names = anames if names is None else names
    else:
        Y = responses
    if (adata is not None and isinstance(weights, str) and weights in adata.layers
            and not (isinstance(data, pd.DataFrame) and weights in data.columns)):
        weights = adata.layers[weights]
    if data is None or Y is None:
        raise DataError("lmer_batch needs covariates (data=) and responses (responses=)")
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame or AnnData, got {type(data).__name__}")
    R = ResponseMatrix(Y, names)
    if R.n != len(data):
        raise DataError(f"responses have {R.n} rows but data has {len(data)}; they must match row by row")
    rhs = formula.split("~", 1)[-1]
    if "_response_" in data.columns:
        raise DataError("data must not have a column named '_response_' (lmer_batch uses that name)")
    design = build_design("_response_ ~" + rhs, data.assign(_response_=0.0))
    if design.n != len(data):
        raise DataError(f"{len(data) - design.n} rows of data have missing covariates; drop those rows from "
                        "data and responses first")
    layout = design.layout
    other = sorted({str(b.term) for b in design.blocks if not hasattr(b.structure, "positions")})
    if other:
        raise NotImplementedError(f"lmer_batch fits us/diag random-effect terms; {other} is not supported "
                                  "in batch yet (fit it per response with lmmjax.lmer)")
    shared_w, W = _batch_weights(weights, data, R)
    user_design = design
    if shared_w is not None:        # one weight vector: the likelihood sees √w-scaled rows
        user_design = dataclasses.replace(design, weights=shared_w)
        design = user_design.weighted()
    data_dtype = str(np.dtype(dtype))
    if data_dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    dtype = "float64"          # the fits; see the docstring
    budget = _parse_memory(max_memory)

    # ---- one pass over the responses: their cross-products (and masks)
    G, n = R.G, R.n
    errors = np.full(G, None, object)
    ds_shared = design_stats(design, sparse=False)  # the batch programs use the dense blocked form
    read = max(1, min(G, int(budget / (3 * 8.0 * n))))
    shared_idx, shared_stats, masked_idx, masked_r, masked_d = [], [], [], [], []
    logw = np.full(G, 0.0 if shared_w is None else float(np.sum(np.log(shared_w))))
    for start in range(0, G, read):
        cols = np.arange(start, min(G, start + read))
        ch = R.chunk_stats(design, cols, data_dtype, row_scale=None if shared_w is None else np.sqrt(shared_w),
                           weights=None if W is None else _weight_columns(W, cols))
        if ch["logw"] is not None:
            logw[cols] = ch["logw"]
        errors[cols] = ch["bad"]
        ok = np.array([b is None for b in ch["bad"]])
        full = ok & ~ch["masked"]
        shared_idx.append(cols[full])
        shared_stats.append(_take(ch["stats"], full))
        if (ch["masked"] & ok).any():
            mk = ch["masked"] & ok            # (a masked response already failed keeps its reason)
            dsm = masked_design_stats(design, ch["mask"] if mk.all() else ch["mask"][:, mk])
            prob = _masked_problems(design, dsm)
            good = np.array([m is None for m in prob])
            errors[cols[mk]] = prob
            masked_idx.append(cols[mk][good])
            masked_r.append(_take(_take(ch["stats"], mk), good))
            masked_d.append(_take(dsm, good))

    def cat(parts):
        return {k: np.concatenate([p_[k] for p_ in parts]) for k in parts[0]} if parts else {}

    shared_idx = np.concatenate(shared_idx) if shared_idx else np.zeros(0, int)
    sh_r = cat(shared_stats)
    chunks: list[_Chunk] = []
    size = chunk_size or max(1, min(DEFAULT_MAX_CHUNK, int(budget / _bytes_per_response(design, False))))
    for part in _even_chunks(np.arange(len(shared_idx)), size):
        chunks.append(_Chunk(shared_idx[part], ds_shared, _take(sh_r, part), False))
    if masked_idx:
        m_idx = np.concatenate(masked_idx)
        m_r, m_d = cat(masked_r), cat(masked_d)
        msize = chunk_size or max(1, min(DEFAULT_MAX_CHUNK, int(budget / _bytes_per_response(design, True))))
        for part in _even_chunks(np.arange(len(m_idx)), msize):
            chunks.append(_Chunk(m_idx[part], _take(m_d, part), _take(m_r, part), True))

    # ---- fit the chunks
    k, p = layout.n_theta, design.p
    fit = dict(theta=np.full((G, k), np.nan), criterion=np.full(G, np.nan), grad=np.full((G, k), np.nan),
               hess=np.full((G, k, k), np.nan), beta=np.full((G, p), np.nan), sigma2=np.full(G, np.nan),
               vcov=np.full((G, p, p), np.nan), satt_H=np.full((G, k + 1, k + 1), np.nan),
               satt_dM=np.full((G, p, p, k + 1), np.nan), satt_M=np.full((G, p, p), np.nan),
               nobs=np.full(G, float(n)), iterations=np.zeros(G, int))
    theta0 = layout.init_theta()
    bar = _progress_bar(G, progress)
    if bar is not None and (errors != None).any():  # noqa: E711
        bar.update(int((errors != None).sum()))  # noqa: E711

    def store(ch, out):
        m = len(ch.idx)
        for key_, v in out.items():
            fit[key_][ch.idx] = np.asarray(v)[:m]
        if ch.mapped:
            fit["nobs"][ch.idx] = np.asarray(ch.dstats["n"])
        if bar is not None:
            bar.update(m)

    pad_to = _pad_sizes(chunks)
    ckpt = None
    if checkpoint_dir is not None:
        from .checkpoint import Checkpoint

        ckpt = Checkpoint(checkpoint_dir, chunks, dict(
            formula=formula, reml=bool(reml), dtype=data_dtype, G=G, n=n,
            pad_to={str(k): v for k, v in pad_to.items()}, theta0=theta0.tolist()))

    def finish(i, ch, out):
        if ckpt is not None:
            ckpt.save(i, out)
        store(ch, out)

    todo = []
    for i, ch in enumerate(chunks):
        saved = ckpt.load(i) if ckpt is not None else None
        if saved is not None:
            store(ch, saved)
        else:
            todo.append((i, ch))
    try:
        if client is not None:
            futures = {}
            for i, ch in todo:
                d, r = ch.padded(pad_to[ch.mapped])
                fut = client.submit(_fit_chunk_task, theta0, d, r, layout, reml, ch.mapped, dtype, pure=False)
                futures[fut] = (i, ch)
            from dask.distributed import as_completed

            for fut in as_completed(list(futures)):
                finish(*futures[fut], jax.device_get(fut.result()))
        else:
            devs = _devices(devices)
            with precision(dtype) as dt:
                pending = []
                for j, (i, ch) in enumerate(todo):
                    d, r = ch.padded(pad_to[ch.mapped])
                    pending.append((i, ch, _fit_chunk_arrays(theta0, d, r, layout, reml, ch.mapped, dt,
                                                             devs[j % len(devs)])))
                    if len(pending) >= len(devs):   # one chunk in flight per device
                        i0, c0, o0 = pending.pop(0)
                        finish(i0, c0, jax.device_get(o0))
                for i0, c0, o0 in pending:
                    finish(i0, c0, jax.device_get(o0))
    finally:
        if bar is not None:
            bar.close()
    fit["criterion"] = fit["criterion"] - logw        # −2ℓ of the weighted model (lme4's, with Σ log wᵢ)
    failed = np.isnan(fit["criterion"]) & np.array([e is None for e in errors])
    errors[failed] = "numerical failure in the fit (non-finite criterion)"
    res = BatchResult(user_design, R, data, formula, reml, dtype, chunks, fit, errors, fitter=lmer)
    res._weights = W                 # per-response weights (a reference), for variance_partition
    res.data_dtype = data_dtype
    return res


def _devices(devices):
    if devices is None:
        return jax.local_devices()
    if isinstance(devices, (list, tuple)):
        return list(devices)
    return [devices]
