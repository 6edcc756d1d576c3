"""What the CLI's commands use of the shared store (`--store URL`, FLOWC_STORE_URL or
flowc.yaml's `store:`): with one, `flowc run`, `flowc runs approve|reject`, `flowc keys`,
`flowc mcp list` and `flowc mcp serve` read and write Postgres, never the project's own
ledger file, which the instances do not read (docs/scaling.md). (`flowc keys` on the store
is runtime/cli.py's `_SharedKeys`.)

A command that records calls (a run) writes them through a spool as an instance does
(runtime/pg/ledger.py), under the name `<hostname>:cli` (`:cli-2`, `:cli-3`, ... while
another command holds that one's spool), so the rows say they came from a command on that
machine, and what a killed command left in its spool is sent by the next command that
takes the name."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flowc.config import ProjectConfig
from runtime.pg import db

_NAMES = 64  # commands at once on one machine and project, at most


class StoreUnusable(RuntimeError):
    """The shared store cannot be used (unreachable, refused): the command's error."""


def _names() -> Iterator[str]:
    """`<hostname>:cli`, then `:cli-2`, `:cli-3`, ...: one each for commands at once."""
    host = socket.gethostname()
    yield f"{host}:cli"
    for n in range(2, _NAMES + 1):
        yield f"{host}:cli-{n}"


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def command_ledger(cfg: ProjectConfig, project_dir: Path, url: str) -> Any:
    """A `PgLedger` for one command, under the first free `<hostname>:cli[-n]` name."""
    import psycopg

    from runtime.pg.ledger import PgLedger
    from runtime.pg.spool import SpoolLocked
    from runtime.server import SPOOL, spool_name

    for name in _names():
        try:
            return PgLedger(url, project_dir / SPOOL / spool_name(name), name,
                            cfg.ledger.flush_interval, retention=cfg.ledger.retention)
        except SpoolLocked:
            continue
        except psycopg.Error as exc:
            raise StoreUnusable(f"cannot use the shared store {db.redact(url)}: "
                                f"{_reason(exc)}") from None
    raise StoreUnusable(f"{_NAMES} flowc commands already record into the shared store "
                        f"from {project_dir}: wait for one to finish")


def command_instance(project_dir: Path) -> str:
    """A free `<hostname>:cli[-n]` name for a command that starts a whole runtime
    (`flowc mcp serve --store`): its spool is then taken by `Runtime.start`."""
    from runtime.pg.spool import Spool, SpoolLocked
    from runtime.server import SPOOL, spool_name

    for name in _names():
        try:
            Spool(project_dir / SPOOL / spool_name(name)).close()
        except SpoolLocked:
            continue
        return name
    raise StoreUnusable(f"{_NAMES} flowc commands already use the shared store from "
                        f"{project_dir}: wait for one to finish")


def registered_pipeline(ledger: Any, name: str) -> str | None:
    """The YAML of the pipeline registered over HTTP under ``name``, if any."""
    rows = ledger.execute("SELECT config_yaml FROM workflows WHERE name = ?", [name])
    return rows[0][0] if rows else None


def _on_store(url: str, work: Callable[[Any], Any]) -> Any:
    """``work(execute)`` on a connection of the command's own (schema made current)."""
    import psycopg

    from runtime.mcp.discovered import on_connection
    from runtime.pg.schema import MIGRATIONS

    try:
        with psycopg.connect(url, autocommit=True, application_name="flowc",
                             connect_timeout=5) as conn:
            # the ledger's tables only: not runtime.pg.ledger (and DuckDB: 0.2 s) for
            # `flowc check`; instances make the reader role when they start
            db.migrate(conn, MIGRATIONS)
            return work(on_connection(conn))
    except psycopg.Error as exc:
        raise StoreUnusable(f"cannot use the shared store {db.redact(url)}: "
                            f"{_reason(exc)}") from None


def store_tools(url: str) -> dict[str, Any]:
    """The MCP tools discovered on any instance (runtime/mcp/discovered.py)."""
    from runtime.mcp.discovered import load

    return _on_store(url, load)  # type: ignore[no-any-return]


def save_tools(url: str, found: dict[str, dict[str, Any]]) -> list[str]:
    """A command's discovery, for every instance; the servers stored."""
    from runtime.mcp.discovered import save

    return _on_store(url, lambda execute: save(execute, found,  # type: ignore[no-any-return]
                                               f"{socket.gethostname()}:cli"))
