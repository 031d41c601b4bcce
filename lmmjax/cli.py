"""Command line: ``lmmjax demo``, ``lmmjax fit`` and ``lmmjax batch``.

``lmmjax fit DATA FORMULA`` (either order) fits one model with :func:`lmmjax.lmer` and
prints its lme4/lmerTest-style summary; ``--json`` also writes a machine-readable result.
``lmmjax batch OBS RESPONSES FORMULA --out FILE`` fits one model per response with
:func:`lmmjax.lmer_batch` and writes one row per response × coefficient.

Data files are read by extension: ``.csv``, ``.tsv``/``.tab``/``.txt`` (optionally
``.gz``/``.bz2``/``.xz``/``.zip``), ``.parquet``/``.pq`` (pyarrow), and for batch
responses ``.h5ad`` (anndata).  Errors in what was passed (a missing or unreadable file,
an unknown column, a bad formula, mismatched rows) print one line
``lmmjax: error: ...`` on stderr and exit with status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings

EXIT_INPUT = 2      # bad input (argparse uses 2 for usage errors too)
EXIT_BUG = 1        # an unexpected exception: a bug, reported as one line without --debug

_DDF_CHOICES = ("satterthwaite", "kenward-roger", "residual", "asymptotic", "none")
_TEXT_EXT = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": "\t"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip")
_PARQUET_EXT = (".parquet", ".pq")


class CliError(Exception):
    """An input problem found by the command line itself (exit status 2)."""


# ---------------------------------------------------------------- reading files
def _kind(path: str) -> str:
    """'csv', 'tsv', 'parquet' or 'h5ad' from the file name (compression suffixes skipped)."""
    name = path.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    ext = os.path.splitext(name)[1]
    if ext in _TEXT_EXT:
        return "csv" if _TEXT_EXT[ext] == "," else "tsv"
    if ext in _PARQUET_EXT:
        return "parquet"
    if ext == ".h5ad":
        return "h5ad"
    raise CliError(f"cannot tell the format of {path!r} from its extension; use .csv, .tsv, .parquet "
                   "(or .h5ad for batch responses)")


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise CliError(f"{path!r} is a directory, not a data file")


def read_table(path: str):
    """A data file as a pandas DataFrame (format from the extension)."""
    import pandas as pd

    _check_file(path)
    kind = _kind(path)
    if kind == "h5ad":
        raise CliError(f"{path!r} is an AnnData file; it can only be the RESPONSES of `lmmjax batch`")
    try:
        if kind == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise CliError("reading parquet files needs pyarrow: pip install pyarrow") from None
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="," if kind == "csv" else "\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path!r} as {kind}: {_one_line(str(exc))}") from None
    except OSError as exc:
        raise CliError(f"cannot read {path!r}: {exc.strerror or _one_line(str(exc))}") from None
    if df.shape[1] == 0:
        raise CliError(f"{path!r} has no columns")
    return df


def _read_h5ad(path: str):
    _check_file(path)
    try:
        import anndata
    except ImportError:
        raise CliError("reading .h5ad files needs anndata: pip install anndata") from None
    try:
        return anndata.read_h5ad(path)
    except OSError as exc:
        raise CliError(f"cannot read {path!r} as an AnnData (.h5ad) file: {_one_line(str(exc))}") from None


def _ids(values, what: str):
    """Sample ids as unique strings (ids read as numbers from one file match text in another)."""
    import pandas as pd

    ids = pd.Index(pd.Series(values).astype(str).to_numpy())
    if ids.has_duplicates:
        raise CliError(f"{what} has duplicate sample ids, e.g. {ids[ids.duplicated()][0]!r}; ids must be unique")
    return ids


def _match(obs_ids, resp_ids, path: str, index: str):
    """Positions of OBS's sample ids among RESPONSES' (every OBS sample must be there)."""
    missing = obs_ids.difference(resp_ids, sort=False)
    if len(missing):
        raise CliError(f"{len(missing)} sample id(s) of OBS column {index!r} are not in {path!r}, e.g. "
                       f"{list(missing[:3])}")
    extra = len(resp_ids) - len(obs_ids)
    if extra:
        print(f"lmmjax: note: {extra} sample(s) of {path!r} are not in OBS and are left out", file=sys.stderr)
    return resp_ids.get_indexer(obs_ids)


def _numeric_only(df, path: str, hint: str):
    import pandas as pd

    bad = [c for c in df.columns if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    if bad:
        example = df[bad[0]].dropna().astype(str)
        raise CliError(f"{len(bad)} column(s) of {path!r} are not numeric, e.g. {str(bad[0])!r} "
                       f"(holds {example.iloc[0] if len(example) else 'nothing'!r}); {hint}")
    return df.astype(float)


def read_responses(path: str, obs, index: str | None, by_row: bool):
    """RESPONSES as a samples × responses DataFrame in OBS's row order.

    Samples × responses by default (one column per response); with ``by_row`` the file is
    responses × samples, its first column naming the responses when it is not numeric.
    With ``index``, rows are matched to OBS by that sample-id column (in RESPONSES a
    column of that name, or with ``by_row`` the column headers); otherwise by row order."""
    import pandas as pd

    df = read_table(path)
    if index is not None and index not in obs.columns:
        raise CliError(f"--index {index!r} is not a column of OBS; its columns are {list(obs.columns)}")
    if by_row:
        first = df.columns[0]
        if not pd.api.types.is_numeric_dtype(df[first]):
            df = df.set_index(first)
        df = _numeric_only(df, path, "with --responses-by-row every column after the response names "
                                     "must hold one sample's values")
        df.index = df.index.astype(str)
        df = df.T
        if index is not None:
            df = df.iloc[_match(_ids(obs[index], f"OBS column {index!r}"), _ids(df.index, path), path, index)]
    else:
        if index is not None:
            if index not in df.columns:
                raise CliError(f"{path!r} has no column {index!r} to match OBS by (--index); its first columns "
                               f"are {list(df.columns[:5])}")
            pos = _match(_ids(obs[index], f"OBS column {index!r}"), _ids(df[index], path), path, index)
            df = df.drop(columns=[index]).iloc[pos]
        df = _numeric_only(df, path, "give the sample-id column with --index COL (OBS needs the same "
                                     "column), or --responses-by-row if responses are rows")
    if len(df) != len(obs):
        raise CliError(f"{path!r} has {len(df)} samples but OBS has {len(obs)} rows; they must match row by "
                       "row (or name a sample-id column with --index COL)")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- output helpers
def _one_line(msg: str) -> str:
    """A message on one line: caret-marker lines dropped, the others joined."""
    lines = [ln.strip() for ln in str(msg).splitlines()]
    return " ".join(ln for ln in lines if ln and not re.fullmatch(r"[\s^~]+", ln))


def _num(x):
    """A JSON-safe number: NaN and ±inf become null (strict JSON has no NaN/Infinity)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return x
    return v if math.isfinite(v) else None


