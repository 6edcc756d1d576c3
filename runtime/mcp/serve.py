"""flowc as an MCP server (official `mcp` SDK, low-level `Server`): pipelines as tools and
the upstream MCP servers' tools re-exposed as `server__tool` (see runtime/mcp/serve_catalog.py
for what is offered to whom).

- A pipeline call runs the pipeline with the server's executor, as `POST /v1/workflow`
  does: the same run record (runs.save), model calls charged to the caller's key (the
  Principal the gateway left in the ASGI scope; on stdio, `--key`). Progress notifications
  go out as steps finish; the client cancelling the call cancels the run's steps; a failed
  step is a tool error (isError) naming it; arguments that do not fit the inputs are an MCP
  error (-32602) naming each field.
- An upstream call goes to the server's shared session, or, for a server marked
  `stateful:` under expose.servers, to a session of the calling client's own: one per MCP
  session over HTTP (2025 revisions), one per key for 2026-07-28 clients (the protocol has
  no sessions), one for the stdio client.
- `MCPEndpoint` is the ASGI app mounted at `/mcp` (streamable HTTP); `serve_stdio` serves
  the same over stdin/stdout (`flowc mcp serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from flowc import __version__
from runtime import runs
from runtime.access.gate import OPEN, Principal
from runtime.executor import Executor, RunResult, StepResult, ToolResult
from runtime.gateway.hotpath import PRINCIPAL
from runtime.inputs import InputError
from runtime.mcp.manager import MCPManager, ServerSession, _describe
from runtime.mcp.serve_catalog import Catalog, ExposeError, Offered

if TYPE_CHECKING:
    from runtime.server import Runtime

log = logging.getLogger("flowc.mcp.serve")
META = "flowc/"  # `_meta` keys of a pipeline tool's result: flowc/run_id, flowc/cost_usd, ...
SESSION_HEADER = "mcp-session-id"
IDLE_SECONDS = 30 * 60  # an MCP client session's upstream sessions close after this idle
LIST_TIMEOUT = 15.0  # seconds to list an upstream server's tools
RELIST_AFTER = 30.0  # seconds before a server whose list failed is asked again

@dataclasses.dataclass
class _Seen:
    """What one caller sees: the entries, by name, their tools/list wire form, and that
    list as each protocol version's result (checked by the SDK once, then reused)."""

    tools: list[Offered]
    by_name: dict[str, Offered]
    wire: list[dict[str, Any]]
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

__all__ = ["ExposeError", "FlowcMCP", "MCPEndpoint", "mcp_asgi_app", "serve_stdio"]


class _Attributed:
    """The runtime's ModelCaller, with every call of a run charged to ``who``."""

    def __init__(self, caller: Any, who: Principal) -> None:
        self._caller = caller
        self._who = who

    async def complete(self, req: dict[str, Any], *, tags: str | None = None,
                       ctx: Any = None) -> Any:
        return await self._caller.complete(req, tags=tags,
                                           ctx=dataclasses.replace(ctx, who=self._who))

    def __getattr__(self, name: str) -> Any:  # plan, config: read by the executor
        return getattr(self._caller, name)


class _ClientTools:
    """The MCP servers as one client's pipeline steps see them: its own sessions with the
    stateful servers, the shared ones otherwise."""

    def __init__(self, manager: MCPManager, own: dict[str, ServerSession]) -> None:
        self.manager = manager
        self.own = own

    async def call_tool(self, server: str, tool: str, args: dict[str, Any],
                        timeout: float | None = None) -> ToolResult:
        s = self.own.get(server)
        if s is None:
            return await self.manager.call_tool(server, tool, args, timeout)
        return await s.call(tool, args, timeout)

    async def function_tools(self, refs: list[str]) -> list[dict[str, Any]]:
        return await self.manager.function_tools(refs)

    async def start(self, server: str) -> None:
        s = self.own.get(server)
        await (s.ensure() if s is not None else self.manager.start(server))


