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
