"""`POST /v1/responses` with the official `openai` SDK (and raw HTTP where the bytes matter)
against `flowc serve` in front of loopback providers: verbatim to OpenAI, translated to
Anthropic, Ollama and an OpenAI-compatible server, plain and streamed, with
`previous_response_id` and the ledger's rows."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from typing import Any, get_args

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.conftest import ROOT, Gateway, start_server, stop_server
from tests.fakes import (
    anthropic_stream,
    anthropic_text,
    anthropic_tool_use,
    free_port,
    http_error,
    ollama_text,
    ollama_tool_call,
    openai_stream_text,
    wait_until,
)
from tests.fakes_anthropic import (
    THINKING,
    WireServer,
    anthropic_events,
    anthropic_thinking_message,
    openai_reasoning,
)
from tests.fakes_anthropic import stream_events as anthropic_stream_events
from tests.fakes_responses import (
    ENCRYPTED,
    RESPONSE_ID,
    call_item,
    reasoning_item,
    response,
    responses_answer,
    responses_reasoned_call,
    responses_text,
    sse_bytes,
    stream_events,
    text_item,
    usage,
)

CONFIG = """\
models:
  local: ollama/qwen2.5:7b
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
providers:
  openai: {timeout: 5}
  anthropic: {timeout: 5}
  compat: {kind: openai_compatible, base_url: "COMPAT_URL", api_key_env: COMPAT_KEY}
  proxy: {kind: openai_compatible, base_url: "PROXY_URL", api_key_env: COMPAT_KEY,
          responses: true}
retry:
  attempts: 1
  backoff: 0.05
ledger:
  flush_interval: 0.1
"""
CLIENT_KEY = "sk-client-own-key-never-forwarded"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}, "strict": True}
# Each event type's class in the SDK, to validate an event strictly against its own type.
EVENTS = {get_args(cls.model_fields["type"].annotation)[0]: cls
          for cls in get_args(get_args(ResponseStreamEvent)[0])}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    project = tmp_path_factory.mktemp("responses")
    fakes = {k: WireServer(k).start() for k in ("openai", "anthropic", "ollama")}
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG).replace(
        "COMPAT_URL", fakes["openai"].url + "/compat/v1").replace(
        "PROXY_URL", fakes["openai"].url + "/proxy/v1"))
    env = {**os.environ,
           "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "ANTHROPIC_API_KEY": "sk-ant-endpoint-key", "OLLAMA_HOST": fakes["ollama"].url,
           "COMPAT_KEY": "sk-compat-key", "PYTHONPATH": str(ROOT)}
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


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)


def rows(gw: Gateway, n: int, columns: str = "provider, served_model, status, stream, "
         "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, "
         "usage_estimated") -> list[list[Any]]:
    """The last ``n`` ledger rows, oldest first, once they are written."""
    wait_until(lambda: gw.sql("SELECT count(*) FROM requests")[0][0] >= n)
    time.sleep(0.3)
    return gw.sql(f"SELECT {columns} FROM requests ORDER BY ts DESC LIMIT {n}")[::-1]


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A stream's events as (event, data), each checked against the SDK's event types
    (strict validation: a missing or wrong field fails)."""
    out = []
    for frame in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "data" in lines:
            data = json.loads(lines["data"])
            EVENTS[data["type"]].model_validate(data)
            assert lines.get("event") == data["type"]
            out.append((lines["event"], data))
    return out


def post(gw: Gateway, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + "/v1/responses", content=content, timeout=15, headers={
        "content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"})


