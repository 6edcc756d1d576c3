"""`type: pipeline` (sub-pipelines): the callee is found, checked and typed at compile time;
it runs nested in the caller's run against a loopback OpenAI server, its steps in the
step's record, its calls on the books under the caller's run, its costs rolled up."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from flowc import compile_file
from tests.dsl_b import Answers, compiled_at, diagnostics, execute, project, write
from tests.fakes import FakeServer, http_error, openai_text

SUMMARIZE = """\
name: summarize
inputs:
  text: {type: string}
  words: {type: integer, default: 20}
steps:
  - id: summary
    type: llm
    model: m
    prompt: "Summarize in ${input.words} words: ${input.text}"
    response_format:
      schema:
        type: object
        properties: {summary: {type: string}, topic: {type: string}}
        required: [summary, topic]
output:
  summary: ${summary.summary}
  topic: ${summary.topic}
"""

MAP_REDUCE = """\
name: digest
inputs:
  docs: {type: array}
steps:
  - id: summaries
    type: pipeline
    pipeline: %s
    for_each: ${input.docs}
    as: doc
    inputs: {text: "${doc}"}
  - id: digest
    type: llm
    model: m
    prompt: |
      Digest: {%% for s in summaries %%}[{{ s.topic }}] {{ s.summary }} {%% endfor %%}
output:
  digest: ${digest}
  first_topic: ${summaries[0].topic ?? ""}
