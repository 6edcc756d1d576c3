"""`/v1/messages` at full fidelity, with the official `anthropic` SDK (and raw HTTP where the
bytes matter) against `flowc serve` in front of loopback providers: verbatim to Anthropic,
translated to OpenAI and Ollama, and chat completions translated to Anthropic."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ROOT, Gateway, start_server, stop_server
from tests.fakes import (
    anthropic_text,
    echo_key,
    free_port,
    ollama_text,
    openai_text,
    wait_until,
)
from tests.fakes_anthropic import (
    REDACTED,
    REQUEST_ID,
    SIGNATURE,
    THINKING,
    WireServer,
    anthropic_count,
    anthropic_error,
    anthropic_events,
    anthropic_message,
    anthropic_thinking_message,
    openai_reasoning,
    sse_bytes,
    stream_events,
)

CONFIG = """\
models:
  local: ollama/qwen2.5:7b
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
  thinker: openai/o4-mini
fallbacks:
  anthropic/claude-opus-4-1: [openai/gpt-4o-mini]
providers:
  openai: {timeout: 5}
  anthropic: {timeout: 5}
retry:
  attempts: 1
  backoff: 0.05
ledger:
  flush_interval: 0.1
"""
CLIENT_KEY = "sk-ant-client-own-key-never-forwarded"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    project = tmp_path_factory.mktemp("messages")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    fakes = {k: WireServer(k).start() for k in ("openai", "anthropic", "ollama")}
    env = {**os.environ,
           "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "ANTHROPIC_API_KEY": "sk-ant-endpoint-key", "OLLAMA_HOST": fakes["ollama"].url,
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = start_server(project, env, port)
    yield Gateway(f"http://127.0.0.1:{port}", project, proc, fakes["openai"],
                  fakes["anthropic"], fakes["ollama"], env)
    stop_server(proc)
    for f in fakes.values():
        f.stop()


@pytest.fixture
def gw(server: Gateway) -> Gateway:
    server.reset()
    for fake in (server.openai, server.anthropic, server.ollama):
        fake.wire.clear()  # type: ignore[attr-defined]
    return server


def claude(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)


def rows(gw: Gateway, n: int, columns: str = "provider, served_model, status, stream, "
         "prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, "
         "reasoning_tokens, cost_usd, usage_estimated") -> list[list[Any]]:
    """The last ``n`` ledger rows, oldest first, once they are written."""
    wait_until(lambda: gw.sql("SELECT count(*) FROM requests")[0][0] >= n)
    time.sleep(0.3)
    return gw.sql(f"SELECT {columns} FROM requests ORDER BY ts DESC LIMIT {n}")[::-1]


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A response's SSE events as (event, data)."""
    out = []
    for frame in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


# Claude Code's request as it sends it (see the notes on real clients): adaptive thinking,
# context management, effort, 3 system blocks (2 cached), cached user blocks, its user id,
# tools, and with a model that is not Claude's a system message in the conversation.
CC_USER_ID = ("user_2f1c3b6a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"
              "_account_7b3e1f0c-2d4a-4e5b-9c6d-8a7f6e5d4c3b_session_1a2b3c4d-5e6f-4a7b"
              "-8c9d-0e1f2a3b4c5d")


def claude_code_body(model: str) -> dict[str, Any]:
    return {
        "model": model, "max_tokens": 32000, "stream": True,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": CC_USER_ID},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Use the tools to help the user.",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "tools": [WEATHER, {"name": "Bash", "description": "Run a command",
                            "input_schema": {"type": "object", "properties": {
                                "command": {"type": "string"}}, "required": ["command"]}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "Weather in Oslo?",
                 "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Call the tool.", "signature": SIGNATURE},
                {"type": "redacted_thinking", "data": REDACTED},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": [
                    {"type": "text", "text": "4 degrees"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "iVBORw0KGgo="}}]},
                {"type": "text", "text": "And tomorrow?", "cache_control": {
                    "type": "ephemeral"}}]},
            {"role": "system", "content": "The user prefers Celsius."},
        ]}


