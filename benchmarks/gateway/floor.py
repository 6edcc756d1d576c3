"""The Python floor: the least a Python gateway can do per request.

A bare ASGI app on uvicorn (uvloop, httptools: as `flowc serve` runs) that forwards each
POST's body to the same path on the upstream over one pooled aiohttp session and returns
the upstream's bytes. No parsing, routing, pricing or ledger: what is left is the cost of
the server, the client and the event loop, which no gateway written in Python goes under.

    python benchmarks/gateway/floor.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = sys.argv[2].rstrip("/")
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",))
    return _session


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    async with session().post(UPSTREAM + scope["path"], data=body,
                              headers={"content-type": "application/json"}) as resp:
        out = await resp.read()
        ctype = resp.headers.get("content-type", "application/json").encode()
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
