"""`flowc lsp` as an editor drives it: the server runs as its own process and this file is
the client, speaking JSON-RPC over the server's stdin and stdout with LSP's Content-Length
framing (no LSP library on this side: what is tested is the wire)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowc.compiler import compile_source

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
fallbacks:
  smart: [openai/gpt-4o]
"""

PIPELINE = """\
name: triage
inputs:
  ticket:
    type: string
    description: The customer's message
steps:
  - id: classify
    type: llm
    model: fast
    prompt: "Classify: ${input.ticket}"
    response_format:
      schema:
        type: object
        properties:
          label: {type: string, enum: [technical, billing]}
          urgency: {type: integer}
        required: [label, urgency]
  - id: answer
    type: llm
    model: smart
    when: ${classify.urgency} > 2
    prompt: "Answer this ${classify.label} ticket: ${input.ticket}"
output:
  answer: ${answer ?? "none"}
"""


class Client:
    """A minimal LSP client: requests wait for their response; notifications queue up."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowc.lsp"], cwd=cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.next_id = 0
        self.responses: dict[int, dict[str, Any]] = {}
        self.notes: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cond = threading.Condition()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            headers: dict[str, str] = {}
            while True:
                line = out.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii").partition(":")
                headers[name.strip().lower()] = value.strip()
            msg = json.loads(out.read(int(headers["content-length"])))
            if "id" in msg and "method" not in msg:
                with self.cond:
                    self.responses[msg["id"]] = msg
                    self.cond.notify_all()
            elif "id" in msg:  # a request from the server (e.g. registration): accept it
                self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            else:
                self.notes.put(msg)

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def request(self, method: str, params: Any) -> dict[str, Any]:
        """The whole response (``result`` or ``error``)."""
        self.next_id += 1
        rid = self.next_id
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        with self.cond:
            if not self.cond.wait_for(lambda: rid in self.responses, TIMEOUT):
                raise AssertionError(f"no answer to {method} in {TIMEOUT}s: "
                                     + b"".join(self.stderr).decode(errors="replace"))
            return self.responses.pop(rid)

    def result(self, method: str, params: Any) -> Any:
        response = self.request(method, params)
        assert "error" not in response, response
        return response["result"]

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def diagnostics(self, uri: str, version: int | None = None) -> list[dict[str, Any]]:
        """The next diagnostics published for ``uri`` (for ``version``, when given)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            msg = self.notes.get(timeout=max(0.01, deadline - time.monotonic()))
            p = msg.get("params", {})
            if msg["method"] == "textDocument/publishDiagnostics" and p["uri"] == uri and (
                    version is None or p.get("version") == version):
                return p["diagnostics"]

    def initialize(self, root: Path, encodings: list[str] | None = None) -> dict[str, Any]:
        caps: dict[str, Any] = {"textDocument": {"hover": {"contentFormat": ["markdown"]}}}
        if encodings:
            caps["general"] = {"positionEncodings": encodings}
        result = self.result("initialize", {"processId": None, "rootUri": root.as_uri(),
                                            "capabilities": caps})
        self.notify("initialized", {})
        return result

    def open(self, uri: str, text: str, version: int = 1) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "yaml", "version": version, "text": text}})

    def change(self, uri: str, text: str, version: int) -> None:
        self.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": version}, "contentChanges": [{"text": text}]})

    def at(self, method: str, uri: str, line: int, character: int) -> Any:
        return self.result(method, {"textDocument": {"uri": uri},
                                    "position": {"line": line, "character": character}})

    def close(self) -> int:
        """shutdown, then exit: the server's exit code."""
        assert self.request("shutdown", None).get("result", "missing") is None
        self.notify("exit", None)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def pos_of(text: str, needle: str, delta: int = 0) -> tuple[int, int]:
    """0-based line and character (UTF-16, as LSP counts) of ``needle`` in ``text``."""
    off = text.index(needle) + delta
    before = text[:off]
    line = before.count("\n")
    col = before[before.rfind("\n") + 1 :]
    return line, len(col.encode("utf-16-le")) // 2


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    return tmp_path


