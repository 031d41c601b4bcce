"""Design matrices and sufficient statistics from a formula and a DataFrame.

* fixed effects: formulaic with treatment contrasts (first level = reference;
  a pandas Categorical keeps its category order), R-style column names;
  rank-deficient columns are dropped with a message, like lme4;
* random effects: one :class:`RandomBlock` per term, with the per-row level
  index and the ``n × q`` model matrix of the term's left-hand side; terms are
  ordered like lme4 (``rev(order(nlevels))`` when the counts are not already
  non-increasing);
* rows with a missing value in any variable the model uses are dropped
  (lme4's ``na.omit``).

:func:`design_stats` and :func:`response_stats` give the cross-products the
likelihood needs; the batch path calls :func:`response_stats` for many
responses at once.
"""
from __future__ import annotations

import dataclasses

import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import scipy.sparse as sp
from formulaic import Formula, model_matrix
from formulaic.transforms import C

from .covariance import make_structure
from .formula import InputError, ParsedFormula, RandomTerm, parse_formula
from .likelihood import Layout

__all__ = ["Design", "RandomBlock", "build_design", "design_stats", "response_stats", "level_index", "DataError",
           "offset_values", "check_response_varies"]


class DataError(InputError):
    """The data cannot be used with the formula (missing column, bad values, …)."""


#: R spellings formulaic does not know: ``factor(x)`` is formulaic's ``C(x)`` (columns
#: then get R's names, ``factor(visit)3``)
FORMULA_CONTEXT = {"factor": C}


def r_name(name: str) -> str:
    """formulaic column name -> R's: ``Intercept`` -> ``(Intercept)``,
    ``Sex[T.Female]`` -> ``SexFemale``, ``A[b]`` -> ``Ab``, ``I(x ** 2)`` -> ``I(x^2)``."""
    if name == "Intercept":
        return "(Intercept)"
    name = re.sub(r"\s*\*\*\s*", "^", name)      # I(x ** 2) -> I(x^2), as R deparses it
    return ":".join(re.sub(r"^(.*?)\[(?:T\.)?(.*)\]$", r"\1\2", part) for part in name.split(":"))


@dataclass
class RandomBlock:
    """One random-effects term bound to data."""

    term: RandomTerm
    levels: list            # level labels (strings), in order
    index: np.ndarray       # (n,) level index of every row
    Zq: np.ndarray          # (n, q) values of the term's model matrix
    colnames: list[str]     # R-style names of the q columns
    spec: object            # formulaic ModelSpec of the lhs (for predict)
    structure: object       # covariance structure
    level_codes: dict = field(default_factory=dict)  # per factor column: value -> code
    used_codes: np.ndarray = None  # combined code of each level (for mapping new data)
    # the sparse Z block (:func:`_term_Z`); not an init field, so dataclasses.replace
    # (new Zq) starts without it
    _Z: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def group(self) -> str:
        return self.term.group_name

    @property
    def q(self) -> int:
        return self.Zq.shape[1]

    @property
    def n_levels(self) -> int:
        return len(self.levels)


@dataclass
class Design:
    formula: ParsedFormula
    y: np.ndarray
    X: np.ndarray
    xnames: list[str]
    fixed_spec: object
    blocks: list[RandomBlock]
    rows: np.ndarray          # positions (0-based) of the used rows in the data
    n_data: int               # rows in the data as given
    dropped_columns: list[str]
    response_name: str
    x_keep: np.ndarray        # columns of the formulaic model matrix kept after rank checks
    frame: pd.DataFrame = None  # the used rows and columns of the data (for contrasts)
    offset: np.ndarray = None   # the sum of the formula's offset(...) terms (None: none);
    #                             y above is the working response, the response minus it
    weights: np.ndarray = None  # prior weights of the used rows (None: all 1): Var(εᵢ) = σ²/wᵢ

    def weighted(self) -> "Design":
        """The design the likelihood sees under prior weights: rows of X, Z and y scaled by
        √wᵢ (then Var(√wᵢ εᵢ) = σ², an unweighted model; lme4's weights).  Its criterion
        differs from the weighted model's by Σ log wᵢ (:attr:`log_weights`)."""
        if self.weights is None:
            return self
        r = np.sqrt(self.weights)
        blocks = [dataclasses.replace(b, Zq=b.Zq * r[:, None]) for b in self.blocks]
        return dataclasses.replace(self, X=self.X * r[:, None], y=self.y * r, blocks=blocks, weights=None)

    @property
    def log_weights(self) -> float:
        """Σ log wᵢ: −2 log-likelihood of the weighted model = that of :meth:`weighted` − Σ log wᵢ."""
        return 0.0 if self.weights is None else float(np.sum(np.log(self.weights)))

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def layout(self) -> Layout:
        return Layout(tuple(b.structure for b in self.blocks), tuple(b.n_levels for b in self.blocks))

    def Z(self) -> sp.csr_matrix:
        """Sparse ``n × q`` random-effects model matrix (level-major within each term)."""
        mats = [_term_Z(b) for b in self.blocks]
        return sp.hstack(mats, format="csr")


def _term_Z(b: RandomBlock) -> sp.csr_matrix:
    """The term's sparse n × ℓq block of Z (built once per block: a fit's statistics
    use it several times)."""
    if b._Z is None:
        n, q = b.Zq.shape
        rows = np.repeat(np.arange(n), q)
        cols = (b.index[:, None] * q + np.arange(q)[None, :]).ravel()
        b._Z = sp.csr_matrix((b.Zq.ravel(), (rows, cols)), shape=(n, b.n_levels * q))
    return b._Z


