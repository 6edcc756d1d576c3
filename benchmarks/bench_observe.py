"""What metrics and traces cost (runtime/observe, docs/observability.md).

1. The hooks in process, in CPU time: a model call's `observe.call` (one ledger row), a
   model API request's start and end, and a scrape of `/metrics`, with tracing off and (in
   a child process with `OTEL_EXPORTER_OTLP_ENDPOINT` set, exporting to a loopback sink)
   on.
2. End to end against the loopback Node upstream (benchmarks/gateway/upstream.mjs), three
   `flowc serve` at once: the revision before metrics and traces (`--before`, a git
   worktree), this one with tracing off, and this one with tracing on. The added p50 at c=1
   is measured one request to one server then the other on kept-alive connections
   (bench_gateway.alternating_p50: the machine's drift hits both alike), each pair both
   ways round (the server asked second is slower); the server's CPU per request at c=32 with
   wrk, in alternating rounds.

Writes a section at the end of docs/benchmarks.md. Needs `wrk`, `node` and git.

    python benchmarks/bench_observe.py [--before REV] [--requests 3000] [--print-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import (  # noqa: E402
    GW,
    alternating_p50,
    cpu_seconds,
    free_port,
    start,
    stop,
    wait_http,
    wrk,
)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- observe:begin -->", "<!-- observe:end -->"


def sink() -> tuple[ThreadingHTTPServer, list[int]]:
    """An OTLP/HTTP endpoint that takes every export and answers 200 (the spans counted by
    request, not decoded: the exporter's work is what is measured)."""
    got = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            got[0] += 1
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, got


def hooks(n: int) -> dict[str, float]:
    """Microseconds per hook call in this process (tracing as the environment says)."""
    from runtime import observe
    from runtime.gateway.calls import Bill, CallContext
    from runtime.providers import Target, Usage

    target = Target("openai", "gpt-4o-mini")
    usage = Usage(prompt_tokens=19, completion_tokens=10)
    ctx, bill = CallContext(), Bill()
    body = {"id": "chatcmpl-1", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]}
    req = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    cost = Decimal("0.0000088")

    class Answer:
        raw_headers = [(b"content-type", b"application/json"),
                       (b"x-flowc-provider", b"openai"), (b"x-flowc-model", b"gpt-4o-mini"),
                       (b"x-flowc-overhead-ms", b"0.210"), (b"x-flowc-cost-usd", b"0.0000088")]

    def describe(e: BaseException) -> str:
        return str(e)

    traced = observe.tracing.active()
    out: dict[str, float] = {}
    for label, fn in (
        ("call", lambda: observe.call(describe, "openai/gpt-4o-mini", target, "gpt-4o-mini",
                                      status="ok", latency_ms=12.5, usage=usage, cost=cost,
                                      ttft_ms=None, error=None, stream=False, ctx=ctx,
                                      bill=bill, req=req, answer=body)),
        ("request", lambda: (observe.model_api("/v1/chat/completions"),
                             observe.request_ended("/v1/chat/completions", Answer))),
    ):
        for _ in range(min(n, 500)):  # warm up
            fn()
        # CPU time of this thread: on a shared machine, wall time counts the waits for a
        # core as well (the batch exporter's own thread is not counted: see end to end).
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(n):
                fn()
            best = min(best, (time.thread_time() - t0) / n * 1e6)
            if traced is not None:  # the queue emptied, untimed: no span is dropped
                traced.provider.force_flush()
        out[label] = best
    t0 = time.thread_time()
    for _ in range(20):
        body_bytes, _ = observe.METRICS.render()
    out["scrape_ms"] = (time.thread_time() - t0) / 20 * 1000
    out["scrape_bytes"] = len(body_bytes)
    if traced is not None:
        traced.provider.force_flush()
    out["tracing"] = traced is not None
    return out


