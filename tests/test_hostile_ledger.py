"""The cost ledger against hostile and unlucky cases: user SQL that tries to write (in WITH
clauses, subqueries, RETURNING, CHECKPOINT, ATTACH, COPY, SET, PRAGMA) through every door,
slow and memory-hungry queries, rows that cannot be stored as given, a ledger file held by
another process, and servers killed under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import pytest

from runtime.ledger.store import (
    CallRecord,
    Ledger,
    LedgerUnavailable,
    QueryTimeout,
    SQLRefused,
    connect,
)
from tests.conftest import start_server, stop_server
from tests.fakes import FakeServer, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent

# Every way we know to make a "read-only" query write, or escape its sandbox.
WRITES = [
    "WITH x AS (DELETE FROM requests RETURNING 1) SELECT count(*) FROM x",
    "WITH x AS (UPDATE requests SET cost_usd = 0 RETURNING 1) SELECT count(*) FROM x",
    "WITH x AS (UPDATE requests SET cost_usd = cost_usd * 1000 RETURNING *) SELECT * FROM x",
    "WITH x AS (INSERT INTO requests (id, ts, success, cost_usd) VALUES "
    "('forged', now(), true, 1000) RETURNING 1) SELECT count(*) FROM x",
    "WITH x AS (DELETE FROM schema_migrations RETURNING name) SELECT * FROM x",
    "WITH x AS (DELETE FROM runs RETURNING 1) SELECT count(*) FROM x",
    "WITH a AS (WITH x AS (DELETE FROM requests RETURNING 1) SELECT * FROM x) "
    "SELECT count(*) FROM a",
    "SELECT (SELECT count(*) FROM (WITH x AS (DELETE FROM requests RETURNING 1) "
    "SELECT * FROM x))",
    "SELECT * FROM (WITH x AS (UPDATE requests SET cost_usd = 0 RETURNING 1) SELECT * FROM x)",
    "SELECT count(*) FROM (DELETE FROM requests RETURNING 1)",
    "SELECT * FROM query('DELETE FROM requests RETURNING 1')",
    "DELETE FROM requests RETURNING *",
    "UPDATE requests SET cost_usd = 0 RETURNING id",
    "INSERT INTO requests (id, ts, success) VALUES ('x', now(), true) RETURNING id",
    "DELETE FROM schema_migrations",
    "DROP TABLE schema_migrations",
    "CREATE TABLE stolen AS SELECT * FROM requests",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "SELECT * FROM force_checkpoint()",
    "CALL checkpoint()",
    "ATTACH ':memory:' AS other",
    "ATTACH '/tmp/flowc-attached.duckdb' AS other",
    "DETACH ledger",
    "COPY requests TO '/tmp/flowc-stolen.csv'",
    "COPY (SELECT * FROM requests) TO '/tmp/flowc-stolen.parquet' (FORMAT parquet)",
    "SET memory_limit = '100GB'",
    "SET enable_external_access = true",
    "RESET memory_limit",
    "SELECT * FROM enable_logging()",
    "PRAGMA enable_profiling",
    "PRAGMA force_checkpoint",
    "EXPLAIN ANALYZE DELETE FROM requests",
    "BEGIN; DELETE FROM requests; COMMIT",
    "COMMIT",
    "SELECT 1; DELETE FROM requests",
]
SLOW = "SELECT sum(hash(a.range * b.range)) FROM range(1000000) a, range(1000000) b"


def _state(select) -> tuple:
    """What a write would change: rows, money, runs, migrations, settings."""
    return (select("SELECT count(*), sum(cost_usd), count(*) FILTER (WHERE id = 'forged') "
                   "FROM requests")[1],
            select("SELECT count(*) FROM runs")[1],
            select("SELECT name FROM schema_migrations ORDER BY 1")[1],
            select("SELECT current_setting('memory_limit'), "
                   "current_setting('enable_external_access')")[1])


def _calls(ledger: Ledger, n: int, **kw) -> None:
    for i in range(n):
        ledger.record(CallRecord(model="fast", provider="openai", served_model="gpt-4o-mini",
                                 success=True, latency_ms=1.0, prompt_tokens=10 + i,
                                 completion_tokens=5, cost_usd=Decimal("0.000123"), **kw))


def _seed_run(ledger: Ledger) -> None:
    from datetime import datetime
    ledger.record_run({"id": "r1", "workflow_name": "w", "inputs_hash": None,
                       "status": "succeeded", "started_at": datetime(2026, 1, 1),
                       "finished_at": datetime(2026, 1, 1), "latency_ms": 1.0,
                       "dry_run": False, "record": {}})


@pytest.fixture(scope="module", params=[True, False], ids=["in-process", "child-process"])
def seeded(request, tmp_path_factory) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "l.duckdb", flush_interval=0.05,
                    in_process=request.param, sql_timeout=0.5)
    _calls(ledger, 1200)
    _seed_run(ledger)
    ledger.flush()
    yield ledger
    ledger.close()


# -- 1. read-only SQL is read-only -----------------------------------------------------------
@pytest.mark.parametrize("sql", WRITES)
def test_user_sql_cannot_write_in_any_form(seeded, sql):
    before = _state(seeded.select)
    with pytest.raises((SQLRefused, duckdb.Error)):
        seeded.select(sql)
    assert _state(seeded.select) == before
    assert before[0] == [(1200, Decimal("0.147600000"), 0)]


def test_a_write_in_a_with_clause_is_refused_by_name(seeded):
    with pytest.raises(SQLRefused, match="queries are read-only: this one writes"):
        seeded.select("WITH x AS (DELETE FROM requests RETURNING 1) SELECT count(*) FROM x")


def test_a_checkpoint_function_changes_nothing(seeded):
    before = _state(seeded.select)
    seeded.select("SELECT * FROM checkpoint()")  # allowed: it writes no data
    assert _state(seeded.select) == before


def test_a_slow_query_is_stopped_at_the_limit_and_the_ledger_goes_on(seeded):
    with pytest.raises(QueryTimeout, match=r"ran past the 0.5 s limit"):
        seeded.select(SLOW)
    _calls(seeded, 3, run_id="after-timeout")
    seeded.flush()
    assert seeded.select("SELECT count(*) FROM requests WHERE run_id = 'after-timeout'")[1] \
        == [(3,)]


def test_memory_is_capped_and_a_hungry_query_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWC_LEDGER_MEMORY_LIMIT", "64MB")
    ledger = Ledger(tmp_path / "l.duckdb", in_process=False)
    try:
        assert ledger.select("SELECT current_setting('memory_limit')")[1] == [("61.0 MiB",)]
        with pytest.raises(duckdb.OutOfMemoryException):
            ledger.select("SELECT count(*) FROM (SELECT range % 3000000 AS k, "
                          "string_agg(range::VARCHAR, ',') FROM range(6000000) GROUP BY k)")
        _calls(ledger, 2)
        ledger.flush()
        assert ledger.select("SELECT count(*) FROM requests")[1] == [(2,)]
    finally:
        ledger.close()


def test_a_bad_memory_setting_falls_back_to_the_default(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FLOWC_LEDGER_MEMORY_LIMIT", "lots")
    monkeypatch.setenv("FLOWC_SQL_TIMEOUT", "soon")
    with caplog.at_level("WARNING"):
        ledger = Ledger(tmp_path / "l.duckdb")
    try:
        assert ledger.select("SELECT current_setting('memory_limit')")[1] == [("953.6 MiB",)]
        assert ledger.sql_timeout == 5.0
    finally:
        ledger.close()
    assert "FLOWC_LEDGER_MEMORY_LIMIT='lots' is not a size" in caplog.text
    assert "FLOWC_SQL_TIMEOUT='soon' is not a number of seconds" in caplog.text


# -- 9. one bad row never loses its batch ------------------------------------------------------
_BAD = {
    100: {"cost_usd": Decimal("1e12")},  # past DECIMAL(18, 9)
    200: {"cost_usd": Decimal("-1e15")},
    300: {"prompt_tokens": 2**70},  # past BIGINT: numpy refuses the whole column
    400: {"prompt_tokens": 2**63 - 1, "completion_tokens": 2**63 - 1},  # their sum overflows
    500: {"cost_usd": Decimal("NaN")},
    600: {"model": "bad \ud800 text"},  # not UTF-8
    700: {"ts": float("nan")},
    800: {"latency_ms": "slow"},
    900: {"model": threading.Lock()},  # cannot even be pickled into a frame
}


def _record_with_bad_rows(ledger: Ledger, n: int = 2_000) -> None:
    for i in range(n):
        kw = dict(_BAD.get(i, {}))
        ledger.record(CallRecord(
            model=kw.pop("model", "fast"), provider="openai", served_model="x", success=True,
            latency_ms=kw.pop("latency_ms", 1.0), cost_usd=kw.pop("cost_usd", Decimal("0.001")),
            step_id=str(i), **kw))


def _check_clamped(select, n: int = 2_000) -> None:
    _, rows = select("SELECT count(*), count(*) FILTER (WHERE clamped), "
                     "sum(cost_usd) FILTER (WHERE NOT clamped) FROM requests")
    assert rows == [(n, len(_BAD), Decimal("0.001") * (n - len(_BAD)))]
    _, rows = select("SELECT step_id::INT, cost_usd, prompt_tokens, completion_tokens, "
                     "total_tokens FROM requests WHERE clamped ORDER BY 1")
    by_step = {r[0]: r[1:] for r in rows}
    assert sorted(by_step) == sorted(_BAD)
    assert by_step[100][0] == Decimal("999999999.999999999")
    assert by_step[200][0] == Decimal("-999999999.999999999")
    assert by_step[300][1] == 2**63 - 1
    assert by_step[400][1:] == (2**62 - 1, 2**62 - 1, 2**63 - 2)
    assert by_step[500][0] is None  # unknown, never $0
    _, rows = select("SELECT model FROM requests WHERE step_id IN ('600', '900') ORDER BY "
                     "step_id")
    assert rows[0][0] == "bad ? text" and rows[1][0].startswith("<unlocked _thread.lock")


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "child-process"])
def test_a_row_that_cannot_be_stored_is_stored_clamped_with_its_neighbours(tmp_path,
                                                                           in_process):
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=30, in_process=in_process)
    try:
        _record_with_bad_rows(ledger)
        ledger.flush()
        _check_clamped(ledger.select)
    finally:
        ledger.close()


def test_bad_rows_in_a_segment_are_clamped_and_taken_in(tmp_path):
    path = tmp_path / "l.duckdb"
    owner = Ledger(path, flush_interval=30, in_process=False)  # holds the file
    try:
        other = Ledger(path, flush_interval=30)  # a `flowc run` beside the server
        assert not other.owner
        _record_with_bad_rows(other)
        other.close()
        assert len(list(other.inbox.glob("*.parquet"))) == 1
        owner.flush()  # takes the inbox in
        _check_clamped(owner.select)
        assert list(owner.inbox.iterdir()) == []
    finally:
        owner.close()


# -- through the server and the CLI ------------------------------------------------------------
CONFIG = """\
models:
  fast: openai/gpt-4o-mini