# ---------------------------------------------------------------- helpers
@lru_cache(maxsize=256)
def _variables_cached(expr: str) -> frozenset:
    return frozenset(Formula(expr).required_variables)


def _variables(expr: str) -> set[str]:
    # formulaic reads `a.b` as the attribute b of a: quoted names are taken out first
    quoted = re.findall(r"`([^`]+)`", expr)
    plain = re.sub(r"`[^`]+`", "_lmmjax_quoted_", expr)
    try:
        found = set(_variables_cached(plain)) - set(FORMULA_CONTEXT) - {"_lmmjax_quoted_"}
    except Exception as exc:
        raise DataError(f"cannot parse {expr!r}: {exc}") from None
    return found | set(quoted)


def _as_factor_in(expr: str, name: str) -> bool:
    """Whether ``name`` is wrapped in ``C(...)``/``factor(...)`` in ``expr`` (then a
    column of numbers stored as text is meant as a factor)."""
    q = re.escape(name)
    return re.search(rf"(?:\bC|\bfactor)\(\s*`?{q}`?\s*[,)]", expr) is not None


#: text columns of integer codes with at most this many distinct values are factors (as R
#: reads a character column, e.g. InstEval's service "0"/"1"); more, or any non-integer,
#: means numbers stored as text
TEXT_CODES_MAX = 20


def _check_predictor_columns(names, data: pd.DataFrame, exprs: str) -> None:
    """Column types that would silently become something else: dates (formulaic
    multiplies them), numbers stored as text or as Python objects (they would become a
    factor with one level per distinct value)."""
    for v in sorted(names):
        col = data[v]
        dt = col.dtype
        if pd.api.types.is_datetime64_any_dtype(dt) or pd.api.types.is_timedelta64_dtype(dt):
            raise DataError(
                f"column {v!r} holds dates/times ({dt}); a model needs numbers: convert it, e.g. "
                f"data[{v!r}] = (data[{v!r}] - data[{v!r}].min()).dt.days (days since the first), "
                f"or to a category with .astype('category')")
        if not (dt == object or pd.api.types.is_string_dtype(dt)) or isinstance(dt, pd.CategoricalDtype) \
                or _as_factor_in(exprs, v):
            continue
        vals = col.dropna()
        if not len(vals):
            continue
        try:                                           # labels ("early", "F"): a factor, as in R
            float(vals.iloc[0])
        except (TypeError, ValueError):
            continue
        is_str = vals.map(lambda x: isinstance(x, str))
        is_num = vals.map(lambda x: isinstance(x, (int, float, np.integer, np.floating))
                          and not isinstance(x, (bool, np.bool_)))
        nums = pd.to_numeric(vals, errors="coerce")
        if not nums.notna().all():
            continue                                   # labels: a factor, as in R
        if is_num.all():
            kind = "Python number objects"
        elif is_str.all() and ((nums != np.round(nums)).any() or nums.nunique() > TEXT_CODES_MAX):
            kind = "text"
        else:
            continue                                   # a few integer codes as text: a factor
        raise DataError(
            f"column {v!r} holds numbers stored as {kind} (dtype {dt}), which would be used as a factor with "
            f"{vals.nunique()} levels; convert it with data[{v!r}] = pd.to_numeric(data[{v!r}]) for a numeric "
            f"predictor, or data[{v!r}].astype('category') (or factor({v}) in the formula) for a factor")


def offset_values(exprs, data: pd.DataFrame) -> np.ndarray:
    """The sum of the formula's ``offset(expr)`` terms on ``data``: each ``expr`` is
    arithmetic on columns, as in R (``offset(2 * log(n))`` is 2·log n, not a formula)."""
    total = np.zeros(len(data))
    for o in exprs:
        if _NAME.match(o) and o in data.columns:
            v = np.asarray(data[o], dtype=float) if pd.api.types.is_numeric_dtype(data[o]) else None
        else:
            try:
                v = np.asarray(model_matrix(f"0 + I({o})", data, na_action="ignore", context=FORMULA_CONTEXT), float)
                v = v[:, 0] if v.shape[1] == 1 else None
            except Exception as exc:
                raise DataError(f"cannot evaluate offset({o}): {exc}") from None
        if v is None:
            raise DataError(f"offset({o}) must be numeric")
        if not np.all(np.isfinite(v)):
            i = int(np.flatnonzero(~np.isfinite(v))[0])
            raise DataError(f"offset({o}) is not finite in row {_label(data.index[i])!r}")
        total += v
    return total


def _constant_message(v) -> str:
    return (f"the response is constant (every observed value is {float(v):g}): there is no variation "
            "to fit; drop it (e.g. genes not expressed in any cell)")


def response_faults(X: np.ndarray, Yc: np.ndarray, Xy=None, yy=None) -> np.ndarray:
    """Responses that cannot be fitted though every value is usable: constant ones, and
    ones the fixed effects reproduce exactly (residual SD below 10⁴ round-offs of the
    response's SD: σ̂ would be 0 and the criterion −∞).  Columns may hold NaN (not
    observed); the exact-fit check uses complete columns only.  (c,) messages or None.

    ``Xy`` (c × p), ``yy`` (c,): the chunk's cross-products, when at hand, screen the
    exact-fit check: only columns whose least-squares residual yᵀy − Xyᵀ(XᵀX)⁻¹Xy is
    below 10⁻⁶ yᵀy (round-off in it is ~10⁻¹³ yᵀy, so no exact fit is missed) get the
    careful QR check — the batch data pass stays one product per response."""
    bad = np.full(Yc.shape[1], None, object)
    if Xy is not None and yy is not None:
        return _screened_faults(X, Yc, np.asarray(Xy, float), np.asarray(yy, float), bad)
    nan = np.isnan(Yc)
    has_nan = nan.any(axis=0)
    if has_nan.any():
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN columns
            lo, hi = np.nanmin(Yc, axis=0), np.nanmax(Yc, axis=0)
    else:
        lo, hi = Yc.min(axis=0, initial=np.inf), Yc.max(axis=0, initial=-np.inf)
    const = lo == hi
    for j in np.flatnonzero(const):
        bad[j] = _constant_message(lo[j])
    full = ~const & ~has_nan
    if full.any() and X.shape[1]:
        _exact_fits(X, Yc, full, bad)
    return bad


