"""The HTTP runtime: the gateway, cost endpoints, and (as they land) pipelines and MCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from flowc.config import ProjectConfig
from runtime.gateway.calls import ModelCaller
from runtime.gateway.openai_api import chat_completions, error_response, models_list
from runtime.gateway.routing import Router
from runtime.ledger import reports
from runtime.ledger.store import Ledger, SQLRefused
from runtime.providers import Providers, RequestError

log = logging.getLogger("flowc.server")
SERVER_FILE = Path(".flowc") / "server.json"


@dataclass
class Runtime:
    """Everything a running server holds."""

    config: ProjectConfig
    project_dir: Path
    providers: Providers
    router: Router
    ledger: Ledger
    caller: ModelCaller

    @classmethod
    def start(cls, config: ProjectConfig, project_dir: Path,
              env: Mapping[str, str] | None = None) -> Runtime:
        providers = Providers(config, env)
        router = Router(config, providers)
        ledger = Ledger(project_dir / config.ledger.path, config.ledger.flush_interval)
        return cls(config, project_dir, providers, router, ledger,
                   ModelCaller(config, providers, router, ledger))

    async def stop(self) -> None:
        await self.providers.close()
        await asyncio.to_thread(self.ledger.close)


def create_app(config: ProjectConfig, project_dir: Path, *,
               env: Mapping[str, str] | None = None, public_url: str | None = None) -> FastAPI:
    state: dict[str, Runtime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = Runtime.start(config, project_dir, env)
        state["rt"] = rt
        server_file = project_dir / SERVER_FILE
        if public_url:
            server_file.parent.mkdir(parents=True, exist_ok=True)
            server_file.write_text(json.dumps({"url": public_url, "pid": os.getpid()}))
        try:
            yield
        finally:
            if public_url:
                with contextlib.suppress(FileNotFoundError):
                    server_file.unlink()
            await rt.stop()

    app = FastAPI(title="flowc", version="0.1.0", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)

    def rt() -> Runtime:
        return state["rt"]

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await chat_completions(request, rt().caller)

    @app.get("/v1/models")
    async def _models() -> Response:
        return models_list(rt().caller)

    @app.get("/health")
    async def _health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready() -> Response:
        checks = await asyncio.gather(*(
            _reachable(ep.base_url) for ep in rt().providers.endpoints.values()))
        providers = dict(zip(rt().providers.endpoints, checks, strict=True))
        ok = any(providers.values())
        return JSONResponse({"status": "ready" if ok else "unavailable",
                             "providers": providers}, status_code=200 if ok else 503)

    @app.get("/v1/costs/summary")
    async def _summary(since: str | None = None, until: str | None = None,
                       by: str = "day") -> Response:
        try:
            data = await asyncio.to_thread(reports.summary, rt().ledger.select, since, until,
                                           by)
        except (ValueError, RequestError) as exc:
            return error_response(RequestError(str(exc)))
        return Response(orjson.dumps(data, default=str), media_type="application/json")

    @app.get("/v1/costs/export.csv")
    async def _export(since: str | None = None, until: str | None = None) -> Response:
        try:
            text = await asyncio.to_thread(reports.export_csv, rt().ledger.select, since, until)
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        return Response(text, media_type="text/csv",
                        headers={"content-disposition": 'attachment; filename="costs.csv"'})

    @app.post("/v1/costs/sql")
    async def _sql(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            columns, rows = await asyncio.to_thread(rt().ledger.select, str(body["sql"]),
                                                    list(body.get("params") or []))
        except SQLRefused as exc:
            return error_response(RequestError(str(exc), code="sql_refused"))
        except Exception as exc:  # a user's SQL error is a 400 with DuckDB's message
            return error_response(RequestError(f"query failed: {exc}", code="sql_error"))
        return Response(orjson.dumps({"columns": columns, "rows": rows}, default=str),
                        media_type="application/json")

    app.state.runtime = state
    return app


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
