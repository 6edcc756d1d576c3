"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: the Anthropic Messages API in
front of every provider.

Same wire (the routed target speaks Anthropic's Messages API): the client's body goes
upstream as it came, unknown fields and all, with only `model` replaced by the target's (the
bytes are re-serialised only when it differs); its `anthropic-version`, `anthropic-beta` and
query string go with it, its credential is replaced by the endpoint's key. The answer's bytes
(or its stream, event by event) come back as the upstream sent them, read on the way for the
ledger's usage.

Across wires (an OpenAI or Ollama target): the request is translated to chat completions,
mapping what maps and dropping what only hints, and the answer (or its stream) translated
back. The table, field by field: docs/wires/messages.md.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response

from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import (
    GatewayStream,
    answer,
    parse_body,
    refused,
    stream_headers,
)
from runtime.gateway.validate import check
from runtime.providers import (
    ADAPTERS,
    ChatResult,
    Endpoint,
    FlowcError,
    RequestError,
    StreamState,
    Target,
    UpstreamError,
    Usage,
)
from runtime.providers.anthropic import API_VERSION, ERROR_STATUS, THINKING_BUDGETS, usage_of
from runtime.providers.base import estimate_usage, request_chars, sse_events, tokens_of

STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
        "content_filter": "refusal", "function_call": "tool_use"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's error type for a status: its reference uses invalid_request_error for
    any 4xx it does not list (409, 415, 422, ...), api_error for the rest."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500
                                        else "api_error")


def _error_body(err: FlowcError) -> dict[str, Any]:
    """An error in Anthropic's shape: an Anthropic upstream's own body as it sent it (its
    `request_id` included), anything else worded by flowc."""
    body = getattr(err, "body", None)
    if isinstance(err, UpstreamError) and isinstance(body, dict) and \
            body.get("type") == "error" and isinstance(body.get("error"), dict):
        return body
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


def error_response(err: FlowcError) -> Response:
    headers = None
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers = {"retry-after": str(max(0, math.ceil(retry_after)))}
    return Response(orjson.dumps(_error_body(err)), status_code=err.status,
                    media_type="application/json", headers=headers)


# -- the same wire: verbatim ---------------------------------------------------------------------
def _upstream(incoming: Incoming, ep: Endpoint, path: str) -> tuple[str, dict[str, str]]:
    """The upstream path (the client's query string kept, e.g. `?beta=true`) and headers:
    the client's `anthropic-version` and `anthropic-beta`, the endpoint's key. The client's
    own `x-api-key` or `authorization` never leaves flowc."""
    version: str | None = None
    betas: list[str] = []
    for name, value in incoming.headers:
        if name == b"anthropic-version":
            version = value.decode("latin-1")
        elif name == b"anthropic-beta":
            betas.append(value.decode("latin-1"))
    headers = {"anthropic-version": version or API_VERSION}
    if betas:
        headers["anthropic-beta"] = ",".join(betas)
    if ep.api_key:
        headers["x-api-key"] = ep.api_key
    if incoming.query:
        path += "?" + incoming.query.decode("latin-1")
    return path, headers


def _passed_headers(headers: Any) -> dict[str, str]:
    """The upstream's `request-id` (the SDKs show it as the request's id) and rate-limit
    headers, for the client."""
    return {k.lower(): v for k, v in headers.items()
            if k.lower() == "request-id" or k.lower().startswith("anthropic-ratelimit-")}


def _payload(raw: bytes, body: dict[str, Any], model: str) -> Any:
    """The client's body for ``model``: its own bytes when it names that model already."""
    if body.get("model") == model:
        return orjson.Fragment(raw)  # serialised by Endpoint.post as these very bytes
    return {**body, "model": model}


def _answer_chars(msg: dict[str, Any]) -> int:
    n = 0
    for block in msg.get("content") or ():
        if isinstance(block, dict):
            n += len(block.get("text") or block.get("thinking") or "")
            if block.get("type") == "tool_use":
                n += len(orjson.dumps(block.get("input") or {}))
    return n


