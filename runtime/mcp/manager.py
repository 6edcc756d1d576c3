"""Sessions with the MCP servers of flowc.yaml (official `mcp` SDK, stdio and streamable HTTP).

- One session per server, started on first use and shared by concurrent steps (the SDK runs
  concurrent calls on one session concurrently). A task per server owns the session's
  context managers, so they are entered and exited in one task, as anyio requires.
- Every call has a timeout (the SDK has none by default); cancelling the calling task
  cancels the call.
- A server that died is restarted on next use; its stderr goes to `.flowc/logs/mcp-NAME.log`.
- Only servers in the config can be reached: a name from a request or a model selects among
  them, it never starts anything else.
- Sessions use the initialize handshake directly: the SDK's auto mode first probes
  `server/discover` with a fixed 10 s timeout, which stalls on servers that do not know it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from flowc.config import MCPServerConfig, ToolCatalog
from runtime import observe
from runtime.executor import StepFailed, ToolResult
from runtime.mcp.tools import function_tool

log = logging.getLogger("flowc.mcp")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
CONNECT_TIMEOUT = 20.0


class MCPUnavailable(StepFailed):
    pass


def expand_env(value: str, env: dict[str, str] | os._Environ[str]) -> str:
    """`${env.NAME}` from the environment (empty when unset)."""
    return _ENV_REF.sub(lambda m: env.get(m.group(1), ""), value)


def result_of(res: Any) -> ToolResult:
    """A `CallToolResult` as text (text blocks joined; other blocks as placeholders) plus its
    structured content."""
    parts = []
    for block in getattr(res, "content", None) or ():
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "image":
            parts.append(f"[image {getattr(block, 'mime_type', '')}]")
        elif kind == "resource":
            uri = getattr(getattr(block, "resource", None), "uri", "")
            parts.append(f"[resource {uri}]")
        else:
            parts.append(f"[{kind}]")
    structured = getattr(res, "structured_content", None)
    return ToolResult(structured, "\n".join(parts), bool(getattr(res, "is_error", False)))


class ServerSession:
    def __init__(self, name: str, config: MCPServerConfig, log_dir: Path) -> None:
        self.name = name
        self.config = config
        self.log_dir = log_dir
        self.session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self.tools: dict[str, Any] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self.session is not None

    async def ensure(self) -> Any:
        async with self._lock:
            if self.alive:
                return self.session
            await self._stop_task()
            self._ready, self._closing, self._error = asyncio.Event(), asyncio.Event(), None
            self._task = asyncio.create_task(self._run(), name=f"mcp-{self.name}")
            self.starts += 1
            ready = asyncio.create_task(self._ready.wait())
            await asyncio.wait({ready, self._task}, timeout=CONNECT_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not self._ready.is_set():
                err = self._error or TimeoutError(f"no answer in {CONNECT_TIMEOUT:g} s")
                await self._stop_task()
                raise MCPUnavailable(f"MCP server '{self.name}' did not start: "
                                     f"{_describe(err)}")
            return self.session

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport(stack))
                session = await stack.enter_async_context(
                    ClientSession(read, write, read_timeout_seconds=self.config.timeout))
                await session.initialize()
                self.session = session
                assert self._ready is not None and self._closing is not None
                self._ready.set()
                await self._closing.wait()
        except BaseException as exc:
            self._error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self.session = None

    def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        cfg = self.config
        if cfg.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            headers = {k: expand_env(v, os.environ) for k, v in cfg.headers.items()}
            client = httpx2.AsyncClient(headers=headers, timeout=cfg.timeout)
            stack.push_async_callback(client.aclose)
            return streamable_http_client(cfg.url, http_client=client)
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        self.log_dir.mkdir(parents=True, exist_ok=True)
        errlog = open(self.log_dir / f"mcp-{self.name}.log", "a")  # noqa: SIM115
        stack.callback(errlog.close)
        env = {k: expand_env(v, os.environ) for k, v in cfg.env.items()}
        params = StdioServerParameters(command=cfg.command or "", args=list(cfg.args),
                                       env=env or None, cwd=cfg.cwd)
        return stdio_client(params, errlog=errlog)

    async def _stop_task(self) -> None:
        if self._task is None:
            return
        if self._closing is not None:
            self._closing.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        except Exception:
            pass
        self._task = None
        self.session = None

    async def close(self) -> None:
        async with self._lock:
            await self._stop_task()

    async def list_tools(self, timeout: float | None = None) -> dict[str, Any]:
        session = await self.ensure()
        res = await asyncio.wait_for(session.list_tools(), timeout or self.config.timeout)
        self.tools = {t.name: t for t in res.tools}
        return self.tools

    async def call(self, tool: str, args: dict[str, Any], timeout: float | None) -> ToolResult:
        from mcp import MCPError

        limit = timeout or self.config.timeout
        session = await self.ensure()
        try:
            res = await session.call_tool(tool, args, read_timeout_seconds=limit)
        except MCPError as exc:
            if "closed" in str(exc).lower():
                self.session = None  # the server died: restarted on next use
                raise MCPUnavailable(f"MCP server '{self.name}' closed the connection during "
                                     f"{tool}: {exc}") from None
            if getattr(getattr(exc, "error", None), "code", None) == -32001 or \
                    "timed out" in str(exc).lower():
                raise StepFailed(f"tool {self.name}.{tool} timed out after {limit:g} s"
                                 ) from None
            raise StepFailed(f"tool {self.name}.{tool}: {exc}") from None
        return result_of(res)


class MCPManager:
    def __init__(self, servers: dict[str, MCPServerConfig], project_dir: Path) -> None:
        self.project_dir = project_dir
        log_dir = project_dir / ".flowc" / "logs"
        self.sessions = {n: ServerSession(n, c, log_dir) for n, c in servers.items()}
        self.checked: dict[str, dict[str, Any]] = {}  # the last discovery's outcome

    def _session(self, server: str) -> ServerSession:
        s = self.sessions.get(server)
        if s is None:
            raise StepFailed(f"MCP server '{server}' is not in flowc.yaml (mcpServers: "
                             f"{', '.join(sorted(self.sessions)) or 'none'})")
        return s

    async def call_tool(self, server: str, tool: str, args: dict[str, Any],
                        timeout: float | None = None) -> ToolResult:
        with observe.tool_call(server, tool, args) as seen:
            return seen(await self._session(server).call(tool, args, timeout))

    async def start(self, server: str) -> None:
        await self._session(server).ensure()

    async def function_tools(self, refs: list[str]) -> list[dict[str, Any]]:
        """The function tools for `server.tool` / `server.*` references."""
        out: list[dict[str, Any]] = []
        for ref in refs:
            server, _, tool = ref.partition(".")
            session = self._session(server)
            tools = session.tools if session.tools is not None else await session.list_tools()
            names = sorted(tools) if tool == "*" else [tool]
            for name in names:
                t = tools.get(name)
                if t is None:
                    raise StepFailed(f"MCP server '{server}' has no tool '{name}'")
                out.append(function_tool(server, name, t.description, t.input_schema))
        return out

    async def discover(self, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """Every server's tools, concurrently, each within ``timeout``; a dead server is
        reported as such and never stalls the others."""
        async def one(name: str, s: ServerSession) -> tuple[str, dict[str, Any]]:
            t0 = time.perf_counter()
            try:
                tools = await asyncio.wait_for(s.list_tools(timeout), timeout)
            except Exception as exc:
                return name, {"ok": False, "error": _describe(exc), "tools": []}
            return name, {"ok": True, "ms": round((time.perf_counter() - t0) * 1000),
                          "tools": [{"name": t.name, "description": t.description,
                                     "inputSchema": t.input_schema,
                                     "outputSchema": t.output_schema}
                                    for t in tools.values()]}

        pairs = await asyncio.gather(*(one(n, s) for n, s in self.sessions.items()))
        self.checked = {n: {"ok": v["ok"], "error": v.get("error")} for n, v in pairs}
        return dict(pairs)

    def known(self, catalog: ToolCatalog) -> dict[str, dict[str, Any]]:
        """What is known of each server without starting one: whether it is running, its
        tools (from its session, else flowc.yaml or the discovery cache; None when unknown)
        and the last discovery's outcome (`ok` None when none has run here)."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.sessions.items():
            tools: list[dict[str, Any]] | None = None
            source = None
            if s.tools is not None:
                source = "session"
                tools = [{"name": t.name, "description": t.description,
                          "inputSchema": t.input_schema, "outputSchema": t.output_schema}
                         for t in s.tools.values()]
            elif (cached := catalog.tools_of(name)) is not None:
                source = "flowc.yaml" if s.config.tools is not None else "cache"
                tools = [{"name": n, "description": t.description,
                          "inputSchema": t.input_schema, "outputSchema": t.output_schema}
                         for n, t in cached.items()]
            checked = self.checked.get(name, {})
            out[name] = {"transport": "http" if s.config.url is not None else "stdio",
                         "running": s.alive, "ok": checked.get("ok"),
                         "error": checked.get("error"), "tools_from": source, "tools": tools}
        return out

    def write_cache(self, found: dict[str, dict[str, Any]]) -> Path:
        from runtime.mcp.discovered import write_file

        return write_file(self.project_dir, found)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions.values()),
                             return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__
