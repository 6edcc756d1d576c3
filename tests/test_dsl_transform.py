"""`type: transform`: values computed from references with the expression language's pure
functions or a sandboxed template, no model call, typed by the compiler."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from flowc.expr import FUNCTIONS, EvalError, Literal, evaluate, parse_condition
from tests.test_soundness import CONFIG, _run

PIPELINE = """
name: digest
inputs:
  docs:
    type: array
    items:
      type: object
      properties:
        title: {type: string}
        words: {type: integer}
      required: [title, words]
steps:
  - id: stats
    type: transform
    expr:
      titles: join(pluck(${input.docs}, "title"), ", ")
      total: sum(pluck(${input.docs}, "words"))
      longest: max(pluck(${input.docs}, "words"))
      first: get(${input.docs}, 0)
      tags: split(lower(" A,B ,c"), ",")
  - id: headline
    type: transform
    expr: upper(replace(${stats.titles}, ", ", " / "))
  - id: listing
    type: transform
    template: "{% for d in input.docs %}- {{ d.title }} ({{ d.words }})\\n{% endfor %}"
  - id: summarize
    type: llm
    model: m
    when: ${stats.total} > 100
    prompt: "Summarize:\\n${listing}"
output:
  headline: ${headline}
  total: ${stats.total}
  longest: ${stats.longest ?? 0}
  first: ${stats.first.title ?? "none"}
  tags: ${stats.tags}
  summary: ${summarize ?? "too short to summarize"}
"""


def compile_text(text: str):
    return compile_source(text, "digest.yaml",
                          Project(config=ProjectConfig.model_validate(CONFIG)))


def test_a_transform_is_typed_from_what_it_reads():
    result = compile_text(PIPELINE)
    assert result.ok, result.diagnostics
    types = {sid: str(result.compiled.node(sid).output_type) for sid in ("headline", "listing")}
    assert types == {"headline": "string", "listing": "string"}
    stats = result.compiled.node("stats").output_type
    assert {k: str(t) for k, t in stats.fields} == {
        "titles": "string", "total": "integer", "longest": "integer", "first": "object",
        "tags": "array of string"}
    assert stats.optional == {"first", "longest"}  # an absent index, an empty array


def test_reads_into_a_transform_are_checked_like_any_other():
    bad = PIPELINE.replace("${stats.total} > 100", '${stats.totl} > "100"')
    errors = [(d.rule, d.message) for d in compile_text(bad).errors]
    assert errors == [("unknown-field-path",
                       "'stats' has no field 'totl'; did you mean 'total'?")]
    bad = PIPELINE.replace("${stats.total} > 100", '${stats.total} > "100"')
    assert [d.rule for d in compile_text(bad).errors] == ["type-mismatch"]


def test_a_transform_with_for_each_is_a_list_of_its_body_like_a_model_step():
    """Run once per item, its result is the list of the items' results (the runtime gives a
    list): `${t[0].field}` is read with a fallback, like a mapped model step's item, and
    `${t.field}` is refused the same way."""
    text = """
name: mapped
inputs:
  items: {type: array, items: {type: string}}
steps:
  - {id: t, type: transform, for_each: "${input.items}", as: it, expr: {field: "${it}"}}
  - id: m
    type: llm
    model: m
    for_each: ${input.items}
    as: it
    prompt: ${it}
    response_format:
      schema: {type: object, properties: {field: {type: string}}, required: [field]}
  - {id: read, type: transform, template: "READ"}
