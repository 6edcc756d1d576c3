"""Chat completions on Ollama targets, through the official `openai` SDK against `flowc
serve` in front of a loopback server speaking Ollama's `/api/chat`: forced tools (named and
`required`) through `format`, `parallel_tool_calls: false`, `reasoning_effort` as `think`
and `thinking` back as `reasoning_content`, the SDK's structured-output helpers, and which
fields are mapped, dropped or refused (docs/wires/ollama.md)."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from runtime.providers import RequestError
from runtime.providers.ollama import THINK, build_request, forced_call
from tests.fakes_ollama import ollama_answer, ollama_json

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class City(BaseModel):
    name: str
    population: int


PARIS = {"name": "Paris", "population": 2100000}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="anything", max_retries=0)


def rows(gw, where: str) -> list[list]:
    time.sleep(0.5)  # one flush interval (0.2 s) and some
    return gw.sql("SELECT provider, served_model, status, prompt_tokens, completion_tokens, "
                  f"cost_usd, error_class, stream FROM requests WHERE {where} ORDER BY ts")


def streamed_calls(chunks: list) -> tuple[dict[int, dict], list[str]]:
    """Tool calls put together from streamed deltas, as a client does; and the finish
    reasons seen."""
    calls: dict[int, dict] = {}
    finishes = []
    for c in chunks:
        for choice in c.choices:
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
            for d in choice.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] = (d.function.name if d.function else None) or call["name"]
                call["arguments"] += (d.function.arguments if d.function else None) or ""
    return calls, finishes


# -- forced tools --------------------------------------------------------------------------------
def test_a_named_tool_is_forced_through_format_and_comes_back_as_its_call(gw):
    gw.ollama.then(ollama_json({"city": "Paris"}, prompt_eval_count=40, eval_count=7))
    done = client(gw).chat.completions.create(
        model="local", tools=[WEATHER, TIME], messages=ASK,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sent = gw.ollama.requests[-1].body
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]  # only that one
    assert sent["format"] == WEATHER["function"]["parameters"]
    assert sent["messages"][0]["role"] == "system"
    assert "'get_weather'" in sent["messages"][0]["content"]
    assert sent["messages"][1:] == [{"role": "user", "content": "Weather in Paris?"}]
    row = rows(gw, "provider = 'ollama'")[-1]
    assert row[:5] == ["ollama", "qwen2.5:7b", "ok", 40, 7]
    assert Decimal(row[5]) == 0 and row[6:] == [None, False]  # a local model costs $0


def test_the_forcing_instruction_joins_the_clients_own_system_message(gw):
    gw.ollama.then(ollama_json({"city": "Oslo"}))
    client(gw).chat.completions.create(
        model="local", tools=[WEATHER], tool_choice="required",
        messages=[{"role": "developer", "content": "Be brief."}, *ASK])
    first = gw.ollama.requests[-1].body["messages"][0]
    assert first["role"] == "system"
    assert first["content"].startswith("Be brief.\n\nCall the function 'get_weather'")


def test_a_forced_tool_streams_as_argument_deltas_of_one_call(gw):
    gw.ollama.then(ollama_json({"city": "Paris", "unit": "celsius"}, pieces=5))
    chunks = list(client(gw).chat.completions.create(
        model="local", tools=[WEATHER], messages=ASK, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls, finishes = streamed_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert finishes == ["tool_calls"]
    deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or ()]
    assert len(deltas) >= 4  # the arguments arrive as they are written
    assert all(d.id is None for d in deltas[1:])  # the id and name come once
    assert not any(ch.delta.content for c in chunks for ch in c.choices)
    assert gw.ollama.requests[-1].body["stream"] is True


def test_required_with_several_tools_forces_one_of_them(gw):
    gw.ollama.then(ollama_json({"name": "get_time", "arguments": {"tz": "UTC"}}))
    done = client(gw).chat.completions.create(
        model="local", tools=[WEATHER, TIME], tool_choice="required", messages=ASK)
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"tz": "UTC"}
    sent = gw.ollama.requests[-1].body
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    options = sent["format"]["anyOf"]
    assert [o["properties"]["name"]["enum"] for o in options] == [["get_weather"],
                                                                  ["get_time"]]
    assert options[1]["properties"]["arguments"] == TIME["function"]["parameters"]


def test_required_with_several_tools_streamed(gw):
    gw.ollama.then(ollama_json({"name": "get_weather", "arguments": {"city": "Rome"}}))
    chunks = list(client(gw).chat.completions.create(
        model="local", tools=[WEATHER, TIME], tool_choice="required", messages=ASK,
        stream=True, stream_options={"include_usage": True}))
    calls, finishes = streamed_calls(chunks)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Rome"})]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage.prompt_tokens == 34 and chunks[-1].usage.completion_tokens == 12


def test_a_forced_request_answered_with_a_native_tool_call_keeps_it(gw):
    gw.ollama.then(ollama_answer(tool_calls=[("get_weather", {"city": "Lima"})]))
    done = client(gw).chat.completions.create(
        model="local", tools=[WEATHER], messages=ASK,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = done.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Lima"})


def test_an_answer_that_does_not_keep_to_the_format_stays_text(gw):
    gw.ollama.then(ollama_answer("I cannot decide.", done_reason="length"))
    done = client(gw).chat.completions.create(
        model="local", tools=[WEATHER, TIME], tool_choice="required", messages=ASK)
    assert done.choices[0].message.content == "I cannot decide."
    assert done.choices[0].message.tool_calls is None
    assert done.choices[0].finish_reason == "length"


def test_tool_choice_naming_a_missing_function_is_the_clients_400(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(
            model="local", tools=[WEATHER], messages=ASK,
            tool_choice={"type": "function", "function": {"name": "get_tide"}})
    assert exc.value.body["param"] == "tool_choice"
    assert "no function named 'get_tide' in 'tools'" in exc.value.message
    assert gw.ollama.requests == []


def test_allowed_tools_sends_only_those(gw):
    gw.ollama.then(ollama_json({"tz": "CET"}))
    done = client(gw).chat.completions.create(
        model="local", tools=[WEATHER, TIME], messages=ASK,
        tool_choice={"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {
                "name": "get_time"}}]}})
    assert done.choices[0].message.tool_calls[0].function.name == "get_time"
    assert [t["function"]["name"] for t in gw.ollama.requests[-1].body["tools"]] == [
        "get_time"]


# -- parallel_tool_calls ---------------------------------------------------------------------------
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("parallel", [False, None])
def test_parallel_tool_calls_false_keeps_the_first_call(gw, parallel):
    gw.ollama.then(ollama_answer(tool_calls=TWO_CALLS))
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    done = client(gw).chat.completions.create(model="local", tools=[WEATHER], messages=ASK,
                                              **extra)
    cities = [json.loads(c.function.arguments)["city"]
              for c in done.choices[0].message.tool_calls]
    assert cities == (["Paris"] if parallel is False else ["Paris", "Oslo"])
    assert "parallel_tool_calls" not in gw.ollama.requests[-1].body


def test_parallel_tool_calls_false_streamed(gw):
    gw.ollama.then(ollama_answer(tool_calls=TWO_CALLS))
    chunks = list(client(gw).chat.completions.create(
        model="local", tools=[WEATHER], messages=ASK, parallel_tool_calls=False,
        stream=True))
    calls, finishes = streamed_calls(chunks)
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": "Paris"}]
    assert finishes == ["tool_calls"]


# -- reasoning -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("effort", "think"), [("none", False), ("minimal", "low"),
                                               ("low", "low"), ("medium", "medium"),
                                               ("high", "high"), ("xhigh", "max")])
def test_reasoning_effort_becomes_think(gw, effort, think):
    gw.ollama.then(ollama_answer("42", thinking="6 times 7"))
    done = client(gw).chat.completions.create(model="ollama/qwen3:8b", messages=ASK,
                                              reasoning_effort=effort)
    assert gw.ollama.requests[-1].body["think"] == think
    message = done.choices[0].message
    assert message.content == "42"
    assert message.model_extra["reasoning_content"] == "6 times 7"


def test_no_effort_sends_no_think(gw):
    gw.ollama.then(ollama_answer("hi"))
    client(gw).chat.completions.create(model="local", messages=ASK)
    assert "think" not in gw.ollama.requests[-1].body


def test_thinking_streams_as_reasoning_content_before_the_answer(gw):
    gw.ollama.then(ollama_answer("391", thinking="17 times 23 is 391", eval_count=30))
    chunks = list(client(gw).chat.completions.create(
        model="ollama/qwen3:8b", messages=ASK, reasoning_effort="high", stream=True,
        stream_options={"include_usage": True}))
    deltas = [ch.delta for c in chunks for ch in c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "17 times 23 is 391"
    assert "".join(d.content or "" for d in deltas) == "391"
    first_text = next(i for i, d in enumerate(deltas) if d.content)
    last_thought = max(i for i, d in enumerate(deltas)
                       if (d.model_extra or {}).get("reasoning_content"))
    assert last_thought < first_text
    assert chunks[-1].usage.completion_tokens == 30


def test_an_unknown_effort_is_refused_in_openais_words(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model="local", messages=ASK,
                                           reasoning_effort="extreme")
    assert exc.value.body == {
        "message": "Invalid value: 'extreme'. Supported values are: 'none', 'minimal', "
                   "'low', 'medium', 'high', and 'xhigh'.",
        "type": "invalid_request_error", "param": "reasoning_effort", "code": "invalid_value"}
    assert gw.ollama.requests == []


# -- mapped, dropped, refused --------------------------------------------------------------------
def test_sampling_fields_map_to_options(gw):
    gw.ollama.then(ollama_answer("ok"))
    client(gw).chat.completions.create(
        model="local", messages=ASK, max_completion_tokens=64, temperature=0.3, top_p=0.9,
        seed=7, presence_penalty=0.5, frequency_penalty=0.25, stop="END")
    assert gw.ollama.requests[-1].body["options"] == {
        "num_predict": 64, "temperature": 0.3, "top_p": 0.9, "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "stop": ["END"]}


def test_hints_are_dropped_not_refused(gw):
    gw.ollama.then(ollama_answer("ok"))
    done = client(gw).chat.completions.create(
        model="local", messages=ASK, store=True, metadata={"team": "a"},
        prompt_cache_key="k-1", service_tier="auto", user="u-1", safety_identifier="s-1",
        verbosity="low", logprobs=False, top_logprobs=0, modalities=["text"],
        prediction={"type": "content", "content": "ok"},
        extra_body={"prompt_cache_retention": "24h", "some_new_field": 1})
    assert done.choices[0].message.content == "ok"
    sent = gw.ollama.requests[-1].body
    assert set(sent) == {"model", "messages", "stream"}


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"n": 2}, "n", "Unsupported value: 'n' does not support 2 with this model (qwen2.5:7b "
     "on Ollama). Only the default (1) value is supported."),
    ({"logprobs": True}, "logprobs", "Unsupported parameter: 'logprobs' is not supported "
     "with this model (qwen2.5:7b on Ollama)."),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "Unsupported parameter: 'logit_bias'"),
    ({"modalities": ["text", "audio"]}, "modalities", "Unsupported value: 'modalities'"),
])
def test_what_changes_the_answer_is_refused_and_recorded(gw, extra, param, message):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model="local", messages=ASK, **extra)
    assert exc.value.body["param"] == param
    assert exc.value.body["message"].startswith(message)
    assert exc.value.body["code"] in ("unsupported_value", "unsupported_parameter")
    assert gw.ollama.requests == []
    assert rows(gw, "provider = 'ollama' AND status = 'refused'")[-1][:3] == [
        "ollama", "qwen2.5:7b", "refused"]


def test_history_thinking_goes_back_as_ollamas_thinking(gw):
    gw.ollama.then(ollama_answer("ok"))
    client(gw).chat.completions.create(model="ollama/qwen3:8b", messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
        {"role": "user", "content": "and 3+3?"}])
    assert gw.ollama.requests[-1].body["messages"][1] == {
        "role": "assistant", "content": "4", "thinking": "two and two"}


# -- the SDK's structured output -----------------------------------------------------------------
def test_parse_with_a_pydantic_response_format(gw):
    gw.ollama.then(ollama_json(PARIS))
    done = client(gw).beta.chat.completions.parse(
        model="local", response_format=City,
        messages=[{"role": "user", "content": "Describe Paris."}])
    assert done.choices[0].message.parsed == City(**PARIS)
    sent = gw.ollama.requests[-1].body
    assert sent["format"]["properties"] == City.model_json_schema()["properties"]
    assert "tools" not in sent


def test_parse_with_a_forced_pydantic_tool(gw):
    gw.ollama.then(ollama_json(PARIS))
    done = client(gw).beta.chat.completions.parse(
        model="local", tools=[openai.pydantic_function_tool(City)],
        tool_choice={"type": "function", "function": {"name": "City"}},
        messages=[{"role": "user", "content": "Describe Paris."}])
    (call,) = done.choices[0].message.tool_calls
    assert call.function.parsed_arguments == City(**PARIS)
    assert gw.ollama.requests[-1].body["format"]["required"] == ["name", "population"]


def test_stream_with_a_forced_pydantic_tool(gw):
    gw.ollama.then(ollama_json(PARIS, pieces=6))
    with client(gw).beta.chat.completions.stream(
            model="local", tools=[openai.pydantic_function_tool(City)],
            tool_choice={"type": "function", "function": {"name": "City"}},
            messages=[{"role": "user", "content": "Describe Paris."}]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == City(**PARIS)
    assert rows(gw, "provider = 'ollama' AND stream")[-1][:5] == [
        "ollama", "qwen2.5:7b", "ok", 34, 12]


# -- properties of the translation (in-process: user-controlled input) ------------------------
NAMES = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_"),
                min_size=1, max_size=12)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(effort=st.one_of(st.none(), st.text(max_size=10), st.sampled_from(list(THINK))))
def test_any_effort_maps_or_is_refused(effort):
    req = {"messages": ASK, "reasoning_effort": effort}
    try:
        body, _ = build_request(req, "qwen3", False)
    except RequestError as err:
        assert err.param == "reasoning_effort" and effort not in THINK
        return
    assert body.get("think") == (THINK[effort] if effort is not None else None)


@settings(max_examples=200, deadline=None)
@given(args=st.dictionaries(st.text(max_size=6), JSONISH, max_size=4), names=st.lists(
    NAMES, min_size=1, max_size=4, unique=True), pick=st.integers(0, 3),
    pad=st.sampled_from(["", " ", "\n", "\n  "]))
def test_a_forced_answer_is_the_call_it_spells(args, names, pick, pad):
    name = names[pick % len(names)]
    if len(names) == 1:
        content = pad + json.dumps(args) + pad
    else:
        content = pad + json.dumps({"name": name, "arguments": args})
    call = forced_call(content, tuple(names))
    assert call is not None and call["function"]["name"] == name
    assert json.loads(call["function"]["arguments"]) == args


@settings(max_examples=150, deadline=None)
@given(choice=st.one_of(st.sampled_from(["auto", "none", "required", None]),
                        NAMES.map(lambda n: {"type": "function", "function": {"name": n}}),
                        JSONISH),
       parallel=st.sampled_from([None, True, False]))
def test_any_tool_choice_is_sent_or_refused_cleanly(choice, parallel):
    req = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice,
           "parallel_tool_calls": parallel}
    try:
        body, reading = build_request(req, "qwen2.5:7b", False)
    except RequestError as err:
        assert err.param == "tool_choice"
        return
    assert reading.one_call is (parallel is False)
    sent = [t["function"]["name"] for t in body.get("tools", ())]
    assert set(sent) <= {"get_weather", "get_time"}
    assert bool(reading.forced) == ("format" in body)
    if choice == "none":
        assert sent == []


def test_the_wire_doc_lists_the_effort_mapping_the_code_uses():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "wires" / "ollama.md").read_text()
    for effort, think in THINK.items():
        assert f"| `{effort}` | `{json.dumps(think)}` |" in doc
