"""The command line (lmmjax/cli.py): ``lmmjax fit`` and ``lmmjax batch``.

Success paths are checked against the same models fitted in Python (the CLI is a thin
layer: equal to 1e-12 relative) and against R (the R reference fixtures the library
tests use — tests/fixtures/tight for sleepstudy, tests/fixtures/batch for lmer per gene;
tolerances as in test_lme4_reference / test_batch_reference: criterion 1e-9, SE and
θ 1e-6, Satterthwaite df 1e-6 and p 1e-5 relative).  Bad inputs must give one line
``lmmjax: error: ...`` on stderr, exit status 2 and no traceback.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

import lmmjax
from lmmjax.cli import main

FIX = Path(__file__).parent / "fixtures"
SLEEP = FIX / "reference" / "data" / "sleepstudy.csv"
SLEEP_R = json.loads((FIX / "tight" / "cases" / "sleepstudy_slope_reml.json").read_text())
FORMULA = "Reaction ~ Days + (Days | Subject)"
BATCH = FIX / "batch"
RHS = "~ condition + (1 | donor)"
EXACT = 1e-12          # CLI vs the same fit in Python


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_input_error(rc, err):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmmjax: error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def sleep_fit():
    return lmmjax.lmer(FORMULA, pd.read_csv(SLEEP))


# ---------------------------------------------------------------- lmmjax fit
def test_fit_json_matches_python_and_R(tmp_path, capsys, sleep_fit):
    out = tmp_path / "fit.json"
    rc, text, err = run_cli(capsys, "fit", SLEEP, FORMULA, "--json", out)
    assert rc == 0, err
    assert "REML criterion at convergence: 1743.6" in text and "Satterthwaite" in text
    j = json.loads(out.read_text())
    m = sleep_fit
    assert (j["formula"], j["reml"], j["ddf"], j["nobs"], j["ngroups"]) == (FORMULA, True, "satterthwaite", 180,
                                                                            {"Subject": 18})
    assert j["converged"] is True and j["singular"] is False
    np.testing.assert_allclose([j["criterion"], j["logLik"], j["AIC"], j["BIC"]],
                               [m.reml_criterion, m.loglik, m.aic, m.bic], rtol=EXACT)
    fixed = pd.DataFrame(j["fixed"]).set_index("term")
    ct = m.coef_table()
    assert list(fixed.index) == list(ct.index)
    for col in ("estimate", "se", "df", "t", "p"):
        np.testing.assert_allclose(fixed[col], ct[col], rtol=EXACT, err_msg=col)
    np.testing.assert_allclose(j["theta"], m.theta, rtol=EXACT)
    assert j["theta_names"] == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    vc = pd.DataFrame(j["varcorr"])
    np.testing.assert_allclose(vc["vcov"], m.varcorr["vcov"], rtol=EXACT)
    assert vc["term2"].isna().tolist() == m.varcorr["term2"].isna().tolist()
    # against lme4 + lmerTest (tight optimum)
    r = SLEEP_R
    np.testing.assert_allclose(j["criterion"], r["REMLcrit"], rtol=1e-9)
    np.testing.assert_allclose([j["logLik"], j["AIC"], j["BIC"]], [r["logLik"], r["AIC"], r["BIC"]], rtol=1e-9)
    rs = r["fixed"]["satterthwaite"]
    np.testing.assert_allclose(fixed["estimate"], rs["estimate"], rtol=1e-9)
    np.testing.assert_allclose(fixed["se"], rs["se"], rtol=1e-6)
    np.testing.assert_allclose(fixed["df"], rs["df"], rtol=1e-6)
    np.testing.assert_allclose(fixed["t"], rs["t"], rtol=1e-6)
    # p of Days (3e-6) to 1e-5; the intercept's p (1e-17, t = 36.8) moves by log(t)·Δdf
    # relative, so the 1e-6 agreement of df leaves it 6e-5: its t and df are checked above
    np.testing.assert_allclose(fixed.loc["Days", "p"], rs["p"][1], rtol=1e-5)
    np.testing.assert_allclose(j["theta"], r["theta"], rtol=1e-6)
    np.testing.assert_allclose(vc["sdcor"], [v["sdcor"] for v in r["varcorr"]], rtol=1e-6)


def test_fit_formula_first_kenward_roger_anova(tmp_path, capsys):
    out = tmp_path / "kr.json"
    rc, text, err = run_cli(capsys, "fit", FORMULA, SLEEP, "--ddf", "KR", "--anova", "--json", out)
    assert rc == 0, err
    assert "Kenward-Roger" in text and "Type III Analysis of Variance Table (kenward-roger df)" in text
    j = json.loads(out.read_text())
    assert j["ddf"] == "kenward-roger"
    fixed = pd.DataFrame(j["fixed"]).set_index("term")
    rk = SLEEP_R["fixed"]["kenward_roger"]
    np.testing.assert_allclose(fixed["se"], rk["se"], rtol=1e-6)
    np.testing.assert_allclose(fixed["df"], rk["df"], rtol=1e-6)
    np.testing.assert_allclose(fixed["p"], rk["p"], rtol=1e-5)
    (a,) = j["anova"]
    ra = SLEEP_R["anova_type3"]["kenward_roger"][0]
    assert a["term"] == "Days" == ra["term"] and a["num_df"] == 1
    np.testing.assert_allclose([a["F"], a["den_df"], a["SumSq"]], [ra["F"], ra["DenDF"], ra["SumSq"]], rtol=1e-6)


def test_fit_tsv_parquet_ml_weights_and_no_ddf(tmp_path, capsys):
    df = pd.read_csv(SLEEP)
    df["w"] = 1.0 + (df.index % 3) / 2.0
    tsv, pq = tmp_path / "s.tsv", tmp_path / "s.parquet"
    df.to_csv(tsv, sep="\t", index=False)
    df.to_parquet(pq, index=False)
    res = {}
    for path in (tsv, pq):
        out = tmp_path / f"{path.suffix[1:]}.json"
        rc, text, err = run_cli(capsys, "fit", path, FORMULA, "--ml", "--weights", "w", "--ddf", "residual",
                                "--json", out)
        assert rc == 0, err
        assert "maximum likelihood" in text
        res[path.suffix] = json.loads(out.read_text())
    m = lmmjax.lmer(FORMULA, df, reml=False, weights="w")
    ct = m.coef_table("residual")
    for j in res.values():
        assert j["reml"] is False and j["weights"] == "w" and j["criterion_kind"] == "deviance"
        np.testing.assert_allclose(j["criterion"], m.deviance, rtol=EXACT)
        fixed = pd.DataFrame(j["fixed"]).set_index("term")
        np.testing.assert_allclose(fixed[["estimate", "se", "df", "p"]], ct[["estimate", "se", "df", "p"]], rtol=EXACT)
    # lme4's table without p-values: df and p are null in the JSON
    out = tmp_path / "none.json"
    rc, text, err = run_cli(capsys, "fit", SLEEP, FORMULA, "--ddf", "none", "--json", out)
    assert rc == 0, err and "Pr(>|t|)" not in text
    fixed = json.loads(out.read_text())["fixed"]
    assert all(f["df"] is None and f["p"] is None and f["t"] > 6 for f in fixed)


def test_installed_entry_point(tmp_path):
    """The console script end to end, in a fresh process: exit status 2 and one line for a
    missing file (a successful fit in a fresh process compiles for ~10 s CPU; the success
    paths of the same ``main`` are the tests above)."""
    exe = shutil.which("lmmjax")
    cmd = [exe] if exe else [sys.executable, "-m", "lmmjax.cli"]
    env = {**os.environ, "LMMJAX_COMPILATION_CACHE": "0"}
    p = subprocess.run(cmd + ["fit", "Yield ~ 1 + (1 | Batch)", str(tmp_path / "nope.csv"), "--json",
                              str(tmp_path / "d.json")], capture_output=True, text=True, env=env, timeout=300)
    assert_input_error(p.returncode, p.stderr)
    assert "no such file" in p.stderr and p.stdout == "" and not (tmp_path / "d.json").exists()


# ---------------------------------------------------------------- lmmjax batch
@pytest.fixture(scope="module")
def batch_ref():
    obs = pd.read_csv(BATCH / "obs.csv")
    Y = pd.read_csv(BATCH / "Y.csv")
    res = lmmjax.lmer_batch(RHS, obs, Y.set_index("cell"), progress=False)
    return obs, Y, res.coef_table("conditiontrt"), json.loads((BATCH / "reference.json").read_text())


def _check_batch(tab: pd.DataFrame, py: pd.DataFrame, rtol=EXACT):
    assert list(tab.columns[:9]) == ["response", "coef", "estimate", "se", "df", "t", "p", "p_adj", "status"]
    assert (tab["coef"] == "conditiontrt").all() and list(tab["response"]) == list(py.index)
    for col in ("estimate", "se", "df", "t", "p", "p_adj"):
        np.testing.assert_allclose(tab[col], py[col], rtol=rtol, err_msg=col)
    np.testing.assert_allclose(tab["p_adj"], false_discovery_control(tab["p"]), rtol=1e-12)
    assert ((tab["status"] == "singular") == py["singular"].to_numpy()).all()


def test_batch_csv_in_parquet_and_csv_out(tmp_path, capsys, batch_ref):
    obs, Y, py, ref = batch_ref
    out_pq, out_csv = tmp_path / "res.parquet", tmp_path / "res.csv"
    rc, text, err = run_cli(capsys, "batch", BATCH / "obs.csv", BATCH / "Y.csv", RHS, "--index", "cell",
                            "--out", out_pq)
    assert rc == 0, err
    assert "lmer_batch" in err                           # the tqdm bar, on stderr
    tab = pd.read_parquet(out_pq)
    _check_batch(tab, py)
    n_sig = int((py["p_adj"] < 0.05).sum())
    assert f"conditiontrt: {n_sig}" in text and "fitted: 60" in text and "failed: 0" in text
    # formula first, row-order matching (Y's cell column equals obs's: give Y without it), CSV out
    Y.drop(columns="cell").to_csv(tmp_path / "Y.csv", index=False)
    rc, text, err = run_cli(capsys, "batch", RHS, BATCH / "obs.csv", tmp_path / "Y.csv", "--out", out_csv,
                            "--no-progress", "--coef", "conditiontrt")
    assert rc == 0, err
    assert err == ""
    _check_batch(pd.read_csv(out_csv), py)
    # against lme4 + lmerTest per gene (test_batch_reference's tolerances, intercept model)
    genes = ref["models"]["intercept"]["genes"]
    t = tab.set_index("response")
    for g, r in genes.items():
        rs = r["satterthwaite"]["conditiontrt"]
        assert abs(t.loc[g, "estimate"] - rs["estimate"]) <= 1e-6 * rs["se"], g
        np.testing.assert_allclose(t.loc[g, ["se", "df"]].to_numpy(float), [rs["se"], rs["df"]], rtol=1e-6, err_msg=g)
        np.testing.assert_allclose(t.loc[g, "p"], rs["p"], rtol=1e-5, err_msg=g)


def test_batch_h5ad_and_responses_by_row(tmp_path, capsys, batch_ref):
    anndata = pytest.importorskip("anndata")
    obs, Y, py, _ = batch_ref
    ad = anndata.AnnData(X=Y.drop(columns="cell").to_numpy(), obs=obs.set_index("cell"),
                         var=pd.DataFrame(index=Y.columns[1:]))
    ad.write_h5ad(tmp_path / "d.h5ad")
    rc, text, err = run_cli(capsys, "batch", tmp_path / "d.h5ad", RHS, "--out", tmp_path / "a.csv", "--no-progress")
    assert rc == 0, err
    # the same numbers up to the order of arithmetic (an AnnData's row-major X is summed in another
    # order than the DataFrame's columns; the finite-difference Satterthwaite df show it at 1e-9)
    _check_batch(pd.read_csv(tmp_path / "a.csv"), py, rtol=1e-8)
    # responses × samples, matched by sample id to OBS rows in another order
    shuffled = obs.sample(frac=1.0, random_state=1)
    shuffled.to_csv(tmp_path / "obs_shuffled.csv", index=False)
    Y.set_index("cell").T.rename_axis("gene").to_csv(tmp_path / "Yt.csv")
    rc, text, err = run_cli(capsys, "batch", tmp_path / "obs_shuffled.csv", tmp_path / "Yt.csv", RHS, "--index",
                            "cell", "--responses-by-row", "--out", tmp_path / "b.parquet", "--no-progress")
    assert rc == 0, err
    _check_batch(pd.read_parquet(tmp_path / "b.parquet"), py, rtol=1e-7)   # sums in another row order
    # OBS file + .h5ad responses, matched to obs_names
    rc, text, err = run_cli(capsys, "batch", tmp_path / "obs_shuffled.csv", tmp_path / "d.h5ad", RHS, "--index",
                            "cell", "--out", tmp_path / "c.csv", "--no-progress")
    assert rc == 0, err
    _check_batch(pd.read_csv(tmp_path / "c.csv"), py, rtol=1e-7)


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    pd.read_csv(BATCH / "Y.csv").iloc[:300].to_csv(d / "Y_short.csv", index=False)
    pd.read_csv(BATCH / "Y.csv").drop(columns="cell").iloc[:300].to_csv(d / "Y_short_nocell.csv", index=False)
    (d / "broken.csv").write_text('a,b\n1,"2\n')
    (d / "data.xlsx").write_text("x")
    return d


BAD = {
    "missing file": (["fit", "nope.csv", FORMULA], "no such file"),
    "unknown column": (["fit", SLEEP, "Reaction ~ Dayz + (1 | Subject)"], "'Dayz'"),
    "unknown grouping column": (["fit", SLEEP, "Reaction ~ Days + (1 | Subj)"], "'Subj'"),
    "bad formula": (["fit", SLEEP, "Reaction ~ Days + 1 | Subject)"], "unbalanced parentheses"),
    "no formula": (["fit", SLEEP, SLEEP], "formula"),
    "unknown weights": (["fit", SLEEP, FORMULA, "--weights", "w"], "'w'"),
    "bad ddf": (["fit", SLEEP, FORMULA, "--ddf", "bogus"], "ddf"),
    "kenward-roger with ML": (["fit", SLEEP, FORMULA, "--ddf", "kenward_roger", "--ml"], "drop --ml"),
    "json folder": (["fit", SLEEP, FORMULA, "--json", "{bad}/no/such/x.json"], "does not exist"),
    "unreadable csv": (["fit", "{bad}/broken.csv", FORMULA], "cannot read"),
    "unknown format": (["fit", "{bad}/data.xlsx", FORMULA], "extension"),
    "row mismatch": (["batch", BATCH / "obs.csv", "{bad}/Y_short_nocell.csv", RHS, "--out", "{bad}/r.csv"],
                     "300 samples but OBS has 365"),
    "ids missing": (["batch", BATCH / "obs.csv", "{bad}/Y_short.csv", RHS, "--index", "cell", "--out", "{bad}/r.csv"],
                    "65 sample id(s)"),
    "text responses": (["batch", BATCH / "obs.csv", BATCH / "Y.csv", RHS, "--out", "{bad}/r.csv"], "--index"),
    "unknown index": (["batch", BATCH / "obs.csv", BATCH / "Y.csv", RHS, "--index", "id", "--out", "{bad}/r.csv"],
                      "'id'"),
    "batch response on left": (["batch", BATCH / "obs.csv", BATCH / "Y.csv", "y" + RHS, "--out", "{bad}/r.csv"],
                               "no response"),
    "batch unknown covariate": (["batch", BATCH / "obs.csv", BATCH / "Y.csv", "~ dose + (1 | donor)", "--index",
                                 "cell", "--out", "{bad}/r.csv", "--no-progress"], "'dose'"),
    "bad out": (["batch", BATCH / "obs.csv", BATCH / "Y.csv", RHS, "--out", "{bad}/r.xlsx"], ".parquet"),
    "usage": (["fit"], "required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, capsys, bad_files):
    argv, needle = BAD[case]
    argv = [str(a).replace("{bad}", str(bad_files)) for a in argv]
    with pytest.raises(SystemExit) if case == "usage" else _no_raise() as exit_:
        rc, out, err = run_cli(capsys, *argv)
    if case == "usage":
        rc, err = exit_.value.code, capsys.readouterr().err
    assert_input_error(rc, err)
    assert needle in err, err
    assert not (bad_files / "r.csv").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_debug_shows_the_exception_and_bugs_are_one_line(capsys, monkeypatch):
    with pytest.raises(lmmjax.DataError, match="Dayz"):
        main(["fit", str(SLEEP), "Reaction ~ Dayz + (1 | Subject)", "--debug"])

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(lmmjax, "lmer", broken)
    rc, out, err = run_cli(capsys, "fit", SLEEP, FORMULA)
    assert rc == 1 and err.strip().splitlines() == [
        "lmmjax: error: unexpected RuntimeError: boom (a bug in lmmjax? rerun with --debug for the traceback "
        "and report it)"]
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "fit", str(SLEEP), FORMULA])
