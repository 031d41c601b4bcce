r"""Estimated marginal means and their contrasts, as R's emmeans (Lenth 2016; Searle, Speed &
Milliken 1980) computes them for an ``lmer`` fit.

**Reference grid.**  Every variable of the fixed part: each factor at all its levels (as the fit
saw them), each numeric covariate at its mean over the rows used in the fit, unless ``at`` gives
other values.  Row g of the grid has the model-matrix row x_g (built by the fit's formula, like
``predict``), so its prediction is x_gᵀβ̂ (plus an ``offset()``, evaluated on the grid).

**EMMs.**  One per combination of the ``specs`` and ``by`` variables: the equally weighted mean
of the grid predictions over the other variables, i.e. the linear function l = mean_g x_g and
EMM = lᵀβ̂.  Var(lᵀβ̂) = lᵀVl with V = Var(β̂) (Kenward-Roger: the adjusted Φ_A, as emmeans
takes pbkrtest's ``vcovAdj``); df per row by Satterthwaite (lmerTest's ``calcSatterth``),
Kenward-Roger (pbkrtest's ``Lb_ddf``) or ∞ ("asymptotic").  Rows that are not estimable (a
rank-deficient fit whose dropped columns they need) are NaN, as emmeans' ``nonEst``.

**Contrasts** c (weights over the EMMs of one ``by`` group) are the linear functions cᵀL, with
their own SE and df by the same method.  Multiplicity adjustments follow emmeans:

* "tukey": p = P(Q_{k,ν} > √2|t|) (studentized range for k means), CI t-quantile
  q_{k,ν;level}/√2 — only for pairwise families; for other contrasts emmeans (and lmmjax)
  changes it to "sidak";
* "dunnettx": emmeans' approximation to Dunnett's test (Lenth): with m contrasts and
  w = (m − 1)/m, P(max|t| ≤ x) ≈ w·P(Q_{k*,ν} ≤ √2x) + (1 − w)·F_{1,ν}(x²)^m, k* = (1 + √(1 + 8m))/2;
  its quantile is found, as in emmeans, by Brent's root finder (Brent 1973) to tolerance 5e-4
  between the Tukey and Šidák quantiles;
* "sidak" 1 − (1 − p)^m; "bonferroni" min(1, mp); "holm", "hochberg", "BH"/"fdr", "BY" (R's
  ``p.adjust``); confidence intervals for the step-wise ones use Bonferroni, as emmeans does;
* a family of one contrast is not adjusted.

emmeans' defaults: pairwise → tukey, trt.vs.ctrl → dunnettx, eff → fdr, custom → none; for
"consec" emmeans uses "mvt" (a Monte-Carlo multivariate-t probability, Genz & Bretz), which
lmmjax does not compute: "consec" defaults to "sidak" here (pass ``adjust=`` explicitly).
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

from ._dist import t_ppf, t_sf
from .contrasts import _zapsmall
from .design import FORMULA_CONTEXT, DataError, _variables, offset_values
from .formula import InputError
from .inference import _satt_df_rows, kr_test, normalize_ddf, p_adjust, t_columns

__all__ = ["emmeans", "EMMeans", "EMMContrasts"]

_PARENS = re.compile(r"-|\+|/|\*")           # emmeans' ``parens`` option: labels wrapped in ( )
_P_ADJUST = {"holm", "hochberg", "BH", "BY", "fdr", "bonferroni", "none"}
_ADJUST = {"tukey", "sidak", "dunnettx"} | _P_ADJUST
_DEFAULT_ADJUST = {"pairwise": "tukey", "revpairwise": "tukey", "trt.vs.ctrl": "dunnettx", "eff": "fdr",
                   "consec": "sidak"}


# ------------------------------------------------------------ reference grid
def _label(v) -> str:
    """A level as R pastes it (numbers without a trailing .0)."""
    if isinstance(v, (bool, np.bool_)):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return f"{float(v):.15g}"
    return str(v)


def _is_number(v) -> bool:
    try:
        float(_label(v))
        return True
    except ValueError:
        return False


def _grid_variables(m) -> dict:
    """Variable → ("factor", levels) or ("covariate", mean), over the fixed part (and offsets)."""
    design = m.design
    frame = design.frame
    factors: dict = {}
    for key, (kind, state) in design.fixed_spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        names = _variables(key)
        if len(names) == 1:
            levels = state.get("categories")
            if levels is None:
                levels = state["contrasts"].levels
            factors.setdefault(next(iter(names)), list(levels))
    pf = design.formula
    used = set(_variables(pf.fixed)).union(*(_variables(f"I({o})") for o in pf.offset))
    out = {}
    for v in (c for c in frame.columns if c in used):
        if v in factors:
            out[v] = ("factor", factors[v])
        elif pd.api.types.is_bool_dtype(frame[v].dtype):          # a logical is a factor, as in R
            out[v] = ("factor", sorted(frame[v].unique().tolist()))
        elif pd.api.types.is_numeric_dtype(frame[v].dtype):
            out[v] = ("covariate", float(frame[v].to_numpy(float).mean()))
    return out


def _names(x, what: str, allowed: dict) -> list:
    if x is None:
        return []
    names = [x] if isinstance(x, str) else list(x)
    bad = [v for v in names if v not in allowed]
    if bad:
        raise InputError(f"{what} names {bad}, which are not variables of the fixed part; "
                         f"the reference grid has {list(allowed)}")
    return names


def _at_values(at, gvars: dict) -> dict:
    """Grid values per variable: factor levels (or the ``at`` subset), covariate mean or ``at``."""
    at = {} if at is None else dict(at)
    _names(list(at), "at", gvars)
    values = {}
    for v, (kind, val) in gvars.items():
        if v not in at:
            values[v] = list(val) if kind == "factor" else [val]
            continue
        given = at[v]
        given = [given] if np.ndim(given) == 0 else list(np.asarray(given, object).ravel())
        if not given:
            raise InputError(f"at[{v!r}] is empty; give one or more values")
        if kind == "factor":
            by_label = {_label(lv): lv for lv in val}
            bad = [g for g in given if _label(g) not in by_label]
            if bad:
                raise InputError(f"at[{v!r}] has value(s) {bad} that are not levels of {v!r}: "
                                 f"{[_label(lv) for lv in val]}")
            values[v] = list(dict.fromkeys(by_label[_label(g)] for g in given))
        else:
            try:
                values[v] = list(dict.fromkeys(float(g) for g in given))
            except (TypeError, ValueError):
                raise InputError(f"at[{v!r}] must be numbers (covariate {v!r} is numeric), got {given}") from None
    return values


def _frame_column(values: list, col: pd.Series):
    """Grid values with the dtype the fit's data had (Categoricals keep their categories)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return pd.Categorical(values, categories=col.cat.categories, ordered=col.cat.ordered)
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return np.asarray(values, float)
    return pd.Series(values, dtype=col.dtype).to_numpy()


