"""Where lmmjax's JAX computations run: precision, BLAS threading and the CPU bound
(a leaf module)."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import jax
import numpy as np

__all__ = ["precision", "to_device", "set_cpu_threads"]

_BLAS = None

#: CPUs lmmjax's computations may use (None: all the process may use); from
#: ``LMMJAX_CPU_THREADS`` or :func:`set_cpu_threads`
_CPU_LIMIT: int | None = None
_BOUND = threading.local()


def _env_limit() -> int | None:
    v = os.environ.get("LMMJAX_CPU_THREADS", "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"LMMJAX_CPU_THREADS must be a positive integer, got {v!r}")
    return int(v)


_CPU_LIMIT = _env_limit()


def set_cpu_threads(n: int | None) -> int | None:
    """Bound the CPUs lmmjax's computations use to ``n`` (None: no bound); returns the
    previous setting.  Same as the environment variable ``LMMJAX_CPU_THREADS``.

    XLA's CPU thread pool is sized once, when JAX starts, so it cannot be shrunk per
    call the way threadpoolctl shrinks BLAS.  Instead, for the duration of each lmmjax
    call, every thread of the process is confined to ``n`` of the CPUs it may use
    (``sched_setaffinity``, Linux only; elsewhere a no-op), and each thread's own CPU set is
    restored afterwards — your code outside lmmjax runs as before.  Use it on shared
    machines or when running several lmmjax processes side by side (the benchmark
    ``benchmarks/contention.py`` measures the effect)."""
    global _CPU_LIMIT
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(f"set_cpu_threads takes a positive integer or None, got {n!r}")
    prev, _CPU_LIMIT = _CPU_LIMIT, (None if n is None else int(n))
    return prev


@contextmanager
def cpu_bound():
    """Context: the process's threads confined to ``_CPU_LIMIT`` CPUs (see
    :func:`set_cpu_threads`); re-entrant, restores every thread's CPU set on exit."""
    n = _CPU_LIMIT
    if not n or getattr(_BOUND, "active", False) or not hasattr(os, "sched_setaffinity"):
        yield
        return
    own = os.sched_getaffinity(0)
    if n >= len(own):
        yield
        return
    keep = set(sorted(own)[:n])
    saved = {}
    for tid in _threads():
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, keep)
        except OSError:      # a thread that ended meanwhile
            pass
    _BOUND.active = True
    try:
        yield
    finally:
        _BOUND.active = False
        for tid in _threads():     # threads started inside inherit the bound: give them ours
            try:
                os.sched_setaffinity(tid, saved.get(tid, own))
            except OSError:
                pass


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


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
    machine, far more than the work.  The previous limits are restored on exit.  With a
    CPU bound (:func:`set_cpu_threads`) the process's threads are confined to it.
    """
    if dtype not in ("float64", "float32", np.float64, np.float32):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    with jax.enable_x64(np.dtype(dtype) == np.float64), _one_blas_thread(), cpu_bound():
        yield np.dtype(dtype)


_BLAS_LIBS: list = []


@contextmanager
def _one_blas_thread():
    """BLAS limited to one thread, restored on exit (threadpoolctl's libraries, found once:
    a ``limit()`` call re-scans the loaded libraries, ~0.3 ms, more than a small fit's
    program)."""
    if not _BLAS_LIBS:
        _BLAS_LIBS.append([lc for lc in _blas_controller().select(user_api="blas").lib_controllers])
    libs = _BLAS_LIBS[0]
    before = [lc.get_num_threads() for lc in libs]
    for lc, n in zip(libs, before):
        if n != 1:
            lc.set_num_threads(1)
    try:
        yield
    finally:
        for lc, n in zip(libs, before):
            if n != 1:
                lc.set_num_threads(n)


def to_device(stats: dict, dtype) -> dict:
    """Host arrays -> device arrays in ``dtype`` (a transfer; no compiled conversion kernels).
    Integer arrays (the index arrays of a sparse design) keep their integer type."""
    return {k: jax.device_put(v if np.issubdtype(np.asarray(v).dtype, np.integer) else np.asarray(v, dtype=dtype))
            for k, v in stats.items()}
