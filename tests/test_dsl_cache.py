"""`cache:` on a step: an identical request reuses the stored result, costs $0 in the
ledger (a row marked cached, with the saving) and is marked cached in the run record; the
loopback provider's request count shows the call was not made again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from flowc import Project, compile_source
from flowc.caching import duration_seconds
from flowc.config import MCPServerConfig, ProjectConfig
from runtime.access.gate import Gate, Principal
from runtime.access.store import LedgerAccessStore
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.mcp.manager import MCPManager
from runtime.providers import Providers
from runtime.step_cache import StepCache, cache_key
from tests.fakes import openai_text
from tests.test_runtime import fake as _fake
from tests.test_runtime import openai_fake as _openai_fake

# The loopback OpenAI server of tests/test_runtime.py, one per module, cleared per test.
fake, openai_fake = _fake, _openai_fake

ROOT = Path(__file__).resolve().parent.parent
SEARCH = {"command": sys.executable, "args": [str(ROOT / "tests" / "mcp" / "search_server.py")]}
CONFIG = {"models": {"m": "openai/gpt-4o-mini", "fast": "openai/gpt-4o-mini"},
          "retry": {"attempts": 0},
          "mcpServers": {"search": SEARCH}}


def compile_yaml(text: str):
    config = ProjectConfig.model_validate(CONFIG)
    result = compile_source(textwrap.dedent(text), "t.yaml", Project(config=config))
    assert result.compiled is not None, result.diagnostics
    return result.compiled


def run(compiled, inputs, *, fake, ledger_path: Path, mcp=None, sql=None, act=None,
        config=None, key=None):
    """One run with a ledger at ``ledger_path`` (kept between runs, like a project's);
    ``mcp``: MCP servers' configs (started for the run, closed after); ``act``: what to do
    with the executor instead of a run of ``compiled`` with ``inputs``; ``key``: a virtual
    key's settings (as `flowc keys create` takes them), made and run as."""
    async def go():
        tools = MCPManager(mcp, ledger_path.parent) if mcp else None
        cfg = ProjectConfig.model_validate(config or CONFIG)
        providers = Providers(cfg, env={"OPENAI_BASE_URL": fake.url + "/v1",
                                        "OPENAI_API_KEY": "k"})
        ledger = Ledger(ledger_path, 0.1)
        try:
            gate, who = None, None
            if key is not None:
                gate = Gate(cfg, LedgerAccessStore(ledger), None)
                gate.load()
                who = Principal("key", gate.create(key)[0])
            caller = ModelCaller(cfg, providers, Router(cfg, providers), ledger, gate)
            executor = Executor(caller, tools, cache=StepCache(ledger))
            result = await (act(executor) if act else executor.run(compiled, inputs, who=who))
            ledger.flush()
            rows = ledger.select(
                "SELECT step_id, cost_usd, cached, saved_usd, price_source, status "
                "FROM requests WHERE run_id = ? ORDER BY ts", [result.run_id])[1]
            if sql:
                ledger.execute(sql)
            return result, rows
        finally:
            if tools is not None:
                await tools.close()
            await providers.close()
            ledger.close()

    return asyncio.run(go())


CACHED = """
    name: cached
    inputs: {text: {type: string}}
    steps:
      - id: summary
        type: llm
        model: m
        temperature: 0
        prompt: Summarize ${input.text}
        cache: true
"""


def test_an_identical_request_is_served_from_the_cache_at_no_cost(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED)
    path = tmp_path / "ledger.duckdb"
    openai_fake.then(openai_text("a summary", prompt_tokens=1000, completion_tokens=500))
    first, rows1 = run(compiled, {"text": "the report"}, fake=openai_fake, ledger_path=path)
    second, rows2 = run(compiled, {"text": "the report"}, fake=openai_fake, ledger_path=path)
    assert len(openai_fake.requests) == 1  # the second run made no call
    assert first.output == second.output == {"summary": "a summary"}
    paid = rows1[0][1]
    assert paid > 0 and rows1[0][2] is False and rows1[0][3] is None
    # The hit: its own row, $0, marked cached, saving what the first call cost.
    assert rows2 == [("summary", Decimal(0), True, paid, "cache", "ok")]
    step = second.to_dict()["metrics"]["steps"][0]
    assert step["cached"] is True and step["cost"] == 0 and step["model_calls"] == 0
    assert step["saved_usd"] == pytest.approx(float(paid))
    assert second.total_cost == 0
    assert "cached" not in first.to_dict()["metrics"]["steps"][0]


def test_another_request_misses(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED)
    path = tmp_path / "ledger.duckdb"
    run(compiled, {"text": "one"}, fake=openai_fake, ledger_path=path)
    result, rows = run(compiled, {"text": "two"}, fake=openai_fake, ledger_path=path)
    assert len(openai_fake.requests) == 2
    assert rows[0][2] is False and rows[0][1] > 0
    assert "cached" not in result.to_dict()["metrics"]["steps"][0]


def test_an_alias_pointed_at_another_model_misses(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED)
    path = tmp_path / "ledger.duckdb"
    run(compiled, {"text": "same"}, fake=openai_fake, ledger_path=path)
    moved = {**CONFIG, "models": {**CONFIG["models"], "m": "openai/gpt-4o"}}
    _, rows = run(compiled, {"text": "same"}, fake=openai_fake, ledger_path=path,
                  config=moved)
    assert len(openai_fake.requests) == 2 and rows[0][2] is False
    assert openai_fake.requests[1].body["model"] == "gpt-4o"
    _, rows = run(compiled, {"text": "same"}, fake=openai_fake, ledger_path=path,
                  config=moved)
    assert len(openai_fake.requests) == 2 and rows[0][2] is True


def test_a_cache_hit_is_refused_to_a_key_the_call_would_be_refused_to(openai_fake, tmp_path):
    """A cached result goes only to a key that may make the call: one whose models allow
    neither the step's alias nor every model it may be routed to (its fallback too) gets the
    call's own refusal, on its key in the ledger, as it would without the cache. (The name
    the provider answered with, gpt-4o-mini-2024-07-18, used to let the hit through.)"""
    text = CACHED.replace("model: m", "model: fast\n        fallback_models: [openai/gpt-4o]")
    cached, live = compile_yaml(text), compile_yaml(text.replace("cache: true", "cache: false"))
    path = tmp_path / "ledger.duckdb"

    def seen(compiled, key):
        result, _ = run(compiled, {"text": "t"}, fake=openai_fake, ledger_path=path, key=key)
        ledger = Ledger(path, 0.1)
        try:
            rows = ledger.select("SELECT model, status, error, key_name, cached, cost_usd "
                                 "FROM requests WHERE run_id = ?", [result.run_id])[1]
        finally:
            ledger.close()
        return result.status, (result.error or {}).get("message"), rows

    assert seen(cached, {"name": "any"})[0] == "succeeded"  # stored
    for name, models in (("dated", ["openai/gpt-4o-mini-2024-07-18"]),
                         ("no-fallback", ["openai/gpt-4o-mini"])):
        refused = seen(cached, {"name": name, "models": models})
        assert refused == seen(live, {"name": name, "models": models})
        message = (f"key '{name}' may not use model 'fast' (allowed: {models[0]})")
        assert refused == ("failed", message, [("fast", "refused", message, name, False, None)])
    assert len(openai_fake.requests) == 1  # no call was made for either key
    status, _, rows = seen(cached, {"name": "openai", "models": ["openai/*"]})
    assert status == "succeeded" and rows == [("fast", "ok", None, "openai", True, 0)]
    assert len(openai_fake.requests) == 1


def test_a_step_without_cache_always_calls(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED.replace("cache: true", "cache: false"))
    path = tmp_path / "ledger.duckdb"
    for _ in range(2):
        run(compiled, {"text": "same"}, fake=openai_fake, ledger_path=path)
    assert len(openai_fake.requests) == 2


def test_an_entry_older_than_its_ttl_is_not_reused(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED.replace("cache: true", "cache: {ttl: 1h}"))
    path = tmp_path / "ledger.duckdb"
    run(compiled, {"text": "x"}, fake=openai_fake, ledger_path=path)
    _, rows = run(compiled, {"text": "x"}, fake=openai_fake, ledger_path=path,
                  sql="UPDATE step_cache SET created_at = created_at - INTERVAL 2 HOUR")
    assert rows[0][2] is True and len(openai_fake.requests) == 1  # within the hour: a hit
    _, rows = run(compiled, {"text": "x"}, fake=openai_fake, ledger_path=path)
    assert rows[0][2] is False and len(openai_fake.requests) == 2  # two hours old: a miss


def test_a_failed_call_is_not_cached(openai_fake, tmp_path):
    compiled = compile_yaml(CACHED.replace("prompt: Summarize", "response_format:\n"
                                           "          type: json_object\n"
                                           "        prompt: Summarize"))
    path = tmp_path / "ledger.duckdb"
    openai_fake.then(openai_text("not json"), openai_text('{"ok": true}'),
                     openai_text('{"ok": false}'))
    failed, _ = run(compiled, {"text": "t"}, fake=openai_fake, ledger_path=path)
    assert failed.status == "failed"
    ok, _ = run(compiled, {"text": "t"}, fake=openai_fake, ledger_path=path)
    again, rows = run(compiled, {"text": "t"}, fake=openai_fake, ledger_path=path)
    assert ok.output == again.output == {"summary": {"ok": True}}  # parsed JSON, cached
    assert len(openai_fake.requests) == 2 and rows[0][2] is True


def test_the_key_is_the_request_whatever_its_keys_order():
    a = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert cache_key("llm", a) == cache_key("llm", b)
    assert cache_key("llm", a) != cache_key("llm", {**a, "temperature": 1})
    assert cache_key("llm", a) != cache_key("mcp_tool", a)
    assert len(cache_key("llm", a)) == 64


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("1h", 3600),
                                               ("7d", 604800)])
