"""The runs view: recent runs with filters and a page per run with its DAG coloured by what
each step did, in headless Chromium against a real `flowc serve` with auth on (its model calls
answered by the loopback OpenAI fake); `GET /v1/runs` and `/v1/runs/{id}/graph.svg` held to
the runs' access rules; and `flowc runs RUN_ID --graph` drawing the same picture, through the
running server or from the ledger file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import test_dashboard_access
from tests.conftest import ROOT
from tests.fakes import FakeServer, http_error, openai_text, slow, wait_until
from tests.keyed import ADMIN, Keyed, close, keyed

browser = test_dashboard_access.browser  # the same headless Chromium fixture
ARTIFACTS = ROOT / "test-artifacts"
CONFIG = """\
models:
  flat: openai/flat-model
prices:
  openai/flat-model: {input: 0, output: 10}
ledger:
  flush_interval: 0.1
"""
# classify, then (when it says "urgent") escalate, and reply: two of them in sequence when
# the ticket is not urgent, so the fake's answers go to the step they are meant for.
TRIAGE = """\
name: triage
inputs:
  ticket: {type: string}
steps:
  - id: classify
    type: llm
    model: flat
    prompt: "Classify this ticket in one word: ${input.ticket}"
  - id: escalate
    type: llm
    model: flat
    when: ${classify} == "urgent"
    prompt: "Write the escalation note for: ${input.ticket}"
  - id: reply
    type: llm
    model: flat
    prompt: "Reply to this ${classify} ticket: ${input.ticket}"
output:
  label: ${classify}
  escalation: ${escalate ?? "none"}
  reply: ${reply}
"""
TOO_LONG = "This model's maximum context length is 8192 tokens."
SKIPPED_BECAUSE = 'condition `${classify} == "urgent"` was false'  # the executor's reason


def svg_statuses(svg: bytes | str) -> dict[str, tuple[str, str, str]]:
    """Each step node of a run's SVG: (status from its class, its fill, its hover text)."""
    ns = {"s": "http://www.w3.org/2000/svg", "x": "http://www.w3.org/1999/xlink"}
    root = ET.fromstring(svg)
    out = {}
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        classes = (g.get("class") or "").split()
        if "step" not in classes:
            continue
        status = next(c.removeprefix("status-") for c in classes if c.startswith("status-"))
        shape = g.find(".//s:polygon", ns)
        if shape is None:  # a rounded box is a path
            shape = g.find(".//s:path", ns)
        link = g.find(".//s:a", ns)
        title = link.get(f"{{{ns['x']}}}title", "") if link is not None else ""
        out[g.get("id", "").removeprefix("step-")] = (status, shape.get("fill"), title)
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("runs_view"), CONFIG)
    (k.project / "pipelines").mkdir()
    (k.project / "pipelines" / "triage.yaml").write_text(TRIAGE)
    k.keys({"name": "ops-bot", "team": "ops"}, {"name": "lab-bot", "team": "research"})
    k.start()
    try:
        yield k
    finally:
        close(k)


def run(k: Keyed, who: str, ticket: str) -> dict[str, Any]:
    r = httpx.post(f"{k.url}/v1/workflow/triage", headers=k.auth(who), timeout=60,
                   json={"input": {"ticket": ticket}})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def runs(srv: Keyed) -> dict[str, dict[str, Any]]:
    """A failed run of team ops (classify done, escalate skipped, reply failed upstream) and a
    succeeded run of team research (all three done)."""
    srv.openai.then(openai_text("billing", completion_tokens=1000),
                    http_error(400, TOO_LONG))
    failed = run(srv, "ops-bot", "I was charged twice.")
    srv.openai.then(openai_text("urgent", completion_tokens=1000),
                    openai_text("ok", completion_tokens=2000),
                    openai_text("ok", completion_tokens=2000))
    done = run(srv, "lab-bot", "The lab is on fire.")
    assert failed["status"] == "failed" and done["status"] == "succeeded", (failed, done)
    wait_until(lambda: srv.sql("SELECT count(*) FROM runs")[0][0] == 2, 15)
    return {"failed": failed, "done": done}


