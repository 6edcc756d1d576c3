"""The shared store's groundwork: its URL and migrations, on a real Postgres."""

from __future__ import annotations

import threading

import pytest

from runtime.pg.db import StoreError, connect, migrate, redact, store_url

MIGRATIONS = [("0001_a", "CREATE TABLE a (x INT)"),
              ("0002_b", "CREATE TABLE b (y INT); INSERT INTO a VALUES (1)")]


def test_two_instances_migrating_at_once_apply_each_migration_once(postgres) -> None:
    url = postgres.fresh_database()
    applied: list[list[str]] = []

    def start() -> None:
        with connect(url) as conn:
            applied.append(migrate(conn, MIGRATIONS))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(applied, key=len) == [[], [], [], ["0001_a", "0002_b"]]
    with connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM a").fetchone() == (1,)
        assert migrate(conn, [*MIGRATIONS, ("0003_c", "CREATE TABLE c (z INT)")]) == ["0003_c"]


def test_store_url_comes_from_the_flag_the_env_or_the_config() -> None:
    env = {"FLOWC_STORE_URL": "postgresql://e@h/db"}
    assert store_url("postgresql://f@h/db", "postgresql://c@h/db", env) == "postgresql://f@h/db"
    assert store_url(None, "postgresql://c@h/db", env) == "postgresql://e@h/db"
    assert store_url(None, "postgresql://c@h/db", {}) == "postgresql://c@h/db"
    assert store_url(None, None, {}) is None
    with pytest.raises(StoreError, match=r"must start with postgresql:// .*u:\*\*\*@"):
        store_url("mysql://u:secret@h/db", None, {})
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
