"""The gateway's own GET endpoints: the base URL, health, readiness, the model lists and
`/metrics` (runtime/api/metrics.py). The model APIs themselves (POST) are answered in
runtime/gateway/hotpath.py."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from flowc import __version__
from runtime.access.gate import OPEN, Principal
from runtime.api import metrics
from runtime.api.common import current, json_response
from runtime.gateway.anthropic_api import count_tokens as anthropic_count_tokens
from runtime.gateway.anthropic_api import messages as anthropic_messages
from runtime.gateway.embeddings_api import embeddings
from runtime.gateway.hotpath import PRINCIPAL, Handler
from runtime.gateway.models_api import Visible, list_models, retrieve_model, visible_to
from runtime.gateway.openai_api import chat_completions
from runtime.gateway.responses_api import responses

# The model APIs, answered in runtime/gateway/hotpath.py (POST only).
MODEL_APIS: dict[str, Handler] = {
    "/v1/chat/completions": chat_completions,
    "/v1/responses": responses,
    "/v1/messages": anthropic_messages,
    "/v1/messages/count_tokens": anthropic_count_tokens,
    "/v1/embeddings": embeddings,
}

router = APIRouter()
router.include_router(metrics.router)


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    # Clients probe the base URL (Claude Code sends `HEAD /` first).
    if request.method == "HEAD":
        return Response(media_type="application/json")
    return json_response({
        "service": "flowc", "version": __version__,
        "endpoints": {**{path: "POST" for path in MODEL_APIS},
                      "/v1/models": "GET", "/v1/models/{model}": "GET",
                      "/v1/workflows": "GET", "/v1/costs/summary": "GET",
                      "/dashboard": "GET", "/health": "GET", "/metrics": "GET"},
        "docs": "/docs"})


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    rt = current(request)
    checks = await asyncio.gather(*(
        _reachable(ep.base_url) for ep in rt.providers.endpoints.values()))
    providers = dict(zip(rt.providers.endpoints, checks, strict=True))
    ok = any(providers.values())
    # Degraded: another process holds the ledger file (an orphan of a killed server);
    # calls are served and their rows wait in the inbox until this server takes the
    # file over, but /v1/costs/* cannot answer.
    ledger = rt.ledger.status()
    status = "unavailable" if not ok else "ready" if ledger["owner"] else "degraded"
    body = {"status": status, "providers": providers, "ledger": ledger}
    # Keys and budgets on a store shared by instances: while it cannot be reached, keys
    # already loaded still work and budgets fail closed or open (docs/scaling.md).
    shared = getattr(rt.gate.store, "status", None)
    if shared is not None:
        body["access"] = access = shared()
        if not access["reachable"] and status == "ready":
            body["status"] = "degraded"
    return JSONResponse(body, status_code=200 if ok else 503)


# A key limited to some models sees only those, as OpenAI lists a project's models.
@router.get("/v1/models")
async def models(request: Request) -> Response:
    return await list_models(current(request).catalog, request, _visible(request))


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Response:
    return await retrieve_model(current(request).catalog, request, model_id,
                                _visible(request))


def _visible(request: Request) -> Visible | None:
    who: Principal = request.scope.get(PRINCIPAL, OPEN)
    return visible_to(who.key)


async def _reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
