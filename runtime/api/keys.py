"""`/v1/keys`: the admin's API for virtual keys, and `GET /v1/keys/self` for a key's own
settings and spend. A key's secret is answered once, by the POST that makes it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from runtime.access.gate import KEY_ATTEMPTS, Gate
from runtime.access.keys import Key, KeyChanged, KeySpecError
from runtime.api.auth import Admin, Caller
from runtime.api.common import current, json_response, ledger_unavailable
from runtime.ledger.store import LedgerUnavailable
from runtime.providers import RequestError

router = APIRouter()


def _shown(gate: Gate, key: Key) -> dict[str, Any]:
    return {**key.public(), "spend": gate.budget_status(key)}


async def _spec(request: Request) -> dict[str, Any]:
    try:
        spec = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(spec, dict):
        raise RequestError("the request body must be a JSON object of key settings")
    return spec


def _key(gate: Gate, key_id: str) -> Key:
    try:
        return gate.get(key_id)
    except KeyError:
        raise RequestError(f"no key '{key_id}'", status=404, code="key_not_found") from None


async def _write(gate: Gate, change: Callable[[], Key]) -> Key:
    """A change to the keys: worked out and put live on the event loop (where requests read
    the keys and counters); saved, and a new budget's spend so far read, in between off it
    (the store is the ledger, in its own process: a query may wait on its writer). One
    change at a time: each is worked out from the key as the one before left it, so two
    changes to a key sent at once both take effect. Other processes (workers, instances
    on one Postgres) change keys too: the store refuses a change made from a key it no
    longer has (KeyChanged), and it is worked out again from the key as it is now."""
    async with gate.changing:
        for _ in range(KEY_ATTEMPTS):
            try:
                key = change()
            except KeySpecError as exc:  # "budget: ..." names the setting
                setting = str(exc).partition(":")[0]
                raise RequestError(str(exc), param=setting if setting.isidentifier() else None,
                                   code="invalid_key_setting") from None
            base = gate.keys.get(key.id)

            def save(key: Key = key, base: Key | None = base) -> dict[Any, Any]:
                gate.store.save_key(key, base)
                return gate.reads(key)

            try:
                reads = await asyncio.to_thread(save)
            except KeyChanged:  # (`Gate.refresh`, its wait on the store off the loop)
                found, reads = await asyncio.to_thread(gate.fresh, key.id)
                if found is not None:
                    gate.put(found, reads)
                continue
            except LedgerUnavailable as exc:
                raise ledger_unavailable(exc) from None
            gate.put(key, reads)
            return key
    raise RequestError("the key kept being changed by other requests while this change was "
                       "saved: send it again", status=409, code="key_changed")


@router.post("/v1/keys")
async def create(request: Request, _: Admin) -> Response:
    gate, spec = current(request).gate, await _spec(request)
    made: list[str] = []

    def create_key() -> Key:
        key, secret = gate.created(spec)
        made.append(secret)
        return key

    key = await _write(gate, create_key)
    secret = made[0]
    return json_response({"key": secret, **key.public()}, status=201)


@router.get("/v1/keys")
async def listed(request: Request, _: Admin, team: str | None = None) -> Response:
    gate = current(request).gate
    return json_response({"keys": [_shown(gate, k) for k in list(gate.keys.values())
                                   if team is None or k.team == team]})


@router.get("/v1/keys/self")
async def own(request: Request, a: Caller) -> Response:
    key = a.who.key
    if key is None:
        who = ("the admin key is" if a.who.kind == "admin" else
               "no flowc key was sent, so this caller is")
        raise RequestError(f"{who} not a virtual key: GET /v1/keys/self answers for a key "
                           "made with `flowc keys create`", code="not_a_virtual_key")
    return json_response(_shown(current(request).gate, key))


@router.get("/v1/keys/{key_id}")
async def show(key_id: str, request: Request, _: Admin) -> Response:
    gate = current(request).gate
    return json_response(_shown(gate, _key(gate, key_id)))


@router.patch("/v1/keys/{key_id}")
async def update(key_id: str, request: Request, _: Admin) -> Response:
    gate = current(request).gate
    _key(gate, key_id)
    spec = await _spec(request)
    return json_response(_shown(gate, await _write(gate, lambda: gate.updated(key_id, spec))))


@router.delete("/v1/keys/{key_id}")
async def revoke(key_id: str, request: Request, _: Admin) -> Response:
    gate = current(request).gate
    _key(gate, key_id)
    return json_response(_shown(gate, await _write(gate, lambda: gate.revoked(key_id))))
