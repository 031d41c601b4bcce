"""lmer_batch: every response's result equals the single-model lmer result on that
response (1e-6 relative on estimates, SEs, Satterthwaite and Kenward-Roger df; logLik
1e-9), singular flags included — for complete responses, responses with their own
missing values, sparse and AnnData input, chunked runs, several devices and Dask."""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import lmmjax

RTOL = 1e-6


def _sim(G, seed=0, donors=8, cells=30):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(donors), cells)
    cond = np.where(np.arange(donors * cells) % 2 == 0, "ctl", "trt")
    obs = pd.DataFrame(dict(donor=[f"D{d}" for d in donor], condition=cond))
    sd = rng.choice([0.0, 0.2, 1.0], size=G)          # some genes with no donor variance
    Y = rng.normal(size=(len(obs), G)) + sd * rng.normal(size=(donors, G))[donor]
    Y += 0.5 * (cond == "trt")[:, None] * (rng.random(G) < 0.3)
    return obs, pd.DataFrame(Y, columns=[f"gene{i}" for i in range(G)])


def _single(rhs, obs, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmmjax.lmer("y " + rhs, obs.assign(y=y), **kw)


def _check_against_single(res, rhs, obs, Y, genes, coef="conditiontrt", kr=False):
    tab = res.coef_table(coef)
    tab_kr = res.coef_table(coef, ddf="kenward-roger") if kr else None
    for g in genes:
        m = _single(rhs, obs, Y[g])
        ct = m.coef_table().loc[coef]
        for k in ("estimate", "se", "df", "p"):
            np.testing.assert_allclose(tab.loc[g, k], ct[k], rtol=RTOL, err_msg=f"{g} {k}")
        np.testing.assert_allclose(res.loglik[g], m.loglik, rtol=1e-9, err_msg=g)
        np.testing.assert_allclose(res.sigma[g], m.sigma, rtol=RTOL, err_msg=g)
        assert res.nobs[g] == m.nobs
        assert res.is_singular[g] == m.is_singular, g
        assert res.converged[g], g
        if kr:
            ck = m.coef_table(ddf="kenward-roger").loc[coef]
            for k in ("se", "df", "p"):
                np.testing.assert_allclose(tab_kr.loc[g, k], ck[k], rtol=RTOL, err_msg=f"{g} KR {k}")


@pytest.mark.parametrize("rhs", ["~ condition + (1 | donor)", "~ condition + (1 + condition | donor)"])
def test_each_response_equals_single_fit(rhs):
    obs, Y = _sim(24)
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    assert list(res.coef_table("condition").index) == list(Y.columns)
    _check_against_single(res, rhs, obs, Y, Y.columns, kr=True)
    # no response sat in a saddle (a template diagonal on exactly 0 with its gradient 0)
    # or a flat valley until the iteration cap: the whole chunk waits for it
    assert res.iterations.max() < 40, res.iterations.max()
    # the full single-model object for one response
    one = res["gene3"]
    np.testing.assert_allclose(one.fixef.to_numpy(), res.fixef.loc["gene3"].to_numpy(), rtol=RTOL)
    # variance components agree with the single fit's VarCorr
    vc = res.varcorr()
    vc3 = vc[vc.response == "gene3"].reset_index(drop=True)
    np.testing.assert_allclose(vc3["sdcor"].to_numpy(), one.varcorr["sdcor"].to_numpy(), rtol=1e-5, atol=1e-8)


def test_two_grouping_factors():
    """Crossed factors (donor × plate; the later term's block is dense in the blocked
    Cholesky and Kenward-Roger's Λ is not block diagonal), with a missing-value response."""
    rhs = "~ condition + (1 | donor) + (1 | plate)"
    obs, Y = _sim(8, seed=11)
    rng = np.random.default_rng(5)
    obs = obs.assign(plate=[f"P{i % 5}" for i in range(len(obs))])
    plate = obs.plate.str[1:].astype(int).to_numpy()
    Y = Y + rng.choice([0.0, 0.7], size=Y.shape[1]) * rng.normal(size=(5, Y.shape[1]))[plate]
    Y.iloc[rng.choice(len(Y), 20, replace=False), 5] = np.nan
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    _check_against_single(res, rhs, obs, Y, Y.columns, kr=True)


def test_missing_values_use_per_response_masks():
    """NaN in a response = that response fitted on its observed rows (lme4's na.omit),
    with the same compiled program; patterns: random cells, 40 % missing, a whole
    donor, a whole donor × condition cell; complete responses in the same call."""
    rhs = "~ condition + (1 + condition | donor)"
    obs, Y = _sim(10, seed=3)
    rng = np.random.default_rng(1)
    Y.iloc[rng.choice(len(Y), 5, replace=False), 1] = np.nan
    Y.iloc[rng.random(len(Y)) < 0.4, 2] = np.nan
    Y.loc[obs.donor == "D2", "gene3"] = np.nan
    Y.loc[(obs.donor == "D5") & (obs.condition == "trt"), "gene4"] = np.nan
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    assert res.errors.isna().all()
    assert res.nobs["gene0"] == len(obs) and res.nobs["gene2"] < 0.7 * len(obs)
    _check_against_single(res, rhs, obs, Y, Y.columns, kr=True)


def test_bad_responses_get_errors_not_lost_results():
    rhs = "~ condition + (1 | donor)"
    obs, Y = _sim(8, seed=4)
    Y.iloc[3, 1] = np.inf                                     # not a missing value: an error
    Y.loc[obs.condition == "trt", "gene2"] = np.nan          # no trt left: X rank deficient
    Y.loc[obs.donor != "D1", "gene3"] = np.nan               # one donor left
    Y.iloc[5:, 4] = np.nan                                   # 5 observations, 1 donor
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    assert "infinite" in res.errors["gene1"]
    assert "linearly dependent" in res.errors["gene2"]
    assert "observed level" in res.errors["gene3"]
    assert res.errors["gene4"] is not None
    tab = res.coef_table("condition")
    bad = ["gene1", "gene2", "gene3", "gene4"]
    assert tab.loc[bad, "estimate"].isna().all() and not tab.loc[bad, "converged"].any()
    _check_against_single(res, rhs, obs, Y, ["gene0", "gene5", "gene6", "gene7"])
    # BH over the responses that have a p-value
    p = tab["p"].dropna()
    order = np.argsort(p.to_numpy())
    ranked = p.to_numpy()[order] * len(p) / np.arange(1, len(p) + 1)
    expect = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1)
    np.testing.assert_allclose(tab["p_adj"].dropna().to_numpy()[order], expect, rtol=1e-12)
    with pytest.raises(lmmjax.DataError, match="rows but data has"):
        lmmjax.lmer_batch(rhs, obs.iloc[:-1], Y, progress=False)
    with pytest.raises(lmmjax.DataError, match="unique"):
        lmmjax.lmer_batch(rhs, obs, Y.to_numpy(), names=["a"] * Y.shape[1], progress=False)


