"""OpenTelemetry traces from a real `flowc serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` set:
flowc exports to Rotel (a collector from PyPI) over OTLP/HTTP, Rotel forwards to a loopback
receiver that decodes with the official protobufs (tests/otlp.py). A gateway call that
retries and falls back, a stream, and a pipeline run with a model step and an MCP tool
step, each continuing the client's `traceparent`; prompt content only when asked for; and
nothing of OpenTelemetry's SDK loaded without an endpoint."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, http_error, openai_text, wait_until
from tests.otlp import Receiver, Rotel, Span
from tests.test_metrics import CONFIG, PIPELINE

SECRET_PROMPT = "the launch code is 0000"


@dataclass
class Traced:
    url: str
    receiver: Receiver
    openai: FakeServer
    anthropic: FakeServer
    proc: subprocess.Popen

    def sql(self, query: str) -> list[list]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def serve(project: Path, endpoint: str, **env: str) -> Traced:
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic")}
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("OTEL_") and k != "FLOWC_ADMIN_KEY"}
    full = {**base, "PYTHONPATH": str(ROOT),
            "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
            "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "ANTHROPIC_API_KEY": "sk-ant-test",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            **env}
    port = free_port()
    proc = start_server(project, full, port)
    url = f"http://127.0.0.1:{port}"
    r = httpx.put(url + "/v1/workflows/brief", content=PIPELINE, timeout=30,
                  headers={"content-type": "application/yaml"})
    assert r.status_code == 200, r.text
    return Traced(url, Receiver(), fakes["openai"], fakes["anthropic"], proc)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    receiver = Receiver().start()
    work = tmp_path_factory.mktemp("rotel")
    rotel = Rotel(receiver.url, work)
    t = serve(tmp_path_factory.mktemp("traced"), rotel.url)
    t.receiver = receiver
    yield t
    stop_server(t.proc)
    rotel.stop()
    receiver.stop()
    t.openai.stop()
    t.anthropic.stop()


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start)


def test_a_gateway_call_continues_the_clients_trace(traced: Traced) -> None:
    header, trace_id, parent_id = traceparent()
    traced.openai.then(http_error(500, "boom"), http_error(500, "boom again"))
    oa = openai.OpenAI(base_url=traced.url + "/v1", api_key="sk-x", max_retries=0)
    answer = oa.chat.completions.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": SECRET_PROMPT}],
        extra_headers={"traceparent": header})
    assert answer.model.startswith("claude")
    traced.receiver.wait(lambda r: len(r.trace(trace_id)) >= 4)
    spans = traced.receiver.trace(trace_id)
    [server] = [s for s in spans if s.kind == "server"]
    assert server.parent_id == parent_id  # the client's span is its parent
    assert server.service == "flowc"
    assert server.attrs["http.response.status_code"] == 200
    assert server.attrs["gen_ai.operation.name"] == "chat"
    assert server.attrs["gen_ai.provider.name"] == "anthropic"

    # Each attempt is a span under it: two failures on gpt-4o (a retry), then the fallback.
    attempts = children(spans, server)
    assert [(a.name, a.kind, a.status) for a in attempts] == [
        ("chat gpt-4o", "client", 2), ("chat gpt-4o", "client", 2),
        ("chat claude-sonnet-4-6", "client", 0)]
    first, retry, fallback = attempts
    assert first.attrs["error.type"] == retry.attrs["error.type"] == "UpstreamError"
    assert "boom" in first.status_message
    assert (first.attrs["flowc.attempt"], retry.attrs["flowc.attempt"],
            fallback.attrs["flowc.attempt"]) == (1, 2, 3)
    assert "flowc.fallback" not in retry.attrs and fallback.attrs["flowc.fallback"] == 1
    a = fallback.attrs
    assert a["gen_ai.provider.name"] == a["gen_ai.system"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-sonnet-4-6"
    assert a["flowc.requested_model"] == "openai/gpt-4o"
    assert a["gen_ai.response.model"] == answer.model
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [answer.choices[0].finish_reason]
    query = "SELECT CAST(cost_usd AS VARCHAR) FROM requests WHERE provider = 'anthropic'"
    wait_until(lambda: len(traced.sql(query)) == 1)
    [[cost]] = traced.sql(query)
    assert Decimal(str(a["flowc.cost_usd"])) == Decimal(cost)
    # The attempts lie inside the request, in order.
    assert server.start <= first.start <= first.end <= retry.start <= fallback.start
    assert fallback.end <= server.end
    # Content is off by default.
    everything = json.dumps([s.attrs for s in traced.receiver.spans])
    assert SECRET_PROMPT not in everything and "gen_ai.input.messages" not in everything


def test_a_stream_has_its_time_to_first_token(traced: Traced) -> None:
    header, trace_id, _ = traceparent()
    oa = openai.OpenAI(base_url=traced.url + "/v1", api_key="sk-x", max_retries=0)
    chunks = list(oa.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"traceparent": header}))
    assert chunks
    traced.receiver.wait(lambda r: len(r.trace(trace_id)) >= 2)
    [server] = [s for s in traced.receiver.trace(trace_id) if s.kind == "server"]
    [call] = children(traced.receiver.trace(trace_id), server)
    assert call.attrs["gen_ai.request.stream"] is True
    assert 0 < call.attrs["gen_ai.response.time_to_first_chunk"] < 10
    assert call.attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert call.attrs["gen_ai.usage.output_tokens"] > 0


def test_a_pipeline_run_is_a_tree_of_steps_and_calls(traced: Traced) -> None:
    header, trace_id, parent_id = traceparent()
    traced.openai.then(openai_text("noted"))
    r = httpx.post(traced.url + "/v1/workflow/brief", json={"input": {"topic": "tea"}},
                   headers={"traceparent": header}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    run_id = r.json()["run_id"]
    traced.receiver.wait(lambda rc: len(rc.trace(trace_id)) >= 6)
    spans = traced.receiver.trace(trace_id)
    [run] = [s for s in spans if s.name == "invoke_workflow brief"]
    assert run.parent_id == parent_id
    assert run.attrs["gen_ai.operation.name"] == "invoke_workflow"
    assert run.attrs["gen_ai.workflow.name"] == "brief"
    assert run.attrs["flowc.run_id"] == run_id
    assert run.attrs["flowc.status"] == "succeeded"
    steps = {s.attrs["flowc.step.id"]: s for s in children(spans, run)}
    assert set(steps) == {"now", "say", "never"}
    assert steps["never"].attrs["flowc.step.status"] == "skipped"
    assert "false" in steps["never"].attrs["flowc.step.skip_reason"]
    [tool] = children(spans, steps["now"])
    assert tool.name == "execute_tool get_current_time"
    assert tool.attrs["gen_ai.operation.name"] == "execute_tool"
    assert tool.attrs["gen_ai.tool.name"] == "get_current_time"
    assert tool.attrs["flowc.mcp.server"] == "time"
    [call] = children(spans, steps["say"])
    assert call.name == "chat gpt-4o-mini" and call.kind == "client"
    assert call.attrs["flowc.step.id"] == "say"
    assert call.attrs["gen_ai.usage.input_tokens"] == 19
    [[cost]] = traced.sql("SELECT CAST(cost_usd AS VARCHAR) FROM requests "
                          f"WHERE run_id = '{run_id}'")  # written before the run's answer
    assert Decimal(str(call.attrs["flowc.cost_usd"])) == Decimal(cost)
    assert Decimal(str(steps["say"].attrs["flowc.cost_usd"])) == Decimal(cost)
    assert Decimal(str(run.attrs["flowc.cost_usd"])) == Decimal(cost)
    assert steps["now"].end <= steps["say"].start  # `say` reads `now`


def test_content_is_captured_only_when_asked(tmp_path: Path) -> None:
    receiver = Receiver().start()
    t = serve(tmp_path, receiver.url,
              OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
              OTEL_SERVICE_NAME="gateway-eu")
    try:
        oa = openai.OpenAI(base_url=t.url + "/v1", api_key="sk-x", max_retries=0)
        oa.chat.completions.create(model="fast",
                                   messages=[{"role": "user", "content": SECRET_PROMPT}])
        receiver.wait(lambda r: any(s.kind == "client" for s in r.spans))
        [call] = [s for s in receiver.spans if s.kind == "client"]
        assert call.service == "gateway-eu"
        assert json.loads(call.attrs["gen_ai.input.messages"]) == [
            {"role": "user", "parts": [{"type": "text", "content": SECRET_PROMPT}]}]
        [out] = json.loads(call.attrs["gen_ai.output.messages"])
        assert out["role"] == "assistant" and out["finish_reason"] == "stop"
        assert out["parts"] == [{"type": "text", "content": f"echo: {SECRET_PROMPT}"}]
    finally:
        stop_server(t.proc)
        receiver.stop()
        t.openai.stop()
        t.anthropic.stop()


def test_no_endpoint_no_tracing(tmp_path: Path) -> None:
    """Without an endpoint, a model call and a pipeline run load nothing of the
    OpenTelemetry SDK or its exporter, and set up no tracing."""
    fake = FakeServer("openai").start()
    script = textwrap.dedent(f"""
        import asyncio, sys
        from flowc.config import ProjectConfig
        from runtime.gateway.calls import ModelCaller
        from runtime.gateway.routing import Router
        from runtime.providers import Providers
        from runtime.observe import tracing
        config = ProjectConfig.model_validate({{"models": {{"fast": "openai/gpt-4o-mini"}}}})
        env = {{"OPENAI_BASE_URL": "{fake.url}/v1", "OPENAI_API_KEY": "sk-test"}}
        providers = Providers(config, env)
        caller = ModelCaller(config, providers, Router(config, providers), None)
        async def main():
            out = await caller.complete({{"model": "fast",
                                          "messages": [{{"role": "user", "content": "hi"}}]}})
            await providers.close()
            return out
        out = asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk",
                        "opentelemetry.exporter", "opentelemetry.proto")))
        print(out.usage.total_tokens, tracing.active(), loaded)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(ROOT)}, timeout=60, cwd=tmp_path)
    finally:
        fake.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["29", "None", "[]"]
