"""The HTTP runtime: the gateway, cost endpoints, and (as they land) pipelines and MCP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from flowc.compiler import Project
from flowc.config import TOOL_CACHE, ProjectConfig, ToolCatalog
from runtime.access.alerts import Alerter
from runtime.access.gate import Gate, admin_key
from runtime.access.store import LedgerAccessStore
from runtime.api import cache, costs, gateway, keys, mcp, workflows
from runtime.api.gateway import MODEL_APIS
from runtime.dryrun import DryRunModels, DryRunTools
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.hotpath import Guard, HotPaths, error_body
from runtime.gateway.models_api import STARTUP_WAIT, ModelCatalog
from runtime.gateway.openai_api import error_response
from runtime.gateway.responses_store import Conversations, ResponseStore
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger, LedgerUnavailable
from runtime.mcp.manager import MCPManager
from runtime.mcp.serve import mcp_asgi_app
from runtime.pg.db import StoreError
from runtime.pg.ledger import PgLedger, default_instance
from runtime.providers import FlowcError, Providers
from runtime.step_cache import StepCache
from runtime.workflows import Registry

if TYPE_CHECKING:
    from runtime.workers.link import WorkerLink

log = logging.getLogger("flowc.server")
SERVER_FILE = Path(".flowc") / "server.json"
SPOOL = Path(".flowc") / "spool"  # with a shared store: one folder per instance id
REGISTRY_POLL = 2.0  # seconds between looks at the shared store's registered pipelines


def spool_name(instance: str) -> str:
    """An instance id as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", instance)


def _shared_tools(ledger: Ledger | PgLedger) -> dict[str, Any] | None:
    """The shared store's MCP discovery cache (None: embedded, or unreachable for now)."""
    if not isinstance(ledger, PgLedger):
        return None
    from runtime.mcp.discovered import load

    try:
        return load(ledger.execute)
    except LedgerUnavailable:
        return None


def _access_store(ledger: Ledger | PgLedger, store: str | None) -> Any:
    """Where keys, alerts and spend live: the ledger file, or the shared store."""
    if store is None or not isinstance(ledger, PgLedger):
        return LedgerAccessStore(ledger)
    from runtime.pg.access import PgAccessStore

    return PgAccessStore(store, instance=ledger.instance)  # one name in every table


def _conversations(link: WorkerLink | None, ledger: Ledger | PgLedger, store: str | None
                   ) -> Conversations:
    """Where /v1/responses keeps the responses OpenAI does not: the shared store (any
    instance, and any of its workers, answers a follow-up), else the supervisor (any
    worker does), else this process's memory."""
    if store is not None and isinstance(ledger, PgLedger):
        from runtime.pg.responses import PgResponses

        return PgResponses(store)
    return link.conversations() if link else ResponseStore()


