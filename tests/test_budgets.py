"""Budgets that hold: a real `flowc serve` with auth on, virtual keys, loopback providers that
answer with realistic usage, clients over HTTP (and the official SDKs)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from flowc.cost import usd
from runtime.ledger.pricing import price
from runtime.providers.base import Usage
from tests.fakes import Action, Recorded, anthropic_text, free_port, openai_text, slow, wait_until
from tests.keyed import ADMIN, Keyed, close, keyed

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
  flat: openai/flat-model
  tiny: openai/tiny-model
prices:
  openai/flat-model: {input: 0, output: 10}
  openai/tiny-model: {input: 0, output: 0.1}
budgets:
  teams:
    finance: {usd: 0.03}
  tags:
    "project=apollo": {usd: 0.03}
  pipelines:
    digest: {usd: 0.03}
ledger:
  flush_interval: 0.1
"""
PROMPT = "Summarise this report. " + "x" * 2000  # ~2 kB: a realistic prompt bound
IN_TOKENS, OUT_TOKENS = 520, 1000  # what the provider says it used (max_tokens = 1000)
SONNET = price("anthropic", "claude-sonnet-4-6", Usage(prompt_tokens=IN_TOKENS,
                                                      completion_tokens=OUT_TOKENS))[0]
assert SONNET is not None
BUDGET = SONNET * 20  # covers 20 calls at what they really cost


def claude(delay: float = 0.05) -> Action:
    return slow(delay, anthropic_text("Done.", input_tokens=IN_TOKENS,
                                      output_tokens=OUT_TOKENS))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("budgets"), CONFIG)
    k.keys({"name": "crowd", "budget_usd": str(BUDGET), "period": "month"},
           {"name": "cutter", "budget_usd": "1", "period": "day"},
           {"name": "payer", "team": "finance"}, {"name": "colleague", "team": "finance"},
           {"name": "apollo", "tags": ["project=apollo"]},
           {"name": "capped", "budget_usd": "5"},
           {"name": "sdk", "budget_usd": str(SONNET * 2)}, {"name": "runner"},
           {"name": "tiny", "budget_usd": "0.000001"})
    k.start()
    yield k
    out = close_and_log(k)
    for secret in k.secrets.values():
        assert secret not in out


@pytest.fixture(autouse=True)
def _fresh_script(request: pytest.FixtureRequest) -> None:
    """Each test scripts its own upstream answers (a refused call leaves its answer unused)."""
    if "srv" in request.fixturenames:
        srv = request.getfixturevalue("srv")
        srv.openai.script.clear()
        srv.anthropic.script.clear()


def close_and_log(k: Keyed) -> str:
    out = k.stop() if k.proc is not None else k.output
    close(k)
    return out


def chat(stream: bool, model: str = "smart", max_tokens: int = OUT_TOKENS) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def messages(stream: bool, max_tokens: int = OUT_TOKENS) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    return body


def left_in(message: str) -> Decimal:
    found = re.search(r"\$([0-9.]+) left", message)
    assert found, message
    return Decimal(found.group(1))