def hooks_child(n: int, endpoint: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    out = subprocess.run([sys.executable, __file__, "--hooks-only", str(n)], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def end_to_end(before: str, after: str, requests: int, rounds: int, seconds: int
               ) -> tuple[float, float, dict[str, float]]:
    """(added p50 tracing off vs before, added p50 tracing on vs off, CPU us a request)."""
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-observe-"))
    trees = {rev: tmp / f"code-{rev}" for rev in (before, after)}
    for rev, tree in trees.items():  # both as committed: nobody's work in progress
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(tree), rev], check=True)
    spans, got = sink()
    try:
        up_port = free_port()
        procs.append(start(["node", "upstream.mjs"], {**os.environ, "PORT": str(up_port)},
                           GW))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream)
        servers: dict[str, tuple[str, dict[str, str], int]] = {}
        sink_url = f"http://127.0.0.1:{spans.server_address[1]}"
        for name, code, otel in (("before", trees[before], None), ("off", trees[after], None),
                                 ("on", trees[after], sink_url)):
            project = tmp / f"project-{name}"
            project.mkdir()
            project.joinpath("flowc.yaml").write_text("ledger:\n  enabled: true\n")
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("OTEL_") and k != "FLOWC_ADMIN_KEY"}
            env.update({"OPENAI_BASE_URL": upstream + "/v1", "OPENAI_API_KEY": "sk-bench",
                        "PYTHONPATH": str(code)})
            if otel:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otel
            port = free_port()
            procs.append(start([sys.executable, "-m", "runtime.cli", "serve", "--port",
                                str(port), "--log-level", "warning"], env, project))
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health")
            servers[name] = (url + "/v1/chat/completions", {}, procs[-1].pid)
            wrk(servers[name][0], "openai/gpt-4o-mini", 8, 2, {})  # warm up
        # Each pair both ways round, halved: the one asked second is ~0.1 ms slower.
        off_vs_before = (alternating_p50(servers["before"], servers["off"], requests // 2)
                         - alternating_p50(servers["off"], servers["before"], requests // 2)) / 2
        on_vs_off = (alternating_p50(servers["off"], servers["on"], requests // 2)
                     - alternating_p50(servers["on"], servers["off"], requests // 2)) / 2
        cpu: dict[str, list[float]] = {k: [] for k in servers}
        for i in range(rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                url, headers, pid = servers[name]
                used = cpu_seconds(pid)
                run = wrk(url, "openai/gpt-4o-mini", 32, seconds, headers)
                cpu[name].append((cpu_seconds(pid) - used) * 1e6 / run["requests"])
        assert got[0] > 0, "the traced server exported nothing"
        return off_vs_before, on_vs_off, {k: statistics.median(v) for k, v in cpu.items()}
    finally:
        for p in procs:
            stop(p)
        spans.shutdown()
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc:
        doc = doc.split(BEGIN)[0] + block + doc.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Observability (benchmarks/bench_observe.py)\n\n" + \
            block + "\n"
    DOC.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="HEAD~1", help="the revision to compare with")
    ap.add_argument("--after", default="HEAD", help="the revision measured")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--hooks-only", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()
    if args.hooks_only:
        print(json.dumps(hooks(args.hooks_only)))
        return
    before, after = (subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                                    capture_output=True, text=True, check=True).stdout.strip()
                     for rev in (args.before, args.after))
    spans, _ = sink()
    try:
        off = hooks_child(200_000, None)
        # Fewer than the span queue holds (2048), so none is dropped unmade.
        on = hooks_child(1_000, f"http://127.0.0.1:{spans.server_address[1]}")
    finally:
        spans.shutdown()
    assert not off["tracing"] and on["tracing"]
    off_vs_before, on_vs_off, cpu = end_to_end(before, after, args.requests, args.rounds,
                                               args.seconds)
    load = os.getloadavg()[0]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}, load average {load:.1f} on 2 cores "
        f"(other work was running): {after} against {before} (before metrics and traces).",
        "",
        "| what | cost |",
        "|---|---:|",
        f"| `observe.call` per model call (one ledger row), tracing off (CPU) | "
        f"{off['call']:.2f} us |",
        f"| a model API request's start and end (in-flight gauge, overhead histogram; CPU) | "
        f"{off['request']:.2f} us |",
        f"| `observe.call`, tracing on (a span made and queued for the batch exporter; CPU) | "
        f"{on['call']:.2f} us |",
        f"| a scrape of `/metrics` ({off['scrape_bytes'] / 1024:.0f} KB of text; CPU) | "
        f"{off['scrape_ms']:.2f} ms |",
        f"| added p50 at c=1, tracing off, against {before} ({args.requests} requests "
        f"to each, alternating, both ways round) | {off_vs_before * 1000:+.0f} us |",
        f"| added p50 at c=1, tracing on against off | {on_vs_off * 1000:+.0f} us |",
        f"| server CPU per request at c=32: {before} / tracing off / tracing on | "
        f"{cpu['before']:.0f} / {cpu['off']:.0f} / {cpu['on']:.0f} us |",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.print_only:
        write_doc(text)


if __name__ == "__main__":
    main()
