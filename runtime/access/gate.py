"""Who is calling, and may this call be made: keys, budgets and rate limits in one place.

`authenticate` runs once per request (in runtime/gateway/hotpath.py, before anything else
is read); `admit` once per model call (in runtime/gateway/calls.py, after routing, so a
budget is reserved at the price of the targets the call may really reach). Everything
here is in memory and synchronous: no await between a check and its update.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from flowc.config import ProjectConfig
from runtime.access.budgets import (
    ZERO,
    Alert,
    BudgetExceeded,
    Budgets,
    Counter,
    LeaseNeeded,
    Reservation,
    Scope,
)
from runtime.access.keys import Key, KeyChanged, apply_spec, hash_secret, make
from runtime.access.limits import Window
from runtime.access.store import AccessStore
from runtime.ledger.pricing import price
from runtime.providers.base import Usage

log = logging.getLogger("flowc.access")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: ``admin`` (the admin key), ``key`` (a virtual key) or
    ``open`` (auth is off: anyone who reaches the port, as on a laptop)."""

    kind: str
    key: Key | None = None
    # The key's rate-limit window, whose `x-ratelimit-*` headers go on every response to
    # it (None: the key has no rpm or tpm).
    window: Window | None = None

    @property
    def admin(self) -> bool:
        return self.kind != "key"

    @property
    def team(self) -> str | None:
        return self.key.team if self.key is not None else None


OPEN = Principal("open")
ADMIN = Principal("admin")


class Denied(Exception):
    """A request without a usable key (401) or beyond what its key may do (403)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Unpriced(ValueError):
    """A budgeted call to a model with no known price (it would be budgeted as $0)."""


def _bearer(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class Grant(Reservation):
    """One model call's admission: its hold on its budgets (none: ``counters`` empty) and
    its rate-limit windows. One object a call, as it is made on every request."""

    __slots__ = ("windows",)

    def __init__(self, budgets: Budgets, counters: list[Counter], held: Decimal,
                 windows: list[Window]) -> None:
        self.budgets, self.counters, self.held, self.windows = budgets, counters, held, windows

    def charge(self, cost: Decimal | None, usage: Usage | None) -> None:
        """An attempt's ledger row was written: its cost and tokens count."""
        if cost and self.counters:
            self.spend(cost)
        if usage is not None and self.windows:
            self._count(usage)

    def settle(self, cost: Decimal | None, usage: Usage | None) -> None:
        """The call's last ledger row was written: `charge` then `close` in one pass, for
        the row written just before the call ends (nothing runs between the two)."""
        counters = self.counters
        if counters:
            held = self.held
            if cost or held:
                self.held = ZERO
                self.budgets.charge(counters, cost or ZERO, held)
        if usage is not None and self.windows:
            self._count(usage)

    def _count(self, usage: Usage) -> None:
        """The attempt's tokens, on every tokens-per-minute window of the call."""
        now, n = time.monotonic(), usage.prompt_tokens + usage.completion_tokens
        for w in self.windows:
            w.add_tokens(now, n)


