"""The step cache over HTTP (admin): `DELETE /v1/cache` clears entries, as `flowc cache
clear` does (it calls this when the project's server holds the ledger)."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request
from starlette.responses import Response

from flowc.caching import duration_seconds
from runtime import step_cache
from runtime.api.auth import Admin
from runtime.api.common import current, json_response
from runtime.gateway.openai_api import error_response
from runtime.providers import RequestError

router = APIRouter()
DURATION = re.compile(r"[1-9]\d{0,8}[smhd]")


@router.delete("/v1/cache")
async def clear(request: Request, _: Admin, pipeline: str | None = None,
                step: str | None = None, older_than: str | None = None) -> Response:
    if older_than is not None and not DURATION.fullmatch(older_than):
        return error_response(RequestError(
            f"older_than must be a duration like 30s, 10m, 1h or 7d, not {older_than!r}",
            param="older_than"))
    deleted = await asyncio.to_thread(
        step_cache.clear, current(request).ledger, pipeline=pipeline, step=step,
        older_than=None if older_than is None else duration_seconds(older_than))
    return json_response({"deleted": deleted})
