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
from flowc.known_models import provider_id
from runtime.providers.base import Usage

log = logging.getLogger("flowc.pricing")
LIBRARY = f"genai-prices {genai_prices.__version__}"
_MILLION = Decimal(1_000_000)
FREE_PROVIDERS = ("ollama",)


def price(provider: str, model: str, usage: Usage,
          overrides: dict[str, PriceOverride] | None = None) -> tuple[Decimal | None, str]:
    """``(cost in USD or None, price source)``."""
    override = (overrides or {}).get(f"{provider}/{model}")
    if override is not None:
        return _Rates(override.input, override.cached_input, override.cache_write,
                      override.cache_write_1h, override.output).cost(usage), "flowc.yaml"
    if provider in FREE_PROVIDERS:
        return Decimal(0), f"{provider}: local, unpriced"
    rates = _flat_rates(provider, model)
    if rates is None:
        _warn_unpriced(provider, model)
        return None, "unpriced"
    if usage.prompt_tokens < rates.tier_start:
        return rates.cost(usage), LIBRARY
    return _library_price(provider, model, usage), LIBRARY  # a long-context tier applies


class _Rates:
    """A model's prices per 1M tokens (below its first long-context tier, if it has tiers).
    A cache read or write with no price of its own costs what plain input does; a 1-hour
    write with none costs what a 5-minute write does."""

    def __init__(self, input: Decimal, cache_read: Decimal | None,
                 cache_write: Decimal | None, cache_write_1h: Decimal | None,
                 output: Decimal, tier_start: float = float("inf")) -> None:
        self.input, self.output, self.tier_start = input, output, tier_start
        self.cache_read = input if cache_read is None else cache_read
        self.cache_write = input if cache_write is None else cache_write
        self.cache_write_1h = self.cache_write if cache_write_1h is None else cache_write_1h

    @classmethod
    def of_library(cls, mp: object) -> _Rates:
        """From genai-prices' model price. Looking a model up there costs ~0.4 ms a call;
        these rates are cached per model to keep that off the request path."""
        def base(value: object) -> Decimal | None:
            return getattr(value, "base", value)  # type: ignore[return-value]

        def tier(value: object) -> float:
            tiers = getattr(value, "tiers", None) or ()
            return min((t.start for t in tiers), default=float("inf"))

        fields = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "cache_write_1h_mtok",
                  "output_mtok")
        values = [getattr(mp, f, None) for f in fields]
        inp, read, write, write_1h, out = (base(v) for v in values)
        return cls(inp or Decimal(0), read, write, write_1h, out or Decimal(0),
                   min(tier(v) for v in values))

    def cost(self, u: Usage) -> Decimal:
        plain = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens
        hour = u.cache_write_1h_tokens
        return (plain * self.input + u.cached_tokens * self.cache_read
                + (u.cache_write_tokens - hour) * self.cache_write
                + hour * self.cache_write_1h
                + u.completion_tokens * self.output) / _MILLION


@lru_cache(maxsize=4096)
def _flat_rates(provider: str, model: str) -> _Rates | None:
    try:
        calc = genai_prices.calc_price(genai_prices.Usage(input_tokens=0, output_tokens=0),
                                       model, provider_id=provider_id(provider))
    except LookupError:
        return None
    return _Rates.of_library(calc.model_price)


def _library_price(provider: str, model: str, usage: Usage) -> Decimal:
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=usage.cached_tokens or None,
            cache_write_tokens=usage.cache_write_tokens or None,
            cache_write_5m_tokens=(usage.cache_write_tokens - usage.cache_write_1h_tokens
                                   if usage.cache_write_1h_tokens else None),
            cache_write_1h_tokens=usage.cache_write_1h_tokens or None,
            output_tokens=usage.completion_tokens),
        model, provider_id=provider_id(provider))
    return calc.total_price


def price_per_million(provider: str, model: str,
                      overrides: dict[str, PriceOverride] | None = None) -> Decimal | None:
    """Base input + output price per 1M tokens (for routing by cost), or None if unknown.
    Long-context tiers are left out: they say nothing about a typical request."""
    override = (overrides or {}).get(f"{provider}/{model}")
    if override is not None:
        return override.input + override.output
    if provider in FREE_PROVIDERS:
        return Decimal(0)
    rates = _flat_rates(provider, model)
    return None if rates is None else rates.input + rates.output


@lru_cache(maxsize=1024)
def _warn_unpriced(provider: str, model: str) -> None:
    log.warning("no price for %s/%s: its cost is recorded as NULL; add it under `prices:` in "
                "flowc.yaml", provider, model)