def get(k: Keyed, path: str, secret: str = ADMIN, **params: Any) -> httpx.Response:
    return httpx.get(k.url + path, params=params, timeout=30,
                     headers={"authorization": f"Bearer {secret}"})


def test_the_runs_list_filters_by_pipeline_status_time_and_team(srv, runs):
    failed, done = runs["failed"]["run_id"], runs["done"]["run_id"]
    body = get(srv, "/v1/runs").json()
    assert [r["run_id"] for r in body["runs"]] == [done, failed]  # newest first
    row = body["runs"][1]
    assert (row["workflow"], row["status"], row["team"], row["key_name"]) == (
        "triage", "failed", "ops", "ops-bot")
    assert row["step_statuses"] == {"done": 1, "skipped": 1, "failed": 1}
    assert row["cost_usd"] == pytest.approx(0.01)  # classify's 1,000 tokens at $10/M
    assert body["filters"]["workflow"] == ["triage"]
    assert body["filters"]["status"] == ["succeeded", "failed"]
    assert body["filters"]["team"] == ["ops", "research"]
    assert {k["name"] for k in body["filters"]["key"]} == {"ops-bot", "lab-bot"}

    def ids(**params: Any) -> list[str]:
        r = get(srv, "/v1/runs", **params)
        assert r.status_code == 200, r.text
        return [x["run_id"] for x in r.json()["runs"]]

    assert ids(status="failed") == [failed]
    assert ids(workflow="triage", status="succeeded") == [done]
    assert ids(workflow="other") == []
    assert ids(team="research") == [done]
    assert ids(key=srv.ids["ops-bot"]) == [failed]
    assert ids(since="2000-01-01", until="2999-12-31") == [done, failed]
    assert ids(until="2000-01-01") == []
    assert ids(run_id=failed) == [failed]
    r = get(srv, "/v1/runs", status="broken")
    assert r.status_code == 400
    assert ("status must be one of succeeded, failed, cancelled, waiting, continued"
            in r.json()["error"]["message"])
    r = get(srv, "/v1/runs", since="yesterday")
    assert r.status_code == 400 and "must be a date" in r.json()["error"]["message"]


def test_a_team_member_sees_its_teams_runs_only(srv, runs):
    failed, done = runs["failed"]["run_id"], runs["done"]["run_id"]
    ops = srv.secrets["ops-bot"]
    body = get(srv, "/v1/runs", ops).json()
    assert [r["run_id"] for r in body["runs"]] == [failed]
    assert body["filters"]["team"] == ["ops"]
    assert [k["name"] for k in body["filters"]["key"]] == ["ops-bot"]
    r = get(srv, "/v1/runs", ops, team="research")
    assert r.status_code == 403 and "team 'ops'" in r.json()["error"]["message"]
    # Another team's run is as unknown as a missing one, its drawing too.
    r = get(srv, f"/v1/runs/{done}/graph.svg", ops)
    assert r.status_code == 404 and r.json()["error"]["message"] == f"no run '{done}'"
    assert get(srv, f"/v1/runs/{failed}/graph.svg", ops).status_code == 200
    r = httpx.get(f"{srv.url}/v1/runs/{failed}/graph.svg", timeout=10)
    assert r.status_code == 401


