"""MCP tools offered to models as function tools.

A function name is `server__tool`: `__` cannot occur in a server name flowc accepts for this
purpose, names keep to `[A-Za-z0-9_-]` and 64 characters (some providers reject others).
"""

from __future__ import annotations

import re
from typing import Any

SEPARATOR = "__"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def function_name(server: str, tool: str) -> str:
    name = f"{_UNSAFE.sub('_', server)}{SEPARATOR}{_UNSAFE.sub('_', tool)}"
    return name[:64]


def split_function_name(name: str) -> tuple[str, str]:
    server, sep, tool = name.partition(SEPARATOR)
    if not sep or not server or not tool:
        raise ValueError(f"'{name}' is not a server{SEPARATOR}tool function name")
    return server, tool


def function_tool(server: str, tool: str, description: str | None,
                  input_schema: dict[str, Any] | None) -> dict[str, Any]:
    schema = {k: v for k, v in (input_schema or {}).items() if k != "$schema"}
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    fn: dict[str, Any] = {"name": function_name(server, tool), "parameters": schema}
    if description:
        fn["description"] = description[:1024]
    return {"type": "function", "function": fn}
