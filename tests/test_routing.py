"""Routing rules, strategies and constraints; zero-config model resolution; a named
OpenAI-compatible provider; `flowc serve` with no flowc.yaml at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from flowc.config import ProjectConfig
from runtime.gateway.routing import LatencyStats, Router, Traits
from runtime.providers import Providers, RequestError, Target
from tests.conftest import start_server, stop_server
from tests.fakes import FakeServer, free_port, openai_text

ROOT = Path(__file__).resolve().parent.parent


def router(config: dict, latency: LatencyStats | None = None) -> Router:
    cfg = ProjectConfig.model_validate(config)
    return Router(cfg, Providers(cfg, env={}), latency)


def traits(model: str = "auto", tools: bool = False, tags: str = "") -> Traits:
    return Traits(model, tools, False, 10, frozenset(t for t in tags.split(",") if t))


def test_zero_config_resolves_prefixed_and_bare_names():
    r = router({})
    assert r.plan(traits("openai/gpt-4o-mini")).targets == [Target("openai", "gpt-4o-mini")]
    assert r.plan(traits("gpt-4o")).targets == [Target("openai", "gpt-4o")]
    assert r.plan(traits("claude-sonnet-4-6")).targets == [
        Target("anthropic", "claude-sonnet-4-6")]
    assert r.plan(traits("ollama/qwen2.5:7b")).targets == [Target("ollama", "qwen2.5:7b")]
    with pytest.raises(RequestError) as exc:
        r.plan(traits("llama3"))
    assert exc.value.status == 404 and exc.value.code == "model_not_found"


ROUTES = {
    "routes": [{"name": "r", "match": {"model": "auto"}, "strategy": "fastest",
                "targets": ["openai/gpt-4o", "openai/gpt-4o-mini",
                            "anthropic/claude-sonnet-4-6"]}],
}


def test_fastest_uses_observed_latency_and_unknown_goes_last():
    latency = LatencyStats()
    for ms in (900, 1000, 1100):
        latency.add(Target("openai", "gpt-4o"), ms)
    for ms in (300, 350, 400):
        latency.add(Target("anthropic", "claude-sonnet-4-6"), ms)
    plan = router(ROUTES, latency).plan(traits())
    assert [str(t) for t in plan.targets] == [
        "anthropic/claude-sonnet-4-6", "openai/gpt-4o", "openai/gpt-4o-mini"]


def test_constraints_drop_targets_and_say_why():
    latency = LatencyStats()
    latency.add(Target("openai", "gpt-4o"), 5000)
    config = {"routes": [{**ROUTES["routes"][0], "strategy": "cheapest",
                          "max_cost_per_1m": 15, "max_p50_ms": 2000}]}
    r = router(config, latency)
    plan = r.plan(traits())
    # gpt-4o: 5 s p50 > 2 s; sonnet: $3 + $15 per 1M > $15; gpt-4o-mini passes
    assert [str(t) for t in plan.targets] == ["openai/gpt-4o-mini"]
    explained = "\n".join(r.explain(traits()))
    assert "openai/gpt-4o dropped: p50 5000 ms > 2000 ms" in explained
    assert "anthropic/claude-sonnet-4-6 dropped: price per 1M tokens $18.00 > $15.00" in explained
    config["routes"][0]["max_cost_per_1m"] = 0.00001  # in dollars, never as $1e-05
    with pytest.raises(RequestError) as exc:
        router(config, latency).plan(traits())
    assert "openai/gpt-4o-mini dropped: price per 1M tokens $0.75 > $0.00001" in \
        exc.value.message


def test_no_target_left_is_a_503_naming_the_route():
    config = {"routes": [{**ROUTES["routes"][0], "max_cost_per_1m": 0.01}]}
    with pytest.raises(RequestError) as exc:
        router(config).plan(traits())
    assert exc.value.status == 503 and "route 'r': no target meets its constraints" in \
        exc.value.message


def test_rules_match_in_order_and_fallbacks_follow():
    config = {"routes": [
        {"name": "tagged", "match": {"model": "auto", "tags": ["eu"]},
         "targets": ["anthropic/claude-sonnet-4-6"]},
        {"name": "rest", "match": {"model": "auto"}, "targets": ["openai/gpt-4o"]}],
        "fallbacks": {"openai/gpt-4o": ["ollama/qwen2.5:7b"]}}
    r = router(config)
    assert r.plan(traits(tags="eu,x")).rule == "tagged"
    plan = r.plan(traits())
    assert plan.rule == "rest"
    assert [str(t) for t in plan.targets] == ["openai/gpt-4o", "ollama/qwen2.5:7b"]


def test_named_openai_compatible_provider_and_zero_config_serve(tmp_path):
    """No flowc.yaml: the providers come from the environment alone. Then a named
    OpenAI-compatible provider from flowc.yaml, with its own key variable."""
    fake = FakeServer("openai").start()
    env = {**os.environ, "OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "sk-zero",
           "PYTHONPATH": str(ROOT)}
    env.pop("ANTHROPIC_API_KEY", None)
    port = free_port()
    proc = start_server(tmp_path, env, port)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        fake.then(openai_text("zero"))
        assert c.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.content == "zero"
        assert fake.requests[-1].headers["authorization"] == "Bearer sk-zero"
        assert (tmp_path / ".flowc" / "ledger.duckdb").exists()  # the ledger, embedded
    finally:
        stop_server(proc)
    (tmp_path / "flowc.yaml").write_text(
        f"providers:\n  groq:\n    kind: openai_compatible\n    base_url: {fake.url}/openai/v1\n"
        "    api_key_env: GROQ_KEY_FOR_TEST\n")
    proc = start_server(tmp_path, {**env, "GROQ_KEY_FOR_TEST": "gsk-test"}, port)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        raw = c.chat.completions.with_raw_response.create(
            model="groq/llama-3.1-8b-instant", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-flowc-provider"] == "groq"
        sent = fake.requests[-1]
        assert sent.path == "/openai/v1/chat/completions"
        assert sent.headers["authorization"] == "Bearer gsk-test"
        assert sent.body["model"] == "llama-3.1-8b-instant"
    finally:
        stop_server(proc)
        fake.stop()
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--by", "provider"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "groq" in r.stdout and "openai" in r.stdout