CC_HEADERS = {"anthropic-version": "2023-06-01", "x-app": "cli",
              "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                                "context-management-2025-06-27,effort-2025-11-24,"
                                "mid-conversation-system-2026-04-07",
              "x-api-key": CLIENT_KEY}


# -- same wire: verbatim -------------------------------------------------------------------------
def test_same_wire_request_goes_upstream_byte_for_byte(gw):
    """A body naming the target's own model goes upstream as its very bytes (odd spacing,
    an unknown field and all), with the client's beta header, version and query; the
    client's credentials are replaced by the endpoint's key; the answer comes back as sent."""
    raw = (b'{"model":  "claude-sonnet-4-6", "max_tokens": 64,\n "future_field": {"x": [1, 2]},'
           b' "messages": [{"role": "user", "content": "hi"}]}')
    gw.anthropic.then(anthropic_text("Hello.", input_tokens=9, output_tokens=3))
    r = httpx.post(gw.url + "/v1/messages?beta=true", content=raw, timeout=10, headers={
        "content-type": "application/json", "x-api-key": CLIENT_KEY,
        "authorization": f"Bearer {CLIENT_KEY}", "anthropic-version": "2023-06-01",
        "anthropic-beta": "context-management-2025-06-27,effort-2025-11-24"})
    assert r.status_code == 200, r.text
    wire = gw.anthropic.wire[-1]
    assert wire.path_qs == "/v1/messages?beta=true"
    assert wire.raw == raw
    sent = gw.anthropic.requests[-1].headers
    assert sent["x-api-key"] == "sk-ant-endpoint-key" and "authorization" not in sent
    assert sent["anthropic-beta"] == "context-management-2025-06-27,effort-2025-11-24"
    assert sent["anthropic-version"] == "2023-06-01"
    assert CLIENT_KEY not in json.dumps(sent)
    assert r.json()["id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"  # not re-minted
    assert r.json()["content"] == [{"type": "text", "text": "Hello."}]
    assert r.headers["x-flowc-provider"] == "anthropic"


def test_alias_replaces_only_the_model_and_defaults_the_version(gw):
    """Through an alias the body is re-serialised with the target's model, every other
    field as the client sent it; without an `anthropic-version` the default is sent."""
    body = {"model": "smart", "max_tokens": 50, "service_tier": "auto", "top_k": 5,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
            "container": {"id": "c1"}}
    r = httpx.post(gw.url + "/v1/messages", json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert json.loads(gw.anthropic.wire[-1].raw) == {**body, "model": "claude-sonnet-4-6"}
    assert gw.anthropic.requests[-1].headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in gw.anthropic.requests[-1].headers


def test_claude_code_request_reaches_anthropic_verbatim_and_streams_back_intact(gw):
    """Claude Code's request, streamed: upstream gets every field as sent; the stream of
    thinking (with its signature), redacted thinking, text and a tool call comes back event
    for event; the ledger row has the cache reads and writes and their cost."""
    answer = anthropic_thinking_message(input_tokens=50, output_tokens=80, cache_write=1000,
                                        cache_read=20000)
    gw.anthropic.then(anthropic_message(answer))
    body = claude_code_body("claude-sonnet-4-6")
    r = httpx.post(gw.url + "/v1/messages?beta=true", json=body, headers=CC_HEADERS,
                   timeout=10)
    assert r.status_code == 200, r.text
    assert json.loads(gw.anthropic.wire[-1].raw) == body
    assert gw.anthropic.wire[-1].path_qs == "/v1/messages?beta=true"
    assert gw.anthropic.requests[-1].headers["anthropic-beta"] == CC_HEADERS["anthropic-beta"]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sse(r.content) == [(name, data) for name, data in stream_events(answer)]
    assert r.content == b"".join(sse_bytes(stream_events(answer))).replace(b"\r", b"")

    [row] = rows(gw, 1)
    # billed input = input + cache writes + reads; reads are the cached tokens
    assert row[:9] == ["anthropic", "claude-sonnet-4-6", "ok", True, 21050, 80, 20000, 1000, 0]
    # claude-sonnet-4-6 per 1M: $3 input, $3.75 5-minute write, $0.30 read, $15 output
    expected = (50 * 3 + 1000 * Decimal("3.75") + 20000 * Decimal("0.30") + 80 * 15) / 10**6
    assert Decimal(str(row[9])) == expected and row[10] is False


def test_sdk_stream_keeps_thinking_signatures_and_tool_use(gw):
    gw.anthropic.then(anthropic_message(anthropic_thinking_message()))
    with claude(gw).beta.messages.stream(
            model="claude-sonnet-4-6", max_tokens=2048, tools=[WEATHER],
            thinking={"type": "enabled", "budget_tokens": 1024},
            betas=["interleaved-thinking-2025-05-14"],
            messages=[{"role": "user", "content": "Weather in Oslo?"}]) as stream:
        final = stream.get_final_message()
    kinds = [b.type for b in final.content]
    assert kinds == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert final.content[0].thinking == THINKING
    assert final.content[0].signature == SIGNATURE
    assert final.content[1].data == REDACTED
    assert final.content[3].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 80
    sent = gw.anthropic.requests[-1].headers["anthropic-beta"]
    assert sent == "interleaved-thinking-2025-05-14"


def test_plain_answer_with_cache_is_passed_on_and_priced(gw):
    answer = anthropic_thinking_message(input_tokens=10, output_tokens=20, cache_write=3000,
                                        cache_write_1h=2000, cache_read=500)
    gw.anthropic.then(anthropic_message(answer))
    raw = claude(gw).messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert json.loads(raw.http_response.content) == answer
    assert raw.request_id == REQUEST_ID  # the upstream's, as the SDK reads it
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    msg = raw.parse()
    assert msg.content[0].signature == SIGNATURE and msg.content[1].data == REDACTED
    # $3 input, $3.75 5-minute write, $6 1-hour write, $0.30 read, $15 output per 1M
    expected = (10 * 3 + 1000 * Decimal("3.75") + 2000 * 6 + 500 * Decimal("0.30")
                + 20 * 15) / 10**6
    assert Decimal(raw.headers["x-flowc-cost-usd"]) == expected
    [row] = rows(gw, 1, "prompt_tokens, cached_tokens, cache_write_tokens, "
                       "cache_write_1h_tokens, cost_usd, stream")
    assert row[:4] == [3510, 500, 3000, 2000] and Decimal(str(row[4])) == expected
    assert row[5] is False


def test_upstream_errors_pass_through_in_anthropics_shape(gw):
    gw.anthropic.then(anthropic_error(400, "invalid_request_error",
                                      "messages.0.content: Field required"))
    with pytest.raises(anthropic.BadRequestError) as exc:
        claude(gw).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])
    assert exc.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages.0.content: Field required"},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
    [row] = rows(gw, 1, "provider, status, error_class")
    assert row == ["anthropic", "error", "UpstreamError"]


