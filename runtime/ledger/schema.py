"""The ledger's schema, grown by named, append-only migrations (recorded in a table)."""

from __future__ import annotations

import duckdb

REQUEST_COLUMNS = (
    "id", "ts", "workflow_name", "run_id", "step_id", "model", "provider", "served_model",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
    "cache_write_tokens", "reasoning_tokens", "cost_usd", "price_source", "latency_ms",
    "ttft_ms", "success", "error", "error_class", "route", "stream", "dry_run",
    "cache_write_1h_tokens", "status", "usage_estimated", "clamped", "key_id", "key_name",
    "team", "tags", "cached", "saved_usd",
)
STATUSES = ("ok", "error", "cancelled")

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_requests", """
        CREATE TABLE requests (
            id VARCHAR NOT NULL,              -- a uuid; no index, so appends stay fast
            ts TIMESTAMP NOT NULL,            -- UTC
            workflow_name VARCHAR,
            run_id VARCHAR,
            step_id VARCHAR,
            model VARCHAR,                    -- as requested (alias or provider/model)
            provider VARCHAR,
            served_model VARCHAR,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            cached_tokens INTEGER,
            cache_write_tokens INTEGER,
            reasoning_tokens INTEGER,
            cost_usd DECIMAL(18, 9),          -- NULL when the model has no known price
            price_source VARCHAR,
            latency_ms DOUBLE,
            ttft_ms DOUBLE,                   -- streams: time to first token
            success BOOLEAN NOT NULL,
            error VARCHAR,
            error_class VARCHAR,
            route VARCHAR,                    -- the routing rule that chose the model
            stream BOOLEAN,
            dry_run BOOLEAN
        )"""),
    ("0002_workflows", """
        CREATE TABLE workflows (
            id VARCHAR PRIMARY KEY,
            name VARCHAR UNIQUE NOT NULL,
            config_yaml VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL,
            updated_at TIMESTAMP NOT NULL
        )"""),
    ("0003_runs", """
        CREATE TABLE runs (
            id VARCHAR PRIMARY KEY,
            workflow_name VARCHAR NOT NULL,
            inputs_hash VARCHAR,
            status VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            latency_ms DOUBLE,
            dry_run BOOLEAN,
            record JSON                        -- per-step results, skip reasons, output
        )"""),
    # A call's token counts can pass 2**31 summed (prompt + completion into total_tokens);
    # an INTEGER overflow failed the whole batch the row was in.
    ("0004_bigint_tokens", ";".join(
        f"ALTER TABLE requests ALTER COLUMN {c} TYPE BIGINT"
        for c in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                  "cache_write_tokens", "reasoning_tokens"))),
    # Of cache_write_tokens, those written for one hour (Anthropic bills 2x base input
    # against 1.25x for 5 minutes). NULL on rows recorded before this migration.
    ("0005_cache_write_1h", "ALTER TABLE requests ADD COLUMN cache_write_1h_tokens BIGINT"),
    # status: ok | error | cancelled (a call cut off by a step timeout, a cancelled sibling
    # or a client that went away; `success` stays, true exactly when status is ok).
    # usage_estimated: the token counts (and so the cost) are an estimate, not the
    # provider's report (a stream cut before its usage event, an answer without usage).
    # clamped: a value could not be stored as given (a cost past DECIMAL(18, 9), a count
    # past BIGINT) and was stored clamped rather than losing the row.
    ("0006_status_estimates", ";".join([
        "ALTER TABLE requests ADD COLUMN status VARCHAR",
        "ALTER TABLE requests ADD COLUMN usage_estimated BOOLEAN DEFAULT false",
        "ALTER TABLE requests ADD COLUMN clamped BOOLEAN DEFAULT false",
        "UPDATE requests SET status = CASE WHEN success THEN 'ok' ELSE 'error' END, "
        "usage_estimated = false, clamped = false",
    ])),
    # The team gateway (docs/keys.md): who made each call and run, the virtual keys (only
    # a hash of each secret), and the budget alerts fired. `tags` is "k=v,k2=v2", sorted.
    ("0007_keys", ";".join([
        "ALTER TABLE requests ADD COLUMN key_id VARCHAR",
        "ALTER TABLE requests ADD COLUMN key_name VARCHAR",
        "ALTER TABLE requests ADD COLUMN team VARCHAR",
        "ALTER TABLE requests ADD COLUMN tags VARCHAR",
        "ALTER TABLE runs ADD COLUMN key_id VARCHAR",
        "ALTER TABLE runs ADD COLUMN team VARCHAR",
        """CREATE TABLE keys (
            id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            hash VARCHAR NOT NULL,            -- SHA-256 of the secret; the secret is not kept
            hint VARCHAR,                     -- the secret's last four characters
            team VARCHAR,
            budget_usd DECIMAL(18, 9),
            period VARCHAR,
            rpm BIGINT,
            tpm BIGINT,
            models VARCHAR[],
            pipelines VARCHAR[],
            read_only BOOLEAN,
            tags VARCHAR[],
            created_at TIMESTAMP NOT NULL,     -- UTC, like every time in the ledger
            expires_at TIMESTAMP,
            revoked_at TIMESTAMP
        )""",
        """CREATE TABLE alerts (
            ts TIMESTAMP NOT NULL,
            scope_kind VARCHAR NOT NULL,       -- key | team | tag | pipeline
            scope_name VARCHAR NOT NULL,
            threshold INTEGER NOT NULL,        -- percent of the limit
            limit_usd DECIMAL(18, 9),
            spent_usd DECIMAL(18, 9),
            period VARCHAR,
            period_start TIMESTAMP
        )""",
    ])),
    # Step caching (docs/dsl.md, `cache:`): the cached results, keyed by the SHA-256 of the
    # step's rendered request; a hit is a requests row with cost_usd 0, cached = true and
    # saved_usd the cost the call had when its result was stored.
    ("0008_step_cache", ";".join([
        "ALTER TABLE requests ADD COLUMN cached BOOLEAN DEFAULT false",
        "ALTER TABLE requests ADD COLUMN saved_usd DECIMAL(18, 9)",
        """CREATE TABLE step_cache (
            key VARCHAR PRIMARY KEY,          -- SHA-256 of the canonical JSON request
            workflow_name VARCHAR,            -- where it was stored from
            step_id VARCHAR,
            run_id VARCHAR,
            model VARCHAR,                    -- as requested; NULL for a tool call
            provider VARCHAR,
            served_model VARCHAR,
            output JSON NOT NULL,             -- the step's result
            cost_usd DECIMAL(18, 9),          -- what producing it cost (NULL: unpriced)
            tokens BIGINT,
            created_at TIMESTAMP NOT NULL     -- UTC
        )""",
    ])),
]


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply the migrations not yet applied; return their names."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMP DEFAULT now())")
    done = {r[0] for r in con.execute("SELECT name FROM schema_migrations").fetchall()}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        con.execute("BEGIN")
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations (name) VALUES (?)", [name])
        con.execute("COMMIT")
        applied.append(name)
    return applied
