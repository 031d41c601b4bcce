"""Parse lme4-style mixed-model formulas.

``"y ~ x + (1 + x | g) + (1 | a/b) + (z || h)"`` is split into

* the response expression (``"y"``),
* the fixed-effects right-hand side (``"x"``), handed to formulaic later,
* a list of :class:`RandomTerm` — one per random-effects term after lme4's
  expansions: ``(e | a/b)`` becomes ``(e | a) + (e | b:a)`` (lme4's naming of the
  inner factor) and ``(x || g)`` becomes ``(1 | g) + (0 + x | g)``
  (``lme4::expandDoubleVerts``).

A term may be wrapped in a covariance-structure keyword in glmmTMB spelling —
``us(1 + x | g)``, ``diag(…)``, ``homdiag(…)``, ``cs(0 + f | g)``, ``homcs(…)``,
``ar1(0 + f | g)``, ``hetar1(…)`` —; the keyword is kept on the term and resolved
by :mod:`lmmjax.covariance`.

This module is pure string handling: it does not look at data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from formulaic import Formula

__all__ = ["RandomTerm", "ParsedFormula", "parse_formula", "InputError", "FormulaError"]

#: keywords accepted as wrappers around a bar term, e.g. ``diag(1 + x | g)``
STRUCTURE_KEYWORDS = ("us", "diag", "cs", "ar1", "homdiag", "homcs", "hetar1")


class InputError(ValueError):
    """Base of lmmjax's errors about what a user passed (formula, data, arguments):
    ``except lmmjax.InputError`` catches every one of them."""


class FormulaError(InputError):
    """The formula string cannot be parsed."""


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(lhs | group)``.

    lhs:       the left-hand side, a formulaic right-hand-side string such as ``"1 + Days"``
    factors:   the grouping columns; several for an interaction ``a:b``
    structure: covariance keyword (``"us"`` unless ``diag``/``||`` or another was given)
    """

    lhs: str
    factors: tuple[str, ...]
    structure: str = "us"

    @property
    def group_name(self) -> str:
        """lme4's name for the grouping factor, e.g. ``"cask:batch"``."""
        return ":".join(self.factors)

    def __str__(self) -> str:
        inner = f"{self.lhs} | {self.group_name}"
        return f"({inner})" if self.structure == "us" else f"{self.structure}({inner})"


@dataclass(frozen=True)
class ParsedFormula:
    response: str
    fixed: str
    random: tuple[RandomTerm, ...]
    text: str
    offset: tuple[str, ...] = ()     # the expressions of offset(...) terms (R's offset)


def _check_parens(formula: str) -> None:
    """Point at the first unbalanced parenthesis."""
    opened = []
    for i, c in enumerate(formula):
        if c == "(":
            opened.append(i)
        elif c == ")":
            if not opened:
                raise FormulaError(f"unbalanced parentheses: the ')' at position {i} has no matching '(':\n"
                                   f"  {formula}\n  {' ' * i}^")
            opened.pop()
    if opened:
        i = opened[-1]
        raise FormulaError(f"unbalanced parentheses: the '(' at position {i} is never closed:\n"
                           f"  {formula}\n  {' ' * i}^")


def _outside_quotes(s: str, fn) -> str:
    """Apply ``fn`` to the parts of ``s`` outside string literals and backtick-quoted names."""
    parts = re.split(r"('[^']*'|\"[^\"]*\"|`[^`]*`)", s)
    return "".join(p if k % 2 else fn(p) for k, p in enumerate(parts))


def _r_power(s: str) -> str:
    """R's ``^`` inside ``I(...)`` and ``offset(...)`` is a power; in Python (which
    formulaic evaluates them with) it is XOR, so ``I(x^2)`` would silently fit
    ``x XOR 2``: write it as ``**``."""
    out, i = [], 0
    for m in re.finditer(r"(?<![\w.])(?:I|offset)\s*\(", s):
        if m.start() < i:
            continue
        close = _matching_paren(s, m.end() - 1)
        out.append(s[i:m.end()])
        out.append(s[m.end():close].replace("^", "**"))
        i = close
    out.append(s[i:])
    return "".join(out)


#: module prefixes whose dotted names are Python, not column names (np.log, np.pi)
_MODULES = ("np", "numpy", "math", "pd", "scipy")


def _quote_dotted(s: str) -> str:
    """Column names with dots (``group.id``, common in R data) in backticks, so that
    formulaic reads a name and not an attribute; calls (``np.log(x)``) and module
    constants are left alone."""
    def q(part):
        def rep(m):
            name = m.group(1)
            return name if name.split(".")[0] in _MODULES else f"`{name}`"
        return re.sub(r"(?<![\w.`])([A-Za-z_]\w*(?:\.\w+)+)(?![\w.`])(?!\s*\()", rep, part)
    return _outside_quotes(s, q)


