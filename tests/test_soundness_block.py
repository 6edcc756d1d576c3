"""The compiler's promise (tests/test_soundness.py) for `type: block`: a pipeline `flowc
check` passes runs without an undefined reference, an unhandled missing value or a
traceback, whatever its models answer.

Hypothesis takes two of the base property's pipelines: the first's steps stay at the top
level; the second's go inside a block (its inputs and `output:` too), whose steps also read
the first's outputs and fields (with and without `??`) and, mapped over a list input, the
item. The block may have `when:` on an earlier field, `on_error`, `retries`, a `repeat:`
until a field of its output holds, a single or a mapped `output:`; a step after it reads
its result (a field, an item's field with and without a fallback, the whole). Pipelines the
checker passes run as a dry run (which must succeed) and against a loopback OpenAI server
whose answers are valid, minimal or violating per step. A run may fail only as declared: a
model's answer that breaks its step's schema, or a repeat that ran out of attempts.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from tests.test_soundness import CONFIG, MODES, _run, answer, pipelines, upstream
from tests.test_soundness_dsl_b import _broken_promises

__all__ = ["upstream"]  # the loopback server fixture, shared with tests/test_soundness.py

BLOCK, READER = "s80", "s81"


def _inner(text: str) -> str:
    """The second pipeline's names, moved out of the first's way: `s1` -> `s51`,
    `input.in0` -> `input.jn0`."""
    return re.sub(r"\bin(\d)\b", r"jn\1", re.sub(r"\bs(\d)\b", r"s5\1", text))


@st.composite
def block_pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    doc, modes, given_inputs = draw(pipelines())
    raw, inner_modes, inner_inputs = draw(pipelines())
    inner = yaml.safe_load(_inner(yaml.safe_dump(raw, sort_keys=False)))
    modes.update({_inner(k): v for k, v in inner_modes.items()})
    inputs = doc.setdefault("inputs", {})
    inputs.update(inner.get("inputs") or {})
    given_inputs.update({_inner(k): v for k, v in inner_inputs.items()})
    inputs["docs"] = {"type": "array", "items": {"type": "string"}}
    given_inputs["docs"] = draw(st.lists(st.sampled_from(["a", "b", ""]), max_size=3))
    steps: list[dict[str, Any]] = doc["steps"]
    outer = [s["id"] for s in steps]
    fields = {s["id"]: sorted(s["response_format"]["schema"]["properties"])
              for s in steps if "response_format" in s}
    body: list[dict[str, Any]] = inner["steps"]

    def around() -> str:  # a read of an outer output or field, maybe with a fallback
        sid = draw(st.sampled_from(outer))
        path = sid + (f".{draw(st.sampled_from(fields[sid]))}"
                      if sid in fields and draw(st.booleans()) else "")
        return "${" + path + (' ?? "x"' if draw(st.booleans()) else "") + "}"

    for step in body:
        if draw(st.booleans()):
            step["prompt"] += " " + around()
    block: dict[str, Any] = {"id": BLOCK, "type": "block", "steps": body}
    mapped = draw(st.booleans())
    if mapped:
        block.update({"for_each": "${input.docs}", "as": "it",
                      "max_concurrency": draw(st.integers(1, 3))})
        body[0]["prompt"] += " ${it}"
    keyed = draw(st.booleans())
    block["output"] = {"a": inner["output"], "b": f"${{{body[-1]['id']}}}"} if keyed \
        else inner["output"]
    if fields and draw(st.booleans()):
        sid = draw(st.sampled_from(sorted(fields)))
        block["when"] = f"${{{sid}.{draw(st.sampled_from(fields[sid]))}}} != \"\""
    if draw(st.integers(0, 3)) == 0:
        block["on_error"] = "continue"
    if draw(st.integers(0, 3)) == 0:
        block["retries"] = 1
    if keyed and draw(st.integers(0, 2)) == 0:
        block["repeat"] = {"max": draw(st.integers(1, 3)),
                           "until": draw(st.sampled_from(['${self.output.b} != ""',
                                                          "${self.output.a} == 'no'"]))}
        if draw(st.booleans()):
            body[0]["prompt"] += draw(st.sampled_from([" ${self.previous ?? ''}",
                                                       " ${self.attempt}"]))
    steps.append(block)
    read = draw(st.sampled_from(
        ([f"${{{BLOCK}[0].a}}", f"${{{BLOCK}[0].b ?? \"none\"}}"] if keyed else
         [f"${{{BLOCK}[0]}}", f"${{{BLOCK}[0] ?? \"none\"}}"]) + [f"${{{BLOCK}}}"]
        if mapped else ([f"${{{BLOCK}.a}}", f"${{{BLOCK}.b ?? \"none\"}}"] if keyed
                        else [f"${{{BLOCK}}}", f"${{{BLOCK} ?? \"none\"}}"])))
    steps.append({"id": READER, "type": "llm", "model": "m", "prompt": f"[{READER}] {read}"})
    modes[READER] = draw(st.sampled_from(MODES))
    doc["output"] = {"base": doc["output"], "block": f"${{{BLOCK} ?? \"none\"}}",
                     "reader": f"${{{READER} ?? \"none\"}}"}
    return doc, modes, given_inputs


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=block_pipelines())
def test_a_block_pipeline_that_passes_check_runs_as_it_promised(case, upstream):
    doc, modes, inputs = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, "generated.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None and not any(
        d.severity == "error" for d in result.diagnostics))
    dry = _run(result.compiled, inputs, None)
    assert dry.status == "succeeded", (text, dry.error, _broken_promises(dry))
    upstream.script.clear()
    upstream.then(*[answer(modes)] * 200)
    real = _run(result.compiled, inputs, upstream)
    event(f"run {real.status}")
    event(f"block {real.steps[BLOCK].status}")
    assert not _broken_promises(real), (text, modes, _broken_promises(real))
    if real.status == "succeeded":
        assert set(real.output) == {"base", "block", "reader"}, text