def _records(df, index_name=None) -> list[dict]:
    import pandas as pd

    out = []
    for idx, row in df.iterrows():
        rec = {} if index_name is None else {index_name: str(idx)}
        for k, v in row.items():
            if v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v)):
                rec[str(k)] = None
            elif isinstance(v, str):
                rec[str(k)] = v
            else:
                rec[str(k)] = _num(v)
        out.append(rec)
    return out


def _anova_table(m, ddf: str):
    tab = m.anova(type=3, ddf="asymptotic" if ddf == "none" else ddf)
    if ddf == "none":           # lme4 without lmerTest: F values only
        tab = tab.drop(columns=["den_df", "p"])
    return tab


def fit_json(m, ddf: str, data_path: str, weights=None, anova=None) -> dict:
    """The machine-readable result of one fit (what ``--json`` writes)."""
    from .batchresult import _theta_names

    if ddf == "none":
        tab = m.coef_table("asymptotic")[["estimate", "se", "t"]]
        tab = tab.assign(df=float("nan"), p=float("nan"))
    else:
        tab = m.coef_table(ddf)
    tab = tab[["estimate", "se", "df", "t", "p"]]
    out = {
        "formula": m.formula, "data": data_path, "reml": bool(m.reml), "weights": weights, "ddf": ddf,
        "nobs": int(m.nobs), "ngroups": {k: int(v) for k, v in m.ngroups.items()},
        "criterion": _num(-2.0 * m.loglik), "criterion_kind": "REML" if m.reml else "deviance",
        "logLik": _num(m.loglik), "AIC": _num(m.aic), "BIC": _num(m.bic), "sigma": _num(m.sigma),
        "fixed": _records(tab, "term"),
        "varcorr": _records(m.varcorr),
        "theta": [_num(t) for t in m.theta], "theta_names": _theta_names(m.design),
        "converged": bool(m.converged), "singular": bool(m.is_singular),
    }
    if anova is not None:
        out["anova"] = _records(anova, "term")
    return out


