"""The providers' model-list endpoints, as actions for the loopback servers of tests/fakes.py.

Shapes as each API reference documents them: OpenAI `GET /v1/models` (`object: list`,
`data` of `{id, object: model, created, owned_by}`), Anthropic `GET /v1/models` (`data` of
`{type: model, id, display_name, created_at}`, `has_more`, `first_id`, `last_id`; newest
first), Ollama `GET /api/tags` (`models` of `{name, model, modified_at, size, digest,
details}`).
"""

from __future__ import annotations

from typing import Any

from tests.fakes import Action, Recorded


def openai_models(ids: list[str], created: int = 1_715_367_049) -> Action:
    def act(rec: Recorded) -> Any:
        assert rec.path.endswith("/models"), rec.path
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": created + n, "owned_by": "system"}
            for n, i in enumerate(ids)]}
    return act


def anthropic_models(*pages: list[tuple[str, str]]) -> list[Action]:
    """One action per page: ``pages`` of ``(id, display_name)``; every page but the last
    says `has_more`."""
    def page(models: list[tuple[str, str]], more: bool) -> Action:
        def act(rec: Recorded) -> Any:
            assert rec.path == "/v1/models", rec.path
            return {"data": [{"type": "model", "id": i, "display_name": name,
                              "created_at": "2025-05-14T00:00:00Z"} for i, name in models],
                    "has_more": more, "first_id": models[0][0], "last_id": models[-1][0]}
        return act
    return [page(p, n < len(pages) - 1) for n, p in enumerate(pages)]


def ollama_tags(names: list[str]) -> Action:
    def act(rec: Recorded) -> Any:
        assert rec.path == "/api/tags", rec.path
        return {"models": [{
            "name": name, "model": name, "modified_at": "2025-10-03T23:34:03.409490317-07:00",
            "size": 3338801804,
            "digest": "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
            "details": {"format": "gguf", "family": "qwen2", "families": ["qwen2"],
                        "parameter_size": "7.6B", "quantization_level": "Q4_K_M"}}
            for name in names]}
    return act