output: ${read}
"""
    good = compile_text(text.replace("READ", "${t[0].field ?? ''} ${m[0].field ?? ''}"))
    assert good.ok, good.diagnostics
    assert str(good.compiled.node("t").output_type) == \
        str(good.compiled.node("m").output_type) == "array of object"
    bad = compile_text(text.replace("READ", "${t.field} ${m.field}"))
    assert [(d.rule, d.message) for d in bad.errors] == [
        ("unknown-field-path", "'t' is an array of object: it has no field 'field'"),
        ("unknown-field-path", "'m' is an array of object: it has no field 'field'")]


def test_a_value_that_may_be_one_of_two_kinds_is_refused_where_only_one_fits():
    # get() of an item or a string fallback: an object or a string. upper() of it would
    # fail at run time for the object, so the checker says so (found by the soundness test).
    text = PIPELINE.replace('upper(replace(${stats.titles}, ", ", " / "))',
                            'upper(default(get(${input.docs}, 1), "none"))')
    errors = [(d.rule, d.message) for d in compile_text(text).errors]
    assert errors == [("type-mismatch", 'upper() needs string, but default(get(${input.docs}, '
                       '1), "none") may be object')]
    # Passing it on as text is fine, and so is a fallback of the same kind.
    ok = PIPELINE.replace('upper(replace(${stats.titles}, ", ", " / "))',
                          'upper(to_json(default(get(${input.docs}, 1), "none")))')
    assert compile_text(ok).ok


def test_a_transform_runs_with_no_model_call():
    compiled = compile_text(PIPELINE).compiled
    docs = [{"title": "Q3 report", "words": 40}, {"title": "Roadmap", "words": 25}]
    result = _run(compiled, {"docs": docs}, None)
    assert result.status == "succeeded", result.error
    assert result.output == {"headline": "Q3 REPORT / ROADMAP", "total": 65, "longest": 40,
                             "first": "Q3 report", "tags": [" a", "b ", "c"],
                             "summary": "too short to summarize"}
    assert result.steps["stats"].model_calls == 0 and result.steps["stats"].cost == 0
    assert result.steps["summarize"].status == "skipped"
    empty = _run(compiled, {"docs": []}, None)
    assert (empty.output["first"], empty.output["longest"], empty.output["headline"]) == (
        "none", 0, "")


def test_a_transform_that_cannot_be_evaluated_fails_its_step_with_a_clear_message():
    text = PIPELINE.replace('expr: upper(replace(${stats.titles}, ", ", " / "))',
                            'expr: keys(default(from_json(${stats.titles}), "x"))')
    result = _run(compile_text(text).compiled, {"docs": [{"title": "t", "words": 1}]}, None)
    assert result.status == "failed"
    assert result.steps["headline"].error.startswith(
        "expression of step 'headline' could not be evaluated: from_json() could not parse")


def test_the_graph_draws_a_transform_with_its_type():
    from flowc.render import to_dot

    source = to_dot(compile_text(PIPELINE).compiled).source
    assert "[transform]" in source and "parallelogram" in source
    assert "→ string" in source


def test_the_json_schema_covers_transform_steps():
    from click.testing import CliRunner

    from flowc.cli import cli

    doc = json.loads(CliRunner().invoke(cli, ["schema"]).output)
    assert {"expr", "template"} <= set(doc["$defs"]["TransformStep"]["properties"])


def test_functions_compute_what_the_docs_say():
    def ev(text: str):
        return evaluate(parse_condition(text), lambda name: None)

    assert ev('join(split("a-b-c", "-"), "+")') == "a+b+c"
    assert ev('slice("abcdef", 1, 3)') == "bc" and ev("slice([1, 2, 3], 1)") == [2, 3]
    assert ev('get(from_json("{\\"a\\": [1, 2]}"), "a")') == [1, 2]
    assert ev('get(from_json("{}"), "a", "none")') == "none"
    assert ev('keys(merge(from_json("{\\"a\\": 1}"), from_json("{\\"b\\": 2}")))') == ["a", "b"]
    assert ev("sum([1, 2, 3])") == 6 and ev("min([3, 1])") == 1 and ev("round(2.6)") == 3
    assert ev("round(2.345, 2)") == 2.35 and ev('to_json([1, "a"])') == '[1, "a"]'
    assert ev('default("", "x")') == "x" and ev('len("abc")') == 3
    assert ev('index_of(["a", "b"], "b")') == 1 and ev('trim("  a ")') == "a"
    with pytest.raises(EvalError, match="more than 1,000,000 characters"):
        ev(f'replace("{"x" * 2000}", "x", "{"y" * 1000}")')


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), args=st.lists(values, max_size=3))
def test_a_function_given_any_values_answers_or_says_what_it_needed(name, args):
    """Values typed `any` are only known at run time: every function either answers or
    raises EvalError naming itself, never another exception."""
    fn = FUNCTIONS[name]
    node = parse_condition(f"{name}({', '.join(['x'] * len(args))})")
    node = type(node)(node.name, tuple(Literal(a) for a in args))  # type: ignore[attr-defined]
    try:
        evaluate(node, lambda n: None)
    except EvalError as exc:
        assert name in str(exc) or not fn.arity_ok(len(args)), str(exc)
