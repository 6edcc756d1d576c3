"""The MCP discovery cache: what `flowc mcp list`, `flowc check --live` and
`POST /v1/mcp/refresh` found each server's tools to be, so the compiler can check tool
names and parameters without starting a server.

Embedded, it is a file per project (`.flowc/mcp-tools.json`). With a shared store it is
also the store's `mcp_tools` table (one row per server): every instance, and every command
run with the store, compiles against what any of them discovered, so a pipeline registered
on one instance that uses a tool discovered on another compiles on both. The file is still
written, as a local copy (the editor's language server reads it)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowc.config import TOOL_CACHE

log = logging.getLogger("flowc.mcp")

# `execute(sql, params)` with `?` parameters, as `PgLedger.execute` takes them
Execute = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def write_file(project_dir: Path, found: dict[str, dict[str, Any]]) -> Path:
    """The servers that answered, over what the project's cache file held. Writers at
    once (a refresh on each worker of `flowc serve --workers N`, `flowc mcp list` beside a
    server) take turns under a lock on `mcp-tools.json.lock`, so none drops the servers
    another added."""
    path = project_dir / TOOL_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file is closed
        merged = {**_servers_in(path), **{k: v for k, v in found.items() if v["ok"]}}
        # A name of its own: readers never see half a file, and no writer renames
        # another's half-written one.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(json.dumps({"servers": merged}, indent=2, default=str))
            tmp.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


def _servers_in(path: Path) -> dict[str, Any]:
    """The cache file's servers: none when it is missing or not the cache's shape (it is
    written anew)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("MCP tool cache %s cannot be read (%s); writing it anew", path, exc)
        return {}
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        log.warning("MCP tool cache %s is not a JSON object with a \"servers\" object; "
                    "writing it anew", path)
        return {}
    return servers


def save(execute: Execute, found: dict[str, dict[str, Any]], instance: str) -> list[str]:
    """The servers that answered, stored for every instance; their names."""
    now = datetime.now(UTC).replace(tzinfo=None)
    saved = []
    for server, entry in sorted(found.items()):
        if not entry["ok"]:
            continue
        execute("INSERT INTO mcp_tools (server, tools, discovered_at, instance) "
                "VALUES (?, CAST(? AS jsonb), ?, ?) ON CONFLICT (server) DO UPDATE SET "
                "tools = excluded.tools, discovered_at = excluded.discovered_at, "
                "instance = excluded.instance",
                [server, json.dumps(entry["tools"], default=str), now, instance])
        saved.append(server)
    return saved


def load(execute: Execute) -> dict[str, dict[str, Any]]:
    """Every server's tools as stored, in the cache file's `servers` shape."""
    out = {}
    for server, tools in execute("SELECT server, tools FROM mcp_tools ORDER BY server", []):
        out[server] = {"ok": True, "tools": json.loads(tools) if isinstance(tools, str)
                       else tools}
    return out


def on_connection(conn: Any) -> Execute:
    """`execute` over a plain psycopg connection (a command's, not an instance's)."""
    def execute(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        # `?` as psycopg's `%s` (as runtime.pg.ledger.placeholders, without its imports)
        cur = conn.execute(sql.replace("%", "%%").replace("?", "%s"), list(params))
        return cur.fetchall() if cur.description else []

    return execute
