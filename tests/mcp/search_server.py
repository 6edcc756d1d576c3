"""A small web-search MCP server (official SDK, stdio) with canned results, standing in for
`brave-search` (which needs the network and an API key) in the research pipeline's tests."""

from mcp.server import MCPServer

server = MCPServer("test-search")


@server.tool()
def web_search(query: str, count: int = 5) -> str:
    """Search the web."""
    results = [f"{i + 1}. Result about {query}: https://example.org/{i}" for i in range(count)]
    return "\n".join(results)


if __name__ == "__main__":
    server.run()