def check_sequence(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Numbered from 0 in order; opened by created and in_progress; every item added is
    done, every delta belongs to an item added and not yet done; one final event, last."""
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert [e for e, _ in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1][0] in ("response.completed", "response.incomplete", "response.failed")
    open_items: dict[int, str] = {}
    done: set[int] = set()
    for kind, data in events[2:-1]:
        if kind == "response.output_item.added":
            open_items[data["output_index"]] = data["item"]["id"]
        elif kind == "response.output_item.done":
            assert open_items.pop(data["output_index"]) == data["item"]["id"]
            done.add(data["output_index"])
        else:
            assert open_items[data["output_index"]] == data["item_id"], kind
    assert not open_items
    final = events[-1][1]["response"]
    assert len(final["output"]) == len(done)


# -- same wire: verbatim -------------------------------------------------------------------------
def test_verbatim_body_goes_to_openai_byte_for_byte(gw):
    """A body naming OpenAI's own model goes to /v1/responses as its very bytes (odd
    spacing and an unknown field kept), with the endpoint's key in place of the client's;
    the answer's bytes come back as OpenAI sent them, with its request id."""
    raw = (b'{"model":  "gpt-4o-mini", "future_field": {"x": [1, 2]},\n'
           b' "input": "hi", "store": true}')
    gw.openai.then(responses_text("Hello.", input_tokens=9, output_tokens=3))
    r = post(gw, raw)
    assert r.status_code == 200, r.text
    wire = gw.openai.wire[-1]  # type: ignore[attr-defined]
    assert wire.path_qs == "/v1/responses" and wire.raw == raw
    sent = gw.openai.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-test-openai"
    assert CLIENT_KEY not in json.dumps(sent.headers)
    assert r.content == json.dumps(response(sent, "completed", [text_item("Hello.")],
                                            usage(9, 3))).encode()
    assert r.headers["x-request-id"] == "req_b5e4f1e7a8c9d0"
    assert r.headers["x-flowc-provider"] == "openai"
    assert rows(gw, 1) == [["openai", "gpt-4o-mini-2024-07-18", "ok", False, 9, 3, 0, 0,
                            "0.00000315", False]]  # 9 x $0.15/M + 3 x $0.60/M


def test_verbatim_alias_replaces_only_the_model(gw):
    gw.openai.then(responses_text("Hi."))
    body = {"model": "fast", "input": [{"role": "user", "content": "hi"}],
            "service_tier": "flex", "unknown_thing": [1]}
    r = post(gw, body)
    assert r.status_code == 200, r.text
    assert gw.openai.requests[-1].body == {**body, "model": "gpt-4o-mini"}


def test_verbatim_stream_passes_every_event_and_reads_the_usage(gw):
    """OpenAI's stream (a reasoning item with its encrypted content, then a function call)
    reaches the SDK event by event as sent; the ledger has its usage, cached and
    reasoning tokens included."""
    gw.openai.then(responses_reasoned_call("get_weather", {"city": "Oslo"}, "Need weather."))
    with client(gw).responses.stream(model="gpt-4o-mini", input="Weather in Oslo?",
                                     tools=[WEATHER], store=False,
                                     include=["reasoning.encrypted_content"]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    sent = gw.openai.requests[-1]
    expected = stream_events(sent, [reasoning_item("Need weather."),
                                    call_item("get_weather", {"city": "Oslo"})],
                             usage(291, 23, 128, 11))
    assert kinds == [name for name, _ in expected]
    assert final.output[0].encrypted_content == ENCRYPTED
    assert final.output[1].name == "get_weather"
    assert sent.body["include"] == ["reasoning.encrypted_content"]
    gw.openai.then(responses_text())
    r = post(gw, {"model": "gpt-4o-mini", "input": "again", "stream": True})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req_b5e4f1e7a8c9d0"
    assert r.headers["x-ratelimit-remaining-requests"] == "499"
    assert r.content == sse_bytes(stream_events(gw.openai.requests[-1], [text_item(
        "Hello! How can I help?")], usage(36, 87)))
    got = rows(gw, 2)
    assert got[0][:8] == ["openai", "gpt-4o-mini-2024-07-18", "ok", True, 291, 23, 128, 11]
    assert got[0][8] is not None and got[0][9] is False


def test_verbatim_stream_cut_off_is_estimated_and_failed_is_passed_on(gw):
    out = [text_item("one two three four")]
    gw.openai.then(responses_answer(out, usage(10, 5), cut_after=5))
    r = post(gw, {"model": "gpt-4o-mini", "input": "count", "stream": True})
    events = sse(r.content)
    assert [e for e, _ in events] == [e for e, _ in stream_events(
        gw.openai.requests[-1], out, usage(10, 5))[:5]] + ["error"]
    assert "before response.completed" in events[-1][1]["message"]
    assert [d["sequence_number"] for _, d in events] == list(range(6))
    gw.openai.then(responses_answer(out, usage(10, 5), final="response.failed"))
    r = post(gw, {"model": "gpt-4o-mini", "input": "count", "stream": True})
    events = sse(r.content)
    assert events[-1][0] == "response.failed"  # as OpenAI sent it, nothing after it
    got = rows(gw, 2, "status, stream, usage_estimated, completion_tokens > 0")
    assert got == [["error", True, True, True], ["error", True, True, True]]


def test_verbatim_store_false_follow_up_carries_the_conversation(gw):
    """OpenAI keeps no `store: false` response, so flowc does: a follow-up naming it goes
    to OpenAI with the conversation as input, without the id OpenAI would not find."""
    gw.openai.then(responses_text("It is 4 degrees."), responses_text("Yes."))
    c = client(gw)
    first = c.responses.create(model="gpt-4o-mini", input="Weather in Oslo?", store=False)
    assert first.id == RESPONSE_ID
    c.responses.create(model="gpt-4o-mini", input="Cold?", previous_response_id=first.id)
    sent = gw.openai.requests[-1].body
    assert "previous_response_id" not in sent
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]
    assert sent["input"][1]["content"][0]["text"] == "It is 4 degrees."
    assert "id" not in sent["input"][1]  # an id OpenAI never stored


