"""`POST /v1/messages`: the Anthropic Messages API in front of every provider.

Clients built on the Anthropic SDK switch to flowc by changing their base URL. The request is
translated to the gateway's internal (OpenAI) form, routed like any other call, and the
answer (or its stream) translated back: content blocks, `tool_use`, `stop_reason`, usage
with cache reads and writes, and Anthropic's error shape.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response

from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import GatewayStream, flowc_headers, parse_body
from runtime.gateway.validate import check
from runtime.providers import FlowcError, RequestError, Usage

STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
        "content_filter": "refusal", "function_call": "tool_use"}
_HANDLED = {"model", "messages", "max_tokens", "system", "temperature", "top_p",
            "stop_sequences", "stream", "tools", "tool_choice", "metadata"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's error type for a status: its reference uses invalid_request_error for
    any 4xx it does not list (409, 415, 422, ...), api_error for the rest."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500
                                        else "api_error")


def error_response(err: FlowcError) -> Response:
    etype = error_type(err.status)
    body = {"type": "error", "error": {"type": etype, "message": err.message}}
    return Response(orjson.dumps(body), status_code=err.status, media_type="application/json")


# -- request -----------------------------------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or () if b.get("type") == "text")


def _user_parts(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for b in blocks:
        kind = b.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif kind == "image":
            src = b.get("source") or {}
            url = (f"data:{src.get('media_type')};base64,{src.get('data')}"
                   if src.get("type") == "base64" else src.get("url", ""))
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise RequestError(f"content blocks of type '{kind}' are not supported here",
                               param="messages")
    return parts


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    extra = sorted(k for k, v in body.items() if k not in _HANDLED and v is not None)
    if extra:
        raise RequestError(f"'{extra[0]}' is not supported through the gateway's Messages API",
                           param=extra[0])
    if not isinstance(body.get("model"), str):
        raise RequestError("model: field required", param="model")
    if not isinstance(body.get("max_tokens"), int):
        raise RequestError("max_tokens: field required", param="max_tokens")
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text(body["system"])})
    for msg in body.get("messages") or []:
        role, content = msg.get("role"), msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
            list(content or [])
        if role == "user":
            results = [b for b in blocks if b.get("type") == "tool_result"]
            for r in results:
                text = _text(r.get("content"))
                if r.get("is_error"):
                    text = "error: " + text
                messages.append({"role": "tool", "tool_call_id": r.get("tool_use_id"),
                                 "content": text})
            rest = [b for b in blocks if b.get("type") != "tool_result"]
            if rest:
                messages.append({"role": "user", "content": _user_parts(rest)})
        elif role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": _text(
                [b for b in blocks if b.get("type") == "text"]) or None}
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"),
                                   "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                     for b in blocks if b.get("type") == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
        else:
            raise RequestError(f"messages: role must be user or assistant, not {role!r}",
                               param="messages")
    req: dict[str, Any] = {"model": body["model"], "messages": messages,
                           "max_tokens": body["max_tokens"]}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            req[key] = body[key]
    if body.get("stop_sequences"):
        req["stop"] = list(body["stop_sequences"])
    if (body.get("metadata") or {}).get("user_id"):
        req["user"] = body["metadata"]["user_id"]
    if body.get("tools"):
        req["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}}
            for t in body["tools"]]
    choice = body.get("tool_choice")
    if choice:
        kind = choice.get("type")
        req["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or \
            {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            req["parallel_tool_calls"] = False
    return req


# -- response ----------------------------------------------------------------------------------
def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens - u.cache_write_tokens,
            "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": u.cache_write_tokens - u.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": u.cache_write_1h_tokens}}


def from_openai(body: dict[str, Any], usage: Usage) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
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
    return {"id": "msg_" + str(body.get("id", uuid.uuid4().hex)).removeprefix("chatcmpl-"),
            "type": "message", "role": "assistant", "model": body.get("model"),
            "content": content,
            "stop_reason": STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(usage)}


async def messages(incoming: Incoming, caller: ModelCaller) -> Response:
    tags, t0 = incoming.tags, incoming.t0
    body: Any = None
    try:
        body = parse_body(incoming.body)
        check("messages", body)
        req = to_openai(body)
        if body.get("stream"):
            out = await caller.stream(req, tags=tags)
            headers = flowc_headers(out.target.provider, out.target.model, None,
                                    (out.state.started - t0) * 1000, out.rule)
            headers["cache-control"] = "no-cache"
            return GatewayStream(_events(out.chunks, body["model"]), out.close, headers)
        done = await caller.complete(req, tags=tags)
    except FlowcError as err:
        caller.refused(body, err, stream=bool(isinstance(body, dict) and body.get("stream")))
        return error_response(err)
    headers = flowc_headers(done.target.provider, done.body.get("model") or done.target.model,
                            done.cost, (time.perf_counter() - t0) * 1000 - done.upstream_ms,
                            done.rule)
    return Response(orjson.dumps(from_openai(done.body, done.usage)),
                    media_type="application/json", headers=headers)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _events(chunks: AsyncIterator[dict[str, Any]], model: str) -> AsyncIterator[bytes]:
    """OpenAI chunks -> Anthropic stream events, one content block at a time."""
    index = -1
    open_kind: str | None = None
    tool_index: dict[int, int] = {}  # OpenAI tool call index -> content block index
    stop = "end_turn"
    usage = Usage()
    started = False
    try:
        async for chunk in chunks:
            if not started:
                started = True
                yield _sse("message_start", {"type": "message_start", "message": {
                    "id": "msg_" + str(chunk.get("id", "")).removeprefix("chatcmpl-"),
                    "type": "message", "role": "assistant", "content": [],
                    "model": chunk.get("model") or model, "stop_reason": None,
                    "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
            if chunk.get("usage") and not chunk.get("choices"):
                usage = Usage.from_openai(chunk["usage"])
                continue
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    if open_kind != "text":
                        if open_kind is not None:
                            yield _sse("content_block_stop", {"type": "content_block_stop",
                                                              "index": index})
                        index += 1
                        open_kind = "text"
                        yield _sse("content_block_start", {
                            "type": "content_block_start", "index": index,
                            "content_block": {"type": "text", "text": ""}})
                    yield _sse("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": delta["content"]}})
                for call in delta.get("tool_calls") or ():
                    i = call.get("index", 0)
                    if i not in tool_index:
                        if open_kind is not None:
                            yield _sse("content_block_stop", {"type": "content_block_stop",
                                                              "index": index})
                        index += 1
                        open_kind = "tool"
                        tool_index[i] = index
                        fn = call.get("function") or {}
                        yield _sse("content_block_start", {
                            "type": "content_block_start", "index": index,
                            "content_block": {"type": "tool_use", "id": call.get("id"),
                                              "name": fn.get("name"), "input": {}}})
                    args = (call.get("function") or {}).get("arguments")
                    if args:
                        yield _sse("content_block_delta", {
                            "type": "content_block_delta", "index": tool_index[i],
                            "delta": {"type": "input_json_delta", "partial_json": args}})
                if choice.get("finish_reason"):
                    stop = STOP.get(choice["finish_reason"], "end_turn")
        if open_kind is not None:
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": _usage(usage)})
        yield _sse("message_stop", {"type": "message_stop"})
    except FlowcError as err:
        yield _sse("error", {"type": "error", "error": {
            "type": error_type(err.status), "message": err.message}})


async def count_tokens(incoming: Incoming, caller: ModelCaller) -> Response:
    """`POST /v1/messages/count_tokens`."""
    return error_response(RequestError("count_tokens is not served yet", status=404))
