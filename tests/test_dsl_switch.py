"""`type: switch`: a four-way router whose exhaustive cases join without fallbacks, run
end to end against loopback providers with its ledger rows checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowc import Project, compile_source
from flowc.compiler import compile_file
from flowc.config import ProjectConfig
from tests.fakes import FakeServer, anthropic_text, openai_text
from tests.fakes_ollama import ollama_answer

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ROOT / "pipelines" / "support_router.yaml"
CONFIG = """\
models:
  local: ollama/qwen2.5:7b
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
"""
# Which step answers each category, and the provider it calls.
CASES = {"billing": ("billing", "openai"), "technical": ("technical", "anthropic"),
         "account": ("account", "openai"), "other": ("general", "ollama")}


def project() -> Project:
    import yaml

    return Project(config=ProjectConfig.model_validate(yaml.safe_load(CONFIG)))


def test_the_router_needs_no_fallbacks_and_its_join_is_typed():
    text = ROUTER.read_text()
    assert "??" not in text
    result = compile_file(ROUTER, project())
    assert result.diagnostics == []
    node = result.compiled.node("route")
    assert str(node.output_type) == "string" and node.runs == "always"
    cases = {sid: result.compiled.node(sid).case for sid, _ in CASES.values()}
    assert cases == {"billing": 'case "billing" of switch \'route\'',
                     "technical": 'case "technical" of switch \'route\'',
                     "account": 'case "account" of switch \'route\'',
                     "general": 'case "other" of switch \'route\''}


def test_a_case_left_out_of_an_enum_makes_the_join_maybe_missing():
    text = ROUTER.read_text().replace("      other: general\n", "")
    text = text.replace("  - id: general", "  - id: general\n    when: false")
    errors = [d for d in compile_source(text, "r.yaml", project()).errors]
    assert [(d.rule, d.message) for d in errors] == [
        ("maybe-skipped", "'route' may be missing when step 'reply' reads it: switch 'route' "
                          "has no case for \"other\" and no `default`")]
    fixed = text.replace("Hi ${input.customer.name},\n\n      ${route}",
                         "Hi ${input.customer.name},\n\n      ${route ?? \"We will reply soon.\"}")
    assert compile_source(fixed, "r.yaml", project()).errors == []


def test_a_default_covers_what_the_cases_do_not():
    text = ROUTER.read_text().replace("      other: general\n", "    default: general\n")
    result = compile_source(text, "r.yaml", project())
    assert result.errors == [] and result.compiled.node("route").runs == "always"


PER_ITEM_HEAD = """\
name: per_item
inputs:
  xs: {type: array, items: {type: string, enum: [a, b]}}
steps:
"""
SWITCH_PER_ITEM = PER_ITEM_HEAD + """\
  - id: route
    type: switch
    for_each: ${input.xs}
    value: ${item}
    cases: {a: one, b: two}
  - {id: one, type: transform, template: "one"}
  - {id: two, type: transform, template: "two"}
"""


def test_a_switch_per_item_is_refused_with_the_way_to_write_it():
    errors = compile_source(SWITCH_PER_ITEM, "p.yaml", project()).errors
    assert [(d.line, d.rule) for d in errors] == [(5, "invalid-value")]
    assert "a switch takes no `for_each:`" in errors[0].message
    assert "`type: block` step with the `for_each:`" in errors[0].message
    # ... which compiles, each item switched on inside the block
    block = PER_ITEM_HEAD + """\
  - id: per_item
    type: block
    for_each: ${input.xs}
    steps:
      - {id: route, type: switch, value: "${item}", cases: {a: one, b: two}}
      - {id: one, type: transform, template: "one"}
      - {id: two, type: transform, template: "two"}
    output: ${route}
"""
    assert compile_source(block, "p.yaml", project()).errors == []


def test_the_graph_draws_the_switch_and_its_cases():
    from flowc.render import to_dot

    source = to_dot(compile_file(ROUTER, project()).compiled).source
    assert "diamond" in source and "[switch] on ${classify.category}" in source
    for label in ("case billing", "case technical", "case account", "case other"):
        assert f'label="{label}"' in source
    assert 'in case \\"billing\\" of switch \'route\'' in source


def test_the_json_schema_covers_switch_steps():
    from click.testing import CliRunner

    from flowc.cli import cli

    doc = json.loads(CliRunner().invoke(cli, ["schema"]).output)
    assert {"value", "cases", "default"} <= set(doc["$defs"]["SwitchStep"]["properties"])


@pytest.fixture(scope="module")
def fakes():
    servers = {k: FakeServer(k).start() for k in ("openai", "anthropic", "ollama")}
    yield servers
    for s in servers.values():
        s.stop()


def classified_as(category: str):
    def act(rec):
        if (rec.body.get("response_format") or {}).get("type") == "json_schema":
            return openai_text(json.dumps({"category": category,
                                           "summary": "Charged twice"}))(rec)
        return openai_text(f"the {category} answer")(rec)
    return act


@pytest.mark.parametrize("category", sorted(CASES))
def test_each_category_runs_its_case_alone_with_its_ledger_rows(fakes, tmp_path, category):
    answering, provider = CASES[category]
    for fake in fakes.values():
        fake.script.clear()
    fakes["openai"].then(classified_as(category), classified_as(category))
    fakes["anthropic"].then(anthropic_text(f"the {category} answer"))
    fakes["ollama"].then(ollama_answer(f"the {category} answer"))
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    env = {**os.environ, "OPENAI_BASE_URL": fakes["openai"].url + "/v1",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "OLLAMA_HOST": fakes["ollama"].url,
           "OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "PYTHONPATH": str(ROOT)}
    customer = json.dumps({"name": "Ann", "plan": "enterprise"})
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(ROUTER),
                        "-i", "ticket=I was charged twice", "-i", f"customer={customer}",
                        "--config", "flowc.yaml", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded"
    assert out["output"] == {"category": category, "reply": (
        f"Hi Ann,\n\nthe {category} answer\n\nFiled under {category}, with priority "
        "support.\n")}
    steps = {s["id"]: s for s in out["metrics"]["steps"]}
    ran = {sid for sid, s in steps.items() if s["status"] == "done"}
    assert ran == {"classify", answering, "route", "reply"}
    for sid, _ in CASES.values():
        if sid != answering:
            assert steps[sid]["skip_reason"].endswith("of switch 'route' was not taken")
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "costs", "--json", "--sql",
                        "SELECT step_id, provider, success FROM requests WHERE run_id = "
                        f"'{out['run_id']}' ORDER BY step_id"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    rows = json.loads(r.stdout)
    assert sorted((row["step_id"], row["provider"], row["success"]) for row in rows) == \
        sorted([("classify", "openai", True), (answering, provider, True)])
