"""flowc's reports (runtime/ledger/reports.py) on the shared Postgres.

The reports run where the rows are: as SQL on Postgres, not pulled into DuckDB (its
postgres extension cannot be installed here, and pulling every row for each report would
not scale). They are written once, for DuckDB; `to_postgres` rewrites the few DuckDB
constructs they use into PostgreSQL's. The set is closed and every report is run against a
real Postgres in tests/test_pg_ledger.py, so a report changed in DuckDB's dialect fails
there rather than in production.

User SQL (`flowc costs --sql`, POST /v1/costs/sql) is not rewritten: it is PostgreSQL's
dialect (docs/scaling.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from runtime.ledger import reports
from runtime.ledger.store import LedgerUnavailable
from runtime.pg import db

_TAGGED_PG = ("(SELECT *, unnest(coalesce(string_to_array(tags, ','), ARRAY[NULL]::text[])) "
              "AS tag FROM requests) AS tagged")
# (DuckDB, PostgreSQL), applied in order.
_EXACT = (
    (reports._LOCAL, "requests"),  # the shared store's rows name their instance
    (reports._TAGGED, _TAGGED_PG),
    ("list_contains(string_split(tags, ','), ?)", "? = ANY(string_to_array(tags, ','))"),
    ("INTERVAL 1 DAY", "INTERVAL '1 day'"),
    ("any_value(", "min("),  # PostgreSQL 16 has any_value; 15 does not
)
_QUANTILE = re.compile(r"quantile_cont\((\w+), ([0-9.]+)\)")
# Run records' JSON (runtime/runlist.py): DuckDB's JSON paths as jsonb's.
_JSON_LIST = re.compile(r"json_extract_string\(([\w.]+), '\$\.([\w.]+)\[\*\]\.(\w+)'\)")
_JSON = re.compile(r"json_extract\(([\w.]+), '\$\.([\w.]+)'\)")
# sum() of a BIGINT is NUMERIC in PostgreSQL (a Decimal), HUGEINT (an int) in DuckDB
_TOKEN_SUM = re.compile(r"sum\((\w*tokens)\)")


def to_postgres(sql: str) -> str:
    """A report's DuckDB SQL as PostgreSQL (with psycopg's `%s` parameters)."""
    for duck, pg in _EXACT:
        sql = sql.replace(duck, pg)
    sql = _QUANTILE.sub(r"percentile_cont(\2) WITHIN GROUP (ORDER BY \1)", sql)
    sql = _JSON_LIST.sub(lambda m: f"ARRAY(SELECT e->>'{m[3]}' FROM jsonb_array_elements("
                                   f"{m[1]} #> '{_path(m[2])}') AS e)", sql)
    sql = _JSON.sub(lambda m: f"({m[1]} #>> '{_path(m[2])}')", sql)
    sql = sql.replace(" AS DOUBLE)", " AS DOUBLE PRECISION)")
    sql = _TOKEN_SUM.sub(r"sum(\1)::bigint", sql)
    return sql.replace("%", "%%").replace("?", "%s")


def _path(dotted: str) -> str:
    return "{" + dotted.replace(".", ",") + "}"


Select = Callable[..., tuple[list[str], list[tuple[Any, ...]]]]


def remote_select(url: str, sql_timeout: float) -> Select:
    """The `select(sql, params=(), timeout=-1)` the CLI's reports take, straight on the
    shared store (`flowc costs --store URL`, from any machine that reaches it):
    ``timeout=None`` is one of flowc's own reports (rewritten), else user SQL."""
    import psycopg

    from runtime.pg.ledger import _configure, run_select

    try:
        conn = psycopg.connect(url, autocommit=True, application_name="flowc",
                               connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise LedgerUnavailable(f"cannot reach the shared store {db.redact(url)}: "
                                f"{str(exc).strip().splitlines()[0]}") from None
    _configure(conn)

    def select(sql: str, params: Sequence[Any] = (), timeout: float | None = -1.0
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if timeout is None:
            cur = conn.execute(to_postgres(sql), list(params))
            return [d.name for d in cur.description or ()], cur.fetchall()
        limit = sql_timeout if timeout < 0 else timeout
        return run_select(conn, sql, params, limit)

    return select