def _read_message(ep: Endpoint, raw: bytes, body: dict[str, Any]) -> tuple[dict[str, Any], Usage]:
    """The upstream's message and its usage (estimated, marked, when it has none)."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ep.malformed(raw, "not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
        raise ep.malformed(raw, "not a message object")
    if not isinstance(msg.get("usage"), dict):
        return msg, estimate_usage(body, _answer_chars(msg))
    try:
        return msg, usage_of(msg["usage"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ep.malformed(raw, str(exc)) from None


async def _passthrough(ep: Endpoint, resp: Any, state: StreamState) -> AsyncIterator[bytes]:
    """An Anthropic stream passed on event by event, its usage, model and first token read
    into ``state`` on the way. An `error` event raises (the handler sends it on as it came);
    a stream that ends before `message_stop` is the upstream's failure."""
    raw_usage: dict[str, Any] = {}
    stopped = False
    data = b""
    try:
        async for event, data in sse_events(resp, ep):
            if ep.api_key:
                data = ep.redact(data, masked=False)
            ev = orjson.loads(data)
            kind = ev.get("type") or event
            if kind == "content_block_delta":
                delta = ev.get("delta") or {}
                state.mark_token()
                state.out_chars += len(delta.get("text") or delta.get("thinking")
                                       or delta.get("partial_json") or "")
            elif kind == "message_start":
                msg = ev.get("message") or {}
                raw_usage = dict(msg.get("usage") or {})
                state.partial = usage_of(raw_usage)
                state.model = msg.get("model") or state.model
            elif kind == "content_block_start":
                if (ev.get("content_block") or {}).get("type") == "tool_use":
                    state.mark_token()
            elif kind == "message_delta":
                raw_usage.update({k: v for k, v in (ev.get("usage") or {}).items()
                                  if v is not None})
                state.partial = usage_of(raw_usage)
                reason = (ev.get("delta") or {}).get("stop_reason")
                if reason:
                    state.finish_reason = reason
            elif kind == "error":
                err = ev.get("error") or {}
                raise UpstreamError(ep.name, ERROR_STATUS.get(err.get("type", ""), 500),
                                    str(err.get("message", "stream error")), body=ev)
            elif kind == "message_stop":
                stopped = True
            yield b"event: " + (event or str(kind)).encode() + b"\ndata: " + data + b"\n\n"
            if stopped:
                break
        if not stopped:
            raise UpstreamError(ep.name, 502, "the stream ended before message_stop")
        state.usage = usage_of(raw_usage)
    except orjson.JSONDecodeError:
        raise ep.malformed(data, "an event that is not JSON") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise ep.malformed(data, str(exc)) from None
    finally:
        resp.release()


# -- across wires: the request -------------------------------------------------------------------
# Models that take `reasoning_effort` (OpenAI's o-series, gpt-5, gpt-oss; reasoning models
# served by Ollama or OpenAI-compatible servers). Any other model refuses the field, so for
# it `thinking` and `output_config.effort` are hints and dropped.
_REASONS = re.compile(r"(?:^|[/:])(?:o[1-9](?:$|[-.])|gpt-5(?!-chat)|gpt-oss|codex|"
                      r"deepseek-r1|deepseek-reasoner|qwq|qwen3|magistral|phi4-reasoning|"
                      r"grok-3-mini|grok-4)|thinking", re.I)
# OpenAI's reasoning models, which also refuse any temperature or top_p but the default.
_OPENAI_REASONS = re.compile(r"^(?:o[1-9](?:$|[-.])|gpt-5(?!-chat))")
# The most output tokens OpenAI's models take (its model pages), most specific name first.
# `max_tokens` is a cap, so one above the model's own is lowered to it instead of the 400
# OpenAI answers (Claude Code asks for 32,000).
_MAX_OUTPUT = (("gpt-4o-2024-05-13", 4096), ("gpt-4o", 16384), ("chatgpt-4o", 16384),
               ("gpt-4.1", 32768), ("gpt-4-turbo", 4096), ("gpt-4-", 4096), ("gpt-4", 8192),
               ("gpt-3.5", 4096), ("o1-mini", 65536), ("o1", 100000), ("o3", 100000),
               ("o4", 100000), ("gpt-5", 128000))
