"""`flowc serve --workers 2` against one worker, on this machine's cores, in one run.

Starts the instant loopback upstream (Node, benchmarks/gateway/upstream.mjs) and, in
alternating rounds, `flowc serve` with one worker, with two workers on one shared socket
(the default) and with two workers on SO_REUSEPORT sockets (`--listen reuseport`), then
drives each with wrk at concurrency 32: req/s, p99, and the CPU the whole server used per
request (every process: supervisor, workers, ledger process). Last, with auth on, one
and two workers with a key with a budget (reserved against headroom each worker leases
from the supervisor in slices), and with a key with a budget, rpm and tpm (request slots
leased from the supervisor's windows). wrk and the upstream run on the same cores as the
server, so two workers cannot double the rate here; the load average before each round
says how busy the machine was. The CPU per request is what scaling with cores depends on:
N workers on N free cores serve N times one worker's rate when the workers, the
supervisor and the ledger process together use no more CPU per request than one worker
and its ledger process. Writes a section into
docs/benchmarks.md.

    python benchmarks/bench_workers.py [--duration 10] [--rounds 3] [--print-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gateway import (  # noqa: E402  (the gateway benchmark's wrk setup)
    ADMIN,
    GW,
    ROOT,
    bench_key,
    cpu_seconds,
    free_port,
    start,
    stop,
    wait_http,
    write_section,
    wrk,
)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- workers:begin -->", "<!-- workers:end -->"
MODEL = "openai/gpt-4o-mini"
# (label, --workers, --listen, auth on with a key: None, "budget", or "limits": a budget,
# rpm and tpm)
VARIANTS = [
    ("1 worker", 1, "shared", None),
    ("2 workers, one shared socket (default)", 2, "shared", None),
    ("2 workers, SO_REUSEPORT sockets", 2, "reuseport", None),
    ("1 worker, key with a budget", 1, "shared", "budget"),
    ("2 workers, key with a budget", 2, "shared", "budget"),
    ("1 worker, key with budget, rpm, tpm", 1, "shared", "limits"),
    ("2 workers, key with budget, rpm, tpm", 2, "shared", "limits"),
]


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every process under it."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        p = int(stat.parent.name)
        parents[p] = int(fields[1])
        used[p] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += used.get(p, 0.0)
        todo += [c for c, parent in parents.items() if parent == p]
    return total


# A fixed amount of pure-Python work (dict stores): what one core does, alone or beside
# another copy of itself, with no I/O and nothing shared between the copies.
_SPIN = ("import time\nt = time.perf_counter()\nd = {}\n"
         "for i in range(4_000_000):\n    d[i & 1023] = i * 3 + (i >> 2)\n"
         "print(time.perf_counter() - t)")


def cores_ceiling() -> float:
    """How many times one process's rate two CPU-bound processes get at once on this
    machine: 2.0 on two free cores. Two vCPUs of a virtual machine can give less (sibling
    hardware threads, a host's other guests), and no pair of server processes can scale
    past what this gives."""
    def spin(copies: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE,
                                  text=True) for _ in range(copies)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = min(spin(1) for _ in range(2))
    return 2 * alone / min(spin(2) for _ in range(2))


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def serve(upstream: str, workers: int, listen: str, auth: str | None, project: Path
          ) -> tuple[subprocess.Popen, str, dict[str, str]]:
    project.joinpath("flowc.yaml").write_text("ledger:\n  enabled: true\n")
    env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1", "OPENAI_API_KEY": "sk-bench",
           "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_ADMIN_KEY", None)
    headers: dict[str, str] = {}
    if auth:
        env["FLOWC_ADMIN_KEY"] = ADMIN
        headers = {"authorization": f"Bearer {bench_key(project, auth == 'limits')}"}
    port = free_port()
    p = start([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
               "--log-level", "warning", "--workers", str(workers), "--listen", listen],
              env, project)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 120)  # workers start slowly on a busy machine
    except RuntimeError:
        stop(p)
        raise
    time.sleep(2.0 if workers > 1 else 0.0)  # the second worker's start-up
    return p, url + "/v1/chat/completions", headers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--print-only", action="store_true", help="do not write the doc")
    args = ap.parse_args()
    procs: list[subprocess.Popen] = []
    runs: dict[str, list[dict]] = {v[0]: [] for v in VARIANTS}
    ceilings: list[float] = []
    try:
        up_port = free_port()
        procs.append(start(["node", "upstream.mjs"], {**os.environ, "PORT": str(up_port)}, GW))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream)
        with tempfile.TemporaryDirectory() as tmp:
            servers = {}
            for i, (label, workers, listen, auth) in enumerate(VARIANTS):
                project = Path(tmp, str(i))
                project.mkdir()
                p, url, headers = serve(upstream, workers, listen, auth, project)
                procs.append(p)
                servers[label] = (p, url, headers)
                wrk(url, MODEL, 32, 3, headers)  # warm up
            # Every variant runs once a round, in turn, all servers up (idle ones cost
            # nothing): the machine's load drifts by more than two runs far apart differ.
            for r in range(args.rounds):
                ceilings.append(cores_ceiling())
                print(f"round {r + 1}: two CPU-bound processes at once get "
                      f"{ceilings[-1]:.2f}x one's rate", flush=True)
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for label, *_ in order:
                    p, url, headers = servers[label]
                    before, own, busy = tree_cpu(p.pid), cpu_seconds(p.pid), load()
                    m = wrk(url, MODEL, 32, args.duration, headers)
                    n = max(m["requests"], 1)
                    m["cpu_us"] = (tree_cpu(p.pid) - before) * 1e6 / n
                    # With workers, the process started is their supervisor.
                    m["own_us"] = (cpu_seconds(p.pid) - own) * 1e6 / n
                    m["load"] = busy
                    runs[label].append(m)
                    print(f"round {r + 1}: {label}: {m['rps']:,.0f} req/s, p99 "
                          f"{m['p99']:.2f} ms, {m['cpu_us']:.0f} us CPU/request, load "
                          f"{busy:.1f}, {m['errors']} errors", flush=True)
    finally:
        for p in procs:
            stop(p)
    one = statistics.median(m["rps"] for m in runs[VARIANTS[0][0]])
    table = ["| | req/s at c=32 (median) | vs 1 worker | p99 (ms) | server CPU per request "
             "(us) | of it, the supervisor (us) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, workers, *_ in VARIANTS:
        ms = runs[label]
        rps = statistics.median(m["rps"] for m in ms)
        own = f"{statistics.median(m['own_us'] for m in ms):.0f}" if workers > 1 else "-"
        table.append(f"| {label} | {rps:,.0f} | {rps / one - 1:+.0%} | "
                     f"{statistics.median(m['p99'] for m in ms):.2f} | "
                     f"{statistics.median(m['cpu_us'] for m in ms):.0f} | {own} | "
                     f"{sum(m['errors'] for m in ms)} |")
    loads = [m["load"] for ms in runs.values() for m in ms]
    text = "\n".join(table) + (
        f"\n\nThis machine's ceiling, measured in each round before the servers ran: two "
        f"CPU-bound Python processes at once get {statistics.median(ceilings):.2f}x one's "
        f"rate (median; {min(ceilings):.2f}-{max(ceilings):.2f}; 2.00 on two free cores)."
        f"\n\n{args.rounds} alternating rounds of {args.duration} s per variant; load average "
        f"before a run {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores "
        f"(wrk and the upstream share them). Measured {time.strftime('%Y-%m-%d %H:%M')} UTC "
        "with `python benchmarks/bench_workers.py`.")
    print(text)
    if args.print_only:
        return
    write_section(DOC, BEGIN, END, text, "## One machine, all its cores: `flowc serve --workers N`")


if __name__ == "__main__":
    main()
