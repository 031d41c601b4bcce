"""Traced programs kept on disk (``jax.export``), so a fresh process does not re-trace them.

JAX's persistent compilation cache (:mod:`lmmjax._cache`) saves the XLA compilation of a
program, but not the Python tracing and MLIR lowering that come before it: for the bucketed
engine's Newton program (:func:`lmmjax.bucketed.newton`, a while loop around 2k + 1
forward-mode passes) those are ~85% of a fresh process's first fit (measured with JAX's
monitoring events: trace 6.2 s, lowering 2.3 s, cache retrieval 1.7 s on a loaded 2-core
machine).  Here a jitted function is exported once per argument signature (tree structure,
shapes, dtypes) and serialized next to the compilation cache; a later process deserializes
it and calls it through a trivial wrapper, whose compilation the persistent cache then finds.

The key includes the signature, the JAX/jaxlib versions, the platform and a hash of the
source of every lmmjax module (a changed program is never served stale).  Anything that
fails (a platform or custom call export does not support, an unreadable file) falls back to
the ordinary jitted call; nothing here changes a number.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import threading

import jax
import numpy as np

__all__ = ["call", "bind"]

_LOCK = threading.Lock()
_LOADED: "collections.OrderedDict" = collections.OrderedDict()   # key -> jitted call of the
#                             deserialized program (or None: use fn), least recently used first
#: programs kept loaded; the least recently used beyond are dropped (XLA-CPU maps each
#: program's code separately, ~400–800 memory mappings and ~10–20 MB: a process fitting ever
#: new designs must not keep them all; a dropped program reloads from the persistent cache).
#: 300 random small designs in one process (benchmarks/robustness.py's): 32 → 98 programs
#: loaded in all, 20 s of loading, ~970 MB resident at the end; 12 → 293, 52 s, ~650 MB
MAX_LOADED = 32
_KEYS: dict = {}            # (fn, tree, shapes and dtypes, static) -> key (a warm call hashes nothing)


def _cache_dir() -> pathlib.Path | None:
    if os.environ.get("LMMJAX_COMPILATION_CACHE", "1") == "0" or os.environ.get("LMMJAX_EXPORT_CACHE", "1") == "0":
        return None
    base = jax.config.jax_compilation_cache_dir
    return None if not base else pathlib.Path(base) / "lmmjax-export"


_SOURCE_HASH: list = []


def _source_hash() -> str:
    """Hash of lmmjax's own sources (any edit re-exports every program)."""
    if not _SOURCE_HASH:
        h = hashlib.sha256()
        for p in sorted(pathlib.Path(__file__).parent.glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
        _SOURCE_HASH.append(h.hexdigest()[:16])
    return _SOURCE_HASH[0]


def _key(fn, args, static: dict) -> str | None:
    """The program's key, or None when a static argument has no stable text (an object
    printed with its address: a user's kernel class without a repr)."""
    leaves, tree = jax.tree.flatten(args)
    sig = tuple((np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in leaves)
    try:
        memo = (fn, tree, sig, tuple(sorted(static.items())), _source_hash())
        hash(memo)
    except TypeError:
        memo = None
    if memo is not None and memo in _KEYS:
        return _KEYS[memo]
    st = repr(sorted(static.items()))
    if " at 0x" in st:
        key = None
    else:
        text = repr((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), str(tree),
                     [(shape, str(dt)) for shape, dt in sig], st,
                     jax.__version__, jax.default_backend(), _source_hash()))
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
    if memo is not None:
        _KEYS[memo] = key
    return key


def _load_or_export(fn, args, static: dict, key: str, folder: pathlib.Path):
    path = folder / f"{key}.jaxexport"
    if path.exists():
        exp = jax.export.deserialize(bytearray(path.read_bytes()))
    else:
        exp = jax.export.export(fn)(*args, **static)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(exp.serialize())
        os.replace(tmp, path)
    return jax.jit(exp.call)


def _as_array(x):
    return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def call(fn, *args, **static):
    """``fn(*args, **static)`` for a jitted ``fn`` (``static``: its static arguments, by
    name), through its exported program when a persistent cache folder is set."""
    folder = _cache_dir()
    if folder is None:
        return fn(*args, **static)
    args = tuple(jax.tree.map(_as_array, args))     # Python scalars → arrays: a fixed signature
    key = _key(fn, args, static)
    if key is None:
        return fn(*args, **static)
    prog = _LOADED.get(key, False)
    if prog is False:
        with _LOCK:
            try:
                prog = _load_or_export(fn, args, static, key, folder)
            except Exception:       # unsupported by export, or a damaged file: the ordinary path
                prog = None
            _LOADED[key] = prog
            while len(_LOADED) > MAX_LOADED:
                _LOADED.popitem(last=False)
    else:
        _touch(key)
    return fn(*args, **static) if prog is None else prog(*args)


def _touch(key) -> None:
    """Mark a loaded program most recently used."""
    if next(reversed(_LOADED)) != key:
        try:
            _LOADED.move_to_end(key)
        except KeyError:            # dropped by another thread meanwhile
            pass


def bind(fn, **static):
    """:func:`call`'s signature work (array conversion, the key) done once: a callable
    ``run(*args)`` for arguments that keep the signature (tree, shapes, dtypes) of its
    first call (a warm small fit dispatches its program through one, ~0.1 ms less per
    call).  The cache folder and the program are still looked up per call, so turning the
    cache off or on and the loaded programs' bound (:data:`MAX_LOADED`) hold as for
    :func:`call`."""
    keys = []

    def run(*a):
        if _cache_dir() is None:
            return fn(*a, **static)
        if not keys:
            keys.append(_key(fn, tuple(jax.tree.map(_as_array, a)), static))
        key = keys[0]
        prog = False if key is None else _LOADED.get(key, False)
        if prog is False:
            return call(fn, *a, **static)
        _touch(key)
        if prog is None:
            return fn(*a, **static)
        return prog(*(x if isinstance(x, (dict, jax.Array, np.ndarray)) else np.asarray(x) for x in a))

    return run
