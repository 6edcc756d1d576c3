"""Typed lists and objects in `inputs:`: the compiler types elements and fields from the
input's JSON Schema, and a run refuses values that break it before anything runs."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from runtime.inputs import InputError, check_inputs
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
      required: [title]
  user:
    type: object
    properties:
      name: {type: string}
      tier: {type: string, enum: [free, pro]}
    required: [name, tier]
steps:
  - id: digest
    type: llm
    model: m
    when: ${input.user.tier} == "pro"
    prompt: >-
      Digest ${input.docs[0].title ?? "nothing"} (${input.docs[0].words ?? 0} words)
      for ${input.user.name}
output: ${digest ?? "free tier"}
"""


def compiled(text: str = PIPELINE):
    result = compile_source(text, "digest.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assert result.ok, result.diagnostics
    return result.compiled


def test_elements_and_fields_are_typed_from_the_input_on():
    bad = PIPELINE.replace("${input.docs[0].title", "${input.docs[0].titel").replace(
        '"pro"', '"gold"')
    result = compile_source(bad, "digest.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    found = {(d.rule, d.message) for d in result.diagnostics}
    assert ("unknown-field-path", "'input.docs[0]' has no field 'titel'; did you mean "
            "'title'?") in found
    assert any(rule == "not-in-enum" and '"gold"' in msg for rule, msg in found)


def test_a_field_the_input_does_not_require_needs_a_fallback():
    bad = PIPELINE.replace("${input.docs[0].words ?? 0}", "${input.docs[0].words}").replace(
        "    type: array\n", "    type: array\n    min_items: 1\n")  # docs[0] is there
    result = compile_source(bad, "digest.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assert [d.rule for d in result.errors] == ["maybe-skipped"]
    assert "field 'words' of input 'docs' may be left out" in result.errors[0].message
    bad = PIPELINE.replace("for ${input.user.name}", "for ${input.user.nickname}").replace(
        "      name: {type: string}\n",
        "      name: {type: string}\n      nickname: {type: string}\n")
    result = compile_source(bad, "digest.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assert [d.message.split(": ", 1)[1] for d in result.errors] == [
        "field 'nickname' of input 'user' may be left out (its `required:` does not list it, "
        "or its schema allows null)"]


def test_a_run_refuses_values_that_break_the_inputs_schema():
    specs = compiled().inputs
    with pytest.raises(InputError) as err:
        check_inputs(specs, {"docs": [{"title": "a"}, {"words": "many"}],
                             "user": {"name": "Ann", "tier": "gold"}})
    assert err.value.problems == [
        "input 'docs[1]': 'title' is a required property",
        "input 'docs[1].words': 'many' is not of type 'integer'",
        "input 'user.tier': 'gold' is not one of ['free', 'pro']",
    ]


def test_a_run_with_typed_inputs_reads_elements_and_fields():
    result = _run(compiled(), {"docs": [{"title": "Q3 report", "words": 900}],
                               "user": {"name": "Ann", "tier": "pro"}}, None)
    assert result.status == "succeeded"
    result = _run(compiled(), {"docs": [{"title": "Q3"}], "user": {"name": "Bo",
                                                                    "tier": "free"}}, None)
    assert result.output == "free tier"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(docs=json_values, user=json_values)
def test_any_value_is_either_refused_with_a_message_or_fits_every_typed_read(docs, user):
    """Whatever a caller sends, check_inputs names each problem, or the value has every
    field and element type the compiler assumed."""
    try:
        values = check_inputs(compiled().inputs, {"docs": docs, "user": user})
    except InputError as exc:
        assert exc.problems and all(p.startswith("input '") for p in exc.problems)
        return
    assert all(isinstance(d["title"], str) for d in values["docs"])
    assert all(isinstance(d.get("words", 0), int) for d in values["docs"])
    assert isinstance(values["user"]["name"], str)
    assert values["user"]["tier"] in ("free", "pro")


def test_typed_inputs_are_in_the_json_schema():
    from click.testing import CliRunner

    from flowc.cli import cli

    out = CliRunner().invoke(cli, ["schema"]).output
    spec = yaml.safe_load(out)["$defs"]["InputSpec"]["properties"]
    assert {"items", "properties", "enum", "required"} <= set(spec)