# ---------------------------------------------------------------- commands
def _demo(args) -> int:
    import lmmjax

    data = lmmjax.datasets.load(args.dataset)
    formula = args.formula or _DEMOS[args.dataset.lower()]
    m = lmmjax.lmer(formula, data, reml=not args.ml)
    print(m.summary())
    return 0


def _split_formula(items: list[str], n_files: tuple[int, ...], usage: str):
    """(formula, files) from positional arguments given in any order: the formula is the
    one argument containing '~' that is not an existing file."""
    formulas = [s for s in items if "~" in s and not os.path.exists(s)]
    if len(formulas) != 1:
        what = "no argument is" if not formulas else f"{len(formulas)} arguments are"
        raise CliError(f"{what} a formula (text with '~', e.g. \"y ~ x + (1 | g)\"); usage: {usage}")
    files = list(items)
    files.remove(formulas[0])
    if len(files) not in n_files:
        raise CliError(f"expected {' or '.join(map(str, n_files))} data file(s), got {len(files)}; usage: {usage}")
    return formulas[0], files


def _ddf(args) -> str:
    """The --ddf method, normalized; Kenward-Roger refused for ML fits before fitting."""
    from .inference import normalize_ddf

    ddf = "none" if str(args.ddf).lower() in ("none", "lme4") else normalize_ddf(args.ddf)
    if ddf == "kenward-roger" and args.ml:
        raise CliError("Kenward-Roger needs a REML fit (as in pbkrtest): drop --ml or choose another --ddf")
    return ddf


