"""Which model names the price data knows, for `flowc check`'s unknown-model warning.

The price data is genai-prices' (the ledger prices calls with it). Importing it costs
~200 ms, two thirds of `flowc check`'s start-up budget, so what the check needs of it (each
provider's model-matching clauses) is cached as JSON under the user's cache folder, one
file per genai-prices version: read in a few milliseconds, rebuilt when the library changes.
A name matches as the library matches it (lower-cased, its equals / starts_with /
ends_with / contains / regex clauses, combined with and / or).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

# flowc provider names the price data covers under the same id (the ledger prices these).
PRICED_PROVIDERS = frozenset({"openai", "anthropic", "groq", "mistral", "google", "deepseek",
                              "openrouter", "together", "fireworks"})


def provider_id(provider: str) -> str | None:
    """The price data's id for a flowc provider name, or None when it has none."""
    return provider if provider in PRICED_PROVIDERS else None


def cache_file(kind: str) -> Path | None:
    """Where what flowc derives from the price data (``kind``) is cached: one file per
    genai-prices version, under the user's cache folder; None without the price data."""
    try:
        version = metadata.version("genai-prices")
    except metadata.PackageNotFoundError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "flowc" / f"{kind}-genai-prices-{version}.json"


def _build() -> dict[str, list[Any]]:
    import dataclasses

    from genai_prices import data

    return {p.id: [dataclasses.asdict(m.match) for m in p.models] for p in data.providers}


@cache
def _clauses() -> dict[str, list[Any]] | None:
    """Each provider's model clauses, or None when the price data is not installed."""
    path = cache_file("known-models")
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        loaded: dict[str, list[Any]] = json.loads(path.read_text())
        return loaded
    built = _build()
    with contextlib.suppress(OSError):  # a read-only home still checks, just slower
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(built))
        tmp.replace(path)
    return built


def _matches(clause: Any, name: str) -> bool:
    if not isinstance(clause, dict):
        return False
    if "or_" in clause:
        return any(_matches(c, name) for c in clause["or_"])
    if "and_" in clause:
        return all(_matches(c, name) for c in clause["and_"])
    if "equals" in clause:
        return name == clause["equals"]
    if "starts_with" in clause:
        return name.startswith(clause["starts_with"])
    if "ends_with" in clause:
        return name.endswith(clause["ends_with"])
    if "contains" in clause:
        return clause["contains"] in name
    if "regex" in clause:
        return re.search(clause["regex"], name) is not None
    return False


def price_data_knows(provider: str, model: str) -> bool | None:
    """Whether the price data lists ``model`` for ``provider``; None when it cannot say
    (no price data installed, or a provider it does not cover)."""
    clauses = _clauses()
    pid = provider_id(provider)
    if clauses is None or pid is None or pid not in clauses:
        return None
    name = model.lower()
    return any(_matches(c, name) for c in clauses[pid])