def test_the_graph_colours_each_step_by_status_with_why_on_hover(srv, runs):
    r = get(srv, f"/v1/runs/{runs['failed']['run_id']}/graph.svg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
    assert "x-flowc-graph-note" not in r.headers  # drawn over the pipeline it ran
    nodes = svg_statuses(r.content)
    assert {s: n[:2] for s, n in nodes.items()} == {
        "classify": ("done", "#dcfce7"), "escalate": ("skipped", "#f3f4f6"),
        "reply": ("failed", "#fee2e2")}
    assert nodes["escalate"][2] == f"escalate: skipped: {SKIPPED_BECAUSE}"
    assert TOO_LONG in nodes["reply"][2]
    text = r.text
    assert "input.ticket" in text and "&gt; classify" not in text  # the pipeline's edges
    assert "$0.01" in text  # classify's cost, and the run's total in the title
    nodes = svg_statuses(get(srv, f"/v1/runs/{runs['done']['run_id']}/graph.svg").content)
    assert {s: n[0] for s, n in nodes.items()} == {
        "classify": "done", "escalate": "done", "reply": "done"}


def table(page: Any, box: str) -> list[list[str]]:
    return page.locator(f"#{box} tr").evaluate_all(
        "trs => trs.slice(1).map(tr => [...tr.cells].map(c => c.innerText.trim()))")


def test_the_runs_view_in_chromium(browser, srv, runs):
    from playwright.sync_api import expect

    failed = runs["failed"]["run_id"]
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(srv.url) else
            external.append(r.url))
    try:
        page.goto(srv.url + "/dashboard#runs")
        page.get_by_label("flowc key").fill(ADMIN)
        page.get_by_role("button", name="sign in").click()
        expect(page.locator("#runs tr")).to_have_count(3, timeout=15000)
        rows = table(page, "runs")
        # started, run, pipeline, status, steps, cost, tokens, latency, key, team
        assert [r[1:5] + r[8:] for r in rows] == [
            [runs["done"]["run_id"], "triage", "succeeded", "3 done", "lab-bot", "research"],
            [failed, "triage", "failed", "1 done · 1 failed · 1 skipped", "ops-bot", "ops"]]
        assert rows[1][5] == "$0.01"
        # The filters narrow the list.
        page.get_by_label("status", exact=True).select_option("failed")
        expect(page.locator("#runs tr")).to_have_count(2, timeout=15000)
        page.get_by_label("status", exact=True).select_option("")
        # Wait for the unfiltered list: the one-row failed list would satisfy the next wait.
        expect(page.locator("#runs tr[data-run]")).to_have_count(2, timeout=15000)
        page.get_by_label("team", exact=True).select_option("research")
        expect(page.locator("#runs tr[data-run]")).to_have_count(1, timeout=15000)
        assert page.get_attribute("#runs tr[data-run]", "data-run") == runs["done"]["run_id"]
        page.get_by_label("team", exact=True).select_option("")
        expect(page.locator("#runs tr")).to_have_count(3, timeout=15000)

        # One run's page: its DAG, each node coloured by status, and its steps.
        page.get_by_role("link", name=failed).click()
        expect(page.locator("#run-graph svg g.step")).to_have_count(3, timeout=15000)
        nodes = svg_statuses(page.inner_html("#run-graph"))
        assert {s: n[:2] for s, n in nodes.items()} == {
            "classify": ("done", "#dcfce7"), "escalate": ("skipped", "#f3f4f6"),
            "reply": ("failed", "#fee2e2")}
        # What the user sees: the colours as drawn, and the reason on hover.
        fill = page.locator("#step-escalate polygon").first.evaluate(
            "e => getComputedStyle(e).fill")
        assert fill == "rgb(243, 244, 246)"
        hover = page.locator("#step-escalate a").first.get_attribute("xlink:title")
        assert hover == f"escalate: skipped: {SKIPPED_BECAUSE}"
        steps = {r[0]: r for r in table(page, "run-steps")}
        assert steps["escalate"][1] == "skipped" and steps["escalate"][8] == SKIPPED_BECAUSE
        assert steps["reply"][1] == "failed" and TOO_LONG in steps["reply"][8]
        assert steps["classify"][1:4] == ["done", "$0.01", steps["classify"][3]]
        assert page.inner_text("#run-status") == "failed"
        assert page.inner_text("#run-cost") == "$0.01"
        assert page.inner_text("#run-steps-count") == "1 done · 1 failed · 1 skipped"
        assert "key ops-bot · team ops" in page.inner_text("#run-name")
        assert not page.locator("#run-note").is_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "runs-view.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"runs view screenshot: {shot}")
        assert shot.stat().st_size > 10_000
        # Back to the list.
        page.get_by_role("link", name="← all runs").click()
        expect(page.locator("#runs tr")).to_have_count(3, timeout=15000)
        assert external == []  # no CDN: works offline
    finally:
        context.close()


