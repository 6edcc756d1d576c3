"""The inline-block example (pipelines/review_digest.yaml) end to end: over HTTP (`flowc
serve --pipelines pipelines/`) and the CLI (`flowc run`), against loopback provider
servers, with the ledger's rows checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fakes import anthropic_text, openai_text
from tests.test_pipelines_e2e import CONFIG, ROOT, run_http, served, sql

__all__ = ["served"]  # the server fixture, shared with tests/test_pipelines_e2e.py

DOCS = [{"title": "Queues", "text": "queues decouple producers"},
        {"title": "Caches", "text": "caches trade memory"}]


def by_prompt(rec):
    """A summary is the document's first word; a critique names the summary it read."""
    prompt = rec.body["messages"][-1]["content"]
    last = prompt.rsplit("\n", 1)[1]
    if prompt.startswith("Summarize"):
        return openai_text(f"about {last.split()[0]}", prompt_tokens=100,
                           completion_tokens=20)(rec)
    return openai_text(f"misses why ({last})", prompt_tokens=100, completion_tokens=20)(rec)


def test_review_digest_runs_a_block_per_document_with_its_calls_on_the_books(served):
    url, _, _, fakes = served
    fakes["openai"].then(*[by_prompt] * 4)
    fakes["anthropic"].then(anthropic_text("A digest.", input_tokens=300, output_tokens=100))
    out = run_http(url, "review-digest", {"documents": DOCS, "audience": "students"})
    assert out["status"] == "succeeded", out
    assert out["output"]["documents"] == [
        {"title": "Queues", "summary": "about queues",
         "critique": "misses why (about queues)"},
        {"title": "Caches", "summary": "about caches",
         "critique": "misses why (about caches)"}]
    assert out["output"]["first_critique"] == "misses why (about queues)"
    digest_prompt = fakes["anthropic"].requests[-1].body["messages"][0]["content"][0]["text"]
    assert "Write a one-paragraph digest for students:" in digest_prompt
    assert "- Caches: about caches (left out: misses why (about caches))" in digest_prompt
    rows = sql(url, "SELECT step_id, provider, success, workflow_name, cost_usd FROM requests "
                    "WHERE run_id = ? ORDER BY step_id", [out["run_id"]])
    assert [r[:4] for r in rows] == [
        ["digest", "anthropic", True, "review-digest"],
        *[[f"per_doc[{i}]/{s}", "openai", True, "review-digest"]
          for i in range(2) for s in ("critique", "summary")]]
    block = {s["id"]: s for s in out["metrics"]["steps"]}["per_doc"]
    assert [[s["id"] for s in item["steps"]] for item in block["items"]] == \
        [["summary", "critique"]] * 2
    # gpt-4o-mini: 100 * $0.15/1M + 20 * $0.60/1M a call, four calls rolled up
    assert block["cost"] == pytest.approx(4 * 0.000027)
    assert block["model_calls"] == 4
    assert out["metrics"]["total_cost_usd"] == pytest.approx(
        sum(float(r[4]) for r in rows))


def test_review_digest_from_the_cli_with_its_ledger_rows(served, tmp_path):
    _, _, env, fakes = served
    (tmp_path / "flowc.yaml").write_text(CONFIG)  # a project with no server running
    fakes["openai"].then(*[by_prompt] * 2)
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run",
                        str(ROOT / "pipelines" / "review_digest.yaml"), "-i",
                        f"documents={json.dumps(DOCS[:1])}", "--config", "flowc.yaml",
                        "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--json", "--sql",
                        "SELECT step_id, success FROM requests WHERE run_id = "
                        f"'{out['run_id']}' ORDER BY step_id"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout) == [
        {"step_id": "digest", "success": True},
        {"step_id": "per_doc[0]/critique", "success": True},
        {"step_id": "per_doc[0]/summary", "success": True}]
