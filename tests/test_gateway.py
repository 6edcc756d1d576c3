"""The gateway end to end: the official SDKs against `flowc serve`, in front of loopback
servers that speak OpenAI's, Anthropic's and Ollama's wire formats."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.fakes import (
    anthropic_stream,
    anthropic_text,
    anthropic_tool_use,
    dropped,
    http_error,
    malformed,
    ollama_text,
    ollama_tool_call,
    openai_text,
    openai_tool_call,
    slow,
    wait_until,
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="anything", max_retries=0)


def ledger_rows(gw, where: str = "true") -> list[list]:
    time.sleep(0.5)  # one flush interval (0.2 s) and some
    return gw.sql("SELECT provider, served_model, success, prompt_tokens, completion_tokens, "
                  f"cost_usd, error_class, route, stream FROM requests WHERE {where} "
                  "ORDER BY ts")


# -- OpenAI ------------------------------------------------------------------------------------
def test_openai_chat_through_the_sdk(gw):
    gw.openai.then(openai_text("Paris.", prompt_tokens=20, completion_tokens=2))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", temperature=0.2, max_tokens=50,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Capital of France?"}])
    done = raw.parse()
    assert done.choices[0].message.content == "Paris."
    assert done.usage.total_tokens == 22
    sent = gw.openai.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test-openai"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["temperature"] == 0.2
    assert sent.body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert raw.headers["x-flowc-provider"] == "openai"
    assert raw.headers["x-flowc-model"] == "gpt-4o-mini-2024-07-18"
    # gpt-4o-mini: $0.15 / $0.60 per 1M tokens -> 20 * 0.15e-6 + 2 * 0.6e-6
    assert raw.headers["x-flowc-cost-usd"] == "0.0000042"
    assert float(raw.headers["x-flowc-overhead-ms"]) >= 0


def test_openai_stream_always_asks_upstream_for_usage(gw):
    gw.openai.then(openai_text("one two three"))
    stream = client(gw).chat.completions.create(
        model="fast", stream=True, messages=[{"role": "user", "content": "count"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "one two three"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert gw.openai.requests[-1].body["stream_options"] == {"include_usage": True}
    assert stream.response.headers["x-flowc-model"] == "gpt-4o-mini-2024-07-18"  # as served
    rows = ledger_rows(gw, "stream")
    assert rows[-1][:5] == ["openai", "gpt-4o-mini-2024-07-18", True, 19, 10]


def test_openai_stream_usage_for_clients_that_ask(gw):
    gw.openai.then(openai_text("hi there"))
    chunks = list(client(gw).chat.completions.create(
        model="fast", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 29


def test_async_sdk_concurrent_requests(gw):
    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        outs = await asyncio.gather(*(ac.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": f"n{i}"}]) for i in range(8)))
        await ac.close()
        return [o.choices[0].message.content for o in outs]

    assert sorted(asyncio.run(main())) == sorted(f"echo: n{i}" for i in range(8))


def test_openai_tool_calls_pass_through(gw):
    gw.openai.then(openai_tool_call("get_weather", {"city": "Oslo"}))
    out = client(gw).chat.completions.create(
        model="fast", tools=[WEATHER_TOOL], tool_choice="auto",
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Oslo"})
    assert gw.openai.requests[-1].body["tools"] == [WEATHER_TOOL]


# -- Anthropic ---------------------------------------------------------------------------------
def test_anthropic_through_the_openai_sdk(gw):
    gw.anthropic.then(anthropic_text("Bonjour.", input_tokens=100, output_tokens=20,
                                     cache_write=1000, cache_read=2000))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-6", stop=["END"],
        messages=[{"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": "Hello"}])
    out = raw.parse()
    sent = gw.anthropic.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {"model": "claude-sonnet-4-6", "system": "Answer in French.",
                         "messages": [{"role": "user",
                                       "content": [{"type": "text", "text": "Hello"}]}],
                         "max_tokens": 4096, "stop_sequences": ["END"]}
    assert out.choices[0].message.content == "Bonjour."
    assert out.choices[0].finish_reason == "stop"
    # billed input = input + cache writes + cache reads; reads are the cached tokens
    assert out.usage.prompt_tokens == 3100 and out.usage.completion_tokens == 20
    assert out.usage.prompt_tokens_details.cached_tokens == 2000
    # claude-sonnet-4-6: $3 input, $3.75 cache write (5 min), $0.30 cache read, $15 output
    expected = (100 * 3 + 1000 * 3.75 + 2000 * 0.30 + 20 * 15) / 1e6
    assert float(raw.headers["x-flowc-cost-usd"]) == pytest.approx(expected, abs=1e-12)


def test_anthropic_one_hour_cache_writes_are_priced_recorded_and_passed_on(gw):
    gw.anthropic.then(anthropic_text("Oui.", input_tokens=100, output_tokens=20,
                                     cache_write=3000, cache_write_1h=2000))
    msg = anthropic_client(gw).messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    usage = msg.parse().usage
    assert (usage.input_tokens, usage.cache_creation_input_tokens) == (100, 3000)
    assert (usage.cache_creation.ephemeral_5m_input_tokens,
            usage.cache_creation.ephemeral_1h_input_tokens) == (1000, 2000)
    # claude-sonnet-4-6 per 1M: $3 input, $3.75 5-minute write, $6 1-hour write, $15 output
    expected = Decimal(100 * 3 + 1000 * Decimal("3.75") + 2000 * 6 + 20 * 15) / 1_000_000
    assert Decimal(msg.headers["x-flowc-cost-usd"]) == expected
    time.sleep(0.5)
    row = gw.sql("SELECT cache_write_tokens, cache_write_1h_tokens, cost_usd FROM requests "
                 "ORDER BY ts DESC LIMIT 1")[0]
    assert row[:2] == [3000, 2000] and Decimal(str(row[2])) == expected


def test_anthropic_tool_use_maps_to_tool_calls_not_stop(gw):
    gw.anthropic.then(anthropic_tool_use("get_weather", {"city": "San Francisco, CA"}))
    out = client(gw).chat.completions.create(
        model="smart", tools=[WEATHER_TOOL], tool_choice="required",
        messages=[{"role": "user", "content": "Weather in SF?"}])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check that for you."
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_01A09q90qw90lq917835lq9"
    assert json.loads(call.function.arguments) == {"city": "San Francisco, CA"}
    sent = gw.anthropic.requests[-1].body
    assert sent["tools"] == [{"name": "get_weather", "description": "Current weather in a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any"}


def test_anthropic_tool_results_round_trip(gw):
    client(gw).chat.completions.create(model="smart", tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "toolu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "SF"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "15 degrees"}])
    msgs = gw.anthropic.requests[-1].body["messages"]
    assert msgs[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "SF"}}]}
    assert msgs[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"}]}


def test_anthropic_streamed_tool_arguments_arrive_whole(gw):
    args = {"city": "San Francisco, CA", "unit": "celsius"}
    gw.anthropic.then(anthropic_tool_use("get_weather", args))
    chunks = list(client(gw).chat.completions.create(
        model="smart", stream=True, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather?"}]))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id == "toolu_01A09q90qw90lq917835lq9"
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_anthropic_several_streamed_tool_calls_keep_their_indexes(gw):
    gw.anthropic.then(anthropic_stream([
        ("text", "Checking both."),
        ("tool_use", ("toolu_a", "get_weather", {"city": "Oslo"})),
        ("tool_use", ("toolu_b", "get_weather", {"city": "Lima"}))], stop_reason="tool_use"))
    chunks = list(client(gw).chat.completions.create(
        model="smart", stream=True, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Oslo and Lima?"}]))
    args: dict[int, str] = {}
    ids: dict[int, str] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            if tc.id:
                ids[tc.index] = tc.id
    assert ids == {0: "toolu_a", 1: "toolu_b"}
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "Oslo"},
                                                           1: {"city": "Lima"}}


def test_anthropic_tool_without_arguments_streams_empty_object(gw):
    gw.anthropic.then(anthropic_stream([("tool_use", ("toolu_n", "now", {}))],
                                       stop_reason="tool_use"))
    chunks = list(client(gw).chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "time?"}]))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {}


def test_anthropic_stream_usage_is_recorded(gw):
    gw.anthropic.then(anthropic_stream([("text", "streamed words here")], input_tokens=40,
                                       output_tokens=7))
    text = "".join(c.choices[0].delta.content or "" for c in client(gw).chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "hi"}]) if c.choices)
    assert text.strip() == "streamed words here"
    rows = ledger_rows(gw, "provider = 'anthropic' AND stream")
    assert rows[-1][:5] == ["anthropic", "claude-sonnet-4-6", True, 40, 7]


def test_anthropic_refuses_what_it_cannot_honour(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model="smart", logprobs=True,
                                           messages=[{"role": "user", "content": "hi"}])
    assert "anthropic cannot honour 'logprobs'" in exc.value.message
    assert gw.anthropic.requests == []


def test_anthropic_structured_output_through_a_forced_tool(gw):
    gw.anthropic.then(anthropic_tool_use("json_output", {"label": "billing"}))
    out = client(gw).chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "classify"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"label": {"type": "string"}}}}})
    assert json.loads(out.choices[0].message.content) == {"label": "billing"}
    assert out.choices[0].finish_reason == "stop"
    sent = gw.anthropic.requests[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": "json_output"}


# -- Ollama ------------------------------------------------------------------------------------
def test_ollama_chat_and_usage(gw):
    gw.ollama.then(ollama_text("Blue.", prompt_eval_count=26, eval_count=3))
    out = client(gw).chat.completions.create(
        model="local", max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Sky colour?"}])
    sent = gw.ollama.requests[-1]
    assert sent.path == "/api/chat"
    assert sent.body == {"model": "qwen2.5:7b", "stream": False,
                         "messages": [{"role": "user", "content": "Sky colour?"}],
                         "options": {"temperature": 0, "num_predict": 64}}
    assert out.choices[0].message.content == "Blue."
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (26, 3)


def test_ollama_tools_use_the_native_tools_field(gw):
    gw.ollama.then(ollama_tool_call("get_weather", {"city": "Paris"}))
    out = client(gw).chat.completions.create(
        model="ollama/llama3.2", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    sent = gw.ollama.requests[-1].body
    assert sent["tools"] == [WEATHER_TOOL]
    assert "get_weather" not in json.dumps(sent["messages"])  # no prompt trick
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id


def test_ollama_stream_counts_tokens_from_the_final_line(gw):
    gw.ollama.then(ollama_text("a b c", prompt_eval_count=11, eval_count=5))
    chunks = list(client(gw).chat.completions.create(
        model="local", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "abc"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == \
        "a b c"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 5)
    rows = ledger_rows(gw, "provider = 'ollama' AND stream")
    assert rows[-1][3:6] == [11, 5, "0"]  # a local model is free; JSON says so plainly


def test_ollama_refuses_image_urls(gw):
    with pytest.raises(openai.BadRequestError, match="ollama cannot honour image URLs"):
        client(gw).chat.completions.create(model="local", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])


# -- failures, retries, fallbacks --------------------------------------------------------------
def test_rate_limit_is_retried_after_retry_after(gw):
    gw.openai.then(http_error(429, "Rate limit reached", retry_after="0.3"), openai_text("ok"))
    t0 = time.perf_counter()
    out = client(gw).chat.completions.create(model="fast",
                                             messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "ok"
    assert time.perf_counter() - t0 >= 0.3
    assert len(gw.openai.requests) == 2
    rows = ledger_rows(gw, "provider = 'openai'")
    assert [r[2] for r in rows[-2:]] == [False, True]
    assert rows[-2][6] == "UpstreamError"


def test_server_errors_fall_back_to_the_next_model(gw):
    gw.openai.then(*[http_error(500, "boom")] * 3)
    raw = client(gw).chat.completions.with_raw_response.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-flowc-provider"] == "anthropic"
    assert raw.parse().model == "claude-sonnet-4-6"
    assert len(gw.openai.requests) == 3  # first try + 2 retries, then the fallback


def test_timeouts_fall_back(gw):
    gw.openai.then(*[slow(3, openai_text("late"))] * 3)
    raw = client(gw).chat.completions.with_raw_response.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-flowc-provider"] == "anthropic"
    rows = ledger_rows(gw, "provider = 'openai' AND NOT success")
    assert rows[-1][6] == "UpstreamTimeout"


def test_dropped_connections_and_malformed_bodies_fall_back(gw):
    gw.openai.then(dropped(), dropped(), malformed())
    raw = client(gw).chat.completions.with_raw_response.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-flowc-provider"] == "anthropic"


def test_client_errors_are_not_retried(gw):
    gw.openai.then(http_error(400, "Invalid 'messages': bad"))
    with pytest.raises(openai.BadRequestError, match="Invalid 'messages': bad"):
        client(gw).chat.completions.create(model="openai/gpt-4o",
                                           messages=[{"role": "user", "content": "x"}])
    assert len(gw.openai.requests) == 1 and gw.anthropic.requests == []


def test_unknown_model_is_a_404_listing_what_is_available(gw):
    with pytest.raises(openai.NotFoundError) as exc:
        client(gw).chat.completions.create(model="mystery-model",
                                           messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found"
    assert "Available: aliases fast, local, smart; any provider/model of anthropic, " \
           "ollama, openai" in exc.value.message


def test_bad_requests_get_openai_error_objects(gw):
    r = httpx.post(gw.url + "/v1/chat/completions", content=b"{nope", timeout=5,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "fast"}, timeout=5)
    assert r.json()["error"]["param"] == "messages"


# -- routing -----------------------------------------------------------------------------------
def test_route_cheapest_by_tag(gw):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-flowc-tags": "cheap"})
    assert raw.headers["x-flowc-provider"] == "openai"  # gpt-4o-mini is cheaper than sonnet
    assert raw.headers["x-flowc-route"] == "cheap-tagged"


def test_route_by_tools_then_best_by_quality(gw):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-flowc-route"] == "tools-to-openai"
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-flowc-route"] == "auto"
    assert raw.headers["x-flowc-provider"] == "anthropic"  # quality 0.9 > 0.7


def test_routes_explain(gw):
    r = gw.flowc("routes", "explain", "--model", "auto", "--tags", "cheap")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["rule 'cheap-tagged' matches", "  strategy cheapest"]
    assert "order: openai/gpt-4o-mini -> anthropic/claude-sonnet-4-6" in r.stdout


def test_models_health_and_ready(gw):
    ids = [m.id for m in client(gw).models.list()]
    assert {"fast", "local", "smart", "openai/gpt-4o-mini", "ollama/qwen2.5:7b"} <= set(ids)
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/ready").json()
    assert ready["providers"] == {"openai": True, "anthropic": True, "ollama": True}


def test_every_call_is_in_the_ledger_and_costs_cli_reads_it_while_serving(gw):
    before = gw.sql("SELECT count(*) FROM requests")[0][0]
    gw.openai.then(http_error(400, "bad"))
    with pytest.raises(openai.BadRequestError):
        client(gw).chat.completions.create(model="fast",
                                           messages=[{"role": "user", "content": "x"}])
    client(gw).chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    wait_until(lambda: gw.sql("SELECT count(*) FROM requests")[0][0] == before + 2)
    r = gw.flowc("costs", "--sql", "SELECT count(*) AS n FROM requests")
    assert r.returncode == 0, r.stderr
    assert str(before + 2) in r.stdout
    r = gw.flowc("costs", "--by", "model")
    assert "openai/gpt-4o-mini-2024-07-18" in r.stdout
    # An amount the ledger holds as DECIMAL(18, 9) prints plainly however it is asked for
    # (str() of it is "1.00E-7").
    tiny = "SELECT CAST(0.0000001 AS DECIMAL(18, 9)) AS tiny"
    for extra in ((), ("--json",), ("--csv", "-")):
        r = gw.flowc("costs", "--sql", tiny, *extra)
        assert r.returncode == 0, r.stderr
        assert "0.0000001" in r.stdout and "E-" not in r.stdout, (extra, r.stdout)


# -- the Anthropic-compatible endpoint ---------------------------------------------------------
def anthropic_client(gw):
    import anthropic

    return anthropic.Anthropic(base_url=gw.url, api_key="anything", max_retries=0)


def test_anthropic_sdk_against_messages_served_by_openai(gw):
    gw.openai.then(openai_text("Hola.", prompt_tokens=12, completion_tokens=3))
    msg = anthropic_client(gw).messages.create(
        model="openai/gpt-4o-mini", max_tokens=100, system="Answer in Spanish.",
        messages=[{"role": "user", "content": "Hello"}])
    assert msg.content[0].type == "text" and msg.content[0].text == "Hola."
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (12, 3)
    sent = gw.openai.requests[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Answer in Spanish."},
                                {"role": "user", "content": [{"type": "text",
                                                              "text": "Hello"}]}]
    assert sent["max_tokens"] == 100


def test_anthropic_sdk_tool_use_round_trip_served_by_anthropic(gw):
    gw.anthropic.then(anthropic_tool_use("get_weather", {"city": "Rome"}))
    tools = [{"name": "get_weather", "description": "Weather",
              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    msg = anthropic_client(gw).messages.create(
        model="claude-sonnet-4-6", max_tokens=200, tools=tools,
        messages=[{"role": "user", "content": "Weather in Rome?"}])
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert (use.name, use.input) == ("get_weather", {"city": "Rome"})
    # the tool result goes back through the gateway as Anthropic expects it upstream
    anthropic_client(gw).messages.create(
        model="claude-sonnet-4-6", max_tokens=200, tools=tools, messages=[
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id,
                                               "name": "get_weather", "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": "21 degrees"}]}])
    upstream = gw.anthropic.requests[-1].body["messages"]
    assert upstream[1]["content"][0] == {"type": "tool_use", "id": use.id,
                                         "name": "get_weather", "input": {"city": "Rome"}}
    assert upstream[2]["content"][0] == {"type": "tool_result", "tool_use_id": use.id,
                                         "content": "21 degrees"}


def test_anthropic_sdk_streaming_text_and_tools(gw):
    gw.ollama.then(ollama_text("streamed from ollama", prompt_eval_count=9, eval_count=4))
    with anthropic_client(gw).messages.stream(
            model="local", max_tokens=50,
            messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() == "streamed from ollama"
    assert final.usage.output_tokens == 4 and final.stop_reason == "end_turn"

    args = {"city": "Kyoto", "unit": "celsius"}
    gw.anthropic.then(anthropic_tool_use("get_weather", args))
    with anthropic_client(gw).messages.stream(
            model="smart", max_tokens=50, tools=[{
                "name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}],
            messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.input == args and final.stop_reason == "tool_use"


def test_anthropic_errors_use_anthropics_shape(gw):
    import anthropic

    with pytest.raises(anthropic.NotFoundError) as exc:
        anthropic_client(gw).messages.create(model="nope", max_tokens=5,
                                             messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(gw.url + "/v1/messages", json={
        "model": "fast", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "max_tokens: Field required"}}
    # top_k only hints: OpenAI has no such field, so it is dropped, not refused
    r = httpx.post(gw.url + "/v1/messages", json={
        "model": "fast", "max_tokens": 5, "top_k": 3,
        "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and "top_k" not in gw.openai.requests[-1].body
    # a 4xx Anthropic's reference does not list is still invalid_request_error, as it says
    gw.anthropic.then(http_error(422, "unprocessable"))
    with pytest.raises(anthropic.UnprocessableEntityError) as exc:
        anthropic_client(gw).messages.create(model="smart", max_tokens=5,
                                             messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "invalid_request_error"


# -- more of the surface -----------------------------------------------------------------------
def test_provider_keys_never_reach_clients_or_the_ledger(gw):
    gw.openai.then(http_error(401, "Incorrect API key provided: sk-test-openai. You can find "
                                   "your API key at https://platform.openai.com."))
    with pytest.raises(openai.AuthenticationError) as exc:
        client(gw).chat.completions.create(model="fast",
                                           messages=[{"role": "user", "content": "x"}])
    assert "sk-test" not in exc.value.message and "[redacted]" in exc.value.message
    rows = ledger_rows(gw, "error LIKE '%redacted%'")
    assert rows and not gw.sql("SELECT 1 FROM requests WHERE error LIKE '%sk-test%'")


def test_image_parts_reach_each_provider_in_its_own_format(gw):
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
           "AAAABJRU5ErkJggg==")
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]
    client(gw).chat.completions.create(model="smart",
                                       messages=[{"role": "user", "content": parts}])
    assert gw.anthropic.requests[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": png}}]
    client(gw).chat.completions.create(model="local",
                                       messages=[{"role": "user", "content": parts}])
    assert gw.ollama.requests[-1].body["messages"][0] == {
        "role": "user", "content": "What is this?", "images": [png]}
    client(gw).chat.completions.create(model="fast",
                                       messages=[{"role": "user", "content": parts}])
    assert gw.openai.requests[-1].body["messages"][0]["content"] == parts


def test_ollama_streamed_tool_calls(gw):
    gw.ollama.then(ollama_tool_call("get_weather", {"city": "Quito"}))
    chunks = list(client(gw).chat.completions.create(
        model="local", stream=True, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Quito?"}]))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [json.loads(tc.function.arguments) for tc in calls] == [{"city": "Quito"}]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_refused_requests_are_on_the_books(gw):
    """Every request that reaches flowc is a row: one for an unknown model, one with a bad
    body, each with status `refused` and its error class; no provider is called."""
    before = len(gw.openai.requests) + len(gw.anthropic.requests)
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=10, json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "smart", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert len(gw.openai.requests) + len(gw.anthropic.requests) == before
    rows = ledger_rows(gw, "status = 'refused'")
    got = gw.sql("SELECT model, provider, status, error_class, cost_usd FROM requests "
                 "WHERE status = 'refused' ORDER BY ts DESC LIMIT 2")
    assert len(rows) >= 2
    assert ["smart", None, "refused", "RequestError", None] in got
    assert ["no-such-model", None, "refused", "RequestError", None] in got


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/chat/completions", {"model": "fast", "temperature": "hot",
                              "messages": [{"role": "user", "content": "x"}]}, 400,
     "Invalid type for 'temperature': expected a decimal, but got a string instead."),
    ("/v1/chat/completions", {"model": "fast", "max_tokens": -5,
                              "messages": [{"role": "user", "content": "x"}]}, 400,
     "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got -5 "
     "instead."),
    ("/v1/chat/completions", {"model": "fast", "stream": "yes",
                              "messages": [{"role": "user", "content": "x"}]}, 400,
     "Invalid type for 'stream': expected a boolean, but got a string instead."),
    ("/v1/messages", {"model": "smart", "max_tokens": -5,
                      "messages": [{"role": "user", "content": "x"}]}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("/v1/messages", {"model": "smart", "max_tokens": 10, "temperature": True,
                      "messages": [{"role": "user", "content": "x"}]}, 400,
     "temperature: Input should be a valid number"),
])
def test_wrong_typed_fields_are_refused_at_the_edge(gw, path, body, status, message):
    """A wrong-typed standard field is the client's 400, in its provider's words, and no
    upstream hears of it."""
    before = [len(f.requests) for f in (gw.openai, gw.anthropic, gw.ollama)]
    r = httpx.post(gw.url + path, json=body, timeout=10)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] == message
    assert [len(f.requests) for f in (gw.openai, gw.anthropic, gw.ollama)] == before


def test_structured_output_beside_tools_uses_anthropics_own(gw):
    """response_format with tools (pydantic-ai's NativeOutput): no forced tool can carry the
    answer, so Anthropic gets its structured output (`output_config.format`) beside the
    client's tools, and its JSON text is the answer."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    gw.anthropic.then(anthropic_text('{"city": "Paris"}'))
    done = client(gw).chat.completions.create(
        model="smart", tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "Where?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    sent = gw.anthropic.requests[-1].body
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert [t["name"] for t in sent["tools"]] == ["get_weather"]
    assert "tool_choice" not in sent
    assert json.loads(done.choices[0].message.content) == {"city": "Paris"}
