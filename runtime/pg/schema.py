"""The ledger's tables on the shared Postgres: named migrations ("ledger_NNNN_..."; the
access tables use their own prefix), applied by `runtime.pg.db.migrate` under its
advisory lock, so instances starting together take turns.

`requests` is partitioned by day on `ts` (UTC, without a zone, like the embedded ledger):
retention drops whole partitions (`DROP TABLE`), never a DELETE that leaves dead rows for
VACUUM. Its key is (id, ts): a partitioned table's unique key must hold the partition
column, and a row sent twice (a batch resent after a lost connection) carries the same id
and ts, so `ON CONFLICT DO NOTHING` keeps one. No other index: each costs ingest speed, and
reports scan a range of days anyway."""

from __future__ import annotations

from runtime.ledger.schema import REQUEST_COLUMNS

# The embedded ledger's columns plus the instance that served the row.
PG_COLUMNS = (*REQUEST_COLUMNS, "instance")
# What a spooled row holds after its id, in order: one JSON array a line (see
# runtime/pg/ledger.py); `ts` is epoch seconds, cast in the database, where total_tokens,
# status (when None), clamped and the instance are filled in.
SPOOL_FIELDS = (
    "ts", "workflow_name", "run_id", "step_id", "model", "provider", "served_model",
    "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
    "reasoning_tokens", "cost_usd", "price_source", "latency_ms", "ttft_ms", "success",
    "error", "error_class", "route", "stream", "dry_run", "cache_write_1h_tokens", "status",
    "usage_estimated", "key_id", "key_name", "team", "tags", "cached", "saved_usd",
)

MIGRATIONS: list[tuple[str, str]] = [
    ("ledger_0001_requests", """
        CREATE TABLE requests (
            id TEXT NOT NULL,
            ts TIMESTAMP NOT NULL,            -- UTC, when the call ended
            workflow_name TEXT,
            run_id TEXT,
            step_id TEXT,
            model TEXT,
            provider TEXT,
            served_model TEXT,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            total_tokens BIGINT,
            cached_tokens BIGINT,
            cache_write_tokens BIGINT,
            reasoning_tokens BIGINT,
            cost_usd NUMERIC(18, 9),          -- NULL when the model has no known price
            price_source TEXT,
            latency_ms DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION,
            success BOOLEAN NOT NULL,
            error TEXT,
            error_class TEXT,
            route TEXT,
            stream BOOLEAN,
            dry_run BOOLEAN,
            cache_write_1h_tokens BIGINT,
            status TEXT,
            usage_estimated BOOLEAN DEFAULT false,
            clamped BOOLEAN DEFAULT false,
            key_id TEXT,
            key_name TEXT,
            team TEXT,
            tags TEXT,
            instance TEXT,                    -- the flowc instance that served the call
            PRIMARY KEY (id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE TABLE workflows (
            id TEXT PRIMARY KEY,
            name TEXT UNIQUE NOT NULL,
            config_yaml TEXT NOT NULL,
            created_at TIMESTAMP NOT NULL,
            updated_at TIMESTAMP NOT NULL
        );
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            workflow_name TEXT NOT NULL,
            inputs_hash TEXT,
            status TEXT NOT NULL,
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            latency_ms DOUBLE PRECISION,
            dry_run BOOLEAN,
            record JSONB,
            key_id TEXT,
            team TEXT,
            instance TEXT
        );
        CREATE INDEX runs_started ON runs (started_at)"""),
    # Step caching (docs/dsl.md, `cache:`), as the embedded ledger's 0008_step_cache: a hit
    # is a $0 row marked cached, with what the call had cost.
    ("ledger_0002_step_cache", """
        ALTER TABLE requests ADD COLUMN cached BOOLEAN DEFAULT false,
                             ADD COLUMN saved_usd NUMERIC(18, 9);
        CREATE TABLE step_cache (
            key TEXT PRIMARY KEY,             -- SHA-256 of the canonical JSON request
            workflow_name TEXT,
            step_id TEXT,
            run_id TEXT,
            model TEXT,
            provider TEXT,
            served_model TEXT,
            output TEXT NOT NULL,             -- the step's result as JSON
            cost_usd NUMERIC(18, 9),
            tokens BIGINT,
            created_at TIMESTAMP NOT NULL     -- UTC
        )"""),
    # The MCP discovery cache every instance reads (runtime/mcp/discovered.py): one row
    # per server, its tools as the last discovery on any instance found them.
    ("ledger_0003_mcp_tools", """
        CREATE TABLE mcp_tools (
            server TEXT PRIMARY KEY,
            tools JSONB NOT NULL,             -- [{name, description, inputSchema, ...}]
            discovered_at TIMESTAMP NOT NULL, -- UTC
            instance TEXT                     -- the instance (or command) that asked
        )"""),
]


def partition_name(day: str) -> str:
    """The partition holding ``day`` (YYYY-MM-DD)."""
    return "requests_" + day.replace("-", "")