def test_error_event_mid_stream_is_passed_on(gw):
    events = stream_events(anthropic_thinking_message())[:4]
    events.append(("error", {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}}))
    gw.anthropic.then(anthropic_events(events))
    r = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "smart", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "x"}]})
    got = sse(r.content)
    assert got[:4] == events[:4]
    assert got[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "Overloaded"}})
    [row] = rows(gw, 1, "status, error_class, prompt_tokens, usage_estimated")
    assert row == ["error", "UpstreamError", 50, True]  # message_start's input count kept


def test_the_endpoint_key_is_cut_out_of_verbatim_answers(gw):
    gw.anthropic.then(echo_key("anthropic", "content"))
    msg = claude(gw).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                     messages=[{"role": "user", "content": "x"}])
    assert "sk-ant-endpoint-key" not in msg.content[0].text
    assert "[redacted]" in msg.content[0].text


def test_a_failed_anthropic_call_falls_back_to_openai_translated(gw):
    """Each target is called its own way within one request: verbatim to Anthropic, which
    is overloaded (retried, then given up), then translated to the fallback on OpenAI."""
    overloaded = anthropic_error(529, "overloaded_error", "Overloaded")
    gw.anthropic.then(overloaded, overloaded)
    gw.openai.then(openai_text("From the fallback.", prompt_tokens=14, completion_tokens=4))
    raw = claude(gw).messages.with_raw_response.create(
        model="anthropic/claude-opus-4-1", max_tokens=50, thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "hi"}])
    msg = raw.parse()
    assert msg.content[0].text == "From the fallback." and msg.id.startswith("msg_")
    assert raw.headers["x-flowc-provider"] == "openai"
    assert json.loads(gw.anthropic.wire[-1].raw)["model"] == "claude-opus-4-1"
    assert gw.openai.requests[-1].body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    got = rows(gw, 3, "provider, status, error_class")
    assert got == [["anthropic", "error", "UpstreamError"], ["anthropic", "error",
                                                             "UpstreamError"],
                   ["openai", "ok", None]]


