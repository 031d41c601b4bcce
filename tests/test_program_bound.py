"""A long process does not accumulate compiled programs without bound (lmmjax._compute):
near the memory-map limit lmmjax drops its own programs, and fits go on unchanged."""
import numpy as np
import pandas as pd

import lmmjax
from lmmjax import _compute, _export, likelihood


def _design(levels, seed):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(levels), 6)
    x = rng.normal(size=g.size)
    y = rng.normal(size=levels)[g] + 0.4 * rng.normal(size=levels)[g] * x + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g]})


def test_release_drops_lmmjax_programs_and_fits_go_on():
    # (x || g) with 70 groups: the layout engine (programs compiled per layout)
    df = _design(70, 1)
    m1 = lmmjax.lmer("y ~ x + (x || g)", df)
    _compute.release_programs()
    assert likelihood.solve._cache_size() == 0 and not _export._LOADED
    m2 = lmmjax.lmer("y ~ x + (x || g)", _design(70, 1))
    assert abs(m1.optinfo.criterion - m2.optinfo.criterion) <= 1e-10 * abs(m1.optinfo.criterion)
    np.testing.assert_allclose(m1.fixef.to_numpy(), m2.fixef.to_numpy(), rtol=1e-9)


def test_programs_are_released_near_the_map_limit(monkeypatch):
    released = []
    monkeypatch.setattr(_compute, "CHECK_EVERY", 1)
    monkeypatch.setattr(_compute, "MAP_SHARE", 0.0)          # any process is "near the limit"
    monkeypatch.setattr(_compute, "release_programs", lambda: released.append(True))
    _compute._COMPILES[0] = _compute._COMPILES[1] + 1        # a compilation since the last check
    lmmjax.lmer("y ~ x + (1 | g)", _design(9, 2))
    assert released
    # far from the limit nothing is released
    released.clear()
    monkeypatch.setattr(_compute, "MAP_SHARE", 1.0)
    _compute._COMPILES[0] = _compute._COMPILES[1] + 1
    lmmjax.lmer("y ~ x + (1 | g)", _design(9, 3))
    assert not released


def test_the_map_count_is_read():
    import sys

    if sys.platform.startswith("linux"):
        assert _compute._map_count() > 10 and _compute._map_limit() > 1000


def test_loaded_programs_are_bounded(monkeypatch, tmp_path):
    """At most MAX_LOADED exported programs stay loaded, the least recently used dropped."""
    import jax

    monkeypatch.setattr(_export, "MAX_LOADED", 2)
    monkeypatch.setattr(_export, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(_export, "_LOADED", type(_export._LOADED)())
    add = jax.jit(lambda x: x + 1.0)
    for n in (1, 2, 3):                               # three signatures: three programs
        np.testing.assert_allclose(_export.call(add, np.zeros(n)), np.ones(n))
    assert len(_export._LOADED) == 2
    first = next(iter(_export._LOADED))
    _export.call(add, np.zeros(2))                    # a hit moves its program to the end
    assert next(iter(_export._LOADED)) != first and len(_export._LOADED) == 2
    assert len(list(tmp_path.glob("*.jaxexport"))) == 3     # dropped programs stay on disk


def test_bound_call_equals_call_and_follows_the_cache_switch(monkeypatch, tmp_path):
    import jax

    add = jax.jit(lambda x, y: x * y["a"])
    run = _export.bind(add)
    args = (np.arange(3.0), {"a": np.float64(2.0)})
    monkeypatch.setattr(_export, "_cache_dir", lambda: None)
    np.testing.assert_allclose(run(*args), 2 * np.arange(3.0))       # no cache: the jitted call
    assert not list(tmp_path.glob("*.jaxexport"))
    monkeypatch.setattr(_export, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(_export, "_LOADED", type(_export._LOADED)())
    np.testing.assert_allclose(run(*args), 2 * np.arange(3.0))       # cache on: exported and loaded
    assert len(list(tmp_path.glob("*.jaxexport"))) == 1 and len(_export._LOADED) == 1
    np.testing.assert_allclose(run(np.ones(3), {"a": np.float64(5.0)}), 5 * np.ones(3))
