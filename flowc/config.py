"""The project config, `flowc.yaml`: model aliases, providers and MCP servers.

The compiler reads it to check model names, MCP servers, tools and tool params; the runtime
reads the same file to reach them. MCP servers use the `mcpServers` shape of Claude
Desktop, Cursor and VS Code, so existing entries can be pasted in.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Collection, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_NAME = "flowc.yaml"
_SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}")
TOOL_CACHE = Path(".flowc") / "mcp-tools.json"

#: Providers flowc knows without configuration, and the bare model prefixes that imply one:
#: each vendor's own model families (and OpenAI's fine-tunes, `ft:gpt-4o-mini:org::id`).
BUILTIN_PROVIDERS = ("openai", "anthropic", "ollama")
BARE_MODEL_PREFIXES = {
    "gpt-": "openai", "chatgpt-": "openai", "o1": "openai", "o3": "openai", "o4": "openai",
    "text-embedding-": "openai", "ft:": "openai", "claude-": "anthropic",
}


class _Strict(BaseModel):
    # defer_build: a model's validator is built when first used, not at import (the
    # sections validate inside ProjectConfig's own; `flowc check` starts sooner).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              defer_build=True)


class ProviderConfig(_Strict):
    """A provider endpoint. `kind` says which wire format it speaks."""

    kind: Literal["openai", "anthropic", "ollama", "openai_compatible"] = "openai_compatible"
    base_url: str | None = None
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key.")
    timeout: float = Field(default=60.0, gt=0)
    responses: bool | None = Field(
        default=None, description="Serves OpenAI's Responses API at {base_url}/responses, so "
        "/v1/responses goes to it verbatim (default: true for the provider named openai; "
        "others get it translated to chat completions).")


class ToolSchema(_Strict):
    """A tool's declared schemas, so `flowc check` can validate without starting a server."""

    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict, alias="inputSchema")
    output_schema: dict[str, Any] | None = Field(default=None, alias="outputSchema")


class MCPServerConfig(_Strict):
    """A stdio server (`command`, `args`, `env`, `cwd`) or a streamable-HTTP one (`url`,
    `headers`)."""

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    type: Literal["stdio", "http", "streamable-http"] | None = None
    timeout: float = Field(default=30.0, gt=0, description="Seconds per call.")
    tools: dict[str, ToolSchema] | None = Field(
        default=None, description="Declared tool schemas (optional).")

    @model_validator(mode="after")
    def _one_transport(self) -> MCPServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs either `command` (stdio) or `url` (HTTP)")
        return self


