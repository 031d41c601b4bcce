"""The on-disk exported programs (lmmjax._export): a fit served from a deserialized program
equals the ordinary jitted fit, a second process-like load does not trace or export again, and
a damaged file falls back to the ordinary path."""
import jax
import numpy as np
import pytest

import lmmjax
from lmmjax import _export

F = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture
def export_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_export, "_cache_dir", lambda: tmp_path)
    _export._LOADED.clear()
    yield tmp_path
    _export._LOADED.clear()


def _same(a, b, tol=1e-10):
    assert abs(a.reml_criterion - b.reml_criterion) <= tol * abs(b.reml_criterion)
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(a.fixef, b.fixef, rtol=1e-9)
    np.testing.assert_allclose(a.coef_table()["df"], b.coef_table()["df"], rtol=1e-7)


def test_exported_fit_equals_jitted_fit(export_dir, monkeypatch):
    sleep = lmmjax.datasets.sleepstudy()
    with monkeypatch.context() as mp:
        mp.setattr(_export, "_cache_dir", lambda: None)
        direct = lmmjax.lmer(F, sleep)
    first = lmmjax.lmer(F, sleep)                     # exports and writes the programs
    files = sorted(export_dir.glob("*.jaxexport"))
    assert files, "the Newton program should have been written"
    _same(first, direct)
    # a new process: nothing in memory; the programs come from disk, none is exported again
    _export._LOADED.clear()

    def no_export(*a, **k):
        raise AssertionError("exported again although the file exists")

    monkeypatch.setattr(jax.export, "export", no_export)
    second = lmmjax.lmer(F, sleep)
    assert all(v is not None for v in _export._LOADED.values())
    _same(second, direct)
    # REML and ML share the program (reml is a traced flag): no new file
    lmmjax.lmer(F, sleep, reml=False)
    assert sorted(export_dir.glob("*.jaxexport")) == files


def test_damaged_file_falls_back(export_dir):
    sleep = lmmjax.datasets.sleepstudy()
    ref = lmmjax.lmer(F, sleep)
    for f in export_dir.glob("*.jaxexport"):
        f.write_bytes(b"not a program")
    _export._LOADED.clear()
    m = lmmjax.lmer(F, sleep)
    assert any(v is None for v in _export._LOADED.values())
    _same(m, ref)


def test_key_changes_with_shapes_and_sources(monkeypatch):
    a = (np.zeros(4), {"x": np.zeros((8, 2))})
    b = (np.zeros(4), {"x": np.zeros((16, 2))})
    f = lmmjax.bucketed.crit_many
    assert _export._key(f, a, {}) != _export._key(f, b, {})
    k = _export._key(f, a, {})
    assert _export._key(f, a, {"layout": "L1"}) != _export._key(f, a, {"layout": "L2"}) != k
    monkeypatch.setattr(_export, "_SOURCE_HASH", ["edited"])
    assert _export._key(f, a, {}) != k

    class NoRepr:           # a static argument without stable text is never exported
        pass

    assert _export._key(f, a, {"s": NoRepr()}) is None


def test_exported_kr_profile_and_layout_engine(export_dir, monkeypatch):
    """Kenward-Roger's derivative program, the profile's criterion gradient and the layout
    engine's fit program (static layout arguments baked into the export) give the ordinary
    results."""
    sleep = lmmjax.datasets.sleepstudy()
    sleep = sleep.assign(D=(sleep.Days // 3).astype(str))

    def work():
        m = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep)
        cs = lmmjax.lmer("Reaction ~ Days + cs(0 + D | Subject)", sleep)
        return (m.coef_table("kenward-roger"), m.confint("profile"), cs.reml_criterion, cs.theta)

    with monkeypatch.context() as mp:
        mp.setattr(_export, "_cache_dir", lambda: None)
        ref = work()
    first = work()
    _export._LOADED.clear()
    second = work()
    assert len(list(export_dir.glob("*.jaxexport"))) >= 4
    for got in (first, second):
        np.testing.assert_allclose(got[0].to_numpy(float), ref[0].to_numpy(float), rtol=1e-9)
        np.testing.assert_allclose(got[1].to_numpy(float), ref[1].to_numpy(float), rtol=1e-7)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-12)
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-6, atol=1e-8)


def test_sparse_path_through_exported_programs(export_dir, monkeypatch):
    """The sparse Newton's programs (criterion, exact gradient+Hessian, solve) served from
    exported files give the jitted fit's numbers (1e-10), and a reload exports nothing."""
    import pandas as pd

    from lmmjax import design as design_mod

    monkeypatch.setattr(design_mod, "SPARSE_MIN_ENTRIES", 0)
    monkeypatch.setattr(design_mod, "SPARSE_DENSITY", 1.0)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 150, 1500), rng.integers(0, 40, 1500)
    df = pd.DataFrame(dict(a=a.astype(str), b=b.astype(str), x=rng.normal(size=1500)))
    df["y"] = df.x + rng.normal(size=150)[a] + 0.7 * rng.normal(size=40)[b] + rng.normal(size=1500)
    f = "y ~ x + (1 | a) + (1 | b)"
    with monkeypatch.context() as mp:
        mp.setattr(_export, "_cache_dir", lambda: None)
        direct = lmmjax.lmer(f, df)
    assert "tr_j" in direct.stats
    first = lmmjax.lmer(f, df)
    files = sorted(export_dir.glob("*.jaxexport"))
    assert len(files) >= 3, files                    # criterion, gradient+Hessian, solve
    assert abs(first.reml_criterion - direct.reml_criterion) <= 1e-10 * abs(direct.reml_criterion)
    np.testing.assert_allclose(first.theta, direct.theta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(first.fixef, direct.fixef, rtol=1e-9)
    _export._LOADED.clear()
    monkeypatch.setattr(jax.export, "export", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-exported")))
    again = lmmjax.lmer(f, df)
    assert abs(again.reml_criterion - direct.reml_criterion) <= 1e-10 * abs(direct.reml_criterion)