# -- across wires: to OpenAI and Ollama ----------------------------------------------------------
def test_claude_code_request_translated_for_openai(gw):
    """The same request with a model that is not Claude's: exactly this reaches OpenAI.
    Hints are dropped (cache_control, thinking and effort for a model that does not reason,
    context_management), the system blocks are joined by a blank line, the system message
    stays in place, the tool result's image follows it in a user message."""
    gw.openai.then(openai_text("Tomorrow: 6 degrees.", prompt_tokens=900, completion_tokens=7))
    body = claude_code_body("fast")
    fields = {k: v for k, v in body.items() if k not in ("stream", "context_management")}
    with claude(gw).messages.stream(**fields, extra_headers=CC_HEADERS, extra_body={
            "context_management": body["context_management"]}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    sent = gw.openai.requests[-1].body
    assert sent == {
        "model": "gpt-4o-mini", "max_tokens": 16384, "stream": True,  # its most
        "stream_options": {"include_usage": True},
        "user": hashlib.sha256(CC_USER_ID.encode()).hexdigest(),
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.3\n\n"
                                          "You are Claude Code, Anthropic's official CLI.\n\n"
                                          "Use the tools to help the user."},
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "Weather in Oslo?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "toolu_01A", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01A", "content": "4 degrees"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": "And tomorrow?"}]},
            {"role": "system", "content": "The user prefers Celsius."}],
        "tools": [{"type": "function", "function": {
            "name": t["name"], "description": t["description"],
            "parameters": t["input_schema"]}} for t in claude_code_body("fast")["tools"]]}
    assert "".join(b.text for b in final.content if b.type == "text").strip() == \
        "Tomorrow: 6 degrees."
    start = next(e for e in events if e.type == "message_start")
    assert start.message.id.startswith("msg_") and not start.message.id.startswith("msg_msg")
    assert start.message.usage.input_tokens > 0  # estimated until the upstream's arrives
    assert (final.usage.input_tokens, final.usage.output_tokens) == (900, 7)
    [row] = rows(gw, 1)
    assert row[:6] == ["openai", "gpt-4o-mini-2024-07-18", "ok", True, 900, 7]
    assert row[9] is not None and Decimal(str(row[9])) > 0 and row[10] is False


def test_openai_cache_reads_come_back_as_cache_reads_and_are_priced(gw):
    gw.openai.then(openai_text("Sure.", prompt_tokens=3000, completion_tokens=10, cached=2048))
    raw = claude(gw).messages.with_raw_response.create(
        model="fast", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    usage = raw.parse().usage
    assert (usage.input_tokens, usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens, usage.output_tokens) == (952, 2048, 0, 10)
    assert raw.parse().id == "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT"
    # gpt-4o-mini per 1M: $0.15 input, $0.075 cached input, $0.60 output
    expected = (952 * Decimal("0.15") + 2048 * Decimal("0.075") + 10 * Decimal("0.60")) / 10**6
    assert Decimal(raw.headers["x-flowc-cost-usd"]) == expected
    [row] = rows(gw, 1)
    assert row[4:7] == [3000, 10, 2048] and Decimal(str(row[9])) == expected


def test_chat_tool_loop_without_a_thinking_block_leaves_thinking_off(gw):
    """Answering tool results of a chat history (which cannot carry Claude's signed thinking
    block) with thinking on is refused by Anthropic: the effort is dropped there."""
    chat(gw).chat.completions.create(
        model="smart", reasoning_effort="high",
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "parameters": WEATHER["input_schema"]}}],
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "toolu_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "4 degrees"}])
    assert "thinking" not in gw.anthropic.requests[-1].body


