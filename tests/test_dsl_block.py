"""`type: block`: steps written inline under one step, checked in place and typed from the
block's `output:`; run as a nested run against a loopback OpenAI server, per item under
`for_each`, again under `repeat:`; its calls on the books as `block[i]/step`, its steps in
the step's record, its costs rolled up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from flowc import compile_file
from flowc.cost import pipeline_cost
from flowc.render import to_dot
from runtime.resume import plan
from tests.dsl_b import Answers, compiled_at, diagnostics, execute, project, write
from tests.fakes import FakeServer, http_error, openai_text

DIGEST = """\
name: digest
inputs:
  docs:
    type: array
    items:
      type: object
      properties: {title: {type: string}, text: {type: string}}
      required: [title, text]
steps:
  - id: tone
    type: llm
    model: m
    prompt: Pick a tone for ${input.docs[0].title ?? "nothing"}
  - id: per_doc
    type: block
    for_each: ${input.docs}
    as: doc
    max_concurrency: 2
    steps:
      - id: summary
        type: llm
        model: m
        prompt: "Summarize in a ${tone} tone: ${doc.text}"
      - id: keywords
        type: llm
        model: m
        prompt: "Keywords of ${doc.text}"
      - id: critique
        type: llm
        model: m
        prompt: "Critique this summary of ${doc.title}: ${summary}"
    output:
      summary: ${summary}
      critique: ${critique}
      keywords: ${keywords}
  - id: report
    type: transform
    template: "{% for d in per_doc if d %}[{{ d.summary }} / {{ d.critique }}]{% endfor %}"
output:
  report: ${report}
  first: ${per_doc[0].critique ?? ""}
"""


@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


def said(prefix: str):
    """An answer that repeats the prompt's last word after ``prefix``."""
    return lambda rec: openai_text(
        f"{prefix}:{rec.body['messages'][-1]['content'].split()[-1]}")(rec)


def digest_answers(delay: float = 0.0) -> Answers:
    return Answers({"Pick a tone": [openai_text("dry")], "Summarize": [said("S")],
                    "Keywords": [said("K")], "Critique": [said("C")]}, delay=delay)


DOCS = [{"title": "alpha", "text": "one"}, {"title": "beta", "text": "two"},
        {"title": "gamma", "text": "three"}]


def test_a_block_maps_over_a_list_with_its_steps_nested_and_on_the_books(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, digest=DIGEST))
    # The block reads `tone` from around it: the pipeline's step is its dependency.
    assert list(compiled.graph.predecessors("per_doc")) == ["tone"]
    answers = digest_answers(delay=0.2)
    answers.serve(fake)
    result, rows = execute(compiled, {"docs": DOCS}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"report": "[S:one / C:S:one][S:two / C:S:two][S:three / C:S:three]",
                             "first": "C:S:one"}
    assert "Summarize in a dry tone: one" in answers.prompts
    # Each inner step's calls are on the books as block[item]/step, under the run.
    assert [r[0] for r in rows] == sorted(
        [f"per_doc[{i}]/{s}" for i in range(3) for s in ("critique", "keywords", "summary")]
        + ["tone"])
    assert {(r[1], r[2], r[3]) for r in rows} == {("digest", True, result.run_id)}
    # Inner steps that do not read each other run at once, and items run two at a time.
    assert answers.peak == 4
    # The record nests each item's inner steps; calls, tokens and costs roll up.
    step = result.steps["per_doc"]
    record = step.to_dict()
    assert [[s["id"] for s in item["steps"]] for item in record["items"]] == \
        [["summary", "keywords", "critique"]] * 3
    assert record["items"][1]["steps"][2]["output"] == "C:S:two"
    assert step.model_calls == 9 and step.tokens == 9 * 29
    assert {(c["item"], c["step"]) for c in record["calls"]} == {
        (i, s) for i in range(3) for s in ("summary", "keywords", "critique")}
    assert result.total_cost == step.cost + result.steps["tone"].cost
    assert step.cost == sum(result.steps["tone"].cost for _ in range(9))