class Gate:
    def __init__(self, config: ProjectConfig, store: AccessStore, admin_key: str | None,
                 alert: Callable[[Alert], None] | None = None,
                 budgets: Budgets | None = None) -> None:
        """``budgets``: counters other than the embedded ones (a store shared by several
        instances brings its own, see runtime/pg/access.py)."""
        self.config = config
        self.store = store
        self._admin_hash = hash_secret(admin_key) if admin_key else None
        self.auth_on = admin_key is not None
        shared = getattr(store, "make_budgets", None)  # a SharedStore (store.py)
        self.budgets = budgets or (shared(config.alerts.thresholds, alert) if shared else
                                   Budgets(store.spend, config.alerts.thresholds, alert))
        # Whether `admit` is all `admit_wait` does (budgets kept here alone, no subclass
        # admitting through another process): then a call is admitted without an await.
        self.at_once = (type(self.budgets) is Budgets
                        and type(self).admit_wait is Gate.admit_wait)
        self.keys: dict[str, Key] = {}  # by id
        self._by_hash: dict[str, Key] = {}
        self._windows: dict[Scope, Window] = {}
        # Each limited scope's rpm/tpm as configured, and this instance's part of them
        # (rank among n live instances sharing the limits; n = 1 on its own).
        self._limits: dict[Scope, tuple[int | None, int | None]] = {}
        self._share = (0, 1)
        # Per target: [USD per prompt token at its dearest, per output token, the largest
        # prompt bound known to be priced by them] (see `_worst_on`).
        self._rates: dict[Any, list[Any]] = {}
        # What each (key, tags, pipeline) is checked against: its windows and budget
        # counters, resolved once rather than on every call; emptied whenever a limit or a
        # budget is added, changed or dropped. Keyed by the key's id alone (a string hashes
        # once) when the call has no tags and no pipeline, as most have.
        self._plans: dict[Any, tuple[list[Window], list[Counter]]] = {}
        self._key_windows: dict[str, Window] = {}  # by key id, for its `Principal`
        # The credential headers of recent requests -> who sent them, and until when (epoch
        # seconds; a key's expiry): parsing, hashing and looking up a key on every request
        # is most of what auth costs. Emptied whenever a key changes (its window with it).
        self._callers: dict[tuple[bytes | None, bytes | None], tuple[Principal, float]] = {}
        self.changing = asyncio.Lock()  # the keys API's changes, one at a time
        self.loaded = False
        if shared:
            store.attach(self)  # type: ignore[attr-defined]

    def load(self, keys: list[Key] | None = None) -> None:
        """Keys from the store (or ``keys``, already read from it), and every budget's spend
        so far in its period from the ledger. Raises while the store cannot be read (the
        ledger held by another process); until it succeeds, keys other than the admin's
        are answered 503."""
        if keys is None:
            keys = self.store.load_keys()
        for key in keys:
            self._put(key)
        c = self.config
        for kind, table in (("team", c.budgets.teams), ("tag", c.budgets.tags),
                            ("pipeline", c.budgets.pipelines)):
            for name, b in table.items():
                self._configure(Scope(kind, name), b.usd, b.period, b.rpm, b.tpm)
        self.loaded = True

    # -- keys -------------------------------------------------------------------------------
    def _configure(self, scope: Scope, usd: Decimal | None, period: Any, rpm: int | None,
                   tpm: int | None) -> None:
        self._plans.clear()
        self.budgets.set(scope, usd, period)
        if rpm is None and tpm is None:
            self._windows.pop(scope, None)
            self._limits.pop(scope, None)
            if scope.kind == "key":
                self._key_windows.pop(scope.name, None)
            return
        self._limits[scope] = (rpm, tpm)
        w = self._windows.get(scope)
        if w is None:
            w = self._windows[scope] = Window(str(scope), rpm, tpm)
        self._apply_share(w, rpm, tpm)
        if scope.kind == "key":
            self._key_windows[scope.name] = w

    def _apply_share(self, w: Window, rpm: int | None, tpm: int | None) -> None:
        rank, n = self._share
        w.limit(_part(rpm, rank, n), _part(tpm, rank, n), rpm, tpm)

    def set_share(self, rank: int, n: int) -> None:
        """This instance is ``rank`` of ``n`` live instances sharing every rate limit: it
        admits its part of each (the parts add up to the limit)."""
        self._share = (rank, max(n, 1))
        for scope, (rpm, tpm) in self._limits.items():
            w = self._windows.get(scope)
            if w is not None:
                self._apply_share(w, rpm, tpm)

    def _put(self, key: Key) -> None:
        self._callers.clear()
        old = self.keys.get(key.id)
        if old is not None:
            self._by_hash.pop(old.hash, None)
        self.keys[key.id] = key
        self._by_hash[key.hash] = key
        self._configure(Scope("key", key.id, key.name), key.budget_usd, key.period, key.rpm,
                        key.tpm)

    # A change to a key is worked out (``created``, ``updated``, ``revoked``: pure, they
    # raise KeySpecError/KeyError), saved to the store, then ``put`` live. The server saves
    # off the event loop and puts on it, so live counters only ever change on the loop.
    def created(self, spec: dict[str, Any]) -> tuple[Key, str]:
        return make(spec)

    def updated(self, key_id: str, spec: dict[str, Any]) -> Key:
        return apply_spec(self.get(key_id), spec, datetime.now(UTC))

    def revoked(self, key_id: str) -> Key:
        key = self.get(key_id)
        return key if key.revoked_at is not None else replace(key, revoked_at=datetime.now(UTC))

    def reads(self, key: Key) -> dict[tuple[Scope, datetime], Decimal]:
        """What putting ``key`` live reads from the ledger (a new budget's spend so far),
        read now: the server calls this off the event loop, then `put(key, reads)`."""
        return self.budgets.reads(Scope("key", key.id, key.name), key.budget_usd, key.period)

    def put(self, key: Key, reads: dict[tuple[Scope, datetime], Decimal] | None = None
            ) -> None:
        """A saved change, live from the next request; ``reads``: see `reads`."""
        old = self.keys.get(key.id)
        self.budgets.known = reads or {}
        try:
            self._put(key)
        finally:
            self.budgets.known = {}
        if old is None:
            log.info("key %s (%s) created", key.id, key.name)
        elif key.revoked_at is not None and old.revoked_at is None:
            log.info("key %s (%s) revoked", key.id, key.name)

    def create(self, spec: dict[str, Any]) -> tuple[Key, str]:
        key, secret = self.created(spec)
        self.store.save_key(key)
        self.put(key)
        return key, secret

    def update(self, key_id: str, spec: dict[str, Any]) -> Key:
        return self._change(lambda: self.updated(key_id, spec))

    def revoke(self, key_id: str) -> Key:
        return self._change(lambda: self.revoked(key_id))

    def _change(self, change: Callable[[], Key]) -> Key:
        """Save and put live ``change()`` of a key, worked out again from the key as the
        store has it while other processes' changes come first (KeyChanged)."""
        for _ in range(KEY_ATTEMPTS):
            key = change()
            try:
                self.store.save_key(key, self.keys.get(key.id))
            except KeyChanged:
                self.refresh(key.id)
                continue
            self.put(key)
            return key
        raise KeyChanged(f"key {key.id} kept being changed by others: try again")

    def refresh(self, key_id: str) -> None:
        """One key as the store has it now (after KeyChanged), live; see `fresh`."""
        found, reads = self.fresh(key_id)
        if found is not None:
            self.put(found, reads)

    def fresh(self, key_id: str) -> tuple[Key | None, dict[tuple[Scope, datetime], Decimal]]:
        """The key as the store has it, and what putting it live reads (see `reads`):
        the part of `refresh` that waits on the store."""
        found = next((k for k in self.store.load_keys() if k.id == key_id), None)
        return found, self.reads(found) if found is not None else {}

    def get(self, key_id: str) -> Key:
        key = self.keys.get(key_id)
        if key is None:
            raise KeyError(key_id)
        return key

    def reload(self) -> None:
        """Keys as the store has them (another process changed them)."""
        for key in self.store.load_keys():
            self._put(key)

    # -- requests --------------------------------------------------------------------------
    def authenticate(self, authorization: bytes | None, api_key: bytes | None) -> Principal:
        """The caller of a request, from `Authorization: Bearer` or `x-api-key`. With auth
        off, a flowc key is still honoured (its budgets, limits and attribution) and any
        other credential (a client's placeholder) is ignored."""
        seen = self._callers.get((authorization, api_key))
        if seen is not None and time.time() < seen[1]:
            return seen[0]
        who = self._authenticate(authorization, api_key)
        if self.loaded:
            if len(self._callers) >= 4096:  # credentials come from requests: stay bounded
                self._callers.clear()
            key = who.key
            until = key.expires_at.timestamp() if key and key.expires_at else math.inf
            self._callers[(authorization, api_key)] = (who, until)
        return who

    def _authenticate(self, authorization: bytes | None, api_key: bytes | None) -> Principal:
        token = _bearer(authorization)
        if token is None and api_key is not None:
            token = api_key.decode("latin-1").strip()
        if not token:
            if self.auth_on:
                raise Denied(401, "missing_api_key", (
                    "You didn't provide an API key. You need to provide your flowc key in "
                    "an Authorization header using Bearer auth (i.e. Authorization: Bearer "
                    "sk-flowc-...) or in an x-api-key header."))
            return OPEN
        digest = hash_secret(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return ADMIN
        key = self._by_hash.get(digest)
        if key is None and not self.loaded:
            if not self.auth_on:
                return OPEN
            raise Denied(503, "keys_unavailable", (
                "keys cannot be checked yet: the ledger that holds them is in use by another "
                "process (see /ready); try again shortly"))
        if key is None:
            if self.auth_on:
                raise Denied(401, "invalid_api_key",
                             "Incorrect API key provided. Keys are made with `flowc keys "
                             "create`; ask your flowc admin for one.")
            return OPEN
        state = key.state(datetime.now(UTC))
        if state != "active":
            log.info("refused a request with %s key %s (%s)", state, key.id, key.name)
            raise Denied(401, f"{state}_api_key", f"This API key was {state} "
                         f"(key '{key.name}', {key.id}).")
        return Principal("key", key, self._key_windows.get(key.id))

    def row_tags(self, who: Principal, request_tags: str | None) -> str | None:
        if not request_tags and (who.key is None or not who.key.tags):
            return None  # most requests: neither the key nor the request has tags
        tags = set(who.key.tags) if who.key is not None else set()
        if request_tags:
            tags.update(t.strip() for t in request_tags.split(",") if t.strip())
        return ",".join(sorted(tags)) if tags else None

    def scopes(self, who: Principal, tags: str | None, pipeline: str | None) -> list[Scope]:
        out = []
        key = who.key
        if key is not None:
            out.append(Scope("key", key.id, key.name))
            if key.team:
                out.append(Scope("team", key.team))
        if tags:
            out += [Scope("tag", t) for t in tags.split(",")]
        if pipeline:
            out.append(Scope("pipeline", pipeline))
        return out

    def admit(self, who: Principal, requested: str, targets: Iterable[Any],
              req: dict[str, Any], prompt_bound: int | None, tags: str | None,
              pipeline: str | None) -> Grant | None:
        """Check the call against the key's models, the rate limits and the budgets, and
        reserve its largest possible cost; raises Denied, RateLimited, BudgetExceeded or
        Unpriced. None: nothing applies to this caller. ``prompt_bound``: the request's
        size in characters, None to measure ``req`` (only when a budget needs it)."""
        key = who.key
        if key is not None and (key.read_only or key.models):
            targets = list(targets)  # iterated twice
            self.permit(who, requested, targets)
        ident = key.id if key is not None else None
        if tags is not None or pipeline is not None:
            ident = (ident, tags, pipeline)
        plan = self._plans.get(ident)
        if plan is None:
            plan = self._plan(who, tags, pipeline, ident)
        if plan is _NOTHING:
            return None
        windows, counters = plan
        now = time.monotonic()
        for w in windows:
            w.check(now)
        worst = ZERO
        if counters:
            if prompt_bound is None:
                prompt_bound = len(orjson.dumps(req))
            worst = self.worst_cost(targets, req, prompt_bound)
            self.budgets.reserve_on(counters, worst, time.time())
        for w in windows:
            w.take(now)
        return Grant(self.budgets, counters, worst, windows)

    def _plan(self, who: Principal, tags: str | None, pipeline: str | None, ident: Any
              ) -> tuple[list[Window], list[Counter]]:
        """What calls by ``who`` with these tags, in this pipeline, are checked against,
        kept for the next under ``ident`` (`_NOTHING`: no window, no budget)."""
        scopes = self.scopes(who, tags, pipeline)
        plan = ([w for s in scopes if (w := self._windows.get(s)) is not None],
                [c for s in scopes if (c := self.budgets.counters.get(s)) is not None])
        if not plan[0] and not plan[1]:
            plan = _NOTHING
        if len(self._plans) >= 4096:  # tags come from requests: keep the cache bounded
            self._plans.clear()
        self._plans[ident] = plan
        return plan

    def permit(self, who: Principal, requested: str, targets: list[Any]) -> None:
        """Whether ``who`` may call ``requested`` (routed to ``targets``) at all: not with a
        read-only key, nor outside its models; raises Denied. It takes no rate limit or
        budget: a step's cached result, reused instead of a call, is checked with this."""
        key = who.key
        if key is None:
            return
        if key.read_only:
            raise Denied(403, "permission_denied",
                         f"key '{key.name}' is read-only: it cannot call models")
        if not key.allows_model(requested) and not all(
                key.allows_model(str(t)) for t in targets):
            raise Denied(403, "model_not_allowed", (
                f"key '{key.name}' may not use model '{requested}' (allowed: "
                f"{', '.join(key.models)})"))

    async def admit_wait(self, who: Principal, requested: str, targets: Iterable[Any],
                         req: dict[str, Any], prompt_bound: int | None, tags: str | None,
                         pipeline: str | None) -> Grant | None:
        """`admit`, waiting while a budget shared with other processes (other instances,
        other workers) leases more headroom: the lease is taken off the event loop, so
        only this call waits, and only when what is held here has run out."""
        try:  # the common case: admitted at once (or refused), nothing to wait for
            return self.admit(who, requested, targets, req, prompt_bound, tags, pipeline)
        except LeaseNeeded as short:
            last = short
        for _ in range(_JOINED - 1):
            if not await last.wait and last.own and last.counter.left() < last.amount:
                raise BudgetExceeded(last.counter, last.amount)
            # Granted; or refused, but to another call that needed more, or while calls
            # that ended since have left room: admit again (asking for what is short).
            try:
                return self.admit(who, requested, targets, req, prompt_bound, tags,
                                  pipeline)
            except LeaseNeeded as short:
                last = short
        await last.wait
        raise BudgetExceeded(last.counter, last.amount)

    def worst_cost(self, targets: Iterable[Any], req: dict[str, Any],
                   prompt_bound: int) -> Decimal:
        """The most the call can cost on any of its targets: every prompt token at the
        dearest input rate (a 1-hour cache write), ``prompt_bound`` tokens of it, and the
        output limit of every choice."""
        default = self.config.budgets.default_max_output_tokens
        if _OUTPUT_SHAPE.isdisjoint(req):  # most requests: one C call says so
            out = default
        else:  # the first limit given, when it is a count (else what `_max_output` finds)
            out = (req.get("max_completion_tokens") or req.get("max_tokens")
                   or req.get("max_output_tokens"))
            if out.__class__ is not int or out <= 0:  # not a bool, nor a float
                out = _max_output(req) or default
            n = req.get("n")
            if n.__class__ is int and n > 1:  # not a bool
                out *= n
        worst = None
        for t in targets:
            # The target's per-token rates, when ``prompt_bound`` is known to be priced
            # by them (see `_worst_on`), inline: this runs on every budgeted call.
            rates = self._rates.get((t.provider, t.model))
            if rates is not None and prompt_bound <= rates[2]:
                cost = prompt_bound * rates[0] + out * rates[1]
            else:
                cost = self._worst_on(t, prompt_bound, out)
            if worst is None or cost > worst:  # (the first without a Decimal comparison)
                worst = cost
        return worst if worst is not None else ZERO

    def _worst_on(self, t: Any, prompt_bound: int, out: int) -> Decimal:
        """One target's worst cost, exact, when ``prompt_bound`` is not yet known to be
        priced by its per-token rates (`worst_cost` prices the bounds that are, inline).
        Below a long-context tier a cost is linear in the tokens, so each target's rates
        are found once and the cost is two products (pricing the two usages costs ~4 us a
        call, on every request); a bound not yet known to be below every tier is priced
        in full, and when that agrees with the rates, bounds up to it use them from then
        on."""
        ident = (t.provider, t.model)  # a tuple hashes in C; the dataclass in Python
        rates = self._rates.get(ident)
        if rates is None:
            units = [price(t.provider, t.model, u, self.config.prices)[0] for u in _UNITS]
            if None in units:
                raise Unpriced(f"model '{t}' has no known price, and this request counts "
                               "against a budget: give it a price under `prices:` in "
                               "flowc.yaml")
            plain, written, output = units
            rates = self._rates[ident] = [max(plain, written), output, -1]  # type: ignore[type-var]
        linear: Decimal = prompt_bound * rates[0] + out * rates[1]
        plain_u = Usage(prompt_tokens=prompt_bound, completion_tokens=out)
        written_u = Usage(prompt_tokens=prompt_bound, cache_write_tokens=prompt_bound,
                          cache_write_1h_tokens=prompt_bound, completion_tokens=out)
        exact: Decimal = max(price(t.provider, t.model, u, self.config.prices)[0]  # type: ignore[type-var]
                             for u in (plain_u, written_u))
        if exact == linear:
            rates[2] = prompt_bound
        return exact

    def budget_status(self, key: Key) -> dict[str, Any]:
        return {"key": self.budgets.status(Scope("key", key.id)),
                "team": self.budgets.status(Scope("team", key.team)) if key.team else None}


def admin_key(config: ProjectConfig, project_dir: Path,
              env: Mapping[str, str] | None = None) -> str | None:
    """The admin key: FLOWC_ADMIN_KEY, else the file `server.admin_key_file` names (relative
    to the project). None: auth is off."""
    env = os.environ if env is None else env
    value = env.get("FLOWC_ADMIN_KEY", "").strip()
    if value:
        return value
    if config.server.admin_key_file:
        path = project_dir / config.server.admin_key_file
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"server.admin_key_file: cannot read {path}: "
                             f"{exc.strerror}") from None
        if not value:
            raise ValueError(f"server.admin_key_file: {path} is empty")
        return value
    return None


