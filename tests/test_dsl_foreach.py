"""`for_each:` (map): checked and typed by the compiler, run per item against a loopback
OpenAI server with bounded concurrency, per-item `when`/`retries`/`timeout`/`on_error`,
ledger rows per item call."""

from __future__ import annotations

import json

import pytest

from tests.dsl_b import Answers, compiled_at, diagnostics, execute, write
from tests.fakes import FakeServer, http_error, openai_text, slow

TRANSLATE = """\
name: batch
inputs:
  docs: {type: array}
steps:
  - id: translate
    type: llm
    model: m
    for_each: ${input.docs}
    as: doc
    max_concurrency: 3
    %s
    prompt: "Translate: ${doc}"
output:
  translations: ${translate}
"""


@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


def pipeline(tmp_path, extra: str = ""):
    return compiled_at(write(tmp_path, batch=TRANSLATE % extra))


def test_items_run_concurrently_up_to_max_concurrency_and_keep_their_order(fake, tmp_path):
    answers = Answers({r"Translate: (\w+)": [lambda rec: openai_text(
        rec.body["messages"][-1]["content"].split(": ")[1].upper())(rec)]}, delay=0.05)
    answers.serve(fake)
    docs = [f"doc{i}" for i in range(10)]
    result, rows = execute(pipeline(tmp_path), {"docs": docs}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"translations": [d.upper() for d in docs]}
    assert answers.peak == 3  # max_concurrency, and it was reached
    # One ledger row per item call, each with the step id and the item's index.
    assert sorted(r[0] for r in rows) == sorted(f"translate[{i}]" for i in range(10))
    assert {r[1] for r in rows} == {"batch"} and all(r[2] for r in rows)
    assert {r[3] for r in rows} == {result.run_id}
    record = result.to_dict()["metrics"]["steps"][0]
    assert [i["index"] for i in record["items"]] == list(range(10))
    assert record["model_calls"] == 10 and record["tokens"] == 10 * 29
    assert sorted(c["item"] for c in record["calls"]) == list(range(10))


def test_an_item_whose_when_is_false_is_missing_from_the_list(fake, tmp_path):
    Answers({}).serve(fake)
    result, rows = execute(pipeline(tmp_path, 'when: ${doc} != "skip me"'),
                           {"docs": ["a", "skip me", "c"]}, fake, tmp_path)
    assert result.status == "succeeded"
    assert result.output == {"translations": ["echo: Translate: a", None,
                                              "echo: Translate: c"]}
    assert sorted(r[0] for r in rows) == ["translate[0]", "translate[2]"]
    items = result.steps["translate"].items
    assert items[1]["status"] == "skipped"
    assert "was false" in items[1]["skip_reason"]


def test_a_failed_item_under_on_error_continue_is_missing_and_the_run_goes_on(fake, tmp_path):
    Answers({"Translate: bad": [http_error(400, "This model's context is too long")]}
            ).serve(fake)
    result, rows = execute(pipeline(tmp_path, "on_error: continue"),
                           {"docs": ["a", "bad", "c"]}, fake, tmp_path)
    assert result.status == "succeeded"
    assert result.output["translations"][1] is None
    assert result.output["translations"][0] == "echo: Translate: a"
    item = result.steps["translate"].items[1]
    assert item["status"] == "failed" and "context is too long" in item["error"]
    assert ("translate[1]", "batch", False, result.run_id) in rows  # the failed call


