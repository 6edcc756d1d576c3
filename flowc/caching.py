"""`cache:` on a step: whether it is on, and for how long an entry holds."""

from __future__ import annotations

from typing import Any

from flowc.model import CacheSpec

_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> int:
    """`30s`, `10m`, `1h`, `7d` in seconds (the model's DURATION_PATTERN checked it)."""
    return int(text[:-1]) * _UNIT[text[-1]]


def cache_of(step: Any) -> tuple[bool, int | None]:
    """(on, ttl in seconds or None for no expiry) of a step's `cache:`; off for step types
    without one."""
    spec = getattr(step, "cache", False)
    if isinstance(spec, CacheSpec):
        return True, None if spec.ttl is None else duration_seconds(spec.ttl)
    return bool(spec), None
