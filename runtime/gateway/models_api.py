"""`GET /v1/models` and `GET /v1/models/{id}`: every model name a client can use here.

The list is the aliases and route names of flowc.yaml, the models it names, and each
reachable provider's own models, from its list endpoint (OpenAI and any OpenAI-compatible
server `GET /models`, Anthropic `GET /v1/models`, Ollama `GET /api/tags`), kept for
`LIST_TTL`. The lists also place bare names (`gpt-oss:20b` is Ollama's when only Ollama has
it: see `ProjectConfig.model_choices`): those that do (Ollama's, configured servers') are
fetched at start-up, the vendors' (OpenAI's and Anthropic's names are placed by their
families) when first asked for. A list endpoint that fails is stood in for by the price
data's model names for that provider, and asked again after `RETRY_AFTER`. A request never
waits on a slow provider longer than `LIST_WAIT`: what comes later serves the next one.

OpenAI clients get OpenAI's list shape; a request that speaks Anthropic's API
(`anthropic-version`, or `x-api-key` without `authorization`) gets Anthropic's, paginated
the way its reference says (`limit`, `after_id`, `before_id`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from genai_prices import data as price_data
from starlette.requests import Request
from starlette.responses import Response

from flowc.config import BARE_MODEL_PREFIXES, ProjectConfig
from flowc.known_models import provider_id
from runtime.gateway.hotpath import error_body
from runtime.providers import Endpoint, FlowcError, Providers, RequestError, Target
from runtime.providers.anthropic import API_VERSION

log = logging.getLogger("flowc.models")
LIST_TTL = 600.0  # seconds a provider's list is kept
RETRY_AFTER = 60.0  # a failed list is asked again this soon
LIST_TIMEOUT = 5.0  # one list call, whole
LIST_WAIT = 1.0  # the longest a request waits for lists being fetched
STARTUP_WAIT = 2.0
_PAGES = 20  # Anthropic list pages followed at most (1,000 models each)
_EPOCH = "1970-01-01T00:00:00Z"
FAMILY_VENDORS = frozenset(BARE_MODEL_PREFIXES.values())


@dataclass(frozen=True)
class Model:
    """One entry of the list: ``id`` is the name a client sends."""

    id: str
    provider: str
    created: int = 0  # Unix seconds; 0 when not known
    display_name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # Anthropic's own fields

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created,
                "owned_by": self.provider}

    def anthropic(self) -> dict[str, Any]:
        created = (datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                   if self.created else _EPOCH)
        return {**self.extra, "type": "model", "id": self.id,
                "display_name": self.display_name or self.id, "created_at": created}


@dataclass(frozen=True)
class Listing:
    """A provider's models, from its list endpoint (``source`` "provider") or the price
    data ("prices")."""

    models: tuple[Model, ...]
    source: str
    fresh_until: float


class ModelCatalog:
    """The providers' model lists, cached, and the names they make usable."""

    def __init__(self, config: ProjectConfig, providers: Providers) -> None:
        self.config = config
        self.providers = providers
        self.listings: dict[str, Listing] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def listable(self) -> list[Endpoint]:
        """The endpoints whose models a client can use: a provider with a key, Ollama,
        and a server configured with its own URL (a local OpenAI-compatible one needs no
        key)."""
        configured = {n for n, pc in self.config.providers.items() if pc.base_url}
        return [ep for ep in self.providers.endpoints.values()
                if ep.api_key or ep.kind == "ollama" or ep.name in configured]

    async def refresh(self, wait: float = LIST_WAIT, *, placing: bool = False) -> None:
        """Fetch the lists that are stale, waiting at most ``wait`` seconds for them; the
        ones still running finish in the background. ``placing``: only the lists that
        place bare names (not the vendors', whose names their families place), as at
        start-up."""
        now = time.monotonic()
        for ep in self.listable():
            if placing and ep.name in FAMILY_VENDORS:
                continue
            listing = self.listings.get(ep.name)
            if (listing is None or listing.fresh_until <= now) and ep.name not in self._fetching:
                task = asyncio.create_task(self._update(ep))
                self._fetching[ep.name] = task
                task.add_done_callback(lambda _t, n=ep.name: self._fetching.pop(n, None))
        if self._fetching and wait > 0:
            await asyncio.wait(list(self._fetching.values()), timeout=wait)
        for name in self._fetching:  # still waiting on its first list: the price data's
            if name not in self.listings:
                self._store(name, Listing(priced_models(name), "prices", 0.0))

    async def close(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()

    async def _update(self, ep: Endpoint) -> None:
        try:
            models = await asyncio.wait_for(fetch_models(ep), LIST_TIMEOUT)
            listing = Listing(models, "provider", time.monotonic() + LIST_TTL)
        except Exception as exc:  # any failure: the price data stands in for the list
            priced = priced_models(ep.name)
            # Ollama not running is the usual case for a user of hosted models only.
            level = logging.INFO if ep.kind == "ollama" and not ep.api_key else logging.WARNING
            log.log(level, "listing %s's models failed (%s); %s until it answers", ep.name,
                    _why(exc, ep), "the price data's names stand in" if priced
                    else "its models are not listed")
            listing = Listing(priced, "prices", time.monotonic() + RETRY_AFTER)
        self._store(ep.name, listing)

    def _store(self, provider: str, listing: Listing) -> None:
        self.listings[provider] = listing
        self.providers.listed = {name: frozenset(m.id for m in li.models)
                                 for name, li in self.listings.items()}

    def models(self) -> list[Model]:
        """Every name a client can use, each once: aliases and route names, the models
        flowc.yaml names (an alias's as provider/model), then each provider's list (by
        its bare id where the bare id reaches it, else as provider/model)."""
        out: dict[str, Model] = {}
        listed = {(p, m.id): m for p, li in self.listings.items() for m in li.models}

        def add(name: str, target: Target | None, label: str = "") -> None:
            if name in out:
                return
            known = listed.get((target.provider, target.model)) if target else None
            out[name] = Model(name, target.provider if target else "flowc",
                              known.created if known else 0,
                              label or (known.display_name if known else name),
                              known.extra if known else {})

        for alias in sorted(self.config.models):
            target = self._target(alias)
            add(alias, target, f"{alias} ({target})" if target else alias)
        for route in self.config.routes:
            if route.match.model is not None and self._target(route.match.model) is None:
                add(route.match.model, None, f"{route.match.model} (route '{route.name}')")
        configured = [str(t) for t in map(self._target, self.config.models) if t]
        configured += [t for r in self.config.routes for t in r.targets]
        configured += [n for src, fbs in self.config.fallbacks.items() for n in (src, *fbs)]
        for name in configured:
            add(name, self._target(name))
        for ep in self.providers.endpoints.values():
            for m in self.listings.get(ep.name, Listing((), "", 0)).models:
                bare = self._target(m.id)
                name = m.id if bare == Target(ep.name, m.id) else f"{ep.name}/{m.id}"
                if name not in out:
                    out[name] = Model(name, ep.name, m.created, m.display_name, m.extra)
        return list(out.values())

    def _target(self, name: str) -> Target | None:
        try:
            return self.providers.resolve(name)
        except FlowcError:  # ambiguous: listed as provider/model instead
            return None

    def find(self, model_id: str) -> Model | None:
        """The entry for ``model_id``: listed under that name, or a name that reaches a
        listed model (`openai/gpt-4o-mini` for the listed `gpt-4o-mini`). An ambiguous
        name raises the client's 400."""
        for m in self.models():
            if m.id == model_id:
                return m
        target = self.providers.resolve(model_id)
        listing = self.listings.get(target.provider) if target else None
        for m in listing.models if listing and target else ():
            if m.id == target.model:
                return Model(model_id, m.provider, m.created, m.display_name, m.extra)
        return None


# -- the providers' list endpoints --------------------------------------------------------------
async def fetch_models(ep: Endpoint) -> tuple[Model, ...]:
    """``ep``'s models, from its own list endpoint; raises on any failure."""
    if ep.kind == "anthropic":
        return await _anthropic_models(ep)
    if ep.kind == "ollama":
        body = await _get(ep, "/api/tags", {})
        return tuple(Model(str(m["name"]), ep.name, _unix(m.get("modified_at")),
                           str(m["name"])) for m in body["models"])
    body = await _get(ep, "/models", {"authorization": f"Bearer {ep.api_key}"}
                      if ep.api_key else {})
    return tuple(Model(str(m["id"]), ep.name, int(m.get("created") or 0), str(m["id"]))
                 for m in body["data"])


async def _anthropic_models(ep: Endpoint) -> tuple[Model, ...]:
    headers = {"anthropic-version": API_VERSION}
    if ep.api_key:
        headers["x-api-key"] = ep.api_key
    models: list[Model] = []
    after: str | None = None
    for _ in range(_PAGES):
        query = "?limit=1000" + (f"&after_id={after}" if after else "")
        body = await _get(ep, "/v1/models" + query, headers)
        for m in body["data"]:
            extra = {k: v for k, v in m.items()
                     if k not in ("id", "type", "display_name", "created_at")}
            models.append(Model(str(m["id"]), ep.name, _unix(m.get("created_at")),
                                str(m.get("display_name") or m["id"]), extra))
        after = body.get("last_id")
        if not body.get("has_more") or not after:
            break
    return tuple(models)


async def _get(ep: Endpoint, path: str, auth: dict[str, str]) -> Any:
    async with ep.session().get(ep.url(path), headers={**ep.headers, **auth},
                                timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT)) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise ep.error(resp.status, resp.headers, raw)
        return ep.parse(raw)


