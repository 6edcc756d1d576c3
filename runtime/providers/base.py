"""What every provider adapter shares: usage, results, errors, and the pooled HTTP client.

The gateway speaks OpenAI's Chat Completions format inside: a request is an OpenAI request
dict, a result an OpenAI `chat.completion` dict, a stream a sequence of
`chat.completion.chunk` dicts. Each adapter translates that to its provider's wire format
and back, exactly, and refuses (400) what its provider cannot honour.

Errors, drawn once:

    FlowcError                      anything the gateway reports to a client
    ├── RequestError (4xx)          the client's request is wrong (bad field, unknown model)
    │   └── UnsupportedFeature      a field this provider cannot honour
    └── UpstreamError               the provider failed: status, body, Retry-After
        ├── UpstreamTimeout         no answer in time
        └── UpstreamUnavailable     connection refused, reset or dropped
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from runtime.providers.http1 import Pool

# -- usage and results -------------------------------------------------------------------------


@dataclass
class Usage:
    """Token counts as the provider bills them, normalised.

    ``prompt_tokens`` is every input token billed (cache reads and writes included, as in
    OpenAI's accounting); ``cached_tokens`` and ``cache_write_tokens`` say how many of them
    were cache reads and writes, and ``cache_write_1h_tokens`` how many of the writes were
    for one hour (Anthropic bills those at 2x base input, 5-minute writes at 1.25x).
    ``completion_tokens`` includes ``reasoning_tokens``. ``estimated``: some counts are
    estimates (`estimate_usage`), not the provider's report.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }
        return out

    @classmethod
    def from_openai(cls, u: dict[str, Any] | None) -> Usage:
        """OpenAI's usage object; a wrong-shaped one raises (TypeError, ValueError,
        AttributeError), which the adapters report as a malformed answer."""
        if not u:
            return cls()
        p = u.get("prompt_tokens_details") or {}
        c = u.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(u.get("prompt_tokens") or 0),
            completion_tokens=int(u.get("completion_tokens") or 0),
            cached_tokens=int(p.get("cached_tokens") or 0),
            reasoning_tokens=int(c.get("reasoning_tokens") or 0),
        )


# -- estimates -----------------------------------------------------------------------------------
# When a provider does not say what a call used (a stream cut before its usage event, an
# answer without `usage`), the ledger records an estimate, marked `usage_estimated`: about
# four characters a token, of the request's text (message contents, tool-call arguments,
# tool definitions) and of the answer's text (content and tool-call arguments) as far as it
# came. Counts the provider did report are kept (Anthropic's `message_start` input tokens).
# No tokenizer: the exact ones download their vocabularies at run time.
CHARS_PER_TOKEN = 4


