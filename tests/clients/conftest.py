"""Real clients against `flowc serve` in front of loopback OpenAI, Anthropic and Ollama servers.

The clients are installed by `scripts/setup.sh --test` (npm packages in tests/clients, Node
24 in tests/clients/node, the Python SDKs as dev extras). They run against the suite's
`gateway` (tests/conftest.py). Each test scripts the loopback model with a `Turn` (call
this tool, then answer that), runs the client unchanged but for its base URL, and checks
the answer it printed, the tool result that reached the provider and the rows flowc left
in its ledger.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.clients.upstream import Script, Turn, agent, tool_results
from tests.conftest import Gateway
from tests.fakes import FakeServer, Recorded

HERE = Path(__file__).resolve().parent
BIN = HERE / "node_modules" / ".bin"
NODE24 = HERE / "node" / "node_modules" / ".bin"
MODEL_CALLS = ("/chat/completions", "/responses", "/messages", "/api/chat")

@dataclass
class Clients:
    gw: Gateway
    work: Path                       # the client's working directory
    home: Path                       # its HOME (config, caches, sessions)
    since: datetime = field(default_factory=lambda: datetime.now(UTC).replace(tzinfo=None))

    @property
    def url(self) -> str:
        return self.gw.url

    @property
    def fakes(self) -> tuple[FakeServer, FakeServer, FakeServer]:
        return self.gw.openai, self.gw.anthropic, self.gw.ollama

    def play(self, turn: Turn) -> None:
        """Every upstream answers as the scripted agent ``turn`` from now on."""
        for fake in self.fakes:
            fake.script = Script(agent(turn))

    def requests(self) -> list[tuple[str, Recorded]]:
        """The model calls the upstreams saw (not flowc's own model-list fetches)."""
        return [(f.kind, r) for f in self.fakes for r in f.requests
                if r.path.endswith(MODEL_CALLS)]

    def calls(self, kind: str) -> list[Recorded]:
        """The model calls one upstream (openai, anthropic or ollama) saw."""
        return [r for k, r in self.requests() if k == kind]

    def tool_results(self) -> list[str]:
        return [t for _, r in self.requests() for t in tool_results(r)]

    def env(self, **extra: str) -> dict[str, str]:
        """A client's environment: Node 24 and the installed clients first on PATH, a home
        of its own, and no provider settings of the machine's."""
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM", "SYSTEMROOT")}
        path = os.pathsep.join([str(NODE24), str(BIN), keep.get("PATH", "")])
        return {**keep, "PATH": path, "HOME": str(self.home), "NO_COLOR": "1", **extra}

    def run(self, argv: list[str], *, env: dict[str, str], timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, cwd=self.work, env=env, capture_output=True, text=True,
                              timeout=timeout, input=stdin if stdin is not None else "")
        assert proc.returncode == 0, (
            f"{argv[0]} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def ledger(self, timeout: float = 10) -> list[dict]:
        """The ledger rows written since the test started, once there is one for every
        request the upstreams saw; each must be a success from the provider that answered."""
        seen = self.requests()
        assert seen, "no request reached any upstream"
        cols = ["model", "provider", "served_model", "success", "stream", "prompt_tokens",
                "completion_tokens", "error"]
        query = (f"SELECT {', '.join(cols)} FROM requests WHERE ts >= CAST(? AS TIMESTAMP) "
                 "ORDER BY ts")
        deadline = time.monotonic() + timeout
        while True:
            rows = [dict(zip(cols, r, strict=True)) for r in
                    self._sql(query, [self.since.isoformat(sep=" ")])]
            if len(rows) >= len(seen) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(rows) == len(seen), (rows, [(k, r.path) for k, r in seen])
        assert all(r["success"] for r in rows), rows
        assert sorted(r["provider"] for r in rows) == sorted(k for k, _ in seen), rows
        return rows

    def _sql(self, query: str, params: list) -> list[list]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query, "params": params},
                       timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]


@pytest.fixture
def clients(gateway: Gateway, tmp_path: Path) -> Iterator[Clients]:
    """The suite's `flowc serve` and loopback providers, answering as scripted agents for
    the length of one test (then as the rest of the suite expects them to)."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    gateway.reset()
    c = Clients(gateway, work, home)
    c.play(Turn())
    yield c
    gateway.reset()
    for fake in c.fakes:
        fake.script = deque()
