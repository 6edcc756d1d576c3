"""The HTTP runtime: the gateway, cost endpoints, and (as they land) pipelines and MCP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from flowc import __version__
from flowc.compiler import Project
from flowc.config import TOOL_CACHE, ProjectConfig, ToolCatalog
from runtime import runs
from runtime.access.alerts import Alerter
from runtime.access.gate import Gate, admin_key
from runtime.access.store import LedgerAccessStore
from runtime.dryrun import DryRunModels, DryRunTools
from runtime.executor import Executor
from runtime.gateway.anthropic_api import count_tokens as anthropic_count_tokens
from runtime.gateway.anthropic_api import messages as anthropic_messages
from runtime.gateway.calls import ModelCaller
from runtime.gateway.embeddings_api import embeddings
from runtime.gateway.hotpath import Guard, HotPaths, error_body
from runtime.gateway.models_api import STARTUP_WAIT, ModelCatalog, list_models, retrieve_model
from runtime.gateway.openai_api import chat_completions, error_response
from runtime.gateway.responses_api import responses
from runtime.gateway.routing import Router
from runtime.inputs import InputError
from runtime.ledger import reports
from runtime.ledger.store import Ledger, LedgerUnavailable, QueryTimeout, SQLRefused
from runtime.mcp.manager import MCPManager
from runtime.mcp.serve import mcp_asgi_app
from runtime.providers import FlowcError, Providers, RequestError
from runtime.workflows import Registry

log = logging.getLogger("flowc.server")
SERVER_FILE = Path(".flowc") / "server.json"
DASHBOARD = Path(__file__).parent / "dashboard" / "index.html"


@dataclass
class Runtime:
    """Everything a running server holds."""

    config: ProjectConfig
    project_dir: Path
    providers: Providers
    router: Router
    ledger: Ledger
    caller: ModelCaller
    mcp: MCPManager
    registry: Registry
    limit: asyncio.Semaphore  # steps running at once across all runs
    catalog: ModelCatalog  # the providers' model lists (GET /v1/models, bare names)
    gate: Gate  # keys, budgets, rate limits (runtime/access)
    alerter: Alerter

    @classmethod
    def start(cls, config: ProjectConfig, project_dir: Path, pipelines: Path | None,
              env: Mapping[str, str] | None = None) -> Runtime:
        providers = Providers(config, env)
        router = Router(config, providers)
        # The server keeps the ledger file in a child process (see runtime/ledger/store.py).
        ledger = Ledger(project_dir / config.ledger.path, config.ledger.flush_interval,
                        in_process=False)
        registry = Registry(Project(config, ToolCatalog.load(config, project_dir / TOOL_CACHE)))
        if pipelines is not None and pipelines.is_dir():
            registry.load_folder(pipelines)
        registry.load_registered(ledger)
        calls_ledger = ledger if config.ledger.enabled else None
        store = LedgerAccessStore(ledger)
        alerter = Alerter(config.alerts, store)
        gate = Gate(config, store, admin_key(config, project_dir, env), alerter)
        try:
            gate.load()
        except LedgerUnavailable as exc:
            log.warning("keys and budgets wait for the ledger: %s", exc)
        return cls(config, project_dir, providers, router, ledger,
                   ModelCaller(config, providers, router, calls_ledger, gate),
                   MCPManager(config.mcp_servers, project_dir), registry,
                   asyncio.Semaphore(256), ModelCatalog(config, providers), gate, alerter)

    def executor(self, dry_run: bool = False) -> Executor:
        if dry_run:
            return Executor(DryRunModels(self.ledger), DryRunTools(), dry_run=True,
                            global_limit=self.limit)
        return Executor(self.caller, self.mcp, global_limit=self.limit)

    async def stop(self) -> None:
        await self.alerter.drain()
        await self.catalog.close()
        await self.mcp.close()
        await self.providers.close()
        await asyncio.to_thread(self.ledger.close)


def create_app(config: ProjectConfig, project_dir: Path, *, pipelines: Path | None = None,
               env: Mapping[str, str] | None = None, public_url: str | None = None,
               bind_host: str | None = None, allow_hosts: Sequence[str] = (),
               allow_origins: Sequence[str] = ()) -> HotPaths:
    """``bind_host`` and ``allow_hosts``/``allow_origins`` (from the command line) add to
    what flowc.yaml's `server:` allows (see runtime/gateway/hotpath.py)."""
    state: dict[str, Runtime] = {}
    mcp_endpoint = mcp_asgi_app(lambda: state["rt"])  # MCP at /mcp (runtime/mcp/serve.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = Runtime.start(config, project_dir, pipelines, env)
        state["rt"] = rt
        await mcp_endpoint.start(rt)
        # The model lists that place bare names, before the first request (bounded: a
        # slow provider's list arrives in the background).
        await rt.catalog.refresh(STARTUP_WAIT, placing=True)
        loading = None if rt.gate.loaded else asyncio.create_task(_load_gate(rt))
        # What exists now lives as long as the server. Frozen, it leaves the collector's
        # generations: a full collection (about once a second under load) then walks only
        # what requests create, instead of ~95k start-up objects (~23 ms, a p99 stall).
        gc.collect()
        gc.freeze()
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
            if loading is not None:
                loading.cancel()
            await mcp_endpoint.aclose()
            await rt.stop()

    app = FastAPI(title="flowc", version="0.1.0", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # A bug still answers in the API's error shape; the traceback goes to the log.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}",
                                       "type": "api_error", "param": None, "code": None}},
                            status_code=500)

    def rt() -> Runtime:
        return state["rt"]

    # The model APIs, answered in runtime/gateway/hotpath.py (POST only).
    model_apis = {
        "/v1/chat/completions": chat_completions,
        "/v1/responses": responses,
        "/v1/messages": anthropic_messages,
        "/v1/messages/count_tokens": anthropic_count_tokens,
        "/v1/embeddings": embeddings,
    }

    @app.api_route("/", methods=["GET", "HEAD"])
    async def _root(request: Request) -> Response:
        # Clients probe the base URL (Claude Code sends `HEAD /` first).
        if request.method == "HEAD":
            return Response(media_type="application/json")
        return Response(orjson.dumps({
            "service": "flowc", "version": __version__,
            "endpoints": {**{path: "POST" for path in model_apis},
                          "/v1/models": "GET", "/v1/models/{model}": "GET",
                          "/v1/workflows": "GET", "/v1/costs/summary": "GET",
                          "/dashboard": "GET", "/health": "GET"},
            "docs": "/docs"}), media_type="application/json")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # An unknown path or method, in the client's error shape (Anthropic's under
        # /v1/messages) instead of FastAPI's `{"detail": ...}`. The model APIs are POST
        # routes FastAPI does not know: another method on them is a 405 too.
        path, method = request.url.path, request.method
        headers = dict(exc.headers or {})
        status = exc.status_code
        if status == 404 and path in model_apis:
            status, headers["allow"] = 405, "POST"
        if status == 405:
            allow = headers.get("allow") or headers.get("Allow") or ""
            code, message = "method_not_allowed", (
                f"{method} is not allowed on {path}" + (f": use {allow}" if allow else ""))
        elif status == 404:
            code, message = "not_found", f"Invalid URL ({method} {path})"
        else:
            code, message = "invalid_request", str(exc.detail)
        return Response(error_body(path, status, code, message), status_code=status,
                        media_type="application/json", headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's 422 `{"detail": [...]}` for a malformed parameter, as a 400 worded
        # like the providers' own.
        problems = []
        for e in exc.errors():
            where, *name = e.get("loc") or ("request",)
            problems.append(f"{where} parameter '{'.'.join(map(str, name))}': {e.get('msg')}"
                            if name else f"{where}: {e.get('msg')}")
        path = request.url.path
        return Response(error_body(path, 400, "invalid_parameter", "; ".join(problems)),
                        status_code=400, media_type="application/json")

    @app.get("/v1/models")
    async def _models(request: Request) -> Response:
        return await list_models(rt().catalog, request)

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str, request: Request) -> Response:
        return await retrieve_model(rt().catalog, request, model_id)

    @app.get("/health")
    async def _health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready() -> Response:
        checks = await asyncio.gather(*(
            _reachable(ep.base_url) for ep in rt().providers.endpoints.values()))
        providers = dict(zip(rt().providers.endpoints, checks, strict=True))
        ok = any(providers.values())
        # Degraded: another process holds the ledger file (an orphan of a killed server);
        # calls are served and their rows wait in the inbox until this server takes the
        # file over, but /v1/costs/* cannot answer.
        ledger = rt().ledger.status()
        status = "unavailable" if not ok else "ready" if ledger["owner"] else "degraded"
        return JSONResponse({"status": status, "providers": providers, "ledger": ledger},
                            status_code=200 if ok else 503)

    @app.exception_handler(FlowcError)
    async def _flowc_error(request: Request, exc: FlowcError) -> Response:
        return error_response(exc)

    async def report(make: Callable[..., Any], *args: Any) -> Any:
        """A ledger report, off the event loop; a bad filter is the caller's 400."""
        try:
            return await asyncio.to_thread(make, rt().ledger.report, *args)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        except LedgerUnavailable as exc:
            raise _ledger_unavailable(exc) from None

    @app.get("/v1/costs/summary")
    async def _summary(since: str | None = None, until: str | None = None,
                       by: str = "day") -> Response:
        data = await report(reports.summary, since, until, by)
        return Response(orjson.dumps(data, default=str), media_type="application/json")

    @app.get("/v1/costs/dashboard")
    async def _dashboard_data(since: str | None = None, until: str | None = None) -> Response:
        data = await report(reports.dashboard, since, until)
        return Response(orjson.dumps(data, default=str), media_type="application/json")

    @app.get("/dashboard")
    async def _dashboard() -> Response:
        return Response(DASHBOARD.read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/v1/costs/export.csv")
    async def _export(since: str | None = None, until: str | None = None) -> Response:
        text = await report(reports.export_csv, since, until)
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
        except QueryTimeout as exc:
            return error_response(RequestError(str(exc), code="sql_timeout"))
        except LedgerUnavailable as exc:
            return error_response(_ledger_unavailable(exc))
        except Exception as exc:  # a user's SQL error is a 400 with DuckDB's message
            return error_response(RequestError(f"query failed: {exc}", code="sql_error"))
        return Response(orjson.dumps({"columns": columns, "rows": rows}, default=str),
                        media_type="application/json")

    # -- pipelines -------------------------------------------------------------------------
    @app.get("/v1/workflows")
    async def _workflows() -> Response:
        return Response(orjson.dumps({"workflows": rt().registry.describe()}),
                        media_type="application/json")

    @app.put("/v1/workflows/{name}")
    async def _register(name: str, request: Request) -> Response:
        raw = (await request.body()).decode("utf-8", errors="replace")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                raw = str(orjson.loads(raw)["yaml"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return error_response(RequestError('send the pipeline as YAML, or as JSON '
                                                   '{"yaml": "..."}'))
        try:
            result = await asyncio.to_thread(rt().registry.register, name, raw, rt().ledger)
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        if result.compiled is None:
            return JSONResponse({"error": {
                "message": f"pipeline '{name}' does not compile",
                "type": "invalid_request_error", "code": "compile_error",
                "diagnostics": [d.to_dict() for d in result.diagnostics]}}, status_code=422)
        return JSONResponse({"name": name, "registered": True,
                             "warnings": [d.to_dict() for d in result.diagnostics]})

    @app.post("/v1/workflow/{name}")
    async def _run(name: str, request: Request) -> Response:
        wf = rt().registry.workflows.get(name)
        if wf is None:
            known = ", ".join(sorted(rt().registry.workflows)) or "none"
            return error_response(RequestError(f"no pipeline named '{name}' (serving: {known})",
                                               status=404, code="workflow_not_found"))
        try:
            body = orjson.loads(await request.body() or b"{}")
            inputs = body.get("input") or {}
            if not isinstance(inputs, dict):
                raise RequestError("'input' must be an object", param="input")
            dry_run = bool(body.get("dry_run", False))
            result = await rt().executor(dry_run).run(wf.compiled, inputs)
        except orjson.JSONDecodeError:
            return error_response(RequestError("the request body is not valid JSON"))
        except InputError as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error",
                                           "code": "invalid_input", "param": "input",
                                           "problems": exc.problems}}, status_code=400)
        except RequestError as exc:
            return error_response(exc)
        await asyncio.to_thread(runs.save, rt().ledger, result)
        return Response(orjson.dumps(result.to_dict(), default=str),
                        media_type="application/json",
                        status_code=200)  # a failed run is a result: see "status", "error"

    async def runs_query(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        """Run records live in the ledger file: while another process holds it, a 503."""
        try:
            return await asyncio.to_thread(rt().ledger.execute, sql, params)
        except LedgerUnavailable as exc:
            raise _ledger_unavailable(exc) from None

    @app.get("/v1/runs/{run_id}")
    async def _run_record(run_id: str) -> Response:
        rows = await runs_query("SELECT record FROM runs WHERE id = ?", [run_id])
        if not rows:
            return error_response(RequestError(f"no run '{run_id}'", status=404))
        return Response(rows[0][0], media_type="application/json")

    @app.get("/v1/runs")
    async def _runs(limit: int = 50) -> Response:
        rows = await runs_query("SELECT id, workflow_name, status, started_at, latency_ms, "
                                "dry_run FROM runs ORDER BY started_at DESC LIMIT ?",
                                [min(limit, 1000)])
        keys = ["run_id", "workflow", "status", "started_at", "latency_ms", "dry_run"]
        return Response(orjson.dumps({"runs": [dict(zip(keys, r, strict=True)) for r in rows]},
                                     default=str), media_type="application/json")

    # -- MCP -------------------------------------------------------------------------------
    # Listing never starts a server (any web page can make a browser send a GET): it shows
    # what is known, from running sessions, flowc.yaml and the discovery cache. Starting
    # the servers to ask them is an explicit POST.
    def known_servers() -> dict[str, dict[str, Any]]:
        catalog = ToolCatalog.load(config, project_dir / TOOL_CACHE)
        return rt().mcp.known(catalog)

    def servers_body(known: dict[str, dict[str, Any]]) -> Response:
        return Response(orjson.dumps({"servers": [
            {"name": n, **{k: v for k, v in s.items() if k != "tools"},
             "tools": None if s["tools"] is None else len(s["tools"])}
            for n, s in sorted(known.items())]}, default=str), media_type="application/json")

    @app.get("/v1/mcp/servers")
    async def _mcp_servers() -> Response:
        return servers_body(known_servers())

    @app.get("/v1/mcp/tools")
    async def _mcp_tools() -> Response:
        return Response(orjson.dumps({"tools": [
            {"server": n, **t} for n, s in sorted(known_servers().items())
            for t in s["tools"] or ()]}, default=str), media_type="application/json")

    @app.post("/v1/mcp/refresh")
    async def _mcp_refresh() -> Response:
        found = await rt().mcp.discover()
        await asyncio.to_thread(rt().mcp.write_cache, found)
        return servers_body(known_servers())

    app.add_route("/mcp", mcp_endpoint)  # streamable HTTP: POST, GET and DELETE
    app.state.runtime = state
    # Every request passes the guard; POSTs to the model APIs then bypass FastAPI (see
    # runtime/gateway/hotpath.py).
    guard = Guard(bind_host=bind_host,
                  allowed_hosts=[*config.server.allowed_hosts, *allow_hosts],
                  allowed_origins=[*config.server.allowed_origins, *allow_origins],
                  max_body=config.server.max_body_bytes)
    return HotPaths(app, lambda: rt().caller, model_apis, guard,
                    lambda: state["rt"].gate if "rt" in state else None)


async def _load_gate(rt: Runtime) -> None:
    """Keys and budgets, once the ledger file is this server's (see `Ledger._try_take_over`)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(rt.gate.load)
        except LedgerUnavailable:
            continue
        log.info("keys and budgets loaded from the ledger")
        return


def _ledger_unavailable(exc: LedgerUnavailable) -> FlowcError:
    err = FlowcError(str(exc))
    err.status, err.code = 503, "ledger_unavailable"
    return err


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