def _product(values: dict, names: list) -> pd.DataFrame:
    """All combinations of ``values[names]``, the first name varying fastest (R's expand.grid)."""
    combos = list(itertools.product(*(values[v] for v in reversed(names))))
    return pd.DataFrame([c[::-1] for c in combos], columns=names) if names else pd.DataFrame(index=[0])


def _model_rows(m, grid: pd.DataFrame):
    """(X, offset) of the grid rows: the full (before rank checks) fixed-effects model matrix
    and the ``offset()`` terms (zeros without)."""
    frame = m.design.frame
    data = pd.DataFrame({v: _frame_column(list(grid[v]), frame[v]) for v in grid.columns})
    try:
        X = m.design.fixed_spec.get_model_matrix(data, na_action="ignore", context=FORMULA_CONTEXT)
    except Exception as exc:
        raise DataError(f"cannot build the fixed-effects matrix of the reference grid: {exc}") from None
    off = offset_values(m.design.formula.offset, data) if m.design.formula.offset else np.zeros(len(grid))
    return np.asarray(X, float), np.asarray(off, float)


def _estimable(m, Lfull: np.ndarray) -> np.ndarray:
    """Rows of ``Lfull`` (full model-matrix coordinates) that are estimable: orthogonal to the
    null space of the fit's full X (only a rank-deficient fit has one; emmeans' is.estble, 1e-8)."""
    if not m.design.dropped_columns:
        return np.ones(len(Lfull), bool)
    Xfull, _ = _model_rows(m, m.design.frame)
    _, s, Vt = np.linalg.svd(Xfull, full_matrices=True)
    rank = int((s > s[0] * max(Xfull.shape) * np.finfo(float).eps).sum())
    N = Vt[rank:].T
    scale = np.maximum(np.abs(Lfull).max(axis=1), 1e-300)
    return np.abs(Lfull @ N).max(axis=1, initial=0.0) <= 1e-8 * scale


