"""Anthropic's Messages API, translated to and from OpenAI's Chat Completions.

Mapping, both ways: system messages become `system`; `max_tokens` is required (default
below); image parts become image blocks; assistant `tool_calls` become `tool_use` blocks and
`tool` messages `tool_result` blocks; `stop_reason` maps to `finish_reason` (`tool_use` ->
`tool_calls`, never `stop`); usage counts cache writes and reads into the prompt tokens, as
Anthropic bills them. `response_format` is honoured by a forced tool whose input schema is
the requested schema, or beside the client's own tools by Anthropic's structured output
(`output_config.format`). `reasoning_effort` becomes a thinking budget, and thinking blocks
in the answer become `reasoning_content`. Fields that only hint (caching keys, metadata, service
tiers, seeds, penalties) are dropped; what would change the answer's meaning (`n > 1`,
`logprobs`, `logit_bias`, audio, web search) is refused. The table: docs/wires/messages.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from runtime.providers.base import (
    SHAPE_ERRORS,
    ChatResult,
    Endpoint,
    RequestError,
    StreamState,
    UnsupportedFeature,
    UpstreamError,
    Usage,
    answer_chars,
    estimate_usage,
    sse_events,
)

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_JSON_TOOL = "json_output"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
          "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
          "model_context_window_exceeded": "length"}
# `reasoning_effort` as a thinking budget (tokens); `none` turns thinking off. The budgets
# read back through `/v1/messages` -> chat (runtime/gateway/anthropic_api.py) as the same
# effort, except `minimal`, which reads back as `low`.
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384,
                    "xhigh": 32768}
# Claude models without extended thinking (3.7 Sonnet and every model since have it).
_NO_THINKING = re.compile(r"claude-(?:instant|2|3-(?!7))")
# An error event's type as its HTTP status (a stream's errors come after its 200).
ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500,
                "invalid_request_error": 400, "authentication_error": 401,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                "billing_error": 402, "timeout_error": 504}


def _headers(ep: Endpoint) -> dict[str, str]:
    h = {"anthropic-version": API_VERSION}
    if ep.api_key:
        h["x-api-key"] = ep.api_key
    return h


# -- request -----------------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise UnsupportedFeature("anthropic", f"{part.get('type')} parts in {where}",
                                     "messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    url = (part.get("image_url") or {}).get("url", "")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";")[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                             "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise UnsupportedFeature("anthropic", f"'{kind}' message parts", "messages")
    return blocks


def _assistant_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _text_of(msg.get("content"), "assistant messages")
    if text:
        blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise RequestError(f"tool call {call.get('id')} has arguments that are not JSON",
                               param="messages") from None
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                       "input": args})
    return blocks


def _messages(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if out and out[-1]["role"] == role:  # the API wants user/assistant turns to alternate
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for msg in messages:
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(msg.get("content"), "system messages"))
        elif role == "user":
            push("user", _user_blocks(msg.get("content")))
        elif role == "assistant":
            blocks = _assistant_blocks(msg)
            if blocks:
                push("assistant", blocks)
        elif role == "tool":
            content = msg.get("content")
            push("user", [{"type": "tool_result", "tool_use_id": msg.get("tool_call_id"),
                           "content": _text_of(content, "tool messages")}])
        else:
            raise RequestError(f"unknown message role '{role}'", param="messages")
    return ("\n\n".join(system) if system else None), out


def _refuse_meaning_changers(req: dict[str, Any]) -> None:
    """Refuse what Anthropic cannot answer as asked (more answers, token probabilities,
    banned tokens, audio, web search); everything else it has no field for only hints and
    is dropped (see docs/wires/messages.md)."""
    if req.get("n") not in (None, 1):
        raise UnsupportedFeature("anthropic", "n > 1", "n")
    if req.get("logprobs") or req.get("top_logprobs"):
        raise UnsupportedFeature("anthropic", "'logprobs'", "logprobs")
    if req.get("logit_bias"):
        raise UnsupportedFeature("anthropic", "'logit_bias'", "logit_bias")
    modalities = req.get("modalities")
    if req.get("audio") or (isinstance(modalities, list) and "audio" in modalities):
        raise UnsupportedFeature("anthropic", "audio output", "audio")
    if req.get("web_search_options") is not None:
        raise UnsupportedFeature("anthropic", "'web_search_options'", "web_search_options")
    if req.get("functions") or req.get("function_call"):
        raise UnsupportedFeature("anthropic", "'functions' (send them as 'tools')", "functions")


def _in_tool_loop(messages: list[dict[str, Any]]) -> bool:
    """The request answers tool results of an assistant turn that has no thinking block
    (a chat history cannot carry one): Anthropic refuses thinking there."""
    for msg in reversed(messages):
        if msg.get("role") == "tool":
            continue
        return msg.get("role") == "assistant" and bool(msg.get("tool_calls"))
    return False


def thinking_budget(req: dict[str, Any], model: str, forced_tool: bool) -> int | None:
    """The thinking budget `reasoning_effort` asks for, or None when thinking stays off: no
    effort (or `none`), a model without thinking, a forced tool (Anthropic refuses thinking
    with one), or a tool loop whose assistant turn has no thinking block to send back."""
    effort = req.get("reasoning_effort")
    budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is None or forced_tool or _NO_THINKING.search(model):
        return None
    if _in_tool_loop(req.get("messages") or []):
        return None
    return budget


def build_request(req: dict[str, Any], model: str, stream: bool) -> tuple[dict[str, Any], bool]:
    """The Messages API body, and whether `response_format` is served by the forced tool."""
    _refuse_meaning_changers(req)
    system, messages = _messages(req.get("messages") or [])
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": req.get("max_completion_tokens") or req.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
    }
    if system:
        body["system"] = system
    if req.get("temperature") is not None:
        if req["temperature"] > 1:
            raise UnsupportedFeature("anthropic", "temperature above 1", "temperature")
        body["temperature"] = req["temperature"]
    if req.get("top_p") is not None:
        body["top_p"] = req["top_p"]
    if isinstance(req.get("top_k"), int):  # not OpenAI's, but sent by clients of vLLM
        body["top_k"] = req["top_k"]
    stop = req.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    user = req.get("user") or req.get("safety_identifier")
    if user:
        body["metadata"] = {"user_id": str(user)}
    if stream:
        body["stream"] = True
    if req.get("tools"):
        body["tools"] = [_tool(t) for t in req["tools"]]
    # Anthropic takes a tool_choice only beside tools (clients send parallel_tool_calls
    # regardless).
    choice = _tool_choice(req.get("tool_choice"), req.get("parallel_tool_calls")) \
        if req.get("tools") else None
    if choice:
        body["tool_choice"] = choice
    json_mode = False
    rf = req.get("response_format") or {}
    if rf.get("type") in ("json_object", "json_schema"):
        schema = ((rf.get("json_schema") or {}).get("schema") if rf["type"] == "json_schema"
                  else None) or {"type": "object"}
        if req.get("tools"):
            # The model may call the client's tools first, so no forced tool can carry the
            # answer: Anthropic's own structured output constrains the final text instead.
            body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        else:
            body["tools"] = [{"name": _JSON_TOOL, "description": "Give the answer as JSON.",
                              "input_schema": schema}]
            body["tool_choice"] = {"type": "tool", "name": _JSON_TOOL}
            json_mode = True
    forced = json_mode or (choice or {}).get("type") in ("any", "tool")
    budget = thinking_budget(req, model, forced)
    if budget is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if body["max_tokens"] <= budget:  # the budget counts toward max_tokens
            body["max_tokens"] += budget
        # With thinking on, Anthropic takes temperature 1 only, top_p from 0.95, no top_k.
        body.pop("temperature", None)
        body.pop("top_k", None)
        if body.get("top_p", 1) < 0.95:
            body.pop("top_p")
    return body, json_mode


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise UnsupportedFeature("anthropic", f"tools of type '{tool.get('type')}'", "tools")
    fn = tool.get("function") or {}
    out = {"name": fn.get("name"),
           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    if choice is None and parallel is None:
        return None
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise RequestError(f"invalid tool_choice {choice!r}", param="tool_choice")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# -- response ----------------------------------------------------------------------------------
def usage_of(u: dict[str, Any] | None) -> Usage:
    """Anthropic's `input_tokens` excludes cache writes and reads; billed input is the sum.
    `cache_creation` splits the writes by lifetime (1-hour writes cost more)."""
    u = u or {}
    writes = int(u.get("cache_creation_input_tokens") or 0)
    reads = int(u.get("cache_read_input_tokens") or 0)
    hour = int((u.get("cache_creation") or {}).get("ephemeral_1h_input_tokens") or 0)
    return Usage(prompt_tokens=int(u.get("input_tokens") or 0) + writes + reads,
                 completion_tokens=int(u.get("output_tokens") or 0),
                 cached_tokens=reads, cache_write_tokens=writes,
                 cache_write_1h_tokens=min(hour, writes))


def to_openai(msg: dict[str, Any], json_mode: bool, usage: Usage | None = None
              ) -> dict[str, Any]:
    """A Messages API answer as a chat.completion (``usage`` when it is not the answer's own,
    an estimate for an answer without one)."""
    text, calls, thinking = [], [], []
    for block in msg.get("content") or ():
        kind = block.get("type")
        if kind == "thinking":  # redacted_thinking has no text to show
            thinking.append(block.get("thinking") or "")
        elif kind == "text" and not json_mode:  # in JSON mode only the forced tool's input counts
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            if json_mode and block.get("name") == _JSON_TOOL:
                text.append(orjson.dumps(block.get("input") or {}).decode())
                continue
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": orjson.dumps(block.get("input") or {})
                                       .decode()}})
    finish = FINISH.get(msg.get("stop_reason") or "", "stop")
    if json_mode and finish == "tool_calls":
        finish = "stop"
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    usage = usage or usage_of(msg.get("usage"))
    return {
        "id": "chatcmpl-" + str(msg.get("id", "")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": None}],
        "usage": usage.to_openai(),
    }


async def complete(ep: Endpoint, req: dict[str, Any], model: str) -> ChatResult:
    body, json_mode = build_request(req, model, False)
    status, headers, raw, ms = await ep.post("/v1/messages", body, _headers(ep))
    if status >= 400:
        raise ep.error(status, headers, raw)
    msg = ep.parse(raw)
    try:
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            raise TypeError("not a message object")
        if msg.get("usage") is None:
            body = to_openai(msg, json_mode)
            usage = estimate_usage(req, answer_chars(body))
            body["usage"] = usage.to_openai()
        else:
            usage = usage_of(msg["usage"])
            body = to_openai(msg, json_mode, usage)
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None
    return ChatResult(body, usage, ms)


async def stream(ep: Endpoint, req: dict[str, Any], model: str, state: StreamState
                 ) -> AsyncIterator[dict[str, Any]]:
    body, json_mode = build_request(req, model, True)
    resp = await ep.open_stream("/v1/messages", body, _headers(ep))
    base: dict[str, Any] = {"object": "chat.completion.chunk", "created": int(time.time())}
    tools: dict[int, int] = {}  # content block index -> tool call ordinal
    has_args: set[int] = set()
    usage = Usage()
    raw_usage: dict[str, Any] = {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                     "logprobs": None}]}

    started = stopped = False
    data = b""
    try:
        async for event, data in sse_events(resp, ep):
            ev = ep.parse(data)
            kind = ev.get("type") or event
            if kind == "message_start":
                msg = ev.get("message") or {}
                base.update(id="chatcmpl-" + str(msg.get("id", "")), model=msg.get("model"))
                raw_usage = dict(msg.get("usage") or {})
                state.partial = usage_of(raw_usage)  # the input is counted from the start
                started = True
                yield chunk({"role": "assistant", "content": ""})
            elif kind == "content_block_start":
                block = ev.get("content_block") or {}
                if block.get("type") == "tool_use" and not json_mode:
                    ordinal = len(tools)
                    tools[ev["index"]] = ordinal
                    state.mark_token()
                    # The start block carries `input: {}`; the arguments come as deltas.
                    yield chunk({"tool_calls": [{
                        "index": ordinal, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}]})
                elif block.get("type") == "text" and block.get("text") and not json_mode:
                    state.mark_token()
                    state.out_chars += len(block["text"])
                    yield chunk({"content": block["text"]})
                elif block.get("type") == "thinking" and block.get("thinking"):
                    state.mark_token()
                    state.out_chars += len(block["thinking"])
                    yield chunk({"reasoning_content": block["thinking"]})
            elif kind == "content_block_delta":
                delta = ev.get("delta") or {}
                dtype = delta.get("type")
                if dtype == "text_delta" and not json_mode:
                    state.mark_token()
                    state.out_chars += len(delta.get("text", ""))
                    yield chunk({"content": delta.get("text", "")})
                elif dtype == "thinking_delta":
                    state.mark_token()
                    state.out_chars += len(delta.get("thinking", ""))
                    yield chunk({"reasoning_content": delta.get("thinking", "")})
                elif dtype == "input_json_delta":
                    part = delta.get("partial_json", "")
                    state.out_chars += len(part)
                    if json_mode:
                        state.mark_token()
                        yield chunk({"content": part})
                    elif ev["index"] in tools and part:
                        has_args.add(ev["index"])
                        yield chunk({"tool_calls": [{"index": tools[ev["index"]],
                                                     "function": {"arguments": part}}]})
            elif kind == "content_block_stop":
                idx = ev.get("index")
                if idx in tools and idx not in has_args:  # a tool called with no arguments
                    yield chunk({"tool_calls": [{"index": tools[idx],
                                                 "function": {"arguments": "{}"}}]})
            elif kind == "message_delta":
                raw_usage.update({k: v for k, v in (ev.get("usage") or {}).items()
                                  if v is not None})
                state.partial = usage_of(raw_usage)
                reason = (ev.get("delta") or {}).get("stop_reason")
                if reason:
                    stopped = True
                    finish = FINISH.get(reason, "stop")
                    state.finish_reason = "stop" if json_mode and finish == "tool_calls" \
                        else finish
            elif kind == "error":
                err = ev.get("error") or {}
                status = ERROR_STATUS.get(err.get("type", ""), 500)
                raise UpstreamError(ep.name, status, err.get("message", "stream error"))
            elif kind == "message_stop":
                stopped = True
                break
        if not started or not stopped:
            raise UpstreamError(ep.name, 502, "the stream ended before " + (
                "message_stop" if started else "message_start"))
        usage = usage_of(raw_usage)
        state.usage = usage
        yield chunk({}, state.finish_reason or "stop")
        yield {**base, "choices": [], "usage": usage.to_openai()}
    except SHAPE_ERRORS as exc:  # an event of the wrong shape
        raise ep.malformed(data, str(exc)) from None
    finally:
        resp.release()
