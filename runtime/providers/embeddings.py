"""Embeddings at each provider, in OpenAI's embeddings wire (`POST /v1/embeddings`).

An OpenAI endpoint (OpenAI, or any OpenAI-compatible server) gets the client's request
verbatim at `{base_url}/embeddings` and its answer goes back as it came. Ollama's
`/api/embed` takes a string or a list of strings; its `embeddings` come back as OpenAI's
`data` items and its `prompt_eval_count` as the usage, and `encoding_format: base64` is
served as OpenAI serves it (the float32 vector's little-endian bytes, base64-encoded).
Anthropic has no embeddings API. The table: docs/wires/embeddings.md.
"""

from __future__ import annotations

import array
import base64
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from runtime.providers.base import (
    SHAPE_ERRORS,
    ChatResult,
    Endpoint,
    RequestError,
    Usage,
    tokens_of,
)

ENCODINGS = ("float", "base64")
_INVALID_INPUT = ("'$.input' is invalid. Please check the API reference: "
                  "https://platform.openai.com/docs/api-reference.")


@dataclass
class Embedded:
    """An answer in OpenAI's shape (`result.body`), and the upstream's own bytes when they
    are that answer already (same wire: sent back as they came)."""

    result: ChatResult
    raw: bytes | None = None


def check_input(body: dict[str, Any]) -> None:
    """OpenAI's input shapes: a string, or a non-empty array of strings, of token ids, or
    of non-empty arrays of token ids; and an `encoding_format` OpenAI knows."""
    value = body.get("input")
    if not _valid_input(value):
        raise RequestError(_INVALID_INPUT, param="input", code="invalid_value")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODINGS:
        raise RequestError(f"Invalid value: '{fmt}'. Supported values are: 'float' and "
                           "'base64'.", param="encoding_format", code="invalid_value")


def _token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_input(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value) or all(_token(v) for v in value):
        return True
    return all(isinstance(v, list) and v and all(_token(t) for t in v) for v in value)


def _texts(body: dict[str, Any]) -> list[str]:
    value = body["input"]
    return [value] if isinstance(value, str) else value


# -- OpenAI and OpenAI-compatible servers: verbatim ----------------------------------------------
async def openai_embed(ep: Endpoint, raw: bytes, body: dict[str, Any], model: str) -> Embedded:
    """The client's bytes (or, when ``model`` is not the one it named, its JSON with only
    `model` replaced) to `{base_url}/embeddings`; the answer's bytes back as they came."""
    payload: Any = orjson.Fragment(raw) if body.get("model") == model else {**body,
                                                                            "model": model}
    headers = {"authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    status, resp_headers, answer, ms = await ep.post("/embeddings", payload, headers)
    if status >= 400:
        raise ep.error(status, resp_headers, answer)
    if ep.api_key:
        answer = ep.redact(answer, masked=False)
    out = ep.parse(answer)
    if not isinstance(out, dict) or not isinstance(out.get("data"), list):
        raise ep.malformed(answer, "not an embeddings list")
    usage = out.get("usage")
    try:
        counted = Usage(prompt_tokens=int(usage["prompt_tokens"])) if isinstance(
            usage, dict) and usage.get("prompt_tokens") is not None else None
    except SHAPE_ERRORS as exc:
        raise ep.malformed(answer, str(exc)) from None
    return Embedded(ChatResult(out, counted or _estimate(body), ms), answer)


def _estimate(body: dict[str, Any]) -> Usage:
    """Tokens of the input when the provider does not say (about four characters a token;
    token-id inputs are their own count), marked estimated."""
    value = body["input"]
    items = [value] if isinstance(value, str) else value
    n = 0
    for item in items:
        if isinstance(item, str):
            n += tokens_of(len(item))
        else:
            n += len(item) if isinstance(item, list) else 1
    return Usage(prompt_tokens=n, estimated=True)


# -- Ollama: /api/embed ---------------------------------------------------------------------------
def ollama_request(body: dict[str, Any], model: str, provider: str = "ollama"
                   ) -> dict[str, Any]:
    """`/api/embed`'s body: `input` as a string or a list of strings, `dimensions` as
    asked. Ollama embeds text only (token ids are a tokenizer's own numbers) and answers an
    empty string with no vector, where OpenAI refuses it: both are refused."""
    value = body["input"]
    if not (isinstance(value, str) or all(isinstance(v, str) for v in value)):
        raise RequestError(f"Unsupported value: 'input' does not support token arrays with "
                           f"this model ({model} on {provider}): send the text.",
                           param="input", code="unsupported_value")
    if any(not v for v in _texts(body)):
        raise RequestError(_INVALID_INPUT + " An input cannot be an empty string.",
                           param="input", code="invalid_value")
    out: dict[str, Any] = {"model": model, "input": value}
    if body.get("dimensions") is not None:
        out["dimensions"] = body["dimensions"]
    return out


def base64_vector(vector: list[float]) -> str:
    """A vector as OpenAI's `base64` encoding: its float32 values, little-endian."""
    floats = array.array("f", vector)
    if sys.byteorder != "little":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


def from_ollama(answer: dict[str, Any], body: dict[str, Any], model: str) -> dict[str, Any]:
    """`/api/embed`'s answer in OpenAI's shape (its usage set by the caller)."""
    vectors = answer["embeddings"]
    if not isinstance(vectors, list) or len(vectors) != len(_texts(body)):
        raise ValueError(f"{len(vectors) if isinstance(vectors, list) else 'no'} embeddings "
                         f"for {len(_texts(body))} inputs")
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, vector in enumerate(vectors):
        if not isinstance(vector, list):
            raise TypeError("an embedding that is not a list of numbers")
        data.append({"object": "embedding", "index": i,
                     "embedding": base64_vector(vector) if b64 else vector})
    return {"object": "list", "data": data, "model": answer.get("model") or model}


async def ollama_embed(ep: Endpoint, body: dict[str, Any], model: str) -> Embedded:
    status, headers, raw, ms = await ep.post("/api/embed",
                                             ollama_request(body, model, ep.name), {})
    if status >= 400:
        raise ep.error(status, headers, raw)
    answer = ep.parse(raw)
    try:
        if not isinstance(answer, dict):
            raise TypeError("not an embed response object")
        out = from_ollama(answer, body, model)
        count = answer.get("prompt_eval_count")
        usage = Usage(prompt_tokens=int(count)) if count is not None else _estimate(body)
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None
    out["usage"] = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
    return Embedded(ChatResult(out, usage, ms))


# -- any endpoint ---------------------------------------------------------------------------------
async def embed(ep: Endpoint, raw: bytes, body: dict[str, Any], model: str,
                requested: str) -> Embedded:
    """``body`` (OpenAI's embeddings request, ``raw`` its bytes) at ``ep`` for ``model``;
    ``requested`` is the name the client gave, for a refusal."""
    if ep.kind == "ollama":
        return await ollama_embed(ep, body, model)
    if ep.kind == "openai":
        return await openai_embed(ep, raw, body, model)
    raise RequestError(f"The model '{requested}' does not support embeddings: it is served "
                       f"by {ep.name}/{model}, and Anthropic has no embeddings API. Use an "
                       "OpenAI, Ollama or OpenAI-compatible embedding model.", param="model",
                       code="model_not_supported")
