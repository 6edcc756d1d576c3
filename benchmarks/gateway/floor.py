"""The Python floor: the least a Python gateway can do per request.

A bare ASGI app on uvicorn (uvloop, httptools: as `flowc serve` runs) that forwards each
POST's body to the same path on the upstream over one pooled aiohttp session and returns
the upstream's bytes. No parsing, routing, pricing or ledger: what is left is the cost of
the server, the client and the event loop, which no gateway written in Python goes under.

    python benchmarks/gateway/floor.py PORT UPSTREAM_URL [CLIENT]

CLIENT (for benchmarks/bench_clients.py) swaps aiohttp for another upstream client:
flowc (runtime/providers/http1.py), pyreqwest, aiosonic, httpr or curl_cffi.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = sys.argv[2].rstrip("/")
CLIENT = sys.argv[3] if len(sys.argv) > 3 else "aiohttp"
JSON = {"content-type": "application/json"}
_session: aiohttp.ClientSession | None = None
_other: Any = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",))
    return _session


async def forward(path: str, body: bytes) -> tuple[int, bytes, str]:
    """POST through the chosen client: status, body, content type."""
    global _other
    if CLIENT == "aiohttp":
        async with session().post(UPSTREAM + path, data=body, headers=JSON) as resp:
            return resp.status, await resp.read(), resp.headers.get("content-type", "")
    if CLIENT == "flowc":
        from runtime.providers.http1 import Pool

        _other = _other or Pool(UPSTREAM)
        status, headers, out = await _other.post(path, body, JSON, 30.0)
        return status, out, headers.get("content-type", "")
    if CLIENT == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        if _other is None:
            _other = await ClientBuilder().max_connections(256).http1_only().build().__aenter__()
        r = await _other.post(UPSTREAM + path).headers(JSON).body_bytes(body).build().send()
        return r.status, bytes(await r.bytes()), r.get_header("content-type") or ""
    if CLIENT == "aiosonic":
        import aiosonic

        _other = _other or aiosonic.HTTPClient()
        r = await _other.post(UPSTREAM + path, data=body, headers=JSON)
        return r.status_code, await r.content(), r.headers.get("content-type", "")
    if CLIENT == "httpr":
        import httpr

        _other = _other or httpr.AsyncClient()
        r = await _other.post(UPSTREAM + path, content=body, headers=JSON)
        return r.status_code, r.content, r.headers.get("content-type", "")
    if CLIENT == "curl_cffi":
        from curl_cffi.requests import AsyncSession

        _other = _other or AsyncSession(max_clients=256)
        r = await _other.post(UPSTREAM + path, data=body, headers=JSON)
        return r.status_code, r.content, r.headers.get("content-type", "")
    raise SystemExit(f"unknown client {CLIENT}")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    status, out, ctype = await forward(scope["path"], body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", (ctype or "application/json").encode()),
                            (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