# ------------------------------------------------------------ inference on linear functions
def _linear_inference(m, L: np.ndarray, ddf: str):
    """(estimate without offset, SE, df) of the rows of L."""
    beta = m.fixef.to_numpy()
    ok = np.all(np.isfinite(L), axis=1)
    Lz = np.where(ok[:, None], L, 0.0)
    df = np.full(len(L), np.nan)
    if ddf == "kenward-roger":
        Phi, V, W, Pk = m._kenward_roger()
        df[ok] = [kr_test(row, beta, Phi, V, W, Pk)["den_df"] for row in Lz[ok]]
    else:
        V = m.vcov.to_numpy()
        if ddf == "satterthwaite":
            C, J, A, _ = m._satterthwaite()
            df[ok] = _satt_df_rows(Lz[ok], C, J, A)
        else:
            df[ok] = np.inf if ddf == "asymptotic" else float(m.nobs - beta.size)
    est = np.where(ok, Lz @ beta, np.nan)
    se = np.where(ok, np.sqrt(np.maximum(np.einsum("ri,ij,rj->r", Lz, V, Lz), 0.0)), np.nan)
    return est, se, df


def emmeans(m, specs, by=None, at: dict | None = None, ddf: str = "satterthwaite",
            level: float = 0.95) -> "EMMeans":
    """Estimated marginal means of a fitted ``lmer`` model (R's ``emmeans(fit, specs, by, at)``).

    specs: a variable of the fixed part, or a list of them (their combinations); by: variable(s)
    whose levels split the means into groups (contrasts are taken within each group); at:
    {variable: value(s)} — covariates at these values instead of their mean, factors restricted
    to these levels; ddf: "satterthwaite" (default), "kenward-roger", "asymptotic" (or
    "residual"); level: confidence level.  Means are equally weighted over the grid variables
    not in ``specs``/``by`` (emmeans' default).
    """
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1, got {level!r}")
    try:
        ddf = normalize_ddf(ddf)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    gvars = _grid_variables(m)
    specs_l = _names(specs, "specs", gvars)
    if not specs_l:
        raise InputError("specs must name at least one variable of the fixed part, "
                         f"one of {list(gvars)}")
    by_l = _names(by, "by", gvars)
    both = [v for v in specs_l if v in by_l]
    if both or len(set(specs_l)) < len(specs_l) or len(set(by_l)) < len(by_l):
        raise InputError(f"specs {specs_l} and by {by_l} must name distinct variables")
    values = _at_values(at, gvars)
    ref = _product(values, list(gvars))
    Xref, off_ref = _model_rows(m, ref)
    target = specs_l + by_l
    cells = _product(values, target)
    # cell of every reference-grid row (first target variable fastest)
    code = np.zeros(len(ref), np.int64)
    stride = 1
    for v in target:
        pos = {_label(x): i for i, x in enumerate(values[v])}
        code += stride * ref[v].map(lambda x: pos[_label(x)]).to_numpy(np.int64)
        stride *= len(values[v])
    Wt = np.zeros((len(cells), len(ref)))
    Wt[code, np.arange(len(ref))] = 1.0
    Wt /= Wt.sum(axis=1, keepdims=True)
    averaged = [v for v in gvars if v not in target and len(values[v]) > 1]
    return EMMeans(m, cells, Wt @ Xref, Wt @ off_ref, specs_l, by_l, ddf, level, averaged)


def _fitted_coordinates(m, Lfull: np.ndarray) -> np.ndarray:
    """Linear functions in the full model-matrix columns → in the fitted coefficients
    (rows that are not estimable become NaN)."""
    L = Lfull[:, m.design.x_keep].copy()
    L[~_estimable(m, Lfull)] = np.nan
    return L