@pytest.fixture
def client(project: Path):
    c = Client(project)
    c.initialize(project)
    yield c
    if c.proc.poll() is None:
        c.proc.kill()


def test_session_diagnostics_as_you_type_hover_definition_completion_and_exit(
        client: Client, project: Path) -> None:
    path = project / "triage.yaml"
    uri = path.as_uri()
    broken = PIPELINE.replace("${input.ticket}\"\n", "${input.tickt}\"\n", 1)
    client.open(uri, broken)
    diags = client.diagnostics(uri, 1)
    expected = compile_source(broken, str(path)).diagnostics  # what `flowc check` says
    assert [d["code"] for d in diags] == [d.rule for d in expected] == ["undefined-input"]
    d = diags[0]
    line, col = pos_of(broken, "input.tickt")
    assert d["range"] == {"start": {"line": line, "character": col - 2},
                          "end": {"line": line, "character": col + len("input.tickt}")}}
    assert d["severity"] == 1 and d["source"] == "flowc"
    assert "undefined input 'tickt'; did you mean 'ticket'?" in d["message"]

    client.change(uri, PIPELINE, 2)
    assert client.diagnostics(uri, 2) == []

    # hover on a field of a structured output: its type, as the checker prints it
    hover = client.at("textDocument/hover", uri, *pos_of(PIPELINE, "classify.label", 3))
    text = hover["contents"]["value"]
    assert "classify.label: string (one of 'technical', 'billing')" in text
    assert "The result of step `classify` (llm, model `fast`), line 7." in text
    line, col = pos_of(PIPELINE, "${classify.label}")
    assert hover["range"]["start"] == {"line": line, "character": col}
    hover = client.at("textDocument/hover", uri, *pos_of(PIPELINE, "input.ticket}\"\n", 8))
    assert "input.ticket: string" in hover["contents"]["value"]
    assert "The customer's message" in hover["contents"]["value"]
    hover = client.at("textDocument/hover", uri, *pos_of(PIPELINE, "answer ?? ", 1))
    assert "Runs only when: `${classify.urgency} > 2`" in hover["contents"]["value"]
    assert client.at("textDocument/hover", uri, 0, 1) is None  # `name:`: no reference

    # go to definition: the step's id, the input's declaration
    loc = client.at("textDocument/definition", uri, *pos_of(PIPELINE, "classify.urgency", 2))
    line, col = pos_of(PIPELINE, "classify\n")
    assert loc == {"uri": uri, "range": {"start": {"line": line, "character": col},
                                         "end": {"line": line, "character": col + 8}}}
    loc = client.at("textDocument/definition", uri, *pos_of(PIPELINE, "input.ticket", 7))
    line, col = pos_of(PIPELINE, "ticket:")
    assert loc["range"]["start"] == {"line": line, "character": col}

    # completion: names inside `${`, fields after `name.`, models after `model:`
    typing = PIPELINE.replace("Answer this ${classify.label}", "Answer this ${classify.", 1)
    client.change(uri, typing, 3)
    items = client.at("textDocument/completion", uri,
                      *pos_of(typing, "${classify.", len("${classify.")))["items"]
    assert {i["label"]: i["detail"] for i in items} == {
        "label": "string (one of 'technical', 'billing')", "urgency": "integer"}
    line, col = pos_of(typing, "${classify.", len("${classify."))
    assert items[0]["textEdit"]["range"] == {"start": {"line": line, "character": col},
                                             "end": {"line": line, "character": col}}
    typing = PIPELINE.replace("Answer this ${classify.label}", "Answer this ${cl", 1)
    client.change(uri, typing, 4)
    items = client.at("textDocument/completion", uri, *pos_of(typing, "${cl", 4))["items"]
    assert {i["label"] for i in items} == {"input", "classify", "answer"}
    edit = next(i for i in items if i["label"] == "classify")["textEdit"]
    line, col = pos_of(typing, "${cl", 2)
    assert edit["range"]["start"] == {"line": line, "character": col}
    assert edit["range"]["end"] == {"line": line, "character": col + 2}
    typing = PIPELINE.replace("Classify: ${input.ticket}", "Classify: ${input.", 1)
    client.change(uri, typing, 5)
    items = client.at("textDocument/completion", uri, *pos_of(typing, "${input.", 8))["items"]
    assert [(i["label"], i["detail"]) for i in items] == [("ticket", "string")]
    typing = PIPELINE.replace("model: smart", "model: sm", 1)
    client.change(uri, typing, 6)
    items = client.at("textDocument/completion", uri, *pos_of(typing, "model: sm", 9))["items"]
    labels = [i["label"] for i in items]
    assert labels[:2] == ["fast", "smart"]
    assert {"anthropic/claude-sonnet-4-6", "openai/gpt-4o", "openai/", "ollama/"} <= set(labels)
    assert items[1]["detail"] == "alias of anthropic/claude-sonnet-4-6"
    assert client.close() == 0


