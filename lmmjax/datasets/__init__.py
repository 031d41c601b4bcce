"""Small classic data sets from R's lme4 and nlme, for demos and tests.

Each loader returns a pandas DataFrame whose factor columns are pandas
Categoricals with R's level order (so treatment contrasts and the order of
random effects match lme4).  Sources: lme4 (sleepstudy, Dyestuff, Dyestuff2,
Penicillin, Pastes, InstEval) and nlme (Orthodont, Ovary), as exported by
``tests/fixtures/reference/make_reference.R`` (InstEval by ``write.csv(lme4::InstEval)``, gzipped).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import pandas as pd

__all__ = ["load", "names", "sleepstudy", "dyestuff", "dyestuff2", "penicillin", "pastes",
           "orthodont", "ovary", "insteval"]

_FILES = {
    "sleepstudy": "sleepstudy", "dyestuff": "Dyestuff", "dyestuff2": "Dyestuff2",
    "penicillin": "Penicillin", "pastes": "Pastes", "orthodont": "Orthodont", "ovary": "Ovary",
    "insteval": "InstEval",
}


@lru_cache(maxsize=1)
def _levels() -> dict:
    return json.loads(resources.files(__name__).joinpath("data/factor_levels.json").read_text())


def names() -> list[str]:
    return sorted(_FILES)


def load(name: str) -> pd.DataFrame:
    """Load a bundled data set by name (case-insensitive), e.g. ``load("sleepstudy")``."""
    key = name.lower()
    if key not in _FILES:
        raise KeyError(f"unknown data set {name!r}; available: {names()}")
    stem = _FILES[key]
    base = resources.files(__name__).joinpath("data")
    if base.joinpath(f"{stem}.csv.gz").is_file():
        with base.joinpath(f"{stem}.csv.gz").open("rb") as fh:
            df = pd.read_csv(fh, compression="gzip")
    else:
        with base.joinpath(f"{stem}.csv").open() as fh:
            df = pd.read_csv(fh)
    for col, levs in _levels().get(stem, {}).items():
        df[col] = pd.Categorical(df[col].astype(str), categories=levs)
    df._lmmjax_name = stem  # shown as "Data:" in summaries
    return df


def sleepstudy() -> pd.DataFrame:
    """Reaction times (ms) of 18 subjects over 10 days of sleep deprivation (lme4)."""
    return load("sleepstudy")


def dyestuff() -> pd.DataFrame:
    """Yield of dyestuff from 6 batches, 5 preparations each (lme4)."""
    return load("dyestuff")


def dyestuff2() -> pd.DataFrame:
    """Simulated Dyestuff-like data whose batch variance estimate is 0 (lme4)."""
    return load("dyestuff2")


def penicillin() -> pd.DataFrame:
    """Penicillin assay: 24 plates crossed with 6 samples (lme4)."""
    return load("penicillin")


def pastes() -> pd.DataFrame:
    """Paste strength: casks nested in batches (lme4)."""
    return load("pastes")


def orthodont() -> pd.DataFrame:
    """Orthodontic distance growth of 27 children at ages 8–14 (nlme)."""
    return load("orthodont")


def ovary() -> pd.DataFrame:
    """Ovarian follicles of 11 mares over time (nlme)."""
    return load("ovary")


def insteval() -> pd.DataFrame:
    """University lecture evaluations (lme4's InstEval): 73,421 ratings ``y`` (1–5) of
    1,128 lecturers ``d`` by 2,972 students ``s``, in 14 departments ``dept``; ``service``
    (lecture outside the lecturer's department), ``studage``, ``lectage``.  The classic
    big crossed design: ``y ~ service + (1 | s) + (1 | d) + (1 | dept)``."""
    return load("insteval")
