"""`flowc serve` against what a web page, a rebinding DNS name or an oversized upload can do.

A real server, real clients (httpx, the official openai and anthropic SDKs, raw sockets), the
browser's side played by the headers a browser sends: `Origin` on cross-site requests, the
attacker's name in `Host` after DNS rebinding, the content types a page can send without a
preflight (text/plain, forms, a Blob with none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port
from tests.tools import require

LIMIT = 1024 * 1024  # server.max_body_bytes in the test project
MARKER_SERVER = """\
import os, sys
with open(sys.argv[1], "a") as f:  # one line per start
    f.write("started\\n")
os.execvp("mcp-server-time", ["mcp-server-time", "--local-timezone", "UTC"])
"""
CACHED_TOOL = {"name": "cached_tool", "description": "from the cache",
               "inputSchema": {"type": "object", "properties": {}}, "outputSchema": None}


@dataclass
class Srv:
    url: str
    port: int
    project: Path
    proc: subprocess.Popen
    openai: FakeServer
    anthropic: FakeServer
    env: dict[str, str]

    def spent(self) -> int:
        """Calls that reached a provider."""
        return len(self.openai.requests) + len(self.anthropic.requests)

    def starts(self, server: str) -> int:
        marker = self.project / f"{server}.started"
        return len(marker.read_text().splitlines()) if marker.exists() else 0


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    require("mcp-server-time")
    project = tmp_path_factory.mktemp("hostile-http")
    (project / "mcp_marker.py").write_text(MARKER_SERVER)
    servers = {name: {"command": sys.executable,
                      "args": [str(project / "mcp_marker.py"), str(project / f"{name}.started")]}
               for name in ("clock", "cached")}
    (project / "flowc.yaml").write_text(textwrap.dedent(f"""\
        models: {{fast: openai/gpt-4o-mini}}
        ledger: {{flush_interval: 0.2}}
        server:
          allowed_hosts: [flowc.internal]
          allowed_origins: ["http://localhost:5173"]
          max_body_bytes: {LIMIT}
        mcpServers: {json.dumps(servers)}
        """))
    (project / "pipelines").mkdir()
    (project / "pipelines" / "echo.yaml").write_text(
        "name: echo\nsteps:\n  - {id: a, type: llm, model: fast, prompt: hi}\noutput: ${a}\n")
    (project / ".flowc").mkdir()
    (project / ".flowc" / "mcp-tools.json").write_text(json.dumps(
        {"servers": {"cached": {"ok": True, "tools": [CACHED_TOOL]}}}))
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic")}
    env = {**os.environ, "OPENAI_BASE_URL": fakes["openai"].url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai", "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "ANTHROPIC_API_KEY": "sk-ant-test", "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = start_server(project, env, port, "--allow-host", "cli.example")
    yield Srv(f"http://127.0.0.1:{port}", port, project, proc, fakes["openai"],
              fakes["anthropic"], env)
    stop_server(proc)
    for f in fakes.values():
        f.stop()


CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "openai/gpt-4o-mini", "max_tokens": 10,
           "messages": [{"role": "user", "content": "hi"}]}


def post(srv: Srv, path: str, body: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(srv.url + path, content=body, timeout=30,
                      headers={k.replace("_", "-"): v for k, v in headers.items()})


def openai_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    return err["message"]


def anthropic_error(r: httpx.Response, status: int, etype: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == etype, body
    return body["error"]["message"]


def workflows(srv: Srv) -> list[str]:
    return [w["name"] for w in httpx.get(srv.url + "/v1/workflows").json()["workflows"]]


# -- content types -------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None])
def test_what_a_page_can_send_without_a_preflight_is_refused_before_anything_runs(srv, ctype):
    """text/plain, a form, or a Blob with no type: all reach a server without a CORS
    preflight. None of them may spend a call, run a pipeline, query the ledger or start an
    MCP server."""
    before = srv.spent()
    headers = {} if ctype is None else {"content_type": ctype}
    shown = ctype.split(";")[0] if ctype else "no Content-Type"
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/workflow/echo", {"input": {}}),
                       ("/v1/costs/sql", {"sql": "SELECT 1"}), ("/v1/mcp/refresh", {})):
        msg = openai_error(post(srv, path, json.dumps(body), **headers), 415,
                           "unsupported_media_type")
        assert shown in msg and "application/json" in msg
    msg = anthropic_error(post(srv, "/v1/messages", json.dumps(MESSAGE), **headers), 415,
                          "invalid_request_error")
    assert shown in msg and "application/json" in msg
    assert srv.spent() == before
    assert srv.starts("clock") == srv.starts("cached") == 0


def test_json_still_works_from_the_sdks_and_with_a_charset(srv):
    before = srv.spent()
    out = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) \
        .chat.completions.create(**CHAT)
    assert out.choices[0].message.content == "echo: hi"
    msg = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0) \
        .messages.create(**MESSAGE)
    assert msg.content[0].text == "echo: hi"
    r = post(srv, "/v1/workflow/echo", json.dumps({"input": {}}),
             content_type="application/json; charset=utf-8")
    assert r.status_code == 200 and r.json()["output"] == "echo: hi"
    assert httpx.post(srv.url + "/v1/workflow/echo").json()["output"] == "echo: hi"  # no body
    assert srv.spent() == before + 4


def test_pipelines_register_as_yaml_or_json_but_not_as_text_or_a_form(srv):
    text = "name: {n}\nsteps:\n  - {{id: a, type: llm, model: fast, prompt: hi}}\n"
    for i, ctype in enumerate(("application/yaml", "text/yaml", "application/x-yaml")):
        r = httpx.put(f"{srv.url}/v1/workflows/y{i}", content=text.format(n=f"y{i}"),
                      headers={"content-type": ctype})
        assert r.status_code == 200 and r.json()["registered"], r.text
    r = httpx.put(f"{srv.url}/v1/workflows/j", json={"yaml": text.format(n="j")})
    assert r.status_code == 200, r.text
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.put(f"{srv.url}/v1/workflows/bad", content=text.format(n="bad"),
                      headers={"content-type": ctype})
        assert "application/yaml" in openai_error(r, 415, "unsupported_media_type")
    assert {"y0", "y1", "y2", "j"} <= set(workflows(srv)) and "bad" not in workflows(srv)


# -- Host: DNS rebinding --------------------------------------------------------------------
def test_a_rebound_host_name_is_refused_with_how_to_allow_it(srv):
    before = srv.spent()
    evil = f"evil.example:{srv.port}"
    r = httpx.get(srv.url + "/v1/costs/summary", headers={"host": evil})
    msg = openai_error(r, 421, "host_not_allowed")
    assert "'evil.example:" in msg and "--allow-host evil.example" in msg
    assert "server.allowed_hosts" in msg
    r = post(srv, "/v1/chat/completions", json.dumps(CHAT), host=evil,
             content_type="application/json")
    openai_error(r, 421, "host_not_allowed")
    r = post(srv, "/v1/messages", json.dumps(MESSAGE), host=evil,
             content_type="application/json")
    assert "--allow-host evil.example" in anthropic_error(r, 421, "invalid_request_error")
    assert httpx.get(srv.url + "/dashboard", headers={"host": "evil.example"}).status_code \
        == 421
    assert srv.spent() == before


@pytest.mark.parametrize("host", [
    "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST:{port}",
    "flowc.internal", "flowc.internal:{port}",      # server.allowed_hosts in flowc.yaml
    "cli.example:{port}",                           # flowc serve --allow-host
    "192.168.1.20:{port}", "[fe80::1]:{port}"])     # addresses cannot be rebound
def test_the_hosts_the_server_answers_for(srv, host):
    r = httpx.get(srv.url + "/v1/models", headers={"host": host.format(port=srv.port)})
    assert r.status_code == 200, r.text


# -- Origin: cross-site requests -------------------------------------------------------------
def test_a_cross_site_page_cannot_spend_or_change_state(srv):
    before, names = srv.spent(), set(workflows(srv))
    for origin in ("http://evil.example", "null", f"http://localhost:{srv.port + 1}",
                   f"https://127.0.0.1:{srv.port}.evil.example"):
        json_ = {"content_type": "application/json", "origin": origin}
        msg = openai_error(post(srv, "/v1/chat/completions", json.dumps(CHAT), **json_), 403,
                           "origin_not_allowed")
        assert f"'{origin}'" in msg and "server.allowed_origins" in msg
        anthropic_error(post(srv, "/v1/messages", json.dumps(MESSAGE), **json_), 403,
                        "permission_error")
        for path, body in (("/v1/workflow/echo", {}), ("/v1/mcp/refresh", {}),
                           ("/v1/costs/sql", {"sql": "SELECT 1"})):
            openai_error(post(srv, path, json.dumps(body), **json_), 403, "origin_not_allowed")
        r = httpx.put(f"{srv.url}/v1/workflows/evil", content="name: evil\nsteps: []\n",
                      headers={"content-type": "application/yaml", "origin": origin})
        openai_error(r, 403, "origin_not_allowed")
    assert srv.spent() == before and set(workflows(srv)) == names
    assert srv.starts("clock") == srv.starts("cached") == 0


def test_the_servers_own_pages_and_configured_origins_work(srv):
    before = srv.spent()
    own = post(srv, "/v1/chat/completions", json.dumps(CHAT), content_type="application/json",
               origin=f"http://127.0.0.1:{srv.port}")
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    r = post(srv, "/v1/chat/completions", json.dumps(CHAT), content_type="application/json",
             origin="http://localhost:5173")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "x-flowc-cost-usd" in r.headers["access-control-expose-headers"]
    assert srv.spent() == before + 2


def test_cors_headers_go_only_to_configured_origins(srv):
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "content-type,authorization"}
    r = httpx.options(srv.url + "/v1/chat/completions",
                      headers={"origin": "http://localhost:5173", **preflight})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "content-type,authorization"
    for origin in ("http://evil.example", "null"):
        r = httpx.options(srv.url + "/v1/chat/completions",
                          headers={"origin": origin, **preflight})
        assert r.status_code >= 400
        assert not [h for h in r.headers if h.startswith("access-control-")]
        r = httpx.get(srv.url + "/v1/costs/summary", headers={"origin": origin})
        assert r.status_code == 200  # answered, but a page elsewhere cannot read it
        assert not [h for h in r.headers if h.startswith("access-control-")]


# -- body limits -----------------------------------------------------------------------------
ENDPOINTS = [("POST", "/v1/chat/completions", "application/json"),
             ("POST", "/v1/messages", "application/json"),
             ("POST", "/v1/workflow/echo", "application/json"),
             ("POST", "/v1/costs/sql", "application/json"),
             ("PUT", "/v1/workflows/big", "application/yaml")]


def raw_exchange(port: int, head: str, body: Iterator[bytes]) -> bytes:
    """Write the request, all of it, then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        for part in body:
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def check_413(path: str, status_line: bytes, headers: bytes, body: bytes) -> None:
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    assert b"connection: close" in headers.lower()
    err = json.loads(body)
    if path == "/v1/messages":
        assert err["type"] == "error" and err["error"]["type"] == "request_too_large"
        message = err["error"]["message"]
    else:
        assert err["error"]["code"] == "request_too_large"
        message = err["error"]["message"]
    assert f"at most {LIMIT} bytes" in message and "server.max_body_bytes" in message


