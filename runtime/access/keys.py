"""Virtual keys: what a key is allowed, and how a secret is made and recognised.

A key's secret (`sk-flowc-...`) is shown once, when it is made; only its SHA-256 is stored.
The secret is 256 random bits, so a plain hash is as strong as a slow one would be, and
looking a key up by its hash takes no secret-dependent time beyond the hash itself.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any, Literal

from flowc.cost import amount

PREFIX = "sk-flowc-"
Period = Literal["day", "week", "month", "total"]
PERIODS: tuple[Period, ...] = ("day", "week", "month", "total")


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Key:
    """One virtual key. ``models`` and ``pipelines`` are glob patterns (empty: any);
    ``budget_usd`` is a hard limit over ``period``; ``rpm``/``tpm`` are per minute."""

    id: str
    name: str
    hash: str
    created_at: datetime
    team: str | None = None
    budget_usd: Decimal | None = None
    period: Period = "month"
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()
    read_only: bool = False
    tags: tuple[str, ...] = ()  # "k=v", sorted
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    hint: str = ""  # the secret's last four characters, to tell keys apart in a list
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def allows_model(self, name: str) -> bool:
        return not self.models or any(fnmatchcase(name, p) for p in self.models)

    def allows_pipeline(self, name: str) -> bool:
        return not self.pipelines or any(fnmatchcase(name, p) for p in self.pipelines)

    def state(self, now: datetime) -> str:
        """active | revoked | expired"""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self, now: datetime | None = None) -> dict[str, Any]:
        """What `flowc keys show` and `GET /v1/keys/{id}` print: never the hash."""
        now = now or datetime.now(UTC)
        return {
            "id": self.id, "name": self.name, "team": self.team,
            "key_hint": f"{PREFIX}...{self.hint}" if self.hint else None,
            "state": self.state(now),
            "budget_usd": None if self.budget_usd is None else amount(self.budget_usd),
            "period": self.period, "rpm": self.rpm, "tpm": self.tpm,
            "models": list(self.models), "pipelines": list(self.pipelines),
            "read_only": self.read_only, "tags": list(self.tags),
            "created_at": _iso(self.created_at), "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


class KeyChanged(Exception):
    """A key changed by another process (a worker, an instance) after the change being
    saved read it: saving it would undo that change. Read the key again and redo it."""


class KeySpecError(ValueError):
    """A key's settings as a user wrote them are wrong; the message says which and why."""


_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expiry(text: str, now: datetime) -> datetime:
    """`30d`, `12h`, `2w` from now, or an ISO date/time (UTC when it names no zone)."""
    m = _DURATION.match(text.strip())
    if m:
        try:
            return now + timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:  # past the year 9999
            raise KeySpecError(f"expires: '{text}' is too far away") from None
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeySpecError(f"expires: '{text}' is neither a duration (30d, 12h, 2w) nor an "
                           "ISO date (2027-01-31)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def split_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`'fast,openai/*'` or a list -> a tuple of stripped, non-empty items."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if isinstance(s, str) and s.strip())


def parse_tags(values: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    tags = split_list(values)
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise KeySpecError(f"tag '{t}' is not k=v")
    return tuple(sorted({f"{k.strip()}={v.strip()}" for k, _, v in
                         (t.partition("=") for t in tags)}))


_SETTABLE = ("name", "team", "budget_usd", "period", "rpm", "tpm", "models", "pipelines",
             "read_only", "tags", "expires_at")


def apply_spec(key: Key, spec: dict[str, Any], now: datetime) -> Key:
    """``key`` with the settings in ``spec`` (as sent to `POST/PATCH /v1/keys`) applied;
    unknown or ill-typed settings are a KeySpecError naming them."""
    unknown = sorted(set(spec) - set(_SETTABLE) - {"budget", "expires"})
    if unknown:
        raise KeySpecError(f"unknown key setting(s): {', '.join(unknown)} (known: "
                           f"{', '.join(_SETTABLE)})")
    changes: dict[str, Any] = {}
    for name, value in spec.items():
        if name == "name":
            if not isinstance(value, str) or not value.strip():
                raise KeySpecError("name: give the key a non-empty name")
            changes["name"] = value.strip()
        elif name == "team":
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise KeySpecError("team: a non-empty string, or null for none")
            changes["team"] = value.strip() if isinstance(value, str) else None
        elif name in ("budget_usd", "budget"):
            changes["budget_usd"] = _money(value)
        elif name == "period":
            if value not in PERIODS:
                raise KeySpecError(f"period: '{value}' is not one of {', '.join(PERIODS)}")
            changes["period"] = value
        elif name in ("rpm", "tpm"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise KeySpecError(f"{name}: a whole number >= 0, or null for no limit")
            changes[name] = value
        elif name in ("models", "pipelines"):
            changes[name] = split_list(_listed(name, value))
        elif name == "tags":
            changes["tags"] = parse_tags(_listed(name, value))
        elif name == "read_only":
            if not isinstance(value, bool):
                raise KeySpecError("read_only: true or false")
            changes["read_only"] = value
        elif name in ("expires_at", "expires"):
            changes["expires_at"] = (None if value is None
                                     else parse_expiry(str(value), now))
    return replace(key, **changes)


def _listed(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str | list | tuple):
        raise KeySpecError(f"{name}: a list, or a comma-separated string")
    return value


def _money(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        d = Decimal(str(value))
    except ArithmeticError:
        raise KeySpecError(f"budget: '{value}' is not an amount in USD") from None
    if not d.is_finite() or d < 0:
        raise KeySpecError(f"budget: '{value}' is not an amount in USD (>= 0)")
    return d


def make(spec: dict[str, Any], now: datetime | None = None) -> tuple[Key, str]:
    """A new key from ``spec`` and its secret (shown once, never stored)."""
    now = now or datetime.now(UTC)
    if "name" not in spec:
        raise KeySpecError("name: give the key a name (e.g. --name billing-bot)")
    secret = new_secret()
    key = Key(id=new_id(), name="", hash=hash_secret(secret), created_at=now,
              hint=secret[-4:])
    return apply_spec(key, spec, now), secret
