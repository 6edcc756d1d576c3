"""Structured output across wires (needs response_format with tools translated to Anthropic)."""

from __future__ import annotations

from tests.clients.conftest import Clients
from tests.clients.test_python_sdks import run_pydantic_ai


def test_pydantic_ai_native_output_on_anthropic(clients: Clients) -> None:
    """response_format json_schema together with tools, translated to Anthropic."""
    run_pydantic_ai(clients, "anthropic/claude-sonnet-4-6", "native")

