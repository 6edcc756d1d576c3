"""The Responses API's kept conversations on the shared Postgres, so a follow-up
(`previous_response_id`) is answered by whichever instance it reaches, and after a restart.

One row per response: its id, the whole conversation up to it (runtime/gateway/
responses_store.py) as JSON, and when it was kept. Bounded by age and by count: a response
older than `RETAIN` (30 days, as long as OpenAI keeps its own) is neither answered nor kept,
and only the newest `MAX_ROWS` (100,000: a hundred times one process's in-memory bound, a
bound on the disk whatever the traffic, as each row holds its whole conversation) survive a
sweep. Each instance sweeps on a thread of its own every `SWEEP` seconds (one indexed
DELETE, which several instances may run at once): no request pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from runtime.gateway.responses_store import Items, ResponsesUnavailable, encode
from runtime.pg.db import migrate, redact

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("flowc.responses")

RETAIN_DAYS = 30
MAX_ROWS = 100_000
SWEEP = 600.0  # seconds between an instance's clean-ups

# JSON, not JSONB: nothing reads inside it, JSON keeps the bytes as sent (no parse on the
# way in) and takes every string JSON can hold (JSONB refuses "\u0000").
MIGRATIONS: list[tuple[str, str]] = [
    ("responses_0001_responses", """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            items JSON NOT NULL,              -- the conversation up to it: input, output
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX responses_created ON responses (created_at)"""),
]
_PUT = ("INSERT INTO responses (id, items) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
        "SET items = EXCLUDED.items, created_at = now()")
_GET = ("SELECT items::text FROM responses WHERE id = %s "
        "AND created_at > now() - make_interval(days => %s)")
_SWEEP = """
DELETE FROM responses WHERE created_at < now() - make_interval(days => %(days)s)
   OR created_at <= (SELECT created_at FROM responses ORDER BY created_at DESC
                    OFFSET %(rows)s LIMIT 1)
"""


class PgResponses:
    """`Conversations` on the shared store. One connection for requests (a statement at a
    time, off the event loop), another for the sweep. No I/O until first used."""

    def __init__(self, url: str, *, retain_days: int = RETAIN_DAYS, max_rows: int = MAX_ROWS,
                 sweep: float = SWEEP) -> None:
        self.url, self.retain_days, self.max_rows = url, retain_days, max_rows
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._migrated = False
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_every, args=(sweep,),
                                         name="flowc-responses-sweep", daemon=True)
        self._sweeper.start()

    def _connect(self) -> psycopg.Connection:
        import psycopg

        try:
            conn = psycopg.connect(self.url, autocommit=True, application_name="flowc",
                                   connect_timeout=2, tcp_user_timeout=3000)
            conn.execute("SET statement_timeout = 5000")
            if not self._migrated:
                migrate(conn, MIGRATIONS)
                self._migrated = True
        except psycopg.Error as exc:
            raise ResponsesUnavailable(
                f"The server is temporarily unable to reach the store of previous responses "
                f"({redact(self.url)}: {str(exc).strip()}). Please retry your request after "
                "a brief wait.") from None
        return conn

    def _run(self, work: Callable[[psycopg.Connection], Any]) -> Any:
        """``work`` on the requests' connection; a connection lost while idle (the store
        restarted) is replaced once."""
        import psycopg

        with self._lock:
            for attempt in range(2):
                new = self._conn is None or self._conn.closed
                if new:
                    self._conn = self._connect()
                try:
                    return work(self._conn)
                except psycopg.OperationalError as exc:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                    self._conn = None
                    if new or attempt:
                        raise ResponsesUnavailable(
                            "The server is temporarily unable to reach the store of previous "
                            f"responses ({str(exc).strip()}). Please retry your request "
                            "after a brief wait.") from None
        raise AssertionError("unreachable")

    async def remember(self, response_id: str, items: Items) -> None:
        blob = encode(items).decode()
        try:
            await asyncio.to_thread(self._run, lambda c: c.execute(_PUT, (response_id, blob)))
        except ResponsesUnavailable as exc:  # answered all the same: the tokens are spent
            log.warning("response %s not kept: %s", response_id, exc.message)

    async def recall(self, response_id: str) -> Items | None:
        row = await asyncio.to_thread(self._run, lambda c: c.execute(
            _GET, (response_id, self.retain_days)).fetchone())
        return None if row is None else orjson.loads(row[0])  # type: ignore[no-any-return]

    def sweep(self) -> int:
        """Drop what is past either bound; how many rows went."""
        conn = self._connect()
        try:
            return conn.execute(_SWEEP, {"days": self.retain_days, "rows": self.max_rows}
                                ).rowcount
        finally:
            conn.close()

    def _sweep_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.sweep()
            except Exception as exc:  # the store down for now: the next sweep catches up
                log.warning("responses: could not drop old responses: %s", exc)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
