"""The Vercel AI SDK (`ai` with `@ai-sdk/openai` and `@ai-sdk/anthropic`) against flowc:
a tool round trip plain and streamed, and a structured answer (`generateObject`)."""

from __future__ import annotations

import json

import pytest

from tests.clients.conftest import HERE, NODE24, Clients
from tests.clients.upstream import Turn

PARIS = {"name": "Paris", "population": 2102650}
# case -> (the AI SDK provider in ai_sdk.mjs, model, the upstream flowc sends it to)
PROVIDERS = {"openai": ("openai", "gpt-4o-mini", "openai"),
             "openai-chat": ("openai-chat", "gpt-4o-mini", "openai"),
             "openai-chat-ollama": ("openai-chat", "local", "ollama"),
             "anthropic": ("anthropic", "claude-sonnet-4-6", "anthropic")}


def ai_sdk(clients: Clients, case: str, mode: str) -> dict:
    provider, model, _ = PROVIDERS[case]
    out = clients.run([str(NODE24 / "node"), str(HERE / "ai_sdk.mjs"), provider, mode,
                       clients.url + "/v1", model], env=clients.env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_ledger(clients: Clients, case: str) -> None:
    _, model, upstream = PROVIDERS[case]
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {(model, upstream)}


@pytest.mark.parametrize("mode", ["tools", "stream"])
@pytest.mark.parametrize("case", list(PROVIDERS))
def test_ai_sdk_tool_round_trip(clients: Clients, case: str, mode: str) -> None:
    clients.play(Turn(tool="lookup", arguments={"city": "Paris"},
                      answer="Paris has about 2.1 million people."))
    out = ai_sdk(clients, case, mode)
    assert out["text"].strip() == "Paris has about 2.1 million people."
    assert out["steps"] == 2  # the tool call, then the answer
    assert any("flowc-census" in t for t in clients.tool_results())
    assert {r.body.get("stream", False) for _, r in clients.requests()} == {mode == "stream"}
    check_ledger(clients, case)


@pytest.mark.parametrize("case", list(PROVIDERS))
def test_ai_sdk_generate_object(clients: Clients, case: str) -> None:
    clients.play(Turn(answer=json.dumps(PARIS), final_tool="json", final_arguments=PARIS))
    assert ai_sdk(clients, case, "object") == {"object": PARIS}
    check_ledger(clients, case)
