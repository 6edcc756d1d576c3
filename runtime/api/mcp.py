"""The MCP servers flowc's pipelines use: what is known (any caller) and a fresh discovery
(admin: it starts every configured server)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from runtime.api.auth import Admin, Caller
from runtime.api.common import current, json_response, ledger_unavailable
from runtime.gateway.openai_api import error_response
from runtime.ledger.store import LedgerUnavailable
from runtime.mcp import discovered
from runtime.pg.ledger import PgLedger

router = APIRouter()


# Listing never starts a server (any web page can make a browser send a GET): it shows what
# is known, from running sessions, flowc.yaml and the discovery cache. Starting the servers
# to ask them is an explicit POST.
def _known(request: Request) -> dict[str, dict[str, Any]]:
    rt = current(request)
    return rt.mcp.known(rt.tool_catalog())


def _servers(known: dict[str, dict[str, Any]]) -> Response:
    return json_response({"servers": [
        {"name": n, **{k: v for k, v in s.items() if k != "tools"},
         "tools": None if s["tools"] is None else len(s["tools"])}
        for n, s in sorted(known.items())]})


@router.get("/v1/mcp/servers")
async def servers(request: Request, _: Caller) -> Response:
    return _servers(_known(request))


@router.get("/v1/mcp/tools")
async def tools(request: Request, _: Caller) -> Response:
    return json_response({"tools": [{"server": n, **t} for n, s in
                                    sorted(_known(request).items()) for t in s["tools"] or ()]})


@router.post("/v1/mcp/refresh")
async def refresh(request: Request, _: Admin) -> Response:
    rt = current(request)
    found = await rt.mcp.discover()
    await asyncio.to_thread(rt.mcp.write_cache, found)
    if isinstance(rt.ledger, PgLedger):  # every instance compiles against what was found
        try:
            await asyncio.to_thread(discovered.save, rt.ledger.execute, found,
                                    rt.ledger.instance)
        except LedgerUnavailable as exc:
            return error_response(ledger_unavailable(exc))
        await asyncio.to_thread(rt.refresh_tools)
    return _servers(_known(request))
