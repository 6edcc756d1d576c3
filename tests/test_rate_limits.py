"""Rate limits per key and per team over HTTP: exactly the limit served in any minute, the
rest a 429 with Retry-After and OpenAI's `x-ratelimit-*` headers (on every response)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.keyed import Keyed, close, keyed

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
budgets:
  teams:
    ops: {rpm: 2}
ledger:
  flush_interval: 0.1
"""
CHAT = {"model": "fast", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
DURATION = re.compile(r"(\d+m)?\d+(\.\d+)?s|\d+ms")  # OpenAI's reset format: 6m0s, 1.5s, 120ms


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("limits"), CONFIG)
    k.keys({"name": "burst", "rpm": 100}, {"name": "three", "rpm": 3},
           {"name": "tokens", "tpm": 60}, {"name": "both", "rpm": 10, "tpm": 1000},
           {"name": "ops-a", "team": "ops"}, {"name": "ops-b", "team": "ops"},
           {"name": "plain"})
    k.start()
    yield k
    out = k.stop()
    close(k)
    for secret in k.secrets.values():
        assert secret not in out


def post(srv: Keyed, key: str, **extra: object) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json={**CHAT, **extra},
                      headers=srv.auth(key), timeout=30)


def limits(r: httpx.Response, kind: str = "requests") -> tuple[int, int, str]:
    h = r.headers
    reset = h[f"x-ratelimit-reset-{kind}"]
    assert DURATION.fullmatch(reset), reset
    return (int(h[f"x-ratelimit-limit-{kind}"]), int(h[f"x-ratelimit-remaining-{kind}"]),
            reset)


def seconds(duration: str) -> float:
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    m, _, s = duration[:-1].rpartition("m")
    return int(m or 0) * 60 + float(s)


def test_a_burst_of_1000_on_a_100_rpm_key_serves_exactly_100(srv):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
                max_connections=100)) as client:
            return await asyncio.gather(*(
                client.post(srv.url + "/v1/chat/completions", json=CHAT,
                            headers=srv.auth("burst")) for _ in range(1000)))

    results = asyncio.run(burst())
    served = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(served) == 100 and len(refused) == 900, {r.status_code for r in results}
    for r in served:
        limit, remaining, reset = limits(r)
        assert limit == 100 and 0 <= remaining < 100 and 0 < seconds(reset) <= 60
    assert min(limits(r)[1] for r in served) == 0
    for r in refused:
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        assert "100 requests per minute" in err["message"]
        limit, remaining, reset = limits(r)
        assert (limit, remaining) == (100, 0)
        # Retry-After is the reset in whole seconds, rounded up (read a moment earlier).
        assert 0 < seconds(reset) <= 60
        assert 0 <= int(r.headers["retry-after"]) - seconds(reset) <= 1.01
    assert len(srv.openai.requests) >= 100
    rows = srv.rows("burst", 1000, timeout=30)
    assert [r[0] for r in rows].count("ok") == 100
    assert [r[0] for r in rows].count("refused") == 900


def test_headers_count_down_on_every_response_plain_and_streamed(srv):
    got = [limits(post(srv, "three")) for _ in range(2)]
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers=srv.auth("three"), timeout=30) as r:
        assert r.status_code == 200
        got.append(limits(r))
        r.read()
    assert [(g[0], g[1]) for g in got] == [(3, 2), (3, 1), (3, 0)]
    assert all(55 < seconds(g[2]) <= 60 for g in got)
    r = post(srv, "three")
    assert r.status_code == 429
    assert limits(r)[:2] == (3, 0)
    assert 55 < int(r.headers["retry-after"]) <= 60
    # The Anthropic dialect on /v1/messages, same limit and headers.
    r = httpx.post(srv.url + "/v1/messages", json={
        "model": "claude-sonnet-4-6", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": srv.secrets["three"], "anthropic-version": "2023-06-01"},
        timeout=30)
    assert r.status_code == 429, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    assert limits(r)[:2] == (3, 0) and "retry-after" in r.headers


def test_a_tokens_per_minute_limit_has_its_own_headers(srv):
    # Each call uses 29 tokens (19 in, 10 out); the limit is 60.
    remaining = []
    for _ in range(3):
        r = post(srv, "tokens")
        assert r.status_code == 200, r.text
        limit, left, _ = limits(r, "tokens")
        assert limit == 60
        remaining.append(left)
        assert "x-ratelimit-limit-requests" not in r.headers  # no rpm on this key
    assert remaining == [31, 2, 0]
    r = post(srv, "tokens")
    assert r.status_code == 429
    assert "60 tokens per minute" in r.json()["error"]["message"]
    assert limits(r, "tokens")[:2] == (60, 0) and int(r.headers["retry-after"]) >= 55


def test_a_key_with_both_limits_sends_both_trios(srv):
    r = post(srv, "both")
    assert r.status_code == 200
    assert limits(r)[:2] == (10, 9) and limits(r, "tokens")[:2] == (1000, 971)


def test_a_team_rate_limit_is_shared_by_its_keys(srv):
    assert post(srv, "ops-a").status_code == 200
    assert post(srv, "ops-b").status_code == 200
    r = post(srv, "ops-a")
    assert r.status_code == 429
    assert "team 'ops': 2 requests per minute" in r.json()["error"]["message"]
    assert post(srv, "ops-b").status_code == 429
    assert "x-ratelimit-limit-requests" not in r.headers  # the key itself has no limit
    assert post(srv, "plain").status_code == 200  # other keys are not held back
