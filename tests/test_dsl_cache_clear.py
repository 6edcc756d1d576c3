"""Step cache housekeeping: `flowc cache clear` (through the running server, or on the
ledger file when none runs) and `DELETE /v1/cache` drop entries, so the next identical call
is a model call again; a shared store's `ledger.retention` drops old entries too."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from runtime.pg.ledger import PgLedger
from tests.conftest import ROOT, Gateway

CACHED = """\
name: {name}
inputs:
  text: {{type: string}}
steps:
  - id: {step}
    type: llm
    model: fast
    temperature: 0
    prompt: "Summarize for {name}: ${{input.text}}"
    cache: true
output: ${{{step}}}
"""


def run(gw: Gateway, name: str) -> dict:
    r = httpx.post(f"{gw.url}/v1/workflow/{name}", json={"input": {"text": "owls"}},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cached(gw: Gateway, name: str) -> bool:
    out = run(gw, name)
    assert out["status"] == "succeeded", out
    return bool(out["metrics"]["steps"][0].get("cached"))


def test_clearing_the_cache_makes_the_next_call_a_model_call(gw):
    for name, step in (("cc-one", "a"), ("cc-two", "b")):
        r = httpx.put(f"{gw.url}/v1/workflows/{name}",
                      json={"yaml": CACHED.format(name=name, step=step)}, timeout=30)
        assert r.status_code == 200, r.text
        assert cached(gw, name) is False and cached(gw, name) is True
    # Only entries stored more than a day ago: none yet.
    out = gw.flowc("cache", "clear", "--older-than", "1d")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "deleted 0 cache entries"
    assert cached(gw, "cc-one") is True
    # One pipeline's entries, over HTTP; the other pipeline still hits.
    r = httpx.delete(f"{gw.url}/v1/cache", params={"pipeline": "cc-one"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"deleted": 1}
    gw.openai.requests.clear()
    assert cached(gw, "cc-one") is False and len(gw.openai.requests) == 1
    assert cached(gw, "cc-two") is True and len(gw.openai.requests) == 1
    # One step's entries, through the CLI (which finds the running server).
    out = gw.flowc("cache", "clear", "--pipeline", "cc-two", "--step", "b")
    assert out.returncode == 0 and out.stdout.strip() == "deleted 1 cache entry", out.stderr
    assert cached(gw, "cc-two") is False
    r = httpx.delete(f"{gw.url}/v1/cache", params={"older_than": "soon"}, timeout=30)
    assert r.status_code == 400
    assert "older_than must be a duration like 30s" in r.json()["error"]["message"]
    out = gw.flowc("cache", "clear", "--older-than", "soon")
    assert out.returncode == 2 and "'soon' is not a duration" in out.stderr


def test_cache_clear_without_a_server_opens_the_ledger(tmp_path: Path):
    (tmp_path / "flowc.yaml").write_text("models: {fast: openai/gpt-4o-mini}\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "cache", "clear"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "deleted 0 cache entries"


def test_a_shared_stores_retention_drops_old_cache_entries(postgres, tmp_path: Path):
    store = postgres.fresh_database()
    ledger = PgLedger(store, tmp_path / "spool", "a", flush_interval=0.1, retention="30d")
    now = datetime.now(UTC).replace(tzinfo=None)
    try:
        for key, age in (("old", 40), ("recent", 2)):
            ledger.execute("INSERT INTO step_cache (key, workflow_name, step_id, run_id, "
                           "output, tokens, created_at) VALUES (?, 'p', 's', 'r', '\"x\"', "
                           "1, ?)", [key, now - timedelta(days=age)])
        with psycopg.connect(store, autocommit=True) as conn:
            ledger.drop_old(conn)
            keys = [r[0] for r in conn.execute("SELECT key FROM step_cache")]
        assert keys == ["recent"]
    finally:
        ledger.close()
