"""The expression language: parsing, positions, evaluation, and Hypothesis properties."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc.expr import MISSING as M
from flowc.expr import (
    BoolOp,
    Compare,
    EvalError,
    ExprSyntaxError,
    Literal,
    Missing,
    Path,
    Ref,
    evaluate,
    parse_condition,
    parse_reference,
    scan_template,
)


def scope_of(values):
    return lambda name: values.get(name, M)


def test_condition_from_the_issue_parses_with_positions():
    text = '${input.depth} > 2 and ${classify.label} == "technical"'
    node = parse_condition(text)
    assert isinstance(node, BoolOp) and node.op == "and"
    left, right = node.left, node.right
    assert isinstance(left, Compare) and left.op == ">"
    assert left.left == Ref((Path("input", ("depth",)),))
    assert text[slice(*left.left.span)] == "${input.depth}"
    assert text[slice(*right.left.span)] == "${classify.label}"


def test_reference_paths_and_coalesce():
    ref = parse_reference('results[0].url ?? fallback["key"] ?? "none"')
    assert ref.alts == (Path("results", (0, "url")), Path("fallback", ("key",)), Literal("none"))


@pytest.mark.parametrize(("text", "offset", "message"), [
    ("${a} = 1", 5, "unexpected character '='; use '==' to compare"),
    ("${a} => 1", 5, "unexpected character '='; did you mean '>='?"),
    ("${a} =< 1", 5, "unexpected character '='; did you mean '<='?"),
    ("${a} > " + "9" * 5000, 7, "number literal is too long (5000 characters; at most 100)"),
    ("${a} && ${b}", 5, "unexpected character '&'; use 'and', 'or', 'not'"),
    ("${a} >", 6, "unexpected end of expression"),
    ("(${a} > 1", 9, "unexpected end of expression"),
    ("", 0, "empty condition"),
])
def test_syntax_errors_name_the_column(text, offset, message):
    with pytest.raises(ExprSyntaxError) as exc:
        parse_condition(text)
    assert exc.value.offset == offset
    assert exc.value.message.startswith(message)


@pytest.mark.parametrize(("text", "values", "expected"), [
    ("${input.depth} > 2", {"input": {"depth": 3}}, True),
    ("${input.depth} > 2", {"input": {"depth": 2}}, False),
    ('${c.label} == "technical" and not ${c.flag}', {"c": {"label": "technical", "flag": False}},
     True),
    ('"b" in ${xs}', {"xs": ["a", "b"]}, True),
    ('"z" not in ${xs}', {"xs": ["a", "b"]}, True),
    ("length(${s}) >= 3", {"s": "abcd"}, True),
    ('startswith(lower(${s}), "ab")', {"s": "ABc"}, True),
    ("${missing ?? 5} == 5", {}, True),
    ("${r[1].v ?? 0} == 0", {"r": [{"v": 1}]}, True),
    ("${r[0].v} == 1", {"r": [{"v": 1}]}, True),
    ("true == 1", {}, False),  # booleans are not numbers, as in JSON
    ("1 == 1.0", {}, True),
])
def test_evaluate(text, values, expected):
    assert evaluate(parse_condition(text), scope_of(values)) is expected


def test_missing_value_without_fallback_raises_missing():
    with pytest.raises(Missing):
        evaluate(parse_condition("${gone} == 1"), scope_of({}))


def test_ordering_mismatched_types_is_an_eval_error_not_a_python_error():
    with pytest.raises(EvalError, match="cannot order integer and string"):
        evaluate(parse_condition('${n} > "2"'), scope_of({"n": 3}))


def test_no_python_eval():
    # Text that would do something under eval() is only ever a syntax error here.
    for text in ["__import__('os').system('true')", "${a}.__class__", "().__class__"]:
        with pytest.raises(ExprSyntaxError):
            parse_condition(text)


def test_template_scanning_handles_escapes_and_braces_in_strings():
    parts = list(scan_template('a $${literal} ${x ?? "}"} ${y}'))
    assert [p.ref for p in parts] == [
        Ref((Path("x"), Literal("}"))), Ref((Path("y"),))]


# -- properties --------------------------------------------------------------------------------
names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in {"and", "or", "not", "in", "true", "false", "null"})
literals = st.one_of(
    st.integers(-1000, 1000), st.booleans(), st.none(),
    st.text(st.characters(codec="utf-8", exclude_characters='"\\'), max_size=8))


def lit_src(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    return str(v)


paths = st.builds(lambda r, segs: (r, tuple(segs)), names,
                  st.lists(st.one_of(names, st.integers(0, 9)), max_size=3))


def path_src(p):
    root, segs = p
    return root + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in segs)


@st.composite
def exprs(draw, depth=3):
    """(source, ast) pairs for random well-formed conditions."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.booleans()):
            v = draw(literals)
            return lit_src(v), Literal(v)
        alts = draw(st.lists(paths, min_size=1, max_size=3))
        src = "${" + " ?? ".join(path_src(p) for p in alts) + "}"
        return src, Ref(tuple(Path(r, s) for r, s in alts))
    kind = draw(st.sampled_from(["and", "or", "not", "cmp"]))
    a_src, a = draw(exprs(depth - 1))
    if kind == "not":
        from flowc.expr import Not
        return f"not ({a_src})", Not(a)
    b_src, b = draw(exprs(depth - 1))
    if kind == "cmp":
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in"]))
        return f"({a_src}) {op} ({b_src})", Compare(op, a, b)
    return f"({a_src}) {kind} ({b_src})", BoolOp(kind, a, b)


@given(exprs())
@settings(max_examples=300, deadline=None)
def test_parse_recovers_the_generated_ast(pair):
    src, ast = pair
    assert parse_condition(src) == ast


@given(st.text(max_size=60))
@settings(max_examples=500, deadline=None)
def test_parse_condition_never_fails_with_anything_but_a_syntax_error(text):
    try:
        node = parse_condition(text)
    except ExprSyntaxError as exc:
        assert 0 <= exc.offset <= len(text)
    else:
        assert node is not None


@given(exprs(), st.dictionaries(names, st.one_of(literals, st.lists(literals, max_size=3),
                                                 st.dictionaries(names, literals, max_size=3))))
@settings(max_examples=300, deadline=None)
def test_evaluate_fails_only_with_its_own_errors(pair, values):
    _, ast = pair
    with contextlib.suppress(EvalError, Missing):
        evaluate(ast, scope_of(values))
