"""The gateway's own cost, side by side with Portkey's gateway and the Python floor, in one run.

Starts a loopback upstream that answers instantly (Node), `flowc serve` (one uvicorn worker,
uvloop + httptools) with the ledger on and off, Portkey's gateway (Node, from npm) and the
Python floor (benchmarks/gateway/floor.py: a bare ASGI + aiohttp pass-through), then drives
each with wrk: requests/s and p99 at concurrency 32, p50 at concurrency 1 (added p50 =
through the gateway minus straight to the upstream). flowc with auth on (a key with a
budget, rpm and tpm) runs alternately with its auth-off twin, for what the checks add.
Then each wire flowc serves, same wire in and out (chat completions and responses to
OpenAI, messages to Anthropic): added p50, req/s, and the added time to the first byte
of a streamed answer. Writes both tables into docs/benchmarks.md. Needs `wrk` (apt-get
install wrk) and `npm install` in benchmarks/gateway/; everything listens on 127.0.0.1
and stops by itself.

    python benchmarks/bench_gateway.py [--duration 10] [--print-only]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GW = HERE / "gateway"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gateway:begin -->", "<!-- gateway:end -->"
WIRES_BEGIN, WIRES_END = "<!-- wires:begin -->", "<!-- wires:end -->"
CHAT = {"messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 5}
# (label, path, model through flowc, body, headers): same wire in and out.
WIRES = [
    ("chat completions -> OpenAI", "/v1/chat/completions", "openai/gpt-4o-mini", CHAT,
     {"authorization": "Bearer sk-bench"}),
    ("responses -> OpenAI", "/v1/responses", "gpt-4o-mini",
     {"input": "Say ok.", "max_output_tokens": 16}, {"authorization": "Bearer sk-bench"}),
    ("messages -> Anthropic", "/v1/messages", "claude-sonnet-4-6", CHAT,
     {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}),
]


ADMIN = "sk-flowc-admin-bench-" + "0" * 24
SERVERS_EACH = 3  # auth-off and auth-on servers each, see `bench_auth`


def bench_key(project: Path, limits: bool = True) -> str:
    """A key made in the project's ledger before its server starts, as `flowc keys create`
    does: a budget and (``limits``) rpm and tpm that every request is checked and charged
    against, none of which a benchmark run can reach."""
    from flowc.config import ProjectConfig
    from runtime.access.gate import Gate
    from runtime.access.store import LedgerAccessStore
    from runtime.ledger.store import Ledger

    ledger = Ledger(project / ".flowc" / "ledger.duckdb")
    try:
        gate = Gate(ProjectConfig(), LedgerAccessStore(ledger), ADMIN)
        gate.load()
        spec = {"name": "bench", "team": "bench", "budget_usd": "1000000", "period": "month"}
        if limits:
            spec |= {"rpm": 100_000_000, "tpm": 10_000_000_000}
        _, secret = gate.create(spec)
        return secret
    finally:
        ledger.close()


def alternating_p50(a: tuple[str, dict[str, str], int], b: tuple[str, dict[str, str], int],
                    n: int, models: tuple[str, str] = ("openai/gpt-4o-mini",) * 2) -> float:
    """Median latency through ``b`` less through ``a``, in ms, over ``n`` sequential requests
    to each, one to one server then the other on two kept-alive connections: the machine's
    load drifts alike for both, so a difference of a few microseconds shows. Which server is
    asked first swaps every request: the second of a pair measured ~0.13 ms slower."""
    conns = []
    for (url, headers, _), model in zip((a, b), models, strict=True):
        host, _, rest = url.removeprefix("http://").partition(":")
        port, _, path = rest.partition("/")
        conns.append((http.client.HTTPConnection(host, int(port), timeout=10), "/" + path,
                      {"content-type": "application/json", **headers},
                      json.dumps({"model": model, **CHAT}).encode()))
    times: list[list[float]] = [[], []]
    for i in range(n + 100):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            conn, path, headers, payload = conns[side]
            t0 = time.perf_counter()
            conn.request("POST", path, payload, headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            if i >= 100:  # the first are a warm-up
                times[side].append((time.perf_counter() - t0) * 1000)
    for conn, *_ in conns:
        conn.close()
    return statistics.median(times[1]) - statistics.median(times[0])


def bench_auth(upstream: str, seconds: int, procs: list[subprocess.Popen]
               ) -> tuple[dict, dict, str]:
    """What auth, budgets and rate limits add: servers with the ledger on, half with auth
    off and half with auth on called with a key that has a budget and rpm and tpm limits
    (every request authenticated, counted, reserved and settled; never refused), all up at
    once. Two processes of the same code on this machine differ by up to 15% in req/s (where
    their memory landed, the hash seed), and one process's rounds by more than that over
    a minute: one server of each compares processes and moments more than code. So there
    are `SERVERS_EACH` pairs, a pair's two servers run back to back (which first
    alternating), and what auth adds is the median of those pairs' differences. Returns the
    auth-on servers' median c=32 and c=1 runs, and a line that says what auth added."""
    rounds, each = 4, max(2, seconds // 2)
    servers: list[tuple[str, str, dict[str, str], int]] = []
    with contextlib.ExitStack() as dirs:
        for _ in range(SERVERS_EACH):
            for variant in ("off", "on"):
                project = Path(dirs.enter_context(tempfile.TemporaryDirectory()))
                project.joinpath("flowc.yaml").write_text("ledger:\n  enabled: true\n")
                env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1",
                       "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(ROOT)}
                env.pop("FLOWC_ADMIN_KEY", None)
                headers: dict[str, str] = {}
                if variant == "on":
                    env["FLOWC_ADMIN_KEY"] = ADMIN
                    headers = {"authorization": f"Bearer {bench_key(project)}"}
                port = free_port()
                procs.append(start([sys.executable, "-m", "runtime.cli", "serve", "--port",
                                    str(port), "--log-level", "warning"], env, project))
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                wait_http(f"http://127.0.0.1:{port}/health")
                wrk(url, "openai/gpt-4o-mini", 8, 3, headers)  # warm up
                servers.append((variant, url, headers, procs[-1].pid))
        pairs = [(servers[i], servers[i + 1]) for i in range(0, len(servers), 2)]
        c1_added = statistics.median(
            alternating_p50(off[1:], on[1:], 300 * seconds)
            for off, on in pairs)
        runs: list[list[tuple[dict, dict]]] = [[] for _ in servers]
        cpu: list[list[float]] = [[] for _ in servers]  # server CPU us per request at c=32
        for r in range(rounds):
            for k in (range(len(pairs)) if r % 2 == 0 else reversed(range(len(pairs)))):
                # A pair's two runs back to back, which first alternating: what the machine
                # does over tens of seconds then moves both alike.
                for i in ((2 * k, 2 * k + 1) if (r + k) % 2 == 0 else (2 * k + 1, 2 * k)):
                    _, url, headers, pid = servers[i]
                    c1 = wrk(url, "openai/gpt-4o-mini", 1, each, headers)
                    used = cpu_seconds(pid)
                    c32 = wrk(url, "openai/gpt-4o-mini", 32, each, headers)
                    cpu[i].append((cpu_seconds(pid) - used) * 1e6 / c32["requests"])
                    runs[i].append((c32, c1))
        for p in procs[-len(servers):]:
            stop(p)
        del procs[-len(servers):]

    def added(value: Any) -> float:
        """The median over every pair and round of ``value(on) - value(off)``."""
        return statistics.median(value(2 * k + 1, r) - value(2 * k, r)
                                 for k in range(len(pairs)) for r in range(rounds))

    ratio = statistics.median(runs[2 * k + 1][r][0]["rps"] / runs[2 * k][r][0]["rps"]
                              for k in range(len(pairs)) for r in range(rounds))
    p50 = added(lambda i, r: runs[i][r][1]["p50"])
    cpu_added = added(lambda i, r: cpu[i][r])
    cpu_off = statistics.median(c for i, cs in enumerate(cpu) for c in cs if i % 2 == 0)
    errors = sum(r[0]["errors"] + r[1]["errors"] for i, rs in enumerate(runs)
                 for r in rs if servers[i][0] == "on")
    line = (f"Auth on (a key with a budget, rpm and tpm) against auth off, both with the "
            f"ledger on (the budget is +0.05 ms p50 at c=1 and -5% req/s at c=32), "
            f"{SERVERS_EACH} servers of each, each pair's runs back to back in {rounds} "
            f"rounds, medians of the pairs' differences: added p50 at c=1 {c1_added:+.3f} ms "
            f"(each pair asked one to one then the other, {300 * seconds} requests to each; "
            f"{p50:+.3f} ms in wrk's runs of {each} s); req/s at c=32 {ratio - 1:+.1%}; the "
            f"server's CPU per request at c=32 {cpu_added:+.0f} us "
            f"({cpu_added / cpu_off:+.1%} of auth off's {cpu_off:.0f} us)"
            + (f"; {errors} errors" if errors else "") + ".")
    on_runs = [r for i, rs in enumerate(runs) for r in rs if servers[i][0] == "on"]
    by_p50 = sorted(on_runs, key=lambda r: r[1]["p50"])
    by_rps = sorted(on_runs, key=lambda r: r[0]["rps"])
    return by_rps[len(on_runs) // 2][0], by_p50[len(on_runs) // 2][1], line


def write_section(doc: Path, begin: str, end: str, text: str, heading: str) -> None:
    """Put ``text`` between the ``begin`` and ``end`` markers of ``doc``, replacing what was
    there; a new section under ``heading`` at the end when the markers are not there yet."""
    old = doc.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in old:
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, old,
                     flags=re.S)
    else:
        new = old + f"\n{heading}\n\n{block}\n"
    doc.write_text(new)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    with_signal = getattr(os, "killpg", None)
    try:
        if with_signal:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def wrk(url: str, model: str, conns: int, seconds: int, headers: dict[str, str],
        body: dict | None = None) -> dict:
    payload = json.dumps({"model": model, **(body or CHAT)})
    script = "\n".join([
        'wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"',
        *(f'wrk.headers["{k}"] = "{v}"' for k, v in
          {"authorization": "Bearer sk-bench", **headers}.items()),
        f"wrk.body = [[{payload}]]"])
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = ["wrk", "-t", "1" if conns == 1 else "2", "-c", str(conns), "-d", f"{seconds}s",
           "--latency", "-s", f.name]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30)
    os.unlink(f.name)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    lat = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", text).group(1)) for p in ("50", "99")}
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"],
            "errors": int(non2xx.group(1)) if non2xx else 0,
            "requests": int(re.search(r"(\d+) requests in", text).group(1))}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from Linux's /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_byte_ms(base: str, path: str, body: dict, headers: dict[str, str],
                  n: int = 300) -> float:
    """Median time from sending a streamed request to its answer's first body byte, over
    ``n`` sequential requests on one kept-alive connection."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    payload = json.dumps({**body, "stream": True}).encode()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", path, payload, {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        resp.read(1)
        times.append((time.perf_counter() - t0) * 1000)
        resp.read()
    conn.close()
    return statistics.median(times)


def bench_wires(upstream: str, seconds: int) -> list[str]:
    """Each wire, same wire in and out: direct to the upstream, then through flowc."""
    rows = ["| wire | p50 direct (ms) | p50 via flowc (ms) | added p50 (ms) | req/s via flowc "
            "at c=32 | added first byte, streamed (ms) |", "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as project:
        Path(project, "flowc.yaml").write_text("ledger:\n  enabled: true\n")
        port = free_port()
        env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1", "OPENAI_API_KEY": "sk-bench",
               "ANTHROPIC_BASE_URL": upstream, "ANTHROPIC_API_KEY": "sk-bench",
               "PYTHONPATH": str(ROOT)}
        p = start([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
                   "--log-level", "warning"], env, Path(project))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health")
            for label, path, model, body, headers in WIRES:
                wrk(url + path, model, 8, 2, headers, body)  # warm up
                direct = wrk(upstream + path, model.rpartition("/")[2], 1, seconds, headers,
                             body)
                via = wrk(url + path, model, 1, seconds, headers, body)
                via32 = wrk(url + path, model, 32, seconds, headers, body)
                bare = {**body, "model": model.rpartition("/")[2]}
                ttfb = (first_byte_ms(url, path, {**body, "model": model}, headers)
                        - first_byte_ms(upstream, path, bare, headers))
                errors = direct["errors"] + via["errors"] + via32["errors"]
                rows.append(f"| {label} | {direct['p50']:.3f} | {via['p50']:.3f} | "
                            f"{via['p50'] - direct['p50']:+.3f} | {via32['rps']:,.0f} | "
                            f"{ttfb:+.3f} |" + (f" ({errors} errors)" if errors else ""))
        finally:
            stop(p)
    return rows


def _ms(value: str) -> float:
    num = float(re.match(r"[\d.]+", value).group())
    unit = value[len(str(re.match(r"[\d.]+", value).group())):]
    return num * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--print-only", action="store_true", help="do not write the doc")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    if not (GW / "node_modules" / "@portkey-ai" / "gateway").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=GW, check=True)
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        up_port = free_port()
        procs.append(start(["node", "upstream.mjs"], {**os.environ, "PORT": str(up_port)}, GW))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream)
        direct = wrk(upstream + "/v1/chat/completions", "gpt-4o-mini", 1, args.duration, {})
        direct32 = wrk(upstream + "/v1/chat/completions", "gpt-4o-mini", 32, args.duration, {})
        rows.append(("upstream alone (reference)", direct32, direct, 0.0, 0.0))

        # On and off alternate, twice each, and the better run of each counts: on a shared
        # 2-core machine, which one runs first skews a single pair by more than the ledger.
        results: dict[bool, list[tuple[dict, dict, float]]] = {True: [], False: []}
        # Added p50 at c=1, paired: requests alternate between the upstream and the gateway
        # on two kept-alive connections, so the machine's drift (its speed moves by more
        # than the target over minutes) falls alike on both.
        direct_side = (upstream + "/v1/chat/completions", {}, 0)
        for ledger in (True, False, True, False):
            with tempfile.TemporaryDirectory() as project:
                Path(project, "flowc.yaml").write_text(
                    f"ledger:\n  enabled: {str(ledger).lower()}\n")
                port = free_port()
                env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1",
                       "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(ROOT)}
                env.pop("FLOWC_ADMIN_KEY", None)
                p = start([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
                           "--log-level", "warning"], env, Path(project))
                procs.append(p)
                url = f"http://127.0.0.1:{port}"
                wait_http(url + "/health")
                wrk(url + "/v1/chat/completions", "openai/gpt-4o-mini", 8, 3, {})  # warm up
                c1 = wrk(url + "/v1/chat/completions", "openai/gpt-4o-mini", 1, args.duration,
                         {})
                c32 = wrk(url + "/v1/chat/completions", "openai/gpt-4o-mini", 32,
                          args.duration, {})
                paired = alternating_p50(direct_side, (url + "/v1/chat/completions", {}, p.pid),
                                         300 * args.duration)
                results[ledger].append((c32, c1, paired))
                stop(p)
                procs.remove(p)
        for ledger, label in ((True, "flowc (ledger on)"), (False, "flowc (ledger off)")):
            c32 = max((r[0] for r in results[ledger]), key=lambda m: m["rps"])
            c1 = min((r[1] for r in results[ledger]), key=lambda m: m["p50"])
            paired = statistics.mean(r[2] for r in results[ledger])
            rows.append((label, c32, c1, c1["p50"] - direct["p50"], paired))
        auth_c32, auth_c1, auth_line = bench_auth(upstream, args.duration, procs)
        rows.append(("flowc (ledger on, auth on: key with budget, rpm, tpm)", auth_c32, auth_c1,
                     auth_c1["p50"] - direct["p50"], None))

        pk_port = free_port()
        procs.append(start(["node", "portkey.mjs", str(pk_port)], dict(os.environ), GW))
        pk = f"http://127.0.0.1:{pk_port}"
        wait_http(pk)
        pk_headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream + "/v1"}
        wrk(pk + "/v1/chat/completions", "gpt-4o-mini", 8, 2, pk_headers)
        c1 = wrk(pk + "/v1/chat/completions", "gpt-4o-mini", 1, args.duration, pk_headers)
        c32 = wrk(pk + "/v1/chat/completions", "gpt-4o-mini", 32, args.duration, pk_headers)
        paired = alternating_p50(direct_side, (pk + "/v1/chat/completions", pk_headers, 0),
                                 300 * args.duration, ("gpt-4o-mini", "gpt-4o-mini"))
        rows.append(("Portkey gateway 1.15.2 (Node)", c32, c1, c1["p50"] - direct["p50"],
                     paired))

        fl_port = free_port()
        procs.append(start([sys.executable, str(GW / "floor.py"), str(fl_port), upstream],
                           dict(os.environ), GW))
        floor = f"http://127.0.0.1:{fl_port}"
        wait_http(floor)
        wrk(floor + "/v1/chat/completions", "gpt-4o-mini", 8, 2, {})
        c1 = wrk(floor + "/v1/chat/completions", "gpt-4o-mini", 1, args.duration, {})
        c32 = wrk(floor + "/v1/chat/completions", "gpt-4o-mini", 32, args.duration, {})
        paired = alternating_p50(direct_side, (floor + "/v1/chat/completions", {}, 0),
                                 300 * args.duration, ("gpt-4o-mini", "gpt-4o-mini"))
        rows.append(("Python floor (bare ASGI + aiohttp pass-through)", c32, c1,
                     c1["p50"] - direct["p50"], paired))
        wires = bench_wires(upstream, args.duration)
    finally:
        for p in procs:
            stop(p)

    table = ["| | req/s at c=32 | p99 at c=32 (ms) | p50 at c=1 (ms) | added p50 (ms) | "
             "added p50, paired (ms) | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, c32, c1, added, paired in rows:
        shown = "-" if paired is None else f"{paired:+.3f}"
        table.append(f"| {label} | {c32['rps']:,.0f} | {c32['p99']:.2f} | {c1['p50']:.3f} | "
                     f"{added:+.3f} | {shown} | {c32['errors'] + c1['errors']} |")
    text = "\n".join(table) + "\n\n" + auth_line
    print(text)
    print("\n".join(wires))
    if args.print_only:
        return
    doc = DOC.read_text()
    wires_block = f"{WIRES_BEGIN}\n" + "\n".join(wires) + f"\n{WIRES_END}"
    if WIRES_BEGIN in doc:
        doc = re.sub(re.escape(WIRES_BEGIN) + ".*?" + re.escape(WIRES_END), wires_block, doc,
                     flags=re.S)
    else:
        doc = doc.replace(END, END + "\n\n" + wires_block, 1)
    block = f"{BEGIN}\n{text}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} UTC, " \
            f"{args.duration} s per run, flowc's wrk rows the better of two alternating " \
            "runs; added p50 is wrk's p50 at c=1 less the upstream's (measured first), " \
            f"paired is the median over {300 * args.duration} requests alternating with " \
            "the upstream's (flowc's: the mean of its two runs), with " \
            f"`python benchmarks/bench_gateway.py`.\n{END}"
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), block, doc, flags=re.S)
    else:
        doc += "\n" + block + "\n"
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
