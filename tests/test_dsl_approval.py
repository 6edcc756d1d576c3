"""`type: approval`: the example pipeline pipelines/draft_approve_publish.yaml stops in the
`waiting` state at its approval step, recording what it waits for; an approval (with an
optional edited value, checked against the step's type) or a rejection continues it as a
resume, over HTTP, from the CLI and in process, against a loopback OpenAI server whose
request count proves that finished steps are not called again, with ledger rows checked
(the cached draft's rows $0 with the saving)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flowc import Project, compile_file
from flowc.config import ProjectConfig
from runtime.approval import decide
from runtime.resume import ResumeError, resume_run
from tests.conftest import start_server, stop_server
from tests.fakes import free_port, openai_text, wait_until
from tests.test_dsl_cache import run
from tests.test_runtime import fake as _fake
from tests.test_runtime import openai_fake as _openai_fake

fake, openai_fake = _fake, _openai_fake
ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "draft_approve_publish.yaml"
DRAFT = {"title": "Dark mode", "body": "flowc's dashboard now has a dark mode."}
CONFIG = """\
models:
  fast: openai/gpt-4o-mini
retry: {attempts: 0}
ledger: {flush_interval: 0.2}
"""


def answers(rec):
    """The loopback model: the announcement as JSON; the chat message as text."""
    rf = rec.body.get("response_format") or {}
    if (rf.get("json_schema") or {}).get("name") == "announcement":
        return openai_text(json.dumps(DRAFT), prompt_tokens=300, completion_tokens=80)(rec)
    return openai_text("📣 " + rec.body["messages"][-1]["content"].splitlines()[1])(rec)


def compiled():
    result = compile_file(PIPELINE, Project(config=ProjectConfig.model_validate(
        {"models": {"fast": "openai/gpt-4o-mini"}})))
    assert result.compiled is not None, result.diagnostics
    return result.compiled


def record_of(result) -> dict:
    return json.loads(json.dumps(result.to_dict(), default=str))


def steps_of(record: dict) -> dict:
    return {s["id"]: s for s in record["metrics"]["steps"]}


def test_the_run_waits_then_an_approval_continues_it(openai_fake, tmp_path):
    pipeline = compiled()
    openai_fake.then(*[answers] * 4)
    waiting, rows = run(pipeline, {"topic": "dark mode"}, fake=openai_fake,
                        ledger_path=tmp_path / "l.duckdb")
    assert waiting.status == "waiting" and waiting.output is None and waiting.error is None
    record = record_of(waiting)
    review = steps_of(record)["review"]
    assert review["status"] == "waiting"
    assert review["waiting_for"]["message"] == "Publish 'Dark mode' to #announcements?"
    assert review["waiting_for"]["value"] == DRAFT
    assert steps_of(record)["publish"]["status"] == "pending"  # not started
    assert len(openai_fake.requests) == 1 and [r[0] for r in rows] == ["draft"]

    edited = {"title": "Dark mode is here", "body": "Try it."}
    decision = decide(pipeline, waiting.run_id, record, "review", approved=True,
                      value=edited, has_value=True, by="ana")
    done, rows = run(pipeline, None, fake=openai_fake, ledger_path=tmp_path / "l.duckdb",
                     act=lambda ex: resume_run(ex, pipeline, waiting.run_id, record,
                                               check=False, decisions={"review": decision}))
    assert done.status == "succeeded", done.error
    assert done.output == {"title": "Dark mode is here", "message": "📣 Title: Dark mode is here"}
    assert len(openai_fake.requests) == 2  # only publish: draft was not called again
    assert [r[0] for r in rows] == ["publish"]
    steps = steps_of(record_of(done))
    assert steps["draft"]["resumed_from"] == waiting.run_id and steps["draft"]["cost"] == 0
    assert steps["review"]["output"] == edited
    assert steps["review"]["decision"] == {"approved": True, "by": "ana", "edited": True,
                                           "reason": None}


def test_approving_without_a_value_approves_what_was_put_up(openai_fake, tmp_path):
    pipeline = compiled()
    openai_fake.then(*[answers] * 4)
    waiting, _ = run(pipeline, {"topic": "x"}, fake=openai_fake,
                     ledger_path=tmp_path / "l.duckdb")
    record = record_of(waiting)
    decision = decide(pipeline, waiting.run_id, record, "review", approved=True)
    done, _ = run(pipeline, None, fake=openai_fake, ledger_path=tmp_path / "l.duckdb",
                  act=lambda ex: resume_run(ex, pipeline, waiting.run_id, record,
                                            check=False, decisions={"review": decision}))
    assert done.output["title"] == DRAFT["title"]


def test_a_rejection_fails_the_step_and_the_run(openai_fake, tmp_path):
    pipeline = compiled()
    openai_fake.then(*[answers] * 4)
    waiting, _ = run(pipeline, {"topic": "x"}, fake=openai_fake,
                     ledger_path=tmp_path / "l.duckdb")
    record = record_of(waiting)
    decision = decide(pipeline, waiting.run_id, record, "review", approved=False, by="ana",
                      reason="too early")
    done, rows = run(pipeline, None, fake=openai_fake, ledger_path=tmp_path / "l.duckdb",
                     act=lambda ex: resume_run(ex, pipeline, waiting.run_id, record,
                                               check=False, decisions={"review": decision}))
    assert done.status == "failed" and rows == []
    assert done.error["step"] == "review"
    assert done.error["message"] == "rejected by ana: too early"
    assert len(openai_fake.requests) == 1


def test_decisions_are_checked(openai_fake, tmp_path):
    pipeline = compiled()
    openai_fake.then(*[answers] * 4)
    waiting, _ = run(pipeline, {"topic": "x"}, fake=openai_fake,
                     ledger_path=tmp_path / "l.duckdb")
    record = record_of(waiting)
    with pytest.raises(ResumeError, match=r"does not match its schema: the answer: "
                                          r"'body' is a required property"):
        decide(pipeline, waiting.run_id, record, "review", approved=True,
               value={"title": "t"}, has_value=True)
    with pytest.raises(ResumeError, match=r"step 'draft' .* is not waiting for approval "
                                          r"\(waiting: review\)"):
        decide(pipeline, waiting.run_id, record, "draft", approved=True)
    with pytest.raises(ResumeError, match=r"is not waiting for an approval \(it is continued; "
                                          r"it continued as run 'r2'\)"):
        decide(pipeline, waiting.run_id, {**record, "status": "continued",
                                          "continued_in": "r2"}, "review", approved=True)
    with pytest.raises(ResumeError, match="waiting for an approval: approve or reject"):
        run(pipeline, None, fake=openai_fake, ledger_path=tmp_path / "l.duckdb",
            act=lambda ex: resume_run(ex, pipeline, waiting.run_id, record))


def test_a_dry_run_approves_at_once(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(PIPELINE), "-i",
                        "topic=x", "--dry-run", "--json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded"
    assert steps_of(out)["review"]["decision"]["by"] == "dry run"


# -- over HTTP and from the CLI, against a server with the repository's pipelines ----------
@pytest.fixture
def served(tmp_path, openai_fake):
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    env = {**os.environ, "OPENAI_BASE_URL": openai_fake.url + "/v1", "OPENAI_API_KEY": "k",
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    openai_fake.then(*[answers] * 20)
    proc = start_server(tmp_path, env, port, "--pipelines", str(ROOT / "pipelines"))
    yield f"http://127.0.0.1:{port}", tmp_path, env
    stop_server(proc)


def sql(url: str, query: str, params=()) -> list[list]:
    r = httpx.post(url + "/v1/costs/sql", json={"sql": query, "params": list(params)},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def ledger_rows(url: str, run_id: str) -> list[list]:
    wait_until(lambda: bool(sql(url, "SELECT 1 FROM runs WHERE id = ?", [run_id])))
    return sql(url, "SELECT step_id, cost_usd, cached, saved_usd FROM requests "
                    "WHERE run_id = ? ORDER BY ts", [run_id])


def test_draft_approve_publish_over_http(served, openai_fake):
    url, _, _ = served
    start = httpx.post(f"{url}/v1/workflow/draft-approve-publish",
                       json={"input": {"topic": "dark mode"}}, timeout=60).json()
    assert start["status"] == "waiting"
    [(step, cost, cached, saved)] = ledger_rows(url, start["run_id"])
    assert step == "draft" and float(cost) > 0 and not cached and saved is None
    shown = httpx.get(f"{url}/v1/runs/{start['run_id']}", timeout=10).json()
    assert steps_of(shown)["review"]["waiting_for"]["value"] == DRAFT
    assert len(openai_fake.requests) == 1
    # The runs list (and the dashboard's filter) finds the runs waiting for a decision.
    listed = httpx.get(f"{url}/v1/runs", params={"status": "waiting"}, timeout=10).json()
    assert start["run_id"] in [r["run_id"] for r in listed["runs"]]

    bad = httpx.post(f"{url}/v1/runs/{start['run_id']}/steps/review/approve",
                     json={"value": {"title": 5, "body": "b"}}, timeout=60)
    assert bad.status_code == 409
    assert "title: 5 is not of type 'string'" in bad.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/runs/{start['run_id']}/steps/review/approve", timeout=60)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "succeeded" and done["resumed_from"] == start["run_id"]
    assert done["output"]["title"] == DRAFT["title"]
    assert len(openai_fake.requests) == 2  # publish only
    assert [row[0] for row in ledger_rows(url, done["run_id"])] == ["publish"]
    # The waiting run is marked as continued; a second decision is refused.
    original = httpx.get(f"{url}/v1/runs/{start['run_id']}", timeout=10).json()
    assert original["status"] == "continued" and original["continued_in"] == done["run_id"]
    listed = httpx.get(f"{url}/v1/runs", params={"status": "continued"}, timeout=10).json()
    assert [r["run_id"] for r in listed["runs"]] == [start["run_id"]]
    again = httpx.post(f"{url}/v1/runs/{start['run_id']}/steps/review/approve", timeout=60)
    assert again.status_code == 409 and "it continued as run" in again.text

    # The same topic again: the draft comes from the cache, $0, with the saving recorded.
    second = httpx.post(f"{url}/v1/workflow/draft-approve-publish",
                        json={"input": {"topic": "dark mode"}}, timeout=60).json()
    assert second["status"] == "waiting" and len(openai_fake.requests) == 2
    [(step, cost2, cached2, saved2)] = ledger_rows(url, second["run_id"])
    assert (step, float(cost2), cached2, saved2) == ("draft", 0.0, True, cost)
    assert steps_of(second)["draft"]["cached"] is True

    rejected = httpx.post(f"{url}/v1/runs/{second['run_id']}/steps/review/reject",
                          json={"reason": "not yet"}, timeout=60).json()
    assert rejected["status"] == "failed"
    # auth is off: no key says who decided
    assert rejected["error"]["message"] == "rejected by the approver: not yet"
    assert len(openai_fake.requests) == 2


def test_draft_approve_publish_from_the_cli(tmp_path, openai_fake):
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / PIPELINE.name).write_text(PIPELINE.read_text())
    env = {**os.environ, "OPENAI_BASE_URL": openai_fake.url + "/v1", "OPENAI_API_KEY": "k",
           "PYTHONPATH": str(ROOT)}
    openai_fake.then(*[answers] * 4)

    def flowc(*args):
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    started = flowc("run", "pipelines/" + PIPELINE.name, "-i", "topic=dark mode")
    assert started.returncode == 3, started.stderr  # waiting
    run_id = started.stderr.split("flowc runs approve ")[1].split()[0]
    assert "waits for approval of step 'review': Publish 'Dark mode' to #announcements?" \
        in started.stderr
    shown = json.loads(flowc("runs", run_id).stdout)
    assert shown["status"] == "waiting"
    bad = flowc("runs", "approve", run_id, "review", "--value", "{not json")
    assert bad.returncode == 1 and "--value is not valid JSON" in bad.stderr
    ok = flowc("runs", "approve", run_id, "review", "--value",
               json.dumps({"title": "Edited", "body": "b"}), "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["status"] == "succeeded" and out["output"]["title"] == "Edited"
    assert len(openai_fake.requests) == 2
    listed = flowc("runs")
    assert "continued" in listed.stdout and out["run_id"] in listed.stdout


def test_with_keys_on_approving_needs_what_running_the_pipeline_needs(tmp_path):
    from tests.keyed import ADMIN, close, keyed

    k = keyed(tmp_path, """
        models: {fast: openai/gpt-4o-mini}
        ledger: {flush_interval: 0.2}
    """)
    try:
        k.keys({"name": "writer", "team": "press"},
               {"name": "reader", "team": "press", "read_only": True},
               {"name": "limited", "team": "press", "pipelines": ["research-*"]},
               {"name": "outsider", "team": "sales"},
               {"name": "claude-only", "team": "press", "models": ["anthropic/*"]})
        k.openai.then(*[answers] * 6)
        k.start("--pipelines", str(ROOT / "pipelines"))
        start = httpx.post(f"{k.url}/v1/workflow/draft-approve-publish",
                           json={"input": {"topic": "x"}}, headers=k.auth("writer"),
                           timeout=60).json()
        assert start["status"] == "waiting"
        approve = f"{k.url}/v1/runs/{start['run_id']}/steps/review/approve"
        assert httpx.post(approve, timeout=30).status_code == 401
        r = httpx.post(approve, headers=k.auth("reader"), timeout=30)
        assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
        r = httpx.post(approve, headers=k.auth("limited"), timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "pipeline_not_allowed"
        r = httpx.post(approve, headers=k.auth("outsider"), timeout=30)
        assert r.status_code == 404  # another team's run is as unknown as a missing one
        assert len(k.openai.requests) == 1
        r = httpx.post(approve, headers=k.auth("writer"), timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        done = r.json()
        wait_until(lambda: bool(k.sql(f"SELECT 1 FROM runs WHERE id = '{done['run_id']}'")))
        assert k.sql(f"SELECT step_id, key_id FROM requests WHERE run_id = '{done['run_id']}'"
                     ) == [["publish", k.ids["writer"]]]
        # A key may not get from the cache what it may not call.
        denied = httpx.post(f"{k.url}/v1/workflow/draft-approve-publish",
                            json={"input": {"topic": "x"}}, headers=k.auth("claude-only"),
                            timeout=60).json()
        assert denied["status"] == "failed" and "may not use model" in denied["error"][
            "message"], denied
        assert len(k.openai.requests) == 2
        # The admin may decide any team's run.
        second = httpx.post(f"{k.url}/v1/workflow/draft-approve-publish",
                            json={"input": {"topic": "y"}}, headers=k.auth("outsider"),
                            timeout=60).json()
        r = httpx.post(f"{k.url}/v1/runs/{second['run_id']}/steps/review/reject",
                       headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert r.status_code == 200 and r.json()["error"]["message"] == "rejected by admin"
    finally:
        close(k)


def test_graph_draws_the_approval_gate():
    from flowc.render import to_dot

    dot = to_dot(compiled()).source
    assert "waits for approval: Publish '${draft.title}' to ${input.channel}?" in dot
    assert "octagon" in dot and "cached (ttl 1d)" in dot
