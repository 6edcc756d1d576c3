"""Codex CLI (`codex exec`) with a custom provider at flowc, `wire_api = "responses"`."""

from __future__ import annotations

import pytest

from tests.clients.conftest import BIN, Clients
from tests.clients.upstream import Turn
from tests.fakes_responses import ENCRYPTED


def codex(clients: Clients, prompt: str, model: str, base_url: str) -> str:
    home = clients.home / "codex"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "flowc"\n'
        "[model_providers.flowc]\n"
        'name = "flowc"\n'
        f'base_url = "{base_url}/v1"\n'
        'env_key = "FLOWC_KEY"\n'
        'wire_api = "responses"\n')
    env = clients.env(CODEX_HOME=str(home), FLOWC_KEY="sk-client")
    return clients.run([str(BIN / "codex"), "exec", "--skip-git-repo-check", prompt],
                       env=env).stdout


def run_codex(clients: Clients, model: str) -> str:
    (clients.work / "notes.txt").write_text("the secret word is plover\n")
    clients.play(Turn(tool="exec_command", arguments={"cmd": "cat notes.txt"},
                      answer="The note says the secret word is plover."))
    out = codex(clients, "What does notes.txt say?", model, clients.url)
    assert "secret word is plover" in out
    assert any("the secret word is plover" in t for t in clients.tool_results())
    return out


def test_codex_runs_a_command_through_flowc(clients: Clients) -> None:
    """Same wire: the Responses API to OpenAI, reasoning items (store: false, encrypted
    content) handed back to the model on the next turn."""
    run_codex(clients, "gpt-4o-mini")
    first, *later = clients.calls("openai")
    assert first.path == "/v1/responses" and first.body["stream"] is True
    assert any(i.get("type") == "reasoning" and i.get("encrypted_content") == ENCRYPTED
               for r in later for i in r.body["input"])
    assert {r["model"] for r in clients.ledger()} == {"gpt-4o-mini"}


@pytest.mark.parametrize(("model", "provider", "path"), [
    ("claude-sonnet-4-6", "anthropic", "/v1/messages"),
    ("local", "ollama", "/api/chat"),  # an alias of ollama/qwen2.5:7b
])
def test_codex_on_another_providers_model(clients: Clients, model: str, provider: str,
                                          path: str) -> None:
    """Across wires: flowc translates the Responses API (namespace and hosted tools
    included) to the model's provider."""
    run_codex(clients, model)
    assert {r.path for r in clients.calls(provider)} == {path}
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {(model, provider)}
