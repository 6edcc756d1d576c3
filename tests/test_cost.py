"""Cost before running: the worst case per step and per run (flowc/cost.py), the
`max_cost_usd` finding, `flowc cost` and `flowc check --cost`, the ledger's expected cost, and
the runtime stopping a run at its budget, against a loopback OpenAI server."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig, ToolCatalog
from flowc.cost import format_cost, pipeline_cost, schema_chars
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.inputs import InputError, check_inputs
from runtime.ledger.store import CallRecord, Ledger
from runtime.providers import Providers
from runtime.providers.base import request_chars
from tests.fakes import FakeServer, openai_text, slow

M = Decimal(1_000_000)
# Known prices: $1 per 1M prompt tokens, $2 per 1M output tokens (and a dearer model).
CONFIG = {"models": {"m": "openai/test-cheap", "big": "openai/test-dear"},
          "prices": {"openai/test-cheap": {"input": 1, "output": 2},
                     "openai/test-dear": {"input": 10, "output": 30}},
          "retry": {"attempts": 0}}


def project(extra: dict | None = None) -> Project:
    config = ProjectConfig.model_validate({**CONFIG, **(extra or {})})
    return Project(config=config, catalog=ToolCatalog.load(config, None))


def compile_yaml(text: str, proj: Project | None = None, ignore: frozenset[str] = frozenset()):
    return compile_source(textwrap.dedent(text), "p.yaml", proj or project(), ignore)


def cost_of(text: str, proj: Project | None = None):
    proj = proj or project()
    result = compile_yaml(text, proj, frozenset({"over-budget", "unbounded-cost"}))
    assert result.compiled is not None, result.diagnostics
    return pipeline_cost(result.compiled, proj.config, proj.catalog)


TWO_STEPS = """
    name: two
    inputs:
      topic: {type: string, max_length: 400}
    steps:
      - id: a
        type: llm
        model: m
        max_tokens: 100
        retries: 2
        prompt: "Write about ${input.topic}"
      - id: b
        type: llm
        model: m
        max_tokens: 50
        system: Be brief.
        prompt: "Summarise: ${a}"
    output: ${b}
    """


def test_worst_case_by_hand():
    rc = cost_of(TWO_STEPS)
    a, b = rc.steps
    # a: "Write about " (12) + topic (400) = 412 chars = 103 tokens; 100 out; 3 attempts
    assert (a.prompt_tokens, a.output_tokens, a.calls) == (103, 100, 3)
    assert a.worst_usd == (103 * 1 + 100 * 2) * 3 / M
    # b: "Be brief." (9) + "Summarise: " (11) + a's answer (100 tokens = 400 chars) = 105
    assert (b.prompt_tokens, b.output_tokens, b.calls) == (105, 50, 1)
    assert b.worst_usd == (105 * 1 + 50 * 2) / M
    assert rc.kind == "ok" and rc.worst_usd == Decimal(909 + 205) / M
    assert a.target == "openai/test-cheap"
    text = format_cost(rc)
    assert "~4 characters a token" in text and "$0.001114" in text


def test_structured_output_bounds_what_a_field_read_costs():
    schema = {"type": "object", "additionalProperties": False, "required": ["label"],
              "properties": {"label": {"type": "string", "enum": ["tech", "billing"]}}}
    rc = cost_of(f"""
        name: s
        steps:
          - id: a
            type: llm
            model: m
            max_tokens: 20
            prompt: classify
            response_format: {{schema: {json.dumps(schema)}}}
          - id: b
            type: llm
            model: m
            max_tokens: 10
            prompt: "label ${{a.label}}"
        """)
    a, b = rc.steps
    wire = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "output", "schema": schema, "strict": True}}}
    assert a.prompt_tokens == math.ceil((len("classify") + len(json.dumps(wire))) / 4)
    assert b.prompt_tokens == math.ceil((len("label ") + len("billing")) / 4)
    assert schema_chars(schema) == 2 + len('"label"') + 4 + len('"billing"')


def test_branches_count_the_costlier_side():
    rc = cost_of("""
        name: br
        inputs: {deep: {type: boolean}}
        steps:
          - id: long
            type: llm
            model: big
            when: ${input.deep}
            max_tokens: 1000
            prompt: think hard
          - id: short
            type: llm
            model: m
            when: not (${input.deep})
            max_tokens: 10
            prompt: be quick
          - id: after
            type: llm
            model: m
            max_tokens: 10
            prompt: done
        output: ${long ?? short}
        """)
    long, short, after = rc.steps
    assert long.worst_usd == (3 * 10 + 1000 * 30) / M
    assert short.worst_usd == (2 * 1 + 10 * 2) / M
    assert rc.branches == [(["long"], ["short"])]
    assert rc.worst_usd == long.worst_usd + after.worst_usd  # not both branches
    assert "the costlier side counts" in format_cost(rc)


def test_retries_and_tool_loops_multiply_calls():
    tools = {"mcpServers": {"kb": {"command": "unused", "tools": {"find": {
        "description": "Find a page",
        "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}},
        "outputSchema": {"type": "object", "additionalProperties": False,
                         "properties": {"page": {"type": "string", "maxLength": 100}}}}}}}}
    proj = project(tools)
    rc = cost_of("""
        name: loop
        steps:
          - id: a
            type: llm
            model: m
            max_tokens: 40
            retries: 1
            tools: [kb.find]
            max_tool_calls: 3
            prompt: look it up
        """, proj)
    (a,) = rc.steps
    assert a.calls == 2 * 4  # two attempts of up to four rounds (three tool calls, an answer)
    result = 2 + len('"page"') + 4 + 2 + 6 * 100
    defs = [{"type": "function", "function": {"name": "kb__find", "description": "Find a page",
                                              "parameters": tools["mcpServers"]["kb"]["tools"][
                                                  "find"]["inputSchema"]}}]
    chars = len("look it up") + 3 * (40 * 4 + result) + len(json.dumps({"tools": defs}))
    assert a.prompt_tokens == math.ceil(chars / 4)
    assert a.worst_usd == (a.prompt_tokens + 40 * 2) * 8 / M


def test_unbounded_inputs_tool_results_and_outputs_say_why_and_how_to_fix():
    rc = cost_of("""
        name: u
        inputs: {topic: {type: string}, n: {type: integer}}
        steps:
          - id: a
            type: llm
            model: m
            max_tokens: 10
            when: ${input.n} > 1
            prompt: "about ${input.topic}"
        """)
    (a,) = rc.steps
    assert a.kind == "unbounded" and a.worst_usd is None and rc.worst_usd is None
    assert a.problem == "input 'topic' has no max_length"
    assert a.fix == "declare `max_length:` on input 'topic'"
    assert rc.kind == "unbounded" and "step 'a'" in rc.problem
    # a condition-only read costs nothing: `n` needs no bound
    rc = cost_of("""
        name: u
        steps:
          - id: a
            type: llm
            model: m
            prompt: hi
        """)
    assert rc.steps[0].kind == "unbounded"
    assert "has no max_tokens" in rc.steps[0].problem
    assert rc.steps[0].fix == "set `max_tokens:` on step 'a'"


def test_an_unpriced_model_is_unknown_and_named():
    rc = cost_of("""
        name: u
        steps:
          - {id: a, type: llm, model: openai/no-such-model-xyz, max_tokens: 5, prompt: hi}
        """)
    assert rc.kind == "unknown" and rc.steps[0].problem == "no price for openai/no-such-model-xyz"
    assert "prices:" in rc.steps[0].fix


def test_a_fallback_to_a_dearer_model_is_the_worst_case():
    rc = cost_of("""
        name: f
        steps:
          - {id: a, type: llm, model: m, max_tokens: 5, prompt: hi}
        """, project({"fallbacks": {"m": ["big"]}}))
    assert rc.steps[0].target == "openai/test-dear"
    assert rc.steps[0].worst_usd == (1 * 10 + 5 * 30) / M


def test_jinja_loops_and_ifs_are_bounded_statically():
    rc = cost_of("""
        name: j
        inputs: {items: {type: array, max_length: 10}, flag: {type: boolean}}
        steps:
          - id: a
            type: llm
            model: m
            max_tokens: 1
            prompt: >-
              {% for x in input['items'] %}ab{% endfor %}{% if input.flag
              %}yes{% else %}no{% endif %}
        """)
    (a,) = rc.steps
    # at most 10 items of 2 literal characters, and the longer branch: 23 characters
    assert a.prompt_tokens == math.ceil(23 / 4) and a.note is None


def test_a_model_with_a_known_context_window_bounds_an_answer_without_max_tokens():
    rc = cost_of("""
        name: c
        steps:
          - {id: a, type: llm, model: openai/gpt-4o-mini, prompt: hi}
        """)
    (a,) = rc.steps
    assert a.kind == "ok" and a.output_tokens == 128_000
    assert a.worst_usd == (1 * Decimal("0.15") + 128_000 * Decimal("0.6")) / M


def test_max_cost_usd_is_a_finding_at_the_field():
    over = TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 0.001")
    result = compile_yaml(over)
    (d,) = result.diagnostics
    assert (d.rule, d.line, d.col) == ("over-budget", 3, 15)
    assert "$0.001114" in d.message and "max_cost_usd $0.001 " in d.message
    assert "'a' $0.000909" in d.message and result.compiled is None
    assert compile_yaml(over, ignore=frozenset({"over-budget"})).compiled is not None
    within = TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 0.002")
    assert compile_yaml(within).diagnostics == []
    unbounded = over.replace(", max_length: 400", "")
    (d,) = compile_yaml(unbounded).diagnostics
    assert d.rule == "unbounded-cost" and (d.line, d.col) == (3, 15)
    assert "unbounded" in d.message and "input 'topic' has no max_length" in d.message
    assert d.help == "declare `max_length:` on input 'topic'"
    unknown = over.replace("model: m\n        max_tokens: 50", "model: openai/nope-1\n"
                           "        max_tokens: 50")
    (d,) = [d for d in compile_yaml(unknown).diagnostics if d.rule == "unbounded-cost"]
    assert "unknown" in d.message and "no price for openai/nope-1" in d.message


def test_an_input_longer_than_its_max_length_is_refused():
    compiled = compile_yaml(TWO_STEPS).compiled
    with pytest.raises(InputError, match="input 'topic' is 401 characters, more than its "
                                         "max_length of 400"):
        check_inputs(compiled.pipeline.inputs, {"topic": "x" * 401})
    assert check_inputs(compiled.pipeline.inputs, {"topic": "x" * 400})
    bad = compile_yaml("""
        name: d
        inputs: {t: {type: string, max_length: 2, default: abc}}
        steps: [{id: a, type: llm, model: m, prompt: "${input.t}"}]
        """)
    assert [d.rule for d in bad.diagnostics] == ["invalid-value"]


# -- the CLI -----------------------------------------------------------------------------------
def flowc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def write_project(tmp_path: Path, pipeline: str) -> Path:
    (tmp_path / "flowc.yaml").write_text(yaml.safe_dump(CONFIG))
    p = tmp_path / "two.yaml"
    p.write_text(textwrap.dedent(pipeline))
    return p


def test_flowc_cost_prints_the_table_and_exits_by_the_budget(tmp_path):
    p = write_project(tmp_path, TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 1"))
    out = flowc("cost", p, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("cost of two: worst case per run (tokens counted at ~4")
    assert lines[2].split() == ["a", "openai/test-cheap", "103", "100", "3", "$0.000909", "-"]
    assert lines[3].split() == ["b", "openai/test-cheap", "105", "50", "1", "$0.000205", "-"]
    assert lines[5].split() == ["run", "$0.001114", "-"]
    assert lines[-1] == "max_cost_usd $1.00: within budget"
    assert not (tmp_path / ".flowc").exists()  # no ledger is created for the asking
    p.write_text(p.read_text().replace("max_cost_usd: 1", "max_cost_usd: 0.001"))
    out = flowc("cost", p, "--format", "json", cwd=tmp_path)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["over_budget"] and doc["worst_usd"] == 0.001114
    assert doc["steps"][0]["calls"] == 3
    out = flowc("check", "--cost", p, cwd=tmp_path)
    assert out.returncode == 1 and "[over-budget]" in out.stdout
    assert "max_cost_usd $0.001: over budget" in out.stdout  # the breakdown is shown too
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps: []\n")
    out = flowc("cost", bad, cwd=tmp_path)
    assert out.returncode == 1 and "error" in out.stderr and out.stdout == ""


def test_expected_cost_comes_from_the_ledger_history(tmp_path):
    p = write_project(tmp_path, TWO_STEPS)
    ledger = Ledger(tmp_path / ".flowc" / "ledger.duckdb", 0.05)

    def call(run: str, step: str, cost: str | None, **kw) -> CallRecord:
        return CallRecord(model="m", provider="openai", served_model="test-cheap",
                          success=kw.get("status", "ok") == "ok", latency_ms=1.0,
                          cost_usd=None if cost is None else Decimal(cost),
                          workflow_name=kw.get("workflow", "two"), run_id=run, step_id=step,
                          status=kw.get("status", "ok"), dry_run=kw.get("dry_run", False),
                          id=uuid.uuid4().hex)

    for rec in [call("r1", "a", "0.0002"), call("r1", "a", "0.0002"),  # a retry: one run
                call("r2", "a", "0.0001"), call("r2", "a", None, status="error"),
                call("r1", "b", "0.00005"),
                call("r3", "a", "9", dry_run=True), call("r4", "a", "9", workflow="other")]:
        ledger.record(rec)
    ledger.flush()
    ledger.close()
    out = flowc("cost", p, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:6]}
    # a: runs r1 ($0.0004) and r2 ($0.0001): $0.00025 on average; b: one run
    assert rows["a"][-4:] == ["$0.000909", "$0.00025", "(2", "runs)"]
    assert rows["b"][-4:] == ["$0.000205", "$0.00005", "(1", "run)"]
    assert rows["run"][-2:] == ["$0.001114", "$0.0003"]


def test_tiny_amounts_print_in_dollars_not_scientific_notation(tmp_path):
    """A call's cost may be under a millionth of a dollar (the ledger keeps nine decimals):
    `flowc cost`'s expected column and `flowc costs` show it as $0.0000001, not $1e-07, and
    not as $0 or a bare 1E-7 either."""
    p = write_project(tmp_path, TWO_STEPS)
    ledger = Ledger(tmp_path / ".flowc" / "ledger.duckdb", 0.05)
    for step in ("a", "b"):
        ledger.record(CallRecord(model="m", provider="openai", served_model="test-cheap",
                                 success=True, latency_ms=1.0, cost_usd=Decimal("0.0000001"),
                                 workflow_name="two", run_id="r1", step_id=step,
                                 id=uuid.uuid4().hex))
    ledger.flush()
    ledger.close()
    out = flowc("cost", p, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:6]}
    assert rows["a"][-3] == rows["b"][-3] == "$0.0000001"
    assert rows["run"][-1] == "$0.0000002"
    out = flowc("costs", "--by", "model", "--since", "2000-01-01", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2].split()[0] == "openai/test-cheap" and lines[2].split()[5] == "$0.0000002"
    assert lines[-1] == "2 calls, 0 tokens, $0.0000002"


@settings(max_examples=300)
@given(st.one_of(st.decimals(-10**12, 10**12, allow_nan=False, allow_infinity=False),
                 st.floats(-1e12, 1e12),
                 st.integers(-10**12, 10**12)))
def test_usd_is_always_plain_dollars_near_the_amount(amount):
    from flowc.cost import usd

    text = usd(amount)
    assert re.fullmatch(r"-?\$\d+(\.\d+)?", text), text
    d = Decimal(str(amount))
    shown = Decimal(text.replace("$", ""))
    if d == 0:
        assert text == "$0"
        return
    assert shown != 0 and (shown < 0) == (d < 0)  # never a non-zero amount shown as $0
    if abs(d) >= Decimal("0.000001"):  # to the millionth
        assert abs(shown - d) <= Decimal("0.0000005")
    else:  # two significant digits
        assert abs(shown - d) <= abs(d) / 10


@settings(max_examples=500)
@given(st.decimals(allow_nan=False, allow_infinity=False)
       | st.builds(Decimal, st.integers(-10**30, 10**30)).map(lambda d: d.scaleb(-40))
       | st.builds(lambda i, e: Decimal(i).scaleb(e), st.integers(-10**9, 10**9),
                   st.integers(-30, 30)))
def test_amount_is_exact_plain_decimal_notation(d):
    """What JSON answers, headers, CSV and alert rows carry: a tiny or huge amount never in
    scientific notation (`str(Decimal("1E-7"))` is "1E-7") and read back as the same value."""
    from flowc.cost import amount

    text = amount(d)
    assert "E" not in text and "e" not in text
    assert re.fullmatch(r"-?\d+(\.\d*[1-9])?", text), text
    assert Decimal(text) == d


# -- the runtime -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


@pytest.fixture
def openai_fake(fake):
    fake.requests.clear()
    fake.script.clear()
    return fake


def run(compiled, inputs, fake, tmp_path: Path, extra: dict | None = None, dry_run=False):
    async def go():
        config = ProjectConfig.model_validate({**CONFIG, **(extra or {})})
        providers = Providers(config, env={"OPENAI_BASE_URL": fake.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        ledger = Ledger(tmp_path / f"{uuid.uuid4().hex}.duckdb", 0.1)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            result = await Executor(caller).run(compiled, inputs)
            ledger.flush()
            rows = ledger.select("SELECT step_id, sum(cost_usd) FROM requests "
                                 "GROUP BY step_id")[1]
            result.spent_by_step = {step: Decimal(c or 0) for step, c in rows}
            return result, sum(result.spent_by_step.values(), Decimal(0))
        finally:
            await providers.close()
            ledger.close()

    return asyncio.run(go())


def honest(text: str = "ok", completion_tokens: int | None = None):
    """An answer whose usage is the request's size at four characters a token (as flowc's
    estimate assumes), and ``completion_tokens`` (default: the answer's)."""
    def act(rec):
        extra = {k: rec.body[k] for k in ("tools", "response_format") if k in rec.body}
        prompt = math.ceil((request_chars(rec.body) + (len(json.dumps(extra)) if extra else 0))
                           / 4)
        out = math.ceil(len(text) / 4) if completion_tokens is None else completion_tokens
        return openai_text(text, prompt_tokens=prompt, completion_tokens=out)(rec)
    return act


def test_a_run_stops_before_a_call_that_could_pass_its_budget(openai_fake, tmp_path):
    # b's worst case ($0.000205) would pass the budget once a has spent its share
    pipeline = TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 0.0004")
    compiled = compile_yaml(pipeline, ignore=frozenset({"over-budget"})).compiled
    openai_fake.then(honest("x" * 400, completion_tokens=100))
    result, spent = run(compiled, {"topic": "t" * 400}, openai_fake, tmp_path)
    assert result.status == "failed" and len(openai_fake.requests) == 1
    assert result.error["step"] == "b" and result.error["type"] == "BudgetExceeded"
    a_cost = (103 + 200) / M
    assert spent == a_cost
    assert result.error["message"] == (
        "the run would go past max_cost_usd $0.0004: it has spent $0.000303, and the next call "
        "of step 'b' may cost up to $0.000205 (openai/test-cheap: 105 prompt tokens, up to 50 "
        "output)")
    assert result.steps["b"].status == "failed" and result.steps["b"].model_calls == 0


def test_a_run_stops_after_a_call_that_cost_more_than_its_budget(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: once
        max_cost_usd: 0.01
        steps:
          - {id: a, type: llm, model: m, max_tokens: 10, prompt: hi, on_error: continue}
          - {id: b, type: llm, model: m, max_tokens: 10, prompt: "${a ?? 'x'}"}
        """).compiled
    # a provider that bills past max_tokens (usage it reported): the real cost counts
    openai_fake.then(openai_text("x", prompt_tokens=1, completion_tokens=10_000))
    result, spent = run(compiled, {}, openai_fake, tmp_path)
    assert result.status == "failed" and len(openai_fake.requests) == 1
    assert spent == (1 + 20_000) / M
    assert result.error == {"step": "a", "type": "BudgetExceeded", "message": (
        "the run spent $0.020001, more than max_cost_usd $0.01 (the call of step 'a' cost "
        "$0.020001)")}  # on_error: continue does not let a run spend on
    a = result.steps["a"]  # the call that went past is on the step's record
    assert (a.status, a.model_calls, a.cost) == ("failed", 1, spent)


def test_steps_running_at_once_cannot_overspend_together(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: both
        max_cost_usd: 0.0003
        steps:
          - {id: a, type: llm, model: m, max_tokens: 100, prompt: one}
          - {id: b, type: llm, model: m, max_tokens: 100, prompt: two}
        """, ignore=frozenset({"over-budget"})).compiled
    openai_fake.then(slow(0.3, honest("x")), honest("y"))
    result, spent = run(compiled, {}, openai_fake, tmp_path)
    # each alone fits ($0.000201), both may not: b is not called, and the failed run cancels a
    assert result.status == "failed" and result.steps["b"].model_calls == 0
    assert [r.body["messages"][-1]["content"] for r in openai_fake.requests] in ([], ["one"])
    assert result.error["step"] == "b" and result.error["message"] == (
        "the run would go past max_cost_usd $0.0003: it has spent $0 ($0.000201 more under "
        "way), and the next call of step 'b' may cost up to $0.000201 (openai/test-cheap: 1 "
        "prompt tokens, up to 100 output)")
    assert result.steps["a"].status == "cancelled" and spent <= 1 / M  # a's prompt, if sent


def test_a_run_within_its_budget_and_a_dry_run_are_not_stopped(openai_fake, tmp_path):
    pipeline = TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 0.002")
    compiled = compile_yaml(pipeline).compiled
    openai_fake.then(honest("x" * 400, completion_tokens=100), honest("y", 50))
    result, spent = run(compiled, {"topic": "t" * 400}, openai_fake, tmp_path)
    assert result.status == "succeeded" and spent == (303 + 205) / M


# -- the worst case is a bound -----------------------------------------------------------------
PROPERTY = """
    name: prop
    max_cost_usd: {budget}
    inputs:
      topic: {{type: string, max_length: 200}}
      tags: {{type: array, max_length: 60}}
      deep: {{type: boolean}}
    steps:
      - id: classify
        type: llm
        model: m
        max_tokens: 30
        retries: 2
        prompt: "Classify ${{input.topic}} tagged {{{{ input.tags | join(', ') }}}}"
        response_format:
          schema:
            type: object
            additionalProperties: false
            required: [label]
            properties: {{label: {{type: string, enum: [tech, billing]}}}}
      - id: long
        type: llm
        model: big
        when: ${{input.deep}}
        max_tokens: 80
        system: "{{% for t in input.tags %}}- {{{{ t }}}}\\n{{% endfor %}}"
        prompt: "Answer ${{input.topic}} as ${{classify.label}}"
      - id: short
        type: llm
        model: m
        when: not (${{input.deep}})
        max_tokens: 20
        prompt: "Briefly: ${{input.topic}}"
    output: ${{long ?? short}}
    """


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(topic=st.text(min_size=190, max_size=200) | st.text(max_size=200),
       tags=st.lists(st.text(alphabet="abcé\n", max_size=6), max_size=8),
       deep=st.booleans(), data=st.data())
def test_no_run_within_bounds_costs_more_than_the_worst_case(openai_fake, tmp_path, topic,
                                                             tags, deep, data):
    """Inputs within their bounds, a provider counting tokens as flowc estimates them and
    answering anything up to max_tokens (schema-breaking JSON, which the step retries):
    no run costs more than the worst case, and a budget of exactly the worst case never
    stops one."""
    assume(len(json.dumps(tags, ensure_ascii=False)) <= 60)
    rc = cost_of(PROPERTY.format(budget=1))
    worst = rc.worst_usd
    assert worst is not None
    compiled = compile_yaml(PROPERTY.format(budget=worst)).compiled
    assert compiled is not None
    openai_fake.requests.clear()

    # Drawn here: the fake answers on its own thread, where Hypothesis cannot draw.
    structured = data.draw(st.lists(st.sampled_from(
        ["x", '{"label": "nope"}', '{"label": "tech"}']), min_size=3, max_size=3))
    texts = data.draw(st.lists(st.text(max_size=80 * 4), min_size=1, max_size=1))
    fractions = data.draw(st.lists(st.floats(0, 1), min_size=4, max_size=4))
    answers = iter([*structured, *texts])
    shares = iter(fractions)

    def answer(rec):
        limit = rec.body["max_tokens"]
        text = next(answers) if "response_format" in rec.body else texts[0][:limit * 4]
        least = math.ceil(len(text) / 4)
        return honest(text, least + round((limit - least) * next(shares)))(rec)

    openai_fake.then(*[answer] * 4)
    result, spent = run(compiled, {"topic": topic, "tags": tags, "deep": deep}, openai_fake,
                        tmp_path)
    openai_fake.script.clear()
    # the only failure a run may have is the model's own (JSON that breaks the schema)
    assert result.error is None or result.error["type"] == "StepFailed", result.error
    assert spent <= worst
    for step in rc.steps:  # and no step more than its own
        assert result.spent_by_step.get(step.step_id, 0) <= step.worst_usd, step


def test_the_docs_example_is_what_flowc_cost_prints(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cost.md").read_text()
    pipeline = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = doc.split("$ flowc cost triage.yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "triage.yaml").write_text(pipeline)
    out = flowc("cost", "triage.yaml", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, shown)
    (tmp_path / "triage.yaml").write_text(pipeline.replace(", max_length: 4000", ""))
    out = flowc("check", "triage.yaml", cwd=tmp_path)
    shown = doc.split("$ flowc check triage.yaml\n", 1)[1].split("```", 1)[0]
    assert out.returncode == 1 and out.stdout == shown


def test_check_imports_the_price_data_only_for_a_rate_it_has_not_cached(tmp_path):
    """`flowc check`'s start-up budget: genai-prices (~200 ms to import) is loaded for a
    pipeline with a budget only until its rates are cached, and never for one without."""
    budget = tmp_path / "b.yaml"
    budget.write_text(TWO_STEPS.replace("name: two", "name: two\n    max_cost_usd: 1")
                      .replace("model: m", "model: openai/gpt-4o-mini"))
    plain = tmp_path / "p.yaml"
    plain.write_text(budget.read_text().replace("    max_cost_usd: 1\n", ""))
    probe = ("import sys; from flowc.compiler import compile_file; "
             "r = compile_file(sys.argv[1]); assert not r.errors, r.diagnostics; "
             "print('genai_prices' in sys.modules)")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}

    def imports(path: Path) -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert imports(plain) == "False"
    assert imports(budget) == "True"  # the first lookup fills the cache
    assert imports(budget) == "False"
    assert list((tmp_path / "cache" / "flowc").glob("rates-genai-prices-*.json"))
