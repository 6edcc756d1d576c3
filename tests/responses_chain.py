"""A chain of Responses API calls, each follow-up naming the one before by
`previous_response_id`, each sent on a fresh connection, translated to a loopback Anthropic
(so flowc's own store answers the follow-ups); used by the workers' and instances' tests."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.fakes import FakeServer, anthropic_text

# The project both tests serve: a model on Anthropic, no retries (a failure shows at once).
CONFIG = """\
models:
  smart: anthropic/claude-sonnet-4-6
providers:
  anthropic: {timeout: 5}
retry:
  attempts: 1
ledger:
  flush_interval: 0.2
"""


def texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) of each message Anthropic was sent (stripped: the loopback's stream
    sends each word with a space after it)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content)
        out.append((m["role"], content.strip()))
    return out


def respond(base: str, turn: int, previous: str | None, stream: bool
            ) -> tuple[int, str, str, httpx.Headers]:
    """One call on a fresh connection: its status, the response's id (or the error's
    body), the answering process's header and all headers."""
    body: dict[str, Any] = {"model": "smart", "input": f"turn {turn}", "stream": stream}
    if previous is not None:
        body["previous_response_id"] = previous
    with httpx.Client(timeout=30) as client:
        r = client.post(base + "/v1/responses", json=body)
    if r.status_code != 200:
        return r.status_code, r.text, "", r.headers
    if not stream:
        return 200, r.json()["id"], r.headers.get("x-flowc-worker", ""), r.headers
    completed = [json.loads(line[6:]) for line in r.text.splitlines()
                 if line.startswith("data: ") and '"response.completed"' in line]
    assert completed, r.text
    return 200, completed[0]["response"]["id"], r.headers.get("x-flowc-worker", ""), r.headers


def turn(upstream: FakeServer, base: str, i: int, previous: str | None,
         stream: bool = False) -> tuple[str, str]:
    """Turn ``i`` of the chain (the upstream answers `answer i`), checked: answered, and
    what reached Anthropic is every earlier turn, question and answer, then this one's.
    The response's id and the process that answered."""
    upstream.then(anthropic_text(f"answer {i}"))
    status, rid, who, _ = respond(base, i, previous, stream)
    assert status == 200, f"turn {i}: {status} {rid}"
    expected = [pair for k in range(i) for pair in
                (("user", f"turn {k}"), ("assistant", f"answer {k}"))] + [("user", f"turn {i}")]
    sent = texts(upstream.requests[-1].body["messages"])
    assert sent == expected, f"turn {i}: {sent}"
    return rid, who