ledger:
  flush_interval: {interval}
"""
PIPELINE = """\
name: hello
inputs:
  topic: {type: string}
steps:
  - id: say
    type: llm
    model: fast
    prompt: "Say something about ${input.topic}"
output:
  text: ${say}
"""


@pytest.fixture
def project(tmp_path) -> Iterator[tuple[Path, dict[str, str]]]:
    (tmp_path / "flowc.yaml").write_text(CONFIG.format(interval=1.0))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "hello.yaml").write_text(PIPELINE)
    fake = FakeServer("openai").start()
    env = {**os.environ, "OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k",
           "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_SQL_TIMEOUT", None)
    yield tmp_path, env
    fake.stop()


def _chat(url: str, n: int, answered: list[float] | None = None) -> int:
    ok = 0
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            try:
                r = c.post(url + "/v1/chat/completions", json={
                    "model": "fast", "messages": [{"role": "user", "content": f"m{i}"}]})
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                ok += 1
                if answered is not None:
                    answered.append(time.monotonic())
    return ok


def _sql(url: str, query: str) -> httpx.Response:
    return httpx.post(url + "/v1/costs/sql", json={"sql": query}, timeout=60)


def _sql_quietly(url: str, query: str, into: dict[str, httpx.Response]) -> None:
    """A query in a thread whose server may be killed under it."""
    try:
        into["r"] = _sql(url, query)
    except httpx.HTTPError:
        into["r"] = None


def _rows(url: str, query: str) -> list:
    r = _sql(url, query)
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def _flowc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def _http_state(url: str) -> list:
    return [_rows(url, "SELECT count(*), sum(cost_usd) FROM requests"),
            _rows(url, "SELECT name FROM schema_migrations ORDER BY 1")]


CLI_WRITES = [WRITES[0], WRITES[3], WRITES[4], "SET memory_limit = '100GB'"]


def test_user_sql_cannot_write_over_http_or_the_cli_and_the_server_restarts(project):
    project_dir, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, env, port)
    try:
        assert _chat(url, 30) == 30
        wait_until(lambda: _rows(url, "SELECT count(*) FROM requests") == [[30]])
        before = _http_state(url)
        for sql in WRITES:
            r = _sql(url, sql)
            assert r.status_code == 400, (sql, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"], sql
        for sql in CLI_WRITES:  # the CLI asks the server that holds the file
            r = _flowc(project_dir, env, "costs", "--sql", sql)
            assert r.returncode == 1 and "Error:" in r.stderr, (sql, r.stderr)
            assert "Traceback" not in r.stderr
        assert _http_state(url) == before
    finally:
        stop_server(proc)
    for sql in CLI_WRITES:  # no server: the CLI opens the file itself
        r = _flowc(project_dir, env, "costs", "--sql", sql)
        assert r.returncode == 1 and "Error:" in r.stderr, (sql, r.stderr)
        assert "Traceback" not in r.stderr
    proc = start_server(project_dir, env, port)  # migrations intact: it starts again
    try:
        assert _http_state(url) == before
        assert httpx.get(url + "/ready").json()["status"] == "ready"
    finally:
        stop_server(proc)


def test_costs_cli_timeout_and_csv_of_a_query(project):
    project_dir, env = project
    ledger = Ledger(project_dir / ".flowc" / "ledger.duckdb")
    _calls(ledger, 3)
    ledger.close()
    r = _flowc(project_dir, {**env, "FLOWC_SQL_TIMEOUT": "0.5"}, "costs", "--sql", SLOW)
    assert r.returncode == 1, r.stderr
    assert "the query ran past the 0.5 s limit and was stopped" in r.stderr
    r = _flowc(project_dir, env, "costs", "--csv", "-", "--sql",
               "SELECT model, count(*) AS calls FROM requests GROUP BY 1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["model,calls", "fast,3"]
    out = project_dir / "q.csv"
    r = _flowc(project_dir, env, "costs", "--csv", str(out), "--sql",
               "SELECT prompt_tokens FROM requests ORDER BY 1")
    assert r.returncode == 0 and "wrote 3 rows" in r.stderr
    assert out.read_text().splitlines() == ["prompt_tokens", "10", "11", "12"]


# -- 10. a slow query never stalls writes ------------------------------------------------------
def test_a_slow_query_does_not_stall_ingest_or_run_records(project):
    project_dir, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, {**env, "FLOWC_SQL_TIMEOUT": "6"}, port)
    try:
        slow: dict[str, httpx.Response] = {}
        t = threading.Thread(target=_sql_quietly, args=(url, SLOW, slow))
        t.start()
        time.sleep(0.5)  # the query is running in the ledger process
        assert _chat(url, 20) == 20
        run = httpx.post(url + "/v1/workflow/hello",
                         json={"input": {"topic": "ducks"}, "dry_run": True}, timeout=60)
        assert run.status_code == 200 and run.json()["status"] == "succeeded", run.text
        run_id = run.json()["run_id"]
        # the run record and every row are readable while the slow query still runs
        assert _rows(url, f"SELECT count(*) FROM runs WHERE id = '{run_id}'") == [[1]]
        wait_until(lambda: _rows(url, "SELECT count(*) FROM requests") == [[21]])
        assert t.is_alive()
        t.join(30)
        assert slow["r"].status_code == 400  # and then it was stopped at the limit
        assert slow["r"].json()["error"]["code"] == "sql_timeout"
    finally:
        stop_server(proc)


# -- 11. a file held by another process: degraded, then taken over ----------------------------
_HOLD = "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('held', flush=True); " \
        "sys.stdin.read()"


def test_a_server_that_finds_the_file_held_is_degraded_then_takes_it_over(project):
    project_dir, env = project
    path = project_dir / ".flowc" / "ledger.duckdb"
    Ledger(path).close()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, env, port)
    try:
        ready = httpx.get(url + "/ready").json()
        assert ready["status"] == "degraded" and ready["ledger"]["owner"] is False
        for r in (httpx.get(url + "/v1/costs/summary"), _sql(url, "SELECT 1"),
                  httpx.get(url + "/v1/costs/export.csv"), httpx.get(url + "/v1/runs"),
                  httpx.get(url + "/v1/runs/some-run")):
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "ledger_unavailable" and "held by another process" in \
                err["message"]
        r = _flowc(project_dir, env, "costs")
        assert r.returncode == 1 and "held by another process" in r.stderr
        assert "Traceback" not in r.stderr
        assert _chat(url, 25) == 25  # still served; rows wait in the inbox
        inbox = path.with_name("ledger.duckdb.inbox")
        wait_until(lambda: any(inbox.glob("*.parquet")))
        holder.stdin.close()
        holder.wait(10)
        wait_until(lambda: httpx.get(url + "/ready").json()["status"] == "ready")
        wait_until(lambda: _rows(url, "SELECT count(*) FROM requests") == [[25]])
        assert list(inbox.glob("*.parquet")) == []
    finally:
        stop_server(proc)
        if holder.poll() is None:
            holder.kill()


def _ledger_child(server_pid: int) -> int:
    """The ledger process among the server's children (multiprocessing's spawn_main)."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd:
                return int(pid)
    raise AssertionError("no ledger process")


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie holds no file


