"""The MCP discovery cache on a shared store (real Postgres, tests/pgserver.py; a real stdio
MCP server, tests/mcp/search_server.py): tools discovered on one instance (or by a command
run with the store) are what every other instance, and `flowc check --store`, compiles
against. Each instance has its own copy of the project, as on its own machine, so nothing
is shared through the project's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import free_port
from tests.keyed import ADMIN

CONFIG = f"""\
models:
  fast: openai/gpt-4o-mini
mcpServers:
  search:
    command: {sys.executable}
    args: ["{ROOT / 'tests' / 'mcp' / 'search_server.py'}"]
ledger: {{flush_interval: 0.1}}
"""
PIPELINE = """\
name: {name}
steps:
  - {{id: s, type: mcp_tool, server: search, tool: {tool}, params: {{query: flowc}}}}
output: ${{s}}
"""
TYPO = PIPELINE.format(name="typo", tool="web_serch")
GOOD = PIPELINE.format(name="good", tool="web_search")


def _projects(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        folder = tmp_path / f"machine{i}"
        folder.mkdir()
        (folder / "flowc.yaml").write_text(CONFIG)
        out.append(folder)
    return out


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "FLOWC_STORE_URL"},
            "PYTHONPATH": str(ROOT), "FLOWC_ADMIN_KEY": ADMIN,
            "OPENAI_API_KEY": "sk-test-openai"}


def _register(base: str, name: str, text: str) -> httpx.Response:
    return httpx.put(f"{base}/v1/workflows/{name}", json={"yaml": text}, timeout=30,
                     headers={"authorization": f"Bearer {ADMIN}"})


def test_tools_discovered_on_one_instance_are_known_to_the_others(postgres,
                                                                  tmp_path: Path) -> None:
    store = postgres.fresh_database()
    a_dir, b_dir = _projects(tmp_path, 2)
    env = _env()
    ports = [free_port(), free_port()]
    a = start_server(a_dir, env, ports[0], "--store", store, "--instance", "a")
    b = start_server(b_dir, env, ports[1], "--store", store, "--instance", "b")
    a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    admin = {"authorization": f"Bearer {ADMIN}"}
    try:
        # Before any discovery, nothing is known of the server's tools: a misspelt tool
        # cannot be caught yet.
        assert _register(a_url, "typo", TYPO).status_code == 200
        assert httpx.get(f"{a_url}/v1/mcp/tools", headers=admin).json()["tools"] == []
        found = httpx.post(f"{b_url}/v1/mcp/refresh", headers=admin, timeout=60)
        assert found.status_code == 200, found.text
        with psycopg.connect(store) as conn:
            assert conn.execute("SELECT server, instance FROM mcp_tools").fetchall() == [
                ("search", "b")]
        # On A, right away (a registration reads the store first): the typo is refused,
        # the right name compiles, and A lists the tools B found.
        typo = _register(a_url, "typo", TYPO)
        assert typo.status_code == 422, typo.text
        assert "has no tool 'web_serch'" in json.dumps(typo.json())
        assert _register(a_url, "good", GOOD).status_code == 200
        tools = httpx.get(f"{a_url}/v1/mcp/tools", headers=admin).json()["tools"]
        assert [(t["server"], t["name"]) for t in tools] == [("search", "web_search")]
        # and B serves the pipeline registered on A, compiled against the same tools
        deadline = time.monotonic() + 15
        while not any(w["name"] == "good" for w in httpx.get(
                f"{b_url}/v1/workflows", headers=admin).json()["workflows"]):
            assert time.monotonic() < deadline, "B never served the pipeline"
            time.sleep(0.2)
        ran = httpx.post(f"{b_url}/v1/workflow/good", json={"input": {}}, headers=admin,
                         timeout=60)
        assert ran.status_code == 200 and "Result about flowc" in ran.json()["output"], \
            ran.text
    finally:
        stop_server(a)
        stop_server(b)
    assert not (a_dir / ".flowc" / "mcp-tools.json").exists()  # A never discovered


def test_flowc_check_with_the_store_knows_what_a_command_discovered(postgres,
                                                                    tmp_path: Path) -> None:
    store = postgres.fresh_database()
    laptop, ci = _projects(tmp_path, 2)
    env = _env()

    def flowc(folder: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=folder,
                              env={**env, **extra}, capture_output=True, text=True,
                              timeout=120)

    listed = flowc(laptop, "mcp", "list", "--store", store)
    assert listed.returncode == 0, listed.stderr
    assert "web_search(query, count)" in listed.stdout
    assert "shared with every instance" in listed.stderr
    (ci / "typo.yaml").write_text(TYPO)
    # The embedded default: without the store, CI's own (empty) cache knows no tools.
    alone = flowc(ci, "check", "typo.yaml")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    for args, extra in ((("--store", store), {}), ((), {"FLOWC_STORE_URL": store})):
        shutil.rmtree(ci / ".flowc", ignore_errors=True)
        checked = flowc(ci, "check", "typo.yaml", *args, **extra)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        assert "MCP server 'search' has no tool 'web_serch'" in checked.stdout
        assert "did you mean 'web_search'" in checked.stdout
    down = flowc(ci, "check", "typo.yaml", "--store", "postgresql://nobody@127.0.0.1:1/x")
    assert "warning: MCP tools discovered on other instances are not known" in down.stderr
    assert "Traceback" not in down.stderr