def split_response(data: bytes) -> tuple[bytes, bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, _, headers = head.partition(b"\r\n")
    return status_line, headers, body


@pytest.mark.parametrize(("method", "path", "ctype"), ENDPOINTS)
def test_a_client_that_writes_a_whole_oversized_body_before_reading_sees_the_413(
        srv, method, path, ctype):
    size = 8 * LIMIT  # more than the socket buffers hold: unread, it would reset the client
    block = b" " * 65536
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
            f"Content-Type: {ctype}\r\n")
    data = raw_exchange(srv.port, head + f"Content-Length: {size}\r\n\r\n",
                        iter([block] * (size // len(block))))
    check_413(path, *split_response(data))
    # The same body sent chunked: no length up front, the limit is found as it streams in.
    chunks = iter([b"%x\r\n" % len(block) + block + b"\r\n"] * (size // len(block)) +
                  [b"0\r\n\r\n"])
    data = raw_exchange(srv.port, head + "Transfer-Encoding: chunked\r\n\r\n", chunks)
    check_413(path, *split_response(data))
    assert srv.proc.poll() is None


def test_a_client_that_asks_to_continue_is_refused_before_it_sends_the_body(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(f"POST /v1/costs/sql HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {10 * LIMIT}\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert b"100 Continue" not in data
    check_413("/v1/costs/sql", *split_response(data))


def test_the_sdks_and_httpx_see_the_413(srv):
    before = srv.spent()
    big = "x" * (LIMIT + 1)
    with pytest.raises(openai.APIStatusError) as exc:
        openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) \
            .chat.completions.create(model="fast", messages=[{"role": "user", "content": big}])
    assert exc.value.status_code == 413 and exc.value.body["code"] == "request_too_large"
    with pytest.raises(anthropic.APIStatusError) as exc2:
        anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0).messages.create(
            model="fast", max_tokens=5, messages=[{"role": "user", "content": big}])
    assert exc2.value.status_code == 413
    assert exc2.value.body["error"]["type"] == "request_too_large"
    r = httpx.post(srv.url + "/v1/workflow/echo", json={"input": {"x": big}}, timeout=30)
    openai_error(r, 413, "request_too_large")

    def stream() -> Iterator[bytes]:  # chunked: httpx cannot know the length
        yield b'{"sql": "SELECT 1", "pad": "'
        for _ in range(LIMIT // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    r = httpx.post(srv.url + "/v1/costs/sql", content=stream(), timeout=30,
                   headers={"content-type": "application/json"})
    openai_error(r, 413, "request_too_large")
    assert srv.spent() == before


def test_a_body_of_exactly_the_limit_is_accepted(srv):
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "pad": ""}
    body["pad"] = "x" * (LIMIT - len(json.dumps(body)))
    raw = json.dumps(body)
    assert len(raw) == LIMIT
    r = post(srv, "/v1/chat/completions", raw, content_type="application/json")
    assert r.status_code == 200, r.text
    r = post(srv, "/v1/chat/completions", raw + " ", content_type="application/json")
    openai_error(r, 413, "request_too_large")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_300_mb_upload_neither_grows_nor_kills_the_server(srv):
    before = peak_rss_mb(srv.proc.pid)
    block = b"x" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        yield b'{"sql": "SELECT 1", "pad": "'
        for _ in range(300):
            yield block
        yield b'"}'

    for path in ("/v1/costs/sql", "/v1/workflow/echo", "/v1/chat/completions"):
        r = httpx.post(srv.url + path, content=body(), timeout=120,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
    assert srv.proc.poll() is None
    assert httpx.get(srv.url + "/health").status_code == 200
    assert peak_rss_mb(srv.proc.pid) - before < 50  # the limit is 1 MiB; was 869 MB per 100


def test_the_default_limit_is_32_mib(gw):
    limit = 32 * 1024 * 1024
    pad = b" " * (limit - len(b'{"sql": "SELECT 1"}'))
    ok = httpx.post(gw.url + "/v1/costs/sql", content=b'{"sql": "SELECT 1"}' + pad,
                    headers={"content-type": "application/json"}, timeout=60)
    assert ok.status_code == 200, ok.text[:300]
    r = httpx.post(gw.url + "/v1/costs/sql", content=b'{"sql": "SELECT 1"}' + pad + b" ",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and f"at most {limit} bytes" in r.json()["error"]["message"]


# -- MCP: listing starts nothing -------------------------------------------------------------
def test_listing_mcp_servers_and_tools_starts_no_process(srv):
    for origin in (None, "http://evil.example"):  # a GET any page can make a browser send
        headers = {"origin": origin} if origin else {}
        servers = httpx.get(srv.url + "/v1/mcp/servers", headers=headers).json()["servers"]
        assert servers == [
            {"name": "cached", "transport": "stdio", "running": False, "ok": None,
             "error": None, "tools_from": "cache", "tools": 1},
            {"name": "clock", "transport": "stdio", "running": False, "ok": None,
             "error": None, "tools_from": None, "tools": None}]
        tools = httpx.get(srv.url + "/v1/mcp/tools", headers=headers).json()["tools"]
        assert tools == [{"server": "cached", **CACHED_TOOL}]
    assert srv.starts("clock") == srv.starts("cached") == 0


def test_refresh_is_an_explicit_post_that_starts_servers_and_updates_the_cache(srv):
    r = httpx.post(srv.url + "/v1/mcp/refresh", json={}, timeout=60)
    assert r.status_code == 200, r.text
    by_name = {s["name"]: s for s in r.json()["servers"]}
    assert by_name["clock"] == {"name": "clock", "transport": "stdio", "running": True,
                                "ok": True, "error": None, "tools_from": "session", "tools": 2}
    assert srv.starts("clock") == srv.starts("cached") == 1
    names = {(t["server"], t["name"]) for t in
             httpx.get(srv.url + "/v1/mcp/tools").json()["tools"]}
    assert ("clock", "get_current_time") in names and ("cached", "convert_time") in names
    cache = json.loads((srv.project / ".flowc" / "mcp-tools.json").read_text())
    assert {t["name"] for t in cache["servers"]["clock"]["tools"]} == {
        "get_current_time", "convert_time"}
    httpx.get(srv.url + "/v1/mcp/servers")
    assert srv.starts("clock") == 1  # listing again starts nothing


# -- binding -----------------------------------------------------------------------------------
def test_serving_on_every_interface_without_auth_is_refused(srv):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--host", "0.0.0.0",
                           "--port", str(port)], cwd=srv.project, env=srv.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert f"refusing to listen on 0.0.0.0:{port} without authentication" in done.stderr
    for way in ("FLOWC_ADMIN_KEY", "--admin-key-file", "--insecure-no-auth",
                "spend your provider API credits"):
        assert way in done.stderr
    with socket.socket() as s:  # nothing listens
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_insecure_no_auth_serves_every_interface_with_a_loud_warning(srv, tmp_path):
    (tmp_path / "flowc.yaml").write_text("models: {fast: openai/gpt-4o-mini}\n")
    proc = start_server(tmp_path, srv.env, free_port(), "--host", "0.0.0.0",
                        "--insecure-no-auth")
    stop_server(proc)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "WARNING: flowc is listening on 0.0.0.0:" in out
    assert "no authentication" in out and "spend your provider API credits" in out


def test_a_wildcard_origin_is_refused_in_flowc_yaml_and_on_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--port",
                               str(free_port()), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    done = serve("--allow-origin", "*")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Invalid value for '--allow-origin': '*' is not an origin" in done.stderr
    (tmp_path / "flowc.yaml").write_text('server:\n  allowed_origins: ["*"]\n')
    done = serve()
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert "flowc.yaml:2:20: error: invalid 'server.allowed_origins': '*' is not an origin" \
        in done.stdout + done.stderr