def test_the_ledger_process_ends_with_its_killed_server_even_mid_query(project):
    project_dir, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, {**env, "FLOWC_SQL_TIMEOUT": "120"}, port)
    child = _ledger_child(proc.pid)
    assert _chat(url, 10) == 10
    wait_until(lambda: _rows(url, "SELECT count(*) FROM requests") == [[10]])
    threading.Thread(target=_sql_quietly, args=(url, SLOW, {}), daemon=True).start()
    time.sleep(0.5)  # the query is running
    os.kill(proc.pid, signal.SIGKILL)  # the server only: its ledger process is orphaned
    proc.wait(10)
    wait_until(lambda: _gone(child), 15)  # it noticed and let go of the file
    proc = start_server(project_dir, env, port)
    try:
        ready = httpx.get(url + "/ready").json()
        assert ready["status"] == "ready" and ready["ledger"]["owner"] is True
        assert _rows(url, "SELECT count(*) FROM requests") == [[10]]
    finally:
        stop_server(proc)


# -- killed under load: counts -----------------------------------------------------------------
def _load(url: str, threads: int, per_thread: int, answered: list[float]) -> list[threading.Thread]:
    ts = [threading.Thread(target=_chat, args=(url, per_thread, answered))
          for _ in range(threads)]
    for t in ts:
        t.start()
    return ts


