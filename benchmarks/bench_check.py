"""`flowc check` speed on generated pipelines of growing size.

Each pipeline is a realistic mix: chains, fan-out/fan-in joins, conditional branches with
`??` fallbacks, structured outputs read by field path, and MCP tool steps (one for every
four steps) whose params are checked against the tool's input schema. Prints a Markdown
table; run with `python benchmarks/bench_check.py` (`--sizes 1000,10000` chooses sizes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowc import compile_source
from flowc.compiler import Project

# The project the generated pipelines are checked in: one MCP server with its tools' schemas
# declared, so checking needs no server running.
CONFIG = """\
mcpServers:
  time:
    command: mcp-server-time
    tools:
      get_current_time:
        inputSchema:
          type: object
          properties: {timezone: {type: string}}
          required: [timezone]
        outputSchema:
          type: object
          properties: {timezone: {type: string}, datetime: {type: string}}
          required: [timezone, datetime]
"""


def generate(n: int) -> str:
    lines = ["name: generated", "inputs:", "  topic: {type: string}",
             "  depth: {type: integer, default: 1}", "steps:"]
    for i in range(n):
        tool = i % 4 == 1  # a tool step before this one, read by it
        if tool:
            lines.append(f"  - id: t{i}")
            lines.append("    type: mcp_tool")
            lines.append("    server: time")
            lines.append("    tool: get_current_time")
            lines.append('    params: {timezone: "${input.topic}"}')
        lines.append(f"  - id: s{i}")
        lines.append("    type: llm")
        lines.append("    model: gpt-4o-mini")
        kind = i % 4
        if i == 0 or kind == 0:
            after = f" after ${{s{i - 1}}}" if i else ""
            lines.append(f"    prompt: Start on ${{input.topic}}{after}")
            lines.append("    response_format:")
            lines.append("      schema: {type: object, required: [label, score], properties: "
                         "{label: {type: string}, score: {type: number}}}")
        elif kind == 1:
            lines.append(f"    prompt: Continue ${{s{i - 1}.label}} with score ${{s{i - 1}.score}}"
                         f" at ${{t{i}.datetime}}")
        elif kind == 2:
            lines.append(f'    when: ${{input.depth}} > 2 and ${{s{i - 2}.label}} == "x"')
            lines.append(f"    prompt: Branch on ${{s{i - 1}}}")
        else:
            lines.append(f"    prompt: Join ${{s{i - 1} ?? s{i - 2}}} and ${{s{i - 3}.label}}")
    lines.append(f"output: ${{s{n - 1}}}")
    return "\n".join(lines) + "\n"


def measure(n: int, repeats: int) -> tuple[float, int]:
    text = generate(n)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "flowc.yaml").write_text(CONFIG)
        project = Project.load(Path(tmp) / "flowc.yaml")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = compile_source(text, "generated.yaml", project)
        times.append(time.perf_counter() - t0)
    assert result.compiled is not None and not result.diagnostics, result.diagnostics[:3]
    return statistics.median(times), len(result.diagnostics)


# The installed `flowc` script (what users run: it imports runtime.cli); else the same module.
ENTRY = Path(sys.executable).with_name("flowc")
FLOWC = [str(ENTRY)] if ENTRY.is_file() else [sys.executable, "-m", "runtime.cli"]


def measure_cli(n: int, repeats: int) -> float:
    """Wall time of the `flowc check` command, interpreter start and imports included (the
    fastest run: other processes on the machine only ever add to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generated.yaml"
        path.write_text(generate(n))
        (Path(tmp) / "flowc.yaml").write_text(CONFIG)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([*FLOWC, "check", str(path)], check=True, capture_output=True,
                           cwd=tmp)
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    startup = measure_cli(1, max(args.repeats, 10))
    print("| steps | compile (s) | µs per step | compile / (n log n), vs first row "
          "| `flowc check` command (s) |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for n in sizes:
        t, _ = measure(n, args.repeats)
        ratio = t / (n * math.log2(n))
        base = base or ratio
        cli = measure_cli(n, args.repeats)
        print(f"| {n:,} | {t:.3f} | {t / n * 1e6:.0f} | {ratio / base:.2f} | {cli:.2f} |")
    print(f"\n`flowc check` on a 1-step file (interpreter start and imports): {startup:.2f} s")


if __name__ == "__main__":
    main()
