"""Shared helpers: load R reference cases (tests/fixtures/*/cases) and their data."""
from __future__ import annotations

import json
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# no persistent compilation cache in tests: jaxlib 0.10.2's executable (de)serialization
# segfaulted twice in ~900 cached compilations of the suite (a write of the sparse solve,
# a read of the sparse Newton program), and a test run must be deterministic.  Set before
# any test imports lmmjax; notebook kernels inherit it.
os.environ.setdefault("LMMJAX_COMPILATION_CACHE", "0")

FIXTURES = Path(__file__).parent / "fixtures"
CASE_DIRS = [FIXTURES / "reference", FIXTURES / "extra"]


def all_cases(engine_prefix: str = "lme4") -> list[Path]:
    out = []
    for d in CASE_DIRS:
        for f in sorted((d / "cases").glob("*.json")):
            c = json.loads(f.read_text())
            if str(c.get("engine", "")).startswith(engine_prefix) and "formula" in c:
                out.append(f)
    return out


@lru_cache(maxsize=None)
def load_case(path: str) -> dict:
    return json.loads(Path(path).read_text())


def case_data(path: Path, case: dict) -> pd.DataFrame:
    df = pd.read_csv(path.parent.parent / "data" / case["dataset"])
    for col, levels in (case.get("factor_levels") or {}).items():
        df[col] = pd.Categorical(df[col].astype(str), categories=levels)
    return df


def python_formula(r_formula: str) -> str:
    """R spelling -> Python spelling: ``x^2`` -> ``x**2``, ``log(`` -> ``np.log(``."""
    f = r_formula.replace("^", "**")
    return re.sub(r"(?<![\w.])(log|exp|sqrt)\(", r"np.\1(", f)


def norm_name(name: str) -> str:
    """Compare coefficient names across R and Python spellings."""
    return name.replace(" ", "").replace("**", "^").replace("np.", "")


@lru_cache(maxsize=None)
def fitted_case(path: str, at_r_theta: bool = False):
    """(case, data, model): fitted by lmmjax, or evaluated at R's θ."""
    import lmmjax

    case = load_case(path)
    df = case_data(Path(path), case)
    theta = case["theta"] if at_r_theta else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmmjax.SingularFitWarning)
        m = lmmjax.lmer(python_formula(case["formula"]), df, reml=case["REML"], theta=theta)
    return case, df, m


LME4_CASES = all_cases("lme4")
TIGHT = FIXTURES / "tight" / "cases"


def r_optima(case: dict) -> list[dict]:
    """R's answers to compare an optimum with: the tightly converged refit
    (tests/fixtures/tight) always, and R's default fit when it converged, i.e. its θ
    is within 1e-5 relative of the tight refit's.  (The criterion is flat at the
    optimum, so θ — which drives df and p — is the stricter test: Penicillin's default
    fit is 2.6e-11 off in criterion but 3e-5 in θ, which moves a p of 3.6e-7 by 1.2e-3.)"""
    tight = load_case(str(TIGHT / f"{case['case']}.json"))
    a, b = np.asarray(case["theta"], float), np.asarray(tight["theta"], float)
    out = [tight]
    if np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)), initial=0.0) <= 1e-5:
        out.append(case)
    return out


@pytest.fixture(params=LME4_CASES, ids=lambda p: p.stem)
def lme4_case(request):
    """lmmjax's own fit of an lme4 case."""
    return fitted_case(str(request.param))


@pytest.fixture(params=LME4_CASES, ids=lambda p: p.stem)
def lme4_case_at_r_theta(request):
    """The lme4 case evaluated at R's θ: isolates everything downstream of the optimizer."""
    return fitted_case(str(request.param), at_r_theta=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test module's compiled programs afterwards.  XLA-CPU maps ~10–100 memory
    regions per executable; a worker running half the suite passed the kernel's
    vm.max_map_count (65,530) and segfaulted inside a compilation.  Measured: the maps of
    one process reach 18,500 after three modules and fall to ~1,300 when JAX's caches are
    cleared (jax.clear_caches + gc), which a later module pays for with a recompile."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
