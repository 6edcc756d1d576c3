"""The compiler's promise for typed inputs, transforms and switches: a pipeline `flowc
check` passes runs without an undefined reference, an unhandled missing value, a transform
that cannot be evaluated or a traceback, whatever its models answer and whatever values its
typed inputs get within their schema.

Hypothesis writes pipelines: a typed list input (elements with a required and an optional
field) and an enum input; a structured classifier; switches on its enum field or the enum
input, with cases covering some or all values and maybe a default, case steps with and
without their own conditions; transforms (mappings of expressions and templates) over the
input, the classifier, the switches and the case steps, with and without `??` fallbacks;
and an output reading any of them. It keeps those the checker passes and runs each as a dry
run and against a loopback OpenAI server answering each step valid, minimal or violating
(tests/test_soundness.py's helpers).
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from tests.test_soundness import CONFIG, MODES, _broken_promises, _run, answer, upstream

__all__ = ["upstream"]  # the loopback server fixture, shared

LABELS = ["alpha", "beta", "gamma"]
DOCS = {"type": "array", "items": {"type": "object", "properties": {
    "title": {"type": "string"}, "words": {"type": "integer"}}, "required": ["title"]}}
# Expressions a transform may compute; {r} is a reference to something earlier (a string),
# and some read fields that may be missing, to be caught by the checker.
EXPRESSIONS = [
    'join(pluck(${input.docs}, "title"), ", ")',
    'sum(pluck(${input.docs}, "words"))',
    "len(${input.docs})",
    "max(pluck(${input.docs}, \"words\"))",
    "get(${input.docs}, 0)",
    "upper({r})",
    'replace({r}, "a", "b")',
    'split({r}, " ")',
    "to_json(${input.docs})",
    "default(get(${input.docs}, 1), \"none\")",
    '${input.tier} == "pro"',
]


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    modes: dict[str, str] = {}
    # Things one may reference. (An index is trusted, as a `when:` on the list's length
    # may guard it: `input.docs[0]` is read only with a fallback here.)
    names: list[str] = ["input.tier", 'input.docs[0].title ?? "none"']
    steps.append({"id": "s0", "type": "llm", "model": "m", "prompt": "[s0] classify",
                  "response_format": {"schema": {
                      "type": "object", "properties": {
                          "label": {"type": "string", "enum": LABELS},
                          "text": {"type": "string"}},
                      "required": ["label"] + (["text"] if draw(st.booleans()) else [])}}})
    modes["s0"] = draw(st.sampled_from(MODES))
    names += ["s0.label", "s0.text"]
    n = 1

    def ref() -> str:
        alts = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2))
        if draw(st.booleans()):
            alts.append('"x"')
        return "${" + " ?? ".join(alts) + "}"

    for k in range(draw(st.integers(0, 2))):
        on, values = draw(st.sampled_from([("${s0.label}", LABELS),
                                           ("${input.tier}", ["free", "pro"])]))
        labels = draw(st.lists(st.sampled_from(values), min_size=1, unique=True))
        cases: dict[str, Any] = {}
        for label in labels:
            ids = []
            for _ in range(draw(st.integers(1, 2))):
                sid = f"s{n}"
                n += 1
                step = {"id": sid, "type": "llm", "model": "m",
                        "prompt": f"[{sid}] " + (f"after ${{{ids[-1]}}}" if ids else "go")}
                if draw(st.integers(0, 4)) == 0:
                    step["when"] = '${s0.label} != "beta"'
                if draw(st.integers(0, 4)) == 0:
                    step["on_error"] = "continue"
                steps.append(step)
                modes[sid] = draw(st.sampled_from(MODES))
                ids.append(sid)
            cases[label] = ids if len(ids) > 1 else ids[0]
        switch: dict[str, Any] = {"id": f"w{k}", "type": "switch", "value": on, "cases": cases}
        if draw(st.booleans()):
            sid = f"s{n}"
            n += 1
            steps.append({"id": sid, "type": "llm", "model": "m", "prompt": f"[{sid}] else"})
            modes[sid] = draw(st.sampled_from(MODES))
            switch["default"] = sid
        steps.append(switch)
        names.append(f"w{k}")
        if draw(st.booleans()):  # a read of a case's step from outside its case
            names.append(draw(st.sampled_from([s for s in modes if s != "s0"])))
    for k in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            body: dict[str, Any] = {"expr": {
                f"f{j}": draw(st.sampled_from(EXPRESSIONS)).replace("{r}", ref())
                for j in range(draw(st.integers(1, 3)))}}
            fields = list(body["expr"])
        else:
            body = {"template": f"{ref()} and {{{{ input.docs | length }}}}"}
            fields = []
        steps.append({"id": f"t{k}", "type": "transform", **body})
        names.append(f"t{k}")
        names.extend(f"t{k}.{f}" for f in fields)
    output = {f"o{j}": ref() for j in range(draw(st.integers(1, 3)))}
    docs = draw(st.lists(st.fixed_dictionaries(
        {"title": st.sampled_from(["a b", "ab", ""])},
        optional={"words": st.integers(0, 50)}), max_size=3))
    doc = {"name": "generated", "inputs": {
        "docs": DOCS, "tier": {"type": "string", "enum": ["free", "pro"]}},
        "steps": steps, "output": output}
    return doc, modes, {"docs": docs, "tier": draw(st.sampled_from(["free", "pro"]))}


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=pipelines())
def test_a_pipeline_with_switches_and_transforms_that_passes_check_runs_as_promised(
        case, upstream):
    doc, modes, inputs = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, "generated.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None)
    dry = _run(result.compiled, inputs, None)
    assert dry.status == "succeeded", (text, dry.error, _broken_promises(dry))
    upstream.script.clear()
    upstream.then(*[answer(modes)] * 40)
    real = _run(result.compiled, inputs, upstream)
    event(f"run {real.status}, {sum(s['type'] == 'switch' for s in doc['steps'])} switches")
    assert not _broken_promises(real), (text, modes, _broken_promises(real))
    if real.status == "failed":
        assert any(modes.get(sid) == "violating" for sid, r in real.steps.items()
                   if r.status == "failed"), (text, modes, real.error)
    else:
        assert all(v is not None for v in real.output.values()), (text, real.output)


PIECES = ["Hello ", "${input.q}", "${input.nope}", "${s0.label}", "{{ input.q }}",
          "{% if input.q %}yes{% endif %}", "{% if %}", "${", "\n", "{{ s0.text }}",
          "${s0.text ?? \"none\"}", "{{ s0.label | upper }}"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6),
       system=st.booleans())
def test_a_prompt_file_checks_and_runs_as_the_same_prompt_inline(pieces, system, tmp_path):
    """A prompt moved into a file is checked to the same findings (each at the file's own
    line) and, when it passes, renders to the same request."""
    import json as _json

    from flowc.compiler import compile_file

    text = "".join(pieces)
    field = "system" if system else "prompt"
    doc = {"name": "p", "inputs": {"q": {"type": "string"}},
           "steps": [{"id": "s0", "type": "llm", "model": "m", "prompt": "[s0] go",
                      "response_format": {"schema": {"type": "object", "properties": {
                          "label": {"type": "string"}, "text": {"type": "string"}},
                          "required": ["label", "text"]}}},
                     {"id": "s1", "type": "llm", "model": "m", "prompt": "[s1] go"}],
           "output": "${s1}"}
    case = tmp_path / str(abs(hash((text, system))))
    (case / "prompts").mkdir(parents=True)
    (case / "prompts" / "t.md.j2").write_text(text)
    inline = case / "inline.yaml"
    inline.write_text(yaml.safe_dump({**doc, "steps": [doc["steps"][0], {
        **doc["steps"][1], field: text}]}))
    filed = case / "filed.yaml"
    filed.write_text(yaml.safe_dump({**doc, "steps": [doc["steps"][0], {
        **doc["steps"][1], field: {"file": "prompts/t.md.j2"}}]}))
    project = Project(config=ProjectConfig.model_validate(CONFIG))
    a, b = compile_file(inline, project), compile_file(filed, project)
    assert [(d.rule, d.message) for d in a.diagnostics] == \
        [(d.rule, d.message) for d in b.diagnostics]
    assert all(d.path.endswith("t.md.j2") for d in b.diagnostics if d.rule not in (
        "unused-step", "unused-output"))
    if a.compiled is None:
        return
    ra = _run(a.compiled, {"q": "why"}, None)
    rb = _run(b.compiled, {"q": "why"}, None)
    assert (ra.status, _json.dumps(ra.output)) == (rb.status, _json.dumps(rb.output))