def test_completion_uses_the_last_parsed_version_while_the_yaml_is_broken(
        client: Client, project: Path) -> None:
    uri = (project / "p.yaml").as_uri()
    client.open(uri, PIPELINE)
    client.diagnostics(uri, 1)
    assert client.at("textDocument/hover", uri, *pos_of(PIPELINE, "classify.label", 3))
    # an unterminated quote: the YAML does not parse until it is closed
    typing = PIPELINE.replace("\"Answer this ${classify.label} ticket: ${input.ticket}\"",
                              "\"Answer ${classify.", 1)
    client.change(uri, typing, 2)
    assert [d["code"] for d in client.diagnostics(uri, 2)] == ["yaml-syntax"]
    items = client.at("textDocument/completion", uri,
                      *pos_of(typing, "${classify.", len("${classify.")))["items"]
    assert {i["label"] for i in items} == {"label", "urgency"}
    assert client.at("textDocument/hover", uri, *pos_of(typing, "classify.", 2)) is None


def test_positions_count_utf16_units_and_a_byte_order_mark(client: Client,
                                                           project: Path) -> None:
    uri = (project / "wide.yaml").as_uri()
    text = "\ufeff" + PIPELINE.replace("Classify: ${input.ticket}",
                                       "Classify 😀 é: ${input.tickt}", 1)
    client.open(uri, text)
    [d] = client.diagnostics(uri, 1)
    line, col = pos_of(text, "${input.tickt}")
    assert text.splitlines()[line].index("$") + 1 == col  # the emoji is two UTF-16 units
    assert d["range"]["start"] == {"line": line, "character": col}
    assert d["range"]["end"] == {"line": line, "character": col + len("${input.tickt}")}
    # the mark is a character of the editor's first line: a finding there counts it
    client.change(uri, "\ufeffname: bad name!\nsteps: []\n", 2)
    first = client.diagnostics(uri, 2)[0]
    assert first["range"]["start"] == {"line": 0, "character": 7}
    # hover and definition agree with the same positions
    client.change(uri, text.replace("tickt", "ticket"), 3)
    hover = client.at("textDocument/hover", uri, *pos_of(text, "input.tickt", 2))
    assert hover["range"]["start"] == {"line": line, "character": col}


def test_utf8_positions_when_the_client_asks_for_them(project: Path) -> None:
    c = Client(project)
    try:
        result = c.initialize(project, encodings=["utf-8", "utf-16"])
        assert result["capabilities"]["positionEncoding"] == "utf-8"
        uri = (project / "u8.yaml").as_uri()
        text = PIPELINE.replace("Classify: ${input.ticket}", "Classé: ${input.tickt}", 1)
        c.open(uri, text)
        [d] = c.diagnostics(uri, 1)
        line = text[: text.index("${input.tickt}")].count("\n")
        prefix = text.splitlines()[line].split("$")[0]
        assert d["range"]["start"] == {"line": line, "character": len(prefix.encode())}
        assert c.close() == 0
    finally:
        if c.proc.poll() is None:
            c.proc.kill()