def _check_folder(path: str, option: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{option} {path!r}: folder {folder!r} does not exist")


def _fit(args) -> int:
    import lmmjax

    formula, (path,) = _split_formula(args.args, (1,), "lmmjax fit FORMULA DATA")
    ddf = _ddf(args)
    if args.json:
        _check_folder(args.json, "--json")
    data = read_table(path)
    data._lmmjax_name = path
    if args.weights is not None and args.weights not in data.columns:
        raise CliError(f"--weights {args.weights!r} is not a column of {path!r}; its columns are {list(data.columns)}")
    m = lmmjax.lmer(formula, data, reml=not args.ml, weights=args.weights)
    print(m.summary(ddf=None if ddf == "none" else ddf))
    anova = None
    if args.anova:
        anova = _anova_table(m, ddf)
        print()
        label = "" if ddf == "none" else f" ({ddf} df)"
        print(f"Type III Analysis of Variance Table{label}:")
        print(anova.to_string(float_format=lambda v: f"{v:.5g}") if len(anova) else "(no terms besides the intercept)")
    if args.json:
        out = fit_json(m, ddf, path, args.weights, anova)
        _write_text(args.json, json.dumps(out, indent=2, allow_nan=False) + "\n")
    return 0


def _write_text(path: str, text: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise CliError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def batch_table(res, coefs: list[str], ddf: str):
    """One row per response × coefficient: response, coef, estimate, se, df, t, p, p_adj
    (Benjamini-Hochberg within the coefficient), status, error."""
    import numpy as np
    import pandas as pd

    frames = []
    for c in coefs:
        tab = res.coef_table(c, ddf="asymptotic" if ddf == "none" else ddf)
        if ddf == "none":
            tab = tab.assign(df=np.nan, p=np.nan, p_adj=np.nan)
        frames.append(pd.DataFrame({
            "response": tab.index.astype(str), "coef": c,
            **{k: tab[k].to_numpy(float) for k in ("estimate", "se", "df", "t", "p", "p_adj")},
            "status": res.status.to_numpy().astype(str),
            "error": res.errors.to_numpy().astype(object)}))
    return pd.concat(frames, ignore_index=True)


def _batch(args) -> int:
    import lmmjax

    formula, files = _split_formula(args.args, (1, 2), "lmmjax batch OBS RESPONSES FORMULA  |  "
                                                      "lmmjax batch DATA.h5ad FORMULA")
    if "~" in formula and formula.split("~", 1)[0].strip():
        raise CliError(f"a batch formula has no response on the left of '~' (every RESPONSES column is one): "
                       f"write {'~' + formula.split('~', 1)[1]!r}")
    ddf = _ddf(args)
    out_kind = _out_kind(args.out)
    resp_path = files[-1]
    _check_file(resp_path)
    is_h5ad = _kind(resp_path) == "h5ad"
    if len(files) == 1 and not is_h5ad:
        raise CliError("give OBS and RESPONSES files (or one .h5ad file, whose .obs holds the covariates)")
    if is_h5ad and args.responses_by_row:
        raise CliError("--responses-by-row is for table files; an .h5ad file is samples × responses already")
    if args.layer is not None and not is_h5ad:
        raise CliError("--layer names a layer of an .h5ad RESPONSES file")
    obs = read_table(files[0]) if len(files) == 2 else None
    if is_h5ad:
        adata = _read_h5ad(resp_path)
        if args.index is not None:
            if obs is None:
                raise CliError("--index matches OBS rows to RESPONSES; with a single .h5ad file there is no OBS")
            if args.index not in obs.columns:
                raise CliError(f"--index {args.index!r} is not a column of OBS; its columns are {list(obs.columns)}")
            adata = adata[_match(_ids(obs[args.index], f"OBS column {args.index!r}"),
                                 _ids(adata.obs_names, resp_path), resp_path, args.index)]
        if obs is not None and adata.n_obs != len(obs):
            raise CliError(f"{resp_path!r} has {adata.n_obs} samples but OBS has {len(obs)} rows; they must match "
                           "row by row (or name a sample-id column with --index COL)")
        data, responses = (adata, None) if obs is None else (obs, adata)
    else:
        responses = read_responses(resp_path, obs, args.index, args.responses_by_row)
        data = obs
    res = lmmjax.lmer_batch(formula, data, responses, reml=not args.ml, layer=args.layer,
                            chunk_size=args.chunk_size, progress=not args.no_progress, weights=args.weights)
    names = list(res.fixef.columns)
    coefs = args.coef or [c for c in names if c != "(Intercept)"]
    if not coefs:
        raise CliError(f"the model has no coefficient besides the intercept; name one with --coef ({names})")
    tab = batch_table(res, coefs, ddf)
    _write_table(tab, args.out, out_kind)
    print(_batch_summary(res, tab, formula, args.out, ddf))
    return 0


def _out_kind(path: str) -> str:
    try:
        kind = _kind(path)
    except CliError:
        kind = None
    if kind not in ("csv", "tsv", "parquet"):
        raise CliError(f"--out {path!r}: the results file must end in .parquet, .csv or .tsv")
    _check_folder(path, "--out")
    return kind


def _write_table(tab, path: str, kind: str) -> None:
    try:
        if kind == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise CliError("writing parquet files needs pyarrow: pip install pyarrow (or use --out x.csv)") from None
            tab.to_parquet(path, index=False)
        else:
            tab.to_csv(path, index=False, sep="," if kind == "csv" else "\t")
    except OSError as exc:
        raise CliError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def _batch_summary(res, tab, formula: str, out: str, ddf: str) -> str:
    st = res.status
    failed = int((st == "failed").sum())
    lines = [f"lmmjax batch: {formula} ({'REML' if res.reml else 'ML'}), {len(res)} responses",
             f"  fitted: {len(res) - failed} ({int((st == 'singular').sum())} singular, "
             f"{int((st == 'not converged').sum())} not converged); failed: {failed}"
             + (" (reasons in the 'error' column)" if failed else "")]
    if ddf == "none":
        lines.append("  no p-values (--ddf none)")
    else:
        lines.append(f"  significant at 5% FDR (Benjamini-Hochberg within coefficient, {ddf} df):")
        for c, part in tab.groupby("coef", sort=False):
            lines.append(f"    {c}: {int((part['p_adj'] < 0.05).sum())}")
    lines.append(f"  wrote {len(tab)} rows to {out}")
    return "\n".join(lines)


_DEMOS = {
    "sleepstudy": "Reaction ~ Days + (Days | Subject)",
    "dyestuff": "Yield ~ 1 + (1 | Batch)",
    "dyestuff2": "Yield ~ 1 + (1 | Batch)",
    "penicillin": "diameter ~ 1 + (1 | plate) + (1 | sample)",
    "pastes": "strength ~ 1 + (1 | batch/cask)",
    "orthodont": "distance ~ age * Sex + (age | Subject)",
    "ovary": "follicles ~ np.sin(2 * np.pi * Time) + np.cos(2 * np.pi * Time) + (1 | Mare)",
}


# ---------------------------------------------------------------- parser and main
class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like the other errors."""

    def error(self, message):
        self.exit(EXIT_INPUT, f"lmmjax: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmmjax", description="Linear mixed models with lme4's formulas and numbers, on JAX")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    d = sub.add_parser("demo", help="fit a bundled data set and print the lme4-style summary")
    d.add_argument("dataset", nargs="?", default="sleepstudy", choices=sorted(_DEMOS))
    d.add_argument("--formula", help="override the demo formula")
    d.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    d.set_defaults(func=_demo)

    ddf_help = ("denominator df of the t/F tests: " + ", ".join(_DDF_CHOICES)
                + " (also KR, kenward_roger, wald, z; none = lme4's table without p-values); default satterthwaite")
    f = sub.add_parser("fit", help="fit FORMULA to a data file (CSV, TSV, parquet) and print the summary",
                       usage="lmmjax fit FORMULA DATA [options]   (or DATA FORMULA)",
                       description="Fit one linear mixed model, e.g. lmmjax fit data.csv \"y ~ x + (1 | g)\".")
    f.add_argument("args", nargs="+", metavar="FORMULA/DATA", help="the formula and the data file, in either order")
    f.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    f.add_argument("--ddf", default="satterthwaite", metavar="METHOD", help=ddf_help)
    f.add_argument("--weights", metavar="COLUMN", help="prior weights column: Var(e_i) = sigma^2 / w_i (lme4's weights=)")
    f.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    f.add_argument("--anova", action="store_true", help="also print the type III ANOVA table")
    f.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    f.set_defaults(func=_fit)

    b = sub.add_parser("batch", help="fit one model per response (column of RESPONSES) and write a results table",
                       usage="lmmjax batch [OBS] RESPONSES FORMULA --out FILE [options]",
                       description="Fit FORMULA (no response, e.g. \"~ cond + (1 | donor)\") to every response: "
                                   "lmmjax batch OBS RESPONSES FORMULA --out results.parquet, or "
                                   "lmmjax batch DATA.h5ad FORMULA --out results.csv.")
    b.add_argument("args", nargs="+", metavar="OBS/RESPONSES/FORMULA",
                   help="covariates file, responses file (CSV/TSV/parquet, or .h5ad: then OBS may be omitted) "
                        "and the formula, in any order of formula vs files")
    b.add_argument("--out", required=True, metavar="FILE", help="results file: .parquet, .csv or .tsv")
    b.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    b.add_argument("--ddf", default="satterthwaite", metavar="METHOD", help=ddf_help)
    b.add_argument("--coef", action="append", metavar="NAME",
                   help="coefficient (or one-coefficient term) to report; repeatable; default: all but the intercept")
    b.add_argument("--index", metavar="COL", help="sample-id column of OBS matching RESPONSES' sample ids "
                                                  "(its column COL, or its header with --responses-by-row, "
                                                  "or the .h5ad obs_names); default: row order")
    b.add_argument("--responses-by-row", action="store_true",
                   help="RESPONSES is responses x samples (first column: response names)")
    b.add_argument("--layer", help="layer of the .h5ad file holding the responses (default .X)")
    b.add_argument("--weights", metavar="COLUMN", help="prior weights: an OBS column (or an .h5ad layer)")
    b.add_argument("--chunk-size", type=int, metavar="N", help="responses per compiled chunk (default: by memory)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    b.set_defaults(func=_batch)
    return p


def _input_errors() -> tuple:
    import pandas as pd

    from .formula import InputError

    return (CliError, InputError, OSError, ValueError, KeyError, NotImplementedError,
            pd.errors.ParserError, pd.errors.EmptyDataError)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"lmmjax: warning: {_one_line(str(message))}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "batch" and args.chunk_size is not None and args.chunk_size < 1:
        print("lmmjax: error: --chunk-size must be a positive integer", file=sys.stderr)
        return EXIT_INPUT
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("ignore", FutureWarning)     # library deprecation notices, not about the fit
        if args.debug:
            return args.func(args)
        try:
            return args.func(args)
        except BrokenPipeError:     # stdout closed early (`lmmjax fit ... | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except _input_errors() as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"lmmjax: error: {_one_line(str(msg))}", file=sys.stderr)
            return EXIT_INPUT
        except KeyboardInterrupt:
            print("lmmjax: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a bug: one line here, the traceback with --debug
            print(f"lmmjax: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} (a bug in lmmjax? "
                  "rerun with --debug for the traceback and report it)", file=sys.stderr)
            return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