def _exact_fits(X, Yc, cols, bad) -> None:
    """Mark the columns ``cols`` (bool) of ``Yc`` that X reproduces exactly."""
    if cols.any():
        Yf = Yc[:, cols] if not cols.all() else Yc
        Q, _ = np.linalg.qr(X.astype(Yf.dtype))
        rss = np.sum((Yf - Q @ (Q.T @ Yf)) ** 2, axis=0)
        tss = np.sum((Yf - Yf.mean(axis=0)) ** 2, axis=0)
        eps = np.finfo(Yf.dtype).eps
        exact = rss <= (1e4 * eps) ** 2 * tss
        for j in np.flatnonzero(cols)[exact]:
            bad[j] = ("the fixed effects reproduce the response exactly (no residual variation): "
                      "σ̂ would be 0; check that the response is not a covariate")


def _screened_faults(X, Yc, Xy, yy, bad):
    """:func:`response_faults` for finite columns from their cross-products: the least-
    squares residual yᵀy − Xyᵀ(XᵀX)⁻¹Xy below 10⁻⁶ yᵀy (round-off in it is ~10⁻¹³ yᵀy, so
    nothing is missed) marks the candidates — a constant column is one of them whenever X
    has an intercept — and only those are checked exactly on the data."""
    with np.errstate(all="ignore"):
        rss0 = yy - np.einsum("cp,cp->c", Xy, np.linalg.solve(X.T @ X, Xy.T).T) if X.shape[1] else yy
    cand = ~(rss0 > 1e-6 * yy)
    if not np.any(np.all(X == 1.0, axis=0)):       # no intercept: constants are not candidates
        cand |= Yc.min(axis=0, initial=np.inf) == Yc.max(axis=0, initial=-np.inf)
    idx = np.flatnonzero(cand)
    if idx.size:
        sub = Yc[:, idx]
        lo, hi = sub.min(axis=0), sub.max(axis=0)
        const = lo == hi
        for j, v in zip(idx[const], lo[const]):
            bad[j] = _constant_message(v)
        rest = np.zeros(Yc.shape[1], bool)
        rest[idx[~const]] = True
        if X.shape[1]:
            _exact_fits(X, Yc, rest, bad)
    return bad


def check_response_varies(design: "Design") -> None:
    """A constant response, or one the fixed effects reproduce exactly, has no variance
    to split (σ̂ = 0, the criterion −∞; round-off would report a finite nonsense): say so."""
    y = design.y
    name = design.response_name or "the response"
    off = " after subtracting the offset" if design.offset is not None else ""
    if y.size and np.ptp(y) == 0:
        raise DataError(f"response {name!r} is constant ({_label(y[0])!r} in all {y.size} used rows{off}): "
                        "there is no variation for the model to explain")
    # (screened by the least-squares residual from Xᵀy and yᵀy: no QR of X on the fit's path)
    fault = response_faults(design.X, y[:, None], (design.X.T @ y)[None, :], np.array([y @ y]))[0]
    if fault is not None:
        raise DataError(f"response {name!r}{off}: {fault}")


def _label(x):
    """A row label as users write it (numpy scalars as plain Python values)."""
    return x.item() if isinstance(x, np.generic) else x


def _check_columns(names, data: pd.DataFrame, where: str):
    missing = [v for v in sorted(names) if v not in data.columns]
    if missing:
        raise DataError(
            f"{where} uses column(s) {missing} that are not in the data; "
            f"available columns: {list(data.columns)}"
        )


