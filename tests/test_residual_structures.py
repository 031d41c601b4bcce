"""Residual covariance structures against nlme (gls / lme with correlation= and weights=):
the shared cases in tests/fixtures/reference and those made by
tests/r/make_structure_cases.R in tests/fixtures/structures.

Tolerances (the issue's): logLik 1e-4 absolute; fixed effects 1e-3 SE; SEs 1e-3
relative; correlation and variance-function parameters 1e-3 absolute (natural scale);
sigma and random-effect variances 1e-3 relative.
"""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax import cov

FIX = Path(__file__).parent / "fixtures"
CASES = [p for d in ("reference", "structures") for p in sorted((FIX / d / "cases").glob("*.json"))
         if json.loads(p.read_text())["engine"].startswith("nlme")]


def _structure(model: dict):
    parts = []
    c = model.get("correlation")
    if c:
        form = re.search(r"form\s*=\s*~\s*([\w.]+)\s*\|\s*(\w+)", c)
        t, g = form.group(1), form.group(2)
        t = None if t == "1" else t
        if c.startswith("corCompSymm"):
            parts.append(cov.CompoundSymmetry(group=g))
        elif c.startswith("corSymm"):
            parts.append(cov.Unstructured(group=g, time=t))
        elif c.startswith("corAR1"):
            parts.append(cov.AR1(group=g, time=t))
        elif c.startswith("corCAR1"):
            parts.append(cov.CAR1(time=t, group=g))
        elif c.startswith("corExp"):
            parts.append(cov.Exponential(group=g, time=t, nugget="nugget = TRUE" in c))
        else:
            return None
    w = model.get("weights")
    if w:
        if w.startswith("varIdent"):
            parts.append(cov.VarIdent(by=re.search(r"\|\s*(\w+)", w).group(1)))
        elif w.startswith("varPower"):
            parts.append(cov.VarPower(covariate=re.search(r"~\s*(\w+)", w).group(1)))
        else:
            return None
    return parts


def _data(path: Path, case: dict) -> pd.DataFrame:
    df = pd.read_csv(path.parent.parent / "data" / case["dataset"]) if not case.get("dataset_path") else \
        pd.read_csv(Path(__file__).parent.parent / case["dataset_path"])
    for col, levels in (case.get("factor_levels") or {}).items():
        if col in df.columns and isinstance(levels, list):
            df[col] = pd.Categorical(df[col].astype(str), categories=levels)
    return df


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_matches_nlme(path):
    case = json.loads(path.read_text())
    model = case["model"]
    parts = _structure(model)
    if parts is None:
        pytest.fail(f"structure not mapped to lmmjax.cov: {model}")
    df = _data(path, case)
    fixed = model["fixed"].replace("factor(", "C(").replace("sin(2 * pi *", "np.sin(2 * np.pi *") \
        .replace("cos(2 * pi *", "np.cos(2 * np.pi *")
    reml = case["REML"]
    if model.get("random"):
        g = re.search(r"\|\s*(\w+)", model["random"]).group(1)
        m = lmmjax.lmer(f"{fixed} + (1 | {g})", df, reml=reml, residual=parts)
    else:
        m = lmmjax.gls(fixed, df, reml=reml, residual=parts)
    assert abs(m.loglik - case["logLik"]) < 1e-4
    fx = case["fixed"]
    se_ref = np.asarray(fx.get("se_gls_at_ml", fx["se"]), float)
    est = m.fixef.to_numpy()
    np.testing.assert_array_less(np.abs(est - np.asarray(fx["estimate"])), 1e-3 * se_ref)
    np.testing.assert_allclose(np.sqrt(np.diag(m.vcov.to_numpy())), se_ref, rtol=1e-3)
    np.testing.assert_allclose(m.sigma, case["sigma"], rtol=1e-3)
    ref_par = []
    for key in ("corStruct", "varStruct"):
        if case.get(key):
            ref_par += list(case[key]["values"])
    np.testing.assert_allclose(m.residual_params.to_numpy(), ref_par, atol=1e-3)
    re_cov = case.get("random_effects_cov") or next(iter((case.get("random_effects") or {}).values()), None)
    if re_cov:
        v = np.asarray(re_cov.get("values", re_cov.get("cov")), float)
        np.testing.assert_allclose(m.covariance_matrices()[0].to_numpy(), v, rtol=1e-3)
    # Satterthwaite df exist for every structure (autodiff); residual df = n − p like gls
    ct = m.coef_table()
    assert np.all(np.isfinite(ct["df"])) and np.all(ct["df"] > 0)
    assert np.all(m.coef_table(ddf="residual")["df"] == m.nobs - len(est))