def test_translated_conversation_continued_on_openai(gw):
    """A conversation begun on Anthropic (reasoning and a function call in its output)
    continued on OpenAI: its reasoning item, which has no encrypted content OpenAI could
    read, is left out; the call and its output go as items."""
    gw.anthropic.then(anthropic_events(anthropic_stream_events(anthropic_thinking_message())))
    gw.openai.then(responses_text("4 degrees."))
    c = client(gw)
    with c.responses.stream(model="smart", input="Weather in Oslo?", tools=[WEATHER]) as s:
        first = s.get_final_response()
    assert [o.type for o in first.output] == ["reasoning", "message", "function_call"]
    c.responses.create(model="gpt-4o-mini", previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": "toolu_01Weather", "output": "4"}])
    sent = gw.openai.requests[-1].body
    assert [i.get("type") for i in sent["input"]] == [
        "message", "message", "function_call", "function_call_output"]
    assert sent["input"][2]["call_id"] == "toolu_01Weather"


def test_verbatim_stored_response_id_is_left_to_openai(gw):
    gw.openai.then(responses_text("ok"))
    client(gw).responses.create(model="gpt-4o-mini", input="more",
                                previous_response_id="resp_kept_by_openai")
    assert gw.openai.requests[-1].body["previous_response_id"] == "resp_kept_by_openai"


def test_verbatim_error_in_openai_shape(gw):
    gw.openai.then(http_error(400, "Invalid 'input': too long."))
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).responses.create(model="gpt-4o-mini", input="x")
    assert "Invalid 'input'" in exc.value.message


# -- across wires ---------------------------------------------------------------------------------
def test_anthropic_plain_text(gw):
    gw.anthropic.then(anthropic_text("Bonjour.", input_tokens=20, output_tokens=4))
    r = client(gw).responses.create(model="smart", instructions="Answer in French.",
                                    input="hello", max_output_tokens=100, metadata={"a": "b"},
                                    store=False, prompt_cache_key="k1")
    Response.model_validate(r.model_dump())
    assert r.output_text == "Bonjour." and r.status == "completed"
    assert r.usage.input_tokens == 20 and r.usage.output_tokens == 4
    sent = gw.anthropic.requests[-1].body
    assert sent["system"] in ("Answer in French.",
                              [{"type": "text", "text": "Answer in French."}])
    assert sent["max_tokens"] == 100
    assert "metadata" not in sent or sent["metadata"] != {"a": "b"}
    row = rows(gw, 1)[0]
    assert row[:6] == ["anthropic", "claude-sonnet-4-6", "ok", False, 20, 4]
    assert row[8] == "0.00012"  # 20 x $3/M + 4 x $15/M


