"""Every pipeline in pipelines/ end to end, over HTTP (`flowc serve`) and the CLI
(`flowc run`), against loopback provider servers and real MCP servers, with ledger rows
checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.fakes import FakeServer, anthropic_text, free_port, openai_text, wait_until
from tests.tools import require

ROOT = Path(__file__).resolve().parent.parent
CONFIG = f"""\
models:
  local: ollama/qwen2.5:7b
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
ledger:
  flush_interval: 0.2
mcpServers:
  brave-search:
    command: {sys.executable}
    args: ["{ROOT / 'tests' / 'mcp' / 'search_server.py'}"]
  time:
    command: mcp-server-time
    args: ["--local-timezone", "UTC"]
"""


@pytest.fixture(autouse=True, scope="module")
def _servers_installed() -> None:
    require("mcp-server-time")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = tmp_path_factory.mktemp("e2e")
    (project / "flowc.yaml").write_text(CONFIG)
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic", "ollama")}
    env = {**os.environ, "OPENAI_BASE_URL": fakes["openai"].url + "/v1",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "OLLAMA_HOST": fakes["ollama"].url,
           "OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "PYTHONPATH": str(ROOT)}
    port = free_port()
    # --pipelines: the repository's own examples, served as they are.
    proc = start_server(project, env, port, "--pipelines", str(ROOT / "pipelines"))
    yield f"http://127.0.0.1:{port}", project, env, fakes
    stop_server(proc)
    for f in fakes.values():
        f.stop()


def sql(url: str, query: str, params=()) -> list[list]:
    r = httpx.post(url + "/v1/costs/sql", json={"sql": query, "params": list(params)},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def run_http(url: str, name: str, inputs: dict) -> dict:
    r = httpx.post(f"{url}/v1/workflow/{name}", json={"input": inputs}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def ledger_steps(url: str, run_id: str) -> list[list]:
    wait_until(lambda: bool(sql(url, "SELECT 1 FROM requests WHERE run_id = ?", [run_id])))
    return sql(url, "SELECT step_id, provider, success, workflow_name FROM requests "
                    "WHERE run_id = ? ORDER BY step_id", [run_id])


def test_workflows_are_listed_with_their_inputs(served):
    url, *_ = served
    listed = {w["name"]: w for w in httpx.get(url + "/v1/workflows").json()["workflows"]}
    assert set(listed) >= {"research-assistant", "support-triage", "translate-fanout",
                           "invoice-extract", "meeting-planner", "batch-translate",
                           "summarize", "document-digest", "extract-repair",
                           "draft-approve-publish"}
    assert listed["support-triage"]["inputs"]["depth"] == {
        "type": "integer", "default": 1, "description": "1 = brief answers, 3 = thorough"}


def test_research_pipeline_over_http(served):
    url, _, _, fakes = served
    fakes["anthropic"].then(anthropic_text("A three-paragraph report.", input_tokens=300,
                                           output_tokens=200))
    out = run_http(url, "research-assistant", {"topic": "AI middleware patterns"})
    assert out["status"] == "succeeded"
    assert out["output"] == "A three-paragraph report."
    steps = {s["id"]: s for s in out["metrics"]["steps"]}
    assert [s["status"] for s in steps.values()] == ["done", "done", "done"]
    assert steps["search"]["cost"] == 0 and steps["search"]["tool_calls"] == 1
    # claude-sonnet-4-6: 300 * $3/1M + 200 * $15/1M; the local model is $0
    assert steps["report"]["cost"] == pytest.approx(0.0039)
    assert out["metrics"]["total_cost_usd"] == pytest.approx(0.0039)
    summarize = fakes["ollama"].requests[-1].body["messages"][0]["content"]
    # the MCP tool's output, as the text the compiler typed it as (the server's SDK also
    # sends it as structured content, {"result": ...}, which must not leak into the prompt)
    assert "\n1. Result about AI middleware patterns: https://example.org/0\n" in summarize
    assert '"result"' not in summarize
    report_prompt = fakes["anthropic"].requests[-1].body["messages"][0]["content"][0]["text"]
    assert "3-paragraph report on AI middleware patterns" in report_prompt
    assert ledger_steps(url, out["run_id"]) == [
        ["report", "anthropic", True, "research-assistant"],
        ["summarize", "ollama", True, "research-assistant"]]
    record = httpx.get(f"{url}/v1/runs/{out['run_id']}").json()
    assert record["status"] == "succeeded" and record["run_id"] == out["run_id"]


def test_support_triage_branches_and_joins(served):
    url, _, _, fakes = served
    fakes["openai"].then(openai_text('{"label": "billing", "urgency": 5}'),
                         openai_text("Escalated."))
    out = run_http(url, "support-triage", {"ticket": "Charged twice", "depth": 3})
    statuses = {s["id"]: s["status"] for s in out["metrics"]["steps"]}
    assert statuses == {"classify": "done", "deep": "skipped", "quick": "done",
                        "escalate": "done"}
    assert out["output"]["label"] == "billing"
    assert out["output"]["escalation"] == "Escalated."
    assert out["output"]["answer"].startswith("The sky is blue")  # the local model's answer
    record = httpx.get(f"{url}/v1/runs/{out['run_id']}").json()
    deep = next(s for s in record["metrics"]["steps"] if s["id"] == "deep")
    assert deep["skip_reason"] == ('condition `${input.depth} > 2 and ${classify.label} == '
                                   '"technical"` was false')


def test_translate_fanout_and_invoice_extract(served):
    url, _, _, fakes = served
    out = run_http(url, "translate-fanout", {"text": "Good morning"})
    assert out["status"] == "succeeded"
    review = fakes["anthropic"].requests[-1].body["messages"][0]["content"][0]["text"]
    assert "French: echo: Translate into French" in review  # the Jinja loop saw each branch
    invoice = {"vendor": "ACME", "invoice_number": "INV-7", "amount": 120.5,
               "currency": "EUR", "due_date": "2026-01-01",
               "line_items": [{"description": "Widgets", "amount": 120.5}]}
    fakes["openai"].then(openai_text(json.dumps(invoice)))
    out = run_http(url, "invoice-extract", {"email": "Invoice INV-7 ...",
                                            "today": "2026-11-26"})
    assert out["output"]["invoice"] == invoice
    assert out["output"]["reply"] == "Hi! My name is Claude."  # overdue: the reply ran
    # "Use null when a field is absent": null reads as missing, so `?? 0` holds the
    # condition false and the reply is skipped, not a comparison crash
    fakes["openai"].then(openai_text(json.dumps({**invoice, "amount": None})))
    out = run_http(url, "invoice-extract", {"email": "Invoice INV-7 ...",
                                            "today": "2026-11-26"})
    assert out["status"] == "succeeded" and out["output"]["reply"] == ""
    steps = {s["id"]: s for s in out["metrics"]["steps"]}
    assert steps["overdue_reply"]["status"] == "skipped"
    # an answer that breaks the schema fails the step (retries would retry it), with why
    fakes["openai"].then(openai_text(json.dumps({**invoice, "amount": "120.50"})))
    out = run_http(url, "invoice-extract", {"email": "Invoice INV-7 ...",
                                            "today": "2026-11-26"})
    assert out["status"] == "failed"
    assert ("answered JSON that does not match the step's schema: amount: '120.50' is not of "
            "type 'number', 'null'") in out["error"]["message"]


def test_meeting_planner_uses_the_time_server(served):
    url, *_ = served
    out = run_http(url, "meeting-planner", {"home": "Asia/Tokyo"})
    assert out["status"] == "succeeded", out
    assert isinstance(out["output"]["home_is_dst"], bool)


def test_bad_inputs_and_unknown_workflows(served):
    url, *_ = served
    r = httpx.post(f"{url}/v1/workflow/support-triage", json={"input": {"depth": "x"}})
    assert r.status_code == 400
    assert r.json()["error"]["problems"] == [
        "missing required input 'ticket' (string)",
        "input 'depth' must be integer, not str \"x\""]
    r = httpx.post(f"{url}/v1/workflow/nope", json={})
    assert r.status_code == 404 and "research-assistant" in r.json()["error"]["message"]


def test_register_a_pipeline_over_the_api(served):
    url, *_ = served
    bad = "name: mine\nsteps:\n  - {id: a, type: llm, model: fast, promt: hi}\n"
    r = httpx.put(f"{url}/v1/workflows/mine", content=bad,
                  headers={"content-type": "application/yaml"})
    assert r.status_code == 422
    diag = r.json()["error"]["diagnostics"]
    assert [(d["rule"], d["line"], d["message"]) for d in diag] == [
        ("unknown-field", 3, "unknown step field 'promt'; did you mean 'prompt'?")]
    good = "name: mine\nsteps:\n  - {id: a, type: llm, model: fast, prompt: hi}\noutput: ${a}\n"
    r = httpx.put(f"{url}/v1/workflows/mine", json={"yaml": good})
    assert r.status_code == 200 and r.json()["registered"] is True
    assert run_http(url, "mine", {})["output"] == "echo: hi"
    rows = sql(url, "SELECT name, config_yaml FROM workflows WHERE name = 'mine'")
    assert rows == [["mine", good]]


def test_cli_run_records_into_the_ledger_the_server_holds(served):
    url, project, env, _ = served
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run",
                        str(ROOT / "pipelines" / "research.yaml"), "-i", "topic=Queues",
                        "--config", "flowc.yaml", "--json"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded"
    # The server holds the DuckDB file: the CLI wrote segments, the server ingested them.
    assert ledger_steps(url, out["run_id"]) == [
        ["report", "anthropic", True, "research-assistant"],
        ["summarize", "ollama", True, "research-assistant"]]
    run_id = out["run_id"]
    wait_until(lambda: bool(sql(url, "SELECT 1 FROM runs WHERE id = ?", [run_id])))
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "runs"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=60)
    assert out["run_id"] in r.stdout


def test_mcp_discovery_over_http(served):
    url, *_ = served
    # Listing starts nothing (tests/test_hostile_http.py); a refresh asks each server.
    r = httpx.post(url + "/v1/mcp/refresh", json={}, timeout=60)
    assert r.status_code == 200, r.text
    servers = httpx.get(url + "/v1/mcp/servers", timeout=60).json()["servers"]
    assert [(s["name"], s["ok"], s["error"], s["tools"]) for s in servers] == [
        ("brave-search", True, None, 1), ("time", True, None, 2)]
    tools = httpx.get(url + "/v1/mcp/tools", timeout=60).json()["tools"]
    assert {(t["server"], t["name"]) for t in tools} == {
        ("brave-search", "web_search"), ("time", "get_current_time"), ("time", "convert_time")}


INPUTS = {
    "research.yaml": {"topic": "Queues"},
    "support-triage.yaml": {"ticket": "The API returns 500", "depth": 3},
    "translate-fanout.yaml": {"text": "Good night"},
    "invoice-extract.yaml": {"email": "Invoice INV-9", "today": "2026-11-26"},
    "meeting-planner.yaml": {"guest": "Asia/Tokyo"},
}
INVOICE = {"vendor": "ACME", "invoice_number": "INV-9", "amount": 10.0, "currency": "EUR",
           "due_date": "2026-01-01", "line_items": []}


def structured(rec):
    """The loopback model answers structured requests with JSON of the right shape."""
    rf = rec.body.get("response_format") or {}
    name = (rf.get("json_schema") or {}).get("name")
    if name == "triage":
        return openai_text('{"label": "technical", "urgency": 2}')(rec)
    if name == "invoice":
        return openai_text(json.dumps(INVOICE))(rec)
    return openai_text()(rec)


@pytest.mark.parametrize("pipeline", sorted(INPUTS))
def test_every_pipeline_runs_from_the_cli_with_its_ledger_rows(served, tmp_path, pipeline):
    _, _, env, fakes = served
    (tmp_path / "flowc.yaml").write_text(CONFIG)  # a project with no server running
    fakes["openai"].then(*[structured] * 8)
    args = [a for k, v in INPUTS[pipeline].items() for a in ("-i", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run",
                        str(ROOT / "pipelines" / pipeline), *args, "--config", "flowc.yaml",
                        "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded"
    steps = out["metrics"]["steps"]
    model_calls = sum(s["model_calls"] for s in steps)
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--json", "--sql",
                        f"SELECT step_id, success, cost_usd FROM requests "
                        f"WHERE run_id = '{out['run_id']}'"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    rows = json.loads(r.stdout)
    assert len(rows) == model_calls and all(row["success"] for row in rows)
    by_step = {s["id"]: s for s in steps}
    for row in rows:  # each row belongs to a step of this run that called a model
        assert by_step[row["step_id"]]["model_calls"] >= 1
    total = sum(float(row["cost_usd"]) for row in rows if row["cost_usd"] is not None)
    assert out["metrics"]["total_cost_usd"] == pytest.approx(total)
