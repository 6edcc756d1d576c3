"""flowc runtime: executes compiled pipelines; the gateway, providers, MCP and ledger."""