def test_config_findings_and_reload_when_flowc_yaml_is_saved(client: Client,
                                                            project: Path) -> None:
    uri = (project / "p.yaml").as_uri()
    text = PIPELINE.replace("model: smart", "model: brainy", 1)
    client.open(uri, text)
    [d] = client.diagnostics(uri, 1)
    assert d["code"] == "unknown-model"
    config = project / "flowc.yaml"
    config.write_text(CONFIG.replace("models:\n",
                                     "models:\n  brainy: anthropic/claude-opus-4-1\n"))
    client.notify("textDocument/didSave", {"textDocument": {"uri": config.as_uri()}})
    assert client.diagnostics(uri, 1) == []
    # a broken flowc.yaml: its findings are published on it, as `flowc check` reports them
    config.write_text("models: [oops]\n")
    client.notify("textDocument/didSave", {"textDocument": {"uri": config.as_uri()}})
    config_diags: list[dict[str, Any]] = []
    while not config_diags:  # skip the clean ones published when it loaded before
        config_diags = client.diagnostics(config.as_uri())
    assert [x["code"] for x in config_diags] == ["invalid-value"]
    assert config_diags[0]["range"]["start"]["line"] == 0


def test_close_clears_the_documents_diagnostics(client: Client, project: Path) -> None:
    uri = (project / "p.yaml").as_uri()
    client.open(uri, "name: x\n")
    assert client.diagnostics(uri, 1)
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert client.diagnostics(uri) == []
    # a closed (or never opened) document has no answers, and no error either
    assert client.at("textDocument/hover", uri, 0, 1) is None
    assert client.at("textDocument/completion", uri, 0, 1) == {"isIncomplete": False,
                                                                "items": []}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lsp")
    (root / "flowc.yaml").write_text(CONFIG)
    c = Client(root)
    c.initialize(root)
    c.open((root / "f.yaml").as_uri(), PIPELINE)
    yield c, (root / "f.yaml").as_uri()
    c.close()


_VERSION = [1]
_TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from([
        PIPELINE[: len(PIPELINE) // 2], PIPELINE, "${", "}", "${classify.", "\ufeff", "\r",
        "\r\n", "😀", "model: ", "needs: [", "  - ", ":", "\t", "&a [*a]", "!!int x", "\"",
        "\n", "${input.", "?? ", "when: ", "{{ x.y }}", "\u2028", "\x85"]),
        max_size=30).map("".join))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXTS, line=st.integers(-1, 40), character=st.integers(-1, 400))
def test_any_text_never_stops_the_server(shared, text: str, line: int, character: int) -> None:
    """Each version is checked (its diagnostics published, or an internal error said in a
    message, never a dead server) and every request on it is answered."""
    c, uri = shared
    _VERSION[0] += 1
    c.change(uri, text, _VERSION[0])
    pos = {"line": max(0, line), "character": max(0, character)}
    for method in ("textDocument/hover", "textDocument/definition",
                   "textDocument/completion"):
        response = c.request(method, {"textDocument": {"uri": uri}, "position": pos})
        assert "error" not in response, (text, response)
    deadline = time.monotonic() + TIMEOUT
    while True:
        msg = c.notes.get(timeout=max(0.01, deadline - time.monotonic()))
        if msg["method"] == "window/showMessage":
            pytest.fail(f"{msg['params']['message']} for {text!r}")
        if msg["method"] == "textDocument/publishDiagnostics" and \
                msg["params"].get("version") == _VERSION[0]:
            break
    assert c.proc.poll() is None


