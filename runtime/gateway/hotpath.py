"""The gateway's hot endpoints as a bare ASGI layer in front of FastAPI.

Measured here, FastAPI's routing and middleware stack cost more per request than
everything flowc does for a call (routing, pricing, ledger); so `POST /v1/chat/completions`
and `POST /v1/messages` are answered before it. Everything else (pipelines, costs,
dashboard, MCP) stays on FastAPI. See docs/benchmarks.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from runtime.gateway.calls import ModelCaller

Handler = Callable[[bytes, str | None, ModelCaller, float], Awaitable[Response]]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
MAX_BODY = 32 * 1024 * 1024


class HotPaths:
    def __init__(self, app: ASGIApp, caller: Callable[[], ModelCaller],
                 routes: dict[str, Handler]) -> None:
        self.app = app
        self.caller = caller
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            part = message.get("body", b"")
            size += len(part)
            if size > MAX_BODY:
                await Response(b'{"error": {"message": "request body too large", "type": '
                               b'"invalid_request_error"}}', status_code=413,
                               media_type="application/json")(scope, receive, send)
                return
            chunks.append(part)
            if not message.get("more_body"):
                break
        tags = None
        for name, value in scope["headers"]:
            if name == b"x-flowc-tags":
                tags = value.decode("latin-1")
        response = await handler(b"".join(chunks), tags, self.caller(), t0)
        await response(scope, receive, send)
