"""OpenAI's Chat Completions API, and any server that speaks it (vLLM, LM Studio, Groq, ...).

The request is already in this format: the adapter sets the model, always asks a stream for
its usage (`stream_options.include_usage`, or streamed calls would be logged with 0 tokens),
and reads usage back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from runtime.providers.base import ChatResult, Endpoint, StreamState, Usage, sse_events


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


async def complete(ep: Endpoint, req: dict[str, Any], model: str) -> ChatResult:
    status, headers, raw, ms = await ep.post("/chat/completions",
                                             build_request(req, model, False), _headers(ep))
    if status >= 400:
        raise ep.error(status, headers, raw)
    body = ep.parse(raw)
    return ChatResult(body, Usage.from_openai(body.get("usage")), ms)


async def stream(ep: Endpoint, req: dict[str, Any], model: str, state: StreamState
                 ) -> AsyncIterator[dict[str, Any]]:
    resp = await ep.open_stream("/chat/completions", build_request(req, model, True),
                                _headers(ep))
    try:
        async for _, data in sse_events(resp, ep.name):
            if data == b"[DONE]":
                break
            chunk = ep.parse(data)
            if chunk.get("usage"):
                state.usage = Usage.from_openai(chunk["usage"])
            for choice in chunk.get("choices") or ():
                if choice.get("finish_reason"):
                    state.finish_reason = choice["finish_reason"]
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    state.mark_token()
            yield chunk
    finally:
        resp.release()
