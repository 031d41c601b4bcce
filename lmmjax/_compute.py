"""Where lmmjax's JAX computations run: precision and BLAS threading (a leaf module)."""
from __future__ import annotations

from contextlib import contextmanager

import jax
import numpy as np

__all__ = ["precision", "to_device"]

_BLAS = None


def _blas_controller():
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS


@contextmanager
def precision(dtype="float64"):
    """Run lmmjax's JAX computations in ``dtype`` without touching the global x64 flag.

    Inside, BLAS (the OpenBLAS whose LAPACK kernels XLA-CPU calls) is limited to one
    thread: its thread wake-ups cost ~8 ms per small factorization on this kind of
    machine, far more than the work.  The previous limits are restored on exit.
    """
    if dtype not in ("float64", "float32", np.float64, np.float32):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    with jax.enable_x64(np.dtype(dtype) == np.float64), _blas_controller().limit(limits=1, user_api="blas"):
        yield np.dtype(dtype)


def to_device(stats: dict, dtype) -> dict:
    """Host arrays -> device arrays in ``dtype`` (a transfer; no compiled conversion kernels).
    Integer arrays (the index arrays of a sparse design) keep their integer type."""
    return {k: jax.device_put(v if np.issubdtype(np.asarray(v).dtype, np.integer) else np.asarray(v, dtype=dtype))
            for k, v in stats.items()}
