"""The ledger on a shared Postgres (runtime/pg/ledger.py), against a real Postgres: rows
through the spool, exactly once; every report; read-only user SQL; retention by
partition; run records and registered pipelines."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.ledger import reports
from runtime.ledger.store import CallRecord, LedgerUnavailable, QueryTimeout, SQLRefused
from runtime.pg.ledger import PgLedger, retention_days
from runtime.pg.reports import remote_select


def _call(i: int, **kw: object) -> CallRecord:
    base: dict[str, object] = dict(
        model="fast", provider="openai", served_model="gpt-4o-mini", success=True,
        latency_ms=10.0 + i % 7, prompt_tokens=19, completion_tokens=10,
        cost_usd=Decimal("0.0000085"), price_source="genai-prices", stream=bool(i % 2),
        team="red" if i % 3 else "blue", key_id=f"k{i % 2}", key_name=f"key{i % 2}",
        tags="env=prod,x" if i % 4 == 0 else None)
    base.update(kw)
    return CallRecord(**base)  # type: ignore[arg-type]


def _count(url: str, where: str = "TRUE") -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM requests WHERE {where}").fetchone()[0]


@pytest.fixture
def store(postgres) -> str:
    return postgres.fresh_database()


def test_rows_arrive_once_each_and_every_report_runs_on_postgres(store: str,
                                                                  tmp_path: Path) -> None:
    ledger = PgLedger(store, tmp_path / "spool", "host-a:8080", flush_interval=0.1)
    try:
        for i in range(1000):
            ledger.record(_call(i))
        ledger.record(_call(0, success=False, status="error", cost_usd=None,
                            error="boom\twith a tab\nand a newline \\ backslash"))
        ledger.flush()
        assert _count(store) == 1001
        assert _count(store, "instance = 'host-a:8080'") == 1001
        assert ledger.status()["spooled_rows"] == 0

        report = ledger.report
        by_day = reports.summary(report)
        assert by_day["totals"]["calls"] == 1001
        assert by_day["totals"]["errors"] == 1
        assert by_day["totals"]["tokens"] == 1001 * 29
        assert by_day["totals"]["cost_usd"] == Decimal("0.0000085") * 1000
        for by in reports.GROUPS:
            data = reports.summary(report, by=by)
            assert sum(r["calls"] for r in data["rows"]) >= 1001, by
            assert data["totals"]["calls"] == 1001, by
        teams = {r["key"]: r["calls"] for r in reports.summary(report, by="team")["rows"]}
        assert teams == {"red": 666, "blue": 335}
        tags = {r["key"]: r["calls"] for r in reports.summary(report, by="tag")["rows"]}
        assert tags == {"env=prod": 251, "x": 251, "(no tag)": 750}
        today = datetime.now(UTC).date().isoformat()
        narrowed = reports.summary(report, today, today, "model", team="blue", key_id="k0",
                                   tag="x")
        assert narrowed["totals"]["calls"] == len(
            [i for i in range(1000) if i % 3 == 0 and i % 2 == 0 and i % 4 == 0]) + 1
        columns, rows = reports.export_rows(report)
        assert len(rows) == 1001 and columns[0] == "id"
        error = next(r for r in rows if r[columns.index("error")])
        assert error[columns.index("error")] == "boom\twith a tab\nand a newline \\ backslash"
        dash = reports.dashboard(report)
        assert dash["overall"]["calls"] == 1001 and len(dash["latest"]) == 25
        assert len(reports.export_csv(report).splitlines()) >= 1002
    finally:
        ledger.close()


def test_a_batch_sent_twice_is_stored_once(store: str, postgres, tmp_path: Path) -> None:
    """At-least-once delivery without duplicates: segments that reach Postgres again (the
    process died after the commit, before deleting them) add nothing."""
    spool = tmp_path / "spool"
    ledger = PgLedger(store, spool, "a", flush_interval=0.1)
    try:
        postgres.stop()
        try:
            for i in range(300):
                ledger.record(_call(i))
            ledger.flush()
            status = ledger.status()
            assert status["connected"] is False and status["owner"] is False
            assert status["spooled_rows"] == 300 and status["error"]
            assert status["spool_full"] is False
            saved = tmp_path / "saved"
            saved.mkdir()
            for seg in spool.glob("*.copy"):
                shutil.copy(seg, saved / seg.name)
            assert list(saved.iterdir())
            ledger.spool_limit = status["spool_bytes"] * 3 // 2
            for i in range(300):
                ledger.record(_call(i))
            assert ledger.status()["spool_full"] is True  # /ready: take it out of rotation
        finally:
            postgres.start()
        ledger._next_try = 0.0
        ledger.flush()
        assert _count(store) == 600
        for seg in saved.iterdir():
            shutil.copy(seg, spool / seg.name)
        ledger.flush()
        assert _count(store) == 600
        assert ledger.status()["connected"] is True
        assert not list(spool.glob("*.copy"))
    finally:
        ledger.close()


def test_rows_spooled_before_a_restart_are_sent_by_the_next_process(store: str, postgres,
                                                                   tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = PgLedger(store, spool, "a", flush_interval=0.1)
    postgres.stop()
    try:
        for i in range(50):
            first.record(_call(i))
        first.close()  # Postgres is down: the rows stay in the spool
    finally:
        postgres.start()
    assert _count(store) == 0
    second = PgLedger(store, spool, "a", flush_interval=0.1)
    try:
        assert second.status()["spooled_rows"] == 50
        second.flush()
        assert _count(store) == 50
    finally:
        second.close()


def test_user_sql_is_one_read_only_select_with_a_time_limit(store: str,
                                                            tmp_path: Path) -> None:
    ledger = PgLedger(store, tmp_path / "spool", "a", flush_interval=0.1, sql_timeout=0.5)
    try:
        ledger.record(_call(1))
        ledger.flush()
        cols, rows = ledger.select("SELECT instance, count(*) AS n FROM requests "
                                   "WHERE model LIKE 'f%' GROUP BY 1")
        assert cols == ["instance", "n"] and rows == [("a", 1)]
        assert ledger.select("SELECT count(*) FROM requests WHERE team = $1",
                             ["blue"])[1] == [(0,)]
        for bad in ("DELETE FROM requests", "SELECT 1; DELETE FROM requests",
                    "WITH d AS (DELETE FROM requests RETURNING 1) SELECT * FROM d",
                    "COPY requests TO STDOUT", "SET statement_timeout = 0"):
            with pytest.raises(SQLRefused):
                ledger.select(bad)
        with pytest.raises(QueryTimeout, match=r"0\.5 s limit"):
            ledger.select("SELECT pg_sleep(3)")
        assert _count(store) == 1
        # the connection is reusable after each refusal
        assert ledger.select("SELECT 1 AS one")[1] == [(1,)]
    finally:
        ledger.close()


def _partitions(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'requests'::regclass")}


def test_retention_drops_whole_day_partitions(store: str, tmp_path: Path) -> None:
    ledger = PgLedger(store, tmp_path / "spool", "a", flush_interval=0.1, retention="30d")
    day = lambda age: (datetime.now(UTC) - timedelta(days=age)).strftime(  # noqa: E731
        "requests_%Y%m%d")
    try:
        now = time.time()
        for age in (0, 1, 29, 40, 41):
            ledger.record(_call(age, ts=now - age * 86400))
        ledger.flush()
        assert _count(store) == 5  # late rows are stored; the next pass drops them
        with psycopg.connect(store, autocommit=True) as conn:
            assert sorted(ledger.drop_old(conn)) == [day(41), day(40)]
            assert _count(store) == 3
            assert day(29) in _partitions(store) and day(40) not in _partitions(store)
            dropped = ledger.drop_old(conn, now=datetime.now(UTC) + timedelta(days=5))
        assert dropped == [day(29)]
        assert _count(store) == 2
    finally:
        ledger.close()
    assert retention_days("90d") == 90 and retention_days("2w") == 14
    with pytest.raises(ValueError, match="like 90d"):
        retention_days("soon")


def test_runs_and_pipelines_are_shared(store: str, tmp_path: Path) -> None:
    a = PgLedger(store, tmp_path / "a", "a", flush_interval=0.1)
    b = PgLedger(store, tmp_path / "b", "b", flush_interval=0.1)
    try:
        a.record_run({"id": "r1", "workflow_name": "wf", "inputs_hash": "h", "status": "ok",
                      "started_at": datetime(2026, 1, 1), "finished_at": datetime(2026, 1, 1),
                      "latency_ms": 5.0, "dry_run": False, "record": {"run_id": "r1"},
                      "key_id": None, "team": None})
        rows = b.execute("SELECT record FROM runs WHERE id = ?", ["r1"])
        assert rows == [('{"run_id": "r1"}',)]
        b.execute("INSERT INTO workflows (id, name, config_yaml, created_at, updated_at) "
                  "VALUES (?, ?, ?, ?, ?)", ["i", "wf", "name: wf", datetime.now(),
                                             datetime.now()])
        assert a.execute("SELECT name FROM workflows") == [("wf",)]
    finally:
        a.close()
        b.close()


def test_a_step_result_cached_on_one_instance_is_reused_by_another(store: str,
                                                                 tmp_path: Path) -> None:
    import asyncio

    from runtime.step_cache import Entry, StepCache

    a = PgLedger(store, tmp_path / "a", "a", flush_interval=0.1)
    b = PgLedger(store, tmp_path / "b", "b", flush_interval=0.1)
    try:
        now = datetime.now(UTC).replace(tzinfo=None)
        for output in ({"title": "old"}, {"title": "Hi"}):  # stored twice: the last holds
            entry = Entry(output, Decimal("0.000120000"), 42, "fast", "openai",
                          "gpt-4o-mini", now)
            asyncio.run(StepCache(a).put("k1", entry, workflow="wf", step_id="draft",
                                         run_id="r1"))
        got = asyncio.run(StepCache(b).get("k1", 3600))
        assert got is not None and got.output == {"title": "Hi"}
        assert got.cost == Decimal("0.000120000") and got.tokens == 42
        assert asyncio.run(StepCache(b).get("missing", None)) is None
        a.record(CallRecord(model="fast", provider="openai", served_model="gpt-4o-mini",
                            success=True, latency_ms=0.0, cached=True,
                            cost_usd=Decimal(0), saved_usd=Decimal("0.00012")))
        a.flush()
        assert b.execute("SELECT cached, saved_usd, cost_usd FROM requests") == [
            (True, Decimal("0.000120000"), Decimal("0E-9"))]
    finally:
        a.close()
        b.close()


def test_costs_from_a_laptop_read_every_instance(store: str, tmp_path: Path) -> None:
    ledgers = [PgLedger(store, tmp_path / n, n, flush_interval=0.1) for n in "abc"]
    try:
        for n, ledger in enumerate(ledgers):
            for i in range(10 * (n + 1)):
                ledger.record(_call(i))
            ledger.flush()
    finally:
        for ledger in ledgers:
            ledger.close()
    select = remote_select(store, 5.0)
    assert reports.summary(lambda s, p=(): select(s, p, timeout=None))["totals"]["calls"] == 60
    assert select("SELECT instance, count(*) FROM requests GROUP BY 1 ORDER BY 1")[1] == [
        ("a", 10), ("b", 20), ("c", 30)]
    # --by instance and ?instance=: each row names the instance that served it
    report = lambda s, p=(): select(s, p, timeout=None)  # noqa: E731
    by = reports.summary(report, by="instance")
    assert [(r["key"], r["calls"]) for r in by["rows"]] == [("a", 10), ("b", 20), ("c", 30)]
    assert by["totals"]["calls"] == 60
    assert reports.summary(report, instance="b")["totals"]["calls"] == 20
    tags = reports.summary(report, by="tag", instance="c")
    assert {r["key"]: r["calls"] for r in tags["rows"]} == {"env=prod": 8, "x": 8,
                                                             "(no tag)": 22}
    assert tags["totals"]["calls"] == 30
    assert reports.dashboard(report, instance="c")["overall"]["calls"] == 30
    assert len(reports.export_rows(report, instance="a")[1]) == 10
    assert reports.summary(report, instance="nowhere")["totals"]["calls"] == 0
    with pytest.raises(LedgerUnavailable, match="cannot reach"):
        remote_select("postgresql://nobody@127.0.0.1:1/x", 5.0)


def test_values_that_cannot_be_stored_as_given_are_clamped_not_lost(store: str,
                                                                    tmp_path: Path) -> None:
    ledger = PgLedger(store, tmp_path / "spool", "a", flush_interval=0.1)
    try:
        ledger.record(_call(1, prompt_tokens=2**70, error="bad \ud800 surrogate"))
        ledger.record(_call(2, cost_usd=Decimal("1e12")))
        ledger.record(_call(3, cost_usd=Decimal("NaN"), ts=1e300))
        ledger.record(_call(4))
        ledger.flush()
        _, rows = ledger.select("SELECT prompt_tokens, error, cost_usd, clamped, "
                                "extract(year FROM ts)::int FROM requests ORDER BY id")
        assert rows == [
            (2**62 - 1, "bad ? surrogate", Decimal("0.000008500"), True, rows[0][4]),
            (19, None, Decimal("999999999.999999999"), True, rows[1][4]),
            (19, None, None, True, 9999),
            (19, None, Decimal("0.000008500"), False, rows[3][4])]
    finally:
        ledger.close()


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(), min_size=1, max_size=20))
def test_any_text_reaches_postgres_as_recorded(store: str, tmp_path_factory,
                                               texts: list[str]) -> None:
    """Error text and names come from providers and clients: tabs, newlines, backslashes,
    quotes, NUL and other control characters all arrive unchanged (a lone surrogate, which
    UTF-8 cannot hold, as '?'; NUL, which Postgres text cannot hold, is dropped)."""
    ledger = PgLedger(store, tmp_path_factory.mktemp("spool"), "h", flush_interval=0.1)
    try:
        for i, t in enumerate(texts):
            ledger.record(_call(i, error=t, step_id=str(i), run_id="hyp"))
        ledger.flush()
        _, rows = ledger.select("SELECT step_id, error FROM requests WHERE run_id = 'hyp'")
        ledger.execute("DELETE FROM requests WHERE run_id = 'hyp'")
    finally:
        ledger.close()
    want = {str(i): t.encode("utf-8", "replace").decode("utf-8").replace("\0", "")
            for i, t in enumerate(texts)}
    assert dict(rows) == want


def test_the_runs_view_reads_run_records_on_postgres(store: str, tmp_path: Path) -> None:
    from runtime import runlist

    ledger = PgLedger(store, tmp_path / "spool", "a", flush_interval=0.1)
    try:
        ledger.execute("CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, name TEXT)")
        ledger.execute("INSERT INTO keys VALUES ('k1', 'bot') ON CONFLICT DO NOTHING")
        for i, cost in enumerate((0.25, None)):
            ledger.record_run({
                "id": f"r{i}", "workflow_name": "wf", "inputs_hash": "h", "status": "ok",
                "started_at": datetime(2026, 1, 1, 0, i), "finished_at": None,
                "latency_ms": 5.0, "dry_run": False, "key_id": "k1", "team": "red",
                "record": {"metrics": {"total_cost_usd": cost, "total_tokens": 29,
                                       "steps": [{"id": "a", "status": "done"},
                                                 {"id": "b", "status": "skipped"}]}}})
        got = runlist.recent(ledger.report, since="2026-01-01", until="2026-01-01")
        assert [r["run_id"] for r in got["runs"]] == ["r1", "r0"]
        assert got["runs"][1]["step_statuses"] == {"done": 1, "skipped": 1}
        assert got["filters"]["key"] == [{"id": "k1", "name": "bot"}]
    finally:
        ledger.close()
