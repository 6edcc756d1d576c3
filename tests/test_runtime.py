"""The runtime's semantics, on the real model-call path (loopback provider servers):
concurrency, skip propagation, timeouts, retries, cancellation and failure policies."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path

import pytest

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from runtime.dryrun import DryRunModels, DryRunTools, sample
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.inputs import InputError, parse_cli_inputs
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from tests.fakes import FakeServer, http_error, openai_text, slow

CONFIG = {"models": {"m": "openai/gpt-4o-mini"}, "retry": {"attempts": 0},
          "mcpServers": {"s": {"command": "unused-in-dry-run"}}}


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


def compile_yaml(text: str):
    config = ProjectConfig.model_validate(CONFIG)
    result = compile_source(textwrap.dedent(text), "t.yaml", Project(config=config))
    assert result.compiled is not None, result.diagnostics
    return result.compiled


def run(compiled, inputs=None, *, fake, tmp_path: Path, **kw):
    async def go():
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={"OPENAI_BASE_URL": fake.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        ledger = Ledger(tmp_path / "ledger.duckdb", 0.1)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            result = await Executor(caller, **kw).run(compiled, inputs or {})
            ledger.flush()
            rows = ledger.select("SELECT step_id, run_id, workflow_name, success, cost_usd "
                                 "FROM requests ORDER BY ts")[1]
            return result, rows
        finally:
            await providers.close()
            ledger.close()

    return asyncio.run(go())


def by_prompt(mapping):
    """An action that answers from the last user message (so concurrent steps get theirs)."""
    def act(rec):
        text = rec.body["messages"][-1]["content"]
        for key, action in mapping.items():
            if key in text:
                return action(rec)
        return openai_text()(rec)
    return act


def test_fan_out_runs_in_parallel(openai_fake, tmp_path):
    steps = "\n".join(f"""
          - id: s{i}
            type: llm
            model: m
            prompt: part {i} of ${{input.topic}}""" for i in range(10))
    compiled = compile_yaml(f"""
        name: fan
        inputs: {{topic: {{type: string}}}}
        steps:{steps}
          - id: join
            type: llm
            model: m
            prompt: "{' '.join(f'${{s{i}}}' for i in range(10))}"
        output: ${{join}}
        """)
    openai_fake.then(*[slow(0.5, openai_text(f"r{i}")) for i in range(10)])
    t0 = time.perf_counter()
    result, rows = run(compiled, {"topic": "x"}, fake=openai_fake, tmp_path=tmp_path)
    elapsed = time.perf_counter() - t0
    assert result.status == "succeeded"
    # ten 0.5 s calls in parallel, not 5 s in sequence (with room for a loaded machine)
    assert elapsed < 4.0, elapsed
    assert len(rows) == 11 and {r[1] for r in rows} == {result.run_id}
    assert {r[0] for r in rows} == {*(f"s{i}" for i in range(10)), "join"}
    assert all(r[2] == "fan" and r[3] for r in rows)
    # the join saw every branch's answer
    assert sorted(openai_fake.requests[-1].body["messages"][0]["content"].split()) == sorted(
        f"r{i}" for i in range(10))


def test_skips_propagate_and_record_why(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: skips
        inputs: {depth: {type: integer}}
        steps:
          - id: deep
            type: llm
            model: m
            when: ${input.depth} > 2
            prompt: deep
          - id: polish
            type: llm
            model: m
            on_missing: skip
            prompt: polish ${deep}
          - id: quick
            type: llm
            model: m
            prompt: quick
        output:
          answer: ${polish ?? quick}
        """)
    result, rows = run(compiled, {"depth": 1}, fake=openai_fake, tmp_path=tmp_path)
    steps = result.steps
    assert steps["deep"].status == "skipped"
    assert steps["deep"].skip_reason == "condition `${input.depth} > 2` was false"
    assert steps["polish"].status == "skipped"
    assert "deep" in steps["polish"].skip_reason and "was skipped" in steps["polish"].skip_reason
    assert result.output == {"answer": "echo: quick"}
    assert [r[0] for r in rows] == ["quick"]  # skipped steps call no model

    result, _ = run(compiled, {"depth": 3}, fake=openai_fake, tmp_path=tmp_path)
    assert result.output == {"answer": "echo: polish echo: deep"}