def _sorted_levels(col: pd.Series):
    """Level order for a grouping column: Categorical order, else sorted values."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.remove_unused_categories().cat.categories
        return list(cats)
    vals = pd.unique(col)
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _factor_codes(data: pd.DataFrame, factors: tuple[str, ...]):
    """Level labels and per-row codes of the interaction of ``factors``
    (first factor varies slowest, unused combinations dropped: R's ``factor(a:b)``)."""
    codes = np.zeros(len(data), dtype=np.int64)
    labels_per = []
    maps = {}
    for f in factors:
        col = data[f]
        levs = _sorted_levels(col)
        m = {v: i for i, v in enumerate(levs)}
        maps[f] = m
        c = col.map(m).to_numpy()
        codes = codes * len(levs) + c.astype(np.int64)
        labels_per.append([str(v) for v in levs])
    used, index = np.unique(codes, return_inverse=True)
    labels = []
    for code in used:
        parts = []
        for levs in reversed(labels_per):
            code, r = divmod(int(code), len(levs))
            parts.append(levs[r])
        labels.append(":".join(reversed(parts)))
    return labels, index.astype(np.int64), maps, used


def level_index(block: "RandomBlock", data: pd.DataFrame) -> np.ndarray:
    """Level index of every row of ``data`` for ``block``; -1 where the level
    (or a value of one of its factor columns) was not seen when fitting."""
    codes = np.zeros(len(data), dtype=np.int64)
    unseen = np.zeros(len(data), bool)
    for f in block.term.factors:
        m = block.level_codes[f]
        c = data[f].map(m)
        unseen |= c.isna().to_numpy()
        codes = codes * len(m) + c.fillna(0).to_numpy().astype(np.int64)
    pos = np.searchsorted(block.used_codes, codes)
    pos = np.clip(pos, 0, len(block.used_codes) - 1)
    found = (block.used_codes[pos] == codes) & ~unseen
    return np.where(found, pos, -1)


def _model_matrix(rhs: str, data: pd.DataFrame, where: str):
    try:
        mm = model_matrix(rhs, data, na_action="ignore", context=FORMULA_CONTEXT)
    except Exception as exc:
        raise DataError(f"cannot build the {where} model matrix from {rhs!r}: {exc}") from None
    return mm


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _simple_matrix(rhs: str, data: pd.DataFrame):
    """(matrix, R column names) for a right-hand side of numeric columns, ``1`` and
    ``0``/``-1`` joined by ``+`` — the common case (``Days``, ``0 + x``, ``1 + x + z``),
    built directly in the column order formulaic gives it; None for anything else (then
    formulaic builds it).  Saves formulaic's parse and materialization on every fit."""
    intercept, cols = True, []
    for tok in (t.strip() for t in rhs.split("+")):
        if tok == "1":
            continue
        if tok in ("0", "-1"):
            intercept = False
            continue
        if len(tok) > 2 and tok[0] == tok[-1] == "`":
            tok = tok[1:-1]
        elif not _NAME.match(tok):
            return None
        if tok not in data.columns or tok in cols:
            return None
        dt = data[tok].dtype
        if not (pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)) \
                or isinstance(dt, pd.CategoricalDtype):
            return None
        cols.append(tok)
    parts = ([np.ones(len(data))] if intercept else []) + [data[c].to_numpy(dtype=float) for c in cols]
    X = np.column_stack(parts) if parts else np.zeros((len(data), 0))
    return X, (["(Intercept)"] if intercept else []) + cols


class _LazySpec:
    """formulaic's ModelSpec of ``rhs`` on ``frame``, built on first use (predict,
    contrasts) when the fit built the matrix itself (:func:`_simple_matrix`)."""

    def __init__(self, rhs: str, frame: pd.DataFrame, where: str):
        self._rhs, self._frame, self._where, self._spec = rhs, frame, where, None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._spec is None:
            self._spec = _model_matrix(self._rhs, self._frame, self._where).model_spec
        return getattr(self._spec, name)


def _matrix(rhs: str, df: pd.DataFrame, where: str):
    """(float matrix, R column names, spec) of a right-hand side on the used rows."""
    simple = _simple_matrix(rhs, df)
    if simple is not None:
        X, names = simple
        if not np.all(np.isfinite(X)):
            r, c = np.argwhere(~np.isfinite(X))[0]
            raise DataError(f"{where} column {names[c]!r} has a non-finite value "
                            f"(row {_label(df.index[r])!r}); remove or impute it")
        return X, names, _LazySpec(rhs, df, where)
    mm = _model_matrix(rhs, df, where)
    return _as_float(mm, where, df.index), [r_name(c) for c in mm.columns], mm.model_spec


def _drop_rank_deficient(X: np.ndarray, names: list[str], tol: float = 1e-7):
    """Drop columns that are (numerically) linear combinations of *earlier* columns,
    keeping the first of any dependent set like R's ``qr`` (lme4's ``chkRank.drop.cols``):
    column j is kept iff ``|R_jj| > tol · ‖X_j‖`` in an unpivoted QR."""
    if X.shape[1] == 0:
        return X, names, [], np.arange(0)
    R = np.linalg.qr(X, mode="r")
    norms = np.linalg.norm(X, axis=0)
    keep = np.flatnonzero(np.abs(np.diag(R)) > tol * np.maximum(norms, np.finfo(float).tiny))
    dropped = [names[i] for i in range(len(names)) if i not in set(keep)]
    if dropped:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
            f"column{'s' if len(dropped) > 1 else ''} / coefficient{'s' if len(dropped) > 1 else ''}: {dropped}",
            stacklevel=3,
        )
    return X[:, keep], [names[i] for i in keep], dropped, keep


def _as_float(mm, where: str, data_index) -> np.ndarray:
    arr = np.asarray(mm, dtype=float)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(
            f"{where} column {list(mm.columns)[c]!r} has a non-finite value "
            f"(row {_label(data_index[r])!r}); remove or impute it"
        )
    return arr