class EMMeans:
    """Estimated marginal means (what :func:`emmeans` returns).

    ``grid`` (the combinations of ``specs`` and ``by``), ``L`` (rows: the linear functions of β̂;
    NaN where not estimable), ``estimate``, ``se``, ``df``; ``table`` is emmeans' summary (emmean,
    SE, df, CI, t and p of EMM = 0); :meth:`contrast` and :meth:`pairs` compare the means within
    each ``by`` group.
    """

    def __init__(self, model, grid, Lfull, offset, specs, by, ddf, level, averaged=()):
        self.model, self.grid, self.offset = model, grid, offset
        self._Lfull = Lfull                       # in the full (before rank checks) model-matrix columns
        self.L = L = _fitted_coordinates(model, Lfull)
        self.specs, self.by, self.ddf, self.level, self.averaged = list(specs), list(by), ddf, level, list(averaged)
        est, self.se, self.df = _linear_inference(model, L, ddf)
        self.estimate = est + offset

    @property
    def table(self) -> pd.DataFrame:
        tab = self.grid.copy()
        tab["emmean"], tab["SE"], tab["df"] = self.estimate, self.se, self.df
        tc = t_columns(self.estimate, self.se, self.df, self.level)
        tab["lower"], tab["upper"], tab["t"], tab["p"] = tc["lower"], tc["upper"], tc["t"], tc["p"]
        return tab

    def _notes(self) -> list:
        notes = []
        if self.averaged:
            notes.append(f"Results are averaged over the levels of: {', '.join(self.averaged)}")
        notes.append(f"Degrees-of-freedom method: {self.ddf}")
        notes.append(f"Confidence level used: {self.level:g}")
        return notes

    def __repr__(self) -> str:
        cols = self.specs + self.by + ["emmean", "SE", "df", "lower", "upper"]
        return self.table[cols].to_string(index=False) + "\n\n" + "\n".join(self._notes())

    # ---------------------------------------------------------- contrasts
    def _groups(self, by: list) -> list:
        """Row positions of each ``by`` group, groups in order of first appearance."""
        if not by:
            return [np.arange(len(self.grid))]
        keys = [tuple(_label(x) for x in row) for row in self.grid[by].itertuples(index=False)]
        order = list(dict.fromkeys(keys))
        return [np.array([i for i, k in enumerate(keys) if k == g]) for g in order]

    def _level_labels(self, by: list):
        """Raw and emmeans-style (numeric variables prefixed by their name, labels with -+/*
        in parentheses) labels of the rows, over the variables not in ``by``."""
        rest = [v for v in self.grid.columns if v not in by]
        raw, enh = [], []
        numeric = {v: all(_is_number(x) for x in self.grid[v]) for v in rest}
        for _, row in self.grid.iterrows():
            raw.append(" ".join(_label(row[v]) for v in rest))
            lab = " ".join((v if numeric[v] else "") + _label(row[v]) for v in rest)
            enh.append(f"({lab})" if _PARENS.search(lab) else lab)
        return raw, enh

    def contrast(self, method="eff", adjust: str | None = None, by=..., ref=0, reverse: bool = False,
                 level: float | None = None) -> "EMMContrasts":
        """Contrasts of the EMMs within each ``by`` group (R's ``contrast(emm, method, adjust)``).

        method: "pairwise" (i − j, i < j), "revpairwise" (j − i), "trt.vs.ctrl" (each level −
        the ``ref`` level: a position from 0 or a level label; a list averages several),
        "eff" (each level − the mean of all), "consec" (each level − the previous), or a dict
        {name: weights over the EMMs of a group}.  adjust: "tukey", "dunnettx", "sidak",
        "bonferroni", "holm", "hochberg", "BH"/"fdr", "BY", "none" (default: emmeans' for the
        method, see the module docstring); by: defaults to the EMMs' ``by``."""
        by = self.by if by is ... else _names(by, "by", {v: 1 for v in self.grid.columns})
        level = self.level if level is None else level
        groups = self._groups(by)
        raw, enh = self._level_labels(by)
        k = len(groups[0])
        first = groups[0]
        labels = [enh[i] for i in first]
        coefs, names, pairs_family = _contrast_coefficients(method, labels, [raw[i] for i in first], ref, reverse)
        if adjust is None:
            adjust = _DEFAULT_ADJUST.get(method, "none") if isinstance(method, str) else "none"
        adjust = _check_adjust(adjust)
        rows, tab_by, cnames = [], [], []
        for g in groups:
            C = np.zeros((len(coefs), len(self.grid)))
            C[:, g] = coefs
            rows.append(C)
            tab_by.extend([self.grid.iloc[g[0]][by].tolist()] * len(coefs))
            cnames.extend(names)
        C = np.vstack(rows)
        return EMMContrasts(self, C, cnames, by, pd.DataFrame(tab_by, columns=by), adjust, level,
                            family_size=k, pairs_family=pairs_family, n_groups=len(groups))

    def pairs(self, adjust: str = "tukey", reverse: bool = False, by=..., level: float | None = None):
        """All pairwise differences within each ``by`` group (R's ``pairs(emm)``);
        ``reverse=True`` gives j − i (R's ``revpairwise``)."""
        return self.contrast("revpairwise" if reverse else "pairwise", adjust=adjust, by=by, level=level)