def test_anthropic_stream_with_the_sdk_helper(gw):
    gw.anthropic.then(anthropic_stream([("text", "Hello there friend")], input_tokens=12,
                                       output_tokens=5))
    deltas = []
    with client(gw).responses.stream(model="smart", input="hi") as s:
        for event in s:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello there friend "
    assert final.usage.input_tokens == 12 and final.usage.output_tokens == 5
    assert rows(gw, 1)[0][:6] == ["anthropic", "claude-sonnet-4-6", "ok", True, 12, 5]


def test_anthropic_function_call_round_trip(gw):
    """A function call comes back as a function_call item; its output goes to Anthropic as
    the tool_result of the very tool_use."""
    gw.anthropic.then(anthropic_tool_use("get_weather", {"city": "Oslo"}, "toolu_01W"),
                      anthropic_text("4 degrees in Oslo."))
    c = client(gw)
    first = c.responses.create(model="smart", input="Weather in Oslo?", tools=[WEATHER],
                               tool_choice="auto", parallel_tool_calls=False)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls[0].name == "get_weather" and calls[0].call_id == "toolu_01W"
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    sent = gw.anthropic.requests[-1].body
    assert sent["tools"][0]["name"] == "get_weather"
    assert sent["tool_choice"]["disable_parallel_tool_use"] is True
    second = c.responses.create(model="smart", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Oslo?"},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"type": "function_call_output", "call_id": "toolu_01W", "output": "4 degrees"}])
    assert second.output_text == "4 degrees in Oslo."
    msgs = gw.anthropic.requests[-1].body["messages"]
    assert msgs[1]["content"][-1] == {"type": "tool_use", "id": "toolu_01W",
                                      "name": "get_weather", "input": {"city": "Oslo"}}
    assert msgs[2]["content"][0]["tool_use_id"] == "toolu_01W"
    assert "4 degrees" in json.dumps(msgs[2]["content"][0])


CODEX_TOOLS = [
    {"type": "function", "name": "shell", "description": "Runs a shell command",
     "strict": False, "parameters": {"type": "object", "properties": {
         "command": {"type": "array", "items": {"type": "string"}}},
         "required": ["command"], "additionalProperties": False}},
    {"type": "namespace", "name": "mcp_fs", "description": "Files",
     "tools": [{"type": "function", "name": "read_file", "description": "Read a file",
                "parameters": {"type": "object", "properties": {
                    "path": {"type": "string"}}, "required": ["path"]}}]},
    {"type": "web_search", "external_web_access": False},
]


def codex_body(model: str) -> dict[str, Any]:
    """Codex's request as it sends it (see the notes on real clients)."""
    return {"model": model, "stream": True, "store": False, "tool_choice": "auto",
            "parallel_tool_calls": True, "reasoning": {"effort": "medium", "summary": "auto"},
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "019a-session",
            "client_metadata": {"originator": "codex_exec"}, "tools": CODEX_TOOLS,
            "input": [
                {"type": "message", "role": "developer", "content": [
                    {"type": "input_text", "text": "You are Codex. Sandbox: read-only."}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "<environment_context/>"},
                    {"type": "input_text", "text": "read README.md"}]}]}