# -- concurrency ---------------------------------------------------------------------------------
def test_300_concurrent_calls_never_spend_past_the_budget(srv):
    srv.anthropic.then(*[claude() for _ in range(300)])
    headers = srv.auth("crowd")

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, bool, bytes]:
        stream, kind = bool(i % 2), ("chat", "messages")[(i // 2) % 2]
        path = "/v1/chat/completions" if kind == "chat" else "/v1/messages"
        body = chat(stream) if kind == "chat" else messages(stream)
        h = headers if kind == "chat" else {"x-api-key": srv.secrets["crowd"],
                                            "anthropic-version": "2023-06-01"}
        async with client.stream("POST", srv.url + path, json=body, headers=h) as r:
            return r.status_code, kind, stream, await r.aread()

    async def crowd() -> list[tuple[int, str, bool, bytes]]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(300)))

    results = asyncio.run(crowd())
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(served) + len(refused) == 300, {r[0] for r in results}
    # Reserved at their worst case (a 2 kB prompt at the dearest input rate, and all of
    # max_tokens), 20 calls' real cost lets at least 11 through.
    assert 11 <= len(served) <= 20, len(served)
    for _, kind, _, raw in refused:
        body = json.loads(raw)
        if kind == "chat":
            err = body["error"]
            assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
        else:
            assert body["type"] == "error"
            err = body["error"]
            assert err["type"] == "rate_limit_error"
        assert (f"budget exceeded for key 'crowd': limit {usd(BUDGET)} per month, $"
                in err["message"]), err
        assert 0 <= left_in(err["message"]) < BUDGET
    for _, kind, stream, raw in served:  # every answer whole
        end = {(False, "chat"): b'"Done."', (True, "chat"): b"data: [DONE]",
               (False, "messages"): b'"Done."', (True, "messages"): b"message_stop"}
        assert end[stream, kind] in raw, raw
    assert {(r[1], r[2]) for r in served} == {(k, s) for k in ("chat", "messages")
                                              for s in (True, False)}
    rows = srv.rows("crowd", 300)
    statuses = [r[0] for r in rows]
    assert statuses.count("ok") == len(served) and statuses.count("refused") == len(refused)
    spent = sum(Decimal(r[1]) for r in rows if r[0] == "ok")
    assert spent == SONNET * len(served) and spent <= BUDGET
    assert all(r[1] is None for r in rows if r[0] == "refused")
    assert {r[3] for r in rows if r[0] == "ok"} == {True, False}


def _hold_open(rec: Recorded) -> Any:
    """An Anthropic stream that sends its start and one word, then keeps the client waiting."""
    async def write(resp: web.StreamResponse, _req: web.Request) -> None:
        async def ev(name: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await ev("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-6", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": IN_TOKENS, "output_tokens": 1}}})
        await ev("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})
        await ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta",
                                                   "text": "The report says " * 20}})
        await asyncio.sleep(30)
    return write


def test_a_stream_the_client_cuts_off_still_settles_and_counts(srv):
    srv.anthropic.then(_hold_open)
    h = {"x-api-key": srv.secrets["cutter"], "anthropic-version": "2023-06-01"}
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", srv.url + "/v1/messages", json=messages(True), headers=h) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            if "text_delta" in chunk:
                break  # the client goes away mid-answer
    wait_until(lambda: any(row[0] == "cancelled" for row in srv.rows_now("cutter")), 15)
    [(status, cost, _, stream)] = srv.rows_now("cutter")
    assert status == "cancelled" and stream and cost is not None
    cost = Decimal(cost)
    assert cost >= price("anthropic", "claude-sonnet-4-6", Usage(prompt_tokens=IN_TOKENS))[0]
    # The budget counts it: what is left is the limit less the cut stream's cost.
    r = httpx.post(srv.url + "/v1/messages", json=messages(False, max_tokens=200_000),
                   headers=h, timeout=30)
    assert r.status_code == 429, r.text
    assert left_in(r.json()["error"]["message"]) == (Decimal(1) - cost).quantize(
        Decimal("0.000001")).normalize()


# -- team, tag and unpriced ----------------------------------------------------------------------
def test_a_team_budget_holds_across_its_keys(srv):
    srv.anthropic.then(claude(0))
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(False), timeout=30,
                   headers=srv.auth("payer"))
    assert r.status_code == 200, r.text
    # The colleague's key has no budget of its own; the team's $0.03 has $0.0134 left.
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(False), timeout=30,
                   headers=srv.auth("colleague"))
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_quota"
    assert "budget exceeded for team 'finance': limit $0.03 per month" in err["message"]
    assert left_in(err["message"]) == Decimal("0.03") - SONNET
    assert [row[0] for row in srv.rows("colleague", 1)] == ["refused"]


def test_a_tag_budget_holds_for_keys_and_requests_that_carry_the_tag(srv):
    srv.anthropic.then(claude(0))
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(False), timeout=30,
                   headers=srv.auth("apollo"))
    assert r.status_code == 200, r.text
    # Another key, tagged by the request itself.
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(False), timeout=30,
                   headers={**srv.auth("capped"), "x-flowc-tags": "project=apollo"})
    assert r.status_code == 429, r.text
    assert "budget exceeded for tag 'project=apollo'" in r.json()["error"]["message"]


DIGEST = f"""\
name: digest
steps:
  - {{id: sum, type: llm, model: smart, max_tokens: {OUT_TOKENS}, prompt: "{PROMPT[:300]}"}}
output: ${{sum}}
"""


