"""What flowc offers as an MCP server: each pipeline as a tool, and the upstream servers'
tools as `server__tool`, chosen by `expose:` in flowc.yaml, per team and key, within a
token cap.

Names keep to `[A-Za-z0-9_-]` and 64 characters (what every model provider accepts as a
function name). Two offerings under one name are a configuration error, never a silent
shadowing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import orjson

from flowc.config import ExposeConfig, ExposeFilter, ProjectConfig
from runtime.access.gate import Principal
from runtime.mcp.serve_schema import input_schema, output_schema
from runtime.mcp.tools import SEPARATOR, function_name
from runtime.providers.base import tokens_of
from runtime.workflows import Workflow

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_NAME = 64


class ExposeError(ValueError):
    """`expose:` cannot be served as written (a name collision, an unknown server)."""


@dataclass(frozen=True)
class Offered:
    """One tool on offer: a pipeline (``workflow``) or an upstream tool (``server``,
    ``upstream``). ``wire`` is its tools/list entry; ``tokens`` its estimated context cost."""

    name: str
    wire: dict[str, Any]
    tokens: int
    workflow: str | None = None
    server: str | None = None
    upstream: str | None = None


def tool_tokens(wire: Mapping[str, Any]) -> int:
    """The context tokens a tool definition costs, estimated as the runtime estimates
    prompts: its JSON as tools/list sends it, at 4 characters a token, rounded up. Clients
    render tools into the prompt their own way; the JSON is a close, stable proxy."""
    return tokens_of(len(orjson.dumps(wire)))


def pipeline_tool_name(name: str) -> str:
    return _UNSAFE.sub("_", name)[:MAX_NAME]


def exposed_servers(config: ProjectConfig) -> dict[str, Any]:
    """Server name -> its `ExposedServer` settings (None: every tool, shared session)."""
    expose = config.expose
    if expose.servers is None:
        return dict.fromkeys(config.mcp_servers)
    unknown = sorted(set(expose.servers) - set(config.mcp_servers))
    if unknown:
        raise ExposeError(f"expose.servers names {', '.join(map(repr, unknown))}, not in "
                          f"mcpServers ({', '.join(sorted(config.mcp_servers)) or 'none'})")
    return dict(expose.servers)


def _allowed(name: str, f: ExposeFilter | None) -> bool:
    if f is None:
        return True
    return any(fnmatchcase(name, p) for p in f.tools) and not any(
        fnmatchcase(name, p) for p in f.exclude)


def pipeline_entry(wf: Workflow) -> Offered:
    c = wf.compiled
    wire: dict[str, Any] = {"name": pipeline_tool_name(c.name), "inputSchema": input_schema(c)}
    if c.pipeline.description:
        wire["description"] = c.pipeline.description
    out = output_schema(c)
    if out is not None:
        wire["outputSchema"] = out
    return Offered(wire["name"], wire, tool_tokens(wire), workflow=c.name)


def upstream_entry(server: str, tool: Any) -> Offered:
    """``tool``: the upstream server's `Tool` (SDK object) or its tools/list dict."""
    get = tool.get if isinstance(tool, dict) else lambda k: getattr(tool, _ATTR[k], None)
    name = function_name(server, get("name"))
    wire: dict[str, Any] = {"name": name,
                            "inputSchema": get("inputSchema") or {"type": "object"}}
    if get("description"):
        wire["description"] = get("description")
    if get("outputSchema"):
        wire["outputSchema"] = get("outputSchema")
    return Offered(name, wire, tool_tokens(wire), server=server, upstream=get("name"))


_ATTR = {"name": "name", "inputSchema": "input_schema", "description": "description",
         "outputSchema": "output_schema"}


class Catalog:
    """Every tool on offer, by name, built from the registry's pipelines and the upstream
    servers' tool lists; `visible(who)` is what one caller sees."""

    def __init__(self, config: ProjectConfig) -> None:
        self.config = config
        self.expose: ExposeConfig = config.expose
        self.servers = exposed_servers(config)
        self.offered: dict[str, Offered] = {}
        self.withheld: list[str] = []  # names left out by the token cap, for the log

    def build(self, workflows: Mapping[str, Workflow],
              upstream: Mapping[str, Iterable[Any]]) -> dict[str, Offered]:
        """``upstream``: server -> its tools (those known; a server not yet listed is left
        out). Raises ExposeError on a name offered twice."""
        offered: dict[str, Offered] = {}
        where: dict[str, str] = {}

        def add(entry: Offered, what: str) -> None:
            if entry.name in offered:
                raise ExposeError(
                    f"two MCP tools would be named '{entry.name}': {where[entry.name]} and "
                    f"{what} (tool names keep to [A-Za-z0-9_-] and {MAX_NAME} characters); "
                    "rename one, or leave one out under expose: in flowc.yaml")
            offered[entry.name] = entry
            where[entry.name] = what

        for name in sorted(workflows):
            if not any(fnmatchcase(name, p) for p in self.expose.pipelines):
                continue
            entry = pipeline_entry(workflows[name])
            prefix, sep, _ = entry.name.partition(SEPARATOR)
            if sep and prefix in self.servers:
                raise ExposeError(
                    f"pipeline '{name}' would be offered as '{entry.name}', a name in the "
                    f"'{prefix}{SEPARATOR}' space of the re-exposed MCP server '{prefix}'; "
                    "rename the pipeline, or leave it out under expose.pipelines")
            add(entry, f"pipeline '{name}'")
        for server, settings in self.servers.items():
            for tool in upstream.get(server, ()):
                entry = upstream_entry(server, tool)
                if not _allowed(entry.upstream or "", settings):
                    continue
                add(entry, f"tool '{entry.upstream}' of MCP server '{server}'")
        self.offered = offered
        return offered

    def visible(self, who: Principal) -> list[Offered]:
        """What ``who`` sees: its team's and key's filters (and the key's own `pipelines`
        patterns), then the token cap, `keep` first."""
        key = who.key
        team_f = self.expose.teams.get(key.team) if key is not None and key.team else None
        key_f = self.expose.keys.get(key.name) if key is not None else None
        out = [o for o in self.offered.values()
               if _allowed(o.name, team_f) and _allowed(o.name, key_f)
               and (key is None or o.workflow is None or key.allows_pipeline(o.workflow))]
        return self.capped(out)

    def capped(self, tools: list[Offered]) -> list[Offered]:
        cap = self.expose.max_tokens
        if cap is None:
            return tools
        keep = self.expose.keep

        def rank(o: Offered) -> int:
            return next((i for i, p in enumerate(keep) if fnmatchcase(o.name, p)), len(keep))

        total, kept, dropped = 0, [], []
        for o in sorted(tools, key=rank):  # stable: the catalog's order within a rank
            if total + o.tokens <= cap:
                kept.append(o)
                total += o.tokens
            else:
                dropped.append(o.name)
        self.withheld = dropped
        return kept


def token_lines(found: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """`flowc mcp list --tokens`: each server's tool list, as flowc re-exposes it, in
    estimated context tokens (see `tool_tokens`), costliest tools first."""
    lines = []
    for server, entry in sorted(found.items()):
        if not entry.get("ok"):
            lines.append(f"✗ {server}: {entry.get('error')}")
            continue
        tools = sorted((upstream_entry(server, t) for t in entry["tools"]),
                       key=lambda o: -o.tokens)
        total = sum(o.tokens for o in tools)
        lines.append(f"{server}: {len(tools)} tools, ~{total:,} tokens")
        lines.extend(f"    {o.tokens:>6,}  {o.name}" for o in tools)
    return lines