def flowc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_flowc_runs_graph_through_the_running_server(srv, runs, tmp_path):
    out = tmp_path / "run.svg"
    r = flowc(srv.project, srv.env, "runs", runs["failed"]["run_id"], "--graph", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stderr
    assert {s: n[0] for s, n in svg_statuses(out.read_bytes()).items()} == {
        "classify": "done", "escalate": "skipped", "reply": "failed"}
    r = flowc(srv.project, srv.env, "runs", "no-such-run", "--graph", str(out))
    assert r.returncode == 1 and "no run 'no-such-run'" in r.stderr
    r = flowc(srv.project, srv.env, "runs", "--graph", str(out))
    assert r.returncode == 2 and "give its RUN_ID" in r.stderr
    r = flowc(srv.project, srv.env, "runs", "x", "--graph", str(tmp_path / "run.png"))
    assert r.returncode == 2 and ".svg" in r.stderr


# A run stopped by a failure: `check` fails at once, so `ask` (still waiting for its model)
# and `answer` (waiting for `ask`) are cancelled.
CASCADE = """\
name: cascade
inputs:
  question: {type: string}
steps:
  - id: ask
    type: llm
    model: flat
    prompt: "${input.question}"
  - id: check
    type: llm
    model: judge
    prompt: "Is this answerable? ${input.question}"
  - id: answer
    type: llm
    model: flat
    prompt: "Answer ${ask} if ${check}"
output: ${answer}
"""


def test_a_stopped_runs_cancelled_steps_are_drawn_so(tmp_path):
    openai, anthropic = FakeServer("openai").start(), FakeServer("anthropic").start()
    try:
        (tmp_path / "flowc.yaml").write_text(CONFIG.replace("prices:\n", (
            "  judge: anthropic/judge-model\n"
            "prices:\n  anthropic/judge-model: {input: 0, output: 10}\n")))
        pipeline = tmp_path / "cascade.yaml"
        pipeline.write_text(CASCADE)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": openai.url + "/v1",
               "OPENAI_API_KEY": "sk-test-openai", "ANTHROPIC_BASE_URL": anthropic.url,
               "ANTHROPIC_API_KEY": "sk-ant-test"}
        openai.then(slow(30, openai_text("late")))
        anthropic.then(http_error(400, "prompt is too long", kind="anthropic"))
        r = flowc(tmp_path, env, "run", str(pipeline), "-i", "question=Why?", "--json")
        assert r.returncode == 1, r.stderr
        run_id = json.loads(r.stdout)["run_id"]
        out = tmp_path / "run.svg"
        r = flowc(tmp_path, env, "runs", run_id, "--graph", str(out), "--pipelines",
                  str(tmp_path))
        assert r.returncode == 0, r.stderr
        nodes = svg_statuses(out.read_bytes())
        assert {s: n[:2] for s, n in nodes.items()} == {
            "ask": ("cancelled", "#ffedd5"), "check": ("failed", "#fee2e2"),
            "answer": ("cancelled", "#ffedd5")}
        assert "prompt is too long" in nodes["check"][2]
    finally:
        openai.stop()
        anthropic.stop()