# ---------------------------------------------------------------- main
def build_design(formula: str | ParsedFormula, data: pd.DataFrame, require_response: bool = True,
                 structures: dict | None = None, single_level_ok: tuple = (), weights=None) -> Design:
    """Bind a formula to data.  ``structures``: extra random-effect structure keywords
    (see :func:`lmmjax.covariance.make_structure`); ``single_level_ok``: grouping
    factors allowed one level (gls's placeholder term); ``weights``: prior weights, a
    column name or one value per data row (rows where it is missing are dropped, as R's
    model frame does)."""
    for k in structures or ():
        if not (isinstance(k, str) and k.isidentifier()):
            raise DataError(f"structure keywords must be names like 'ou', got {k!r}")
    pf = formula if isinstance(formula, ParsedFormula) else parse_formula(formula, tuple(structures or ()))
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if not pf.random:
        raise DataError(
            "the formula has no random-effects term like (1 | group); "
            "for a fixed-effects-only model use an ordinary least-squares routine"
        )
    n_data = len(data)
    # --- variables and missing values
    resp_vars = _variables(pf.response) if pf.response else set()
    if require_response and not pf.response:
        raise DataError("the formula has no response: write it as 'y ~ x + (1 | g)'")
    fixed_vars = _variables(pf.fixed)
    offset_vars = set().union(*(_variables(f"I({o})") for o in pf.offset))
    dup = sorted(set(data.columns[data.columns.duplicated()]))
    if dup:
        raise DataError(f"data has duplicate column names {dup}; rename them so each name is unique "
                        "(e.g. data.columns = [...] or data.loc[:, ~data.columns.duplicated()])")
    _check_columns(resp_vars, data, f"the response {pf.response!r}")
    _check_columns(fixed_vars, data, "the fixed-effects part")
    for o in pf.offset:
        _check_columns(_variables(f"I({o})"), data, f"offset({o})")
    rand_vars, lhs_vars = set(), set()
    for t in pf.random:
        lv = _variables(t.lhs)
        _check_columns(lv, data, f"random-effects term {t}")
        _check_columns(t.factors, data, f"the grouping factor of {t}")
        rand_vars |= lv | set(t.factors)
        lhs_vars |= lv
    _check_predictor_columns(fixed_vars | lhs_vars | offset_vars, data,
                             " ".join([pf.fixed, *pf.offset, *(t.lhs for t in pf.random)]))
    used = sorted(resp_vars | fixed_vars | rand_vars | offset_vars, key=list(data.columns).index)
    complete = data[used].notna().all(axis=1).to_numpy() if used else np.ones(n_data, bool)
    w_all = None if weights is None else _weight_values(weights, data)
    if w_all is not None:
        complete &= ~np.isnan(w_all)
    rows = np.flatnonzero(complete)
    if rows.size == 0:
        raise DataError(f"no complete rows: every row has a missing value in one of {used}")
    df = data.iloc[rows]
    # drop unused categories (R's drop.unused.levels)
    df = df.assign(**{
        c: df[c].cat.remove_unused_categories()
        for c in used if isinstance(df[c].dtype, pd.CategoricalDtype)
    })
    # --- response
    if pf.response:
        if pf.response in df.columns:
            ycol = df[pf.response]
            if not pd.api.types.is_numeric_dtype(ycol) or pd.api.types.is_bool_dtype(ycol):
                hint = ""
                if ycol.dtype == object and pd.to_numeric(ycol, errors="coerce").notna().all():
                    hint = f" (numbers stored as text: convert with data[{pf.response!r}] = pd.to_numeric(data[{pf.response!r}]))"
                raise DataError(
                    f"response column {pf.response!r} must be numeric, got dtype {ycol.dtype}{hint}"
                )
            y = ycol.to_numpy(dtype=float)
        else:
            ymm = _model_matrix(f"0 + {pf.response}", df, "response")
            if ymm.shape[1] != 1:
                raise DataError(f"response {pf.response!r} must be a single numeric column")
            y = np.asarray(ymm, dtype=float)[:, 0]
        if not np.all(np.isfinite(y)):
            i = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(f"response {pf.response!r} has a non-finite value in row {_label(df.index[i])!r}")
    else:
        y = np.zeros(len(df))
    # --- offsets (R's offset(): known parts of the linear predictor); y becomes y − offset
    offset = offset_values(pf.offset, df) if pf.offset else None
    if offset is not None:
        y = y - offset
    # --- fixed effects
    X, xnames, fixed_spec = _matrix(pf.fixed, df, "fixed-effects")
    X, xnames, dropped, x_keep = _drop_rank_deficient(X, xnames)
    # --- random effects
    blocks = []
    for t in pf.random:
        Zq, colnames, zspec = _matrix(t.lhs, df, f"random-effects term {t}")
        labels, index, maps, used_codes = _factor_codes(df, t.factors)
        if Zq.shape[1] == 0:
            raise DataError(f"random-effects term {t} has no columns")
        blocks.append(RandomBlock(
            term=t, levels=labels, index=index, Zq=Zq, colnames=colnames, spec=zspec,
            structure=make_structure(t.structure, Zq.shape[1], structures), level_codes=maps,
            used_codes=used_codes,
        ))
    # lme4's term order
    nl = [b.n_levels for b in blocks]
    if any(np.diff(nl) > 0):
        order = np.argsort(nl, kind="stable")[::-1]
        blocks = [blocks[i] for i in order]
    n = len(df)
    for b in blocks:
        if b.n_levels < 2 and b.group not in single_level_ok:
            raise DataError(
                f"grouping factor {b.group!r} has a single level ({b.levels[0]!r}) in the {n} used rows: "
                "a random effect needs at least two levels (lme4: grouping factors must have > 1 sampled "
                "level); drop the term or check the data and missing values")
        if b.n_levels >= n:
            raise DataError(
                f"number of levels of grouping factor {b.group!r} ({b.n_levels}) must be "
                f"less than the number of observations ({n})"
            )
        # lme4's check.nobs.vs.nRE, for the full (us/diag) parameterizations; a
        # structured term (ar1, cs, …) with a residual is identified by its structure
        if b.n_levels * b.q >= n and n > 0 and b.structure.n_params >= b.q:
            raise DataError(
                f"number of observations ({n}) <= number of random effects "
                f"({b.n_levels * b.q}) for term {b.term}; the random-effects parameters and "
                "the residual variance are probably unidentifiable"
            )
    resp_name = pf.response
    return Design(
        formula=pf, y=y, X=X, xnames=xnames, fixed_spec=fixed_spec, blocks=blocks,
        rows=rows, n_data=n_data, dropped_columns=dropped, response_name=resp_name,
        x_keep=x_keep, frame=df[used], offset=offset, weights=None if w_all is None else w_all[rows],
    )