def _contrast_coefficients(method, labels, raw, ref, reverse):
    """(coefficients (contrasts × k), names, whether the family is pairwise) for one group."""
    k = len(labels)
    if isinstance(method, dict):
        names, coefs = [], []
        for name, w in method.items():
            w = np.asarray(w, float).ravel()
            if w.size != k:
                raise InputError(f"custom contrast {name!r} has {w.size} weights; each group has {k} means "
                                 f"({labels})")
            names.append(str(name))
            coefs.append(w)
        if not names:
            raise InputError("a custom contrast dict needs at least one {name: weights} entry")
        return np.array(coefs), names, False
    if not isinstance(method, str):
        raise InputError(f"method must be a name or a dict of custom contrasts, got {type(method).__name__}")
    eye = np.eye(k)
    if method in ("pairwise", "revpairwise"):
        if method == "pairwise":
            pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        else:
            pairs = [(j, i) for j in range(1, k) for i in range(j)]
        return (np.array([eye[a] - eye[b] for a, b in pairs]).reshape(-1, k),
                [f"{labels[a]} - {labels[b]}" for a, b in pairs], True)
    if method == "trt.vs.ctrl":
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        pos = []
        for r in refs:
            if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
                if not 0 <= r < k:
                    raise InputError(f"ref={r} is out of range: positions 0..{k - 1} of {labels}")
                pos.append(int(r))
            elif str(r) in raw or str(r) in labels:
                pos.append(raw.index(str(r)) if str(r) in raw else labels.index(str(r)))
            else:
                raise InputError(f"ref={r!r} is neither a position nor a level; levels are {raw}")
        cname = labels[pos[0]] if len(pos) == 1 else f"avg({','.join(labels[p] for p in pos)})"
        base = -eye[pos].mean(axis=0)
        out = [(eye[i] + base, f"{cname} - {labels[i]}" if reverse else f"{labels[i]} - {cname}")
               for i in range(k) if i not in pos]
        sign = -1.0 if reverse else 1.0
        return sign * np.array([c for c, _ in out]).reshape(-1, k), [n for _, n in out], False
    if method == "eff":
        return eye - 1.0 / k, [f"{lab} effect" for lab in labels], False
    if method == "consec":
        s = -1.0 if reverse else 1.0
        return (np.array([s * (eye[i + 1] - eye[i]) for i in range(k - 1)]).reshape(-1, k),
                [f"{labels[i]} - {labels[i + 1]}" if reverse else f"{labels[i + 1]} - {labels[i]}"
                 for i in range(k - 1)], False)
    raise InputError(f"unknown contrast method {method!r}; use 'pairwise', 'revpairwise', 'trt.vs.ctrl', "
                     "'eff', 'consec' or a dict {name: weights}")


def _check_adjust(adjust: str) -> str:
    a = str(adjust)
    for name in _ADJUST:
        if a.lower() == name.lower():
            return name
    extra = (" (emmeans' 'mvt' is a Monte-Carlo multivariate-t probability that lmmjax does not compute)"
             if a.lower() == "mvt" else "")
    raise InputError(f"adjust must be one of {sorted(_ADJUST, key=str.lower)}, got {adjust!r}{extra}")


def _ptukey_sf(q, k, df):
    from scipy.stats import studentized_range

    return studentized_range.sf(q, k, df)


_QTUKEY: dict = {}


def _df_key(df: float) -> float:
    """df to 10 significant digits: contrasts of a balanced design share their df up to
    rounding (1e-12), and a quantile moves by < 1e-12 relative when df moves by 1e-10, so
    one root serves them all."""
    return float(f"{float(df):.10g}")


