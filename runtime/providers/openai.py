"""OpenAI's Chat Completions API, and any server that speaks it (vLLM, LM Studio, Groq, ...).

The request is already in this format: the adapter sets the model, always asks a stream for
its usage (`stream_options.include_usage`, or streamed calls would be logged with 0 tokens),
and reads usage back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from runtime.providers.base import (
    SHAPE_ERRORS,
    ChatResult,
    Endpoint,
    StreamState,
    UpstreamError,
    Usage,
    answer_chars,
    estimate_usage,
    sse_events,
)


def _headers(ep: Endpoint) -> dict[str, str]:
    return {"authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}


def build_request(req: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body = {**req, "model": model}
    if stream:
        body["stream"] = True
        body["stream_options"] = {**(req.get("stream_options") or {}), "include_usage": True}
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


def _usage(ep: Endpoint, req: dict[str, Any], raw: bytes, body: Any) -> Usage:
    """The answer's usage (estimated when it has none), once its shape is checked: it passes
    to the client as it is, so an answer without choices or with a usage that is not an
    object is the provider's failure, not the client's surprise."""
    if not isinstance(body, dict):
        raise ep.malformed(raw, "not a chat.completion object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ep.malformed(raw, "no choices")
    try:
        for choice in choices:
            if not isinstance(choice.get("message"), dict):
                raise TypeError("a choice without a message")
        usage = body.get("usage")
        if usage is None:  # some OpenAI-compatible servers leave it out
            return estimate_usage(req, answer_chars(body))
        if not isinstance(usage, dict):
            raise TypeError("usage is not an object")
        return Usage.from_openai(usage)
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None


async def complete(ep: Endpoint, req: dict[str, Any], model: str) -> ChatResult:
    status, headers, raw, ms = await ep.post("/chat/completions",
                                             build_request(req, model, False), _headers(ep))
    if status >= 400:
        raise ep.error(status, headers, raw)
    body = ep.parse(raw)
    return ChatResult(body, _usage(ep, req, raw, body), ms)


def _read_chunk(ep: Endpoint, chunk: Any, state: StreamState) -> None:
    """Usage, finish reason and the answer's length from one chunk (for the ledger)."""
    if not isinstance(chunk, dict):
        raise TypeError("not a chat.completion.chunk object")
    if chunk.get("error"):  # an error in the middle of a stream, as OpenAI sends it
        err = chunk["error"]
        raise UpstreamError(ep.name, 500, str(err.get("message") or err)
                            if isinstance(err, dict) else str(err))
    if chunk.get("usage"):
        state.usage = Usage.from_openai(chunk["usage"])
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            state.out_chars += len(content)
            state.mark_token()
        calls = delta.get("tool_calls")
        if calls:
            state.mark_token()
            for call in calls:
                state.out_chars += len((call.get("function") or {}).get("arguments") or "")


async def stream(ep: Endpoint, req: dict[str, Any], model: str, state: StreamState
                 ) -> AsyncIterator[dict[str, Any]]:
    resp = await ep.open_stream("/chat/completions", build_request(req, model, True),
                                _headers(ep))
    done = False
    try:
        async for _, data in sse_events(resp, ep):
            if data == b"[DONE]":
                done = True
                break
            chunk = ep.parse(data)
            try:
                _read_chunk(ep, chunk, state)
            except SHAPE_ERRORS as exc:
                raise ep.malformed(data, str(exc)) from None
            yield chunk
        if not done and state.finish_reason is None:
            raise UpstreamError(ep.name, 502, "the stream ended before [DONE]")
    finally:
        resp.release()
