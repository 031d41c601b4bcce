"""lme4-style text output for a fitted model (``summary(fit)`` and ``print(fit)``)."""
from __future__ import annotations

import numpy as np
import pandas as pd


class SummaryText(str):
    """A summary's text: a ``str`` whose repr is the text itself, so a notebook or REPL
    shows it once, formatted (not printed and then echoed as an escaped string)."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle):      # IPython
        p.text(str(self))


def _num(x: float) -> str:
    """4 significant digits without switching to exponent notation for ordinary sizes."""
    if x == 0 or not np.isfinite(x):
        return f"{x:.4g}"
    digits = max(0, 3 - int(np.floor(np.log10(abs(x)))))
    return f"{x:.{digits}f}" if abs(x) >= 1e-4 else f"{x:.3e}"


def _header(m) -> list[str]:
    how = "REML" if m.reml else "maximum likelihood"
    lines = [f"Linear mixed model fit by {how} [lmmjax]", f"Formula: {m.formula}"]
    if m.data_name:
        lines.append(f"   Data: {m.data_name}")
    return lines


def _criteria(m) -> list[str]:
    if m.reml:
        return [f"REML criterion at convergence: {m.reml_criterion:.1f}"]
    tab = pd.DataFrame(
        [[m.aic, m.bic, m.loglik, m.deviance, m.df_resid]],
        columns=["AIC", "BIC", "logLik", "deviance", "df.resid"],
    )
    return [tab.to_string(index=False, float_format=lambda v: f"{v:.1f}")]


def _random_table(m) -> list[str]:
    rows = []
    for g, S, blk in zip(m._group_labels(), m.covariance_matrices(), m.design.blocks):
        names = list(S.index)
        sd = np.sqrt(np.maximum(np.diag(S.to_numpy()), 0.0))
        for i, nm in enumerate(names):
            corr = []
            for j in range(i if blk.structure.correlated else 0):
                d = sd[i] * sd[j]
                corr.append(f"{S.iat[i, j] / d:.2f}" if d > 0 else "NaN")
            rows.append([g if i == 0 else "", nm, _num(sd[i] ** 2), _num(sd[i]), " ".join(f"{c:>5}" for c in corr)])
    rows.append(["Residual", "", _num(m.sigma ** 2), _num(m.sigma), ""])
    has_corr = any(r[4] for r in rows)
    header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if has_corr else [])
    table = [header] + [r[: len(header)] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    left = {0, 1, 4}
    out = [
        " " + " ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in table
    ]
    grp = ", ".join(f"{g}, {n}" for g, n in m.ngroups.items())
    out.append(f"Number of obs: {m.nobs}, groups:  {grp}")
    return out


def _pval(p: float) -> str:
    return "< 2e-16" if p < 2e-16 else f"{p:.3g}"


def _fixed_table(m, ddf: str | None) -> list[str]:
    """Estimates with df and p-values for ``ddf`` (lmerTest's default: Satterthwaite)."""
    if ddf is None:
        se = np.sqrt(np.diag(m.vcov.to_numpy()))
        tab = pd.DataFrame({"Estimate": m.fixef.to_numpy(), "Std. Error": se,
                            "t value": m.fixef.to_numpy() / se}, index=m.fixef.index)
        return tab.to_string(float_format=lambda v: f"{v:.4g}").splitlines()
    ct = m.coef_table(ddf)
    tab = pd.DataFrame({
        "Estimate": [f"{v:.4g}" for v in ct["estimate"]],
        "Std. Error": [f"{v:.4g}" for v in ct["se"]],
        "df": [f"{v:.4g}" for v in ct["df"]],
        "t value": [f"{v:.3f}" for v in ct["t"]],
        "Pr(>|t|)": [_pval(v) for v in ct["p"]],
    }, index=ct.index)
    label = {"satterthwaite": "Satterthwaite's method", "kenward-roger": "Kenward-Roger's method",
             "residual": "residual df", "asymptotic": "normal approximation (z)"}.get(ddf, ddf)
    return tab.to_string().splitlines() + [f"(df and p-values: {label})"]


def _fixed_corr(m) -> list[str]:
    p = len(m.fixef)
    if p < 2:
        return []
    V = m.vcov.to_numpy()
    sd = np.sqrt(np.diag(V))
    C = V / np.outer(sd, sd)
    abbrev = [n if len(n) <= 6 else (n[:6] if not n.startswith("(") else "(" + n[1:5] + ")") for n in m.fixef.index]
    rows = []
    for i in range(1, p):
        rows.append([f"{C[i, j]:.3f}" for j in range(i)] + [""] * (p - 1 - i))
    tab = pd.DataFrame(rows, index=list(m.fixef.index[1:]), columns=abbrev[:-1])
    return ["", "Correlation of Fixed Effects:"] + tab.to_string().splitlines()


def format_summary(m, ddf: str | None = "satterthwaite") -> str:
    res = m.residuals / m.sigma
    if m.weights is not None:         # lme4's scaled Pearson residuals: √wᵢ rᵢ / σ
        res = res * np.sqrt(m.weights)
    q = np.quantile(res, [0, 0.25, 0.5, 0.75, 1.0])
    scaled = pd.DataFrame([q], columns=["Min", "1Q", "Median", "3Q", "Max"]).to_string(
        index=False, float_format=lambda v: f"{v:.4f}")
    lines = _header(m) + [""] + _criteria(m) + ["", "Scaled residuals: "] + scaled.splitlines()
    lines += ["", "Random effects:"] + _random_table(m)
    dropped = m.design.n_data - m.nobs
    if dropped:
        lines.append(f"({dropped} observation{'s' if dropped > 1 else ''} deleted due to missingness)")
    lines += ["", "Fixed effects:"] + _fixed_table(m, ddf) + _fixed_corr(m)
    if m.design.dropped_columns:
        lines += ["", f"fit warnings: fixed-effect model matrix is rank deficient so dropping "
                      f"{len(m.design.dropped_columns)} columns: {m.design.dropped_columns}"]
    if m.is_singular:
        lines += ["", "boundary (singular) fit: a variance is (near) zero or a correlation is ±1"]
    if not m.converged:
        lines += ["", f"Model failed to converge: {m.optinfo.message}"]
    return "\n".join(lines)


def format_short(m) -> str:
    lines = _header(m) + _criteria(m)[:1] if m.reml else _header(m) + _criteria(m)
    lines += ["Random effects:"] + _random_table(m)
    lines += ["Fixed Effects:", m.fixef.to_frame().T.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if m.is_singular:
        lines.append("boundary (singular) fit")
    return "\n".join(lines)
