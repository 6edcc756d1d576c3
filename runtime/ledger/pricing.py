"""Exact costs (Decimal, as providers bill) from the genai-prices library, with overrides.

genai-prices was chosen over LiteLLM's price map (which fetches from the network at import)
and tokencost (no cache-write prices): it bundles ~2,300 models with cache read/write and
tiered prices and makes no network call. It has no Ollama provider: local models cost $0
unless `flowc.yaml` prices them. A model nobody prices costs None (NULL), never $0.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from functools import lru_cache

import genai_prices

from flowc.config import PriceOverride
from runtime.providers.base import Usage

log = logging.getLogger("flowc.pricing")
LIBRARY = f"genai-prices {genai_prices.__version__}"
_MILLION = Decimal(1_000_000)
FREE_PROVIDERS = ("ollama",)


def _per_million(tokens: int, price: Decimal | None, fallback: Decimal) -> Decimal:
    return Decimal(tokens) * (price if price is not None else fallback) / _MILLION


def price(provider: str, model: str, usage: Usage,
          overrides: dict[str, PriceOverride] | None = None) -> tuple[Decimal | None, str]:
    """``(cost in USD or None, price source)``."""
    override = (overrides or {}).get(f"{provider}/{model}")
    if override is not None:
        plain = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
        cost = (_per_million(plain, override.input, override.input)
                + _per_million(usage.cached_tokens, override.cached_input, override.input)
                + _per_million(usage.cache_write_tokens, override.cache_write, override.input)
                + _per_million(usage.completion_tokens, override.output, override.output))
        return cost, "flowc.yaml"
    if provider in FREE_PROVIDERS:
        return Decimal(0), f"{provider}: local, unpriced"
    try:
        calc = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=usage.prompt_tokens,
                               cache_read_tokens=usage.cached_tokens or None,
                               cache_write_tokens=usage.cache_write_tokens or None,
                               output_tokens=usage.completion_tokens),
            model, provider_id=_provider_id(provider))
    except LookupError:
        _warn_unpriced(provider, model)
        return None, "unpriced"
    return calc.total_price, LIBRARY


def price_per_million(provider: str, model: str,
                      overrides: dict[str, PriceOverride] | None = None) -> Decimal | None:
    """Input + output price per 1M tokens (for routing by cost), or None if unknown."""
    cost, _ = price(provider, model, Usage(prompt_tokens=1_000_000,
                                           completion_tokens=1_000_000), overrides)
    return cost


def _provider_id(provider: str) -> str | None:
    return provider if provider in ("openai", "anthropic", "groq", "mistral", "google",
                                    "deepseek", "openrouter", "together", "fireworks") else None


@lru_cache(maxsize=1024)
def _warn_unpriced(provider: str, model: str) -> None:
    log.warning("no price for %s/%s: its cost is recorded as NULL; add it under `prices:` in "
                "flowc.yaml", provider, model)