def test_a_failing_item_is_missing_under_on_error_continue_and_retried_first(fake, tmp_path):
    text = DIGEST.replace("    max_concurrency: 2\n",
                          "    max_concurrency: 1\n    on_error: continue\n    retries: 1\n")
    compiled = compiled_at(write(tmp_path, digest=text))

    def critique(rec):
        last = rec.body["messages"][-1]["content"]
        if "beta" in last:
            return http_error(400, "Invalid 'messages[0].content': too spicy")(rec)
        return said("C")(rec)
    Answers({"Pick a tone": [openai_text("dry")], "Summarize": [said("S")],
             "Keywords": [said("K")], "Critique": [critique]}).serve(fake)
    result, rows = execute(compiled, {"docs": DOCS}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output["report"] == "[S:one / C:S:one][S:three / C:S:three]"
    items = result.steps["per_doc"].to_dict()["items"]
    assert [i["status"] for i in items] == ["done", "failed", "done"]
    assert items[1]["attempts"] == 2  # the block's `retries: 1` ran it again whole
    assert "block 'per_doc' failed" in items[1]["error"]
    assert "too spicy" in items[1]["error"]
    failed = [r[0] for r in rows if not r[2]]
    assert failed == ["per_doc[1]/critique", "per_doc[1]/critique"]
    assert sum(1 for r in rows if r[0] == "per_doc[1]/summary") == 2


REPAIR = """\
name: repair
inputs:
  topic: {type: string}
steps:
  - id: fix
    type: block
    repeat: {until: "${self.output.verdict} == 'ok'", max: 3}
    steps:
      - id: draft
        type: llm
        model: m
        prompt: "Draft on ${input.topic}; last time: ${self.previous ?? 'none'}"
      - id: review
        type: llm
        model: m
        prompt: "Review ${draft}"
        response_format:
          schema:
            type: object
            properties: {verdict: {type: string, enum: [ok, redo]}}
            required: [verdict]
    output:
      draft: ${draft}
      verdict: ${review.verdict}
output: ${fix.draft}
"""


def test_repeat_runs_the_block_again_with_its_previous_output(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, repair=REPAIR))
    verdicts = iter(["redo", "ok"])
    answers = Answers({"Draft": [openai_text("d1"), openai_text("d2")],
                       "Review": [lambda rec: openai_text(json.dumps(
                           {"verdict": next(verdicts)}))(rec)]})
    answers.serve(fake)
    result, rows = execute(compiled, {"topic": "tea"}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == "d2"
    assert answers.prompts[0] == "Draft on tea; last time: none"
    assert answers.prompts[2] == ('Draft on tea; last time: {"draft": "d1", '
                                  '"verdict": "redo"}')
    assert [r[0] for r in rows] == ["fix/draft", "fix/draft", "fix/review", "fix/review"]
    assert result.steps["fix"].attempts == 2 and result.steps["fix"].model_calls == 4


def test_repeat_on_a_block_reads_its_output_typed(tmp_path):
    path = write(tmp_path, repair=REPAIR.replace("${self.output.verdict}",
                                                 "${self.output.verdit}"))
    assert diagnostics(path) == [
        ("unknown-field-path", "'self.output' has no field 'verdit'; did you mean 'verdict'?")]


def test_a_skipped_block_makes_no_calls_and_its_readers_need_a_fallback(fake, tmp_path):
    text = """\
        name: gated
        inputs:
          go: {type: boolean}
        steps:
          - id: pair
            type: block
            when: ${input.go}
            steps:
              - {id: a, type: llm, model: m, prompt: "A"}
              - {id: b, type: llm, model: m, prompt: "B after ${a}"}
            output: ${b}
          - {id: after, type: llm, model: m, prompt: "After ${pair}"}
        output: ${after}
        """
    path = write(tmp_path, gated=text)
    assert diagnostics(path) == [(
        "maybe-skipped", "'pair' may be missing when step 'after' reads it: step 'pair' may "
                         "be skipped (it has a `when:` condition)")]
    compiled = compiled_at(write(tmp_path, gated=text.replace("${pair}", "${pair ?? 'x'}")))
    Answers({}).serve(fake)
    result, rows = execute(compiled, {"go": False}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.steps["pair"].status == "skipped"
    assert [r[0] for r in rows] == ["after"]
    assert result.output == "echo: After x"


def test_switch_transform_and_a_nested_block_inside_a_block(fake, tmp_path):
    path = write(tmp_path, nested="""\
        name: nested
        inputs:
          items: {type: array, items: {type: string}}
        steps:
          - id: outer
            type: block
            for_each: ${input.items}
            as: it
            steps:
              - id: kind
                type: transform
                expr: "len(${it}) > 3"
              - id: route
                type: switch
                value: ${kind}
                cases:
                  true: long
                default: short
              - {id: long, type: llm, model: m, prompt: "Long ${it}"}
              - {id: short, type: transform, expr: "upper(${it})"}
              - id: inner
                type: block
                steps:
                  - {id: echo, type: llm, model: m, prompt: "Echo ${it} via ${route}"}
                output: {said: "${echo}"}
            output:
              route: ${route}
              said: ${inner.said}
        output: ${outer}
        """)
    compiled = compiled_at(path)
    item = compiled.node("outer").output_type.items
    assert [(name, str(item.field(name))) for name in item.field_names] == [
        ("route", "string"), ("said", "string")]
    Answers({"Long": [openai_text("LONG")]}).serve(fake)
    result, rows = execute(compiled, {"items": ["ab", "abcdef"]}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == [{"route": "AB", "said": "echo: Echo ab via AB"},
                             {"route": "LONG", "said": "echo: Echo abcdef via LONG"}]
    assert [r[0] for r in rows] == ["outer[0]/inner/echo", "outer[1]/inner/echo",
                                    "outer[1]/long"]


def test_names_inside_a_block_are_its_own(tmp_path):
    path = write(tmp_path, scoped="""\
        name: scoped
        inputs:
          docs: {type: array, items: {type: string}}
        steps:
          - id: per_doc
            type: block
            for_each: ${input.docs}
            as: doc
            steps:
              - {id: summary, type: llm, model: m, prompt: "S ${doc}"}
              - {id: doc, type: llm, model: m, prompt: "D"}
              - {id: summary, type: llm, model: m, prompt: "again"}
            output: {summary: "${summary}"}
          - {id: use, type: llm, model: m, prompt: "${summary} ${per_doc[0].summary}"}
          - {id: use2, type: llm, model: m, prompt: "${doc}"}
        output: {use: "${use}", use2: "${use2}"}
        """)
    found = compile_file(path, project()).diagnostics
    got = [(d.line, d.rule, d.message, d.help) for d in found]
    assert got == [
        (11, "invalid-value", "step 'doc' would hide the item 'doc' of block 'per_doc'",
         "give the step another id, or the item another name (`as:`)"),
        (12, "duplicate-id", "duplicate step id 'summary' (first defined on line 10)", None),
        (14, "undefined-reference", "undefined reference 'summary': 'summary' is a step "
         "inside block 'per_doc', not visible outside it",
         "read it through the block's result: ${per_doc[0].summary}"),
        (14, "maybe-skipped", "'per_doc[0].summary' may be missing when step 'use' reads it: "
         "item [0] of 'per_doc' may be missing: the for_each list may be shorter, or that "
         "item was skipped or failed",
         "add a fallback: ${per_doc[0].summary ?? <default>}, or set `on_missing: skip` on "
         "step 'use'"),
        (15, "undefined-reference", "undefined reference 'doc': 'doc' is a step inside block "
         "'per_doc', not visible outside it",
         "add it to block 'per_doc's `output:` (doc: ${doc}) and read ${per_doc[0].doc}"),
    ]


def test_an_inner_step_not_in_the_output_gets_a_hint_to_add_it(tmp_path):
    path = write(tmp_path, hint="""\
        name: hint
        steps:
          - id: pair
            type: block
            steps:
              - {id: a, type: llm, model: m, prompt: "A"}
              - {id: b, type: llm, model: m, prompt: "B ${a}"}
            output: {b: "${b}"}
          - {id: use, type: llm, model: m, prompt: "${a}"}
        output: ${use}
        """)
    [d] = [d for d in compile_file(path, project()).diagnostics
           if d.rule == "undefined-reference"]
    assert (d.line, d.col, d.rule) == (9, 45, "undefined-reference")
    assert d.help == "add it to block 'pair's `output:` (a: ${a}) and read ${pair.a}"


def test_resume_reuses_what_succeeded_and_runs_a_failed_block_again(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, digest=DIGEST))
    Answers({"Pick a tone": [openai_text("dry")], "Summarize": [said("S")],
             "Keywords": [said("K")],
             "Critique": [http_error(400, "Invalid 'messages[0].content'")]}).serve(fake)
    first, _ = execute(compiled, {"docs": DOCS[:1]}, fake, tmp_path)
    assert first.status == "failed" and first.error["step"] == "per_doc"
    record = json.loads(json.dumps(first.to_dict(), default=str))
    resume = plan(compiled, first.run_id, record)
    assert list(resume.outputs) == ["tone"]  # the block did not succeed: it runs again
    answers = digest_answers()
    answers.serve(fake)

    from tests import dsl_b
    original = dsl_b.Executor

    class Resuming(original):  # the same executor, asked to resume
        async def run(self, c, inputs, **kw):
            return await super().run(c, inputs, resume=resume, **kw)
    dsl_b.Executor = Resuming
    try:
        second, rows = execute(compiled, {"docs": DOCS[:1]}, fake, tmp_path)
    finally:
        dsl_b.Executor = original
    assert second.status == "succeeded", second.error
    assert second.steps["tone"].marks["resumed_from"] == first.run_id
    assert sorted(p.split()[0] for p in answers.prompts) == ["Critique", "Keywords",
                                                            "Summarize"]
    assert [r[0] for r in rows if r[3] == second.run_id] == [
        "per_doc[0]/critique", "per_doc[0]/keywords", "per_doc[0]/summary"]


def test_graph_draws_the_block_boxed_and_cost_adds_its_worst_case(tmp_path):
    path = write(tmp_path, costed="""\
        name: costed
        inputs:
          text: {type: string, max_length: 400}
        steps:
          - {id: first, type: llm, model: m, max_tokens: 50, prompt: "Title ${input.text}"}
          - id: pair
            type: block
            retries: 1
            steps:
              - {id: a, type: llm, model: m, max_tokens: 100, prompt: "A ${first} ${input.text}"}
              - {id: b, type: llm, model: m, max_tokens: 100, prompt: "B ${a}"}
            output: {b: "${b}"}
        output: ${pair.b}
        """)
    compiled = compiled_at(path)
    dot = to_dot(compiled).source
    assert 'subgraph cluster_pair {' in dot and 'label="pair: block"' in dot
    assert '"pair/a" -> "pair/b"' in dot and "first -> pair" in dot
    cost = pipeline_cost(compiled, project().config)
    first, pair = cost.steps
    assert (pair.model, pair.calls) == ("block", 4)
    inner = pipeline_cost(compiled.node("pair").callee, project().config).steps
    assert inner[0].worst_usd is None  # alone, `a` reads a `first` it cannot size...
    # ...inside the pipeline it reads the first step's bounded answer; each attempt of the
    # block (`retries: 1`) may make both calls.
    assert pair.worst_usd is not None and pair.worst_usd > 2 * first.worst_usd
    assert cost.worst_usd == first.worst_usd + pair.worst_usd


def test_flowc_schema_covers_blocks():
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "flowc.cli", "schema"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    validator = jsonschema.Draft202012Validator(json.loads(r.stdout))
    block = {"id": "b", "type": "block", "for_each": "${input.docs}", "as": "d",
             "repeat": {"until": "${self.output.ok}", "max": 2},
             "steps": [{"id": "s", "type": "llm", "model": "m", "prompt": "${d}"},
                       {"id": "in", "type": "block", "output": "${s}",
                        "steps": [{"id": "t", "type": "transform", "expr": "1"}]}],
             "output": {"ok": "${s}"}}
    assert not list(validator.iter_errors({"name": "p", "steps": [block]}))
    for bad in ({**block, "stepz": []}, {**block, "steps": [{"id": "s", "type": "lm"}]},
                {k: v for k, v in block.items() if k != "output"},
                {**block, "steps": [{**block["steps"][0], "promt": "x"}]}):
        assert list(validator.iter_errors({"name": "p", "steps": [bad]})), bad


def test_findings_in_a_block_point_at_their_file_line_and_column(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "s.md.j2").write_text("Summarize ${doc}\nand ${nope}\n")
    write(tmp_path, callee="""\
        name: callee
        inputs: {q: {type: string}}
        steps:
          - {id: a, type: llm, model: m, prompt: "A ${input.q}"}
        output: {said: "${a}"}
        """)
    path = write(tmp_path, main="""\
        name: main
        inputs:
          docs: {type: array, items: {type: string}}
        steps:
          - id: blk
            type: block
            for_each: ${input.docs}
            as: doc
            steps:
              - id: s
                type: llm
                model: m
                prompt: {file: prompts/s.md.j2}
              - id: c
                type: pipeline
                pipeline: ./callee.yaml
                inputs: {q: "${s}", r: 1}
            output: {said: "${c.sayd}"}
        output: ${blk}
        """)
    found = [(Path(d.path).name, d.line, d.col, d.rule) for d in
             compile_file(path, project()).diagnostics]
    assert found == [("main.yaml", 17, 29, "pipeline-inputs"),
                     ("main.yaml", 18, 21, "unknown-field-path"),
                     ("s.md.j2", 2, 5, "undefined-reference")]


def test_a_block_past_its_timeout_is_cancelled_with_its_calls_on_the_books(fake, tmp_path):
    compiled = compiled_at(write(tmp_path, slow="""\
        name: slow
        steps:
          - id: pair
            type: block
            timeout: 1.5
            on_error: continue
            steps:
              - {id: quick, type: llm, model: m, prompt: "quick"}
              - {id: slow, type: llm, model: m, prompt: "slow after ${quick}"}
            output: ${slow}
          - {id: after, type: llm, model: m, prompt: "after ${pair ?? 'nothing'}"}
        output: ${after}
        """))

    async def late(rec):
        import asyncio

        await asyncio.sleep(4)
        return openai_text("too late")(rec)
    Answers({"^slow": [late]}).serve(fake)
    result, rows = execute(compiled, {}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == "echo: after nothing"
    pair = result.steps["pair"]
    assert (pair.status, pair.error) == ("failed", "timed out after 1.5 s")
    assert [(s.id, s.status) for s in pair.steps.values()] == [("quick", "done"),
                                                               ("slow", "cancelled")]
    assert [(r[0], r[2]) for r in rows] == [("after", True), ("pair/quick", True),
                                            ("pair/slow", False)]


def test_a_block_whose_step_reads_the_block_is_a_cycle(tmp_path):
    path = write(tmp_path, selfread="""\
        name: selfread
        steps:
          - id: pair
            type: block
            steps:
              - {id: a, type: llm, model: m, prompt: "A ${pair.b ?? ''}"}
            output: {b: "${a}"}
        output: ${pair}
        """)
    assert diagnostics(path) == [("cycle", 'steps depend on each other in a cycle: "pair" '
                                           '-> "pair"')]


def test_a_block_in_a_file_with_a_misspelt_input_gets_the_finding_not_a_crash(tmp_path):
    # Found by the checker's fuzz test: the block was built with the file's broken inputs.
    path = write(tmp_path, typo="""\
        name: typo
        inputs:
          audience: {ype: string, default: engineers}
        steps:
          - id: per
            type: block
            steps:
              - {id: a, type: llm, model: m, prompt: "For ${input.audience}"}
            output: ${a}
        output: ${per}
        """)
    assert diagnostics(path) == [("unknown-field", "unknown field 'ype'; did you mean 'type'?")]


def test_a_step_may_not_hide_an_item_or_self_of_a_block_around_it(fake, tmp_path):
    """A run binds the item of every block around a step and `self` of their `repeat:`,
    and reads those before the steps' results: a step named so would be read as the
    compiler saw it (the step) but run as the item (or `self`). It is refused instead."""
    path = write(tmp_path, nested="""\
        name: nested
        inputs:
          docs: {type: array, items: {type: string}}
        steps:
          - id: outer
            type: block
            for_each: ${input.docs}
            as: doc
            steps:
              - id: mid
                type: block
                steps:
                  - {id: doc, type: transform, expr: {n: "join(${input.docs}, \\",\\")"}}
                  - {id: use, type: transform, template: "${doc.n}"}
                output: ${use}
            output: ${mid}
          - id: again
            type: block
            repeat: {until: '${self.output} == "ok"', max: 2}
            steps:
              - {id: self, type: transform, template: "ok"}
            output: ${self}
        output: {outer: "${outer}", again: "${again}"}
        """)
    found = compile_file(path, project()).diagnostics
    assert [(d.line, d.rule, d.message, d.help) for d in found] == [
        (13, "invalid-value", "step 'doc' would hide the item 'doc' of block 'outer'",
         "give the step another id, or the item another name (`as:`)"),
        (21, "invalid-value", "step 'self' would hide `self` of block 'again' (its "
         "`repeat:`)", "give the step another id")]
    # Named otherwise, the nested step is what `${doc2.n}` reads, and the item is `${doc}`.
    fixed = path.read_text().replace("id: doc,", "id: doc2,").replace(
        "${doc.n}", "${doc2.n}-${doc}").replace("id: self,", "id: me,").replace(
        "output: ${self}", "output: ${me}")
    path.write_text(fixed)
    result, _ = execute(compiled_at(path), {"docs": ["a", "b"]}, fake, tmp_path)
    assert result.status == "succeeded", result.error
    assert result.output == {"outer": ["a,b-a", "a,b-b"], "again": "ok"}


def _fallback(tmp_path: Path, *, read: str = "${a ?? b}", b_when: str = "${input.f2}",
              block: str = "", c: str = "", out: str = "${c}", top: str = "${blk}",
              a: bool = True, inputs: str = "") -> Path:
    """A step `a` around a block whose step `c` reads ``read``, `b` being a step of the
    block before it; ``block`` adds fields to the block, ``c`` to step `c`."""
    a_step = '  - {id: a, type: transform, when: "${input.f1}", template: "A"}\n' if a else ""
    return write(tmp_path, fallback=(
        "name: fallback\ninputs:\n  f1: {type: boolean}\n  f2: {type: boolean}\n" + inputs
        + "steps:\n" + a_step + "  - id: blk\n    type: block\n" + block
        + f'    steps:\n      - {{id: b, type: transform, when: "{b_when}", template: "B"}}\n'
        f'      - {{id: c, type: transform, template: "{read}"{c}}}\n'
        f"    output: {out}\noutput: {top}\n"))


def _findings(path: Path) -> list[tuple[int, str, str, str | None]]:
    return [(d.line, d.rule, d.message, d.help) for d in compile_file(path, project()).diagnostics]


def _runs(fake, tmp_path: Path, path: Path, *inputs: tuple[bool, bool]) -> list[object]:
    outputs = []
    for f1, f2 in inputs:
        result, _ = execute(compiled_at(path), {"f1": f1, "f2": f2}, fake, tmp_path)
        assert result.status == "succeeded", result.error
        outputs.append(result.output)
    return outputs


def test_a_fallback_from_an_outside_value_to_a_steps_is_checked_as_a_whole(fake, tmp_path):
    """`${a ?? b}` in a block, `a` from around it, `b` one of its steps: both may be
    skipped, so the reference may be missing, as it is outside a block. (It passed the
    check, and a run with neither failed on "'a ?? b' is missing".)"""
    assert _findings(_fallback(tmp_path)) == [
        (11, "maybe-skipped", "'a ?? b' may be missing when step 'c' reads it: step 'a' may "
         "be skipped (it has a `when:` condition); step 'b' may be skipped (it has a `when:` "
         "condition)", "add a fallback: ${a ?? b ?? <default>}, or set `on_missing: skip` "
         "on step 'c'")]
    # Skipped with its reads, the step may be missing for the block's `output:` in turn.
    skipping = ", on_missing: skip"
    assert [(line, rule) for line, rule, _, _ in _findings(_fallback(tmp_path, c=skipping))
            ] == [(12, "maybe-skipped")]
    # With a fallback there, it runs as checked: each value in turn, then the default.
    path = _fallback(tmp_path, c=skipping, out='${c ?? "none"}')
    assert _findings(path) == []
    assert _runs(fake, tmp_path, path, (True, False), (False, True), (False, False)) == [
        "A", "B", "none"]


def test_an_if_else_across_a_block_or_a_value_it_needs_is_always_there(fake, tmp_path):
    """What the enclosing file knows holds inside the block: `a` and `b` the two sides of
    one condition; a value the block reads with no fallback, there whenever it runs (or
    the block is skipped: `on_missing: skip`)."""
    path = _fallback(tmp_path, b_when="not (${input.f1})")
    assert _findings(path) == []
    assert _runs(fake, tmp_path, path, (True, False), (False, False)) == ["A", "B"]
    path = _fallback(tmp_path, block="    on_missing: skip\n", out='{c: "${c}", a: "${a}"}',
                     top='${blk ?? "-"}')
    assert _findings(path) == []
    assert _runs(fake, tmp_path, path, (True, False), (False, True)) == [
        {"c": "A", "a": "A"}, "-"]


def test_an_items_optional_field_or_self_previous_as_a_fallback_inside_a_block(tmp_path):
    """The item's fields and `self` are typed inside the block as outside it: an optional
    field, or `self.previous` (none on the first attempt), may be missing."""
    mapped = _fallback(tmp_path, a=False, read="${doc.opt ?? b}",
                       block="    for_each: ${input.docs}\n    as: doc\n",
                       inputs="  docs: {type: array, items: {type: object, properties: "
                              "{opt: {type: string}}}}\n")
    assert _findings(mapped) == [
        (13, "maybe-skipped", "'doc.opt ?? b' may be missing when step 'c' reads it: field "
         "'opt' may be null or left out (its schema allows null, or does not list it in "
         "`required`); step 'b' may be skipped (it has a `when:` condition)",
         "add a fallback: ${doc.opt ?? b ?? <default>}, or set `on_missing: skip` on step "
         "'c'")]
    repeated = _fallback(tmp_path, a=False, read="${self.previous ?? b}",
                         block="    repeat: {until: '${self.output} == \"B\"', max: 2}\n")
    assert _findings(repeated) == [
        (11, "maybe-skipped", "'self.previous ?? b' may be missing when step 'c' reads it: "
         "'self.previous' is missing on the first attempt; step 'b' may be skipped (it has "
         "a `when:` condition)", "add a fallback: ${self.previous ?? b ?? <default>}, or "
         "set `on_missing: skip` on step 'c'")]


COUNTED = """\
name: counted
steps:
  - id: both
    type: block
    steps:
      - id: a
        type: llm
        model: m
        prompt: "List"
        response_format:
          schema:
            type: object
            properties: {xs: {type: array, items: {type: string}}}
            required: [xs]
    output:
      share: "{{ 10 // (a.xs | length) }}"
output: ${both}
"""


def test_an_output_that_cannot_be_built_names_the_block_or_the_pipeline(fake, tmp_path):
    """An `output:` whose template fails on the run's values (here an empty list divides by
    zero: nothing `flowc check` can see) fails the run naming whose output it was; at the
    pipeline's level, a failed run, not an exception out of the executor."""
    empty = openai_text(json.dumps({"xs": []}))
    compiled = compiled_at(write(tmp_path, counted=COUNTED))
    Answers({"List": [empty]}).serve(fake)
    result, _ = execute(compiled, {}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error == {
        "step": "both", "type": "StepFailed",
        "message": "block 'both' failed: its output could not be built: output template "
                   "failed: ZeroDivisionError: integer division or modulo by zero"}
    top = COUNTED.replace("output: ${both}", 'output: "{{ 10 // (both.share | int) }}"')
    top = top.replace('"{{ 10 // (a.xs | length) }}"', '"{{ a.xs | length }}"')
    compiled = compiled_at(write(tmp_path, counted=top))
    Answers({"List": [empty]}).serve(fake)
    result, _ = execute(compiled, {}, fake, tmp_path)
    assert result.status == "failed"
    assert result.error == {
        "step": None, "type": "StepFailed",
        "message": "the output of pipeline 'counted' could not be built: output template "
                   "failed: ZeroDivisionError: integer division or modulo by zero"}


def test_findings_about_a_blocks_output_name_the_block_not_the_pipeline(tmp_path):
    path = write(tmp_path, pair="""\
        name: pair
        steps:
          - id: both
            type: block
            steps:
              - {id: a, type: llm, model: m, prompt: "A", on_error: continue}
              - {id: b, type: llm, model: m, prompt: "B"}
              - {id: c, type: llm, model: m, prompt: "C"}
            output: {a: "${a}", b: "${b}"}
        output: ${both}
        """)
    assert sorted(diagnostics(path)) == [
        ("maybe-skipped", "'a' may be missing when the output of block 'both' reads it: step "
                          "'a' may fail without failing the run (on_error: continue)"),
        ("unused-step", "step 'c' does not contribute to the output of block 'both'")]