def test_chunks_sparse_and_anndata_agree():
    rhs = "~ condition + (1 | donor)"
    obs, Y = _sim(30, seed=5)
    counts = np.random.default_rng(2).poisson(0.7, size=Y.shape).astype(float)  # many zeros
    ref = lmmjax.lmer_batch(rhs, obs, counts, progress=False).coef_table("condition")
    cols = ["estimate", "se", "df", "p"]
    chunked = lmmjax.lmer_batch(rhs, obs, counts, chunk_size=7, progress=False).coef_table("condition")
    np.testing.assert_allclose(chunked[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-9)
    spm = sp.csr_matrix(counts)
    sparse = lmmjax.lmer_batch(rhs, obs, spm, max_memory=2e5, progress=False).coef_table("condition")
    np.testing.assert_allclose(sparse[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-9)
    anndata = pytest.importorskip("anndata")
    ad = anndata.AnnData(X=spm, obs=obs.set_axis(obs.index.astype(str)),
                         var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    ad.layers["counts"] = spm
    res = lmmjax.lmer_batch(rhs, ad, layer="counts", progress=False)
    tab = res.coef_table("condition")
    assert list(tab.index) == list(ad.var_names)
    np.testing.assert_allclose(tab[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-9)
    res.to_anndata(ad, "condition")
    np.testing.assert_allclose(ad.varm["lmmjax"]["p"].to_numpy(), ref["p"].to_numpy(), rtol=1e-9)
    assert ad.uns["lmmjax"]["formula"] == rhs


def test_multi_df_anova_and_contrasts():
    """Per-response F tests of a 3-level term equal each single model's anova."""
    obs, Y = _sim(6, seed=6)
    obs = obs.assign(dose=np.tile(["lo", "mid", "hi"], len(obs) // 3))
    Y = Y + (obs.dose == "hi").to_numpy()[:, None] * 0.3
    rhs = "~ condition + dose + (1 | donor)"
    res = lmmjax.lmer_batch(rhs, obs, Y, progress=False)
    for ddf in ("satterthwaite", "kenward-roger"):
        tab = res.anova("dose", ddf=ddf)
        full = res.anova(ddf=ddf)
        for g in Y.columns:
            a = _single(rhs, obs, Y[g]).anova(ddf=ddf).loc["dose"]
            for k in ("F", "num_df", "den_df", "p"):
                np.testing.assert_allclose(tab.loc[g, k], a[k], rtol=RTOL, err_msg=f"{g} {ddf} {k}")
                np.testing.assert_allclose(full.loc[("dose", g), k], a[k], rtol=RTOL)
    c = res.test({"dosemid": 1, "doselo": -1})
    m0 = _single(rhs, obs, Y["gene0"]).test({"dosemid": 1, "doselo": -1})
    np.testing.assert_allclose(c.loc["gene0", ["F", "den_df", "p"]].to_numpy(float),
                               m0[["F", "den_df", "p"]].to_numpy(float), rtol=RTOL)
    with pytest.raises(ValueError, match="res.anova"):
        res.coef_table("dose")


def test_dask_cluster():
    distributed = pytest.importorskip("dask.distributed")
    rhs = "~ condition + (1 | donor)"
    obs, Y = _sim(20, seed=7)
    ref = lmmjax.lmer_batch(rhs, obs, Y, progress=False).coef_table("condition")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = lmmjax.lmer_batch(rhs, obs, Y, chunk_size=10, client=client, progress=False)
    cols = ["estimate", "se", "df", "p"]
    np.testing.assert_allclose(res.coef_table("condition")[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-9)


def test_two_devices_in_a_fresh_process():
    """Chunks are spread over every local device (two CPU devices here); same numbers."""
    code = textwrap.dedent("""
        import jax, numpy as np, sys
        sys.path.insert(0, %r)
        from test_batch import _sim
        import lmmjax
        assert len(jax.local_devices()) == 2
        obs, Y = _sim(16, seed=8)
        a = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, chunk_size=4, progress=False)
        b = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, devices=jax.local_devices()[0], progress=False)
        cols = ["estimate", "se", "df", "p"]
        np.testing.assert_allclose(a.coef_table("condition")[cols].to_numpy(),
                                   b.coef_table("condition")[cols].to_numpy(), rtol=1e-9)
        print("ok")
    """) % os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_float32_data_pass():
    """dtype="float32": the n × G cross-products in single precision, the fits in float64 —
    every response converges and the table moves by round-off only (estimates within 1e-4
    SE, p within 1e-3 relative) on responses with a mean far from 0."""
    obs, Y = _sim(60, seed=3)
    Y = Y + 50.0
    r64 = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, progress=False)
    r32 = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, progress=False, dtype="float32")
    assert r32.converged.all() and r32.data_dtype == "float32"
    t64, t32 = r64.coef_table("conditiontrt"), r32.coef_table("conditiontrt")
    assert np.max(np.abs(t32["estimate"] - t64["estimate"]) / t64["se"]) < 1e-4
    np.testing.assert_allclose(t32["p"], t64["p"], rtol=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, progress=False, dtype="float16")


# ---------------------------------------------------------------- resumable runs
_KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, pandas as pd
    import lmmjax, lmmjax.checkpoint as C
    obs = pd.read_pickle(sys.argv[2]); Y = np.load(sys.argv[3])
    saved = [0]
    orig = C.Checkpoint.save
    def save(self, i, out):
        orig(self, i, out)
        saved[0] += 1
        if saved[0] == 2:
            os._exit(17)          # killed: no cleanup, no exception handling
    C.Checkpoint.save = save
    lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, chunk_size=7, progress=False,
                      checkpoint_dir=sys.argv[1])
""")


def _result_bytes(res):
    tab = res.coef_table("conditiontrt")
    return [res.fixef.to_numpy().tobytes(), res.theta.to_numpy().tobytes(), res.loglik.to_numpy().tobytes(),
            res.sigma.to_numpy().tobytes(), tab[["estimate", "se", "df", "t", "p"]].to_numpy().tobytes(),
            res.vcov.tobytes(), list(res.errors), list(res.status)]


def test_checkpoint_resume_after_kill_is_byte_identical(tmp_path, monkeypatch):
    """A run killed after two of four chunks, resumed with the same folder, loads those two,
    fits only the rest, and gives byte-identical results to an uninterrupted run."""
    obs, Y = _sim(26, seed=5)
    Y = Y.to_numpy()
    Y[:5, 3] = np.nan                       # one response with its own missing values
    Y[:, 11] = 0.0                          # one that cannot be fitted
    obs.to_pickle(tmp_path / "obs.pkl")
    np.save(tmp_path / "Y.npy", Y)
    ck = tmp_path / "ck"
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(ck), str(tmp_path / "obs.pkl"), str(tmp_path / "Y.npy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert sorted(p.name for p in ck.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not list(ck.glob(".*tmp"))

    from lmmjax import batch as B

    calls = []
    orig = B._fit_chunk_arrays
    monkeypatch.setattr(B, "_fit_chunk_arrays", lambda *a, **k: calls.append(1) or orig(*a, **k))
    resumed = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, chunk_size=7, progress=False, checkpoint_dir=ck)
    n_chunks = len(resumed._chunks)
    assert len(calls) == n_chunks - 2
    monkeypatch.setattr(B, "_fit_chunk_arrays", orig)
    whole = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, chunk_size=7, progress=False)
    assert _result_bytes(resumed) == _result_bytes(whole)
    # a completed folder: everything loads
    again = lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, chunk_size=7, progress=False, checkpoint_dir=ck)
    assert _result_bytes(again) == _result_bytes(whole)


def test_checkpoint_refuses_other_inputs(tmp_path):
    obs, Y = _sim(6, seed=6)
    ck = tmp_path / "ck"
    lmmjax.lmer_batch("~ condition + (1 | donor)", obs, Y, progress=False, checkpoint_dir=ck)
    Y2 = Y.copy()
    Y2.iloc[0, 0] += 1e-9
    for kw in [dict(responses=Y2), dict(responses=Y, reml=False), dict(responses=Y, chunk_size=2)]:
        with pytest.raises(lmmjax.DataError, match="different inputs"):
            lmmjax.lmer_batch("~ condition + (1 | donor)", obs, progress=False, checkpoint_dir=ck, **kw)
    with pytest.raises(lmmjax.DataError, match="different inputs"):
        lmmjax.lmer_batch("~ condition + (1 | donor)", obs.assign(condition=obs.condition[::-1].to_numpy()), Y,
                          progress=False, checkpoint_dir=ck)
