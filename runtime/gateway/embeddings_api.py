"""`POST /v1/embeddings`: OpenAI's embeddings API in front of OpenAI, Ollama and any
OpenAI-compatible server (runtime/providers/embeddings.py calls each). Routed, retried,
fallen back and recorded like any model call: one ledger row per attempt, with its prompt
tokens and cost."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.responses import Response

from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import error_response, flowc_headers, parse_body
from runtime.gateway.validate import check
from runtime.providers import ChatResult, FlowcError, Target
from runtime.providers.embeddings import check_input, embed


class _Call:
    """One embeddings request, sent to each target the plan tries."""

    def __init__(self, incoming: Incoming, body: dict[str, Any], caller: ModelCaller) -> None:
        self.incoming, self.body, self.caller = incoming, body, caller
        self.raw: bytes | None = None  # the answering upstream's bytes, when sent as they came

    async def send(self, target: Target) -> ChatResult:
        ep = self.caller.providers.endpoint(target)
        done = await embed(ep, self.incoming.body, self.body, target.model,
                           str(self.body.get("model")))
        self.raw = done.raw
        return done.result


async def embeddings(incoming: Incoming, caller: ModelCaller) -> Response:
    body: Any = None
    try:
        body = parse_body(incoming.body)
        check("embeddings", body)
        check_input(body)
        call = _Call(incoming, body, caller)
        out = await caller.complete(body, tags=incoming.tags, ctx=incoming.context(),
                                    send=call.send)
    except FlowcError as err:
        caller.refused(body, err, ctx=incoming.context(), tags=incoming.tags)
        return error_response(err)
    total = (time.perf_counter() - incoming.t0) * 1000
    headers = flowc_headers(out.target.provider, out.body.get("model") or out.target.model,
                            out.cost, total - out.upstream_ms, out.rule)
    content = call.raw if call.raw is not None else orjson.dumps(out.body)
    return Response(content, media_type="application/json", headers=headers)