@dataclass
class Runtime:
    """Everything a running server holds."""

    config: ProjectConfig
    project_dir: Path
    providers: Providers
    router: Router
    ledger: Ledger | PgLedger
    caller: ModelCaller
    mcp: MCPManager
    registry: Registry
    limit: asyncio.Semaphore  # steps running at once across all runs
    catalog: ModelCatalog  # the providers' model lists (GET /v1/models, bare names)
    gate: Gate  # keys, budgets, rate limits (runtime/access)
    alerter: Alerter
    # With a shared store: the MCP tools discovered on any instance (runtime/mcp/discovered.py)
    shared_tools: dict[str, Any] | None = None

    @classmethod
    def start(cls, config: ProjectConfig, project_dir: Path, pipelines: Path | None,
              env: Mapping[str, str] | None = None, link: WorkerLink | None = None, *,
              store: str | None = None, instance: str | None = None) -> Runtime:
        """``link``: this is one of `flowc serve --workers N`'s processes; its ledger,
        keys and budgets are the supervisor's (runtime/workers). ``store``: a shared
        Postgres's URL (docs/scaling.md), ``instance`` this server's name there."""
        providers = Providers(config, env)
        router = Router(config, providers)
        # The server keeps the ledger file in a child process (see runtime/ledger/store.py).
        ledger_path = project_dir / config.ledger.path
        ledger: Ledger | PgLedger
        if store is not None:
            name = instance or default_instance()
            ledger = PgLedger(store, project_dir / SPOOL / spool_name(name), name,
                              config.ledger.flush_interval, retention=config.ledger.retention)
        else:
            ledger = link.ledger(ledger_path, config.ledger.flush_interval) if link else \
                Ledger(ledger_path, config.ledger.flush_interval, in_process=False)
        shared_tools = _shared_tools(ledger)
        registry = Registry(Project(config, ToolCatalog.load(config, project_dir / TOOL_CACHE,
                                                             shared_tools),
                                    pipelines_dir=pipelines or project_dir / "pipelines"))
        if pipelines is not None and pipelines.is_dir():
            registry.load_folder(pipelines)
        registry.load_registered(ledger)
        if link:  # a pipeline registered through another worker is served here too
            link.registry = registry
        calls_ledger = ledger if config.ledger.enabled else None
        access = link.access_store(ledger) if link else _access_store(ledger, store)
        alerter = Alerter(config.alerts, access)
        gate = (link.make_gate if link else Gate)(
            config, access, admin_key(config, project_dir, env), alerter)  # type: ignore[arg-type]
        try:
            gate.load()
        except (LedgerUnavailable, StoreError) as exc:
            log.warning("keys and budgets wait for the ledger: %s", exc)
        return cls(config, project_dir, providers, router, ledger,
                   ModelCaller(config, providers, router, calls_ledger, gate,
                               _conversations(link, ledger, store)),
                   MCPManager(config.mcp_servers, project_dir), registry,
                   asyncio.Semaphore(256), ModelCatalog(config, providers), gate, alerter,
                   shared_tools)

    def tool_catalog(self) -> ToolCatalog:
        """The MCP tools known without starting a server: flowc.yaml's, the discovery
        cache's, and (with a shared store) those discovered on any instance."""
        return ToolCatalog.load(self.config, self.project_dir / TOOL_CACHE, self.shared_tools)

    def refresh_tools(self) -> bool:
        """With a shared store: compile pipelines against the tools discovered on any
        instance up to now; True when they changed."""
        found = _shared_tools(self.ledger)
        if found is None or found == self.shared_tools:
            return False
        self.shared_tools = found
        self.registry.project = Project(self.config, self.tool_catalog())
        return True

    def executor(self, dry_run: bool = False) -> Executor:
        if dry_run:
            return Executor(DryRunModels(self.ledger), DryRunTools(), dry_run=True,
                            global_limit=self.limit)
        return Executor(self.caller, self.mcp, global_limit=self.limit,
                        cache=StepCache(self.ledger))

    async def stop(self) -> None:
        await self.alerter.drain()
        shared = getattr(self.gate.store, "aclose", None)  # a store shared by instances:
        if shared is not None:  # settle, and hand back what this instance holds of budgets
            await shared()
        await self.catalog.close()
        await self.mcp.close()
        await self.providers.close()
        await asyncio.to_thread(self.caller.conversations.close)
        await asyncio.to_thread(self.ledger.close)


