"""The for_each, sub-pipeline and repeat examples in pipelines/ end to end: over HTTP
(`flowc serve --pipelines pipelines/`) and the CLI (`flowc run`), against loopback provider
servers, with the ledger's rows checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.fakes import anthropic_text, openai_text
from tests.test_pipelines_e2e import CONFIG, ROOT, ledger_steps, run_http, served, sql

__all__ = ["served"]  # the server fixture, shared with tests/test_pipelines_e2e.py


def by_schema(rec):
    """Answers each structured request with JSON of its schema's shape, from its prompt."""
    prompt = rec.body["messages"][-1]["content"]
    name = ((rec.body.get("response_format") or {}).get("json_schema") or {}).get("name")
    if name == "summary":
        doc = prompt.rsplit("\n", 1)[1]
        return openai_text(json.dumps({"title": doc.split()[0], "summary": doc[:12],
                                       "topics": [doc.split()[-1]]}),
                           prompt_tokens=100, completion_tokens=20)(rec)
    return openai_text()(rec)


def test_batch_translate_maps_each_text_and_skips_empty_ones(served):
    url, _, _, fakes = served
    fakes["anthropic"].then(anthropic_text("No mistakes."))
    out = run_http(url, "batch-translate", {"texts": ["Good morning", "", "Thank you"],
                                            "language": "German"})
    assert out["status"] == "succeeded", out
    translations = out["output"]["translations"]
    assert translations[1] is None
    assert translations[0] == "echo: Translate into German, answer with the translation " \
                              "only:\nGood morning"
    assert out["output"]["first"] == translations[0]
    step = out["metrics"]["steps"][0]
    assert [i["status"] for i in step["items"]] == ["done", "skipped", "done"]
    review = fakes["anthropic"].requests[-1].body["messages"][0]["content"][0]["text"]
    assert "- echo: Translate into German" in review and "None" not in review
    assert ledger_steps(url, out["run_id"]) == [
        ["review", "anthropic", True, "batch-translate"],
        ["translate[0]", "openai", True, "batch-translate"],
        ["translate[2]", "openai", True, "batch-translate"]]


def test_document_digest_maps_a_sub_pipeline_and_rolls_up_its_costs(served):
    url, _, _, fakes = served
    fakes["openai"].then(*[by_schema] * 3)
    fakes["anthropic"].then(anthropic_text("A digest.", input_tokens=300, output_tokens=100))
    docs = ["queues decouple producers", "caches trade memory", "indexes speed reads"]
    out = run_http(url, "document-digest", {"documents": docs})
    assert out["status"] == "succeeded", out
    assert out["output"]["first_title"] == "queues"
    assert [t["topics"] for t in out["output"]["titles"]] == [
        ["producers"], ["memory"], ["reads"]]
    digest_prompt = fakes["anthropic"].requests[-1].body["messages"][0]["content"][0]["text"]
    assert "- caches: caches trade (topics: memory)" in digest_prompt
    rows = sql(url, "SELECT step_id, provider, success, workflow_name, cost_usd FROM requests "
                    "WHERE run_id = ? ORDER BY step_id", [out["run_id"]])
    assert [r[:4] for r in rows] == [
        ["digest", "anthropic", True, "document-digest"],
        *[[f"summaries[{i}]/summary", "openai", True, "document-digest"] for i in range(3)]]
    steps = {s["id"]: s for s in out["metrics"]["steps"]}
    nested = [s["id"] for item in steps["summaries"]["items"] for s in item["steps"]]
    assert nested == ["summary"] * 3
    # gpt-4o-mini: 100 * $0.15/1M + 20 * $0.60/1M a call, three calls rolled up
    assert steps["summaries"]["cost"] == pytest.approx(3 * 0.000027)
    assert out["metrics"]["total_cost_usd"] == pytest.approx(
        sum(float(r[4]) for r in rows))


def test_extract_repair_asks_again_until_valid_and_confident(served):
    url, _, _, fakes = served
    fakes["openai"].then(
        openai_text(json.dumps({"name": "Ada", "email": "ada at example.org",
                                "confidence": 0.9})),
        openai_text(json.dumps({"name": "Ada", "email": "ada@example.org",
                                "confidence": 0.4})),
        openai_text(json.dumps({"name": "Ada Lovelace", "email": "ada@example.org",
                                "confidence": 0.95})))
    out = run_http(url, "extract-repair", {"text": "Write to Ada at ada@example.org"})
    assert out["status"] == "succeeded", out
    assert out["output"] == {"name": "Ada Lovelace", "email": "ada@example.org"}
    prompts = [r.body["messages"][-1]["content"] for r in fakes["openai"].requests[-3:]]
    assert "Your previous answer: (none yet)" in prompts[0]
    assert re.search(r"What was wrong with it: email: 'ada at example.org' does not match",
                     prompts[1])
    assert "What was wrong with it: `until: ${self.output.confidence} >= 0.7` was false" \
        in prompts[2]
    assert out["metrics"]["steps"][0]["attempts"] == 3
    assert ledger_steps(url, out["run_id"]) == [["contact", "openai", True,
                                                 "extract-repair"]] * 3


def test_document_digest_from_the_cli_with_its_ledger_rows(served, tmp_path):
    _, _, env, fakes = served
    (tmp_path / "flowc.yaml").write_text(CONFIG)  # a project with no server running
    fakes["openai"].then(*[by_schema] * 2)
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run",
                        str(ROOT / "pipelines" / "document_digest.yaml"), "-i",
                        'documents=["one doc", "two docs"]', "--config", "flowc.yaml",
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
        {"step_id": "summaries[0]/summary", "success": True},
        {"step_id": "summaries[1]/summary", "success": True}]
