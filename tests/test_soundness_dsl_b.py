"""The compiler's promise (tests/test_soundness.py) for for_each, sub-pipelines and repeat:
a pipeline `flowc check` passes runs without an undefined reference, an unhandled missing
value or a traceback, whatever its models answer.

Hypothesis takes the base property's pipelines and adds: a step answering a list (valid,
empty or not JSON); a map over that list or a list input (per-item `when:` on an optional
field, `on_error`, `retries`, structured or text body), a step reading the map's result
(an item with and without a `??` fallback, the whole list, a Jinja loop); a sub-pipeline
call, mapped or not, with inputs of any type; a repeated step (schema, `until:` over its
answer, `${self.previous}`/`${self.error}` with and without fallbacks). Pipelines the
checker passes run as a dry run (which must succeed) and against a loopback OpenAI server
whose answers are valid, minimal or violating per step. A run may fail only as declared: a
model's answer that breaks its step's schema, or a repeat that ran out of attempts.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from tests.fakes import openai_text
from tests.test_soundness import CONFIG, FIELD_TYPES, MODES, _run, answer, pipelines, upstream

__all__ = ["upstream"]  # the loopback server fixture, shared with tests/test_soundness.py

DECLARED = re.compile(r"did not answer with JSON|answered JSON that does not match|"
                      r"no acceptable answer in \d+ attempts?")
LIST_STEP, MAP_STEP, READER, CALL, REPAIR, CALLEE_STEP = (
    "s90", "s91", "s92", "s93", "s94", "s95")
CALLEE = {"name": "callee", "inputs": {"q": {"type": "string"}},
          "steps": [{"id": CALLEE_STEP, "type": "llm", "model": "m",
                     "prompt": f"[{CALLEE_STEP}] ${{input.q}}",
                     "response_format": {"schema": {
                         "type": "object", "properties": {"text": {"type": "string"},
                                                          "count": {"type": "integer"}},
                         "required": ["text"]}}}],
          "output": {"text": f"${{{CALLEE_STEP}.text}}", "count": f"${{{CALLEE_STEP}.count ?? 0}}"}}
ITEM_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"},
                                                "count": {"type": "integer"}},
               "required": ["text"]}


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "callee.yaml").write_text(yaml.safe_dump(CALLEE, sort_keys=False))
        yield Path(tmp)


@st.composite
def dsl_pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    doc, modes, given_inputs = draw(pipelines())
    steps: list[dict[str, Any]] = doc["steps"]
    inputs = doc.setdefault("inputs", {})
    names = [s["id"] for s in steps]  # earlier outputs a new step may read

    def earlier() -> str:
        return draw(st.sampled_from([*names, *(f"input.{n}" for n in inputs)]))

    # A step answering a list, and a list input.
    steps.append({"id": LIST_STEP, "type": "llm", "model": "m", "prompt": f"[{LIST_STEP}]",
                  "response_format": {"schema": {
                      "type": "object", "required": ["items"],
                      "properties": {"items": {"type": "array", "items": ITEM_SCHEMA}}}}})
    modes[LIST_STEP] = draw(st.sampled_from(MODES))
    inputs["docs"] = {"type": "array"}
    given_inputs["docs"] = draw(st.lists(st.sampled_from(["a", "b", ""]), max_size=3))
    names.append(LIST_STEP)

    # A map.
    typed = draw(st.booleans())
    body: dict[str, Any] = {
        "id": MAP_STEP, "type": "llm", "model": "m", "as": "it",
        "for_each": f"${{{LIST_STEP}.items}}" if typed else "${input.docs}",
        "max_concurrency": draw(st.integers(1, 4)),
        "prompt": f"[{MAP_STEP}] " + ("${it.text} ${it.count ?? 0}" if typed else "${it}")
        + (f" ${{{earlier()}}}" if draw(st.booleans()) else "")}
    if draw(st.booleans()):
        body["when"] = draw(st.sampled_from(
            ["${it.count} > 1", "${it.count ?? 0} > 1", '${it.text} != "b"'] if typed
            else ['${it} != "b"', "length(${it}) > 0"]))
    if draw(st.booleans()):
        body["on_error"] = "continue"
    if draw(st.integers(0, 3)) == 0:
        body["retries"] = 1
    structured = draw(st.booleans())
    if structured:
        body["response_format"] = {"schema": {
            "type": "object", "properties": {"label": FIELD_TYPES["label"]},
            "required": ["label"]}}
    steps.append(body)
    modes[MAP_STEP] = draw(st.sampled_from(MODES))
    names.append(MAP_STEP)

    # A step reading the map's result.
    field = ".label" if structured and draw(st.booleans()) else ""
    read = draw(st.sampled_from([
        f"${{{MAP_STEP}[0]{field}}}", f"${{{MAP_STEP}[1]{field} ?? \"none\"}}",
        f"${{{MAP_STEP}}}", f"{{% for x in {MAP_STEP} if x %}}{{{{ x }}}} {{% endfor %}}"]))
    steps.append({"id": READER, "type": "llm", "model": "m", "prompt": f"[{READER}] {read}"})
    modes[READER] = draw(st.sampled_from(MODES))

    # A sub-pipeline call, mapped or not.
    call: dict[str, Any] = {"id": CALL, "type": "pipeline", "pipeline": "./callee.yaml"}
    if draw(st.booleans()):
        call.update({"for_each": "${input.docs}", "as": "d", "inputs": {"q": "${d}"}})
    else:
        call["inputs"] = {"q": draw(st.sampled_from(
            [f"${{{earlier()}}}", "plain text", 3, f"${{{earlier()} ?? \"x\"}}"]))}
    if draw(st.booleans()):
        call["on_error"] = "continue"
    steps.append(call)
    modes[CALLEE_STEP] = draw(st.sampled_from(MODES))

    # A repeated step.
    repair: dict[str, Any] = {
        "id": REPAIR, "type": "llm", "model": "m", "repeat": {"max": draw(st.integers(1, 3))},
        "prompt": f"[{REPAIR}] " + draw(st.sampled_from(
            ['${self.previous ?? ""} ${self.error ?? ""}', "${self.attempt}",
             "${self.previous}", "${self.error}"]))}
    if draw(st.booleans()):
        repair["response_format"] = {"schema": {
            "type": "object", "properties": {"count": FIELD_TYPES["count"],
                                             "flag": FIELD_TYPES["flag"]},
            "required": ["count"]}}
        if draw(st.booleans()):
            repair["repeat"]["until"] = draw(st.sampled_from(
                ["${self.output.count} > 1", "${self.output.flag ?? false} == true",
                 "${self.output.flag} == true"]))
    elif draw(st.booleans()):
        repair["repeat"]["until"] = '${self.output} != ""'
    steps.append(repair)
    modes[REPAIR] = draw(st.sampled_from(MODES))

    outputs = [MAP_STEP, READER, CALL, REPAIR]
    doc["output"] = {"base": doc["output"], **{o: f"${{{o}}}" for o in outputs}}
    return doc, modes, given_inputs


def answer_b(modes: dict[str, str]) -> Any:
    """The base property's answers, plus the list step's (valid: two items, the second
    without its optional count; minimal: none; violating: not JSON)."""
    base = answer(modes)

    def act(rec: Any) -> Any:
        if rec.body["messages"][-1]["content"].startswith(f"[{LIST_STEP}]"):
            mode = modes[LIST_STEP]
            if mode == "violating":
                return openai_text("a list, maybe")(rec)
            items = [{"text": "a", "count": 2}, {"text": "b"}] if mode == "valid" else []
            return openai_text(json.dumps({"items": items}))(rec)
        return base(rec)
    return act


def _broken_promises(result: Any) -> list[str]:
    out = []
    for sid, r in result.steps.items():
        if r.status == "failed" and not DECLARED.search(r.error or ""):
            out.append(f"{sid}: {r.error}")
        for item in r.items or ():  # items failed under on_error: continue
            if item["status"] == "failed" and not DECLARED.search(item.get("error") or ""):
                out.append(f"{sid}[{item['index']}]: {item.get('error')}")
    return out


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=dsl_pipelines())
def test_a_dsl_b_pipeline_that_passes_check_runs_as_it_promised(case, upstream, folder):
    doc, modes, inputs = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, str(folder / "generated.yaml"),
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None and not any(
        d.severity == "error" for d in result.diagnostics))
    dry = _run(result.compiled, inputs, None)
    assert dry.status == "succeeded", (text, dry.error, _broken_promises(dry))
    upstream.script.clear()
    upstream.then(*[answer_b(modes)] * 200)
    real = _run(result.compiled, inputs, upstream)
    event(f"run {real.status}")
    assert not _broken_promises(real), (text, modes, _broken_promises(real))
    if real.status == "succeeded":
        assert set(real.output) == {"base", MAP_STEP, READER, CALL, REPAIR}, text