def create_app(config: ProjectConfig, project_dir: Path, *, pipelines: Path | None = None,
               env: Mapping[str, str] | None = None, public_url: str | None = None,
               bind_host: str | None = None, allow_hosts: Sequence[str] = (),
               allow_origins: Sequence[str] = (), link: WorkerLink | None = None,
               store: str | None = None, instance: str | None = None) -> HotPaths:
    """``bind_host`` and ``allow_hosts``/``allow_origins`` (from the command line) add to
    what flowc.yaml's `server:` allows (see runtime/gateway/hotpath.py); ``link``,
    ``store`` and ``instance``: see `Runtime.start`."""
    state: dict[str, Runtime] = {}
    mcp_endpoint = mcp_asgi_app(lambda: state["rt"])  # MCP at /mcp (runtime/mcp/serve.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = Runtime.start(config, project_dir, pipelines, env, link, store=store,
                           instance=instance)
        state["rt"] = rt
        await mcp_endpoint.start(rt)
        # The model lists that place bare names, before the first request (bounded: a
        # slow provider's list arrives in the background).
        await rt.catalog.refresh(STARTUP_WAIT, placing=True)
        loading = None if rt.gate.loaded else asyncio.create_task(_load_gate(rt))
        # With a shared store, a pipeline registered on another instance is served here too.
        polling = asyncio.create_task(_poll_registry(rt)) \
            if isinstance(rt.ledger, PgLedger) else None
        # What exists now lives as long as the server. Frozen, it leaves the collector's
        # generations: a full collection (about once a second under load) then walks only
        # what requests create, instead of ~95k start-up objects (~23 ms, a p99 stall).
        gc.collect()
        gc.freeze()
        server_file = project_dir / SERVER_FILE
        if public_url:
            _write_server_file(server_file, public_url, admin_key(config, project_dir, env))
        try:
            yield
        finally:
            if public_url:
                with contextlib.suppress(FileNotFoundError):
                    server_file.unlink()
            for task in (loading, polling):
                if task is not None:
                    task.cancel()
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

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # An unknown path or method, in the client's error shape (Anthropic's under
        # /v1/messages) instead of FastAPI's `{"detail": ...}`. The model APIs are POST
        # routes FastAPI does not know: another method on them is a 405 too.
        path, method = request.url.path, request.method
        headers = dict(exc.headers or {})
        status = exc.status_code
        if status == 404 and path in MODEL_APIS:
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

    @app.exception_handler(FlowcError)
    async def _flowc_error(request: Request, exc: FlowcError) -> Response:
        return error_response(exc)

    # One router per concern (runtime/api/); each endpoint's permission is its
    # `runtime/api/auth.py` dependency.
    for api in (gateway, costs, workflows, mcp, keys, cache):
        app.include_router(api.router)
    app.add_route("/mcp", mcp_endpoint)  # streamable HTTP: POST, GET and DELETE
    app.state.runtime = state
    # Every request passes the guard; POSTs to the model APIs then bypass FastAPI (see
    # runtime/gateway/hotpath.py).
    guard = Guard(bind_host=bind_host,
                  allowed_hosts=[*config.server.allowed_hosts, *allow_hosts],
                  allowed_origins=[*config.server.allowed_origins, *allow_origins],
                  max_body=config.server.max_body_bytes)
    return HotPaths(app, lambda: state["rt"].caller, MODEL_APIS, guard,
                    lambda: state["rt"].gate if "rt" in state else None)


def _write_server_file(path: Path, url: str, admin: str | None) -> None:
    """Where this server answers, for the CLI on the same machine; with auth on, the admin
    key too (so `flowc costs`, `runs` and `keys` work): readable by its owner only, from
    the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"url": url, "pid": os.getpid(), **({"admin_key": admin} if admin else {})}
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


async def _poll_registry(rt: Runtime) -> None:
    """Pipelines registered on other instances (a look at each one's hash every
    `REGISTRY_POLL` seconds; the YAML only when it changed)."""
    while True:
        await asyncio.sleep(REGISTRY_POLL)
        try:
            await asyncio.to_thread(rt.refresh_tools)  # a discovery on another instance
            await asyncio.to_thread(rt.registry.refresh, rt.ledger)
        except LedgerUnavailable:
            continue
        except Exception:
            log.exception("could not refresh the registered pipelines")


async def _load_gate(rt: Runtime) -> None:
    """Keys and budgets, once the ledger file is this server's (see `Ledger._try_take_over`)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(rt.gate.load)
        except (LedgerUnavailable, StoreError):
            continue
        log.info("keys and budgets loaded from the ledger")
        return
