"""OpenAI's Chat Completions API, and any server that speaks it (vLLM, LM Studio, Groq, ...).

The request is already in this format: the adapter sets the model, always asks a stream for
its usage (`stream_options.include_usage`, or streamed calls would be logged with 0 tokens),
and reads usage back. The Responses API's verbatim calls (`/responses`, plain and streamed,
usage read on the way) are here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

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
    if state.model is None and isinstance(chunk.get("model"), str):
        state.model = chunk["model"]
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


# -- the Responses API, verbatim (runtime/gateway/responses_api.py) ------------------------------
def responses_usage(u: Any) -> Usage:
    """A Responses `usage` object as the ledger's usage; a wrong-shaped one raises one of
    SHAPE_ERRORS."""
    if not u:
        return Usage()
    i = u.get("input_tokens_details") or {}
    o = u.get("output_tokens_details") or {}
    return Usage(prompt_tokens=int(u.get("input_tokens") or 0),
                 completion_tokens=int(u.get("output_tokens") or 0),
                 cached_tokens=int(i.get("cached_tokens") or 0),
                 cache_write_tokens=int(i.get("cache_write_tokens") or 0),
                 reasoning_tokens=int(o.get("reasoning_tokens") or 0))


def responses_answer_chars(body: dict[str, Any]) -> int:
    """The characters of a Responses answer's output (text, call arguments, reasoning
    summaries), for estimates."""
    n = 0
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        n += len(str(item.get("arguments") or ""))
        for part in (item.get("content") or []) + (item.get("summary") or []):
            if isinstance(part, dict):
                n += len(str(part.get("text") or ""))
    return n


def _json(ep: Endpoint, raw: bytes) -> Any:
    """`Endpoint.parse` for bytes already redacted (they also go to the client as they are)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ep.malformed(raw, "not JSON") from None


async def post_responses(ep: Endpoint, payload: Any, req: dict[str, Any]
                         ) -> tuple[bytes, dict[str, Any], Usage, Any, float]:
    """POST a Responses request as it is (``payload``: a dict, or the client's bytes as an
    `orjson.Fragment`). Returns the answer's bytes (the key cut out, should the provider echo
    it), its JSON, its usage (estimated, marked, when it has none), the response headers
    and the upstream time in ms."""
    status, headers, raw, ms = await ep.post("/responses", payload, _headers(ep))
    if status >= 400:
        raise ep.error(status, headers, raw)
    if ep.api_key:
        raw = ep.redact(raw, masked=False)
    body = _json(ep, raw)
    if not isinstance(body, dict) or not isinstance(body.get("output"), list):
        raise ep.malformed(raw, "not a response object")
    try:
        usage = body.get("usage")
        found = (responses_usage(usage) if isinstance(usage, dict)
                 else estimate_usage(req, responses_answer_chars(body)))
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None
    return raw, body, found, headers, ms


# Events after which a Responses stream is over.
_FINAL = ("response.completed", "response.incomplete", "response.failed")


class StreamFailed(UpstreamError):
    """A Responses stream that ended in `response.failed` or `error`: the event already went
    to the client as the provider sent it, so nothing more is written after it."""

    sent = True


def _read_event(ep: Endpoint, ev: dict[str, Any], state: StreamState) -> None:
    """Usage, served model, first token and the answer's length from one event."""
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        raise TypeError("not a Responses stream event")
    kind = ev["type"]
    if kind in ("response.output_text.delta", "response.function_call_arguments.delta",
                "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
                "response.refusal.delta"):
        state.mark_token()
        state.out_chars += len(ev.get("delta") or "")
    elif kind in ("response.created", "response.in_progress") or kind in _FINAL:
        response = ev.get("response") or {}
        state.model = response.get("model") or state.model
        if kind in _FINAL:
            state.finish_reason = kind
            if isinstance(response.get("usage"), dict):
                state.usage = responses_usage(response["usage"])


async def stream_responses(ep: Endpoint, payload: Any, state: StreamState,
                           final: list[dict[str, Any]],
                           on_open: Callable[[Any], None] | None = None
                           ) -> AsyncIterator[bytes]:
    """A Responses stream passed on event by event as the provider sent it, its usage,
    model and first token read into ``state`` on the way; ``on_open`` gets the response
    headers, and the last event's `response` is appended to ``final`` before that event is
    passed on (so the caller may keep it before the client has it). `response.failed`
    and `error` end it with `StreamFailed`; a stream that ends before a final event is the
    provider's failure."""
    resp = await ep.open_stream("/responses", payload, _headers(ep))
    if on_open is not None:
        on_open(resp.headers)
    data = b""
    seq = -1
    try:
        async for _, data in sse_events(resp, ep):
            if data == b"[DONE]":
                break
            if ep.api_key:
                data = ep.redact(data, masked=False)
            ev = _json(ep, data)
            try:
                _read_event(ep, ev, state)
            except SHAPE_ERRORS as exc:
                raise ep.malformed(data, str(exc)) from None
            kind = ev["type"]
            seq = ev.get("sequence_number", seq)
            if kind in _FINAL and kind != "response.failed":  # before it is passed on
                final.append(ev.get("response") or {})
            yield b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
            if kind == "error" or kind == "response.failed":
                err = ev.get("error") or (ev.get("response") or {}).get("error") or {}
                message = err.get("message") if isinstance(err, dict) else err
                raise StreamFailed(ep.name, 500, str(message or kind), body=ev)
            if kind in _FINAL:
                return
        raise UpstreamError(ep.name, 502, "the stream ended before response.completed")
    except UpstreamError as err:
        # The client's error event numbers on from the provider's last.
        err.sequence_number = seq + 1 if isinstance(seq, int) else 0  # type: ignore[attr-defined]
        raise
    finally:
        resp.release()
