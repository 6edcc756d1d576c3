"""The OpenAI-compatible surface: `POST /v1/chat/completions` (`GET /v1/models` is in
models_api.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from flowc.cost import amount
from runtime.gateway.calls import CallContext, ModelCaller, Outcome, StreamOutcome
from runtime.gateway.incoming import Incoming
from runtime.gateway.validate import check
from runtime.providers import FlowcError, RequestError


class GatewayStream(StreamingResponse):
    """A streamed answer whose model call is ended, and its ledger row written, however the
    response ends: read to the end, the client gone (a `cancelled` row with the tokens so
    far), or the server shutting down."""

    def __init__(self, content: AsyncIterator[bytes], close: Callable[[], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._close()


class Answer(Response):
    """A whole JSON answer with its headers already bytes (no content-length: it is
    ``body``'s): the hot path writes it with `runtime.http_server.respond`, and it is still
    an ASGI response for anything else."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.body, self.status_code, self.background = body, 200, None
        self.headers_only = [(b"content-type", b"application/json"), *headers]
        self.raw_headers = [*self.headers_only, (b"content-length", b"%d" % len(body))]


def error_response(err: FlowcError, headers: dict[str, str] | None = None) -> Response:
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers = {**(headers or {}), "retry-after": str(max(0, math.ceil(retry_after)))}
    return Response(orjson.dumps(err.to_openai()), status_code=err.status,
                    media_type="application/json", headers=headers)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def validate_chat(body: dict[str, Any]) -> None:
    check("chat", body)
    messages = body["messages"]
    if not messages:
        raise RequestError("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
                "system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] needs a role of system, developer, user, "
                               "assistant or tool", param=f"messages[{i}].role")


def flowc_headers(provider: str, model: str, cost: Any, overhead_ms: float,
                  rule: str | None) -> dict[str, str]:
    h = {"x-flowc-provider": provider, "x-flowc-model": model,
         "x-flowc-overhead-ms": f"{max(0.0, overhead_ms):.3f}"}
    if cost is not None:
        h["x-flowc-cost-usd"] = amount(round(cost, 9))  # as the ledger's DECIMAL(18, 9) keeps it
    if rule:
        h["x-flowc-route"] = rule
    return h


def stream_headers(out: StreamOutcome, t0: float) -> dict[str, str]:
    """A streamed answer's headers: sent before its end, so no cost; the overhead is our
    time before the upstream call began; the model as the provider named it, if it has."""
    headers = flowc_headers(out.target.provider, out.state.model or out.target.model, None,
                            (out.state.started - t0) * 1000, out.rule)
    headers["cache-control"] = "no-cache"
    return headers


def answer(done: Outcome, t0: float, raw: bytes | None = None,
           extra: Mapping[str, str] | None = None) -> Response:
    """A finished call's answer, in any wire: its body (``raw``: the provider's own bytes,
    when forwarded verbatim) with flowc's headers (and ``extra`` ones)."""
    headers = flowc_headers(done.target.provider, done.body.get("model") or done.target.model,
                            done.cost, (time.perf_counter() - t0) * 1000 - done.upstream_ms,
                            done.rule)
    if extra:
        headers.update({k.lower(): v for k, v in extra.items()})
    return Answer(raw if raw is not None else orjson.dumps(done.body),
                  [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()])


def refused(caller: ModelCaller, incoming: Incoming, body: Any, err: FlowcError) -> None:
    """A request refused before or by its call: on the books (see `ModelCaller.refused`)."""
    caller.refused(body, err, stream=bool(isinstance(body, dict) and body.get("stream")),
                   ctx=incoming.context(), tags=incoming.tags)


async def chat_completions(incoming: Incoming, caller: ModelCaller) -> Response:
    tags, t0 = incoming.tags, incoming.t0
    body: Any = None
    try:
        body = parse_body(incoming.body)
        validate_chat(body)
        if body.get("stream"):
            return await _stream(body, tags, caller, t0, incoming.context())
        out = await caller.complete(body, tags=tags, ctx=incoming.context())
    except FlowcError as err:
        refused(caller, incoming, body, err)
        return error_response(err)
    return answer(out, t0)


async def _stream(body: dict[str, Any], tags: str | None, caller: ModelCaller,
                  t0: float, ctx: CallContext) -> Response:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    out = await caller.stream(body, tags=tags, ctx=ctx)
    headers = stream_headers(out, t0)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in out.chunks:
                if chunk.get("usage") and not chunk.get("choices"):
                    if not include_usage:
                        continue  # asked upstream for the ledger; the client did not ask
                elif not include_usage:
                    chunk.pop("usage", None)
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except FlowcError as err:  # after the first byte, the error travels in the stream
            yield b"data: " + orjson.dumps(err.to_openai()) + b"\n\n"
        except asyncio.CancelledError:
            raise

    return GatewayStream(events(), out.close, headers)

