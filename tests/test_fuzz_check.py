"""No input crashes the checker: whatever the file holds, `flowc check` answers with findings
(exit 1) or none (exit 0), never a traceback (exit 3 is kept for flowc's own bugs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source

ROOT = Path(__file__).resolve().parent.parent
PROJECT = Project.load(ROOT / "flowc.yaml")
EXAMPLES = [p.read_text() for p in sorted((ROOT / "pipelines").glob("*.yaml"))]
STEP = ("name: t\nsteps:\n  - id: a\n    type: llm\n    model: gpt-4o\n    prompt: hi\n"
        "{extra}output: ${{a}}\n")

# The reproducers that crashed the checker, one per line of the report that found them.
CRASHERS = {
    "a key that is a YAML value tag": "=: 1\n",
    "an empty !!int": STEP.format(extra="    timeout: !!int\n"),
    "a !!int that is not a number": "name: !!int h\nsteps: []\n",
    "a !!binary key": "!!binary i: 1\n",
    "a !!bool key that is not a boolean": "!!bool name: x\nsteps: []\n",
    "a !!timestamp key that is not a date": "!!timestamp name: x\nsteps: []\n",
    "an enum that is not a list": STEP.format(
        extra="    response_format:\n      schema: {type: object, properties: "
              "{l: {type: string, enum: 5}}}\n"),
    "a recursive alias": "name: &a [*a]\nsteps: []\n",
    "1,000 nested parentheses in Jinja": STEP.replace(
        "prompt: hi", 'prompt: "{{ ' + "(" * 1000 + "1" + ")" * 1000 + ' }}"').format(
        extra=""),
    "a 5,000-digit integer in when:": STEP.format(extra="    when: 1 > " + "9" * 5000 + "\n"),
    "a UTF-8 byte order mark": "\ufeff" + STEP.format(extra=""),
    "a NUL byte": STEP.format(extra="    system: \"a\x00b\"\n"),
    "a tab for indentation": STEP.format(extra="\ttimeout: 3\n"),
    "a set": STEP.format(extra="    stop: !!set {a, b}\n"),
    "a timestamp": STEP.format(extra="    timeout: 2024-01-01\n"),
    "a float key": "1.5: x\nname: t\nsteps: []\n",
    "a null key": "~: x\nname: t\nsteps: []\n",
    "a list key": "? [a, b]\n: x\nname: t\nsteps: []\n",
    "a huge float": STEP.format(extra="    temperature: 1e999\n"),
    "a step that is a string": "name: t\nsteps: [hello]\n",
    "steps as a mapping": "name: t\nsteps: {a: 1}\n",
    "an empty file": "",
    "a document stream": "name: a\nsteps: []\n---\nname: b\n",
}


def assert_checks(text: str) -> None:
    result = compile_source(text, "fuzz.yaml", PROJECT)
    lines = max(1, text.count("\n") + 1)
    for d in result.diagnostics:
        assert d.rule and d.message
        assert 1 <= d.line <= lines and d.col >= 1, d


@pytest.mark.parametrize("text", CRASHERS.values(), ids=CRASHERS.keys())
def test_inputs_that_crashed_the_checker_are_findings(text):
    assert_checks(text)


TOKENS = [":", ": ", "- ", "-", "&a ", "*a", "<<: *a", "!!int ", "!!binary ", "!!str ",
          "!!float ", "!!bool ", "!!set ", "!!timestamp ", "!!null ", "!!python/name:x ",
          "{", "}", "[", "]", "${", "}", "{{", "}}", "{%", "%}", "??", "\t", "\x00", "\n",
          "\n  ", "=", "==", "'", '"', "#", "|", ">", "?", "\ufeff", "\u2028", "9" * 30,
          "when: ", "type: ", "id: ", "on_missing: skip", "output: "]


@st.composite
def mutated_examples(draw: st.DrawFn) -> str:
    """An example pipeline with a few tokens inserted, characters deleted or replaced."""
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        if kind == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)):]
        else:
            text = text[:pos] + draw(st.text(max_size=3)) + text[pos + 1:]
    return text


@given(mutated_examples())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_pipelines_never_crash_the_checker(text):
    assert_checks(text)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["${a}", "${input.x}", "{{ x }}",
                                                           "${a ?? b}", "llm", "mcp_tool"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
FIELDS = ["id", "type", "model", "prompt", "system", "when", "output", "needs", "timeout",
          "retries", "on_error", "on_missing", "response_format", "server", "tool", "params",
          "tools", "temperature", "max_tokens"]


@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
       st.dictionaries(st.text(max_size=8), values, max_size=3), values)
@settings(max_examples=300, deadline=None)
def test_any_values_in_step_fields_never_crash_the_checker(step, inputs, output):
    import yaml

    doc = {"name": "t", "inputs": inputs, "steps": [step], "output": output}
    assert_checks(yaml.safe_dump(doc, allow_unicode=True))