def test_a_failed_item_under_on_error_fail_fails_the_step_naming_the_item(fake, tmp_path):
    Answers({"Translate: bad": [http_error(400, "Invalid value for 'messages'")]}).serve(fake)
    result, _ = execute(pipeline(tmp_path), {"docs": ["a", "bad", "c", "d"]}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error["step"] == "translate"
    assert result.error["message"].startswith("item 1: ")
    assert "Invalid value for 'messages'" in result.error["message"]


def test_retries_apply_to_each_item(fake, tmp_path):
    Answers({"Translate: flaky": [http_error(500, "The server had an error"),
                                  openai_text("fine")]}).serve(fake)
    result, rows = execute(pipeline(tmp_path, "retries: 1"), {"docs": ["a", "flaky"]},
                           fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output["translations"] == ["echo: Translate: a", "fine"]
    assert [i["attempts"] for i in result.steps["translate"].items] == [1, 2]
    assert [r[:3] for r in rows if r[0] == "translate[1]"] == [
        ("translate[1]", "batch", False), ("translate[1]", "batch", True)]


def test_timeout_applies_to_each_item(fake, tmp_path):
    Answers({"Translate: slow": [slow(3, openai_text("late"))]}).serve(fake)
    result, _ = execute(pipeline(tmp_path, "timeout: 0.5\n    on_error: continue"),
                        {"docs": ["slow", "quick"]}, fake, tmp_path)
    assert result.status == "succeeded"
    assert result.output["translations"] == [None, "echo: Translate: quick"]
    assert "timed out after 0.5 s" in result.steps["translate"].items[0]["error"]


def test_an_empty_list_maps_to_an_empty_list(fake, tmp_path):
    Answers({}).serve(fake)
    result, rows = execute(pipeline(tmp_path), {"docs": []}, fake, tmp_path)
    assert result.status == "succeeded"
    assert result.output == {"translations": []} and rows == []


def test_a_structured_body_maps_to_a_typed_list_a_later_step_reads(fake, tmp_path):
    path = write(tmp_path, typed="""\
        name: typed
        inputs:
          text: {type: string}
        steps:
          - id: split
            type: llm
            model: m
            prompt: "Split: ${input.text}"
            response_format:
              schema:
                type: object
                properties:
                  parts: {type: array, items: {type: string}}
                required: [parts]
          - id: score
            type: llm
            model: m
            for_each: ${split.parts}
            as: part
            prompt: "Score: ${part}"
            response_format:
              schema:
                type: object
                properties: {score: {type: integer}}
                required: [score]
          - id: report
            type: llm
            model: m
            prompt: |
              Report: first ${score[0].score ?? 0};
              {% for s in score %}{{ s.score }} {% endfor %}
        output:
          first: ${score[0].score ?? 0}
          report: ${report}
        """)
    compiled = compiled_at(path)
    assert str(compiled.node("score").output_type) == "array of object"
    Answers({"Split:": [openai_text(json.dumps({"parts": ["x", "yy"]}))],
             "Score: (x|yy)": [lambda rec: openai_text(json.dumps(
                 {"score": len(rec.body["messages"][-1]["content"]) - 7}))(rec)]}).serve(fake)
    result, rows = execute(compiled, {"text": "x yy"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output["first"] == 1
    assert "Report: first 1;\n1 2" in result.output["report"]
    assert sorted(r[0] for r in rows) == ["report", "score[0]", "score[1]", "split"]


def test_the_compiler_types_the_item_and_the_result(tmp_path):
    path = write(tmp_path, bad="""\
        name: bad
        steps:
          - id: split
            type: llm
            model: m
            prompt: "Split"
            response_format:
              schema:
                type: object
                properties:
                  parts:
                    type: array
                    items: {type: object, properties: {title: {type: string}}, required: [title]}
                required: [parts]
          - id: each
            type: llm
            model: m
            for_each: ${split.parts}
            as: part
            on_error: continue
            prompt: "${part.titel}"
          - id: after
            type: llm
            model: m
            prompt: "${each[0]}"
        output: ${after}
        """)
    found = diagnostics(path)
    assert ("unknown-field-path", "'part' has no field 'titel'; did you mean 'title'?") in found
    assert any(rule == "maybe-skipped" and "item [0] of 'each' may be missing" in message
               for rule, message in found)


def test_a_map_over_a_value_that_is_not_a_list_is_an_error(tmp_path):
    path = write(tmp_path, notlist="""\
        name: notlist
        inputs:
          n: {type: integer}
        steps:
          - {id: each, type: llm, model: m, for_each: "${input.n}", prompt: "${item}"}
        output: ${each}
        """)
    assert diagnostics(path) == [("for-each-not-a-list",
                                  "`for_each` needs a list; 'input.n' is an integer")]


def test_flowc_schema_covers_for_each_sub_pipelines_and_repeat():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import jsonschema

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "flowc.cli", "schema"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    validator = jsonschema.Draft202012Validator(json.loads(r.stdout))
    step = {"id": "s", "type": "llm", "model": "m", "prompt": "p ${d}",
            "for_each": "${input.docs}", "as": "d", "max_concurrency": 5,
            "repeat": {"until": "${self.output} != ''", "max": 3}}
    call = {"id": "c", "type": "pipeline", "pipeline": "./summarize.yaml",
            "inputs": {"text": "${s}"}}
    doc = {"name": "p", "steps": [step, call]}
    assert not list(validator.iter_errors(doc))
    for bad in ({**step, "for_eachh": "x"}, {**step, "repeat": {"max": 0}},
                {**step, "as": "no spaces"}, {**call, "pipeline": ""},
                {**step, "repeat": {"until": "x"}}):
        assert list(validator.iter_errors({"name": "p", "steps": [bad]})), bad


def test_two_maps_type_their_items_each_on_its_own(tmp_path):
    path = write(tmp_path, two="""\
        name: two
        steps:
          - id: a
            type: llm
            model: m
            prompt: "p"
            response_format:
              schema:
                type: object
                properties:
                  ns: {type: array, items: {type: integer}}
                  ss: {type: array, items: {type: string}}
                required: [ns, ss]
          - {id: m1, type: llm, model: m, for_each: "${a.ns}", when: "${item} > 1",
             prompt: "n ${item}"}
          - {id: m2, type: llm, model: m, for_each: "${a.ss}", when: "${item} > 1",
             prompt: "s ${item}"}
        output: {a: "${m1}", b: "${m2}"}
        """)
    assert diagnostics(path) == [("type-mismatch", "cannot compare string value ${item} "
                                                   "with integer 1 using '>'")]
