"""Shared fixtures: loopback provider servers and a running `flowc serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakes import FakeServer, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Gateway:
    url: str
    project: Path
    proc: subprocess.Popen
    openai: FakeServer
    anthropic: FakeServer
    ollama: FakeServer
    env: dict[str, str]

    def reset(self) -> None:
        for fake in (self.openai, self.anthropic, self.ollama):
            fake.requests.clear()
            fake.script.clear()

    def flowc(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def sql(self, query: str) -> list[list]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]


GATEWAY_CONFIG = """\
models:
  local: ollama/qwen2.5:7b
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
fallbacks:
  openai/gpt-4o: [anthropic/claude-sonnet-4-6]
retry:
  attempts: 2
  backoff: 0.05
  max_backoff: 2
providers:
  openai: {timeout: 2}
  anthropic: {timeout: 2}
routes:
  - name: cheap-tagged
    match: {model: auto, tags: [cheap]}
    strategy: cheapest
    targets: [anthropic/claude-sonnet-4-6, openai/gpt-4o-mini]
  - name: tools-to-openai
    match: {model: auto, needs_tools: true}
    targets: [openai/gpt-4o-mini]
  - name: auto
    match: {model: auto}
    strategy: best
    targets: [openai/gpt-4o-mini, anthropic/claude-sonnet-4-6]
quality:
  anthropic/claude-sonnet-4-6: 0.9
  openai/gpt-4o-mini: 0.7
ledger:
  flush_interval: 0.2
"""


def start_server(project: Path, env: dict[str, str], port: int, *extra: str
                 ) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
         "--log-level", "warning", *extra],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "died")
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30)
    return proc


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(5)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    project = tmp_path_factory.mktemp("gateway")
    (project / "flowc.yaml").write_text(textwrap.dedent(GATEWAY_CONFIG))
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic", "ollama")}
    env = {**os.environ,
           "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "ANTHROPIC_API_KEY": "sk-ant-test",
           "OLLAMA_HOST": fakes["ollama"].url, "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = start_server(project, env, port)
    gw = Gateway(f"http://127.0.0.1:{port}", project, proc, fakes["openai"],
                 fakes["anthropic"], fakes["ollama"], env)
    yield gw
    stop_server(proc)
    for f in fakes.values():
        f.stop()


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.reset()
    return gateway


@pytest.fixture(scope="session")
def postgres():
    """One Postgres server for the session (tests/pgserver.py); take a clean database from
    it with `postgres.fresh_database()`."""
    from tests.pgserver import PostgresServer

    server = PostgresServer()
    yield server
    server.close()