def _unix(stamp: Any) -> int:
    """An RFC 3339 time as Unix seconds; 0 when missing or unreadable. Ollama writes
    nanoseconds, which `fromisoformat` does not read: they are cut to microseconds."""
    if not isinstance(stamp, str) or not stamp:
        return 0
    head, dot, rest = stamp.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        stamp = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0


def _why(exc: BaseException, ep: Endpoint) -> str:
    """A list failure for the log: its kind and, for an error answer, the provider's
    message with any key cut out."""
    if isinstance(exc, FlowcError):
        return ep.redact_text(exc.message)
    if isinstance(exc, TimeoutError):
        return f"no answer within {LIST_TIMEOUT:g} s"
    return f"{type(exc).__name__}, an answer not in the list's shape" if isinstance(
        exc, (KeyError, TypeError, AttributeError, ValueError)) else type(exc).__name__


def priced_models(provider: str) -> tuple[Model, ...]:
    """The model names the price data (genai-prices, under the ids the ledger prices with)
    has for ``provider``: patterns (`ft:gpt-4o`, `gpt-3.5-turbo-`) left out."""
    pid = provider_id(provider)
    for p in price_data.providers if pid else ():
        if p.id == pid:
            return tuple(Model(m.id, provider, 0, m.name or m.id) for m in p.models
                         if not m.id.endswith("-") and not m.id.startswith("ft:"))
    return ()