class _Progress:
    """Step events -> `notifications/progress`, in order, from one sender task."""

    def __init__(self, ctx: Any, total: int) -> None:
        self.ctx = ctx
        self.total = total
        self.finished = 0
        self.queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self.sender = asyncio.create_task(self._send())

    def step(self, r: StepResult) -> None:
        if r.status in ("done", "skipped", "failed"):
            self.finished += 1
            self.queue.put_nowait((self.finished, f"step '{r.id}' {r.status}"))

    async def _send(self) -> None:
        while (item := await self.queue.get()) is not None:
            with contextlib.suppress(Exception):  # a client gone: the run goes on
                await self.ctx.session.report_progress(item[0], self.total, item[1])

    async def close(self) -> None:
        self.queue.put_nowait(None)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.sender, 2.0)


class FlowcMCP:
    """The MCP server over one Runtime."""

    def __init__(self, rt: Runtime, default_who: Principal = OPEN) -> None:
        self.rt = rt
        self.default_who = default_who
        self.catalog = Catalog(rt.config)
        self._built_for: tuple[Any, ...] | None = None
        self._visible: dict[str, _Seen] = {}
        self._list_failed: dict[str, float] = {}
        # client id -> (last used, server -> its own session with each stateful server)
        self.clients: dict[str, tuple[float, dict[str, ServerSession]]] = {}
        self.server = self._make_server()

    # -- the catalog -------------------------------------------------------------------------
    def check(self) -> None:
        """At start-up: `expose:` names real servers and no two tools share a name (with
        the upstream tools known so far: flowc.yaml's declared tools, the discovery
        cache). Raises ExposeError."""
        known = self.rt.tool_catalog()
        upstream = {}
        for server in self.catalog.servers:
            tools = known.tools_of(server) or {}
            upstream[server] = [{"name": n, "description": t.description,
                                 "inputSchema": t.input_schema, "outputSchema": t.output_schema}
                                for n, t in tools.items()]
        self.catalog.build(self.rt.registry.workflows, upstream)

    async def _upstream(self) -> dict[str, list[Any]]:
        """Each exposed server's tools, listing those not listed yet (concurrently, bounded;
        a server that does not answer is left out and asked again later)."""
        sessions = self.rt.mcp.sessions
        now = time.monotonic()
        todo = [n for n in self.catalog.servers if sessions[n].tools is None
                and now - self._list_failed.get(n, -RELIST_AFTER) >= RELIST_AFTER]

        async def one(name: str) -> None:
            try:
                await asyncio.wait_for(sessions[name].list_tools(LIST_TIMEOUT), LIST_TIMEOUT)
            except Exception as exc:
                self._list_failed[name] = time.monotonic()
                log.warning("MCP server '%s' left out of the tool list: %s", name,
                            _describe(exc))

        if todo:
            await asyncio.gather(*(one(n) for n in todo))
        return {n: list((sessions[n].tools or {}).values()) for n in self.catalog.servers}

    async def offered(self, who: Principal) -> _Seen:
        """What ``who`` sees: the entries, by name, and their tools/list wire form. Built
        again only when the pipelines or the upstream lists change."""
        upstream = await self._upstream()
        workflows = self.rt.registry.workflows
        version = (tuple((n, id(w)) for n, w in workflows.items()),
                   tuple((n, len(t)) for n, t in upstream.items()))
        if version != self._built_for:
            self.catalog.build(workflows, upstream)
            self._built_for, self._visible = version, {}
        ident = _identity(who)
        seen = self._visible.get(ident)
        if seen is None:
            tools = self.catalog.visible(who)
            if self.catalog.withheld:
                log.warning("expose.max_tokens %s: left out of %s's tool list: %s",
                            self.catalog.expose.max_tokens, ident,
                            ", ".join(self.catalog.withheld))
            seen = _Seen(tools, {o.name: o for o in tools}, [o.wire for o in tools])
            self._visible[ident] = seen
        return seen

    # -- the MCP server ----------------------------------------------------------------------
    def _make_server(self) -> Any:
        from mcp.server import Server

        async def list_tools(ctx: Any, params: Any) -> Any:
            return _list_body((await self._seen(ctx)).wire)

        async def fast_list(ctx: Any, call_next: Any) -> Any:
            # tools/list answered from the caller's cached result: the SDK's check of a
            # result costs ~0.2 ms a tool (19 ms for 100 pipelines), on every list
            if ctx.method != "tools/list" or (ctx.params or {}).get("cursor") is not None:
                return await call_next(ctx)
            seen = await self._seen(ctx)
            version = ctx.protocol_version
            result = seen.results.get(version)
            if result is None:
                result = await call_next(ctx)  # checked and shaped for this version
                seen.results[version] = result
            return result

        async def call_tool(ctx: Any, params: Any) -> Any:
            return await self.call(ctx, params.name, params.arguments or {})

        def input_schema(name: str) -> Any:
            # for 2026-07-28's Mcp-Param-* header check: without it the SDK runs the
            # whole tools/list for every call
            entry = self.catalog.offered.get(name)
            return entry.wire["inputSchema"] if entry is not None else None

        server = Server("flowc", version=__version__, get_tool_input_schema=input_schema,
                        instructions="flowc pipelines and MCP tools; each call's model costs "
                                     "are recorded in flowc's ledger.",
                        on_list_tools=list_tools, on_call_tool=call_tool)
        server.middleware.append(fast_list)
        return server

    async def _seen(self, ctx: Any) -> _Seen:
        try:
            return await self.offered(self._who(ctx))
        except ExposeError as exc:
            from mcp import MCPError
            from mcp_types import INTERNAL_ERROR

            raise MCPError(INTERNAL_ERROR, f"flowc.yaml expose: {exc}") from None

    def _who(self, ctx: Any) -> Principal:
        request = getattr(ctx, "request", None)
        scope = getattr(request, "scope", None)
        if scope is not None:
            return scope.get(PRINCIPAL) or self.default_who
        return self.default_who

    def _client_id(self, ctx: Any, who: Principal) -> str:
        request = getattr(ctx, "request", None)
        if request is None:
            return "stdio"
        sid = request.headers.get(SESSION_HEADER)
        return f"session:{sid}" if sid else f"caller:{_identity(who)}"

    async def call(self, ctx: Any, name: str, args: dict[str, Any]) -> Any:
        from mcp import MCPError
        from mcp_types import INVALID_PARAMS

        who = self._who(ctx)
        entry = (await self._seen(ctx)).by_name.get(name)
        if entry is None:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {name}")
        if not isinstance(args, dict):
            raise MCPError(INVALID_PARAMS, "arguments must be an object")
        own = self._own_sessions(self._client_id(ctx, who))
        if entry.workflow is not None:
            return await self._run_pipeline(ctx, who, entry.workflow, args, own)
        assert entry.server is not None and entry.upstream is not None
        return await self._call_upstream(entry.server, entry.upstream, args, own)

    def _own_sessions(self, client: str) -> dict[str, ServerSession]:
        """The client's own sessions with the stateful servers (started on first use)."""
        stateful = [n for n, s in self.catalog.servers.items()
                    if s is not None and s.stateful]
        if not stateful:
            return {}
        now = time.monotonic()
        self._reap(now)
        _, own = self.clients.get(client) or (now, {})
        if not own:
            log_dir = self.rt.project_dir / ".flowc" / "logs"
            own = {n: ServerSession(n, self.rt.config.mcp_servers[n], log_dir) for n in stateful}
        self.clients[client] = (now, own)
        return own

    def _reap(self, now: float) -> None:
        for client, (used, own) in list(self.clients.items()):
            if now - used > IDLE_SECONDS:
                self.clients.pop(client, None)
                for s in own.values():
                    asyncio.create_task(s.close())  # noqa: RUF006 -- closes on its own

    async def end_client(self, client: str) -> None:
        """The client session ended (DELETE): close its own upstream sessions."""
        _, own = self.clients.pop(client, (0.0, {}))
        await asyncio.gather(*(s.close() for s in own.values()), return_exceptions=True)

    async def _run_pipeline(self, ctx: Any, who: Principal, workflow: str,
                            args: dict[str, Any], own: dict[str, ServerSession]) -> Any:
        from mcp import MCPError
        from mcp_types import INVALID_PARAMS

        rt = self.rt
        wf = rt.registry.workflows.get(workflow)
        if wf is None:  # gone since the list was built
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {workflow}")
        models = _Attributed(rt.caller, who) if who.key is not None else rt.caller
        tools = _ClientTools(rt.mcp, own) if own else rt.mcp
        executor = Executor(models, tools, global_limit=rt.limit)
        progress = _Progress(ctx, len(wf.compiled.order))
        key = who.key

        def save(result: RunResult) -> None:
            runs.save(rt.ledger, result, key.id if key else None, key.team if key else None)

        cancelled: list[RunResult] = []
        try:
            result = await executor.run(wf.compiled, args, run_id=uuid.uuid4().hex,
                                        listener=progress.step, on_cancel=cancelled.append)
        except InputError as exc:
            raise MCPError(INVALID_PARAMS, f"Invalid arguments for tool {workflow}: "
                           + "; ".join(exc.problems), {"problems": exc.problems}) from None
        except asyncio.CancelledError:  # the run's steps are cancelled; its record stays
            if cancelled:
                await asyncio.shield(asyncio.to_thread(save, cancelled[0]))
            raise
        finally:
            await progress.close()
        await asyncio.to_thread(save, result)
        return pipeline_result(result, wf.compiled.output is not None
                               and not isinstance(wf.compiled.output, dict))

    async def _call_upstream(self, server: str, tool: str, args: dict[str, Any],
                             own: dict[str, ServerSession]) -> Any:
        from mcp import MCPError
        from mcp_types import INTERNAL_ERROR, CallToolResult, TextContent

        session = own.get(server) or self.rt.mcp.sessions[server]
        try:
            live = await session.ensure()
            res = await live.call_tool(tool, args, read_timeout_seconds=session.config.timeout)
        except MCPError as exc:
            if "closed" in str(exc).lower():
                session.session = None  # restarted on next use
            raise  # the upstream server's own error, as it sent it
        except Exception as exc:  # the server would not start
            raise MCPError(INTERNAL_ERROR, _describe(exc)) from None
        if not isinstance(res, CallToolResult):
            return CallToolResult(content=[TextContent(text=str(res))], is_error=True)
        return CallToolResult(content=res.content, structured_content=res.structured_content,
                              is_error=res.is_error)

    async def close(self) -> None:
        clients, self.clients = self.clients, {}
        await asyncio.gather(*(s.close() for _, own in clients.values() for s in own.values()),
                             return_exceptions=True)


