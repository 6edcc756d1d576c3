"""The compiler's promise for indexes into lists: a pipeline `flowc check` passes runs
without an unhandled missing value, whatever length its lists have within their schemas.

Hypothesis writes pipelines that read items of a typed list input (`min_items` 0-2, given
0-3 values within it) and of a structured step's array field (`minItems` 0-2, answered with
as few items as the schema allows, one more, or too few), by positive and negative index,
with and without `??` fallbacks, `on_missing: skip` and a `when:` on the list's length, in
`${...}` references, Jinja reads and transforms. It keeps those the checker passes and
runs each as a dry run and against a loopback OpenAI server (tests/test_soundness.py's
helpers).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from tests.fakes import openai_text
from tests.test_soundness import CONFIG, MODES, _broken_promises, _run, upstream

__all__ = ["upstream"]  # the loopback server fixture, shared

INDEXES = [0, 1, 2, -1, -2]


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any],
                                        dict[str, int]]:
    """A pipeline, each step's answer mode, the run's inputs and each list field's
    `minItems`."""
    least_in = draw(st.integers(0, 2))
    xs: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
    if least_in or draw(st.booleans()):
        xs["min_items"] = least_in
    inputs = {"xs": [f"x{i}" for i in range(draw(st.integers(least_in, 3)))]}
    least_out = draw(st.integers(0, 2))
    tags: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
    if least_out or draw(st.booleans()):
        tags["minItems"] = least_out
    steps: list[dict[str, Any]] = [{
        "id": "s0", "type": "llm", "model": "m", "prompt": "[s0] tag ${input.xs}",
        "response_format": {"schema": {"type": "object", "properties": {"tags": tags},
                                       "required": ["tags"]}}}]
    modes = {"s0": draw(st.sampled_from(MODES))}
    names = ["input.xs", "s0.tags"]

    def ref() -> str:
        alts = [f"{draw(st.sampled_from(names))}[{draw(st.sampled_from(INDEXES))}]"
                for _ in range(draw(st.integers(1, 2)))]
        if draw(st.booleans()):
            alts.append('"none"')
        return "${" + " ?? ".join(alts) + "}"

    for i in range(1, draw(st.integers(2, 4))):
        sid = f"s{i}"
        kind = draw(st.sampled_from(["prompt", "jinja", "transform", "when", "length"]))
        step: dict[str, Any] = {"id": sid, "type": "llm", "model": "m"}
        if kind == "prompt":
            step["prompt"] = f"[{sid}] " + " ".join(ref() for _ in range(draw(
                st.integers(1, 3))))
        elif kind == "jinja":
            root = draw(st.sampled_from(["input.xs", "s0.tags"]))
            read = f"{root}[{draw(st.sampled_from(INDEXES))}]"
            guard = ' | default("none", true)' if draw(st.booleans()) else ""
            step["prompt"] = f"[{sid}] {{{{ {read}{guard} }}}}"
        elif kind == "transform":
            step = {"id": sid, "type": "transform", "expr": f"upper({ref()})"}
        elif kind == "when":
            step["when"] = f'{ref()} != "x0"'
            step["prompt"] = f"[{sid}] guarded"
        else:  # a `when:` on the list's length guards the step's reads of its items
            root = draw(st.sampled_from(["input.xs", "s0.tags"]))
            op, n = draw(st.sampled_from([(">", 0), (">", 1), (">=", 2), ("==", 1)]))
            step["when"] = f"length(${{{root}}}) {op} {n}"
            step["prompt"] = f"[{sid}] {ref()} ${{{root}[{draw(st.sampled_from(INDEXES))}]}}"
        if draw(st.booleans()):
            step["on_missing"] = "skip"
        steps.append(step)
        modes[sid] = draw(st.sampled_from(MODES))
    doc: dict[str, Any] = {"name": "indexes", "inputs": {"xs": xs}, "steps": steps,
                           "output": {"last": "${" + steps[-1]["id"] + " ?? \"none\"}",
                                      "item": ref()}}
    return doc, modes, inputs, {"tags": least_out}


def answer(modes: dict[str, str], least: int) -> Any:
    """s0 answers with as few tags as its schema allows (minimal), one more (valid) or one
    too few / not a list (violating); other steps answer text."""
    def act(rec: Any) -> Any:
        prompt = rec.body["messages"][-1]["content"]
        sid = re.match(r"\[(s\d+)\]", prompt).group(1)  # type: ignore[union-attr]
        if sid != "s0":
            return openai_text(f"answer of {sid}")(rec)
        count = {"minimal": least, "valid": least + 1, "violating": least - 1}[modes[sid]]
        tags: Any = [f"t{i}" for i in range(count)] if count >= 0 else "t0"
        return openai_text(json.dumps({"tags": tags}))(rec)
    return act


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=pipelines())
def test_an_index_flowc_check_passes_has_an_item_or_a_fallback(case, upstream):
    doc, modes, inputs, least = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, "indexes.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None)
    dry = _run(result.compiled, inputs, None)
    assert dry.status == "succeeded", (text, dry.error, _broken_promises(dry))
    upstream.script.clear()
    upstream.then(*[answer(modes, least["tags"])] * 20)
    real = _run(result.compiled, inputs, upstream)
    event(f"run {real.status}, {sum(r.status == 'skipped' for r in real.steps.values())} "
          "skipped")
    assert not _broken_promises(real), (text, inputs, modes, _broken_promises(real))
    if real.status == "failed":  # only a schema-breaking answer may fail it
        assert modes["s0"] == "violating" and real.steps["s0"].status == "failed", \
            (text, modes, real.error)


def test_the_generator_reaches_indexes_the_checker_refuses_and_passes():
    """Both kinds occur: the property is not vacuous."""
    seen = set()

    @settings(max_examples=60, deadline=None)
    @given(case=pipelines())
    def probe(case):
        doc = case[0]
        result = compile_source(yaml.safe_dump(doc, sort_keys=False), "indexes.yaml",
                                Project(config=ProjectConfig.model_validate(CONFIG)))
        seen.add("passes" if result.ok else "maybe-skipped" if any(
            d.rule == "maybe-skipped" for d in result.errors) else "other")

    probe()
    assert {"passes", "maybe-skipped"} <= seen, seen
