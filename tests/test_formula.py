"""lme4 formula parsing: bars, ||, nesting, interactions, structure keywords."""
import pytest

from lmmjax.formula import FormulaError, RandomTerm, parse_formula


def terms(f):
    return [(t.lhs, t.factors, t.structure) for t in parse_formula(f).random]


def test_simple_and_fixed_part():
    pf = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert pf.response == "Reaction" and pf.fixed == "Days"
    assert terms("y ~ x + (Days | Subject)") == [("Days", ("Subject",), "us")]


def test_intercept_only_fixed_part():
    assert parse_formula("y ~ (1 | g)").fixed == "1"
    assert parse_formula("y ~ 0 + x + (1 | g)").fixed == "0 + x"
    assert parse_formula("y ~ x - 1 + (1 | g)").fixed == "x - 1"


def test_double_bar_expands_per_term():
    assert terms("y ~ x + (x || g)") == [("1", ("g",), "us"), ("0 + x", ("g",), "us")]
    assert terms("y ~ (0 + x + z || g)") == [("0 + x", ("g",), "us"), ("0 + z", ("g",), "us")]


def test_nesting_and_interaction_names():
    assert terms("y ~ 1 + (1 | a/b)") == [("1", ("a",), "us"), ("1", ("b", "a"), "us")]
    assert [t.group_name for t in parse_formula("y ~ (1 | a/b/c)").random] == ["a", "b:a", "c:b:a"]
    assert terms("y ~ (1 | a:b)") == [("1", ("a", "b"), "us")]


def test_several_terms_and_structures():
    got = terms("y ~ x + (1 | g) + diag(1 + x | h) + (0 + x | g)")
    assert got == [("1", ("g",), "us"), ("1 + x", ("h",), "diag"), ("0 + x", ("g",), "us")]


def test_parenthesised_fixed_terms_survive():
    pf = parse_formula("y ~ I(x**2) + np.log(z) + (1 | g)")
    assert pf.fixed == "I(x**2) + np.log(z)"


@pytest.mark.parametrize("bad", ["y x + (1|g)", "y ~ x ~ z", "y ~ (1 | )", "y ~ ( | g)", "y ~ (1 | g"])
def test_malformed(bad):
    with pytest.raises(FormulaError):
        parse_formula(bad)


def test_str_roundtrip():
    assert str(RandomTerm("1 + x", ("g",), "diag")) == "diag(1 + x | g)"