"""


@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


def summarize_answers() -> Answers:
    def summary(rec):
        text = rec.body["messages"][-1]["content"].rsplit(": ", 1)[1]
        return openai_text(json.dumps({"summary": text[:5], "topic": text.split()[0]}))(rec)
    return Answers({"Summarize in": [summary]})


@pytest.mark.parametrize("callee", ["./summarize.yaml", "summarize"])
def test_map_reduce_over_a_sub_pipeline(fake, tmp_path, callee):
    main = write(tmp_path, digest=MAP_REDUCE % callee, summarize=SUMMARIZE)
    compiled = compiled_at(main)
    assert compiled.node("summaries").callee.name == "summarize"
    summarize_answers().serve(fake)
    result, rows = execute(compiled, {"docs": ["alpha one", "beta two", "gamma three"]},
                           fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output["first_topic"] == "alpha"
    assert "[alpha] alpha [beta] beta  [gamma] gamma" in result.output["digest"]
    # The callee's calls are on the books under the caller's run and workflow, each with
    # the map's item and the callee's step.
    assert sorted(r[0] for r in rows) == ["digest", "summaries[0]/summary",
                                          "summaries[1]/summary", "summaries[2]/summary"]
    assert {(r[1], r[3]) for r in rows} == {("digest", result.run_id)}
    # The record nests each item's callee steps; costs and tokens roll up.
    step = result.steps["summaries"]
    record = step.to_dict()
    assert [s["id"] for item in record["items"] for s in item["steps"]] == ["summary"] * 3
    assert step.model_calls == 3 and step.tokens == 3 * 29
    assert step.cost is not None and step.cost > 0
    assert result.total_cost == step.cost + result.steps["digest"].cost


def test_a_single_call_nests_the_callee_and_its_default_inputs(fake, tmp_path):
    main = write(tmp_path, one="""\
        name: one
        inputs:
          text: {type: string}
        steps:
          - id: short
            type: pipeline
            pipeline: ./summarize.yaml
            inputs: {text: "${input.text}"}
        output: ${short.summary}
        """, summarize=SUMMARIZE)
    answers = summarize_answers()
    answers.serve(fake)
    result, rows = execute(compiled_at(main), {"text": "delta four"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == "delta"
    assert answers.prompts == ["Summarize in 20 words: delta four"]  # the callee's default
    assert rows == [("short/summary", "one", True, result.run_id)]
    nested = result.to_dict()["metrics"]["steps"][0]["steps"]
    assert [(s["id"], s["status"]) for s in nested] == [("summary", "done")]


def test_a_failing_callee_fails_the_step_with_its_error(fake, tmp_path):
    main = write(tmp_path, one="""\
        name: one
        steps:
          - id: short
            type: pipeline
            pipeline: ./summarize.yaml
            inputs: {text: "x"}
        output: ${short.summary}
        """, summarize=SUMMARIZE)
    Answers({"Summarize": [http_error(400, "Invalid 'messages[0].content'")]}).serve(fake)
    result, rows = execute(compiled_at(main), {}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error["step"] == "short"
    assert result.error["message"].startswith("pipeline 'summarize' failed: ")
    assert "Invalid 'messages[0].content'" in result.error["message"]
    assert rows == [("short/summary", "one", False, result.run_id)]


def test_the_callers_budget_covers_the_callees_calls(fake, tmp_path):
    bounded = SUMMARIZE.replace("    model: m\n", "    model: m\n    max_tokens: 50\n").replace(
        "text: {type: string}", "text: {type: string, max_length: 100}").replace(
        "default: 20}", "default: 20, max_length: 3}")
    main = write(tmp_path, capped="""\
        name: capped
        max_cost_usd: 0.0000001
        steps:
          - id: short
            type: pipeline
            pipeline: ./summarize.yaml
            inputs: {text: "x"}
        output: ${short.summary}
        """, summarize=bounded)
    # The callee's worst case counts against the caller's cap at compile time...
    found = compile_file(main, project())
    assert [d.rule for d in found.diagnostics] == ["over-budget"]
    # ...and its calls at run time (the finding ignored, the run enforces the cap).
    Answers({}).serve(fake)
    compiled = compile_file(main, project(), ignore=frozenset({"over-budget"})).compiled
    result, rows = execute(compiled, {}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error["type"] == "BudgetExceeded"
    assert "max_cost_usd" in result.error["message"] and rows == []
    assert result.total_cost == Decimal(0)


def test_pipelines_that_call_each_other_are_a_cycle_named_in_the_diagnostic(tmp_path):
    a = write(tmp_path, a="""\
        name: a
        steps:
          - {id: to_b, type: pipeline, pipeline: ./b.yaml}
        output: ${to_b}
        """, b="""\
        name: b
        steps:
          - {id: to_c, type: pipeline, pipeline: c}
        output: ${to_c}
        """, c="""\
        name: c
        steps:
          - {id: back, type: pipeline, pipeline: ./a.yaml}
        output: ${back}
        """)
    assert diagnostics(a) == [("pipeline-cycle", "pipelines call each other in a cycle: "
                                                 "a.yaml -> b.yaml -> c.yaml -> a.yaml")]


def test_a_callee_with_an_approval_step_is_refused_where_it_is_called(tmp_path):
    # A run waits for approvals at its top level: a nested one would fail at run time.
    main = write(tmp_path, main="""\
        name: main
        steps:
          - {id: publish, type: pipeline, pipeline: ./gate.yaml}
        output: ${publish}
        """, gate="""\
        name: gate
        steps:
          - {id: ok, type: approval, message: "Go?"}
        output: done
        """)
    assert diagnostics(main) == [("pipeline-approval", "pipeline './gate.yaml' has an approval "
                                  "step ('ok'): a run waits for approvals at its top level, "
                                  "not inside a sub-pipeline")]


def test_inputs_are_checked_against_the_callees_declared_inputs(tmp_path):
    main = write(tmp_path, main="""\
        name: main
        inputs:
          n: {type: integer}
          label: {type: string}
        steps:
          - id: s
            type: pipeline
            pipeline: ./summarize.yaml
            inputs: {text: "${input.n}", words: "${input.label}", tone: dry}
        output: ${s.summery}
        """, summarize=SUMMARIZE)
    assert diagnostics(main) == [
        ("pipeline-inputs", "input 'words' of pipeline 'summarize' is an integer, but this "
                            "value is a string"),
        ("pipeline-inputs", "pipeline 'summarize' has no input 'tone'"),
        ("unknown-field-path", "'s' has no field 'summery'; did you mean 'summary'?"),
    ]


def test_an_editor_hover_on_a_sub_pipelines_result_names_the_callee(tmp_path):
    from flowc.lsp.analysis import hover, symbols

    write(tmp_path, summarize=SUMMARIZE)
    text = ("name: one\nsteps:\n  - id: s\n    type: pipeline\n    pipeline: ./summarize.yaml\n"
            "    inputs: {text: hi}\noutput: ${s.topic}\n")
    sym = symbols(text, str(tmp_path / "one.yaml"), project())
    assert sym is not None
    shown, _, _ = hover(sym, text.index("s.topic") + 2)
    assert "s.topic: string" in shown
    assert "The result of step `s` (pipeline, pipeline `./summarize.yaml`), line 3." in shown


CAPPED = """\
# flowc: ignore-file[over-budget]
name: summarize
max_cost_usd: %s
inputs:
  text: {type: string, max_length: 100}
