"""Provider endpoints and model resolution.

Zero-config, each provider is found by its own conventions: `OPENAI_API_KEY` /
`OPENAI_BASE_URL`, `ANTHROPIC_API_KEY` / `ANTHROPIC_BASE_URL`, `OLLAMA_HOST`. `flowc.yaml`
can override them and add OpenAI-compatible servers by name.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flowc.config import ProjectConfig
from runtime.providers import anthropic, ollama, openai
from runtime.providers.base import (
    ChatResult,
    Endpoint,
    FlowcError,
    RequestError,
    StreamState,
    UnsupportedFeature,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    close_all,
)

ADAPTERS: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "ollama": ollama}

__all__ = [
    "ChatResult", "Endpoint", "FlowcError", "Providers", "RequestError", "StreamState",
    "Target", "UnsupportedFeature", "UpstreamError", "UpstreamTimeout", "UpstreamUnavailable",
    "Usage",
]


@dataclass(frozen=True)
class Target:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


def _ollama_url(host: str) -> str:
    host = host.strip() or "localhost:11434"
    if "://" not in host:
        host = "http://" + host
    if host.count(":") < 2:  # no port given
        host += ":11434"
    return host


def default_endpoints(env: Mapping[str, str]) -> dict[str, Endpoint]:
    return {
        "openai": Endpoint("openai", "openai",
                           env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                           env.get("OPENAI_API_KEY"), responses=True),
        "anthropic": Endpoint("anthropic", "anthropic",
                              env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
                              env.get("ANTHROPIC_API_KEY")),
        "ollama": Endpoint("ollama", "ollama", _ollama_url(env.get("OLLAMA_HOST", ""))),
    }


class Providers:
    """Every endpoint the gateway can reach, and how model names map onto them."""

    def __init__(self, config: ProjectConfig | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.config = config or ProjectConfig()
        self.endpoints = default_endpoints(env)
        for name, pc in self.config.providers.items():
            base = self.endpoints.get(name)
            if "kind" not in pc.model_fields_set and base is not None:
                kind = base.kind  # `providers: {anthropic: {base_url: ...}}` keeps its format
            else:
                kind = "openai" if pc.kind == "openai_compatible" else pc.kind
            url = pc.base_url or (base.base_url if base else "")  # checked by ProjectConfig
            key = env.get(pc.api_key_env) if pc.api_key_env else (base.api_key if base else None)
            responses = pc.responses if pc.responses is not None else (
                base.responses if base is not None else False)
            self.endpoints[name] = Endpoint(name, kind, url, key, pc.timeout,
                                            responses=responses)
        # provider -> the model ids its own list endpoint gave (runtime/gateway/models_api.py
        # keeps it current): how bare names the vendors' families do not cover are placed.
        self.listed: dict[str, frozenset[str]] = {}

    def resolve(self, name: str) -> Target | None:
        """The target ``name`` means (see `ProjectConfig.model_choices`), or None when it
        means nothing here. A bare name several providers list is the client's 400."""
        choices = [c for c in self.config.model_choices(name, self.listed)
                   if c[0] in self.endpoints]
        if len(choices) > 1:
            names = ", ".join(f"{p}/{m}" for p, m in choices)
            raise RequestError(f"model '{name}' is ambiguous: it is served by "
                               f"{len(choices)} providers; name one of {names}, or publish "
                               "the one you mean under `models:` in flowc.yaml",
                               param="model", code="model_ambiguous")
        return Target(*choices[0]) if choices else None

    def endpoint(self, target: Target) -> Endpoint:
        """The endpoint serving ``target`` (its `kind` says which wire it speaks)."""
        return self.endpoints[target.provider]

    def _adapter(self, target: Target) -> tuple[Endpoint, ModuleType]:
        ep = self.endpoints[target.provider]
        return ep, ADAPTERS[ep.kind]

    async def complete(self, target: Target, request: dict[str, Any]) -> ChatResult:
        ep, adapter = self._adapter(target)
        return await adapter.complete(ep, request, target.model)

    def stream(self, target: Target, request: dict[str, Any], state: StreamState
               ) -> AsyncIterator[dict[str, Any]]:
        ep, adapter = self._adapter(target)
        return adapter.stream(ep, request, target.model, state)

    def redact_text(self, text: str) -> str:
        """``text`` with every configured provider key cut out (for error text: the ledger's
        `error` column and the log)."""
        for ep in self.endpoints.values():
            if ep.api_key:
                text = ep.redact_text(text)
        return text

    async def close(self) -> None:
        await close_all(list(self.endpoints.values()))
