"""Ollama's native `/api/chat`, translated to and from OpenAI's Chat Completions.

Tools go through `/api/chat`'s own `tools` field (never a prompt trick); `tool_calls` come
back with arguments as objects and no ids, so ids are minted here. Usage comes from
`prompt_eval_count` / `eval_count` (in a stream, only on the final `done` line). Images must
be inline (base64): Ollama cannot fetch URLs, so an image URL is refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from runtime.providers.base import (
    SHAPE_ERRORS,
    ChatResult,
    Endpoint,
    RequestError,
    StreamState,
    UnsupportedFeature,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    answer_chars,
    estimate_usage,
)

_HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "stop", "stream", "stream_options", "tools", "tool_choice", "response_format",
            "seed", "n", "user"}


def _text(content: Any) -> tuple[str, list[str]]:
    """Text and base64 images of an OpenAI message content."""
    if content is None or isinstance(content, str):
        return content or "", []
    text, images = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text.append(part.get("text", ""))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if not url.startswith("data:"):
                raise UnsupportedFeature("ollama", "image URLs (send images inline as data: "
                                         "URLs)", "messages")
            images.append(url.partition(",")[2])
        else:
            raise UnsupportedFeature("ollama", f"'{kind}' message parts", "messages")
    return "".join(text), images


def build_request(req: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    extra = sorted(k for k, v in req.items() if k not in _HANDLED and v is not None)
    if extra:
        raise UnsupportedFeature("ollama", f"'{extra[0]}'", extra[0])
    if req.get("n") not in (None, 1):
        raise UnsupportedFeature("ollama", "n > 1", "n")
    names: dict[str, str] = {}  # tool call id -> tool name, for tool result messages
    messages = []
    for msg in req.get("messages") or []:
        role = msg.get("role")
        text, images = _text(msg.get("content"))
        out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": text}
        if images:
            out["images"] = images
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = call.get("function") or {}
                names[call.get("id", "")] = fn.get("name", "")
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise RequestError(f"tool call {call.get('id')} has arguments that are "
                                       "not JSON", param="messages") from None
                calls.append({"function": {"name": fn.get("name"), "arguments": args}})
            out["tool_calls"] = calls
        if role == "tool" and msg.get("tool_call_id") in names:
            out["tool_name"] = names[msg["tool_call_id"]]
        messages.append(out)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    options: dict[str, Any] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if req.get(ours) is not None:
            options[theirs] = req[ours]
    if req.get("max_completion_tokens") or req.get("max_tokens"):
        options["num_predict"] = req.get("max_completion_tokens") or req.get("max_tokens")
    if req.get("stop"):
        options["stop"] = [req["stop"]] if isinstance(req["stop"], str) else list(req["stop"])
    if options:
        body["options"] = options
    choice = req.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise UnsupportedFeature("ollama", f"tool_choice {choice!r}", "tool_choice")
    if req.get("tools") and choice != "none":
        body["tools"] = req["tools"]
    rf = req.get("response_format") or {}
    if rf.get("type") == "json_object":
        body["format"] = "json"
    elif rf.get("type") == "json_schema":
        body["format"] = (rf.get("json_schema") or {}).get("schema") or "json"
    return body


def usage_of(body: dict[str, Any], estimate: Usage | None = None) -> Usage:
    """`prompt_eval_count` / `eval_count`; Ollama leaves a count out at times (the prompt
    count when the prompt was cached): then ``estimate``'s count stands in, marked."""
    prompt, completion = body.get("prompt_eval_count"), body.get("eval_count")
    if estimate is not None and (prompt is None or completion is None):
        return Usage(prompt_tokens=estimate.prompt_tokens if prompt is None else int(prompt),
                     completion_tokens=estimate.completion_tokens if completion is None
                     else int(completion), estimated=True)
    return Usage(prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0))


def _counted(body: dict[str, Any]) -> bool:
    return "prompt_eval_count" in body and "eval_count" in body


def _tool_calls(message: dict[str, Any], start: int = 0) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(message.get("tool_calls") or (), start=start):
        fn = call.get("function") or {}
        args = fn.get("arguments")
        calls.append({"index": i, "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                      "type": "function",
                      "function": {"name": fn.get("name"),
                                   "arguments": args if isinstance(args, str)
                                   else orjson.dumps(args or {}).decode()}})
    return calls


def _finish(body: dict[str, Any], had_tools: bool) -> str:
    if had_tools:
        return "tool_calls"
    return "length" if body.get("done_reason") == "length" else "stop"


def to_openai(body: dict[str, Any], usage: Usage | None = None) -> dict[str, Any]:
    message = body.get("message") or {}
    calls = _tool_calls(message)
    out_msg: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None,
                               "refusal": None}
    if calls:
        out_msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": out_msg, "finish_reason": _finish(body, bool(calls)),
                     "logprobs": None}],
        "usage": (usage or usage_of(body)).to_openai(),
    }


async def complete(ep: Endpoint, req: dict[str, Any], model: str) -> ChatResult:
    status, headers, raw, ms = await ep.post("/api/chat", build_request(req, model, False), {})
    if status >= 400:
        raise ep.error(status, headers, raw)
    body = ep.parse(raw)
    try:
        if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
            raise TypeError("not a chat response object")
        out = to_openai(body)
        usage = usage_of(body, None if _counted(body)
                         else estimate_usage(req, answer_chars(out)))
        out["usage"] = usage.to_openai()
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None
    return ChatResult(out, usage, ms)


async def stream(ep: Endpoint, req: dict[str, Any], model: str, state: StreamState
                 ) -> AsyncIterator[dict[str, Any]]:
    resp = await ep.open_stream("/api/chat", build_request(req, model, True), {})
    base: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}",
                            "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model}
    n_tools = 0

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                     "logprobs": None}]}

    started: list[bool] = []  # the role chunk goes out with the first line, not before

    def read(line: bytes) -> list[dict[str, Any]]:
        """The chunks one line of the stream makes."""
        nonlocal n_tools
        body = ep.parse(line)
        if not isinstance(body, dict):
            raise TypeError("not a chat response object")
        if body.get("error"):
            raise UpstreamError(ep.name, 500, str(body["error"]))
        out = []
        if not started:
            started.append(True)
            out.append(chunk({"role": "assistant", "content": ""}))
        base["model"] = body.get("model") or base["model"]
        message = body.get("message") or {}
        content = message.get("content")
        if content:
            state.mark_token()
            state.out_chars += len(content)
            out.append(chunk({"content": content}))
        calls = _tool_calls(message, n_tools)
        if calls:
            state.mark_token()
            n_tools += len(calls)
            state.out_chars += sum(len(c["function"]["arguments"]) for c in calls)
            out.append(chunk({"tool_calls": calls}))
        if body.get("done"):
            state.usage = usage_of(body, None if _counted(body)
                                   else estimate_usage(req, state.out_chars))
            state.finish_reason = _finish(body, n_tools > 0)
            out.append(chunk({}, state.finish_reason))
            out.append({**base, "choices": [], "usage": state.usage.to_openai()})
        return out

    try:
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            try:
                chunks = read(line)
            except SHAPE_ERRORS as exc:
                raise ep.malformed(line, str(exc)) from None
            for c in chunks:
                yield c
            if state.usage is not None:
                return
        raise UpstreamError(ep.name, 502, "the stream ended before its final line")
    except TimeoutError:
        raise UpstreamTimeout(ep.name, ep.timeout) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamUnavailable(ep.name, f"stream cut off: {type(exc).__name__}") from None
    finally:
        resp.release()
