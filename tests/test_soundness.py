"""The compiler's promise as a property: a pipeline `flowc check` passes runs without an
undefined reference, an unhandled missing value or a traceback, whatever its models answer.

Hypothesis writes pipelines (inputs required, optional and defaulted; structured and text
steps; `${...}` references with and without `??` fallbacks, field paths, Jinja reads;
conditions on earlier answers; `on_missing`, `on_error`, `retries`), keeps those the checker
passes with no error, and runs each twice: as a dry run, and against a loopback OpenAI
server whose answers for each step are schema-valid (every field), schema-minimal (only the
required fields) or schema-violating (a wrong type, a missing required field, not JSON). A
run may fail only as its pipeline declared possible: a model's answer that breaks its step's
schema.
"""

from __future__ import annotations

import asyncio
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
from runtime.dryrun import DryRunModels, DryRunTools
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from tests.fakes import FakeServer, openai_text

CONFIG = {"models": {"m": "openai/gpt-4o-mini"}, "retry": {"attempts": 0}}
# What a step may fail with when its pipeline passed the checker: the model broke the
# step's schema. Anything else (a missing value, a condition that cannot be evaluated, a
# template that fails, an exception's name) is the checker's broken promise.
DECLARED = re.compile(r"did not answer with JSON|answered JSON that does not match")
FIELD_TYPES = {"text": {"type": "string"}, "count": {"type": "integer"},
               "flag": {"type": "boolean"},
               "label": {"type": "string", "enum": ["alpha", "beta", "gamma"]}}
# Minimal answers twice as often: they leave optional fields out, where reads go wrong.
MODES = ("valid", "minimal", "minimal", "violating")


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """A pipeline document, each step's answer mode, and the run's inputs."""
    inputs: dict[str, Any] = {}
    given_inputs: dict[str, Any] = {}
    for i in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["required", "optional", "default"]))
        spec: dict[str, Any] = {"type": "string"}
        if kind == "optional":
            spec["required"] = False
        elif kind == "default":
            spec["default"] = f"d{i}"
        inputs[f"in{i}"] = spec
        if kind == "required" or draw(st.booleans()):
            given_inputs[f"in{i}"] = f"v{i}"
    steps: list[dict[str, Any]] = []
    produced: list[tuple[str, dict[str, bool] | None]] = []  # output, its fields: required?
    modes: dict[str, str] = {}

    def reference() -> str:
        """A `${...}` reference to an input, an earlier output or one of its fields, with
        zero or more `??` fallbacks."""
        alts = []
        for _ in range(draw(st.integers(1, 3))):
            choices = [f"input.{n}" for n in inputs]
            for name, fields in produced:
                choices.append(name)
                choices.extend(f"{name}.{f}" for f in fields or ())
            if not choices:
                break
            alts.append(draw(st.sampled_from(choices)))
        if not alts or draw(st.booleans()):
            alts.append('"fallback"')
        return "${" + " ?? ".join(alts) + "}"

    for i in range(draw(st.integers(1, 5))):
        sid = f"s{i}"
        step: dict[str, Any] = {"id": sid, "type": "llm", "model": "m"}
        parts = [f"[{sid}]"]
        parts += [reference() for _ in range(draw(st.integers(0, 3)))]
        structured_earlier = [(n, f) for n, f in produced if f]
        if structured_earlier and draw(st.booleans()):
            name, fields = draw(st.sampled_from(structured_earlier))
            optional = sorted(f for f, req in fields.items() if not req)
            # Mostly an optional field: the read the guard is for.
            field = draw(st.sampled_from(optional if optional and draw(st.integers(0, 2))
                                         else sorted(fields)))
            guard = draw(st.booleans())
            read = f"{name}.{field}" + (' | default("none", true)' if guard else "")
            parts.append("{{ " + read + " }}")
        step["prompt"] = " ".join(parts)
        fields: dict[str, bool] | None = None
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(sorted(FIELD_TYPES)), min_size=1,
                                  max_size=3, unique=True))
            fields = {n: draw(st.booleans()) for n in names}
            step["response_format"] = {"schema": {
                "type": "object", "properties": {n: FIELD_TYPES[n] for n in names},
                "required": [n for n, req in fields.items() if req]}}
        if structured_earlier and draw(st.booleans()):
            name, earlier = draw(st.sampled_from(structured_earlier))
            field = draw(st.sampled_from(sorted(earlier)))
            test = {"text": '!= ""', "count": "> 1", "flag": '== true',
                    "label": '== "beta"'}[field]
            step["when"] = f"${{{name}.{field}}} {test}"
        if draw(st.booleans()):
            step["on_missing"] = "skip"
        if draw(st.integers(0, 3)) == 0:
            step["on_error"] = "continue"
        if draw(st.integers(0, 3)) == 0:
            step["retries"] = 1
        steps.append(step)
        produced.append((sid, fields))
        modes[sid] = draw(st.sampled_from(MODES))
    doc: dict[str, Any] = {"name": "generated", "steps": steps, "output": reference()}
    if inputs:
        doc["inputs"] = inputs
    return doc, modes, given_inputs