def _part(limit: int | None, rank: int, n: int) -> int | None:
    """Instance ``rank``'s part of a per-minute limit split among ``n``: the first
    ``limit % n`` take one more, so the parts add up to the limit exactly."""
    if limit is None or n <= 1:
        return limit
    return limit // n + (1 if rank < limit % n else 0)


# What a caller without windows or budgets is checked against: nothing.
_NOTHING: tuple[list[Window], list[Counter]] = ([], [])
# A key change is worked out again at most this often while others' changes to the key are
# saved first: each refusal means another change was saved in between, so n changes sent
# at once need at most n attempts (five were too few for nine sent through three instances).
KEY_ATTEMPTS = 20
_JOINED = 64  # leases a call waits for at most (others may take each first) before refused

# One prompt token plain, one written to the 1-hour cache, one output token.
_UNITS = (Usage(prompt_tokens=1),
          Usage(prompt_tokens=1, cache_write_tokens=1, cache_write_1h_tokens=1),
          Usage(completion_tokens=1))


def _max_output(req: dict[str, Any]) -> int | None:
    for name in _OUTPUT_LIMITS:
        v = req.get(name)
        if v.__class__ is int and v > 0:  # not a bool, nor a float
            return v  # type: ignore[no-any-return]
    return None


_OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# What can make a call's output longer than the default: an output limit, or n choices.
_OUTPUT_SHAPE = frozenset((*_OUTPUT_LIMITS, "n"))