def _matching_paren(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    raise FormulaError(f"unbalanced parentheses in formula: {s!r}")


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` at parenthesis depth 0."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _find_bar(inner: str) -> tuple[int, str] | None:
    """Position and kind (``"|"`` or ``"||"``) of the top-level bar in ``inner``."""
    depth = 0
    for i, c in enumerate(inner):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return (i, "||") if inner[i + 1 : i + 2] == "|" else (i, "|")
    return None


def _group_factors(group: str) -> list[tuple[str, ...]]:
    """``a`` -> [(a,)]; ``a:b`` -> [(a, b)]; ``a/b/c`` -> [(a,), (b, a), (c, b, a)]."""
    group = group.strip()
    if not group:
        raise FormulaError("a random-effects term has no grouping factor after '|'")
    nest = [p.strip() for p in group.split("/")]
    if any(not p for p in nest):
        raise FormulaError(f"malformed nesting in grouping factor {group!r}")
    out = []
    for k in range(len(nest)):
        # lme4 names the k-th level of a/b/c as "c:b:a" (innermost first)
        facs: list[str] = []
        for part in reversed(nest[: k + 1]):
            facs.extend(f.strip() for f in part.split(":"))
        out.append(tuple(facs))
    for facs in out:
        for f in facs:
            if not re.fullmatch(r"[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`", f):
                raise FormulaError(
                    f"grouping factor {f!r} in {group!r} must be a column name "
                    "(use a:b for an interaction, a/b for nesting)"
                )
    return [tuple(f.strip("`") for f in facs) for facs in out]


def _lhs_terms(lhs: str) -> tuple[bool, list[str]]:
    """Intercept flag and the non-intercept terms of a random-effects lhs."""
    try:
        terms = list(Formula(lhs))
    except Exception as exc:  # formulaic's parse errors are not friendly
        raise FormulaError(f"cannot parse random-effects expression {lhs!r}: {exc}") from None
    has_icpt = any(str(t) == "1" for t in terms)
    return has_icpt, [str(t) for t in terms if str(t) != "1"]


def _expand_bar(lhs: str, bar: str, group: str, structure: str) -> list[RandomTerm]:
    lhs = lhs.strip()
    if not lhs:
        raise FormulaError(f"random-effects term ( | {group}) has nothing before the bar")
    terms: list[RandomTerm] = []
    for facs in _group_factors(group):
        if bar == "||":
            # lme4::expandDoubleVerts: one scalar-or-block term per formula term
            has_icpt, rest = _lhs_terms(lhs)
            if has_icpt:
                terms.append(RandomTerm("1", facs, "us"))
            terms.extend(RandomTerm(f"0 + {t}", facs, "us") for t in rest)
        else:
            terms.append(RandomTerm(lhs, facs, structure))
    return terms


def parse_formula(formula: str, keywords: tuple[str, ...] = ()) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part and random terms; ``keywords``:
    extra structure keywords (user-defined structures) besides the built-in ones."""
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string like 'y ~ x + (1 | g)', got {type(formula).__name__}")
    if formula.count("~") != 1:
        raise FormulaError(f"formula must contain exactly one '~': {formula!r}")
    _check_parens(formula)
    text = _quote_dotted(_r_power(formula))
    response, rhs = (s.strip() for s in text.split("~"))
    rhs = rhs.strip()
    random: list[RandomTerm] = []
    # walk the rhs: extract (…|…) groups and keyword(…|…) groups at depth 0
    i, buf = 0, []
    while i < len(rhs):
        c = rhs[i]
        m = re.match(r"(%s)\s*\(" % "|".join(map(re.escape, sorted(set(STRUCTURE_KEYWORDS) | set(keywords),
                                                                   key=len, reverse=True))), rhs[i:])
        at_word_start = i == 0 or not (rhs[i - 1].isalnum() or rhs[i - 1] in "._")
        if c == "(" or (m and at_word_start):
            open_at = i if c == "(" else i + m.end() - 1
            close = _matching_paren(rhs, open_at)
            inner = rhs[open_at + 1 : close]
            bar = _find_bar(inner)
            if bar is not None:
                word = re.search(r"([A-Za-z_][\w.]*)\s*$", "".join(buf)) if c == "(" else None
                if word:
                    raise NotImplementedError(
                        f"unknown covariance structure {word.group(1)}(...) in {formula!r}: built-in keywords are "
                        f"{', '.join(STRUCTURE_KEYWORDS)}; for your own pass structures={{{word.group(1)!r}: ...}}")
                pos, kind = bar
                structure = "us" if c == "(" else m.group(1)
                if kind == "||" and structure != "us":
                    raise FormulaError(f"use either '||' or {structure}(...), not both: {rhs[i:close + 1]!r}")
                random.extend(
                    _expand_bar(inner[:pos], kind, inner[pos + len(kind):], structure)
                )
                i = close + 1
                continue
            buf.append(rhs[i : close + 1])
            i = close + 1
            continue
        buf.append(c)
        i += 1
    fixed = "".join(buf)
    # tidy the "+" left behind by removed bar terms
    pieces = [p.strip() for p in _split_top(fixed, "+")]
    offsets = tuple(m.group(1).strip() for m in (re.fullmatch(r"offset\s*\((.*)\)", p, re.S) for p in pieces) if m)
    if any(not o for o in offsets):
        raise FormulaError(f"offset() needs an expression, e.g. offset(log(exposure)): {formula!r}")
    pieces = [p for p in pieces if not re.fullmatch(r"offset\s*\((.*)\)", p, re.S)]
    if re.search(r"(?<![\w.])offset\s*\(", " + ".join(pieces)):
        raise FormulaError(f"offset(...) must be a term of its own (added with +): {formula!r}")
    fixed = " + ".join(p for p in pieces if p)
    fixed = re.sub(r"\s*\+\s*-\s*", " - ", fixed)
    if not fixed:
        fixed = "1"
    if not response:
        response = ""
    return ParsedFormula(response=response, fixed=fixed, random=tuple(random), text=formula, offset=offsets)