class PriceOverride(_Strict):
    """USD per million tokens, for models the price library does not know (or self-hosted
    ones, which cost $0 unless priced here)."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)
    cache_write_1h: Decimal | None = Field(
        default=None, ge=0, description="1-hour cache writes (default: `cache_write`).")


class LedgerConfig(_Strict):
    enabled: bool = Field(default=True,
                          description="Record model calls (off only for measuring overhead).")
    path: str = Field(default=".flowc/ledger.duckdb",
                      description="The cost ledger (DuckDB), relative to the project.")
    flush_interval: float = Field(
        default=1.0, gt=0, le=60,
        description="Seconds between writes; a hard kill loses at most this much.")
    retention: str | None = Field(
        default=None, description="With a shared store: drop rows older than this (90d, "
        "12w, 6m, 1y), a whole day's partition at a time.")

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"{v}d"
        if v is not None and not re.fullmatch(
                r"\s*[1-9]\d*\s*(d|days?|w|weeks?|m|months?|y|years?)\s*", str(v), re.I):
            raise ValueError(f"retention must be a duration like 90d, 12w, 6m or 1y, not {v!r}")
        return v


class RetryConfig(_Strict):
    attempts: int = Field(default=2, ge=0, le=10,
                          description="Retries per target after the first attempt.")
    backoff: float = Field(default=0.25, ge=0, description="First backoff, in seconds.")
    max_backoff: float = Field(default=8.0, ge=0)


class RouteMatch(_Strict):
    """Request traits a route applies to; an unset trait matches anything."""

    model: str | None = Field(default=None, description="The requested model name.")
    needs_tools: bool | None = None
    needs_vision: bool | None = None
    min_prompt_chars: int | None = Field(default=None, ge=0)
    max_prompt_chars: int | None = Field(default=None, ge=0)
    tags: list[str] = Field(default_factory=list,
                            description="All of these must be in the x-flowc-tags header.")


class Route(_Strict):
    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    targets: list[str] = Field(min_length=1, description="Models to choose among.")
    strategy: Literal["first", "cheapest", "fastest", "best"] = "first"
    max_cost_per_1m: Decimal | None = Field(
        default=None, ge=0, description="Skip targets whose input+output price per 1M "
                                        "tokens is higher.")
    max_p50_ms: float | None = Field(default=None, gt=0,
                                     description="Skip targets slower than this (p50).")


class ServerConfig(_Strict):
    """What `flowc serve` answers, and to whom (see docs/gateway.md, "Who can call it")."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (or host:port) served besides localhost, loopback and IP "
                    "addresses; '*' for any (behind a proxy that checks Host itself).")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port]) allowed to call the API "
                    "besides the server's own; they get CORS headers.")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0,
                                description="Largest request body, in bytes (413 above).")
    admin_key_file: str | None = Field(
        default=None, description="A file holding the admin key (instead of the "
                                  "FLOWC_ADMIN_KEY environment variable); auth is on once "
                                  "an admin key is set. See docs/keys.md.")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            if not h or "/" in h or any(c.isspace() for c in h):
                raise ValueError(f"'{h}' is not a host name (write "
                                 "example.com or example.com:8080)")
        return [h.lower() for h in hosts]

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for o in origins:
            scheme, sep, rest = o.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(f"'{o}' is not an origin (write "
                                 "http://host:port, no path; '*' is not allowed)")
        return [o.lower() for o in origins]


Period = Literal["day", "week", "month", "total"]


class Budget(_Strict):
    """A spending limit over a calendar period (UTC), and the request/token rates allowed."""

    usd: Decimal | None = Field(default=None, ge=0, description="Hard limit in USD.")
    period: Period = "month"
    rpm: int | None = Field(default=None, ge=0, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=0, description="Tokens per minute.")


class BudgetsConfig(_Strict):
    """Budgets beside the keys' own (see docs/keys.md): per team, per tag (`k=v`, from the
    key's tags and the request's `x-flowc-tags`) and per pipeline."""

    teams: dict[str, Budget] = Field(default_factory=dict)
    tags: dict[str, Budget] = Field(default_factory=dict)
    pipelines: dict[str, Budget] = Field(default_factory=dict)
    default_max_output_tokens: int = Field(
        default=32768, gt=0,
        description="Output tokens reserved for a request that names no max_tokens, when "
                    "the model's own output limit is not known.")
    on_store_outage: Literal["closed", "open"] = Field(
        default="closed",
        description="With a shared store (several instances on Postgres): while it cannot "
                    "be reached, requests that count against a budget are refused (closed, "
                    "503) or served and settled when it is back (open).")


class AlertsConfig(_Strict):
    """Soft thresholds on every budget: each one crossed logs a warning, adds a row the
    dashboard shows and, with a webhook, POSTs a JSON event to it."""

    thresholds: list[int] = Field(default_factory=lambda: [50, 80, 100])
    webhook: str | None = Field(default=None, description="URL POSTed on each alert.")

    @field_validator("thresholds")
    @classmethod
    def _percents(cls, values: list[int]) -> list[int]:
        for v in values:
            if not 0 < v <= 1000:
                raise ValueError(f"{v} is not a percentage of a budget (1..1000)")
        return sorted(set(values))


