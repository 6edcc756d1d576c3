"""OpenClaw (`openclaw agent exec`) with custom providers at flowc, both provider kinds."""

from __future__ import annotations

import json

import pytest

from tests.clients.conftest import BIN, Clients
from tests.clients.upstream import Turn

# provider kind -> (flowc base URL suffix, model, the upstream that serves the model)
KINDS = {
    "openai-completions": ("/v1", "gpt-4o-mini", "openai"),
    "anthropic-messages": ("", "claude-sonnet-4-6", "anthropic"),
    "openai-responses": ("/v1", "gpt-4o-mini", "openai"),
}


def openclaw(clients: Clients, prompt: str, api: str) -> str:
    suffix, model, _ = KINDS[api]
    config = clients.home / "openclaw.json"
    config.write_text(json.dumps({"models": {"mode": "replace", "providers": {"flowc": {
        "baseUrl": clients.url + suffix, "apiKey": "sk-client", "api": api,
        "models": [{"id": model, "name": model, "reasoning": False, "input": ["text"],
                    "contextWindow": 128000, "maxTokens": 4096}]}}}}))
    return clients.run([str(BIN / "openclaw"), "agent", "exec", "--config", str(config),
                        "--model", f"flowc/{model}", prompt], env=clients.env(),
                       timeout=180).stdout


def run_openclaw(clients: Clients, api: str) -> None:
    (clients.work / "notes.txt").write_text("the secret word is plover\n")
    clients.play(Turn(tool="read", arguments={"path": "notes.txt"},
                      answer="The note says the secret word is plover."))
    out = openclaw(clients, "What does notes.txt say?", api)
    assert "secret word is plover" in out
    assert any("the secret word is plover" in t for t in clients.tool_results())
    _, model, upstream = KINDS[api]
    rows = clients.ledger()
    assert {(r["model"], r["provider"]) for r in rows} == {(model, upstream)}
    assert all(r["stream"] for r in rows)


@pytest.mark.parametrize("api", list(KINDS))
def test_openclaw_reads_a_file_through_flowc(clients: Clients, api: str) -> None:
    run_openclaw(clients, api)
