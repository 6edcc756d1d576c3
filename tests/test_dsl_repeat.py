"""`repeat: {until:, max:}`: validate-and-repair against a loopback OpenAI server. An answer
that breaks the step's schema, or an `until:` that is false, asks again with the last
answer and what was wrong (`${self.previous}`, `${self.error}`), at most `max` times."""

from __future__ import annotations

import json

import pytest

from tests.dsl_b import Answers, compiled_at, diagnostics, execute, write
from tests.fakes import FakeServer, http_error, openai_text

EXTRACT = """\
name: extract
inputs:
  text: {type: string}
steps:
  - id: invoice
    type: llm
    model: m
    repeat: {max: 3%s}
    %s
    prompt: |
      Extract (attempt ${self.attempt}): ${input.text}
      Previous: ${self.previous ?? "none"}
      Problem: ${self.error ?? "none"}
    response_format:
      schema:
        type: object
        properties:
          total: {type: number}
          currency: {type: string, enum: [EUR, USD]}
          confidence: {type: number}
        required: [total, currency, confidence]
output:
  total: ${invoice.total}
  currency: ${invoice.currency}
"""


@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


def answer(value) -> object:
    return openai_text(value if isinstance(value, str) else json.dumps(value))


def test_a_schema_violation_is_repaired_with_the_previous_answer_and_its_error(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, extract=EXTRACT % ("", "")))
    answers = Answers({"Extract": [
        answer("Sure! The total is 12 EUR."),
        answer({"total": "12", "currency": "EUR", "confidence": 0.9}),
        answer({"total": 12, "currency": "EUR", "confidence": 0.9})]})
    answers.serve(fake)
    result, rows = execute(compiled, {"text": "Invoice: 12 EUR"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"total": 12, "currency": "EUR"}
    first, second, third = answers.prompts
    assert "attempt 1" in first and "Previous: none" in first and "Problem: none" in first
    assert "attempt 2" in second and "Previous: Sure! The total is 12 EUR." in second
    assert "Problem: the answer is not JSON" in second
    assert "attempt 3" in third and '"total": "12"' in third
    assert "Problem: total: '12' is not of type 'number'" in third
    assert result.steps["invoice"].attempts == 3
    assert rows == [("invoice", "extract", True, result.run_id)] * 3


def test_until_drives_the_loop_and_reads_the_answer_typed(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, extract=EXTRACT % (
        ", until: '${self.output.confidence} >= 0.8'", "")))
    answers = Answers({"Extract": [
        answer({"total": 10, "currency": "USD", "confidence": 0.3}),
        answer({"total": 12, "currency": "EUR", "confidence": 0.95})]})
    answers.serve(fake)
    result, rows = execute(compiled, {"text": "12 EUR"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"total": 12, "currency": "EUR"}
    assert "Problem: `until: ${self.output.confidence} >= 0.8` was false" in answers.prompts[1]
    assert '"confidence": 0.3' in answers.prompts[1]
    assert len(rows) == 2


def test_no_valid_answer_within_max_fails_the_step_with_the_last_problem(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, extract=EXTRACT % ("", "")))
    Answers({"Extract": [answer({"total": 1, "currency": "GBP", "confidence": 1})]}
            ).serve(fake)
    result, rows = execute(compiled, {"text": "1 GBP"}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error["message"] == (
        "no acceptable answer in 3 attempts; the last: currency: 'GBP' is not one of "
        "['EUR', 'USD']")
    assert len(rows) == 3


def test_a_failed_loop_under_on_error_continue_leaves_the_output_missing(fake, tmp_path):
    path = write(tmp_path, soft="""\
        name: soft
        steps:
          - id: pick
            type: llm
            model: m
            repeat: {max: 2}
            on_error: continue
            prompt: "Pick ${self.error ?? ''}"
            response_format:
              schema: {type: object, properties: {n: {type: integer}}, required: [n]}
          - {id: other, type: llm, model: m, prompt: "Other"}
        output:
          n: ${pick.n ?? -1}
          other: ${other}
        """)
    Answers({"Pick": [answer("no")], "Other": [answer("fine")]}).serve(fake)
    result, rows = execute(compiled_at(path), {}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"n": -1, "other": "fine"}
    assert result.steps["pick"].status == "failed"
    assert sorted(r[0] for r in rows) == ["other", "pick", "pick"]


def test_retries_cover_upstream_errors_not_schema_violations(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, extract=EXTRACT % ("", "retries: 1")))
    Answers({"Extract": [
        http_error(500, "The server had an error while processing your request."),
        answer("not json"),
        answer({"total": 3, "currency": "USD", "confidence": 1})]}).serve(fake)
    result, rows = execute(compiled, {"text": "3 USD"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert [r[2] for r in rows] == [False, True, True]  # the 500 retried, then repaired once
    assert result.steps["invoice"].attempts == 3


def test_each_item_of_a_map_repairs_on_its_own(fake, tmp_path):
    path = write(tmp_path, many="""\
        name: many
        inputs:
          texts: {type: array}
        steps:
          - id: parse
            type: llm
            model: m
            for_each: ${input.texts}
            as: text
            repeat: {max: 2}
            prompt: "Parse ${text} ${self.error ?? ''}"
            response_format:
              schema: {type: object, properties: {n: {type: integer}}, required: [n]}
        output: ${parse}
        """)
    Answers({"Parse a $": [answer("oops")], "Parse a .+": [answer({"n": 1})],
             "Parse b": [answer({"n": 2})]}).serve(fake)
    result, rows = execute(compiled_at(path), {"texts": ["a", "b"]}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == [{"n": 1}, {"n": 2}]
    assert sorted(r[0] for r in rows) == ["parse[0]", "parse[0]", "parse[1]"]
    assert [i["attempts"] for i in result.steps["parse"].items] == [2, 1]


def test_the_compiler_demands_fallbacks_for_the_first_attempt(tmp_path):
    path = write(tmp_path, bare="""\
        name: bare
        steps:
          - id: s
            type: llm
            model: m
            repeat: {max: 2, until: '${self.output} != ""'}
            prompt: "Again: ${self.previous}"
        output: ${s}
        """)
    assert diagnostics(path) == [(
        "maybe-skipped", "'self.previous' may be missing when step 's' reads it: "
                         "'self.previous' is missing on the first attempt")]