# -- the HTTP side --------------------------------------------------------------------------------
def speaks_anthropic(request: Request) -> bool:
    """A client of Anthropic's API: it sends `anthropic-version` (no OpenAI client does), or
    authenticates with `x-api-key` alone."""
    h = request.headers
    return "anthropic-version" in h or ("x-api-key" in h and "authorization" not in h)


def client_error(request: Request, err: FlowcError) -> Response:
    """``err`` in the shape of the client asking (see `speaks_anthropic`)."""
    path = "/v1/messages" if speaks_anthropic(request) else request.url.path
    return Response(error_body(path, err.status, err.code or err.type, err.message),
                    status_code=err.status, media_type="application/json")


Visible = Callable[[Model], bool]


def visible_to(key: Any) -> Visible | None:
    """A virtual key's `models:` patterns as a filter on the list (None: all), matched
    against a name as listed and as provider/name, as admission matches its targets."""
    if key is None or not key.models:
        return None
    return lambda m: key.allows_model(m.id) or key.allows_model(f"{m.provider}/{m.id}")


async def list_models(catalog: ModelCatalog, request: Request,
                      visible: Visible | None = None) -> Response:
    await catalog.refresh()
    models = catalog.models()
    if visible is not None:
        models = [m for m in models if visible(m)]
    if not speaks_anthropic(request):
        return _json({"object": "list", "data": [m.openai() for m in models]})
    q = request.query_params
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        return client_error(request, RequestError(
            "limit: Input should be an integer from 1 to 1000", param="limit"))
    ids = [m.id for m in models]
    start, end = 0, len(models)
    if q.get("after_id") is not None:
        start = ids.index(q["after_id"]) + 1 if q["after_id"] in ids else end
    elif q.get("before_id") is not None:
        end = ids.index(q["before_id"]) if q["before_id"] in ids else 0
    page = models[start:end]
    page = page[-limit:] if q.get("before_id") is not None else page[:limit]
    more = len(page) < end - start
    return _json({"data": [m.anthropic() for m in page], "has_more": more,
                  "first_id": page[0].id if page else None,
                  "last_id": page[-1].id if page else None})


async def retrieve_model(catalog: ModelCatalog, request: Request, model_id: str,
                         visible: Visible | None = None) -> Response:
    await catalog.refresh()
    try:
        model = catalog.find(model_id)
    except FlowcError as err:
        return client_error(request, err)
    if model is None or (visible is not None and not visible(model)):
        return client_error(request, RequestError(
            f"The model '{model_id}' does not exist or you do not have access to it. "
            "GET /v1/models lists the models served here.", param="model", status=404,
            code="model_not_found"))
    anthropic = speaks_anthropic(request)
    return _json(model.anthropic() if anthropic else model.openai())


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")
