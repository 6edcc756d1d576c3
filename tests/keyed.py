"""A `flowc serve` with auth on and virtual keys made before it starts (in the project's
ledger file, as `flowc keys create` does without a server), for the budget, rate-limit and
auth tests."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml

from flowc.config import ProjectConfig
from runtime.access.gate import Gate
from runtime.access.keys import Key
from runtime.access.store import LedgerAccessStore
from runtime.ledger.store import Ledger
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, wait_until

ADMIN = "sk-flowc-admin-" + "5e7a9c1d" * 5


@dataclass
class Keyed:
    """A project, its fake upstreams and (once started) its server."""

    project: Path
    config: str
    openai: FakeServer
    anthropic: FakeServer
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    output: str = ""  # the server's log, once stopped
    secrets: dict[str, str] = field(default_factory=dict)  # key name -> secret
    ids: dict[str, str] = field(default_factory=dict)  # key name -> id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "FLOWC_ADMIN_KEY"}
        return {**env, "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
                "OPENAI_BASE_URL": self.openai.url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
                "ANTHROPIC_BASE_URL": self.anthropic.url, "ANTHROPIC_API_KEY": "sk-ant-test"}

    def _gate(self, ledger: Ledger) -> Gate:
        cfg = ProjectConfig.model_validate(yaml.safe_load(self.config) or {})
        gate = Gate(cfg, LedgerAccessStore(ledger), ADMIN)
        gate.load()
        return gate

    def keys(self, *specs: dict[str, Any], expired: tuple[str, ...] = (),
             revoked: tuple[str, ...] = ()) -> None:
        """Make keys in the ledger file (the server is stopped); names in ``expired`` and
        ``revoked`` are made and then expired or revoked."""
        assert self.proc is None
        ledger = Ledger(self.project / ".flowc" / "ledger.duckdb")
        try:
            gate = self._gate(ledger)
            for spec in specs:
                key, secret = gate.create(spec)
                self.secrets[key.name], self.ids[key.name] = secret, key.id
                if key.name in revoked:
                    gate.revoke(key.id)
                if key.name in expired:
                    past = datetime.now(UTC) - timedelta(minutes=1)
                    gate.store.save_key(replace(key, expires_at=past))
        finally:
            ledger.close()

    def key(self, name: str) -> Key:
        ledger = Ledger(self.project / ".flowc" / "ledger.duckdb")
        try:
            return self._gate(ledger).get(self.ids[name])
        finally:
            ledger.close()

    def start(self, *extra: str) -> Keyed:
        (self.project / "flowc.yaml").write_text(textwrap.dedent(self.config))
        self.proc = start_server(self.project, self.env, self.port, *extra)
        return self

    def stop(self) -> str:
        assert self.proc is not None
        stop_server(self.proc)
        self.output += self.proc.stdout.read().decode() if self.proc.stdout else ""
        self.proc = None
        return self.output

    def auth(self, name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secrets[name]}"}

    def sql(self, query: str) -> list[list[Any]]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query},
                       headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    def rows(self, key: str, expected: int, timeout: float = 20) -> list[list[Any]]:
        """The key's ledger rows (status, cost as text, error), once ``expected`` are in."""
        query = ("SELECT status, CAST(cost_usd AS VARCHAR), error, stream FROM requests "
                 f"WHERE key_id = '{self.ids[key]}' ORDER BY ts")
        got: list[list[Any]] = []

        def arrived() -> bool:
            nonlocal got
            got = self.sql(query)
            return len(got) >= expected

        wait_until(arrived, timeout)
        time.sleep(0.3)  # and no more than that
        got = self.sql(query)
        assert len(got) == expected, got
        return got

    def spent(self, key: str) -> Decimal:
        return sum((Decimal(r[1]) for r in self.rows_now(key) if r[1] is not None),
                   Decimal(0))

    def rows_now(self, key: str) -> list[list[Any]]:
        return self.sql("SELECT status, CAST(cost_usd AS VARCHAR), error, stream FROM "
                        f"requests WHERE key_id = '{self.ids[key]}' ORDER BY ts")


def keyed(tmp: Path, config: str) -> Keyed:
    return Keyed(tmp, textwrap.dedent(config), FakeServer("openai").start(),
                 FakeServer("anthropic").start())


def close(k: Keyed) -> None:
    if k.proc is not None:
        k.stop()
    k.openai.stop()
    k.anthropic.stop()
