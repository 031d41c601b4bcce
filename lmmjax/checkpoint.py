"""Resumable batch runs: finished chunks of :func:`lmmjax.lmer_batch` on disk.

A run with ``checkpoint_dir=`` writes, per chunk of responses, the arrays its compiled
fit returned (``chunk_00012.npz``), each atomically (written to a temporary file in the
same folder, flushed, then renamed over the final name: a killed run leaves whole files
or none).  ``manifest.json`` holds a fingerprint of everything the chunk results depend
on — the formula, REML/ML, dtype, lmmjax's version, the chunk layout and the SHA-256
of every chunk's design and response cross-products.  A rerun with the same folder
loads the finished chunks instead of fitting them, so its results are byte-identical
to an uninterrupted run; a folder written for other inputs is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

__all__ = ["Checkpoint", "fingerprint"]


def _update(h, a) -> None:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def fingerprint(chunks, meta: dict) -> str:
    """SHA-256 over ``meta`` (JSON) and every chunk's positions and statistics."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    seen = set()
    for ch in chunks:
        _update(h, ch.idx)
        h.update(b"mapped" if ch.mapped else b"shared")
        for part in (ch.dstats, ch.rstats):
            if id(part) in seen:          # the shared design statistics: hashed once
                h.update(b"same")
                continue
            seen.add(id(part))
            for key in sorted(part):
                h.update(key.encode())
                _update(h, part[key])
    return h.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmmjax")
    except PackageNotFoundError:
        return "unknown"


class Checkpoint:
    """The chunk files of one run in ``folder`` (created if missing)."""

    def __init__(self, folder, chunks, meta: dict):
        from .design import DataError

        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_chunks = len(chunks)
        meta = dict(meta, lmmjax=_version())
        self.key = fingerprint(chunks, meta)
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except ValueError:
                old = {}
            if old.get("fingerprint") != self.key or old.get("n_chunks") != self.n_chunks:
                raise DataError(
                    f"checkpoint_dir {str(self.folder)!r} holds a run for different inputs (formula, data, "
                    "responses, options or chunking differ); use a new folder, or delete this one to start over")
        else:
            stray = sorted(p.name for p in self.folder.glob("chunk_*.npz"))
            if stray:
                raise DataError(f"checkpoint_dir {str(self.folder)!r} has chunk files but no manifest.json "
                                f"(e.g. {stray[0]}); use an empty or new folder")
            self._atomic_write(manifest, json.dumps(dict(fingerprint=self.key, n_chunks=self.n_chunks,
                                                         meta=meta), default=str, indent=1).encode())

    def _path(self, i: int) -> pathlib.Path:
        return self.folder / f"chunk_{i:05d}.npz"

    def _atomic_write(self, path: pathlib.Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, i: int) -> dict | None:
        """The saved outputs of chunk ``i``, or None if it has not finished."""
        path = self._path(i)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, i: int, out: dict) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in out.items()})
        self._atomic_write(self._path(i), buf.getvalue())

    def finished(self) -> list[int]:
        return [i for i in range(self.n_chunks) if self._path(i).exists()]