def _weight_values(weights, data: pd.DataFrame) -> np.ndarray:
    """Prior weights as floats, one per data row (NaN: missing), checked: finite and > 0."""
    if isinstance(weights, str):
        if weights not in data.columns:
            raise DataError(f"weights column {weights!r} is not in the data; columns: {list(data.columns)}")
        col, what = data[weights], f"weights column {weights!r}"
    else:
        col, what = weights, "weights"
        if np.ndim(col) != 1 or len(col) != len(data):
            raise DataError(f"weights must be a column name or one value per data row ({len(data)}), "
                            f"got shape {np.shape(col)}")
    try:
        w = np.asarray(pd.to_numeric(pd.Series(np.asarray(col)), errors="raise"), float)
    except (ValueError, TypeError):
        raise DataError(f"{what} must be numeric") from None
    bad = np.flatnonzero(~np.isnan(w) & ~(np.isfinite(w) & (w > 0)))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{what} must be positive and finite (Var(εᵢ) = σ²/wᵢ); row {_label(data.index[i])!r} "
                        f"has {w[i]:g} ({bad.size} such row(s)); drop rows that should not count")
    return w


#: ``design_stats`` stores Z₁ᵀZ_r sparsely (co-occurrence pattern, see
#: :func:`sparse_cross_pattern`) when its dense form would have more entries than this
#: and at most ``SPARSE_DENSITY`` of them are nonzero
SPARSE_MIN_ENTRIES = 250_000
SPARSE_DENSITY = 0.25


