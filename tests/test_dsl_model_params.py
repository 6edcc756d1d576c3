"""Model parameters on llm steps: top_p, stop, seed, reasoning_effort and any other
provider parameter under `params:` reach the provider as its wire says; `fallback_models:`
are tried after the step's model fails, each attempt a ledger row."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from tests.fakes import FakeServer, anthropic_text, http_error, openai_text

CONFIG = {"models": {"fast": "openai/gpt-4o-mini", "smart": "anthropic/claude-sonnet-4-6"},
          "retry": {"attempts": 0}}
PIPELINE = """
name: tuned
steps:
  - id: answer
    type: llm
    model: fast
    prompt: Say hi
    max_tokens: 300
    top_p: 0.9
    stop: ["END"]
    seed: 7
    reasoning_effort: low
    params: {frequency_penalty: 0.5, user: team-a}
    fallback_models: [smart]
output: ${answer}
"""


def compiled(text: str = PIPELINE):
    result = compile_source(text, "tuned.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assert result.ok, result.diagnostics
    return result.compiled


@pytest.fixture(scope="module")
def fakes():
    servers = {k: FakeServer(k).start() for k in ("openai", "anthropic")}
    yield servers
    for s in servers.values():
        s.stop()


def run(compiled, fakes, tmp_path: Path):
    async def go():
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={
            "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "k",
            "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "ANTHROPIC_API_KEY": "k"})
        ledger = Ledger(tmp_path / "ledger.duckdb", 0.1)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            result = await Executor(caller).run(compiled, {})
            ledger.flush()
            rows = ledger.select("SELECT step_id, provider, success FROM requests "
                                 "ORDER BY ts")[1]
            return result, rows
        finally:
            await providers.close()
            ledger.close()

    return asyncio.run(go())


def test_parameters_reach_the_provider(fakes, tmp_path):
    for fake in fakes.values():
        fake.script.clear()
        fake.requests.clear()
    fakes["openai"].then(openai_text("hi"))
    result, rows = run(compiled(), fakes, tmp_path)
    assert result.status == "succeeded" and result.output == "hi"
    body = fakes["openai"].requests[-1].body
    assert {k: body[k] for k in ("top_p", "stop", "seed", "reasoning_effort",
                                 "frequency_penalty", "user", "max_tokens")} == {
        "top_p": 0.9, "stop": ["END"], "seed": 7, "reasoning_effort": "low",
        "frequency_penalty": 0.5, "user": "team-a", "max_tokens": 300}
    assert rows == [("answer", "openai", True)]


def test_a_failing_model_falls_back_to_the_steps_fallback_models(fakes, tmp_path):
    for fake in fakes.values():
        fake.script.clear()
        fake.requests.clear()
    fakes["openai"].then(http_error(503, "The server is overloaded"))
    fakes["anthropic"].then(anthropic_text("hi from the fallback"))
    result, rows = run(compiled(), fakes, tmp_path)
    assert result.status == "succeeded" and result.output == "hi from the fallback"
    assert result.steps["answer"].model_calls == 2
    assert result.steps["answer"].calls[-1]["provider"] == "anthropic"
    assert rows == [("answer", "openai", False), ("answer", "anthropic", True)]
    sent = fakes["anthropic"].requests[-1].body  # the Messages API's names for them
    assert sent["stop_sequences"] == ["END"] and sent["thinking"]["type"] == "enabled"


def test_fallback_models_are_checked_like_model():
    text = PIPELINE.replace("fallback_models: [smart]", "fallback_models: [smrt, opnai/x]")
    result = compile_source(text, "tuned.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assert [(d.rule, d.message) for d in result.errors] == [
        ("unknown-model", "unknown model 'smrt'; did you mean 'smart'?"),
        ("unknown-model", "unknown provider 'opnai' in model 'opnai/x'; did you mean "
                          "'openai'?")]


def test_the_worst_case_cost_counts_the_fallback_models():
    from flowc.cost import pipeline_cost

    costs = {}
    for fallback in ("[smart]", "[]"):
        text = PIPELINE.replace("fallback_models: [smart]", f"fallback_models: {fallback}")
        rc = pipeline_cost(compiled(text), ProjectConfig.model_validate(CONFIG), None)
        costs[fallback] = rc.worst_usd
    assert costs["[smart]"] > costs["[]"]  # claude-sonnet's prices are above gpt-4o-mini's


def test_the_json_schema_covers_model_parameters():
    from click.testing import CliRunner

    from flowc.cli import cli

    doc = json.loads(CliRunner().invoke(cli, ["schema"]).output)
    assert {"top_p", "stop", "seed", "reasoning_effort", "params", "fallback_models"} <= set(
        doc["$defs"]["LLMStep"]["properties"])