# `output_config.effort` as `reasoning_effort` (OpenAI's highest widely taken level is high).
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def reasons(model: str) -> bool:
    return _REASONS.search(model) is not None


def reasoning_effort(body: dict[str, Any]) -> str | None:
    """What `output_config.effort` or `thinking` ask of a reasoning model: the effort when
    given; else a manual budget read against the chat -> Anthropic budgets (under 4,096
    tokens low, under 16,384 medium, else high); `adaptive` and `disabled` leave it to the
    model's default."""
    effort = (body.get("output_config") or {}).get("effort")
    if isinstance(effort, str) and effort in _EFFORTS:
        return _EFFORTS[effort]
    thinking = body.get("thinking") or {}
    budget = thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None
    if not isinstance(budget, int):
        return None
    if budget < 2 * THINKING_BUDGETS["low"]:
        return "low"
    return "medium" if budget < THINKING_BUDGETS["high"] else "high"


def max_output(kind: str, model: str, asked: int) -> int:
    """``asked``, lowered to the most an OpenAI model can write when flowc knows it."""
    if kind == "openai":
        for prefix, limit in _MAX_OUTPUT:
            if model.startswith(prefix):
                return min(asked, limit)
    return asked


def _accepts(kind: str, name: str) -> bool:
    """Whether the chat adapter for ``kind`` passes ``name`` on (OpenAI's passes any)."""
    handled = getattr(ADAPTERS[kind], "_HANDLED", None)
    return handled is None or name in handled


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n\n".join(b.get("text", "") for b in content or ()
                       if isinstance(b, dict) and b.get("type") == "text")


def _bad_block(kind: Any, where: str) -> RequestError:
    return RequestError(f"{where}: content blocks of type '{kind}' are not supported when "
                        "the model is not a Claude model", param="messages")


def _image(block: dict[str, Any]) -> dict[str, Any]:
    src = block.get("source") or {}
    url = (f"data:{src.get('media_type')};base64,{src.get('data')}"
           if src.get("type") == "base64" else src.get("url", ""))
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source") or {}
    if src.get("type") == "text":
        return {"type": "text", "text": src.get("data", "")}
    if src.get("type") == "base64" and src.get("media_type") == "application/pdf":
        return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                         "file_data": f"data:application/pdf;base64,"
                                                      f"{src.get('data')}"}}
    raise _bad_block(f"document ({src.get('type')})", where)


def _parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """User content blocks as chat content parts."""
    parts: list[dict[str, Any]] = []
    for b in blocks:
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif kind == "image":
            parts.append(_image(b))
        elif kind == "document":
            parts.append(_document(b, where))
        elif kind == "search_result":
            parts.append({"type": "text", "text": _text(b.get("content"))})
        elif kind not in ("thinking", "redacted_thinking"):
            raise _bad_block(kind, where)
    return parts


