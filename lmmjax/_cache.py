"""Persistent XLA compilation cache, so a fresh process reuses earlier compilations.

lmmjax compiles a handful of small programs per design shape (criterion and
gradient, the L-BFGS direction, the final solve).  Compiling them costs about a
second on a cold start; JAX's on-disk cache brings later cold starts close to
import time.  We switch it on only when the user has not configured a cache
(``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``), in
``$LMMJAX_CACHE_DIR`` or ``~/.cache/lmmjax/xla``.  Set ``LMMJAX_COMPILATION_CACHE=0``
to opt out.  Note the cache is a process-wide JAX setting, so other JAX code in
the same process will also use it once lmmjax is imported.
"""
from __future__ import annotations

from contextlib import contextmanager

import os


def enable_persistent_cache() -> str | None:
    if os.environ.get("LMMJAX_COMPILATION_CACHE", "1") == "0":
        return None
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("LMMJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmmjax", "xla"
    )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    return path


@contextmanager
def no_persistent_cache():
    """Context: programs compiled inside are not written to the persistent cache (the
    write is skipped before serialization: minimum compile time set very high).  Used
    for the residual-structure programs, whose cache write (executable.serialize)
    segfaulted in jaxlib 0.10.2 on clean CI runs."""
    from jax._src import config

    with config.enable_compilation_cache(False), config.persistent_cache_min_compile_time_secs(1e12):
        yield