@settings(max_examples=300, deadline=None)
@given(text=_TEXTS, data=st.data())
def test_answers_at_any_offset_of_any_text(text: str, data: st.DataObject) -> None:
    """The answers themselves (in-process, many more texts): any offset of any text."""
    from flowc.compiler import Project
    from flowc.lsp import analysis as A

    project = Project()
    sym = A.symbols(text, "t.yaml", project)
    A.findings(text, "t.yaml", project)
    for offset in data.draw(st.lists(st.integers(0, len(text)), max_size=10)):
        A.completions(sym, text, offset)
        if sym is not None:
            found = A.hover(sym, offset)
            if found is not None:
                assert 0 <= found[1] <= found[2] <= len(text)
            found = A.definition(sym, offset)
            if found is not None:
                assert 0 <= found[0] <= found[1] <= len(text)


def test_needs_and_model_values(client: Client, project: Path) -> None:
    """`needs:` entries complete to step ids and lead to the step; a `model:` value shows
    what the alias resolves to."""
    uri = (project / "n.yaml").as_uri()
    text = PIPELINE.replace("    when: ${classify.urgency} > 2\n",
                            "    when: ${classify.urgency} > 2\n    needs: [classify]\n", 1)
    client.open(uri, text)
    assert client.diagnostics(uri, 1) == []
    loc = client.at("textDocument/definition", uri, *pos_of(text, "[classify]", 3))
    assert loc["range"]["start"] == dict(zip(("line", "character"),
                                             pos_of(text, "classify\n"), strict=True))
    hover = client.at("textDocument/hover", uri, *pos_of(text, "model: smart", 8))
    assert hover["contents"]["value"] == (
        "`smart`: provider `anthropic`, model `claude-sonnet-4-6`")
    typing = text.replace("needs: [classify]", "needs: [cla", 1)
    client.change(uri, typing, 2)
    items = client.at("textDocument/completion", uri, *pos_of(typing, "[cla", 4))["items"]
    assert [(i["label"], i["detail"]) for i in items] == [
        ("classify", "step (llm)"), ("answer", "step (llm)")]
    typing = text.replace("needs: [classify]", "needs:\n      - ans", 1)
    client.change(uri, typing, 3)
    items = client.at("textDocument/completion", uri, *pos_of(typing, "- ans", 5))["items"]
    assert items[1]["textEdit"]["range"]["start"] == dict(zip(
        ("line", "character"), pos_of(typing, "- ans", 2), strict=True))


def test_diagnostics_are_the_findings_flowc_check_prints(client: Client, project: Path) -> None:
    """Every finding `flowc check --format json` prints for a file (errors and warnings,
    the project's model check included) is published, at the same place: the CLI's 1-based
    columns count characters, LSP's count UTF-16 units from 0."""
    text = PIPELINE.replace("Classify: ${input.ticket}", "Classé 😀: ${input.tickt}", 1) \
        .replace("model: smart", "model: smrt", 1) \
        .replace("output:\n  answer: ${answer ?? \"none\"}\n", "when: 1\n")
    path = project / "many.yaml"
    path.write_text(text)
    cli = subprocess.run([sys.executable, "-m", "flowc.cli", "check", "--format", "json", path],
                         capture_output=True, text=True, cwd=project, timeout=60)
    printed = json.loads(cli.stdout)
    assert len({f["rule"] for f in printed}) >= 3, printed
    client.open(path.as_uri(), text)
    published = client.diagnostics(path.as_uri(), 1)
    lines = text.split("\n")

    def lsp(line: int, column: int) -> dict[str, int]:
        before = lines[line - 1][: column - 1]
        return {"line": line - 1, "character": len(before.encode("utf-16-le")) // 2}

    assert [(d["code"], d["message"].split("\nhelp: ")[0], d["range"]) for d in published] == [
        (f["rule"], f["message"], {"start": lsp(f["line"], f["column"]),
                                   "end": lsp(f["end_line"], f["end_column"])})
        for f in printed]
    assert [d["severity"] for d in published] == [
        1 if f["severity"] == "error" else 2 for f in printed]
    helps = [f["help"] for f in printed if f["help"]]
    assert helps and all(any(h in d["message"] for d in published) for h in helps)