def _qtukey(level: float, k: float, df: float) -> float:
    """Quantile of the studentized range for k means (a root of its cdf, bracketed by the
    pairwise t quantile below and the Bonferroni one over all k(k−1)/2 pairs above; cached:
    scipy's generic ``ppf`` is slow)."""
    if np.isnan(df):
        return np.nan
    df = _df_key(df)
    key = (level, k, df)
    if key not in _QTUKEY:
        from scipy.optimize import brentq
        from scipy.stats import studentized_range

        lo = math.sqrt(2) * float(t_ppf(0.5 + level / 2, df))
        hi = math.sqrt(2) * float(t_ppf(1 - (1 - level) / (k * (k - 1)), df)) * 1.01 + 1e-8
        f = lambda q: studentized_range.cdf(q, k, df) - level  # noqa: E731
        _QTUKEY[key] = lo if k <= 2 else brentq(f, lo * 0.999, hi, xtol=1e-12, rtol=1e-13)
    return _QTUKEY[key]


def _pdunnx(x, m: int, df):
    """emmeans' Dunnett approximation: P(max of m |t| ≤ x)."""
    from scipy.stats import studentized_range

    w = (m - 1) / m
    tukey = studentized_range.cdf(math.sqrt(2) * x, (1 + math.sqrt(1 + 8 * m)) / 2, df)
    sidak = (1.0 - 2.0 * t_sf(x, df)) ** m                    # F_{1,ν}(x²) = P(|t| ≤ x)
    return w * tukey + (1 - w) * sidak


def _brent_root(f, a: float, b: float, tol: float, maxiter: int = 1000) -> float:
    """Brent's (1973) zero finder (zeroin), as R's ``uniroot`` runs it: on [a, b] with
    f(a)f(b) < 0, stops when the bracket is below 2ε|b| + tol/2."""
    fa, fb = f(a), f(b)
    if fa == 0:
        return a
    if fb == 0:
        return b
    c, fc = a, fa
    eps = np.finfo(float).eps
    for _ in range(maxiter + 1):
        prev = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol_act = 2 * eps * abs(b) + tol / 2
        step = (c - b) / 2
        if abs(step) <= tol_act or fb == 0:
            return b
        if abs(prev) >= tol_act and abs(fa) > abs(fb):
            cb = c - b
            if a == c:                                        # secant
                t1 = fb / fa
                p, q = cb * t1, 1 - t1
            else:                                             # inverse quadratic interpolation
                q, t1, t2 = fa / fc, fb / fc, fb / fa
                p = t2 * (cb * q * (q - t1) - (b - a) * (t1 - 1))
                q = (q - 1) * (t1 - 1) * (t2 - 1)
            if p > 0:
                q = -q
            else:
                p = -p
            if p < 0.75 * cb * q - abs(tol_act * q) / 2 and p < abs(prev * q / 2):
                step = p / q
        if abs(step) < tol_act:
            step = tol_act if step > 0 else -tol_act
        a, fa = b, fb
        b += step
        fb = f(b)
        if (fb > 0 and fc > 0) or (fb < 0 and fc < 0):
            c, fc = a, fa
    return b


def _qdunnx(level: float, m: int, df: float) -> float:
    """Quantile of :func:`_pdunnx` the way emmeans finds it (root to 5e-4 between the Tukey
    and Šidák quantiles; the Tukey one when they are within 5e-4 or do not bracket it)."""
    if np.isnan(df):
        return np.nan
    df = _df_key(df)
    key = ("dunnettx", level, m, df)
    if key in _QTUKEY:
        return _QTUKEY[key]
    if m < 1.005:
        return float(t_ppf(0.5 + level / 2, df))
    xtuk = _qtukey(level, (1 + math.sqrt(1 + 8 * m)) / 2, df) / math.sqrt(2)
    xsid = float(t_ppf(0.5 + level ** (1 / m) / 2, df))
    if abs(xtuk - xsid) < 5e-4:
        return xtuk
    f = lambda x: _pdunnx(x, m, df) - level  # noqa: E731
    root = xtuk if not xtuk < xsid or f(xtuk) * f(xsid) > 0 else _brent_root(f, xtuk, xsid, 5e-4)
    _QTUKEY[key] = root
    return root