def _list_body(wire: list[dict[str, Any]]) -> dict[str, Any]:
    # per caller (filters by key): private; pipelines can be registered at any time
    return {"tools": wire, "ttlMs": 0, "cacheScope": "private", "resultType": "complete"}


def pipeline_result(result: RunResult, wrapped: bool) -> Any:
    """A run as a tool result: the output as structured content (and as JSON text for
    clients that read only text); a failed run is a tool error naming the step."""
    from mcp_types import CallToolResult, TextContent

    cost = result.total_cost
    meta = {f"{META}run_id": result.run_id, f"{META}status": result.status,
            f"{META}cost_usd": None if cost is None else float(cost),
            f"{META}latency_ms": round(result.latency_ms, 1)}
    if result.status != "succeeded":
        err = result.error or {}
        step = err.get("step")
        text = (f"step '{step}' failed: {err.get('message')}" if step else
                str(err.get("message") or "the run failed"))
        return CallToolResult(content=[TextContent(text=text)], is_error=True,
                              _meta={**meta, f"{META}failed_step": step})
    output = result.output
    # as its outputSchema says: one value is wrapped (see serve_schema.py)
    structured = {"result": output} if wrapped or not isinstance(output, dict) else output
    text = output if isinstance(output, str) else orjson.dumps(output, default=str).decode()
    return CallToolResult(content=[TextContent(text=text)], structured_content=structured,
                          _meta=meta)