def test_thinking_and_effort_map_to_reasoning_effort_for_a_reasoning_model(gw):
    gw.openai.then(openai_reasoning("42.", "Six times seven."))
    msg = claude(gw).messages.create(
        model="thinker", max_tokens=20000, extra_body={"temperature": 1},
        thinking={"type": "enabled", "budget_tokens": 10000},
        messages=[{"role": "user", "content": "6*7?"}])
    sent = gw.openai.requests[-1].body
    assert sent["reasoning_effort"] == "medium" and sent["max_completion_tokens"] == 20000
    assert "max_tokens" not in sent and "thinking" not in sent
    assert "temperature" not in sent  # o-series models take only the default
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Six times seven." and msg.content[1].text == "42."
    assert msg.id == "msg_R3as0n1ng"
    # output_config.effort says it outright and wins over the budget
    claude(gw).messages.create(
        model="thinker", max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"effort": "max"}, messages=[{"role": "user", "content": "6*7?"}])
    assert gw.openai.requests[-1].body["reasoning_effort"] == "high"
    # disabled thinking: no reasoning_effort, and no thinking block shown
    gw.openai.then(openai_reasoning("42.", "Six times seven."))
    msg = claude(gw).messages.create(
        model="thinker", max_tokens=2000, thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "6*7?"}])
    assert "reasoning_effort" not in gw.openai.requests[-1].body
    assert [b.type for b in msg.content] == ["text"]


def test_streamed_reasoning_arrives_as_a_thinking_block(gw):
    gw.openai.then(openai_reasoning("It is 42.", "Six times seven is forty-two.",
                                    prompt_tokens=12, completion_tokens=30))
    with claude(gw).messages.stream(
            model="thinker", max_tokens=5000, thinking={"type": "adaptive"},
            messages=[{"role": "user", "content": "6*7?"}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking.strip() == "Six times seven is forty-two."
    assert final.content[1].text.strip() == "It is 42."
    assert "reasoning_effort" not in gw.openai.requests[-1].body  # adaptive: model's default
    [row] = rows(gw, 1)
    assert row[4:6] == [12, 30] and row[8] == 25  # reasoning tokens on the books


def test_structured_output_on_an_openai_target(gw):
    schema = {"type": "object", "properties": {"label": {"type": "string"}},
              "required": ["label"], "additionalProperties": False}
    gw.openai.then(openai_text('{"label": "billing"}'))
    msg = claude(gw).messages.create(
        model="fast", max_tokens=100, output_config={"format": {"type": "json_schema",
                                                                "schema": schema}},
        messages=[{"role": "user", "content": "classify: my card was charged twice"}])
    assert json.loads(msg.content[0].text) == {"label": "billing"}
    assert gw.openai.requests[-1].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    # the beta name litellm sends
    r = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "fast", "max_tokens": 100, "output_format": {"type": "json_schema",
                                                              "schema": schema},
        "messages": [{"role": "user", "content": "classify"}]})
    assert r.status_code == 200
    assert gw.openai.requests[-1].body["response_format"]["json_schema"]["schema"] == schema


def test_ollama_target_drops_hints_it_has_no_field_for(gw):
    gw.ollama.then(ollama_text("Hei.", prompt_eval_count=11, eval_count=2))
    msg = claude(gw).messages.create(
        model="local", max_tokens=30, extra_body={"top_k": 5}, thinking={"type": "disabled"},
        service_tier="auto", metadata={"user_id": "u-1"},
        tool_choice={"type": "auto", "disable_parallel_tool_use": True}, tools=[WEATHER],
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in Norwegian."}],
        messages=[{"role": "user", "content": "Hi"}])
    assert msg.content[0].text == "Hei." and msg.usage.input_tokens == 11
    sent = gw.ollama.requests[-1].body
    assert sent["messages"][0] == {"role": "system",
                                   "content": "Be brief.\n\nAnswer in Norwegian."}
    assert sent["options"] == {"num_predict": 30}
    assert "think" not in sent


