"""The server's front door: a bare ASGI layer in front of FastAPI.

Every request passes these checks, done on raw header bytes so they cost microseconds:

- Host: only localhost, loopback and IP addresses, the bound host and the configured hosts
  are served. A page on evil.example whose name is re-pointed at 127.0.0.1 (DNS rebinding)
  reaches the port with `Host: evil.example`, and gets a 421.
- Origin: a browser names the page that sent a request; a state-changing request from a
  page that is neither this server's own nor a configured origin gets a 403. Configured
  origins get CORS headers; nobody else does.
- Content-Type: a page can send text/plain or a form anywhere without a preflight, so a
  request with a body must say it is JSON (or YAML, for `PUT /v1/workflows/{name}`): 415.
- Body size: 413 from Content-Length up front, or as a chunked body streams in, never
  buffering past the limit. The rest of the body is read and discarded (within a bound)
  before the connection closes, so a client that writes its whole body before reading
  sees the 413, not a connection reset.

Errors are in the client's shape: Anthropic's on /v1/messages, OpenAI's elsewhere.

Then `POST /v1/chat/completions` and `POST /v1/messages` are answered here: FastAPI's routing
and middleware stack cost more per request than everything flowc does for a call (routing,
pricing, ledger). Everything else (pipelines, costs, dashboard, MCP) goes on to FastAPI,
with its body already read. See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from starlette.responses import Response

from runtime import observe
from runtime.access.gate import OPEN, Denied, Gate
from runtime.gateway.anthropic_api import error_type as anthropic_error_type
from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import Answer
from runtime.http_server import respond

log = logging.getLogger("flowc.access")
Handler = Callable[["Incoming", ModelCaller], Awaitable[Response]]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
MAX_BODY = 32 * 1024 * 1024
# After a 413, up to this much of the rest of the body is read and dropped so the answer
# reaches the client; past it (or a client that stalls) the connection is just closed.
DRAIN_BYTES = 1 << 30
DRAIN_SECONDS = 10.0

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
YAML_TYPES = frozenset({b"application/yaml", b"application/x-yaml", b"text/yaml",
                        b"text/x-yaml"})
LOOPBACK_NAMES = (b"localhost", b"127.0.0.1", b"[::1]")
CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE"
CORS_EXPOSE = (b"x-flowc-provider, x-flowc-model, x-flowc-cost-usd, x-flowc-route, "
               b"x-flowc-overhead-ms")
# The headers read, each to a slot of one list: one dict lookup per header.
(_HOST, _ORIGIN, _CTYPE, _CLEN, _CHUNKED, _TAGS, _EXPECT, _ACRM, _ACRH, _AUTH,
 _APIKEY) = range(11)
_WANTED = {b"host": _HOST, b"origin": _ORIGIN, b"content-type": _CTYPE,
           b"content-length": _CLEN, b"transfer-encoding": _CHUNKED, b"x-flowc-tags": _TAGS,
           b"expect": _EXPECT, b"access-control-request-method": _ACRM,
           b"access-control-request-headers": _ACRH, b"authorization": _AUTH,
           b"x-api-key": _APIKEY}
# Answered without a key: liveness, the base URL clients probe (Claude Code sends
# `HEAD /` before anything else) and the dashboard's page, which asks for a key itself.
OPEN_PATHS = frozenset({"/health", "/", "/dashboard"})
PRINCIPAL = "flowc.principal"  # where the caller is left in the ASGI scope for FastAPI


def split_host(value: bytes) -> tuple[bytes, bytes]:
    """``(name, port)`` of a Host value: ``[::1]:8080`` -> ``([::1], 8080)``."""
    if value.startswith(b"["):
        end = value.find(b"]") + 1
        rest = value[end:]
        return value[:end], rest[1:] if rest.startswith(b":") else b""
    name, _, port = value.partition(b":")
    return name, port


def _is_ip(name: bytes) -> bool:
    try:
        ipaddress.ip_address(name[1:-1].decode() if name.startswith(b"[") else name.decode())
    except (ValueError, UnicodeDecodeError):
        return False
    return True


class Guard:
    """Who may call the server, and how large a body may be."""

    def __init__(self, *, bind_host: str | None = None, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = (), max_body: int = MAX_BODY) -> None:
        self.names = set(LOOPBACK_NAMES)
        self.pairs: set[bytes] = set()
        self.any_host = False
        hosts = list(allowed_hosts)
        if bind_host and bind_host not in ("0.0.0.0", "::"):
            hosts.append(f"[{bind_host}]" if ":" in bind_host and "[" not in bind_host
                         else bind_host)
        for h in hosts:
            if h == "*":
                self.any_host = True
                continue
            raw = h.lower().encode()
            name, port = split_host(raw)
            if port:
                self.pairs.add(raw)
            else:
                self.names.add(name)
        self.origins = frozenset(o.lower().rstrip("/").encode() for o in allowed_origins)
        self.max_body = max_body
        self._seen: dict[bytes, bool] = {}

    def describe_hosts(self) -> str:
        return ", ".join(sorted(n.decode() for n in self.names | self.pairs))

    def host_ok(self, value: bytes) -> bool:
        ok = self._seen.get(value)
        if ok is None:
            ok = self._judge_host(value)
            if len(self._seen) < 1024:  # bounded: Host is the client's to choose
                self._seen[value] = ok
        return ok

    def _judge_host(self, value: bytes) -> bool:
        if self.any_host:
            return True
        value = value.lower()
        if value in self.pairs:
            return True
        name, _ = split_host(value)
        # An IP address cannot be re-pointed the way a name can: a request with one as its
        # Host was sent to this machine on purpose.
        return name in self.names or _is_ip(name)

    def origin_ok(self, origin: bytes, host: bytes | None) -> bool:
        """The server's own pages (same host and port), or a configured origin. A sandboxed
        page or a file sends `Origin: null`, which is neither."""
        if origin.lower() in self.origins:
            return True
        _, sep, authority = origin.partition(b"://")
        return bool(sep) and host is not None and authority.lower() == host.lower()


def error_body(path: str, status: int, code: str, message: str) -> bytes:
    """An error in the shape the client on ``path`` expects."""
    if path.startswith("/v1/messages"):
        return orjson.dumps({"type": "error", "error": {"type": anthropic_error_type(status),
                                                        "message": message}})
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": code}})


async def _send_error(send: Any, path: str, status: int, code: str, message: str, *,
                      www_authenticate: bool = False) -> None:
    body = error_body(path, status, code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if www_authenticate and status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="flowc"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _type_refusal(method: str, path: str, ctype: bytes | None, clen: bytes | None,
                  chunked: bool) -> str | None:
    """Why the body's Content-Type is not accepted, or None when it is."""
    if ctype == b"application/json":
        return None
    yaml_ok = method == "PUT" and path.startswith("/v1/workflows/")
    wanted = ("JSON (Content-Type: application/json) or YAML (application/yaml)" if yaml_ok
              else "JSON with 'Content-Type: application/json'")
    if ctype is None:
        # No body, or a pipeline's YAML (PUT cannot be sent cross-site without a preflight).
        if yaml_ok or (not chunked and clen in (None, b"0")):
            return None
        return f"the request has a body but no Content-Type: send {wanted}"
    media = ctype.partition(b";")[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json") or (
            yaml_ok and media in YAML_TYPES):
        return None
    return f"Content-Type '{media.decode('latin-1')}' is not accepted here: send {wanted}"


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A receive that gives the body already read, then waits on the connection (so a
    streamed answer still learns that its client left)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if given:
            return await receive()  # type: ignore[no-any-return]
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _with_headers(send: Any, extra: Callable[[], list[tuple[bytes, bytes]]]) -> Any:
    """``send`` with ``extra()``'s headers added to the response (computed as it starts)."""
    async def headers_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            more = extra()
            if more:
                message = {**message, "headers": [*message.get("headers", ()), *more]}
        await send(message)

    return headers_send


def _with_cors(send: Any, origin: bytes) -> Any:
    cors = [(b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", CORS_EXPOSE), (b"vary", b"origin")]
    return _with_headers(send, lambda: cors)


class HotPaths:
    def __init__(self, app: ASGIApp, caller: Callable[[], ModelCaller],
                 routes: dict[str, Handler], guard: Guard | None = None,
                 gate: Callable[[], Gate | None] | None = None) -> None:
        self.app = app
        self.caller = caller
        self.routes = routes
        self.guard = guard or Guard()
        self.gate = gate or (lambda: None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        traced = observe.tracing.active()  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set
        if traced is not None and scope["type"] == "http":
            api = scope["method"] == "POST" and scope["path"] in self.routes
            await traced.serve(self._serve, scope, receive, send,
                               observe.OPERATIONS.get(scope["path"]) if api else None)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        seen: list[Any] = [None] * 11
        wanted = _WANTED
        for name, value in scope["headers"]:
            slot = wanted.get(name)
            if slot is not None:
                seen[slot] = value
        host, origin = seen[_HOST], seen[_ORIGIN]
        path, method, guard = scope["path"], scope["method"], self.guard
        if host is not None and not guard.host_ok(host):
            name = host.decode("latin-1")
            await _send_error(send, path, 421, "host_not_allowed", (
                f"this server does not answer for host '{name}' (it answers "
                f"{guard.describe_hosts()} and IP addresses): add it with `flowc serve "
                f"--allow-host {split_host(name.encode())[0].decode()}` or under "
                "server.allowed_hosts in flowc.yaml"))
            return
        if origin is not None and not guard.origin_ok(origin, host):
            if method not in SAFE_METHODS:
                await _send_error(send, path, 403, "origin_not_allowed", (
                    f"requests from the web page at '{origin.decode('latin-1')}' are not "
                    "allowed (cross-site); list the origin under server.allowed_origins in "
                    "flowc.yaml to allow it"))
                return
            origin = None  # a cross-site read: answered, but the page cannot read it
        elif origin is not None and origin.lower() in guard.origins:
            if method == "OPTIONS" and seen[_ACRM] is not None:
                await self._preflight(send, origin, seen[_ACRH])
                return
            send = _with_cors(send, origin)
        if method not in SAFE_METHODS:
            why = _type_refusal(method, path, seen[_CTYPE], seen[_CLEN], seen[_CHUNKED]
                                is not None)
            if why is not None:
                await _send_error(send, path, 415, "unsupported_media_type", why)
                return
        clen = seen[_CLEN]
        if clen is not None and clen.isdigit() and int(clen) > guard.max_body:
            declared = int(clen)
            # A client that waits for `100 Continue` will not send a body it was refused.
            drain = declared <= DRAIN_BYTES and seen[_EXPECT] is None
            await self._too_large(send, receive, path, drain)
            return
        who = OPEN
        gate = self.gate()
        if gate is not None:
            try:
                who = gate.authenticate(seen[_AUTH], seen[_APIKEY])
            except Denied as exc:
                if path not in OPEN_PATHS:
                    log.info("refused %s %s: %s (%s)", method, path, exc.code,
                             scope.get("client"))
                    await _send_error(send, path, exc.status, exc.code, exc.message,
                                      www_authenticate=True)
                    return
        # A key with rate limits gets its `x-ratelimit-*` headers on every response.
        window = who.window
        scope[PRINCIPAL] = who
        handler = self.routes.get(path) if method == "POST" else None
        if handler is None:
            if window is not None:
                send = _with_headers(send, lambda: window.headers(time.monotonic()))
            if method in SAFE_METHODS:
                await self.app(scope, receive, send)
                return
        body = await self._read(receive, send, path)
        if body is None:
            return
        if handler is None:
            await self.app(scope, _replay(body, receive), send)
            return
        tags = seen[_TAGS]
        incoming = Incoming(body, scope["headers"], scope.get("query_string", b""),
                            tags.decode("latin-1") if tags is not None else None, t0, who)
        observe.model_api(path)
        response = None
        after = incoming.after
        try:
            response = await handler(incoming, self.caller())
            # (The headers count the call: the handler has admitted or refused it.)
            if response.__class__ is Answer:
                await respond(send, response.status_code, response.headers_only,
                              response.body, window.head_lines(time.monotonic())
                              if window is not None else b"")
                return
            if window is not None:
                response.raw_headers += window.headers(time.monotonic())
            await response(scope, receive, send)
        finally:  # the answer is out (or never will be): its calls' rows, then metrics
            for book in after:
                book()
            observe.request_ended(path, response)

    async def _read(self, receive: Any, send: Any, path: str) -> bytes | None:
        """The whole body, or None when the client left or it was too large (answered)."""
        chunks: list[bytes] = []
        size, limit = 0, self.guard.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            part = message.get("body", b"")
            size += len(part)
            more = message.get("more_body", False)
            if size > limit:
                await self._too_large(send, receive, path, more)
                return None
            chunks.append(part)
            if not more:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _too_large(self, send: Any, receive: Any, path: str, drain: bool) -> None:
        limit = self.guard.max_body
        body = error_body(path, 413, "request_too_large", (
            f"request body too large: this server accepts at most {limit} bytes "
            "(server.max_body_bytes in flowc.yaml)"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body)),
                                (b"connection", b"close")]})
        # The answer goes out now; the response stays open while the rest of the body is
        # read (a completed response stops the server reading), then the socket closes with
        # nothing unread in it, so the client is not sent a reset.
        await send({"type": "http.response.body", "body": body, "more_body": True})
        if drain:
            await _drain(receive)
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _preflight(send: Any, origin: bytes, headers: bytes | None) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", headers or b"content-type"),
            (b"access-control-max-age", b"600"), (b"vary", b"origin")]})
        await send({"type": "http.response.body", "body": b""})


async def _drain(receive: Any) -> None:
    left = DRAIN_BYTES
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while left > 0:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                left -= len(message.get("body", b""))
                if not message.get("more_body"):
                    return
    except TimeoutError:
        return