def _identity(who: Principal) -> str:
    return f"key:{who.key.id}" if who.key is not None else who.kind


# -- streamable HTTP at /mcp ----------------------------------------------------------------
class MCPEndpoint:
    """The ASGI app at `/mcp`. `start(rt)` runs in the server's lifespan, after the Runtime
    started (it checks `expose:`; an ExposeError stops the server starting); `aclose()` in
    its shutdown. Requests have passed the gateway's guard and authentication: the caller
    is in the scope. An MCP session stays with the key that opened it."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self.runtime = runtime
        self.mcp: FlowcMCP | None = None
        self._manager: Any = None
        self._running: contextlib.AsyncExitStack | None = None
        self._owners: dict[str, str] = {}  # MCP session id -> the identity that opened it

    async def start(self, rt: Runtime | None = None) -> None:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

        rt = rt or self.runtime()
        mcp = FlowcMCP(rt)
        try:
            mcp.check()
        except ExposeError as exc:
            log.error("not serving: flowc.yaml expose: %s", exc)
            raise
        # Host and Origin are checked by the gateway's guard (runtime/gateway/hotpath.py)
        manager = StreamableHTTPSessionManager(app=mcp.server, security_settings=None,
                                               session_idle_timeout=IDLE_SECONDS)
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(manager.run())
        self.mcp, self._manager, self._running = mcp, manager, stack

    async def aclose(self) -> None:
        if self._running is not None:
            await self._running.aclose()
            self._running = None
        if self.mcp is not None:
            await self.mcp.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._manager is None:
            await self.start()
        assert self.mcp is not None
        who = scope.get(PRINCIPAL) or OPEN
        ident = _identity(who)
        sid = next((v.decode("latin-1") for k, v in scope["headers"]
                    if k == SESSION_HEADER.encode()), None)
        if sid is not None and self._owners.get(sid, ident) != ident:
            await _not_found(send)  # as if the session did not exist
            return
        if sid is None:
            send = self._claiming(send, ident)
        await self._manager.handle_request(scope, receive, send)
        if sid is not None and scope["method"] == "DELETE":
            self._owners.pop(sid, None)
            await self.mcp.end_client(f"session:{sid}")

    def _claiming(self, send: Any, ident: str) -> Any:
        """``send`` noting the session id a new session is given, and who opened it."""
        async def claim(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                for k, v in message.get("headers", ()):
                    if k.lower() == SESSION_HEADER.encode():
                        self._owners[v.decode("latin-1")] = ident
            await send(message)

        return claim


async def _not_found(send: Any) -> None:
    body = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def mcp_asgi_app(runtime: Callable[[], Runtime]) -> MCPEndpoint:
    """The `/mcp` endpoint over the server's Runtime (``runtime()`` returns it)."""
    return MCPEndpoint(runtime)


# -- stdio: `flowc mcp serve` ---------------------------------------------------------------
async def serve_stdio(config: Any, project_dir: Path, pipelines: Path | None = None,
                      key: str | None = None, *, store: str | None = None,
                      instance: str | None = None) -> None:
    """Serve MCP over stdin/stdout until the client closes stdin. ``key``: a flowc key
    (sk-flowc-...) whose calls these are (budgets, limits, attribution); ``store`` and
    ``instance``: a shared store's URL and this process's name there."""
    from mcp.server.stdio import stdio_server

    from runtime.server import Runtime

    rt = Runtime.start(config, project_dir, pipelines, store=store, instance=instance)
    mcp: FlowcMCP | None = None
    try:
        who = OPEN
        if key:
            who = rt.gate.authenticate(b"Bearer " + key.encode(), None)
        mcp = FlowcMCP(rt, who)
        mcp.check()
        async with stdio_server() as (read, write):
            await mcp.server.run(read, write, mcp.server.create_initialization_options())
    finally:
        if mcp is not None:
            await mcp.close()
        await rt.stop()