def _value(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][1]
    return {"string": "some text", "integer": 2, "boolean": True}[schema["type"]]


def _wrong(schema: dict[str, Any]) -> Any:
    return {"string": 7, "integer": "two", "boolean": "yes"}[schema["type"]]


def answer(modes: dict[str, str]) -> Any:
    """Answers each step's call as its mode says, from its request's own schema."""
    def act(rec: Any) -> Any:
        prompt = rec.body["messages"][-1]["content"]
        sid = re.match(r"\[(s\d+)\]", prompt).group(1)  # type: ignore[union-attr]
        mode = modes[sid]
        rf = rec.body.get("response_format")
        if not rf:
            return openai_text(f"answer of {sid}")(rec)
        schema = rf["json_schema"]["schema"]
        props, required = schema["properties"], schema.get("required", [])
        if mode == "valid":
            out = {k: _value(v) for k, v in props.items()}
        elif mode == "minimal":
            out = {k: _value(props[k]) for k in required}
        elif required:
            out = {k: _wrong(props[k]) for k in props}
        else:
            return openai_text("not JSON at all")(rec)
        return openai_text(json.dumps(out))(rec)
    return act


class Upstream(FakeServer):
    def __repr__(self) -> str:  # Hypothesis prints the test's arguments on a failure
        return f"Upstream({self.url})"


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("openai").start()
    yield server
    server.stop()


def _run(compiled: Any, inputs: dict[str, Any], upstream: FakeServer | None) -> Any:
    async def go() -> Any:
        if upstream is None:
            with tempfile.TemporaryDirectory() as tmp:
                ledger = Ledger(Path(tmp) / "ledger.duckdb", 0.1)
                try:
                    return await Executor(DryRunModels(ledger), DryRunTools(),
                                          dry_run=True).run(compiled, inputs)
                finally:
                    ledger.close()
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={"OPENAI_BASE_URL": upstream.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        try:
            caller = ModelCaller(config, providers, Router(config, providers), None)
            return await Executor(caller, None).run(compiled, inputs)
        finally:
            await providers.close()

    return asyncio.run(go())


def _broken_promises(result: Any) -> list[str]:
    return [f"{sid}: {r.error}" for sid, r in result.steps.items()
            if r.status == "failed" and not DECLARED.search(r.error or "")]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=pipelines())
def test_a_pipeline_that_passes_check_runs_as_it_promised(case, upstream):
    doc, modes, inputs = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, "generated.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None and not any(
        d.severity == "error" for d in result.diagnostics))
    dry = _run(result.compiled, inputs, None)
    assert dry.status == "succeeded", (text, dry.error, _broken_promises(dry))
    upstream.script.clear()
    upstream.then(*[answer(modes)] * 40)
    real = _run(result.compiled, inputs, upstream)
    event(f"run {real.status}, {len(doc['steps'])} steps, "
          f"{sum(r.status == 'skipped' for r in real.steps.values())} skipped")
    assert not _broken_promises(real), (text, modes, _broken_promises(real))
    if real.status == "failed":
        assert any(modes[sid] == "violating" for sid, r in real.steps.items()
                   if r.status == "failed"), (text, modes, real.error)
    else:
        assert real.output is not None or doc["output"] is None, text
