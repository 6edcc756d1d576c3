"""What every router needs: the running server's Runtime, JSON answers and ledger access."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from starlette.responses import Response

from flowc.cost import json_default
from runtime.ledger.store import LedgerUnavailable
from runtime.providers import FlowcError, RequestError

if TYPE_CHECKING:
    from runtime.server import Runtime


def current(request: Request) -> Runtime:
    """The Runtime the lifespan started (runtime/server.py)."""
    return request.app.state.runtime["rt"]  # type: ignore[no-any-return]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=json_default), status_code=status,
                    media_type="application/json")


def ledger_unavailable(exc: LedgerUnavailable) -> FlowcError:
    err = FlowcError(str(exc))
    err.status, err.code = 503, "ledger_unavailable"
    return err


async def report(rt: Runtime, make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A ledger report, off the event loop; a bad filter is the caller's 400."""
    try:
        return await asyncio.to_thread(lambda: make(rt.ledger.report, *args, **kwargs))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    except LedgerUnavailable as exc:
        raise ledger_unavailable(exc) from None


async def query(rt: Runtime, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """flowc's own statements on the ledger file: while another process holds it, a 503."""
    try:
        return await asyncio.to_thread(rt.ledger.execute, sql, list(params))
    except LedgerUnavailable as exc:
        raise ledger_unavailable(exc) from None
