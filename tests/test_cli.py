"""`flowc check`, `flowc graph` and `flowc schema` as a user runs them (a real subprocess)."""

import html
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.tools import require

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
BAD = """\
name: bad
steps:
  - id: a
    type: llm
    model: gpt-4o
    promt: hello
  - id: b
    type: llm
    model: gpt-4o
    prompt: ${nothing}
output: ${b}
"""
WARN = """\
name: warn
steps:
  - {id: a, type: llm, model: gpt-4o, prompt: one, output: first}
  - {id: b, type: llm, model: gpt-4o, prompt: two}
output: ${b}
"""


def flowc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flowc.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.fixture
def bad(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    return p


def test_every_example_pipeline_passes_strict_check():
    r = flowc("check", "--strict", PIPELINES, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    files = len(list(PIPELINES.glob("*.yaml")))
    assert files >= 5
    assert f"All checks passed ({files} files)." in r.stdout


def test_check_reports_every_finding_with_position_source_and_help(bad):
    r = flowc("check", bad, cwd=bad.parent)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{bad}:6:5: error: unknown step field 'promt'; did you mean 'prompt'? [unknown-field]",
        "   6 |     promt: hello",
        "     |     ^~~~~",
        f"{bad}:10:13: error: undefined reference 'nothing': no step produces it "
        "[undefined-reference]",
        "  10 |     prompt: ${nothing}",
        "     |             ^~~~~~~~~~",
    ]
    assert "Found 2 errors in 1 file." in r.stderr


def test_warnings_pass_unless_strict(tmp_path):
    p = tmp_path / "warn.yaml"
    p.write_text(WARN)
    r = flowc("check", p, cwd=tmp_path)
    assert r.returncode == 0 and "[unused-output]" in r.stdout
    assert flowc("check", "--strict", p, cwd=tmp_path).returncode == 1
    quiet = flowc("check", "--strict", "--ignore", "unused-output,unused-step", p, cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.startswith("All checks passed")


def test_usage_errors_exit_2(tmp_path):
    assert flowc("check", tmp_path / "missing.yaml").returncode == 2
    assert flowc("check").returncode == 2
    r = flowc("check", "--ignore", "no-such-rule", PIPELINES)
    assert r.returncode == 2 and "unknown rule(s): no-such-rule" in r.stderr
    assert flowc("check", "--format", "xml", PIPELINES).returncode == 2


def test_json_format(bad):
    r = flowc("check", "--format", "json", bad, cwd=bad.parent)
    found = json.loads(r.stdout)
    assert [(d["line"], d["column"], d["rule"], d["severity"]) for d in found] == [
        (6, 5, "unknown-field", "error"), (10, 13, "undefined-reference", "error")]
    assert found[0]["end_column"] == 10


def test_github_format_is_workflow_annotations(bad):
    r = flowc("check", "--format", "github", bad, cwd=bad.parent)
    first = r.stdout.splitlines()[0]
    assert first == (f"::error file={bad},line=6,col=5,endLine=6,endColumn=10,"
                     "title=unknown-field::unknown step field 'promt'; did you mean 'prompt'?")


def test_sarif_format(bad):
    r = flowc("check", "--format", "sarif", bad, cwd=bad.parent)
    doc = json.loads(r.stdout)
    assert doc["version"] == "2.1.0"
    run = doc["runs"][0]
    rules = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    res = run["results"][0]
    assert rules[res["ruleIndex"]] == res["ruleId"] == "unknown-field"
    assert res["locations"][0]["physicalLocation"]["region"] == {
        "startLine": 6, "startColumn": 5, "endLine": 6, "endColumn": 10}


def test_folders_are_searched_and_config_errors_reported(tmp_path):
    (tmp_path / "flowc.yaml").write_text("modles: {}\n")
    sub = tmp_path / "pipes"
    sub.mkdir()
    (sub / "w.yml").write_text(WARN)
    r = flowc("check", tmp_path, cwd=tmp_path)
    assert r.returncode == 1
    assert f"{tmp_path / 'flowc.yaml'}:1:1: error: unknown config field 'modles'; " \
           "did you mean 'models'? [unknown-field]" in r.stdout
    col = WARN.splitlines()[2].index("first") + 1
    assert f"w.yml:3:{col}: warning: output 'first' of step 'a' is never used" in r.stdout


def test_graph_writes_dot_with_labels(tmp_path):
    out = tmp_path / "triage.dot"
    r = flowc("graph", PIPELINES / "support-triage.yaml", "-o", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    dot = out.read_text()
    # one edge per pair of steps, bold when the consumer's condition reads it; the step
    # shows its condition and the inputs it reads
    assert 'classify -> deep [label=classify color="#b45309"' in dot
    assert dot.count("classify -> deep") == 1
    assert '__input__ -> classify [label="input.ticket"]' in dot
    assert ('deep [label="deep\n[llm] smart\n→ deep_answer\nwhen ${input.depth} > 2 and '
            '${classify.label} == \\"technical\\"\nreads input.depth, input.ticket\n'
            '(may be skipped)"') in dot
    assert dot.count("__input__ ->") == 1  # not fanned out to every step that reads it
    assert 'style="rounded,filled,dashed"' in dot
    assert "__output__ [label=output" in dot
    assert "deep -> __output__ [label=deep_answer]" in dot


def test_graph_of_a_large_pipeline_keeps_the_input_fan_out_out_of_the_layout(tmp_path):
    """Edges from the input node to many steps deep in the graph made `dot` run for minutes
    on 200 steps; past a few, the steps list the inputs they read instead."""
    require("dot")
    steps = "".join(f"  - {{id: t{i}, type: llm, model: gpt-4o, prompt: '${{input.q}}'}}\n"
                    f"  - {{id: s{i}, type: llm, model: gpt-4o, prompt: "
                    f"'${{t{i}}} ${{s{i - 1}}}'}}\n".replace(" ${s-1}", "")
                    for i in range(150))
    (tmp_path / "big.yaml").write_text(
        f"name: big\ninputs:\n  q: {{type: string}}\nsteps:\n{steps}output: ${{s149}}\n")
    r = flowc("graph", "big.yaml", "-o", "big.dot", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dot = (tmp_path / "big.dot").read_text()
    assert "__input__ ->" not in dot and 't7 [label="t7\n[llm] gpt-4o\nreads input.q"' in dot
    r = flowc("graph", "big.yaml", "-o", "big.svg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "<svg" in (tmp_path / "big.svg").read_text()


def test_graph_renders_svg_with_graphviz(tmp_path):
    require("dot")
    out = tmp_path / "research.svg"
    r = flowc("graph", PIPELINES / "research.yaml", "-o", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    svg = html.unescape(out.read_text())
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for text in ("search", "summarize", "report", "brave-search.web_search",
                 "claude-sonnet-4-6", "search_results", "final_report"):
        assert text in svg


def test_graph_refuses_a_pipeline_with_errors(bad):
    r = flowc("graph", bad, "-o", bad.with_suffix(".svg"))
    assert r.returncode == 1 and "[unknown-field]" in r.stderr
    assert not bad.with_suffix(".svg").exists()


def test_schema_validates_the_example_pipelines():
    r = flowc("schema")
    schema = json.loads(r.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for p in PIPELINES.glob("*.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(p.read_text()))), p
    assert list(validator.iter_errors(yaml.safe_load(BAD)))  # promt is not allowed


def test_config_schema_validates_the_project_config():
    schema = json.loads(flowc("schema", "--config").stdout)
    errors = jsonschema.Draft202012Validator(schema).iter_errors(
        yaml.safe_load((ROOT / "flowc.yaml").read_text()))
    assert not list(errors)


def _imported_by_check(module: str) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "check",
                        PIPELINES / "research.yaml"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"flowc.compiler", "flowc.config", "yaml"} <= imported  # the list is complete
    return {m.split(".")[0] for m in imported}


def test_check_imports_neither_the_runtime_nor_networkx():
    """`flowc check` starts fast: the compiler never imports the runtime, and checking needs
    neither networkx (the runtime's graph, built only when asked for) nor asyncio, through
    the compiler's CLI or the full `flowc` command (runtime.cli, the installed script's)."""
    assert not _imported_by_check("flowc.cli") & {"runtime", "networkx", "asyncio"}
    assert not _imported_by_check("runtime.cli") & {"networkx", "asyncio"}


def test_a_crash_inside_the_checker_exits_3_not_1(tmp_path):
    """CI must tell "flowc found problems" (1) from "flowc itself failed" (3). No input
    should crash the checker, so the crash is forced here, in the real command."""
    (tmp_path / "ok.yaml").write_text(WARN)
    boom = ("import flowc.cli as c\n"
            "def boom(*a, **k): raise RuntimeError('simulated bug')\n"
            "c.compile_file = boom\n"
            "c.main()\n")
    r = subprocess.run([sys.executable, "-c", boom, "check", "ok.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "ok.yaml: internal error: RuntimeError: simulated bug" in r.stderr
    assert "bug in flowc" in r.stderr and "All checks passed" not in r.stdout + r.stderr


def test_a_schema_that_is_not_json_schema_is_a_finding(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: p\nsteps:\n  - id: a\n    type: llm\n    model: gpt-4o\n    prompt: hi\n"
        "    response_format:\n      schema: {type: object, properties: {l: {enum: 5}}}\n"
        "output: ${a}\n")
    r = flowc("check", "p.yaml", cwd=tmp_path)
    assert r.returncode == 1
    assert ("p.yaml:8:15: error: invalid 'response_format.schema': not a valid JSON Schema: "
            "schema.properties.l.enum: 5 is not of type 'array' [invalid-value]") in r.stdout


def test_a_huge_number_in_a_condition_is_a_finding_and_long_lines_are_cut(tmp_path):
    digits = "9" * 5000
    (tmp_path / "p.yaml").write_text(
        "name: p\ninputs:\n  n: {type: integer}\nsteps:\n  - id: a\n    type: llm\n"
        f"    model: gpt-4o\n    when: ${{input.n}} > {digits}\n    prompt: hi\n"
        "output: ${a ?? ''}\n")
    r = flowc("check", "p.yaml", cwd=tmp_path)
    assert r.returncode == 1
    assert ("p.yaml:8:24: error: invalid condition: number literal is too long "
            "(5000 characters; at most 100) [condition-syntax]") in r.stdout
    excerpt = next(line for line in r.stdout.splitlines() if line.startswith("   8 | "))
    caret = r.stdout.splitlines()[r.stdout.splitlines().index(excerpt) + 1]
    assert len(excerpt) < 200 and excerpt.endswith("...")
    assert excerpt[caret.index("^")] == "9" and excerpt[caret.index("^") - 2] == ">"


def test_encoding_and_yaml_mistakes_are_named_where_they_are(tmp_path):
    body = "name: x\nsteps:\n  - id: a\n    type: llm\n    model: gpt-4o\n"
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + (body + "    promt: hi\n").encode())
    (tmp_path / "latin1.yaml").write_bytes((body + "    prompt: caf\xe9\n").encode("latin-1"))
    (tmp_path / "colon.yaml").write_text(body + "    prompt: Answer this: now\n")
    r = flowc("check", "bom.yaml", "latin1.yaml", "colon.yaml", cwd=tmp_path)
    assert r.returncode == 1
    # a byte order mark does not shift columns
    assert "bom.yaml:6:5: error: unknown step field 'promt'" in r.stdout
    assert "latin1.yaml:6:16: error: the file is not valid UTF-8 (byte 0xe9) [yaml-syntax]" \
        in r.stdout
    assert "colon.yaml:6:24: error: YAML syntax error: mapping values are not allowed" in r.stdout
    assert "help: a value with ': ' in it must be quoted" in r.stdout