def test_ttl_durations(text, seconds):
    assert duration_seconds(text) == seconds


def test_a_cached_tool_step_is_not_called_again(openai_fake, tmp_path):
    compiled = compile_yaml("""
        name: tool-cached
        steps:
          - id: search
            type: mcp_tool
            server: search
            tool: web_search
            params: {query: flowc, count: 2}
            cache: true
    """)
    path = tmp_path / "ledger.duckdb"

    mcp = {"search": MCPServerConfig(**SEARCH)}
    first, rows1 = run(compiled, {}, fake=openai_fake, ledger_path=path, mcp=mcp)
    second, rows2 = run(compiled, {}, fake=openai_fake, ledger_path=path, mcp=mcp)
    assert first.output == second.output
    assert "Result about flowc" in json.dumps(second.output)
    s1, s2 = (r.to_dict()["metrics"]["steps"][0] for r in (first, second))
    assert s1["tool_calls"] == 1 and "cached" not in s1
    assert s2["tool_calls"] == 0 and s2["cached"] is True
    assert rows1 == rows2 == []  # a tool call is not a model call: no ledger row either way


def test_graph_marks_cached_steps():
    from flowc.render import to_dot

    compiled = compile_yaml(CACHED.replace("cache: true", "cache: {ttl: 1h}"))
    assert "cached (ttl 1h)" in to_dot(compiled).source


def test_the_json_schema_completes_cache():
    import jsonschema
    import yaml

    r = subprocess.run([sys.executable, "-m", "flowc.cli", "schema"], capture_output=True,
                       text=True, timeout=60, check=True)
    validator = jsonschema.Draft202012Validator(json.loads(r.stdout))
    doc = yaml.safe_load(textwrap.dedent(CACHED))
    assert not list(validator.iter_errors(doc))
    doc["steps"][0]["cache"] = {"ttl": "1h"}
    assert not list(validator.iter_errors(doc))
    for bad in ({"ttl": "soon"}, {"size": 3}, "yes"):
        doc["steps"][0]["cache"] = bad
        assert list(validator.iter_errors(doc)), bad