def test_a_pipeline_budget_holds_across_its_runs(srv):
    r = httpx.put(srv.url + "/v1/workflows/digest", json={"yaml": DIGEST}, timeout=30,
                  headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    srv.anthropic.then(claude(0), claude(0))
    sent = len(srv.anthropic.requests)
    r = httpx.post(srv.url + "/v1/workflow/digest", json={}, headers=srv.auth("runner"),
                   timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    # $0.03 less the first run's $0.01656 cannot hold the second's worst case.
    r = httpx.post(srv.url + "/v1/workflow/digest", json={}, headers=srv.auth("runner"),
                   timeout=60)
    run = r.json()
    assert run["status"] == "failed", run
    assert "budget exceeded for pipeline 'digest': limit $0.03 per month" in json.dumps(run)
    assert len(srv.anthropic.requests) == sent + 1  # the second run's call never went out
    rows = srv.rows("runner", 2)
    assert [(row[0], row[1] is not None) for row in rows] == [("ok", True),
                                                               ("refused", False)]


def test_a_budgeted_key_refuses_an_unpriced_model_unless_flowc_yaml_prices_it(srv):
    body = {"model": "openai/my-finetune", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.auth("capped"),
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_unpriced"
    assert "openai/my-finetune" in err["message"] and "prices:" in err["message"]
    before = len(srv.openai.requests)
    srv.openai.then(openai_text("ok", prompt_tokens=5, completion_tokens=10))
    r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "flat"},
                   headers=srv.auth("capped"), timeout=30)
    assert r.status_code == 200, r.text
    assert len(srv.openai.requests) == before + 1  # the unpriced call never went out


# -- the official SDKs ---------------------------------------------------------------------------
def test_the_sdks_call_with_a_flowc_key_and_see_the_budget_as_a_quota_error(srv):
    srv.anthropic.then(claude(0), claude(0))
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.secrets["sdk"], max_retries=0)
    done = oai.chat.completions.create(model="smart", max_tokens=OUT_TOKENS,
                                       messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "Done."
    claude_sdk = anthropic.Anthropic(base_url=srv.url, api_key=srv.secrets["sdk"],
                                     max_retries=0)
    msg = claude_sdk.messages.create(model="claude-sonnet-4-6", max_tokens=OUT_TOKENS,
                                     messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Done."  # type: ignore[union-attr]
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(model="smart", max_tokens=OUT_TOKENS,
                                    messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "insufficient_quota"
    assert "budget exceeded for key 'sdk'" in err.value.message
    with pytest.raises(anthropic.RateLimitError) as aerr:
        claude_sdk.messages.create(model="claude-sonnet-4-6", max_tokens=OUT_TOKENS,
                                   messages=[{"role": "user", "content": "hi"}])
    assert "budget exceeded for key 'sdk'" in aerr.value.message


# -- amounts as text -----------------------------------------------------------------------------
def test_a_tenth_of_a_millionth_spent_reads_as_plain_decimals_everywhere(srv):
    """str() of such a Decimal is `1.00E-7`: the key's spend, the cost reports and the CSV
    export must say 0.0000001, as a client parsing decimals expects."""
    srv.openai.then(openai_text("ok", prompt_tokens=5, completion_tokens=1))
    r = httpx.post(srv.url + "/v1/chat/completions", headers=srv.auth("tiny"), timeout=30,
                   json={"model": "tiny", "max_tokens": 1,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-flowc-cost-usd"] == "0.0000001"
    admin = {"authorization": f"Bearer {ADMIN}"}
    key_id = srv.ids["tiny"]
    spend = httpx.get(f"{srv.url}/v1/keys/{key_id}", headers=admin).json()["spend"]["key"]
    assert (spend["limit_usd"], spend["spent_usd"], spend["reserved_usd"],
            spend["left_usd"]) == ("0.000001", "0.0000001", "0", "0.0000009")
    assert httpx.get(f"{srv.url}/v1/keys/self", headers=srv.auth("tiny")).json()[
        "spend"]["key"]["spent_usd"] == "0.0000001"
    srv.rows("tiny", 1)
    summary = httpx.get(f"{srv.url}/v1/costs/summary", params={"key": key_id, "by": "key"},
                        headers=admin).json()
    assert summary["rows"][0]["cost_usd"] == summary["totals"]["cost_usd"] == "0.0000001"
    csv = httpx.get(f"{srv.url}/v1/costs/export.csv", params={"key": key_id},
                    headers=admin).text.splitlines()
    column = csv[0].split(",").index("cost_usd")
    assert csv[1].split(",")[column] == "0.0000001", csv
    assert "E-" not in " ".join(csv)


# -- restart -------------------------------------------------------------------------------------
def test_spend_in_the_period_survives_a_restart_and_still_blocks(tmp_path):
    k = keyed(tmp_path, CONFIG)
    try:
        k.keys({"name": "night", "budget_usd": "0.05", "period": "day"})
        k.start()
        k.anthropic.then(*[claude(0) for _ in range(3)])
        for _ in range(2):
            r = httpx.post(k.url + "/v1/chat/completions", json=chat(False),
                           headers=k.auth("night"), timeout=30)
            assert r.status_code == 200, r.text
        r = httpx.post(k.url + "/v1/chat/completions", json=chat(False),
                       headers=k.auth("night"), timeout=30)
        assert r.status_code == 429
        left = Decimal("0.05") - 2 * SONNET
        assert left_in(r.json()["error"]["message"]) == left
        k.rows("night", 3)
        k.stop()
        k.start()
        r = httpx.post(k.url + "/v1/chat/completions", json=chat(False),
                       headers=k.auth("night"), timeout=30)
        assert r.status_code == 429, r.text
        assert left_in(r.json()["error"]["message"]) == left  # summed from the ledger
        # What is left is still usable: a smaller call fits.
        r = httpx.post(k.url + "/v1/chat/completions", json=chat(False, max_tokens=100),
                       headers=k.auth("night"), timeout=30)
        assert r.status_code == 200, r.text
        assert k.spent("night") <= Decimal("0.05")
    finally:
        close_and_log(k)


# -- soft alerts ---------------------------------------------------------------------------------
class Receiver:
    """A loopback webhook that keeps what it is sent."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def hook(request: web.Request) -> web.Response:
            self.got.append(await request.json())
            return web.Response(status=204)

        def run() -> None:
            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app)
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def test_crossing_50_80_and_100_percent_alerts_by_log_row_and_webhook(tmp_path):
    hook = Receiver()
    # flat-model costs exactly what it reserves: $10 per 1M output tokens, input free.
    k = keyed(tmp_path, CONFIG + f"alerts:\n  webhook: {hook.url}\n")
    try:
        k.keys({"name": "watched", "budget_usd": "0.03"})
        k.start()
        k.openai.then(*[openai_text("ok", prompt_tokens=5, completion_tokens=1000)
                        for _ in range(3)])
        for n in range(3):
            r = httpx.post(k.url + "/v1/chat/completions", json=chat(False, model="flat"),
                           headers=k.auth("watched"), timeout=30)
            assert r.status_code == 200, (n, r.text)
        wait_until(lambda: len(hook.got) >= 3, 15)
        key_id = k.ids["watched"]
        assert sorted(h["threshold_percent"] for h in hook.got) == [50, 80, 100]
        for h in hook.got:
            assert h["type"] == "budget_threshold" and h["scope"] == "key"
            assert h["name"] == key_id and h["limit_usd"] == "0.03"
            assert h["period"] == "month" and h["period_start"]
        assert {h["threshold_percent"]: Decimal(h["spent_usd"]) for h in hook.got} == {
            50: Decimal("0.02"), 80: Decimal("0.03"), 100: Decimal("0.03")}
        rows = k.sql("SELECT threshold, scope_kind, scope_name FROM alerts ORDER BY threshold")
        assert rows == [[t, "key", key_id] for t in (50, 80, 100)]
        r = httpx.post(k.url + "/v1/chat/completions", json=chat(False, model="flat"),
                       headers=k.auth("watched"), timeout=30)
        assert r.status_code == 429
        out = k.stop()
        for spent, t in (("0.02", 50), ("0.03", 80), ("0.03", 100)):
            assert (f"budget alert: key 'watched' has spent ${spent} of its $0.03 month "
                    f"budget ({t}%)") in out, out
        assert k.secrets["watched"] not in out
    finally:
        close_and_log(k)