steps:
  - id: summary
    type: llm
    model: m
    max_tokens: 50
    prompt: "Summarize: ${input.text}"
output: ${summary}
"""


def test_the_callees_own_cap_holds_its_calls_and_fails_only_the_step(fake, tmp_path):
    main = write(tmp_path, lenient="""\
        name: lenient
        steps:
          - id: short
            type: pipeline
            pipeline: ./summarize.yaml
            inputs: {text: "x"}
            on_error: continue
          - id: other
            type: llm
            model: m
            prompt: other
        output: {short: "${short ?? 'none'}", other: "${other}"}
        """, summarize=CAPPED % "0.00001")
    Answers({}).serve(fake)
    result, rows = execute(compiled_at(main), {}, fake, tmp_path)
    # The callee's call is refused before it is made, worded as a run's own cap; the
    # caller's budget is untouched, so `on_error: continue` holds and the run goes on.
    assert result.status == "succeeded", result.error
    assert result.output == {"short": "none", "other": "echo: other"}
    step = result.steps["short"]
    assert step.status == "failed"
    assert step.error.startswith("pipeline 'summarize' failed: the run would go past "
                                 "max_cost_usd $0.00001: it has spent $0, and the next "
                                 "call of step 'summary' may cost up to $")
    assert rows == [("other", "lenient", True, result.run_id)]


def test_each_call_of_a_capped_callee_has_its_own_cap(fake, tmp_path):
    # One call's worst case is ~$0.000033 (a short prompt, 50 tokens out at gpt-4o-mini's
    # prices): the cap holds one call of each run of the callee, not three at once.
    main = write(tmp_path, mapped="""\
        name: mapped
        inputs:
          docs: {type: array, items: {type: string}}
        steps:
          - id: each
            type: pipeline
            pipeline: ./summarize.yaml
            for_each: ${input.docs}
            as: doc
            inputs: {text: "${doc}"}
        output: ${each}
        """, summarize=CAPPED % "0.00005")
    Answers({}, delay=0.05).serve(fake)
    result, rows = execute(compiled_at(main), {"docs": ["a", "b", "c"]}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == ["echo: Summarize: a", "echo: Summarize: b", "echo: Summarize: c"]
    assert [r[0] for r in rows] == ["each[0]/summary", "each[1]/summary", "each[2]/summary"]
    # ...while a caller's cap below one call stops the whole run, as before.
    capped = write(tmp_path, capped_map="# flowc: ignore-file[unbounded-cost]\n"
                   + (tmp_path / "mapped.yaml").read_text().replace(
                       "name: mapped\n", "name: capped_map\nmax_cost_usd: 0.00001\n"))
    result, _ = execute(compiled_at(capped), {"docs": ["a"]}, fake, tmp_path)
    assert result.status == "failed" and result.error["type"] == "BudgetExceeded"
    assert result.error["message"].startswith("pipeline 'summarize' failed: the run would "
                                              "go past max_cost_usd $0.00001")
