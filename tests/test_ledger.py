"""The cost ledger: exact prices, the SQL guard, no lost rows across a graceful restart under
load, the CLI and HTTP reports, and the dashboard rendered in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc.config import PriceOverride
from runtime.ledger.pricing import price
from runtime.ledger.schema import MIGRATIONS
from runtime.ledger.store import CallRecord, Ledger, SQLRefused, connect, run_select
from runtime.providers import Usage
from runtime.providers.anthropic import usage_of
from tests.conftest import start_server, stop_server
from tests.fakes import FakeServer, anthropic_text, free_port, openai_text
from tests.tools import require

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


# -- prices ------------------------------------------------------------------------------------
def test_openai_price_with_cached_tokens():
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens.
    # prompt_tokens includes the cached ones; completion includes reasoning.
    usage = Usage(prompt_tokens=10_000, completion_tokens=2_000, cached_tokens=4_000,
                  reasoning_tokens=500)
    cost, source = price("openai", "gpt-4o-mini", usage)
    assert cost == Decimal("6000") * Decimal("0.15") / 10**6 + Decimal("4000") * \
        Decimal("0.075") / 10**6 + Decimal("2000") * Decimal("0.60") / 10**6
    assert cost == Decimal("0.0024")
    assert source.startswith("genai-prices")


def test_anthropic_price_with_cache_writes_and_reads():
    # claude-sonnet-4-6: $3 input, $3.75 5-minute cache write, $0.30 cache read, $15 output.
    usage = Usage(prompt_tokens=100 + 1_000 + 2_000, completion_tokens=20, cached_tokens=2_000,
                  cache_write_tokens=1_000)
    cost, _ = price("anthropic", "claude-sonnet-4-6", usage)
    assert cost == Decimal("0.0003") + Decimal("0.00375") + Decimal("0.0006") + \
        Decimal("0.0003")


def test_anthropic_one_hour_cache_writes_cost_twice_the_input_rate():
    # claude-sonnet-4-6: 5-minute writes $3.75 (1.25x $3), 1-hour writes $6 (2x), per 1M.
    usage = usage_of({"input_tokens": 100, "output_tokens": 20,
                      "cache_creation_input_tokens": 3_000, "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 1_000,
                                         "ephemeral_1h_input_tokens": 2_000}})
    assert (usage.prompt_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == \
        (3_100, 3_000, 2_000)
    cost, _ = price("anthropic", "claude-sonnet-4-6", usage)
    assert cost == Decimal("0.0003") + Decimal("0.00375") + Decimal("0.012") + \
        Decimal("0.0003")
    overrides = {"anthropic/claude-sonnet-4-6": PriceOverride(
        input=Decimal(1), output=Decimal(2), cache_write=Decimal("1.5"),
        cache_write_1h=Decimal(3))}
    assert price("anthropic", "claude-sonnet-4-6", usage, overrides)[0] == \
        (100 * 1 + 1_000 * Decimal("1.5") + 2_000 * 3 + 20 * 2) / Decimal(1_000_000)


def test_ollama_is_free_unless_priced_and_unknown_models_are_null(caplog):
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert price("ollama", "qwen2.5:7b", usage)[0] == Decimal(0)
    overrides = {"ollama/qwen2.5:7b": PriceOverride(input=Decimal("0.10"),
                                                    output=Decimal("0.40"))}
    assert price("ollama", "qwen2.5:7b", usage, overrides) == (Decimal("0.50"), "flowc.yaml")
    with caplog.at_level("WARNING"):
        cost, source = price("openai", "gpt-unreleased-x", usage)
    assert (cost, source) == (None, "unpriced")
    assert "no price for openai/gpt-unreleased-x" in caplog.text


# -- the store and its SQL guard -----------------------------------------------------------------
def test_rows_are_batched_and_readable(tmp_path):
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=0.1)
    for i in range(2500):
        ledger.record(CallRecord(model="fast", provider="openai", served_model="gpt-4o-mini",
                                 success=i % 10 != 0, latency_ms=float(i),
                                 prompt_tokens=10, completion_tokens=5,
                                 cost_usd=Decimal("0.000004500")))
    ledger.flush()
    _cols, rows = ledger.select("SELECT count(*), sum(cost_usd), count(*) FILTER (WHERE "
                               "NOT success), min(total_tokens) FROM requests")
    assert rows == [(2500, Decimal("0.011250000"), 250, 15)]
    ledger.close()


def test_the_embedded_ledgers_rows_are_one_instance_named_local(tmp_path):
    """`--by instance` and `?instance=` on the embedded ledger: it has no instance column
    (one server wrote it all), so every row is the instance '(local)'."""
    from runtime.ledger import reports

    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=0.1)
    try:
        for i in range(30):
            ledger.record(CallRecord(model="fast", provider="openai", served_model="m",
                                     success=True, latency_ms=1.0, prompt_tokens=10,
                                     completion_tokens=5,
                                     cost_usd=Decimal("0.000001"),
                                     tags="x" if i % 3 == 0 else None))
        ledger.flush()
        report = ledger.report
        by = reports.summary(report, by="instance")
        assert [(r["key"], r["calls"]) for r in by["rows"]] == [("(local)", 30)]
        assert by["totals"]["cost_usd"] == Decimal("0.00003")
        assert reports.summary(report, instance="(local)")["totals"]["calls"] == 30
        assert reports.summary(report, instance="host:8080")["totals"]["calls"] == 0
        tagged = reports.summary(report, by="tag", instance="(local)")
        assert {r["key"]: r["calls"] for r in tagged["rows"]} == {"x": 10, "(no tag)": 20}
        assert reports.dashboard(report, instance="(local)")["overall"]["calls"] == 30
        assert reports.dashboard(report, instance="elsewhere")["overall"]["calls"] == 0
        assert len(reports.export_rows(report, instance="(local)")[1]) == 30
    finally:
        ledger.close()


def test_rows_waiting_for_a_checkpoint_hold_little_memory(tmp_path):
    # DuckDB keeps the rows appended since its last checkpoint in memory, uncompressed (~300
    # bytes a row), until its write-ahead log reaches the checkpoint threshold. At DuckDB's
    # default (16MB) these 60,000 rows would all still wait there (~18 MB); the ledger
    # checkpoints at 4MB, so at most ~20,000 do.
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=0.05)
    try:
        for batch in range(30):  # steady load: one insert of 2,000 rows at a time
            for i in range(2_000):
                ledger.record(CallRecord(model="fast", provider="openai",
                                         served_model="gpt-4o-mini", success=True,
                                         latency_ms=float(i), prompt_tokens=batch,
                                         completion_tokens=5, route="default",
                                         cost_usd=Decimal("0.000004500")))
            ledger.flush()
        waiting = ledger.select("SELECT memory_usage_bytes FROM duckdb_memory() "
                                "WHERE tag = 'IN_MEMORY_TABLE'")[1][0][0]
        assert ledger.select("SELECT count(*) FROM requests")[1] == [(60_000,)]
    finally:
        ledger.close()
    assert waiting < 8 * 2**20, f"{waiting / 2**20:.1f} MiB of rows wait for a checkpoint"


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "child-process"])
def test_rows_from_many_threads_all_land_once(tmp_path, in_process):
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=0.05, in_process=in_process)
    per_thread = 1_237  # not a multiple of a frame: partial frames are sealed by the writer

    def work(t: int) -> None:
        for i in range(per_thread):
            ledger.record(CallRecord(model=f"m{t}", provider="openai", served_model="x",
                                     success=True, latency_ms=1.0, prompt_tokens=i,
                                     cost_usd=Decimal(i) / 1000, run_id=f"run-{t}-{i}"))
            if i == per_thread // 2:
                ledger.flush()  # a flush while others keep recording

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ledger.flush()
    _, rows = ledger.select("SELECT model, count(*), count(DISTINCT run_id), "
                            "count(DISTINCT id), sum(prompt_tokens), sum(cost_usd) "
                            "FROM requests GROUP BY model ORDER BY model")
    n = per_thread
    expected_cost = Decimal(n * (n - 1) // 2) / 1000
    assert rows == [(f"m{t}", n, n, n, n * (n - 1) // 2, expected_cost) for t in range(4)]
    ledger.close()


_text = st.one_of(st.none(), st.text(max_size=40))


_record = st.builds(
    CallRecord, model=st.text(max_size=30), provider=_text, served_model=_text,
    success=st.booleans(), latency_ms=st.floats(0, 1e7),
    prompt_tokens=st.integers(0, 2**31 - 1), completion_tokens=st.integers(0, 2**31 - 1),
    cached_tokens=st.integers(0, 2**31 - 1), cache_write_tokens=st.integers(0, 2**31 - 1),
    reasoning_tokens=st.integers(0, 2**31 - 1), cache_write_1h_tokens=st.integers(0, 2**31 - 1),
    cost_usd=st.one_of(st.none(), st.decimals(0, 10**8, places=9)), price_source=_text,
    ttft_ms=st.one_of(st.none(), st.floats(0, 1e7)), error=_text, error_class=_text,
    route=_text, stream=st.booleans(), dry_run=st.booleans(), workflow_name=_text,
    run_id=_text, step_id=_text)
_NAMES = ("model", "provider", "served_model", "success", "latency_ms", "prompt_tokens",
          "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
          "cache_write_1h_tokens",
          "cost_usd", "price_source", "ttft_ms", "error", "error_class", "route", "stream",
          "dry_run", "workflow_name", "run_id", "step_id")


def test_every_field_reads_back_as_recorded(tmp_path):
    ledger = Ledger(tmp_path / "l.duckdb")

    @settings(max_examples=60, deadline=None)
    @given(records=st.lists(_record, min_size=1, max_size=30))
    def check(records: list[CallRecord]) -> None:
        ledger.execute("DELETE FROM requests")
        for r in records:
            ledger.record(r)
        ledger.flush()
        _, rows = ledger.select(f"SELECT {', '.join(_NAMES)}, prompt_tokens + "
                                "completion_tokens - total_tokens, epoch_us(ts) FROM requests")
        expected = [(*(getattr(r, n) for n in _NAMES), 0, int(r.ts * 1_000_000))
                    for r in records]
        assert sorted(rows, key=repr) == sorted(expected, key=repr)

    try:
        check()
    finally:
        ledger.close()


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "child-process"])
def test_a_run_record_is_written_after_its_calls(tmp_path, in_process):
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=30, in_process=in_process)
    for step in ("a", "b", "c"):
        ledger.record(CallRecord(model="m", provider="openai", served_model="x", success=True,
                                 latency_ms=1.0, run_id="r1", step_id=step))
    ledger.record_run({"id": "r1", "workflow_name": "w", "inputs_hash": None,
                       "status": "succeeded", "started_at": datetime(2026, 11, 26),
                       "finished_at": datetime(2026, 11, 26), "latency_ms": 1.0,
                       "dry_run": False, "record": {}})
    # no flush, and the interval is long: the rows went ahead of the run record
    _, rows = ledger.select("SELECT count(*) FROM requests WHERE run_id = 'r1'")
    assert rows == [(3,)]
    ledger.close()


def test_segments_from_an_older_flowc_are_taken_in(tmp_path):
    path = tmp_path / "l.duckdb"
    inbox = tmp_path / "l.duckdb.inbox"
    inbox.mkdir()
    mem = duckdb.connect()
    mem.execute("CREATE TABLE schema_migrations (name VARCHAR, applied_at TIMESTAMP)")
    for _name, sql in MIGRATIONS[:4]:  # before cache_write_1h_tokens existed
        mem.execute(sql)
    mem.execute("INSERT INTO requests (id, ts, model, prompt_tokens, completion_tokens, "
                "total_tokens, cost_usd, success) VALUES ('seg-1', TIMESTAMP '2026-11-01', "
                "'fast', 5, 6, 11, 0.25, true)")
    mem.execute(f"COPY requests TO '{inbox / '1-old.parquet'}' (FORMAT parquet)")
    mem.close()
    ledger = Ledger(path)
    ledger.flush()
    _, rows = ledger.select("SELECT id, total_tokens, cost_usd, cache_write_1h_tokens "
                            "FROM requests")
    ledger.close()
    assert rows == [("seg-1", 11, Decimal("0.250000000"), 0)]
    assert list(inbox.iterdir()) == []


@pytest.mark.parametrize("sql", [
    "DELETE FROM requests",
    "INSERT INTO requests (id, ts, success) VALUES ('x', now(), true)",
    "DROP TABLE requests",
    "UPDATE requests SET cost_usd = 0",
    "COPY requests TO '/tmp/stolen.csv'",
    "ATTACH '/tmp/other.db' AS other",
    "SET enable_external_access = true",
    "SELECT 1; DELETE FROM requests",
])
def test_user_sql_cannot_write(tmp_path, sql):
    ledger = Ledger(tmp_path / "l.duckdb")
    with pytest.raises((SQLRefused, duckdb.Error)):
        ledger.select(sql)
    ledger.close()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/*')",
])
def test_user_sql_cannot_read_files(tmp_path, sql):
    ledger = Ledger(tmp_path / "l.duckdb")
    with pytest.raises(duckdb.Error):
        ledger.select(sql)
    ledger.close()
    con = connect(tmp_path / "l.duckdb", read_only=True)  # the CLI's path when no server runs
    with pytest.raises(duckdb.Error):
        run_select(con, sql)
    con.close()


def test_migrations_are_named_and_applied_once(tmp_path):
    Ledger(tmp_path / "l.duckdb").close()
    con = connect(tmp_path / "l.duckdb")
    names = [r[0] for r in con.execute("SELECT name FROM schema_migrations ORDER BY 1").fetchall()]
    assert names == ["0001_requests", "0002_workflows", "0003_runs", "0004_bigint_tokens",
                     "0005_cache_write_1h", "0006_status_estimates", "0007_keys",
                     "0008_step_cache"]
    cols = {r[0] for r in con.execute("DESCRIBE requests").fetchall()}
    assert {"id", "ts", "workflow_name", "model", "prompt_tokens", "completion_tokens",
            "total_tokens", "cost_usd", "latency_ms", "success", "error"} <= cols
    con.close()


def test_a_ledger_from_an_older_schema_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "l.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (name VARCHAR PRIMARY KEY, "
                "applied_at TIMESTAMP DEFAULT now())")
    for name, sql in MIGRATIONS[:3]:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations (name) VALUES (?)", [name])
    con.execute("INSERT INTO requests (id, ts, model, prompt_tokens, completion_tokens, "
                "total_tokens, success) VALUES ('old', TIMESTAMP '2026-01-02', 'fast', 7, 3, "
                "10, true)")
    con.close()
    ledger = Ledger(path)
    ledger.record(CallRecord(model="big", provider="openai", served_model="x", success=True,
                             latency_ms=1.0, prompt_tokens=2**31 - 1, completion_tokens=5))
    ledger.flush()
    _, rows = ledger.select("SELECT id, model, total_tokens FROM requests ORDER BY ts")
    assert [r[1:] for r in rows] == [("fast", 10), ("big", 2**31 + 4)]
    assert rows[0][0] == "old"
    ledger.close()


# -- the server holding the ledger -------------------------------------------------------------
@pytest.fixture
def served_ledger(tmp_path):
    (tmp_path / "flowc.yaml").write_text(
        "models:\n  fast: openai/gpt-4o-mini\n  smart: anthropic/claude-sonnet-4-6\n"
        "ledger:\n  flush_interval: 1.0\n")
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic")}
    env = {**os.environ, "OPENAI_BASE_URL": fakes["openai"].url + "/v1",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "OPENAI_API_KEY": "k",
           "ANTHROPIC_API_KEY": "k", "PYTHONPATH": str(ROOT)}
    yield tmp_path, env, fakes
    for f in fakes.values():
        f.stop()


def _fire(url: str, n: int, results: list[int]) -> None:
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            try:
                r = c.post(url + "/v1/chat/completions", json={
                    "model": "fast", "messages": [{"role": "user", "content": f"m{i}"}]})
                results.append(r.status_code)
            except httpx.HTTPError:
                results.append(0)


def test_graceful_restart_under_load_loses_no_row(served_ledger):
    project, env, _ = served_ledger
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project, env, port)
    results: list[int] = []
    threads = [threading.Thread(target=_fire, args=(url, 60, results)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # mid-load, with rows still waiting for the 1 s flush
    # uvicorn finishes the requests in flight, runs shutdown (the ledger drains), then
    # re-raises the signal: exit status -SIGTERM after a clean shutdown.
    assert stop_server(proc) in (0, -signal.SIGTERM)
    for t in threads:
        t.join()
    answered = results.count(200)
    assert answered > 0
    proc = start_server(project, env, port)  # again: the same ledger file
    rows = httpx.post(url + "/v1/costs/sql", json={
        "sql": "SELECT count(*) FROM requests WHERE success"}).json()["rows"]
    stop_server(proc)
    assert rows[0][0] == answered  # every answered request is on the books


def test_costs_cli_json_csv_and_summary_endpoint(served_ledger):
    project, env, fakes = served_ledger
    fakes["openai"].then(openai_text("a", prompt_tokens=1000, completion_tokens=100))
    fakes["anthropic"].then(anthropic_text("b", input_tokens=1000, output_tokens=100))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project, env, port)
    for model in ("fast", "smart"):
        httpx.post(url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "x"}]}, timeout=10)
    time.sleep(1.5)
    summary = httpx.get(url + "/v1/costs/summary", params={"by": "model"}).json()
    by = {r["key"]: Decimal(r["cost_usd"]) for r in summary["rows"]}
    assert by == {"openai/gpt-4o-mini-2024-07-18": Decimal("0.000210000"),
                  "anthropic/claude-sonnet-4-6": Decimal("0.004500000")}
    export = httpx.get(url + "/v1/costs/export.csv", params={"since": "2000-01-01"}).text
    table = list(csv.DictReader(io.StringIO(export)))
    assert len(table) == 2 and {r["provider"] for r in table} == {"openai", "anthropic"}
    # a bad filter is the caller's 400, in the API's error shape
    for path, params, words in (("/v1/costs/summary", {"by": "colour"}, "must be one of"),
                                ("/v1/costs/export.csv", {"since": "nope"}, "must be a date"),
                                ("/v1/costs/dashboard", {"until": "x"}, "must be a date")):
        r = httpx.get(url + path, params=params)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    # the CLI, while the server holds the ledger
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--by", "model"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "2 calls, 2200 tokens, $0.00471" in r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--by", "instance",
                        "--json"], cwd=project, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert [(row["key"], row["calls"]) for row in json.loads(r.stdout)["rows"]] == [
        ("(local)", 2)]
    by = httpx.get(url + "/v1/costs/summary", params={"by": "instance"}).json()
    assert [(row["key"], row["calls"]) for row in by["rows"]] == [("(local)", 2)]
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--sql",
                        "DELETE FROM requests"], cwd=project, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "only SELECT queries are allowed" in r.stderr
    stop_server(proc)
    # and with no server: the file is opened read-only
    out = project / "costs.csv"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--csv", str(out)],
                       cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "wrote 2 rows" in r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--since", "nope"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--since must be a date" in r.stderr


def test_dashboard_renders_real_ledger_data_in_chromium(served_ledger):
    require("chromium")
    from playwright.sync_api import sync_playwright

    project, env, fakes = served_ledger
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project, env, port)
    try:
        fakes["openai"].then(*[openai_text("x", prompt_tokens=900, completion_tokens=300)] * 3)
        fakes["anthropic"].then(anthropic_text("y", input_tokens=2000, output_tokens=400))
        for model in ("fast", "fast", "fast", "smart"):
            httpx.post(url + "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "x"}]}, timeout=10)
        httpx.post(url + "/v1/chat/completions", json={
            "model": "nope", "messages": [{"role": "user", "content": "x"}]}, timeout=10)
        time.sleep(1.5)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            external: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(url) else
                    external.append(r.url))
            page.goto(url + "/dashboard")
            page.wait_for_selector("body[data-ready=true]", timeout=15000)
            tokens = page.eval_on_selector_all(
                "#chart-tokens rect", "els => els.map(e => [e.dataset.label, +e.dataset.value])")
            daily = page.eval_on_selector_all("#chart-daily rect", "els => els.length")
            calls = page.inner_text("#kpi-calls")
            rows = page.eval_on_selector_all("#latest tr", "els => els.length")
            asks_for_key = page.get_by_label("flowc key").is_visible()
            page.screenshot(path=str(shot), full_page=True)
            # one instance, the embedded ledger's: by it, and narrowed to it
            instances = page.eval_on_selector_all(
                "#by-instance tr", "els => els.map(e => e.innerText.split('\\t')[0])")
            page.select_option("#f-instance", "(local)")
            page.wait_for_function(
                "() => new URLSearchParams(new URL(document.querySelector('#csv').href)"
                ".search).get('instance') === '(local)'", timeout=15000)
            page.wait_for_selector("body[data-ready=true]", timeout=15000)
            narrowed_calls = page.inner_text("#kpi-calls")
            browser.close()
        print(f"dashboard screenshot: {shot}")
        assert external == []  # no CDN: it works with no internet
        assert ["openai/gpt-4o-mini-2024-07-18", 2700] in tokens  # 3 x 900 prompt tokens
        assert ["openai/gpt-4o-mini-2024-07-18", 900] in tokens  # 3 x 300 completion
        assert ["anthropic/claude-sonnet-4-6", 2000] in tokens
        # The request for an unknown model is on the books too, refused (no provider, $0).
        assert daily == 1 and calls == "5" and rows == 1 + 5
        assert not asks_for_key  # auth off: the page never asks for a key
        assert instances == ["instance", "(local)"] and narrowed_calls == "5"
        assert shot.stat().st_size > 10_000
    finally:
        stop_server(proc)


@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-6"),
    ("anthropic", "claude-3-5-haiku-latest"), ("openai", "o3-mini")])
def test_fast_prices_match_the_library_for_any_usage(provider, model):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from runtime.ledger.pricing import _library_price

    @given(st.integers(0, 400_000), st.integers(0, 50_000), st.integers(0, 100_000),
           st.integers(0, 100_000), st.integers(0, 100_000))
    @settings(max_examples=60, deadline=None)
    def check(plain, cached, writes_5m, writes_1h, output):
        writes = writes_5m + writes_1h
        usage = Usage(prompt_tokens=plain + cached + writes, completion_tokens=output,
                      cached_tokens=cached, cache_write_tokens=writes,
                      cache_write_1h_tokens=writes_1h)
        assert price(provider, model, usage)[0] == _library_price(provider, model, usage)

    check()


def test_a_hard_kill_loses_at_most_the_last_flush_interval(served_ledger):
    project, env, _ = served_ledger
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project, env, port)
    results: list[int] = []
    _fire(url, 40, results)
    time.sleep(2.5)  # more than the 1 s flush interval since the last answered request
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc = start_server(project, env, port)  # the WAL replays on open
    rows = httpx.post(url + "/v1/costs/sql", json={
        "sql": "SELECT count(*) FROM requests"}).json()["rows"]
    stop_server(proc)
    assert results.count(200) == 40 and rows[0][0] == 40
