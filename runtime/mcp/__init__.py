"""MCP: sessions with the servers in flowc.yaml, discovery, and tool calls."""
