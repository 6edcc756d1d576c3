"""flowc's shared store on Postgres: what several `flowc serve` instances share (keys,
budgets, rate limits, pipelines, run records, the ledger). See docs/scaling.md."""
