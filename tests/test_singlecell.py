"""Single-cell helpers: ``lmmjax.pseudobulk`` (sums exact against pandas) and
``lmmjax.LmerDE`` (pertpy's differential-expression interface over ``lmer_batch``: its
tables equal ``coef_table``/``estimate_table`` with pertpy's column names)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import lmmjax
from lmmjax import DataError

ad = pytest.importorskip("anndata")


def _adata(n=360, G=25, seed=0):
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, 9, n)
    obs = pd.DataFrame(dict(donor=pd.Categorical([f"d{d}" for d in donor]),
                            condition=pd.Categorical(np.array(["ctrl", "stimA", "stimB"])[donor % 3]),
                            batch=pd.Categorical(np.where(donor < 5, "b1", "b2")), x=rng.normal(size=n)),
                       index=[f"c{i}" for i in range(n)])
    Y = 2 + rng.normal(size=(n, G)) + rng.normal(size=(9, G))[donor] + 0.8 * (donor % 3 == 1)[:, None] * (np.arange(G) < 5)
    counts = rng.poisson(3.0, size=(n, G)).astype(float)
    var = pd.DataFrame(dict(keep=np.arange(G) % 4 != 0), index=[f"g{j}" for j in range(G)])
    return ad.AnnData(X=Y, obs=obs, var=var, layers={"counts": counts, "w": rng.uniform(0.5, 2.0, size=(n, G))})


PERTPY_COLS = ["variable", "p_value", "t_value", "sd", "log_fc", "adj_p_value", "contrast"]


@pytest.mark.parametrize("ddf", ["satterthwaite", "kenward-roger"])
def test_lmerde_equals_coef_table(ddf):
    a = _adata()
    de = lmmjax.LmerDE(a, "~ condition + x + (1 | donor)", ddf=ddf)
    de.fit()
    res = de.test_contrasts(de.contrast("condition", "ctrl", "stimA"))
    assert set(PERTPY_COLS + ["se", "df", "converged", "singular"]) <= set(res.columns)
    assert res["p_value"].is_monotonic_increasing          # sorted like pertpy's tables
    ref = lmmjax.lmer_batch("~ condition + x + (1 | donor)", a, progress=False).coef_table("conditionstimA", ddf=ddf)
    got = res.set_index("variable").loc[ref.index]
    for mine, theirs in (("log_fc", "estimate"), ("sd", "se"), ("df", "df"), ("t_value", "t"), ("p_value", "p"),
                         ("adj_p_value", "p_adj")):
        np.testing.assert_allclose(got[mine].to_numpy(), ref[theirs].to_numpy(), rtol=1e-10)
    # a difference of two non-reference levels: the estimate of β_B − β_A, its own df
    both = de.test_contrasts({"B-A": de.contrast("condition", "stimA", "stimB"),
                              "x": de.cond(x=1.0) - de.cond(x=0.0)})
    ba = both[both.contrast == "B-A"].set_index("variable").loc[ref.index]
    fx = de.result.fixef
    np.testing.assert_allclose(ba["log_fc"], fx["conditionstimB"] - fx["conditionstimA"], rtol=1e-10)
    xs = both[both.contrast == "x"].set_index("variable").loc[ref.index]
    np.testing.assert_allclose(xs["p_value"], de.result.coef_table("x", ddf=ddf)["p"], rtol=1e-10)


def test_lmerde_cond_layer_mask_weights():
    a = _adata()
    de = lmmjax.LmerDE(a, "condition + (1 | donor)", layer="counts", mask="keep", weights="w")
    assert de.cond(condition="stimB").to_dict() == {"(Intercept)": 1.0, "conditionstimA": 0.0, "conditionstimB": 1.0}
    with pytest.raises(ValueError, match="not a level"):
        de.cond(condition="nope")
    de.fit()
    res = de.test_contrasts(de.contrast("condition", "ctrl", "stimB"))
    assert len(res) == int(a.var["keep"].sum())
    sub = a[:, a.var["keep"].to_numpy()]
    ref = lmmjax.lmer_batch("~ condition + (1 | donor)", sub, layer="counts", weights=sub.layers["w"],
                            progress=False).coef_table("conditionstimB")
    np.testing.assert_allclose(res.set_index("variable").loc[ref.index, "p_value"], ref["p"], rtol=1e-10)


def test_compare_groups():
    a = _adata()
    res = lmmjax.LmerDE.compare_groups(a, "condition", "ctrl", ["stimA", "stimB"], paired_by="donor")
    assert sorted(res.contrast.unique()) == ["stimA", "stimB"]
    de = lmmjax.LmerDE(a, "~ condition + (1 | donor)")
    de.fit()
    ref = de.result.coef_table("conditionstimA")
    np.testing.assert_allclose(res[res.contrast == "stimA"].set_index("variable").loc[ref.index, "p_value"],
                               ref["p"], rtol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "sparse", "frame"])
def test_pseudobulk_sums_exact(kind):
    a = _adata()
    counts = a.layers["counts"]
    if kind == "sparse":
        a.layers["counts"] = sp.csr_matrix(counts)
    if kind == "frame":
        pobs, vals = lmmjax.pseudobulk(a.obs, ["donor", "condition"], responses=pd.DataFrame(counts, columns=a.var_names))
        vals = vals.to_numpy()
    else:
        pb = lmmjax.pseudobulk(a, ["donor", "condition"], layer="counts")
        pobs, vals = pb.obs, pb.X
        assert list(pb.var_names) == list(a.var_names)
    ref = pd.DataFrame(counts).groupby([a.obs["donor"].to_numpy(), a.obs["condition"].to_numpy()]).sum()
    ref = ref.loc[list(zip(pobs["donor"].astype(str), pobs["condition"].astype(str)))]
    np.testing.assert_array_equal(vals, ref.to_numpy())          # exact
    assert pobs["n_cells"].sum() == a.n_obs
    assert "batch" in pobs.columns and "x" not in pobs.columns    # constant within groups kept, per-cell dropped


def test_pseudobulk_mean_and_errors():
    a = _adata()
    pb = lmmjax.pseudobulk(a, "donor", func="mean")
    first = a.obs["donor"].to_numpy() == pb.obs["donor"].iloc[0]
    np.testing.assert_allclose(pb.X[0], a.X[first].mean(axis=0), rtol=1e-13)
    with pytest.raises(DataError, match="not in obs"):
        lmmjax.pseudobulk(a, "nope")


def test_lmerde_is_a_pertpy_method():
    """With pertpy installed LmerDE subclasses pertpy's LinearModelBase, so pertpy's helpers
    (e.g. its volcano plot) take it and its tables."""
    pytest.importorskip("pertpy")
    from pertpy.tools._differential_gene_expression._base import LinearModelBase

    assert issubclass(lmmjax.LmerDE, LinearModelBase)
    a = _adata()
    de = lmmjax.LmerDE(a, "~ condition + (1 | donor)")
    de.fit()
    res = de.test_contrasts(de.contrast("condition", "ctrl", "stimA"))
    import matplotlib

    matplotlib.use("Agg")
    de.plot_volcano(res, log2fc_thresh=0.1)