def test_flowc_runs_graph_from_the_ledger_and_when_the_pipeline_changed(tmp_path):
    """No server: the run is read from the ledger file and drawn over the project's
    pipeline; once the pipeline has changed, or is gone, from the run's own steps."""
    fake = FakeServer("openai").start()
    try:
        (tmp_path / "flowc.yaml").write_text(CONFIG)
        (tmp_path / "pipelines").mkdir()
        pipeline = tmp_path / "pipelines" / "triage.yaml"
        pipeline.write_text(TRIAGE)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": fake.url + "/v1",
               "OPENAI_API_KEY": "sk-test-openai"}
        env.pop("FLOWC_ADMIN_KEY", None)
        fake.then(openai_text("billing"), openai_text("Refunded."))
        r = flowc(tmp_path, env, "run", str(pipeline), "-i", "ticket=Charged twice.",
                  "--json")
        assert r.returncode == 0, r.stderr
        run_id = json.loads(r.stdout)["run_id"]
        out = tmp_path / "run.svg"
        r = flowc(tmp_path, env, "runs", run_id, "--graph", str(out))
        assert r.returncode == 0, r.stderr
        assert "note:" not in r.stderr
        svg = out.read_text()
        assert {s: n[0] for s, n in svg_statuses(svg).items()} == {
            "classify": "done", "escalate": "skipped", "reply": "done"}
        assert "input.ticket" in svg  # drawn over the pipeline: its edges and inputs

        pipeline.write_text(TRIAGE.replace("id: reply", "id: answer").replace(
            "${reply}", "${answer}"))
        r = flowc(tmp_path, env, "runs", run_id, "--graph", str(out))
        assert r.returncode == 0, r.stderr
        assert "pipeline 'triage' has changed since this run" in r.stderr
        svg = out.read_text()
        assert "has changed since this run" in svg
        assert {s: n[0] for s, n in svg_statuses(svg).items()} == {
            "classify": "done", "escalate": "skipped", "reply": "done"}
        pipeline.unlink()
        r = flowc(tmp_path, env, "runs", run_id, "--graph", str(out))
        assert r.returncode == 0 and "pipeline 'triage' is not served any more" in r.stderr
        assert {s: n[0] for s, n in svg_statuses(out.read_text()).items()} == {
            "classify": "done", "escalate": "skipped", "reply": "done"}
    finally:
        fake.stop()


@given(params=st.dictionaries(
    st.sampled_from(["workflow", "status", "since", "until", "team", "key", "run_id", "limit"]),
    st.text(max_size=30)))
@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
def test_any_runs_filter_is_answered_or_refused_with_a_reason(srv, runs, params):
    r = get(srv, "/v1/runs", **params)
    assert r.status_code in (200, 400, 422), r.text
    if r.status_code == 200:
        assert isinstance(r.json()["runs"], list)
    else:
        assert r.json()["error"]["message"]


def test_with_auth_off_the_runs_view_opens_without_a_key(browser, tmp_path):
    from playwright.sync_api import expect

    from tests.conftest import start_server, stop_server
    from tests.fakes import free_port

    fake = FakeServer("openai").start()
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "triage.yaml").write_text(TRIAGE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": fake.url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai"}
    env.pop("FLOWC_ADMIN_KEY", None)
    port = free_port()
    proc = start_server(tmp_path, env, port)
    context = browser.new_context()
    try:
        url = f"http://127.0.0.1:{port}"
        fake.then(openai_text("billing"), openai_text("Refunded."))
        r = httpx.post(f"{url}/v1/workflow/triage", json={"input": {"ticket": "Twice."}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        run_id = r.json()["run_id"]
        page = context.new_page()
        page.goto(f"{url}/dashboard#run/{run_id}")
        expect(page.locator("#run-graph svg g.step")).to_have_count(3, timeout=15000)
        assert not page.get_by_label("flowc key").is_visible()
        assert {s: n[0] for s, n in svg_statuses(page.inner_html("#run-graph")).items()} == {
            "classify": "done", "escalate": "skipped", "reply": "done"}
        page.get_by_role("link", name="← all runs").click()
        expect(page.locator("#runs tr")).to_have_count(2, timeout=15000)
        # started, run, pipeline, status, steps, cost, tokens, latency: no key or team
        assert [r[1:5] for r in table(page, "runs")] == [
            [run_id, "triage", "succeeded", "2 done · 1 skipped"]]
        assert len(table(page, "runs")[0]) == 8
    finally:
        context.close()
        stop_server(proc)
        fake.stop()
