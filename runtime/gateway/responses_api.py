"""`POST /v1/responses`: the OpenAI Responses API in front of every provider."""

from __future__ import annotations

from starlette.responses import Response

from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import error_response
from runtime.providers import RequestError


async def responses(incoming: Incoming, caller: ModelCaller) -> Response:
    return error_response(RequestError("the Responses API is not served yet", status=404))