class ProjectConfig(_Strict):
    models: dict[str, str] = Field(
        default_factory=dict, description="Aliases: name -> provider/model.")
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    mcp_servers: dict[str, MCPServerConfig] = Field(default_factory=dict, alias="mcpServers")
    routes: list[Route] = Field(default_factory=list)
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict, description="model -> models to try when it fails.")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    quality: dict[str, float] = Field(
        default_factory=dict, description="Declared quality scores, for strategy `best`.")
    prices: dict[str, PriceOverride] = Field(
        default_factory=dict, description="provider/model -> price per 1M tokens.")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    store: str | None = Field(
        default=None, description="A shared Postgres (postgresql://...) for several "
        "instances: ledger, runs, pipelines, keys (docs/scaling.md). --store and "
        "FLOWC_STORE_URL take precedence.")
    server: ServerConfig = Field(default_factory=ServerConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    expose: ExposeConfig = Field(default_factory=lambda: ExposeConfig())

    @model_validator(mode="after")
    def _providers_have_urls(self) -> ProjectConfig:
        for name, provider in self.providers.items():
            if name not in BUILTIN_PROVIDERS and not provider.base_url:
                builtin = ", ".join(BUILTIN_PROVIDERS)
                raise ValueError(f"provider '{name}' needs a base_url (only {builtin} have "
                                 "a default)")
        return self

    @field_validator("mcp_servers")
    @classmethod
    def _server_names(cls, servers: dict[str, MCPServerConfig]) -> dict[str, MCPServerConfig]:
        # Tools reach models as `server__tool`: a server name may not contain `__`, and
        # keeps to the characters every provider accepts in function names.
        for name in servers:
            if not _SERVER_NAME.fullmatch(name) or "__" in name:
                raise ValueError(f"MCP server name '{name}' must use letters, digits, '-' "
                                 "and single '_' only")
        return servers

    # -- model names -----------------------------------------------------------------------
    @property
    def provider_names(self) -> list[str]:
        return sorted({*BUILTIN_PROVIDERS, *self.providers})

    def resolve_model(self, name: str, listed: Mapping[str, Collection[str]] | None = None
                      ) -> tuple[str, str] | None:
        """``(provider, model)`` for an alias, ``provider/model`` or bare name; None when the
        name means nothing here, or is ambiguous (see `model_choices`)."""
        choices = self.model_choices(name, listed)
        return choices[0] if len(choices) == 1 else None

    def model_choices(self, name: str, listed: Mapping[str, Collection[str]] | None = None
                      ) -> list[tuple[str, str]]:
        """Every ``(provider, model)`` ``name`` may mean: one, none (unknown), or several (an
        ambiguous bare name).

        An alias is followed; ``provider/model`` names its provider. A bare name goes to the
        one provider whose model list (``listed``: provider -> the ids its list endpoint
        gave) has it; listed by several, to its vendor when it is of a vendor's family
        (`gpt-*` to openai, `claude-*` to anthropic), else it is ambiguous. A name no list
        has (or with no lists, as in `flowc check`) is guessed from its form: a vendor's
        family to that vendor, Ollama's `name:tag` to ollama."""
        seen: set[str] = set()
        while name in self.models and name not in seen:
            seen.add(name)
            name = self.models[name]
        guess: tuple[str, str] | None = None
        if "/" in name:
            provider, _, model = name.partition("/")
            if provider in BUILTIN_PROVIDERS or provider in self.providers:
                return [(provider, model)] if model else []
            # Otherwise an id with a `/` of its own (`org/model` on an OpenAI-compatible
            # server, `hf.co/...` on Ollama): only a provider's list can place it.
        else:
            guess = bare_model_guess(name)
        having = sorted(p for p, names in (listed or {}).items() if name in names)
        if len(having) == 1:
            return [(having[0], name)]
        if having:
            family = model_family(name)
            return [(family, name)] if family in having else [(p, name) for p in having]
        return [guess] if guess else []


def model_family(name: str) -> str | None:
    """The vendor whose model family ``name`` is of (`gpt-*`: openai), if any."""
    for prefix, provider in BARE_MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return provider
    return None


def bare_model_guess(name: str) -> tuple[str, str] | None:
    """Where a bare name goes without any provider's list: Ollama's `name:tag` form (no
    vendor's model id has a `:`, except OpenAI's `ft:` fine-tunes) to ollama, a vendor's
    family to that vendor."""
    if ":" in name and not name.startswith("ft:") and name.partition(":")[0]:
        return "ollama", name
    family = model_family(name)
    return (family, name) if family else None


def find_config(start: Path) -> Path | None:
    """The nearest `flowc.yaml` in ``start`` or one of its parents."""
    here = start if start.is_dir() else start.parent
    for folder in (here.resolve(), *here.resolve().parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


class ToolCatalog:
    """Tool schemas known without starting servers: declared in flowc.yaml, or cached by
    discovery (`flowc mcp list`, `flowc check --live`)."""

    def __init__(self, tools: dict[str, dict[str, ToolSchema]] | None = None) -> None:
        self._tools = tools or {}

    @classmethod
    def load(cls, config: ProjectConfig, cache_file: Path | None,
             shared: dict[str, Any] | None = None) -> ToolCatalog:
        """flowc.yaml's declared tools, over ``shared`` (discovery results every instance
        of a shared store reads, in the cache file's `servers` shape), over the file's."""
        tools: dict[str, dict[str, ToolSchema]] = {}
        damaged = (ValueError, KeyError, TypeError, AttributeError)  # ignored: discovery
        if cache_file is not None and cache_file.is_file():          # rewrites it
            with contextlib.suppress(*damaged):
                tools.update(_discovered(json.loads(cache_file.read_text()).get("servers", {})))
        if shared:
            with contextlib.suppress(*damaged):
                tools.update(_discovered(shared))
        for server, sc in config.mcp_servers.items():
            if sc.tools is not None:
                tools[server] = dict(sc.tools)
        return cls(tools)

    def tools_of(self, server: str) -> dict[str, ToolSchema] | None:
        """The server's tools, or None when they are not known."""
        return self._tools.get(server)


def _discovered(servers: dict[str, Any]) -> dict[str, dict[str, ToolSchema]]:
    """Discovery results (`{server: {"ok": ..., "tools": [...]}}`) as tool schemas."""
    return {server: {t["name"]: ToolSchema.model_validate(
                         {k: v for k, v in t.items() if k != "name"})
                     for t in entry["tools"]}
            for server, entry in servers.items() if entry.get("ok")}


class ExposeFilter(_Strict):
    """The tools one team or key sees, as glob patterns over the exposed names (a pipeline's
    name, `server__tool`)."""

    tools: list[str] = Field(default_factory=lambda: ["*"],
                             description="Names offered (globs, e.g. 'support-*', 'time__*').")
    exclude: list[str] = Field(default_factory=list, description="Names withheld (globs).")


class ExposedServer(ExposeFilter):
    """An upstream MCP server re-exposed by `flowc serve`'s /mcp and `flowc mcp serve`."""

    tools: list[str] = Field(default_factory=lambda: ["*"],
                             description="The server's tools offered (globs over its own "
                                         "tool names).")
    stateful: bool = Field(default=False,
                           description="Give each client session a session of its own with "
                                       "this server, instead of one shared by all.")


class ExposeConfig(_Strict):
    """What flowc offers as an MCP server (docs/mcp.md): pipelines as tools, and the
    upstream servers' tools as `server__tool`."""

    pipelines: list[str] = Field(default_factory=lambda: ["*"],
                                 description="Pipelines offered as tools (globs; [] for none).")
    servers: dict[str, ExposedServer] | None = Field(
        default=None, description="Upstream servers re-exposed (default: every server in "
                                  "mcpServers, all its tools; {} for none).")
    teams: dict[str, ExposeFilter] = Field(
        default_factory=dict, description="Per team: the names its keys see.")
    keys: dict[str, ExposeFilter] = Field(
        default_factory=dict, description="Per key name: the names that key sees (on top "
                                          "of its team's filter).")
    max_tokens: int | None = Field(
        default=None, gt=0, description="Cap on the tool list's estimated context tokens "
                                        "(see `flowc mcp list --tokens`); tools past it are "
                                        "left out, `keep` first.")
    keep: list[str] = Field(
        default_factory=list, description="Under max_tokens: the names kept first, in order "
                                          "(globs).")