def test_codex_request_to_anthropic_streamed(gw):
    """Codex's request on a Claude model: the developer message becomes the system prompt,
    the namespace tool's function is flattened (and its call named back with its
    namespace), web_search is dropped with a warning, thinking comes back as a reasoning
    item with its summary; every event parses as the SDK's."""
    msg = anthropic_thinking_message()
    msg["content"] = [msg["content"][0], {"type": "tool_use", "id": "toolu_01R",
                                          "name": "mcp_fs__read_file",
                                          "input": {"path": "README.md"}}]
    gw.anthropic.then(anthropic_events(anthropic_stream_events(msg)))
    r = post(gw, codex_body("claude-sonnet-4-6"))
    assert r.status_code == 200, r.text
    assert "web_search" in r.headers["x-flowc-warning"]
    events = sse(r.content)
    check_sequence(events)
    final = Response.model_validate(events[-1][1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    assert final.output[0].summary[0].text == THINKING
    call = final.output[1]
    assert (call.name, call.namespace, call.call_id) == ("read_file", "mcp_fs", "toolu_01R")
    assert "response.reasoning_summary_text.delta" in [e for e, _ in events]
    sent = gw.anthropic.requests[-1].body
    assert [t["name"] for t in sent["tools"]] == ["shell", "mcp_fs__read_file"]
    assert "Codex" in json.dumps(sent["system"])
    assert sent["messages"][0]["role"] == "user"
    assert sent.get("thinking", {}).get("type") == "enabled"
    for field in ("store", "include", "prompt_cache_key", "client_metadata"):
        assert field not in sent


def test_codex_request_to_openai_verbatim(gw):
    """Codex's request on an OpenAI model goes as sent: the hosted web_search, the
    namespace tool, store false, include, prompt_cache_key and client_metadata."""
    gw.openai.then(responses_reasoned_call("shell", {"command": ["ls"]}, "List files."))
    body = codex_body("gpt-4o-mini")
    r = post(gw, body)
    assert r.status_code == 200 and "x-flowc-warning" not in r.headers
    check_sequence(sse(r.content))
    assert gw.openai.requests[-1].body == body


def test_codex_request_to_ollama_and_the_round_trip(gw):
    """The same on Ollama, and the function call's output sent back (the namespaced call
    as the flat name the model knows)."""
    gw.ollama.then(ollama_tool_call("mcp_fs__read_file", {"path": "README.md"}),
                   ollama_text("It is a README."))
    r = post(gw, codex_body("ollama/qwen2.5:7b"))
    events = sse(r.content)
    check_sequence(events)
    call = events[-1][1]["response"]["output"][-1]
    assert (call["name"], call["namespace"]) == ("read_file", "mcp_fs")
    body = codex_body("ollama/qwen2.5:7b")
    body["input"] += [{"type": "reasoning", "id": "rs_1", "summary": [
                          {"type": "summary_text", "text": "Read the file."}]},
                      {k: call[k] for k in ("type", "call_id", "name", "namespace",
                                            "arguments")},
                      {"type": "function_call_output", "call_id": call["call_id"],
                       "output": "# flowc"}]
    events = sse(post(gw, body).content)
    assert events[-1][1]["response"]["output"][-1]["content"][0]["text"].startswith(
        "It is a README.")
    msgs = gw.ollama.requests[-1].body["messages"]
    assert msgs[-2]["tool_calls"][0]["function"]["name"] == "mcp_fs__read_file"
    assert msgs[-2]["thinking"] == "Read the file."  # the reasoning item, as Ollama's
    assert (msgs[-1]["role"], msgs[-1]["content"]) == ("tool", "# flowc")
    assert gw.ollama.requests[-1].body["think"] == "medium"


def test_ollama_plain_and_streamed_text(gw):
    gw.ollama.then(ollama_text("Blue.", prompt_eval_count=11, eval_count=2),
                   ollama_text("Blue sky today", prompt_eval_count=11, eval_count=4))
    c = client(gw)
    r = c.responses.create(model="local", input="Sky colour?")
    assert r.output_text == "Blue." and r.usage.output_tokens == 2
    stream = c.responses.create(model="local", input="Sky colour?", stream=True)
    kinds, text = [], ""
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            assert event.response.usage.input_tokens == 11
    assert text == "Blue sky today "
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [r[:6] for r in rows(gw, 2)] == [["ollama", "qwen2.5:7b", "ok", False, 11, 2],
                                           ["ollama", "qwen2.5:7b", "ok", True, 11, 4]]


def test_openai_compatible_server_gets_chat_completions(gw):
    """Any OpenAI-compatible server but OpenAI itself gets the translation to chat
    completions; its reasoning_content comes back as a reasoning item."""
    gw.openai.then(openai_reasoning("42.", "Think hard."))
    r = client(gw).responses.create(model="compat/deepseek-r1", input="Answer?",
                                    reasoning={"effort": "high"},
                                    text={"format": {"type": "json_schema", "name": "a",
                                                     "schema": {"type": "object"}}})
    sent = gw.openai.requests[-1]
    assert sent.path == "/compat/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-compat-key"
    assert sent.body["reasoning_effort"] == "high"
    assert sent.body["response_format"]["json_schema"]["name"] == "a"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].summary[0].text == "Think hard."
    assert r.usage.output_tokens_details.reasoning_tokens == 25


def test_a_server_configured_with_responses_gets_them_verbatim(gw):
    """`responses: true` in flowc.yaml: an OpenAI-compatible server that serves the
    Responses API itself gets the client's request as sent, not a translation."""
    gw.openai.then(responses_text("Verbatim."))
    r = post(gw, {"model": "proxy/gpt-4o-mini", "input": "x", "x_unknown": 1})
    sent = gw.openai.requests[-1]
    assert r.status_code == 200, r.text
    assert sent.path == "/proxy/v1/responses"
    assert sent.body["x_unknown"] == 1 and sent.body["model"] == "gpt-4o-mini"
    assert sent.headers["authorization"] == "Bearer sk-compat-key"


def test_translated_stream_reasoning_events(gw):
    gw.openai.then(openai_reasoning("Done now.", "Let me think."))
    r = post(gw, {"model": "compat/deepseek-r1", "input": "x", "stream": True})
    events = sse(r.content)
    check_sequence(events)
    kinds = [e for e, _ in events]
    assert kinds[2:6] == ["response.output_item.added", "response.reasoning_summary_part.added",
                          "response.reasoning_summary_text.delta",
                          "response.reasoning_summary_text.delta"]
    final = events[-1][1]["response"]
    assert final["output"][0]["summary"][0]["text"] == "Let me think. "
    assert final["output"][1]["content"][0]["text"] == "Done now. "


def test_length_ends_incomplete(gw):
    gw.anthropic.then(lambda rec: {**anthropic_text("cut")(rec), "stop_reason": "max_tokens"})
    r = client(gw).responses.create(model="smart", input="long", max_output_tokens=5)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"


# -- previous_response_id -------------------------------------------------------------------------
def test_previous_response_id_on_a_translated_provider(gw):
    """flowc keeps translated responses: the follow-up carries the whole conversation, on
    any provider (here Anthropic, then Ollama)."""
    gw.anthropic.then(anthropic_text("It is 4 degrees."))
    gw.ollama.then(ollama_text("Yes, cold."))
    c = client(gw)
    first = c.responses.create(model="smart", instructions="Be brief.",
                               input="Weather in Oslo?")
    assert first.id.startswith("resp_")
    second = c.responses.create(model="local", input="Cold?",
                                previous_response_id=first.id)
    assert second.previous_response_id == first.id
    msgs = gw.ollama.requests[-1].body["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("user", "Weather in Oslo?"), ("assistant", "It is 4 degrees."), ("user", "Cold?")]


def test_previous_response_id_not_found(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).responses.create(model="smart", input="x",
                                    previous_response_id="resp_nope")
    assert exc.value.body["message"] == "Previous response with id 'resp_nope' not found."
    assert exc.value.body["param"] == "previous_response_id"
    assert not gw.anthropic.requests
    assert rows(gw, 1, "status, error")[0][0] == "refused"


# -- errors ---------------------------------------------------------------------------------------
def test_errors_in_openai_shape(gw):
    r = post(gw, {"model": "smart", "input": "x", "max_output_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
    r = post(gw, {"model": "smart", "input": [{"type": "message", "role": "tool",
                                               "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].role"
    r = post(gw, {"model": "smart", "input": "x", "background": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"
    r = post(gw, {"model": "no-such-model", "input": "x"})
    assert r.status_code in (400, 404) and "error" in r.json()
    assert not gw.anthropic.requests


def test_translated_stream_error_is_response_failed(gw):
    """An upstream that fails after the stream began: the client gets response.failed,
    the ledger an error row with an estimate."""
    from tests.fakes import cut
    gw.ollama.then(cut(ollama_text("one two three four five"), 2))
    r = post(gw, {"model": "local", "input": "count", "stream": True})
    events = sse(r.content)
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"]["message"]
    got = rows(gw, 1, "status, stream, usage_estimated")
    assert got == [["error", True, True]]


def test_chat_stream_through_openai_compatible(gw):
    gw.openai.then(openai_stream_text("a b c", prompt_tokens=7, completion_tokens=3))
    with client(gw).responses.stream(model="compat/llama-3", input="abc") as s:
        final = s.get_final_response()
    assert final.output_text == "a b c "
    # The row names the model as the server says it served the stream.
    assert rows(gw, 1)[0][:6] == ["compat", "gpt-4o-mini-2024-07-18", "ok", True, 7, 3]


def test_image_and_structured_output_to_anthropic(gw):
    """An input_image (a data: URL) reaches Claude as an image block; text.format's JSON
    schema as the structured output Anthropic's adapter serves."""
    gw.anthropic.then(anthropic_tool_use("json_output", {"colour": "red"}))
    r = client(gw).responses.create(model="smart", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Colour?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
         "detail": "low"}]}], text={"format": {
            "type": "json_schema", "name": "colour", "strict": True, "schema": {
                "type": "object", "properties": {"colour": {"type": "string"}},
                "required": ["colour"], "additionalProperties": False}}})
    assert json.loads(r.output_text) == {"colour": "red"}
    content = gw.anthropic.requests[-1].body["messages"][0]["content"]
    assert content[1]["source"] == {"type": "base64", "media_type": "image/png",
                                    "data": "iVBORw0KGgo="}


def test_store_is_bounded_least_recently_used_first():
    from runtime.gateway.responses_store import ResponseStore
    item = [{"type": "message", "role": "user", "content": "x" * 100}]
    store = ResponseStore(max_responses=3, max_bytes=10_000)
    for i in range(4):
        store.put(f"resp_{i}", item)
        if i == 2:
            assert store.get("resp_0") == item  # used: resp_1 is now the oldest
    assert store.get("resp_1") is None and len(store) == 3
    store.put("resp_big", [{"content": "y" * 20_000}])  # larger than the whole store
    assert store.get("resp_big") is None and len(store) == 3
    small = ResponseStore(max_responses=1000, max_bytes=1_000)
    for i in range(20):  # about 150 bytes each: the size bound keeps the newest 6
        small.put(f"r{i}", item)
    assert len(small) == 1_000 // len(json.dumps(item, separators=(",", ":")))
    assert small.get("r19") == item and small.get("r13") is None


@pytest.mark.parametrize("odd", [
    {"input": [{"role": "user", "content": 5}]},
    {"input": [{"role": "user", "content": [1, "x"]}]},
    {"input": [{"type": "function_call_output", "call_id": "c", "output": 7}]},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                "arguments": {"a": 1}}, {"type": "function_call_output", "call_id": "c",
                                         "output": [{"type": "input_text", "text": "ok"}]}]},
    {"input": [{"type": "reasoning", "summary": "not a list"}, "x"]},
    {"input": "x", "tools": [1, {"type": "namespace", "name": "n", "tools": "x"},
                             {"type": "namespace", "name": "n", "tools": [3]}]},
    {"input": "x", "text": {"format": "json"}},
    {"input": "x", "tools": [{"type": "wéb_search\r\nx-evil: 1"}]},
    {"input": "x", "tool_choice": {"type": "function"}},
    {"input": [{"type": "item_reference", "id": "msg_1"}]},
    {"input": [{"type": "message", "role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]},
    {"input": []},
])
def test_odd_requests_are_answered_in_openai_shape(gw, odd):
    """Whatever the shape, the answer is the provider's or a 4xx in OpenAI's error shape,
    never a crash."""
    r = post(gw, {"model": "smart", **odd})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_verbatim_answer_never_carries_the_endpoint_key(gw, stream):
    """An upstream that echoes the request's credential in its answer: the key is cut out
    of the bytes passed on, plain and streamed."""
    def echo(rec):
        return responses_text(f"you sent {rec.headers['authorization']}")(rec)
    gw.openai.then(echo)
    r = post(gw, {"model": "gpt-4o-mini", "input": "x", "stream": stream})
    assert r.status_code == 200
    assert b"you sent Bearer [redacted]" in r.content and b"sk-test-openai" not in r.content
