"""`POST /v1/embeddings`: OpenAI's embeddings API in front of OpenAI, Ollama and any
OpenAI-compatible server."""

from __future__ import annotations

from starlette.responses import Response

from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import error_response
from runtime.providers import RequestError


async def embeddings(incoming: Incoming, caller: ModelCaller) -> Response:
    return error_response(RequestError("embeddings are not served yet", status=404))