def _tool_result(block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[Any]]:
    """A tool_result as a `tool` message, and its images (a tool message takes text only:
    they follow in a user message)."""
    content = block.get("content")
    parts = _parts([{"type": "text", "text": content}] if isinstance(content, str)
                   else list(content or ()), where)
    text = "\n\n".join(p["text"] for p in parts if p["type"] == "text")
    if block.get("is_error"):
        text = "error: " + text
    return ({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text},
            [p for p in parts if p["type"] != "text"])


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text(body["system"])})
    for i, msg in enumerate(body.get("messages") or []):
        where = f"messages.{i}"
        if not isinstance(msg, dict):
            raise RequestError(f"{where}: Input should be a valid dictionary", param="messages")
        role, content = msg.get("role"), msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
            list(content or [])
        if role == "system":  # a system message in place, as chat completions have them
            messages.append({"role": "system", "content": _text(content)})
        elif role == "user":
            media: list[Any] = []
            for b in blocks:
                if isinstance(b, dict) and b.get("type") == "tool_result":
                    tool, images = _tool_result(b, where)
                    messages.append(tool)
                    media += images
            rest = [b for b in blocks if not (isinstance(b, dict)
                                              and b.get("type") == "tool_result")]
            parts = media + _parts(rest, where)
            if parts:
                messages.append({"role": "user", "content": parts})
        elif role == "assistant":
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            out: dict[str, Any] = {"role": "assistant", "content": text or None}
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"),
                                   "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                     for b in blocks if b.get("type") == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            if text or calls:  # a turn of thinking blocks only has nothing to say here
                messages.append(out)
        else:
            raise RequestError(f"{where}.role: Input should be 'user', 'assistant' or "
                               "'system'", param="messages")
    return messages


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Client tools as functions; Anthropic's server tools (web search, code execution,
    ...) run only on Anthropic and are left out."""
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
            continue
        fn: dict[str, Any] = {"name": t.get("name"), "description": t.get("description", ""),
                              "parameters": t.get("input_schema")
                              or {"type": "object", "properties": {}}}
        if isinstance(t.get("strict"), bool):
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _user(user_id: str) -> str:
    """`metadata.user_id` as OpenAI's `user` (at most 64 characters; a longer id, as
    Claude Code sends, goes as its SHA-256: stable, and opaque as the field asks)."""
    return user_id if len(user_id) <= 64 else hashlib.sha256(user_id.encode()).hexdigest()


def to_openai(body: dict[str, Any], kind: str = "openai", model: str = "") -> dict[str, Any]:
    """A Messages API request as a chat completion for a target of wire ``kind`` serving
    ``model``. Dropped: `cache_control`, `thinking` for a model that does not reason,
    `context_management`, `service_tier`, `container`, `inference_geo`, `speed`,
    `diagnostics` and any field not named in docs/wires/messages.md."""
    if not isinstance(body.get("model"), str):
        raise RequestError("model: Field required", param="model")
    if not isinstance(body.get("max_tokens"), int):
        raise RequestError("max_tokens: Field required", param="max_tokens")
    if body.get("mcp_servers"):  # tools the answer would have used
        raise RequestError("mcp_servers: MCP servers are not supported when the model is not "
                           "a Claude model", param="mcp_servers")
    req: dict[str, Any] = {"model": body["model"], "messages": _messages(body)}
    thinker = reasons(model)
    # Reasoning models take `max_completion_tokens` only; others (and older
    # OpenAI-compatible servers) know `max_tokens`.
    req["max_completion_tokens" if thinker else "max_tokens"] = max_output(
        kind, model, body["max_tokens"])
    effort = reasoning_effort(body) if thinker else None
    if effort and _accepts(kind, "reasoning_effort"):
        req["reasoning_effort"] = effort
    if kind != "openai" or not _OPENAI_REASONS.search(model):
        for key in ("temperature", "top_p"):  # sampling hints OpenAI's reasoners refuse
            if body.get(key) is not None:
                req[key] = body[key]
    if body.get("top_k") is not None and kind != "openai" and _accepts(kind, "top_k"):
        req["top_k"] = body["top_k"]
    if body.get("stop_sequences"):
        req["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        req["stream"] = True
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user and _accepts(kind, "user"):
        req["user"] = _user(user)
    tools = _tools(body.get("tools") or [])
    if tools:
        req["tools"] = tools
        choice = body.get("tool_choice")
        if choice:
            ctype = choice.get("type")
            req["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
                ctype) or {"type": "function", "function": {"name": choice.get("name")}}
            if choice.get("disable_parallel_tool_use") and ctype != "none" and \
                    _accepts(kind, "parallel_tool_calls"):
                req["parallel_tool_calls"] = False
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        req["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.get("schema") or {"type": "object"}}}
    return req


# -- across wires: the answer --------------------------------------------------------------------
def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens - u.cache_write_tokens,
            "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": u.cache_write_tokens - u.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": u.cache_write_1h_tokens}}


def message_id(upstream_id: Any) -> str:
    """`msg_<id>` from any upstream id, never `msg_msg_...`."""
    raw = str(upstream_id or uuid.uuid4().hex).removeprefix("chatcmpl-")
    return raw if raw.startswith("msg_") else "msg_" + raw


def _reasoning(part: dict[str, Any]) -> str | None:
    """Reasoning text on a chat message or delta, as vLLM, DeepSeek and Ollama's OpenAI
    endpoint send it (`reasoning_content`, or `reasoning`)."""
    text = part.get("reasoning_content") or part.get("reasoning")
    return text if isinstance(text, str) and text else None


def from_openai(body: dict[str, Any], usage: Usage, thinking: bool = True) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = _reasoning(message) if thinking else None
    if reasoning:  # no signature: only Claude signs its thinking
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = {"_raw": fn.get("arguments")}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": args})
    return {"id": message_id(body.get("id")), "type": "message", "role": "assistant",
            "model": body.get("model"), "content": content,
            "stop_reason": STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(usage)}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _events(chunks: AsyncIterator[dict[str, Any]], body: dict[str, Any],
                  state: StreamState, thinking: bool) -> AsyncIterator[bytes]:
    """Chat completion chunks -> Anthropic stream events, one content block at a time.
    `message_start` carries the input estimated from the request (a chat stream reports its
    usage only at its end); `message_delta` the upstream's final usage."""
    index = -1
    open_kind: str | None = None
    tool_index: dict[int, int] = {}  # chat tool call index -> content block index
    stop = "end_turn"
    usage: Usage | None = None
    started = False

    def block_start(kind: str, block: dict[str, Any]) -> list[bytes]:
        nonlocal index, open_kind
        out = []
        if open_kind is not None:
            out.append(_sse("content_block_stop", {"type": "content_block_stop",
                                                   "index": index}))
        index += 1
        open_kind = kind
        out.append(_sse("content_block_start", {"type": "content_block_start",
                                                "index": index, "content_block": block}))
        return out

    async for chunk in chunks:
        if not started:
            started = True
            state.model = chunk.get("model") or state.model
            estimate = tokens_of(request_chars(body))
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
                "content": [], "model": chunk.get("model") or body.get("model"),
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": estimate, "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
        if chunk.get("usage"):
            usage = Usage.from_openai(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = _reasoning(delta) if thinking else None
            if reasoning:
                if open_kind != "thinking":
                    for b in block_start("thinking", {"type": "thinking", "thinking": "",
                                                      "signature": ""}):
                        yield b
                yield _sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "thinking_delta", "thinking": reasoning}})
            if delta.get("content"):
                if open_kind != "text":
                    for b in block_start("text", {"type": "text", "text": ""}):
                        yield b
                yield _sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or ():
                i = call.get("index", 0)
                fn = call.get("function") or {}
                if i not in tool_index:
                    for b in block_start("tool", {"type": "tool_use", "id": call.get("id"),
                                                  "name": fn.get("name"), "input": {}}):
                        yield b
                    tool_index[i] = index
                if fn.get("arguments"):
                    yield _sse("content_block_delta", {
                        "type": "content_block_delta", "index": tool_index[i],
                        "delta": {"type": "input_json_delta",
                                  "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                stop = STOP.get(choice["finish_reason"], "end_turn")
    if open_kind is not None:
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    final = usage or state.usage or estimate_usage(body, state.out_chars)
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": None},
                                 "usage": _usage(final)})
    yield _sse("message_stop", {"type": "message_stop"})


# -- the handlers --------------------------------------------------------------------------------
class _Call:
    """How one /v1/messages request reaches each target: verbatim to an Anthropic endpoint,
    translated (once per target wire and model) to any other."""

    def __init__(self, incoming: Incoming, body: dict[str, Any], caller: ModelCaller) -> None:
        self.incoming, self.body, self.caller = incoming, body, caller
        self.raw: bytes | None = None  # the answering Anthropic upstream's bytes
        self.headers: dict[str, str] = {}  # its headers passed on (`_passed_headers`)
        self.thinking = (body.get("thinking") or {}).get("type") != "disabled"

    def translated(self, ep: Endpoint, target: Target) -> dict[str, Any]:
        return to_openai(self.body, ep.kind, target.model)

    async def send(self, target: Target) -> ChatResult:
        ep = self.caller.providers.endpoint(target)
        if ep.kind != "anthropic":
            self.raw, self.headers = None, {}
            done = await self.caller.providers.complete(target, self.translated(ep, target))
            return ChatResult(from_openai(done.body, done.usage, self.thinking), done.usage,
                              done.upstream_ms)
        path, headers = _upstream(self.incoming, ep, "/v1/messages")
        status, resp_headers, raw, ms = await ep.post(
            path, _payload(self.incoming.body, self.body, target.model), headers)
        if status >= 400:
            raise ep.error(status, resp_headers, raw)
        if ep.api_key:
            raw = ep.redact(raw, masked=False)
        msg, usage = _read_message(ep, raw, self.body)
        self.raw, self.headers = raw, _passed_headers(resp_headers)
        return ChatResult(msg, usage, ms)

    async def open(self, target: Target, state: StreamState) -> AsyncIterator[bytes]:
        ep = self.caller.providers.endpoint(target)
        if ep.kind != "anthropic":
            self.headers = {}
            chunks = self.caller.providers.stream(target, self.translated(ep, target), state)
            async for event in _events(chunks, self.body, state, self.thinking):
                yield event
            return
        path, headers = _upstream(self.incoming, ep, "/v1/messages")
        resp = await ep.open_stream(
            path, _payload(self.incoming.body, self.body, target.model), headers)
        self.headers = _passed_headers(resp.headers)
        async for event in _passthrough(ep, resp, state):
            yield event


async def messages(incoming: Incoming, caller: ModelCaller) -> Response:
    tags, t0 = incoming.tags, incoming.t0
    body: Any = None
    try:
        body = parse_body(incoming.body)
        check("messages", body)
        call = _Call(incoming, body, caller)
        if body.get("stream"):
            out = await caller.stream(body, tags=tags, ctx=incoming.context(), open=call.open)
            headers = stream_headers(out, t0)
            if caller.providers.endpoint(out.target).kind == "anthropic":
                headers.update(call.headers)
            return GatewayStream(_stream_bytes(out.chunks), out.close, headers)
        done = await caller.complete(body, tags=tags, ctx=incoming.context(), send=call.send)
    except FlowcError as err:
        refused(caller, incoming, body, err)
        return error_response(err)
    return answer(done, t0, call.raw, call.headers)


async def _stream_bytes(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream's events; an error after the first byte travels as an `error` event."""
    try:
        async for event in chunks:
            yield event
    except FlowcError as err:
        yield _sse("error", _error_body(err))


async def count_tokens(incoming: Incoming, caller: ModelCaller) -> Response:
    """`POST /v1/messages/count_tokens`: exact from an Anthropic target (the request goes to
    its own count_tokens as it came), estimated for any other and marked so
    (`x-flowc-estimated: true`). Counting is free and calls no model: not a ledger row."""
    try:
        body = parse_body(incoming.body)
        check("count_tokens", body)
        target = caller.plan(body, incoming.tags).targets[0]
        ep = caller.providers.endpoint(target)
        headers = {"x-flowc-provider": target.provider, "x-flowc-model": target.model}
        if ep.kind != "anthropic":
            headers["x-flowc-estimated"] = "true"
            n = tokens_of(request_chars(body))
            return Response(orjson.dumps({"input_tokens": n}), media_type="application/json",
                            headers=headers)
        path, up_headers = _upstream(incoming, ep, "/v1/messages/count_tokens")
        status, resp_headers, raw, _ = await ep.post(
            path, _payload(incoming.body, body, target.model), up_headers)
        if status >= 400:
            raise ep.error(status, resp_headers, raw)
        if ep.api_key:
            raw = ep.redact(raw, masked=False)
    except FlowcError as err:
        return error_response(err)
    return Response(raw, media_type="application/json", headers=headers)