def _orthodont():
    df = pd.read_csv(FIX / "reference" / "data" / "Orthodont.csv")
    df["Sex"] = pd.Categorical(df["Sex"], categories=["Male", "Female"])
    return df


def test_kenward_roger_linear_case_equals_lmer():
    """With no residual parameters V is linear in φ = (σ²_b, σ²): the per-group KR of the
    residual-structure engine equals lmer's pbkrtest-validated KR (1e-8 relative)."""
    df = _orthodont()
    a = lmmjax.lmer("distance ~ age * Sex + (1 | Subject)", df).coef_table("kenward-roger")
    b = lmmjax.lmer("distance ~ age * Sex + (1 | Subject)", df,
                    residual=cov.ResidualStructure()).coef_table("kenward-roger")
    for col in ("se", "df", "p"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-8)


def _longsim():
    df = pd.read_csv(FIX / "structures" / "data" / "longsim.csv")
    df["trt"] = pd.Categorical(df["trt"], categories=["ctl", "trt"])
    return df


@pytest.mark.parametrize("formula,residual,data", [
    ("distance ~ age * Sex", [cov.AR1(group="Subject")], _orthodont),
    ("distance ~ age * Sex", [cov.CompoundSymmetry(group="Subject"), cov.VarIdent(by="Sex")], _orthodont),
    ("y ~ trt * time + (1 | subject)", [cov.AR1(group="subject", time="visit")], _longsim),
], ids=["gls_ar1", "gls_cs_varident", "lme_ar1"])
def test_kenward_roger_nonlinear_matches_dense(formula, residual, data):
    """KR with the second-derivative terms (V nonlinear in ρ, variance ratios) from per-group
    sums equals the n × n formulas (tests/kr_dense.py) to 1e-9; the R terms matter."""
    import jax
    import jax.numpy as jnp
    from kr_dense import dense_kr

    from lmmjax._compute import precision
    from lmmjax.gls import _kr_varcov

    m = lmmjax.lmer(formula, data(), residual=residual) if "|" in formula else \
        lmmjax.gls(formula, data(), residual=residual)
    Phi, PhiA, W, _ = m._kenward_roger()
    mask = np.asarray(m._data["mask"])
    with precision("float64"):
        phi = jnp.asarray(m.kr_parameters())
        X = jnp.asarray(np.asarray(m._data["XY"])[mask][:, : m.design.p])

        def V_of(ph):
            Vg = _kr_varcov(ph, m._data, m._spec)
            return jax.scipy.linalg.block_diag(*[Vg[g][np.ix_(mask[g], mask[g])] for g in range(mask.shape[0])])

        PhiA_d, W_d, PhiA_no_R = dense_kr(V_of, phi, X)
    np.testing.assert_allclose(W, W_d, rtol=1e-9, atol=1e-12 * np.abs(W_d).max())
    np.testing.assert_allclose(PhiA, PhiA_d, rtol=1e-9)
    assert np.max(np.abs(PhiA_no_R - PhiA) / np.abs(PhiA)) > 1e-6
    tab = m.coef_table("kenward-roger")
    assert np.all(tab["se"].to_numpy() >= np.sqrt(np.diag(Phi)) * (1 - 1e-12)) and np.all(tab["df"] > 0)


def test_refit_reuses_compiled_programs_and_padding_is_valid():
    """A second fit of the same design compiles nothing (the static spec hashes by value),
    and padded rows of groups with missing visits feed valid values to variance functions
    (VarPower at a negative power once gave NaN gradients: 0**δ on padding)."""
    import jax

    from lmmjax._compute import precision
    from lmmjax.gls import _value_and_grad

    df = _longsim()
    df["w"] = 1.0 + df["x"].abs()
    res = [cov.AR1(group="subject", time="visit"), cov.VarPower(covariate="w")]
    m1 = lmmjax.gls("y ~ trt * time", df, residual=res)
    size = _value_and_grad._cache_size()
    m2 = lmmjax.gls("y ~ trt * time", df, residual=res)
    assert _value_and_grad._cache_size() == size
    assert m2.loglik == m1.loglik
    with precision("float64"):
        psi = np.asarray(m1.psi, float).copy()
        psi[-1] = -0.5
        (v, _), g = _value_and_grad(jax.device_put(psi), m1._data, m1._spec, True)
        assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