def tokens_of(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    n = 0
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                n += len(part["text"])
            elif part.get("type") in ("tool_result", "function_call_output"):
                n += _text_chars(part.get("content") or part.get("output"))
            elif part.get("type") in ("tool_use", "function_call"):
                n += len(str(part.get("input") or part.get("arguments") or ""))
    return n


def request_chars(req: dict[str, Any]) -> int:
    """The characters of a request's text, for estimates, in any of the wires served: chat
    completions (`messages`), Anthropic messages (`system`, content blocks) and responses
    (`instructions`, `input` items)."""
    n = _text_chars(req.get("system")) + _text_chars(req.get("instructions"))
    items = req.get("input")
    if isinstance(items, str):
        n += len(items)
    elif isinstance(items, list):
        n += _text_chars(items)
        n += sum(len(i) for i in items if isinstance(i, str))  # embeddings' list of strings
        n += sum(_text_chars(i.get("content")) for i in items if isinstance(i, dict))
    for msg in req.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        n += _text_chars(msg.get("content"))
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                n += len(str(fn.get("arguments") or ""))
    if req.get("tools"):
        n += len(orjson.dumps(req["tools"], default=str))
    return n


def answer_chars(body: dict[str, Any]) -> int:
    """The characters of an OpenAI chat.completion's answer, for estimates."""
    n = 0
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        n += _text_chars(message.get("content"))
        for call in message.get("tool_calls") or ():
            n += len(str((call.get("function") or {}).get("arguments") or ""))
    return n


def estimate_usage(req: dict[str, Any], out_chars: int, known: Usage | None = None) -> Usage:
    """What a call used, as far as can be told: the counts the provider reported (``known``),
    the rest estimated from the request's and the answer's text. Marked ``estimated``."""
    known = known or Usage()
    return Usage(prompt_tokens=known.prompt_tokens or tokens_of(request_chars(req)),
                 completion_tokens=max(known.completion_tokens, tokens_of(out_chars)),
                 cached_tokens=known.cached_tokens, cache_write_tokens=known.cache_write_tokens,
                 reasoning_tokens=known.reasoning_tokens,
                 cache_write_1h_tokens=known.cache_write_1h_tokens, estimated=True)


@dataclass
class ChatResult:
    body: dict[str, Any]  # an OpenAI chat.completion
    usage: Usage
    upstream_ms: float


@dataclass
class StreamState:
    """Filled in while a stream runs; read when it ends. ``usage`` is the provider's final
    report and stays None when the stream ends without one (cut off, or a server that does
    not send it); then ``partial`` (counts reported so far, e.g. Anthropic's `message_start`)
    and ``out_chars`` (the answer's text so far) make the estimate."""

    usage: Usage | None = None
    partial: Usage | None = None
    out_chars: int = 0
    finish_reason: str | None = None
    first_token_ms: float | None = None
    upstream_ms: float = 0.0
    model: str | None = None  # the model the provider says answered, when it says
    started: float = field(default_factory=time.perf_counter)

    def mark_token(self) -> None:
        if self.first_token_ms is None:
            self.first_token_ms = (time.perf_counter() - self.started) * 1000


# -- errors ------------------------------------------------------------------------------------
class FlowcError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class RequestError(FlowcError):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.code = code
        if status == 404:
            self.type = "not_found_error"


class UnsupportedFeature(RequestError):
    def __init__(self, provider: str, what: str, param: str | None = None) -> None:
        super().__init__(f"{provider} cannot honour {what}", param=param,
                         code="unsupported_parameter")


_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "not_found_error", 408: "timeout",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


class UpstreamError(FlowcError):
    """The provider answered with an error (or not at all)."""

    def __init__(self, provider: str, status: int, message: str, *,
                 retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status
        self.type = _TYPES.get(status, "api_error")
        self.retry_after = retry_after
        self.body = body

    @property
    def retryable(self) -> bool:
        """Worth another attempt or a fallback: rate limits, server errors, no answer."""
        return self.status in (408, 409, 429) or self.status >= 500


class UpstreamTimeout(UpstreamError):
    def __init__(self, provider: str, seconds: float) -> None:
        super().__init__(provider, 504, f"no answer within {seconds:g} s")
        self.type = "timeout"


class UpstreamUnavailable(UpstreamError):
    def __init__(self, provider: str, detail: str) -> None:
        super().__init__(provider, 502, f"connection failed ({detail})")


# What a wrong-shaped answer raises while it is read (a list where an object belongs, a
# string where a count does): the adapters turn these into `Endpoint.malformed`.
SHAPE_ERRORS = (AttributeError, TypeError, KeyError, ValueError, IndexError)


def retry_after_seconds(headers: Any) -> float | None:
    """`Retry-After` as seconds (it may be a number or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _key_redactor(key: str) -> Callable[[bytes, bool], bytes]:
    """How one provider key is cut out of text (see `Endpoint.redact`)."""
    k = key.encode()
    mark = b"[redacted]"
    if len(k) >= 8:
        prefix = k[:8]

        def long_key(raw: bytes, masked: bool) -> bytes:
            raw = raw.replace(k, mark)
            return raw.replace(prefix, mark) if masked else raw
        return long_key
    # A short key is also an ordinary string ("k", "test", "EMPTY"): rewriting every
    # occurrence would mangle text. It is cut where it stands as a token of its own (not
    # inside a longer word) in error text, and in answers only where it stands as a
    # credential: after `Bearer` or an api-key label, as an echoed header would show it.
    word = rb"(?<![A-Za-z0-9_\-])" + re.escape(k) + rb"(?![A-Za-z0-9_\-])"
    token = re.compile(word)
    credential = re.compile(rb"(?i)(bearer\s+|api[-_]?key[\"']?\s*[:=]\s*[\"']?)" + word)

    def short_key(raw: bytes, masked: bool) -> bytes:
        if k not in raw:
            return raw
        if masked:
            return token.sub(mark, raw)
        return credential.sub(lambda m: m.group(1) + mark, raw)
    return short_key


def error_message(provider: str, status: int, raw: bytes) -> tuple[str, Any]:
    """The provider's own error message, from whichever error shape it uses."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", errors="replace").strip()
        return (text[:500] or f"HTTP {status}"), None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err), body
    if isinstance(err, str):
        return err, body
    return f"HTTP {status}", body


# -- the HTTP side -----------------------------------------------------------------------------
@dataclass
class Endpoint:
    """One provider endpoint: where it is, how to authenticate, and its pooled client.

    One-shot POSTs (`post`) go through flowc's own keep-alive HTTP/1.1 pool
    (runtime/providers/http1.py): about 0.2 ms less per request than aiohttp's client.
    Streams and GETs use aiohttp, rather than httpx: measured on the reference machine,
    httpx's CPU cost per request doubles under concurrency (~720 req/s through a minimal
    proxy, against ~8,600 with aiohttp); see docs/benchmarks.md.
    """

    name: str  # the provider name models are addressed by (openai, anthropic, groq, ...)
    kind: str  # wire format: openai | anthropic | ollama
    base_url: str
    api_key: str | None = None
    timeout: float = 60.0
    responses: bool = False  # serves OpenAI's Responses API (/v1/responses goes verbatim)
    headers: dict[str, str] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    _pool: Pool | None = field(default=None, repr=False)
    _redactor: tuple[str | None, Callable[[bytes, bool], bytes] | None] = field(
        default=(None, None), repr=False)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookie jar, no decompression work we do not need: this is the hot path.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30,
                                               ttl_dns_cache=300),
                cookie_jar=aiohttp.DummyCookieJar(),
                json_serialize=lambda o: orjson.dumps(o).decode(),
                skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    def pool(self) -> Pool:
        if self._pool is None or self._pool.url != self.base_url:
            self._pool = Pool(self.base_url)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str],
              **options: Any) -> Any:
        return self.session().post(
            self.url(path), data=orjson.dumps(payload),
            headers={"content-type": "application/json", **self.headers, **headers}, **options)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """aiohttp's failures as the provider's: a timeout, or no usable connection."""
        try:
            yield
        except TimeoutError:
            raise UpstreamTimeout(self.name, self.timeout) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(self.name, type(exc).__name__) from None

    async def post(self, path: str, payload: dict[str, Any], headers: dict[str, str]
                   ) -> tuple[int, Any, bytes, float]:
        """POST JSON; returns status, headers, body and the upstream time in ms."""
        t0 = time.perf_counter()
        try:
            status, got, body = await self.pool().post(
                path, orjson.dumps(payload),
                {"content-type": "application/json", **self.headers, **headers}, self.timeout)
        except TimeoutError:
            raise UpstreamTimeout(self.name, self.timeout) from None
        except OSError as exc:  # refused, reset, unreadable (http1.ProtocolError)
            raise UpstreamUnavailable(self.name, type(exc).__name__) from None
        return status, got, body, (time.perf_counter() - t0) * 1000

    async def open_stream(self, path: str, payload: dict[str, Any], headers: dict[str, str]
                          ) -> aiohttp.ClientResponse:
        """POST and return the open response once its status is known (caller closes it).
        The timeout bounds the wait for headers and each read, not the whole stream."""
        with self._failures():
            resp = await self._post(path, payload, headers, timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeout, sock_read=self.timeout))
        if resp.status >= 400:
            raw = await resp.read()
            resp.release()
            raise self.error(resp.status, resp.headers, raw)
        return resp

    def parse(self, raw: bytes) -> Any:
        """The JSON of a provider's answer (with the key cut out, should the provider echo
        it); a malformed body is the provider's failure."""
        if self.api_key:
            raw = self.redact(raw, masked=False)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.malformed(raw, "not JSON") from None

    def malformed(self, raw: bytes | Any, what: str) -> UpstreamError:
        """A 200 answer flowc cannot read (not JSON, or JSON of the wrong shape): the
        provider failed (502), so the call is retried or falls back like any 5xx."""
        if not isinstance(raw, bytes):
            raw = orjson.dumps(raw, default=str)
        text = self.redact(raw)[:300].decode("utf-8", errors="replace")  # cut, then trim
        return UpstreamError(self.name, 502, f"malformed response body ({what}): {text}")

    def error(self, status: int, headers: Any, raw: bytes) -> UpstreamError:
        message, body = error_message(self.name, status, self.redact(raw))
        return UpstreamError(self.name, status, message,
                             retry_after=retry_after_seconds(headers), body=body)

    def redact(self, raw: bytes, masked: bool = True) -> bytes:
        """Providers echo keys in some errors ("Incorrect API key provided: sk-...") and a
        broken upstream may echo the request's headers: a key never leaves flowc, not even
        back to the client that did not send it. A key of 8 characters or more is cut out
        wherever it appears; with ``masked`` (error text) so is its first 8 characters, the
        part providers show of a key they mask ("sk-proj-****abcd"). A shorter key: see
        `_key_redactor`."""
        key = self.api_key
        if not key:
            return raw
        cached_key, redactor = self._redactor
        if cached_key != key or redactor is None:
            redactor = _key_redactor(key)
            self._redactor = (key, redactor)
        return redactor(raw, masked)

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode()).decode("utf-8", errors="replace") \
            if self.api_key else text


async def sse_events(resp: aiohttp.ClientResponse, ep: Endpoint
                     ) -> AsyncIterator[tuple[str | None, bytes]]:
    """Server-Sent Events as ``(event, data)``; a dropped connection is an upstream error,
    and so is a wait longer than the endpoint's timeout for the next line."""
    provider = ep.name
    event: str | None = None
    data: list[bytes] = []
    try:
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data = None, []
                continue
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", errors="replace")
        if data:
            yield event, b"\n".join(data)
    except TimeoutError:
        raise UpstreamTimeout(provider, ep.timeout) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamUnavailable(provider, f"stream cut off: {type(exc).__name__}") from None


async def close_all(endpoints: list[Endpoint]) -> None:
    await asyncio.gather(*(e.close() for e in endpoints), return_exceptions=True)
