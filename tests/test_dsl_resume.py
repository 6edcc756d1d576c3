"""Resume: a new run of a failed run's pipeline reuses the recorded outputs of the steps
that succeeded (the loopback provider is not called for them again) and runs the rest;
resumed steps are marked in the new run's record, which links to the original, and cost
$0."""

from __future__ import annotations

import json
import textwrap

import pytest

from runtime.inputs import InputError
from runtime.resume import ResumeError, plan, resume_run
from tests.fakes import openai_text, slow
from tests.test_dsl_cache import compile_yaml, run
from tests.test_runtime import by_prompt
from tests.test_runtime import fake as _fake
from tests.test_runtime import openai_fake as _openai_fake

fake, openai_fake = _fake, _openai_fake

CHAIN = """
    name: chain
    inputs: {topic: {type: string}}
    steps:
      - id: research
        type: llm
        model: m
        prompt: Research ${input.topic}
      - id: outline
        type: llm
        model: m
        prompt: Outline from ${research}
        response_format:
          schema:
            type: object
            properties: {points: {type: array, items: {type: string}}}
            required: [points]
      - id: side
        type: llm
        model: m
        prompt: A side note on ${input.topic}
      - id: draft
        type: llm
        model: m
        prompt: Draft from ${outline.points} and ${side}
    output: ${draft}
"""
# `side` finishes before `outline` can fail the run. Run concurrently, a busy machine let
# `outline` fail first, cancelling `side` (its late request then reached the upstream among
# the resume's), and the resume ran `side` again: tests that count requests use this.
ORDERED = textwrap.dedent(CHAIN).replace("  - id: outline\n",
                                         "  - id: outline\n    needs: [side]\n")
assert "needs: [side]" in ORDERED


def execute(compiled, inputs=None, *, fake, tmp_path, resume=None, record=None, **kw):
    """A run (or, with ``resume``, a resume of run ``resume`` recorded as ``record``) and
    the ledger rows of the run (step_id, cost_usd, ...)."""
    def act(ex):
        if resume is None:
            return ex.run(compiled, inputs or {})
        return resume_run(ex, compiled, resume, record, inputs, **kw)

    return run(compiled, inputs, fake=fake, ledger_path=tmp_path / "ledger.duckdb", act=act)


def record_of(result) -> dict:
    return json.loads(json.dumps(result.to_dict(), default=str))  # as the ledger keeps it


def prompts(fake) -> list[str]:
    return sorted(r.body["messages"][-1]["content"].split()[0] for r in fake.requests)


def failing_outline(fake, side_delay: float = 0.0):
    """`outline` answers not-JSON and fails the run; ``side_delay``: `side`'s answer comes
    that much later (a busy upstream)."""
    side = slow(side_delay, openai_text("note")) if side_delay else openai_text("note")
    fake.then(*[by_prompt({"Outline": openai_text("not json"),
                           "Research": openai_text("facts"), "side": side})] * 4)


def test_resume_runs_only_what_did_not_succeed(openai_fake, tmp_path):
    compiled = compile_yaml(ORDERED)
    failing_outline(openai_fake)
    first, _ = execute(compiled, {"topic": "owls"}, fake=openai_fake, tmp_path=tmp_path)
    assert first.status == "failed" and first.error["step"] == "outline"
    assert first.steps["research"].status == "done"
    openai_fake.requests.clear()
    openai_fake.script.clear()
    openai_fake.then(*[by_prompt({"Outline": openai_text('{"points": ["a", "b"]}'),
                                  "Draft": openai_text("the draft"),
                                  "A": openai_text("note")})] * 3)
    again, rows = execute(compiled, fake=openai_fake, tmp_path=tmp_path,
                          resume=first.run_id, record=record_of(first))
    assert again.status == "succeeded" and again.output == "the draft"
    # research succeeded: its recorded output is reused, no request for it.
    assert "Research" not in prompts(openai_fake)
    assert openai_fake.requests[0].body["messages"][-1]["content"] == "Outline from facts"
    record = again.to_dict()
    assert record["resumed_from"] == first.run_id and again.run_id != first.run_id
    research = next(s for s in record["metrics"]["steps"] if s["id"] == "research")
    assert research["resumed_from"] == first.run_id and research["cost"] == 0
    assert research["model_calls"] == 0 and research["output"] == "facts"
    # The ledger has rows for the steps that ran, none for the one reused.
    assert "research" not in {r[0] for r in rows} and {"outline", "draft"} <= {
        r[0] for r in rows}
    assert again.total_cost == sum(r[1] for r in rows)


def test_a_step_whose_definition_changed_runs_again_and_so_do_its_readers(
        openai_fake, tmp_path):
    compiled = compile_yaml(ORDERED)
    failing_outline(openai_fake)
    first, _ = execute(compiled, {"topic": "owls"}, fake=openai_fake, tmp_path=tmp_path)
    changed = compile_yaml(ORDERED.replace("A side note on", "A footnote on"))
    reused = plan(changed, first.run_id, record_of(first)).outputs
    assert set(reused) == {"research"}  # side changed: not reused
    unchanged = plan(compiled, first.run_id, record_of(first)).outputs
    assert set(unchanged) == {"research", "side"}
    reworded = compile_yaml(ORDERED.replace("Research ${input.topic}",
                                            "Study ${input.topic}"))
    # research changed: it and what reads it run again; side reads only the input.
    assert plan(reworded, first.run_id, record_of(first)).outputs == {"side": "note"}


