"""A loopback OTLP/HTTP trace receiver that decodes with the official protobufs
(`opentelemetry-proto`), and Rotel (a Rust OpenTelemetry collector from PyPI, `rotel`) to
put in front of it: flowc exports to Rotel's OTLP/HTTP receiver, Rotel batches and forwards
over OTLP/HTTP to this receiver, so what the tests read went through a receiver that is not
flowc's nor the tests'."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from tests.fakes import free_port, wait_until

KINDS = {PbSpan.SPAN_KIND_INTERNAL: "internal", PbSpan.SPAN_KIND_SERVER: "server",
         PbSpan.SPAN_KIND_CLIENT: "client", PbSpan.SPAN_KIND_PRODUCER: "producer",
         PbSpan.SPAN_KIND_CONSUMER: "consumer"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    """One received span, ids as hex."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attrs: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    status_message: str
    start: int
    end: int
    service: str


@dataclass
class Receiver:
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path != "/v1/traces" or \
                        self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(raw)
                receiver.take(req)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def take(self, req: ExportTraceServiceRequest) -> None:
        self.requests += 1
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        KINDS.get(s.kind, "unspecified"),
                        {kv.key: _value(kv.value) for kv in s.attributes}, s.status.code,
                        s.status.message, s.start_time_unix_nano, s.end_time_unix_nano,
                        str(resource.get("service.name"))))

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, predicate: Any, timeout: float = 20) -> None:
        wait_until(lambda: predicate(self), timeout)


class Rotel:
    """Rotel's agent receiving OTLP/HTTP and forwarding it over OTLP/HTTP to ``to``."""

    def __init__(self, to: str, workdir: Path) -> None:
        import rotel

        self.binary = Path(rotel.__file__).parent / "rotel-agent"
        if not os.access(self.binary, os.X_OK):  # a wheel unpacked without its mode bits
            copy = workdir / "rotel-agent"
            shutil.copy(self.binary, copy)
            copy.chmod(0o755)
            self.binary = copy
        self.port = free_port()
        self.log = workdir / "rotel.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ROTEL_", "OTEL_"))}
        self.proc = subprocess.Popen(
            [str(self.binary), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{free_port()}",
             "--otlp-http-endpoint", f"127.0.0.1:{self.port}", "--exporter", "otlp",
             "--otlp-exporter-endpoint", to, "--otlp-exporter-protocol", "http",
             "--otlp-exporter-compression", "gzip", "--batch-timeout", "100ms"],
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_until(self._up, 20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"rotel exited: {self.log.read_text()}")
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        time.sleep(0)