def sparse_cross_pattern(B: sp.csr_matrix, q1: int) -> dict:
    r"""Fixed-shape index arrays for the sparse Schur-complement update.

    ``B = Z₁ᵀZ_r`` (ℓ₁q₁ × q_r, rows level-major).  Row block j (level j of the first
    term) has nonzero columns c with values ``B_j[:, c]`` (length q₁).  The update
    ``Σ_j B_jᵀ W_j B_j`` (W_j = T₁A₁₁ⱼ⁻¹T₁ᵀ, q₁ × q₁, changes with θ) is a sum over the
    *triples* (j, c, c′) of columns co-occurring in block j:

        (BᵀWB)[c, c′] = Σ_{triples} ⟨W_j, B_j[:, c] B_j[:, c′]ᵀ⟩

    so the constant outer products are stored once (``tr_v``) and an evaluation is one
    gather, one multiply and one scatter-add into a q_r × q_r matrix — the cost of the
    co-occurrence pattern, not of ℓ₁ · q_r².  Only c ≤ c′ is kept (the result is
    symmetric).  Returns ``sp_j, sp_c, sp_v`` (the nonzero (j, c) pairs, for the
    right-hand sides) and ``tr_j, tr_seg, tr_v`` (triples, sorted by destination) with
    ``tr_udst`` (the distinct destinations ``c·q_r + c′``; triple t adds to ``tr_udst[tr_seg[t]]``)
    and ``tr_udst_t`` (their mirror images ``c′·q_r + c``)."""
    if B.shape[1] ** 2 >= 2**31:
        raise ValueError(f"the later random-effects terms have {B.shape[1]} columns; at most 46,340 are supported")
    l1 = B.shape[0] // q1
    qr = B.shape[1]
    # pattern of block rows: (j, c) nonzero if any of the q1 rows of block j has c
    Bc = B.tocoo()
    jj = Bc.row // q1
    key = np.unique(jj.astype(np.int64) * qr + Bc.col)
    sp_j, sp_c = (key // qr).astype(np.int64), (key % qr).astype(np.int64)
    Bd = B.tocsc()
    sp_v = np.zeros((key.size, q1))
    # values B[j*q1 + a, c]
    for a in range(q1):
        sp_v[:, a] = np.asarray(Bd[sp_j * q1 + a, sp_c]).ravel()
    # triples: pairs (e, e') of entries of the same block row j with e <= e' (so c <= c');
    # built in int32 with few temporaries (InstEval: 1.8 M triples; memory is the limit here)
    start = np.searchsorted(sp_j, np.arange(l1 + 1))
    local = np.arange(sp_j.size) - start[sp_j]
    reps = np.diff(start)[sp_j] - local
    e1 = np.repeat(np.arange(sp_j.size, dtype=np.int32), reps)
    e2 = np.arange(e1.size, dtype=np.int32)
    e2 -= np.repeat((np.cumsum(reps) - reps).astype(np.int32), reps)
    e2 += e1
    c32 = sp_c.astype(np.int32)
    dst = c32[e1] * np.int32(qr)          # < q_r² < 2³¹ (checked above)
    dst += c32[e2]
    # sorted by destination: the scatter becomes a sorted segment sum over the distinct
    # destinations (InstEval: 1.8 M triples onto 142 k lecturer pairs), ~4× faster on CPU
    order = np.argsort(dst, kind="stable")
    e1, e2, dst = e1[order], e2[order], dst[order]
    del order
    first = np.empty(dst.size, bool)
    first[:1] = True
    np.not_equal(dst[1:], dst[:-1], out=first[1:])
    tr_udst = dst[first]
    del dst
    # Pad every array to a size bucket so that data sets of similar size share compiled
    # programs: padded pairs and triples have value 0 (they add nothing), padded triples
    # go to an extra segment, padded destinations lie past the q_r² matrix (sliced off)
    n_p, n_t, n_u = sp_j.size, e1.size, tr_udst.size
    P, T, U = size_bucket(n_p), size_bucket(n_t), size_bucket(n_u + 1)
    tr_seg = np.full(T, n_u, np.int32)
    np.cumsum(first, dtype=np.int32, out=tr_seg[:n_t])
    tr_seg[:n_t] -= 1
    del first
    tr_j = np.zeros(T, np.int32)
    tr_j[:n_t] = sp_j[e1]
    tr_v = np.zeros((T, q1, q1))
    for lo in range(0, n_t, 1 << 18):          # in slices: no triple-length float temporaries
        i1, i2 = e1[lo : lo + (1 << 18)], e2[lo : lo + (1 << 18)]
        tr_v[lo : lo + i1.size] = sp_v[i1][:, :, None] * sp_v[i2][:, None, :]
    del e1, e2
    tr_udst = tr_udst.astype(np.int64)
    dummy = qr * qr + np.arange(U - n_u)
    udst = np.concatenate([tr_udst, dummy])
    udst_t = np.concatenate([(tr_udst % qr) * qr + tr_udst // qr, dummy])
    itype = np.int64 if udst[-1] >= 2**31 else np.int32
    return dict(
        sp_j=_pad(sp_j, P, 0).astype(np.int32), sp_c=_pad(sp_c, P, 0).astype(np.int32), sp_v=_pad(sp_v, P, 0.0),
        tr_j=tr_j, tr_seg=tr_seg, tr_udst=udst.astype(itype), tr_udst_t=udst_t.astype(itype), tr_v=tr_v)


def size_bucket(n: int) -> int:
    """Smallest m · 2ᵉ ≥ n with m ∈ {4, 5, 6, 7} (at most 25 % padding)."""
    if n <= 4:
        return max(int(n), 1)
    e = int(np.floor(np.log2(n))) - 2
    for m in (4, 5, 6, 7, 8):
        if m * 2**e >= n:
            return m * 2**e
    return 8 * 2**e


def _pad(a: np.ndarray, size: int, value) -> np.ndarray:
    """``a`` padded along its first axis to ``size`` rows of ``value``."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.full((size - a.shape[0],) + a.shape[1:], value, dtype=a.dtype)])


def dense_z1zr(stats: dict) -> np.ndarray:
    """Z₁ᵀZ_r as a dense (ℓ₁, q₁, q_r) array, from either form of the statistics."""
    if "Z1Zr" in stats:
        return np.asarray(stats["Z1Zr"])
    l1, q1 = np.asarray(stats["D1"]).shape[:2]
    out = np.zeros((l1, np.asarray(stats["ZrZr"]).shape[0], q1))
    np.add.at(out, (np.asarray(stats["sp_j"]), np.asarray(stats["sp_c"])), np.asarray(stats["sp_v"]))  # pads add 0
    return out.transpose(0, 2, 1)


SPARSE_KEYS = ("sp_j", "sp_c", "sp_v", "tr_j", "tr_seg", "tr_udst", "tr_udst_t", "tr_v")


def use_sparse(design: Design) -> bool:
    """Whether :func:`design_stats` takes the sparse path for this design."""
    if len(design.blocks) < 2:
        return False
    b1 = design.blocks[0]
    qr = sum(b.n_levels * b.q for b in design.blocks[1:])
    entries = b1.n_levels * b1.q * qr
    if entries <= SPARSE_MIN_ENTRIES:
        return False
    # nonzeros of Z₁ᵀZ_r are at most the distinct (level₁, level_k) pairs times q's
    pairs = sum(len(np.unique(b1.index.astype(np.int64) * b.n_levels + b.index)) * b.q for b in design.blocks[1:])
    return pairs * b1.q <= SPARSE_DENSITY * entries


def design_stats(design: Design, sparse: bool | None = None) -> dict:
    """Response-free cross-products: Z₁ᵀZ₁ blocks, Z₁ᵀZ_r, Z_rᵀZ_r, ZᵀX, XᵀX.

    ``sparse`` (default: :func:`use_sparse`) stores Z₁ᵀZ_r by its co-occurrence
    pattern (:func:`sparse_cross_pattern`) instead of a dense ℓ₁ × q₁ × q_r array."""
    b1 = design.blocks[0]
    X = design.X
    l1, q1 = b1.n_levels, b1.q
    D1 = np.empty((l1, q1, q1))
    for a in range(q1):
        for c in range(a, q1):
            D1[:, a, c] = D1[:, c, a] = np.bincount(b1.index, b1.Zq[:, a] * b1.Zq[:, c], minlength=l1)
    Z1 = _term_Z(b1)
    stats = dict(D1=D1, n=float(design.n), **x_stats(design, X))
    if len(design.blocks) > 1:
        Zr = sp.hstack([_term_Z(b) for b in design.blocks[1:]], format="csr")
        B = (Z1.T @ Zr).tocsr()
        if use_sparse(design) if sparse is None else sparse:
            stats.update(sparse_cross_pattern(B, q1))
        else:
            stats["Z1Zr"] = B.toarray().reshape(l1, q1, -1)
        stats["ZrZr"] = (Zr.T @ Zr).toarray()
    return stats


def x_stats(design: Design, X: np.ndarray) -> dict:
    """The cross-products that involve the fixed-effects matrix ``X``: Z₁ᵀX, XᵀX, Z_rᵀX."""
    b1 = design.blocks[0]
    out = dict(Z1X=np.asarray(_term_Z(b1).T @ X).reshape(b1.n_levels, b1.q, -1), XX=X.T @ X)
    if len(design.blocks) > 1:
        Zr = sp.hstack([_term_Z(b) for b in design.blocks[1:]], format="csr")
        out["ZrX"] = np.asarray(Zr.T @ X)
    return out


def response_stats(design: Design, Y: np.ndarray) -> dict:
    """Per-response cross-products for ``Y`` of shape (n,) or (n, G):
    Z₁ᵀy (…, ℓ₁, q₁), Z_rᵀy, Xᵀy, yᵀy — leading axis G if Y is 2-D."""
    Y2 = Y[:, None] if Y.ndim == 1 else Y
    b1 = design.blocks[0]
    Z1 = _term_Z(b1)
    if Y2.shape[1] > 1 and b1.n_levels * b1.q <= 256:
        # many responses, few columns: one dense GEMM for [Z₁ X]ᵀ Y
        P = np.hstack([Z1.toarray(), design.X]).T @ Y2
        Z1y, Xy = P[: b1.n_levels * b1.q].T, P[b1.n_levels * b1.q:].T
    else:
        Z1y, Xy = np.asarray(Z1.T @ Y2).T, np.asarray(design.X.T @ Y2).T
    out = dict(
        Z1y=np.ascontiguousarray(Z1y).reshape(Y2.shape[1], b1.n_levels, b1.q),
        Xy=np.ascontiguousarray(Xy),
        yy=np.einsum("ng,ng->g", Y2, Y2),
    )
    if len(design.blocks) > 1:
        Zr = sp.hstack([_term_Z(b) for b in design.blocks[1:]], format="csr")
        out["Zry"] = np.asarray(Zr.T @ Y2).T
    if Y.ndim == 1:
        out = {k: v[0] for k, v in out.items()}
    return out


def _row_cross_matrix(ca, va, cb, vb, width_b, width):
    """The sparse n × ``width`` matrix whose row i is a_i ⊗ b_i, where row i of a (b) has its
    nonzeros ``va[i]`` (``vb[i]``) at columns ``ca[i]`` (``cb[i]``): Σ_i M[i, g] (a_i ⊗ b_i)
    for every column g of a weight matrix M is then one product with M."""
    n = ca.shape[0]
    cols = (ca[:, :, None] * width_b + cb[:, None, :]).reshape(n, -1)
    vals = (va[:, :, None] * vb[:, None, :]).reshape(n, -1)
    rows = np.repeat(np.arange(n), cols.shape[1])
    return sp.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, width))


def masked_design_stats(design: Design, M: np.ndarray) -> dict:
    """:func:`design_stats` for every column of the observation mask ``M`` (n × G, 1 where
    the response is observed, or per-response prior weights): the cross-products over each
    response's own rows, with a leading axis G.  ``Σ_i m_i z_i z_iᵀ`` etc. are weighted sums
    of row outer products, linear in M: one sparse n × width matrix holds every statistic's
    row products, and the whole batch is one product with M (one pass over it)."""
    M = np.asarray(M, dtype=float)
    G = M.shape[1]
    b1 = design.blocks[0]
    l1, q1 = b1.n_levels, b1.q
    n, p = design.X.shape
    ar1 = np.arange(q1)
    c1 = b1.index[:, None] * q1 + ar1[None, :]                 # Z₁ columns of each row
    cx = np.broadcast_to(np.arange(p), (n, p))
    parts = {  # name: (row-product matrix, shape of one response's statistic)
        # D1: only the diagonal (per-level) blocks of Z₁ᵀZ₁
        "D1": (_row_cross_matrix(c1, b1.Zq, np.broadcast_to(ar1, (n, q1)), b1.Zq, q1, l1 * q1 * q1), (l1, q1, q1)),
        "Z1X": (_row_cross_matrix(c1, b1.Zq, cx, design.X, p, l1 * q1 * p), (l1, q1, p)),
        "XX": (sp.csr_matrix(np.einsum("ni,nj->nij", design.X, design.X).reshape(n, -1)), (p, p)),
    }
    if len(design.blocks) > 1:
        offs = np.cumsum([0] + [b.n_levels * b.q for b in design.blocks[1:]])
        cr = np.hstack([off + b.index[:, None] * b.q + np.arange(b.q)[None, :]
                        for off, b in zip(offs, design.blocks[1:])])
        vr = np.hstack([b.Zq for b in design.blocks[1:]])
        qr = int(offs[-1])
        parts["Z1Zr"] = (_row_cross_matrix(c1, b1.Zq, cr, vr, qr, l1 * q1 * qr), (l1, q1, qr))
        parts["ZrZr"] = (_row_cross_matrix(cr, vr, cr, vr, qr, qr * qr), (qr, qr))
        parts["ZrX"] = (_row_cross_matrix(cr, vr, cx, design.X, p, qr * p), (qr, p))
    B = sp.hstack([m for m, _ in parts.values()], format="csc")
    if B.shape[1] <= 512:
        # few columns (a random intercept and a handful of fixed effects): one dense BLAS product,
        # 8× faster than scipy's single-threaded sparse-times-dense.  M is padded to a multiple
        # of 32 columns so that no column goes through BLAS's edge kernels: each response's
        # statistics are then bit-identical whatever other responses share the product
        Gp = -(-G // 32) * 32
        Mp = M if Gp == G else np.concatenate([M, np.zeros((n, Gp - G))], axis=1)
        out = (B.toarray().T @ Mp)[:, :G]                       # (total width, G)
    else:
        out = np.asarray(B.T @ M)
    stats, start = {}, 0
    for name, (m, shape) in parts.items():
        w = m.shape[1]
        stats[name] = np.ascontiguousarray(out[start: start + w].T).reshape((G,) + shape)
        start += w
    stats["n"] = (M > 0).sum(axis=0).astype(float)              # rows used (weights are not counts)
    return stats