"""`GET /metrics`: Prometheus's text format (runtime/observe/metrics.py).

Who may read it once auth is on: the admin key, or a read-only key with no team (one made
for the scraper: `flowc keys create --name prometheus --read-only`). The figures cover every
team's traffic (by provider and model, never by key or team), so a team's key, read-only or
not, gets a 403 like any admin-only endpoint. With auth off anyone on the network the server
answers may read it, as every other endpoint.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from runtime.api.auth import Access, access, forbidden
from runtime.api.common import current
from runtime.observe import METRICS

router = APIRouter()


def metrics_reader(request: Request) -> Access:
    a = access(request)
    key = a.who.key
    if a.admin or (key is not None and key.read_only and not key.team):
        return a
    raise forbidden(f"GET /metrics needs the admin key or a read-only key without a team "
                    f"({a.label} may not read it: the metrics cover every team)",
                    "metrics_forbidden")


@router.get("/metrics")
async def metrics(request: Request, _: Annotated[Access, Depends(metrics_reader)]) -> Response:
    """The text format, or OpenMetrics when the scraper's Accept asks for it."""
    body, content_type = METRICS.render(current(request).ledger,
                                        request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