def _adjusted(t, df, adjust: str, n_contr: int, fam_size: int, level: float):
    """(adjusted two-sided p, CI critical value) for one family of contrasts."""
    p_raw = 2 * t_sf(np.abs(t), df)
    if n_contr == 1:
        adjust = "none"
    if adjust in _P_ADJUST:
        p = p_adjust(p_raw, adjust, n_contr)
    elif adjust == "sidak":
        p = 1 - (1 - p_raw) ** n_contr
    elif adjust == "tukey":
        dfz = np.asarray(df, float).copy()                    # emmeans passes zapsmall(df)
        ok = np.isfinite(dfz)
        dfz[ok] = _zapsmall(dfz[ok]) if ok.any() else dfz[ok]
        p = _ptukey_sf(math.sqrt(2) * np.abs(t), fam_size, dfz)
    else:
        p = np.array([1 - _pdunnx(abs(a), n_contr, d) for a, d in zip(t, df)])
    ci = {"none": "none", "sidak": "sidak", "tukey": "tukey", "dunnettx": "dunnettx"}.get(adjust, "bonferroni")
    if ci == "none":
        cv = t_ppf(0.5 + level / 2, df)
    elif ci == "sidak":
        cv = t_ppf(0.5 + level ** (1 / n_contr) / 2, df)
    elif ci == "bonferroni":
        cv = t_ppf(1 - (1 - level) / n_contr / 2, df)
    elif ci == "tukey":
        cv = np.array([_qtukey(level, fam_size, d) for d in df]) / math.sqrt(2)
    else:
        cv = np.array([_qdunnx(level, n_contr, d) for d in df])
    return p, np.asarray(cv, float), adjust, ci


class EMMContrasts:
    """Contrasts of EMMs (what :meth:`EMMeans.contrast` returns): ``coef`` (contrasts × EMMs),
    ``L`` (contrasts × coefficients), ``estimate``, ``se``, ``df``, and ``table`` with the
    contrast, ``by`` columns, estimate, SE, df, t, p (adjusted) and the (adjusted) CI."""

    def __init__(self, emm: EMMeans, C, names, by, by_values, adjust, level, family_size, pairs_family, n_groups):
        self.emm, self.coef, self.names, self.by, self.level = emm, C, list(names), list(by), level
        self.L = _fitted_coordinates(emm.model, C @ emm._Lfull)    # a contrast may be estimable
        est, self.se, self.df = _linear_inference(emm.model, self.L, emm.ddf)
        self.estimate = est + C @ emm.offset
        self.t = self.estimate / self.se
        if adjust == "tukey" and not pairs_family:
            adjust = "sidak"        # emmeans: tukey "only appropriate for one set of pairwise comparisons"
        n_contr = len(C) // n_groups
        self.p = np.empty(len(C))
        cv = np.empty(len(C))
        for g in range(n_groups):
            rows = slice(g * n_contr, (g + 1) * n_contr)
            self.p[rows], cv[rows], self.adjust, self.ci_adjust = _adjusted(
                self.t[rows], self.df[rows], adjust, n_contr, family_size, level)
        self.lower, self.upper = self.estimate - cv * self.se, self.estimate + cv * self.se
        self._by_values = by_values
        self._n_contr, self._family_size = n_contr, family_size

    @property
    def table(self) -> pd.DataFrame:
        tab = pd.DataFrame({"contrast": self.names})
        for v in self.by:
            tab[v] = self._by_values[v].to_numpy()
        for k, v in (("estimate", self.estimate), ("SE", self.se), ("df", self.df), ("t", self.t),
                     ("p", self.p), ("lower", self.lower), ("upper", self.upper)):
            tab[k] = v
        return tab

    def __repr__(self) -> str:
        notes = [n for n in self.emm._notes() if not n.startswith("Confidence")]
        notes.append(f"Confidence level used: {self.level:g}")
        if self.ci_adjust != "none":
            what = (f"for comparing a family of {self._family_size} estimates" if self.ci_adjust == "tukey"
                    else f"for {self._n_contr} estimates")
            notes.append(f"Conf-level adjustment: {self.ci_adjust} method {what}")
        if self.adjust != "none":
            what = (f"for comparing a family of {self._family_size} estimates" if self.adjust == "tukey"
                    else f"for {self._n_contr} tests")
            notes.append(f"P value adjustment: {self.adjust} method {what}")
        return self.table.to_string(index=False) + "\n\n" + "\n".join(notes)