def test_structured_output_feeds_conditions_and_fields(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: structured
        steps:
          - id: classify
            type: llm
            model: m
            prompt: classify
            response_format:
              schema:
                type: object
                properties: {label: {type: string}, urgency: {type: integer}}
                required: [label, urgency]
          - id: escalate
            type: llm
            model: m
            when: ${classify.urgency} >= 4
            prompt: escalate ${classify.label}
        output:
          label: ${classify.label}
          note: ${escalate ?? "none"}
        """)
    openai_fake.then(openai_text('{"label": "billing", "urgency": 5}'))
    result, _ = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.output == {"label": "billing", "note": "echo: escalate billing"}
    sent = openai_fake.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"]["type"] == "object"


def test_timeouts_and_retries(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: flaky
        steps:
          - id: a
            type: llm
            model: m
            prompt: a
            timeout: 0.3
            retries: 2
        output: ${a}
        """)
    openai_fake.then(slow(1, openai_text("late")), http_error(500, "boom"), openai_text("ok"))
    result, rows = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "succeeded" and result.output == "ok"
    assert result.steps["a"].attempts == 3
    assert [r[3] for r in rows] == [False, False, True] or [r[3] for r in rows][-1] is True

    openai_fake.then(*[slow(1, openai_text("late"))] * 3)
    result, _ = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "failed"
    assert result.error == {"step": "a", "type": "StepFailed",
                            "message": "timed out after 0.3 s"}


