"""Where lmmjax's JAX computations run: precision, BLAS threading and the CPU bound
(a leaf module)."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import jax
import numpy as np

__all__ = ["precision", "to_device", "set_cpu_threads", "release_programs"]

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
    bound_programs()
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


# -- a bound on the compiled programs a long process holds ----------------------------------

#: XLA-CPU maps each compiled program's code into memory separately (~400–800 mappings and
#: ~20 MB per program of the layout engine).  A process fitting ever new designs whose
#: programs are compiled per layout used to reach the kernel's ``vm.max_map_count`` (65,530
#: by default) after ~80 designs and abort ("LLVM ERROR: Unable to allocate section
#: memory").  The exported programs are bounded by :data:`lmmjax._export.MAX_LOADED`; the
#: rest (calls without the persistent cache) by this: when the process holds more mappings
#: than this share of the limit (32 loaded programs hold ~18,000), lmmjax drops all its
#: compiled programs (:func:`release_programs`; the next fit of a design reloads or
#: recompiles its program).
MAP_SHARE = 0.4
#: the mappings are counted after every this many compilations
CHECK_EVERY = 8
_COMPILES = [0, 0]          # compilations seen, and at the last check
_LISTENING: list = []


def _on_event(event: str, duration: float, **kw) -> None:
    if "backend_compile" in event:
        _COMPILES[0] += 1


def _listen() -> None:
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING.append(True)


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def bound_programs() -> bool:
    """Release lmmjax's compiled programs when the process nears the memory-map limit
    (:data:`MAP_SHARE`); checked every :data:`CHECK_EVERY` compilations, so a warm call
    costs one comparison.  Returns whether it released them."""
    _listen()
    if _COMPILES[0] - _COMPILES[1] < CHECK_EVERY:
        return False
    _COMPILES[1] = _COMPILES[0]
    if _map_count() <= MAP_SHARE * _map_limit():
        return False
    release_programs()
    return True


def release_programs() -> None:
    """Drop every compiled program lmmjax's modules hold (the caches of their jitted
    functions and the loaded exported programs); other JAX code's caches are untouched."""
    import gc
    import sys

    from . import _export

    for name, mod in list(sys.modules.items()):
        if name == "lmmjax" or name.startswith("lmmjax."):
            for v in list(vars(mod).values()):
                clear = getattr(v, "clear_cache", None)
                if callable(clear) and hasattr(v, "lower"):
                    clear()
    _export._LOADED.clear()
    gc.collect()
    try:        # hand the freed code and heap pages back to the OS (glibc; elsewhere a no-op)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