def test_unmappable_blocks_are_refused_in_anthropics_shape(gw):
    r = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "fast", "max_tokens": 10,
        "messages": [{"role": "user", "content": [
            {"type": "container_upload", "file_id": "file_1"}]}]})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages.0: content blocks of type 'container_upload' are not supported "
                   "when the model is not a Claude model"}}
    assert gw.openai.requests == []


# -- count_tokens --------------------------------------------------------------------------------
def test_count_tokens_is_exact_from_anthropic_and_estimated_elsewhere(gw):
    time.sleep(0.4)  # the rows of earlier tests are written
    before = gw.sql("SELECT count(*) FROM requests")[0][0]
    gw.anthropic.then(anthropic_count(2095))
    raw = claude(gw).messages.with_raw_response.count_tokens(
        model="smart", system="Be brief.", messages=[{"role": "user", "content": "Hello"}])
    assert raw.parse().input_tokens == 2095
    assert "x-flowc-estimated" not in raw.headers
    assert gw.anthropic.wire[-1].path_qs == "/v1/messages/count_tokens"
    assert json.loads(gw.anthropic.wire[-1].raw) == {
        "model": "claude-sonnet-4-6", "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello"}]}
    assert gw.anthropic.requests[-1].headers["x-api-key"] == "sk-ant-endpoint-key"

    text = "word " * 400
    raw = claude(gw).messages.with_raw_response.count_tokens(
        model="fast", messages=[{"role": "user", "content": text}])
    assert raw.headers["x-flowc-estimated"] == "true"
    assert raw.parse().input_tokens == len(text) // 4
    assert gw.openai.requests == []
    time.sleep(0.4)  # counting calls no model: no ledger row
    assert gw.sql("SELECT count(*) FROM requests")[0][0] == before


# -- chat completions -> Anthropic ---------------------------------------------------------------
def chat(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="anything", max_retries=0)


def test_chat_hints_are_dropped_not_refused(gw):
    chat(gw).chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "hi"}], store=True,
        metadata={"k": "v"}, prompt_cache_key="pck", service_tier="auto",
        safety_identifier="sid-1", seed=7, logprobs=False, user="u-9", verbosity="low",
        max_completion_tokens=300, presence_penalty=0.5, parallel_tool_calls=False)
    assert gw.anthropic.requests[-1].body == {
        "model": "claude-sonnet-4-6", "max_tokens": 300, "metadata": {"user_id": "u-9"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    with pytest.raises(openai.BadRequestError, match="anthropic cannot honour n > 1"):
        chat(gw).chat.completions.create(model="smart", n=2,
                                         messages=[{"role": "user", "content": "hi"}])


def test_chat_reasoning_effort_becomes_a_thinking_budget_and_comes_back(gw):
    gw.anthropic.then(anthropic_message(anthropic_thinking_message()))
    out = chat(gw).chat.completions.create(
        model="smart", reasoning_effort="high", max_completion_tokens=1000, temperature=0.2,
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "parameters": WEATHER["input_schema"]}}],
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    sent = gw.anthropic.requests[-1].body
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert sent["max_tokens"] == 17384 and "temperature" not in sent
    message = out.choices[0].message
    assert message.model_extra["reasoning_content"] == THINKING
    assert message.tool_calls[0].function.name == "get_weather"

    gw.anthropic.then(anthropic_message(anthropic_thinking_message()))
    chunks = list(chat(gw).chat.completions.create(
        model="smart", reasoning_effort="low", stream=True,
        messages=[{"role": "user", "content": "Weather?"}]))
    assert gw.anthropic.requests[-1].body["thinking"] == {"type": "enabled",
                                                          "budget_tokens": 2048}
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert reasoning == THINKING
    # a forced tool: Anthropic takes no thinking with one, so the effort is dropped
    chat(gw).chat.completions.create(
        model="smart", reasoning_effort="medium", tool_choice="required",
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "parameters": WEATHER["input_schema"]}}],
        messages=[{"role": "user", "content": "Weather?"}])
    assert "thinking" not in gw.anthropic.requests[-1].body
