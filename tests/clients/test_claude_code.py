"""Claude Code (`claude -p`) with ANTHROPIC_BASE_URL at flowc, as a user sets it up."""

from __future__ import annotations

import pytest

from tests.clients.conftest import BIN, Clients
from tests.clients.upstream import SIGNATURE, Turn


def claude(clients: Clients, prompt: str, model: str) -> str:
    env = clients.env(ANTHROPIC_BASE_URL=clients.url, ANTHROPIC_API_KEY="sk-ant-client",
                      DISABLE_TELEMETRY="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    return clients.run([str(BIN / "claude"), "-p", prompt, "--model", model], env=env).stdout


def test_claude_code_reads_a_file_through_flowc(clients: Clients) -> None:
    note = clients.work / "notes.txt"
    note.write_text("the secret word is plover\n")
    clients.play(Turn(tool="Read", arguments={"file_path": str(note)},
                      answer="The note says the secret word is plover.",
                      thinking="The user wants the note; I will read it."))
    out = claude(clients, "What does notes.txt say?", "claude-sonnet-4-6")
    assert "secret word is plover" in out
    assert any("the secret word is plover" in t for t in clients.tool_results())
    first, *later = clients.calls("anthropic")
    assert first.path == "/v1/messages" and first.body["stream"] is True
    assert "Read" in [t["name"] for t in first.body["tools"]]
    # the thinking block came back with its signature, as Anthropic requires
    assert any(b.get("type") == "thinking" and b.get("signature") == SIGNATURE
               for r in later for m in r.body["messages"] if m["role"] == "assistant"
               for b in m["content"] if isinstance(b, dict))
    rows = clients.ledger()
    assert {r["model"] for r in rows} == {"claude-sonnet-4-6"}
    assert all(r["stream"] and r["completion_tokens"] for r in rows)


@pytest.mark.parametrize(("model", "provider", "path"), [
    ("gpt-4o-mini", "openai", "/v1/chat/completions"),
    ("local", "ollama", "/api/chat"),  # an alias of ollama/qwen2.5:7b
])
def test_claude_code_on_another_providers_model(clients: Clients, model: str, provider: str,
                                                path: str) -> None:
    """flowc translates the Messages API to the model's provider."""
    note = clients.work / "notes.txt"
    note.write_text("the secret word is plover\n")
    clients.play(Turn(tool="Read", arguments={"file_path": str(note)},
                      answer="The note says the secret word is plover."))
    out = claude(clients, "What does notes.txt say?", model)
    assert "secret word is plover" in out
    assert any("the secret word is plover" in t for t in clients.tool_results())
    assert {r.path for r in clients.calls(provider)} == {path}
    rows = clients.ledger()
    assert {(r["model"], r["provider"]) for r in rows} == {(model, provider)}
