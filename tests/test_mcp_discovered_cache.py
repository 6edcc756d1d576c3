"""The project's MCP discovery cache (`.flowc/mcp-tools.json`) with several writers at once,
as `flowc serve --workers N` has (each worker refreshes on its own) beside a `flowc mcp
list`: every server any of them found stays in the file, and no writer fails."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from runtime.mcp.discovered import write_file
from tests.conftest import ROOT

WRITES = 150  # per writer, each adding one server


def found(prefix: str, j: int) -> dict[str, dict[str, object]]:
    return {f"{prefix}-{j}": {"ok": True, "tools": [{"name": "now", "inputSchema": {}}]},
            f"{prefix}-down": {"ok": False, "error": "did not start"}}


def cached(project: Path) -> dict[str, object]:
    return json.loads((project / ".flowc" / "mcp-tools.json").read_text())["servers"]


def test_writers_in_threads_and_processes_at_once_lose_no_server_and_never_fail(tmp_path):
    script = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        from runtime.mcp.discovered import write_file
        print("ready", flush=True)
        sys.stdin.readline()  # all start together
        for j in range({WRITES}):
            write_file(Path(sys.argv[1]), {{f"{{sys.argv[2]}}-{{j}}": {{"ok": True, "tools": [
                {{"name": "now", "inputSchema": {{}}}}]}}}})
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"proc{i}"],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    failures: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for j in range(WRITES):
                write_file(tmp_path, found(prefix, j))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(f"thread{i}",)) for i in range(4)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert failures == []
    servers = cached(tmp_path)
    expected = {f"{w}-{j}" for w in [*(f"thread{i}" for i in range(4)), "proc0", "proc1"]
                for j in range(WRITES)}
    assert set(servers) == expected  # every server found, none that failed
    assert all(s == {"ok": True, "tools": [{"name": "now", "inputSchema": {}}]}
               for s in servers.values())
    # No temporary file left behind.
    assert [p.name for p in (tmp_path / ".flowc").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("content", ["[1, 2]", '"servers"', "null", '{"servers": [1]}',
                                     '{"servers": "time"}', "{not json", "\udcff"])
def test_a_cache_file_not_in_its_shape_is_written_anew_with_a_warning(tmp_path, caplog,
                                                                         content):
    cache = tmp_path / ".flowc" / "mcp-tools.json"
    cache.parent.mkdir()
    cache.write_bytes(content.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="flowc.mcp"):
        assert write_file(tmp_path, found("time", 1)) == cache
    assert cached(tmp_path) == {"time-1": found("time", 1)["time-1"]}
    assert f"MCP tool cache {cache}" in caplog.text and "writing it anew" in caplog.text