def test_sigterm_under_load_keeps_every_answered_row(project):
    project_dir, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, env, port)
    answered: list[float] = []
    load = _load(url, 4, 80, answered)
    wait_until(lambda: len(answered) >= 60)
    assert stop_server(proc) in (0, -signal.SIGTERM)
    for t in load:
        t.join()
    proc = start_server(project_dir, env, port)
    try:
        assert httpx.get(url + "/ready").json()["ledger"]["owner"] is True
        assert _rows(url, "SELECT count(*), count(DISTINCT id) FROM requests WHERE success") \
            == [[len(answered), len(answered)]]
    finally:
        stop_server(proc)


def test_sigkill_under_load_loses_at_most_the_last_flush_interval(project):
    project_dir, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(project_dir, env, port)
    answered: list[float] = []
    load = _load(url, 4, 150, answered)
    wait_until(lambda: len(answered) >= 200, 30)
    os.kill(proc.pid, signal.SIGKILL)  # the server; its ledger process writes what it got
    killed = time.monotonic()
    proc.wait(10)
    for t in load:
        t.join()
    # Rows are sent to the ledger process once per flush interval (1 s) or every 2,000
    # rows: those answered in the last interval before the kill may be lost, no others.
    recent = sum(1 for t in answered if t > killed - 1.2)
    proc = start_server(project_dir, env, port)
    try:
        wait_until(lambda: httpx.get(url + "/ready").json()["status"] == "ready")
        (count, distinct), = _rows(url, "SELECT count(*), count(DISTINCT id) FROM requests")
        assert count == distinct
        assert len(answered) - recent <= count <= len(answered)
        inbox = project_dir / ".flowc" / "ledger.duckdb.inbox"
        assert list(inbox.glob("*.parquet")) == []
    finally:
        stop_server(proc)


def test_costs_on_a_ledger_nobody_holds_reads_it_read_only(project):
    project_dir, env = project
    path = project_dir / ".flowc" / "ledger.duckdb"
    ledger = Ledger(path)
    _calls(ledger, 2)
    ledger.close()
    r = _flowc(project_dir, env, "costs", "--json")
    assert r.returncode == 0, r.stderr
    con = connect(path, read_only=True)  # nothing left the file locked
    assert con.execute("SELECT count(*) FROM requests").fetchall() == [(2,)]
    con.close()


def test_reading_from_a_ledger_that_does_not_hold_the_file_says_so(tmp_path):
    path = tmp_path / "l.duckdb"
    owner = Ledger(path, in_process=False)
    try:
        other = Ledger(path)
        with pytest.raises(LedgerUnavailable, match="held by another process"):
            other.select("SELECT 1")
        other.close()
    finally:
        owner.close()

