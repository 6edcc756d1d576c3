"""Connecting to the shared Postgres and keeping its schema current.

Migrations are named and applied in order, each in its own transaction, under a
transaction-level advisory lock: two instances starting at once take turns, and the second
finds the first's migrations applied (the `flowc_migrations` table says which)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

# An arbitrary constant: the advisory lock every flowc instance takes to migrate.
MIGRATION_LOCK = 0x666C6F7763  # "flowc"
STORE_ENV = "FLOWC_STORE_URL"
_URL = re.compile(r"^postgres(ql)?://")


class StoreError(ValueError):
    """The store URL is not one flowc can use."""


def store_url(flag: str | None, configured: str | None,
              env: Mapping[str, str] | None = None) -> str | None:
    """The shared store's URL: `--store`, else FLOWC_STORE_URL, else flowc.yaml's `store:`.
    None: the embedded default (one instance, its own DuckDB ledger)."""
    env = os.environ if env is None else env
    url = flag or env.get(STORE_ENV) or configured
    if not url:
        return None
    if not _URL.match(url):
        raise StoreError(f"store URL must start with postgresql:// (got {redact(url)!r})")
    return url


def redact(url: str) -> str:
    """The URL with its password cut out, for logs and errors."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    import psycopg

    return psycopg.connect(url, autocommit=autocommit, application_name="flowc")


def migrate(conn: psycopg.Connection, migrations: Sequence[tuple[str, str]]) -> list[str]:
    """Apply the ``(name, sql)`` migrations not yet applied, in order; returns their names.
    Safe when several instances run it at once."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS flowc_migrations ("
                     "name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT name FROM flowc_migrations")}
        for name, sql in migrations:
            if name in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO flowc_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied
