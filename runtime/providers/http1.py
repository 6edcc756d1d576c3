"""A lean HTTP/1.1 client for the gateway's one-shot upstream POSTs.

Measured on the reference machine (benchmarks/bench_gateway.py), aiohttp's client costs
about 0.2 ms of CPU per request at c=1 (request building, multidicts, URL objects, tracing
hooks), as much as the rest of the gateway's hot path together. This client does only what
a JSON POST to a provider needs: a keep-alive pool of connections per upstream, the request
written in one buffer, the answer parsed by httptools (the parser uvicorn serves with) into
status, lower-cased headers and body. Streams keep aiohttp (`Endpoint.open_stream`).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

MAX_IDLE_S = 30.0  # an idle connection is dropped after this (or the server's Keep-Alive hint)


class ProtocolError(ConnectionError):
    """The upstream's answer is not HTTP/1.1 flowc can read."""


class _Connection(asyncio.Protocol):
    """One connection; one request at a time, its answer delivered through ``waiter``."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.received = False  # any byte of the current answer arrived
        self.open = True
        self.idle_since = 0.0
        self.idle_limit = MAX_IDLE_S
        self._name = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.parser.get_status_code() and "content-length" not in self.headers and \
                "chunked" not in self.headers.get("transfer-encoding", ""):
            self._deliver()  # a body delimited by the connection's close
        else:
            waiter.set_exception(ConnectionResetError("connection closed before the answer "
                                                      "was complete"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._name = name.lower()
        key = self._name.decode("latin-1")
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.open = False
        hint = self.headers.get("keep-alive", "")
        if "timeout=" in hint:
            try:
                seconds = float(hint.split("timeout=", 1)[1].split(",", 1)[0])
                self.idle_limit = min(MAX_IDLE_S, max(0.0, seconds - 1.0))
            except ValueError:
                pass
        self._deliver()
        if not self.open and self.transport is not None:
            self.transport.close()

    def _deliver(self) -> None:
        body = b"".join(self.body)
        coding = self.headers.get("content-encoding", "").strip().lower()
        try:
            if coding in ("gzip", "x-gzip"):
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif coding == "deflate":
                body = zlib.decompress(body)
        except zlib.error as exc:
            self._fail(ProtocolError(f"cannot decode a {coding} body: {exc}"))
            return
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.headers, body))

    def _fail(self, exc: Exception) -> None:
        self.open = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def start(self, request: bytes) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        self.parser = httptools.HttpResponseParser(self)
        self.headers, self.body, self.received = {}, [], False
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self.waiter


class Pool:
    """Keep-alive connections to one upstream (``url``: scheme, host, port; its path is the
    prefix every request's path goes under), at most ``limit`` at once."""

    def __init__(self, url: str, limit: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.host = parts.hostname
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.ssl = ssl.create_default_context() if tls else None
        self.prefix = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if tls else 80)
        self._host = (host if default else f"{host}:{self.port}").encode("idna")
        self._limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Connection, self.host, self.port, ssl=self.ssl,
            server_hostname=self.host if self.ssl else None)
        return conn

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._loop, self._idle = loop, []
            self._slots = asyncio.Semaphore(self._limit)

    def _reuse(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if conn.open and now - conn.idle_since < conn.idle_limit:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    def request(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        head = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self._host.decode()}",
                f"Content-Length: {len(body)}"]
        for k, v in headers.items():
            if "\n" in v or "\r" in v or "\n" in k or "\r" in k:
                raise ValueError(f"the value of header {k!r} holds a line break")
            head.append(f"{k}: {v}")
        return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body

    async def post(self, path: str, body: bytes, headers: Mapping[str, str], timeout: float
                   ) -> tuple[int, dict[str, str], bytes]:
        """POST ``body``; the answer's status, headers (names lower-cased) and body (gzip or
        deflate undone). ``timeout`` bounds the whole exchange (TimeoutError); a refused,
        reset or unreadable connection raises OSError."""
        request = self.request(path, body, headers)
        self._bind()
        async with asyncio.timeout(timeout), self._slots:
            conn = self._reuse()
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await self._connect()
                try:
                    answer = await conn.start(request)
                except ConnectionResetError:
                    # A kept-alive connection the server closed while idle: nothing of this
                    # request was read, so it goes once more on a new connection.
                    if reused and not conn.received:
                        conn, reused = None, False
                        continue
                    raise
                except BaseException:
                    conn.open = False  # cancelled or failed mid-answer: not reusable
                    if conn.transport is not None:
                        conn.transport.close()
                    raise
                if conn.open:
                    conn.waiter = None
                    conn.idle_since = asyncio.get_running_loop().time()
                    self._idle.append(conn)
                return answer

    async def close(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