def test_failure_cancels_running_steps(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: failing
        steps:
          - {id: bad, type: llm, model: m, prompt: bad}
          - {id: slow, type: llm, model: m, prompt: slow}
          - {id: after, type: llm, model: m, prompt: "after ${slow}"}
        output: {a: "${bad}", b: "${after}"}
        """)
    openai_fake.then(by_prompt({"bad": http_error(400, "bad request"),
                                "slow": slow(2, openai_text("s"))}),
                     by_prompt({"bad": http_error(400, "bad request"),
                                "slow": slow(2, openai_text("s"))}))
    t0 = time.perf_counter()
    result, _ = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert time.perf_counter() - t0 < 1.5  # did not wait for the slow step
    assert result.status == "failed" and result.error["step"] == "bad"
    assert "bad request" in result.error["message"]
    assert result.steps["slow"].status == "cancelled"
    assert result.steps["after"].status == "cancelled"


def test_cancelling_a_run_cancels_its_steps_and_keeps_its_record(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: cancelled
        steps:
          - {id: slow, type: llm, model: m, prompt: slow}
          - {id: after, type: llm, model: m, prompt: "after ${slow}"}
        """)
    openai_fake.then(slow(30, openai_text("too late")))

    async def go():
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={"OPENAI_BASE_URL": openai_fake.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        ledger = Ledger(tmp_path / "ledger.duckdb", 0.1)
        kept = []
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            task = asyncio.create_task(Executor(caller).run(compiled, {},
                                                            on_cancel=kept.append))
            while not openai_fake.requests:  # the model call is under way
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            ledger.flush()
            rows = ledger.select("SELECT step_id, status FROM requests")[1]
            return kept, rows
        finally:
            await providers.close()
            ledger.close()

    kept, rows = asyncio.run(asyncio.wait_for(go(), 10))  # not the provider's 30 s
    assert [r.status for r in kept] == ["cancelled"]
    assert {s: r.status for s, r in kept[0].steps.items()} == {"slow": "cancelled",
                                                                "after": "cancelled"}
    assert rows == [("slow", "cancelled")]


def test_continue_policy_lets_other_branches_finish(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: tolerant
        steps:
          - {id: bad, type: llm, model: m, prompt: bad, on_error: continue}
          - {id: good, type: llm, model: m, prompt: good}
        output: {a: "${bad ?? 'fallback'}", b: "${good}"}
        """)
    openai_fake.then(by_prompt({"bad": http_error(400, "nope")}),
                     by_prompt({"bad": http_error(400, "nope")}))
    result, rows = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "succeeded"
    assert result.output == {"a": "fallback", "b": "echo: good"}
    assert result.steps["bad"].status == "failed" and "nope" in result.steps["bad"].error
    assert sorted(r[3] for r in rows) == [False, True]  # the failed call is on the books


def test_per_run_concurrency_limit(openai_fake, tmp_path):
    steps = "\n".join(f"  - {{id: s{i}, type: llm, model: m, prompt: p{i}}}" for i in range(4))
    compiled = compile_yaml("name: limited\nsteps:\n" + steps + "\noutput: {" + ", ".join(
        f'"s{i}": "${{s{i}}}"' for i in range(4)) + "}\n")
    openai_fake.then(*[slow(0.3, openai_text("x"))] * 4)
    t0 = time.perf_counter()
    result, _ = run(compiled, fake=openai_fake, tmp_path=tmp_path, max_concurrency=2)
    assert result.status == "succeeded"
    assert time.perf_counter() - t0 >= 0.6  # two at a time


def test_costs_per_step_sum_to_the_run(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: costed
        steps:
          - {id: a, type: llm, model: m, prompt: a}
          - {id: b, type: llm, model: m, prompt: "b ${a}"}
        output: ${b}
        """)
    result, rows = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    costs = [float(r[4]) for r in rows]
    assert result.to_dict()["metrics"]["total_cost_usd"] == pytest.approx(sum(costs))
    assert [s["cost"] for s in result.to_dict()["metrics"]["steps"]] == pytest.approx(costs)


def test_inputs_are_checked_before_anything_runs(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: typed
        inputs: {n: {type: integer}, flag: {type: boolean, default: false}}
        steps:
          - {id: a, type: llm, model: m, prompt: "${input.n}"}
        output: ${a}
        """)
    with pytest.raises(InputError) as exc:
        run(compiled, {"n": "three", "extra": 1}, fake=openai_fake, tmp_path=tmp_path)
    assert exc.value.problems == [
        "unknown input 'extra' (declared: n, flag)",
        "input 'n' must be integer, not str \"three\""]
    assert openai_fake.requests == []
    assert parse_cli_inputs(("n=3", "flag=true"), compiled.pipeline.inputs) == {
        "n": 3, "flag": True}


def test_dry_run_is_deterministic_and_free(tmp_path):
    compiled = compile_yaml("""
        name: dry
        steps:
          - id: c
            type: llm
            model: m
            prompt: classify this
            response_format:
              schema: {type: object, properties: {label: {type: string, enum: [a, b]}},
                       required: [label]}
          - id: t
            type: mcp_tool
            server: s
            tool: x
            params: {q: "${c.label}", deep: {q: "label ${c.label}", n: [1, "${c}", plain]}}
        output: {c: "${c}", t: "${t}"}
        """)

    async def go():
        ledger = Ledger(tmp_path / "l.duckdb", 0.1)
        result = await Executor(DryRunModels(ledger), DryRunTools(), dry_run=True).run(
            compiled, {})
        ledger.flush()
        rows = ledger.select("SELECT provider, cost_usd, dry_run, prompt_tokens FROM requests")
        ledger.close()
        return result, rows[1]

    result, rows = asyncio.run(go())
    assert result.output["c"] == {"label": "a"}
    echoed = result.output["t"].removeprefix("[dry-run] s.x(").removesuffix(")")
    # nested params are filled in; a lone reference keeps its type
    assert json.loads(echoed) == {"q": "a", "deep": {"q": "label a",
                                                     "n": [1, {"label": "a"}, "plain"]}}
    assert result.dry_run and result.to_dict()["dry_run"] is True
    assert rows == [("dry-run", 0, True, 4)]  # "classify this": 13 chars -> 4 tokens
    assert sample({"type": "object", "properties": {"n": {"type": "integer"}}}) == {"n": 0}


def test_run_cli_prints_output_and_json(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--dry-run", "--json",
                        str(root / "pipelines" / "support-triage.yaml"), "-i",
                        "ticket=My invoice is wrong", "-i", "depth=3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded" and out["dry_run"] is True
    assert out["output"]["label"] == "technical"  # first enum value of the schema
    statuses = {s["id"]: s["status"] for s in out["metrics"]["steps"]}
    assert statuses == {"classify": "done", "deep": "done", "quick": "skipped",
                        "escalate": "skipped"}
    assert "DRY RUN" in r.stderr


def test_a_false_condition_skips_the_step_before_its_data_is_read(openai_fake, tmp_path):
    """`when: length(${input.docs}) > 1` guards `${input.docs[1]}`: with one document the
    step is skipped for its condition, not failed for a read it would never make."""
    compiled = compile_yaml("""
        name: guard
        inputs:
          docs: {type: array}
        steps:
          - id: second
            type: llm
            model: m
            when: length(${input.docs}) > 1
            prompt: Summarise ${input.docs[1]}
        output: ${second ?? "only one"}
        """)
    result, rows = run(compiled, {"docs": ["a"]}, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "succeeded" and result.output == "only one"
    assert result.steps["second"].skip_reason == \
        "condition `length(${input.docs}) > 1` was false"
    assert rows == [] and openai_fake.requests == []


def test_an_answer_that_breaks_its_schema_fails_the_step_and_retries_retry_it(
        openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: strict
        steps:
          - id: extract
            type: llm
            model: m
            prompt: extract
            retries: 1
            response_format:
              schema:
                type: object
                properties: {amount: {type: number}}
                required: [amount]
        output: ${extract.amount}
        """)
    openai_fake.then(openai_text(json.dumps({"amount": "12"})),
                     openai_text(json.dumps({"amount": 12})))
    result, rows = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "succeeded" and result.output == 12
    assert result.steps["extract"].attempts == 2 and len(rows) == 2

    openai_fake.then(*[openai_text(json.dumps({"total": 12}))] * 2)
    result, _ = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "failed"
    assert result.error["message"] == ("model m answered JSON that does not match the step's "
                                       "schema: the answer: 'amount' is a required property")


def test_step_retries_replace_the_gateways_instead_of_multiplying_them(openai_fake, tmp_path):
    """`retries: 2` on a step with the gateway's own retries on: 3 upstream calls, not
    (2 + 1) x (2 + 1), and the step's record counts every one of them."""
    global CONFIG
    saved = CONFIG
    CONFIG = {**CONFIG, "retry": {"attempts": 2, "backoff": 0.01}}
    try:
        compiled = compile_yaml("""
            name: flaky
            steps:
              - {id: a, type: llm, model: m, prompt: a, retries: 2}
            output: ${a}
            """)
        openai_fake.then(*[http_error(500, "boom")] * 9)
        result, rows = run(compiled, fake=openai_fake, tmp_path=tmp_path)
    finally:
        CONFIG = saved
    assert result.status == "failed"
    assert len(openai_fake.requests) == 3 and len(rows) == 3
    assert result.steps["a"].attempts == 3 and result.steps["a"].model_calls == 3


def test_jinja_reads_run_as_checked(openai_fake, tmp_path):
    """A Jinja read the checker passed runs: an optional field behind `| default(.., true)`
    renders its default when the model leaves it out; a loop variable's missing field (which
    the checker cannot see) fails the step with a message, not a traceback."""
    compiled = compile_yaml("""
        name: jinja
        inputs:
          docs: {type: array}
        steps:
          - id: classify
            type: llm
            model: m
            prompt: Classify
            response_format:
              schema:
                type: object
                properties: {label: {type: string}, note: {type: string}}
                required: [label]
          - id: answer
            type: llm
            model: m
            prompt: >-
              {{ classify.label.upper() }}/{{ classify.note | default("no note", true) }}
              {% for d in input.docs %}[{{ d.title }}]{% endfor %}
        output: ${answer}
        """)
    openai_fake.then(openai_text('{"label": "billing"}'), openai_text("done"))
    result, _ = run(compiled, {"docs": [{"title": "a"}]}, fake=openai_fake,
                    tmp_path=tmp_path)
    assert result.status == "succeeded", result.error
    assert openai_fake.requests[-1].body["messages"][-1]["content"] == \
        "BILLING/no note [a]"
    openai_fake.then(openai_text('{"label": "billing"}'))
    result, _ = run(compiled, {"docs": [{"name": "a"}]}, fake=openai_fake, tmp_path=tmp_path)
    assert result.status == "failed"
    assert result.steps["answer"].error == (
        "prompt template of step 'answer' failed: 'dict object' has no attribute 'title'")