def test_resume_refuses_what_it_cannot_resume(openai_fake, tmp_path):
    compiled = compile_yaml(CHAIN)
    openai_fake.then(*[by_prompt({"Outline": openai_text('{"points": []}')})] * 4)
    ok, _ = execute(compiled, {"topic": "owls"}, fake=openai_fake, tmp_path=tmp_path)
    with pytest.raises(ResumeError, match="succeeded: there is nothing to resume"):
        execute(compiled, fake=openai_fake, tmp_path=tmp_path, resume=ok.run_id,
                record=record_of(ok))
    failed = {**record_of(ok), "status": "failed"}
    with pytest.raises(ResumeError, match="differ from run"):
        execute(compiled, {"topic": "cats"}, fake=openai_fake, tmp_path=tmp_path,
                resume=ok.run_id, record=failed)
    other = compile_yaml(CHAIN.replace("name: chain", "name: other"))
    with pytest.raises(ResumeError, match="is a run of pipeline 'chain', not 'other'"):
        execute(other, fake=openai_fake, tmp_path=tmp_path, resume=ok.run_id, record=failed)
    old = {k: v for k, v in failed.items() if k not in ("inputs", "inputs_hash")}
    with pytest.raises(ResumeError, match="did not record its inputs"):
        execute(compiled, fake=openai_fake, tmp_path=tmp_path, resume=ok.run_id, record=old)
    with pytest.raises(InputError):
        execute(compiled, {"topic": 3}, fake=openai_fake, tmp_path=tmp_path,
                resume=ok.run_id, record=failed)


def test_the_same_inputs_given_again_are_accepted(openai_fake, tmp_path):
    compiled = compile_yaml(CHAIN)
    failing_outline(openai_fake)
    first, _ = execute(compiled, {"topic": "owls"}, fake=openai_fake, tmp_path=tmp_path)
    openai_fake.script.clear()
    openai_fake.then(*[by_prompt({"Outline": openai_text('{"points": []}')})] * 3)
    again, _ = execute(compiled, {"topic": "owls"}, fake=openai_fake, tmp_path=tmp_path,
                       resume=first.run_id, record=record_of(first))
    assert again.status == "succeeded"


# -- over HTTP and from the CLI ------------------------------------------------------------
SERVED_CONFIG = """\
models:
  m: openai/gpt-4o-mini
retry: {attempts: 0}
ledger: {flush_interval: 0.2}
"""


@pytest.fixture
def project(tmp_path, openai_fake):
    import os
    from pathlib import Path

    (tmp_path / "flowc.yaml").write_text(SERVED_CONFIG)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "chain.yaml").write_text(ORDERED)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OPENAI_BASE_URL": openai_fake.url + "/v1", "OPENAI_API_KEY": "k",
           "PYTHONPATH": str(root)}
    return tmp_path, env


def test_resume_over_http(project, openai_fake):
    import httpx

    from tests.conftest import start_server, stop_server
    from tests.fakes import free_port

    path, env = project
    port = free_port()
    proc = start_server(path, env, port, "--pipelines", str(path / "pipelines"))
    url = f"http://127.0.0.1:{port}"
    try:
        failing_outline(openai_fake, side_delay=0.5)
        first = httpx.post(f"{url}/v1/workflow/chain", json={"input": {"topic": "owls"}},
                           timeout=60).json()
        assert first["status"] == "failed"
        openai_fake.requests.clear()
        openai_fake.script.clear()
        openai_fake.then(*[by_prompt({"Outline": openai_text('{"points": ["a"]}'),
                                      "Draft": openai_text("the draft")})] * 3)
        r = httpx.post(f"{url}/v1/runs/{first['run_id']}/resume", timeout=60)
        assert r.status_code == 200, r.text
        again = r.json()
        assert again["status"] == "succeeded" and again["output"] == "the draft"
        assert again["resumed_from"] == first["run_id"]
        assert "Research" not in prompts(openai_fake) and "A" not in prompts(openai_fake)
        stored = httpx.get(f"{url}/v1/runs/{again['run_id']}", timeout=10).json()
        assert stored["resumed_from"] == first["run_id"]
        # A succeeded run has nothing to resume; an unknown one is a 404.
        r = httpx.post(f"{url}/v1/runs/{again['run_id']}/resume", timeout=60)
        assert r.status_code == 409 and "nothing to resume" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/runs/nope/resume", timeout=60)
        assert r.status_code == 404 and r.json()["error"]["message"] == "no run 'nope'"
        r = httpx.post(f"{url}/v1/runs/{first['run_id']}/resume",
                       json={"input": {"topic": "cats"}}, timeout=60)
        assert r.status_code == 409 and "differ from run" in r.json()["error"]["message"]
    finally:
        stop_server(proc)


def test_resume_from_the_cli(project, openai_fake):
    import subprocess
    import sys

    path, env = project

    def flowc(*args):
        return subprocess.run([sys.executable, "-m", "runtime.cli", "run",
                               str(path / "pipelines" / "chain.yaml"), "--json", *args],
                              cwd=path, env=env, capture_output=True, text=True, timeout=120)

    failing_outline(openai_fake, side_delay=0.5)
    first = flowc("-i", "topic=owls")
    assert first.returncode == 1
    run_id = json.loads(first.stdout)["run_id"]
    openai_fake.requests.clear()
    openai_fake.script.clear()
    openai_fake.then(*[by_prompt({"Outline": openai_text('{"points": ["a"]}'),
                                  "Draft": openai_text("the draft")})] * 3)
    again = flowc("--resume", run_id)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["output"] == "the draft" and out["resumed_from"] == run_id
    assert "Research" not in prompts(openai_fake)
    nope = flowc("--resume", "nope")
    assert nope.returncode == 1 and "no run 'nope'" in nope.stderr
