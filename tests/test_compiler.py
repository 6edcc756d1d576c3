"""The compiler's API: the compiled DAG, project config, positions, and never crashing."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_file, compile_source
from flowc import types as T
from flowc.config import ProjectConfig, ToolCatalog

ROOT = Path(__file__).resolve().parent.parent
RESEARCH = ROOT / "pipelines" / "research.yaml"


def test_research_example_compiles_to_a_typed_dag():
    result = compile_file(RESEARCH)
    assert result.ok, result.diagnostics
    c = result.compiled
    assert c.name == "research-assistant"
    assert c.order == ("search", "summarize", "report")
    g = c.graph
    assert isinstance(g, nx.DiGraph)
    assert set(g.edges) == {("search", "summarize"), ("summarize", "report")}
    assert g.edges["search", "summarize"]["vars"] == ["search_results"]
    assert g.edges["summarize", "report"]["vars"] == ["summary"]
    report = c.node("report")
    assert report.step.model == "claude-sonnet-4-6"
    assert report.reads == ("summary",)
    assert report.output_type == T.STRING
    assert c.node("search").step.params == {"query": "${input.topic}", "count": 5}


def test_research_example_is_accepted_unchanged_without_a_project_config():
    result = compile_source(RESEARCH.read_text(), "research.yaml", Project())
    assert result.ok and result.diagnostics == []


def test_structured_output_fields_are_typed():
    src = textwrap.dedent("""\
        name: typed
        steps:
          - id: classify
            type: llm
            model: gpt-4o-mini
            prompt: classify
            response_format:
              schema:
                type: object
                properties:
                  label: {type: string}
                  scores: {type: array, items: {type: number}, minItems: 1}
                required: [label, scores]
          - id: use
            type: llm
            model: gpt-4o-mini
            when: ${classify.scores[0]} > 0.5
            prompt: ${classify.label}
        output: ${use ?? classify.label}
        """)
    result = compile_source(src, "typed.yaml")
    assert result.ok, result.diagnostics
    c = result.compiled
    assert c.node("classify").output_type.field("label") == T.STRING
    assert c.graph.edges["classify", "use"]["conditions"] == ["classify"]
    assert c.node("use").runs == "maybe"


def test_a_field_the_schema_does_not_require_is_a_maybe_missing_read():
    """A model may leave out a field its schema does not require, or send null where the
    schema allows it (null reads as missing): reading it needs a fallback, like a value
    whose step may be skipped."""
    src = textwrap.dedent("""\
        name: optional
        steps:
          - id: extract
            type: llm
            model: gpt-4o-mini
            prompt: extract
            response_format:
              schema:
                type: object
                properties:
                  vendor: {type: string}
                  note: {type: [string, "null"]}
                  total: {type: object, properties: {amount: {type: number}}}
                required: [vendor, total, note]
          - id: use
            type: llm
            model: gpt-4o-mini
            when: ${extract.total.amount} > 0
            prompt: ${extract.vendor} ${extract.note ?? "no note"} ${extract.note}
        output: ${use ?? extract.vendor}
        """)
    result = compile_source(src, "optional.yaml")
    assert [(d.rule, d.line, d.col, d.message) for d in result.diagnostics] == [
        ("maybe-skipped", 18, 11, "'extract.total.amount' may be missing when step 'use' "
         "reads it: field 'amount' may be null or left out (its schema allows null, or does "
         "not list it in `required`)"),
        ("maybe-skipped", 19, 60, "'extract.note' may be missing when step 'use' reads it: "
         "field 'note' may be null or left out (its schema allows null, or does not list it "
         "in `required`)"),
    ]


def test_needs_orders_steps_that_share_no_data():
    src = textwrap.dedent("""\
        name: ordered
        steps:
          - {id: a, type: llm, model: gpt-4o, prompt: one}
          - {id: b, type: llm, model: gpt-4o, prompt: two, needs: [a]}
        output: {a: "${a}", b: "${b}"}
        """)
    c = compile_source(src, "o.yaml").compiled
    assert c.graph.edges["a", "b"]["order"] is True
    assert c.order == ("a", "b")


def test_model_names_are_only_checked_with_a_project_config():
    src = "name: m\nsteps:\n  - {id: a, type: llm, model: mystery, prompt: hi}\noutput: ${a}\n"
    assert compile_source(src, "m.yaml", Project()).ok
    config = ProjectConfig.model_validate({"models": {"local": "ollama/qwen2.5:7b"}})
    result = compile_source(src, "m.yaml", Project(config=config, catalog=ToolCatalog()))
    assert [d.rule for d in result.diagnostics] == ["unknown-model"]
    assert result.compiled is None


def test_provider_models_the_price_data_does_not_list_are_warnings():
    """`gpt-4o-minii` and `gpt-5-turbo-ultra` resolve (they look like OpenAI models) but no
    price list knows them: a warning at the name, unless flowc.yaml declares the model."""
    src = textwrap.dedent("""\
        name: m
        steps:
          - {id: a, type: llm, model: openai/gpt-4o-minii, prompt: hi}
          - {id: b, type: llm, model: gpt-5-turbo-ultra, prompt: "${a}"}
          - {id: c, type: llm, model: claude-sonnet-4-6, prompt: "${b}"}
          - {id: d, type: llm, model: fast, prompt: "${c}"}
          - {id: e, type: llm, model: openai/gpt-4o-mini, prompt: "${d}"}
        output: ${e}
        """)
    config = ProjectConfig.model_validate({"models": {"fast": "openai/gpt-4o-mini"}})
    result = compile_source(src, "m.yaml", Project(config=config, catalog=ToolCatalog()))
    found = [(d.rule, d.severity, d.line, d.message) for d in result.diagnostics]
    assert found == [
        ("unlisted-model", "warning", 3, "the price data lists no openai model 'gpt-4o-minii'"),
        ("unlisted-model", "warning", 4,
         "the price data lists no openai model 'gpt-5-turbo-ultra'")]
    assert result.compiled is not None
    declared = ProjectConfig.model_validate({
        "models": {"fast": "openai/gpt-4o-mini", "gpt-5-turbo-ultra": "openai/gpt-5-turbo-ultra"},
        "prices": {"openai/gpt-4o-minii": {"input": 1, "output": 2}}})
    result = compile_source(src, "m.yaml", Project(config=declared, catalog=ToolCatalog()))
    assert result.diagnostics == []


def test_the_price_data_is_read_from_a_cache_not_imported(tmp_path):
    """The library costs ~200 ms to import: after the first check, its model list comes from
    a cache file and `flowc check` never imports it."""
    code = ("import sys; from flowc.known_models import price_data_knows; "
            "print(price_data_knows('openai', 'gpt-4o-minii'), "
            "'genai_prices' in sys.modules)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.split() for _ in range(2)]
    assert runs == [["False", "True"], ["False", "False"]]
    assert len(list((tmp_path / "flowc").glob("known-models-genai-prices-*.json"))) == 1


def test_resolve_model_follows_aliases_and_bare_names():
    config = ProjectConfig.model_validate(
        {"models": {"fast": "local", "local": "ollama/qwen2.5:7b"},
         "providers": {"groq": {"base_url": "http://127.0.0.1:9/v1"}}})
    assert config.resolve_model("fast") == ("ollama", "qwen2.5:7b")
    assert config.resolve_model("gpt-4o-mini") == ("openai", "gpt-4o-mini")
    assert config.resolve_model("claude-sonnet-4-6") == ("anthropic", "claude-sonnet-4-6")
    assert config.resolve_model("groq/llama-3.1-8b") == ("groq", "llama-3.1-8b")
    assert config.resolve_model("nope/x") is None
    assert config.resolve_model("mystery") is None


def test_discovery_cache_supplies_tool_schemas(tmp_path):
    (tmp_path / "flowc.yaml").write_text("mcpServers:\n  time: {command: mcp-server-time}\n")
    (tmp_path / ".flowc").mkdir()
    (tmp_path / ".flowc" / "mcp-tools.json").write_text(
        '{"servers": {"time": {"ok": true, "tools": [{"name": "get_current_time", '
        '"inputSchema": {"type": "object", "properties": {"timezone": {"type": "string"}}, '
        '"required": ["timezone"]}}]}}}')
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent("""\
        name: t
        steps:
          - id: now
            type: mcp_tool
            server: time
            tool: get_current_time
            params: {timezone: 5}
        output: ${now}
        """))
    result = compile_file(pipeline)
    assert [(d.rule, d.line, d.col) for d in result.diagnostics] == [("tool-params", 7, 24)]
    assert "5 is not of type 'string'" in result.diagnostics[0].message


def test_every_step_calling_a_tool_gets_its_own_params_findings(tmp_path):
    """Validation results are shared between steps whose params have the same shape: each
    step must still get its own findings, at its own position."""
    (tmp_path / "flowc.yaml").write_text(textwrap.dedent("""\
        mcpServers:
          time:
            command: mcp-server-time
            tools:
              get_current_time:
                inputSchema:
                  type: object
                  properties: {timezone: {type: string}}
                  required: [timezone]
        """))
    steps = [("a", "{timezone: UTC}"), ("b", "{timezone: 5}"), ("c", "{timezone: UTC}"),
             ("d", "{timezone: 7}"), ("e", "{}")]
    body = "".join(f"  - id: {sid}\n    type: mcp_tool\n    server: time\n"
                   f"    tool: get_current_time\n    params: {params}\n"
                   for sid, params in steps)
    reads = " ".join("${" + sid + "}" for sid, _ in steps)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nsteps:\n{body}output: \"{reads}\"\n")
    result = compile_file(pipeline)
    assert [(d.rule, d.line, d.message.split(" (")[0]) for d in result.diagnostics] == [
        ("tool-params", 12, "params.timezone: 5 is not of type 'string'"),
        ("tool-params", 22, "params.timezone: 7 is not of type 'string'"),
        ("tool-params", 27, "params: 'timezone' is a required property"),
    ]


def test_references_in_block_scalars_point_at_their_own_line_and_column():
    src = textwrap.dedent("""\
        name: pos
        steps:
          - id: a
            type: llm
            model: gpt-4o
            prompt: |
              line one
                indented ${nope} here
          - id: b
            type: llm
            model: gpt-4o
            prompt: >-
              folded text with
              ${nope2}
        output: "${a} ${b}"
        """)
    diags = compile_source(src, "pos.yaml").diagnostics
    assert [(d.line, d.col, d.end_col) for d in diags] == [(8, 18, 25), (14, 7, 15)]


def test_config_errors_are_findings_on_flowc_yaml(tmp_path):
    cfg = tmp_path / "flowc.yaml"
    cfg.write_text("models:\n  local: ollama/x\nmcpServer:\n  time: {command: t}\n"
                   "providers:\n  groq: {base_ur: http://x}\n")
    project = Project.load(cfg)
    assert [(d.rule, d.line, d.message) for d in project.diagnostics] == [
        ("unknown-field", 3, "unknown config field 'mcpServer'; did you mean 'mcpServers'?"),
        ("unknown-field", 6, "unknown config field 'base_ur'; did you mean 'base_url'?"),
    ]


# -- never crash -------------------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)
step_keys = st.sampled_from(["id", "type", "model", "prompt", "output", "when", "needs",
                             "server", "tool", "params", "response_format", "tools",
                             "on_missing", "timeout", "system", "promt"])
ref_text = st.sampled_from(["${a}", "${input.x}", "${b.c[0]}", "${a ?? b}", "${", "x > 1",
                            "${a} == 'x'", "{{ a }}", "{% for %}", "a", "b", "llm",
                            "mcp_tool", "gpt-4o"])
steps = st.lists(st.dictionaries(step_keys, st.one_of(ref_text, json_values), max_size=7),
                 max_size=5)
documents = st.fixed_dictionaries(
    {"name": st.one_of(st.just("p"), json_values), "steps": st.one_of(steps, json_values)},
    optional={"output": st.one_of(ref_text, json_values), "inputs": json_values,
              "extra": json_values})


@given(documents)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compiler_never_crashes_on_any_document(doc):
    text = yaml.safe_dump(doc, allow_unicode=True)
    result = compile_source(text, "fuzz.yaml")
    lines = text.count("\n") + 1
    for d in result.diagnostics:
        assert 1 <= d.line <= lines and d.col >= 1
    assert (result.compiled is None) == bool(result.errors)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_compiler_never_crashes_on_any_text(text):
    result = compile_source(text, "fuzz.yaml")
    assert result.compiled is None or not result.errors


def test_a_named_provider_without_a_url_is_a_config_error(tmp_path):
    cfg = tmp_path / "flowc.yaml"
    cfg.write_text("providers:\n  groq: {api_key_env: GROQ_API_KEY}\n")
    project = Project.load(cfg)
    assert project.config is None
    assert [(d.rule, d.message) for d in project.diagnostics] == [
        ("invalid-value", "invalid value: provider 'groq' needs a base_url (only openai, "
                          "anthropic, ollama have a default)")]


def test_a_misspelt_field_does_not_add_a_false_unused_step_warning():
    """Step b's `promt` read ${a}; with the field unknown nothing is known of what b reads,
    so calling a unused would be a guess (and a wrong one)."""
    src = textwrap.dedent("""\
        name: t
        steps:
          - {id: a, type: llm, model: gpt-4o, prompt: hi}
          - {id: b, type: llm, model: gpt-4o, promt: "${a}"}
          - {id: c, type: llm, model: gpt-4o, prompt: "${b}"}
        output: ${c}
        """)
    result = compile_source(src, "t.yaml")
    assert [d.rule for d in result.diagnostics] == ["unknown-field"]


def test_a_tool_whose_output_schema_wraps_a_plain_value_is_typed_as_the_value(tmp_path):
    """The MCP SDKs send a plain return value as {"result": value} and declare that wrapper
    as the output schema; the step's result is the value (the runtime unwraps it too)."""
    (tmp_path / "flowc.yaml").write_text("mcpServers:\n  s: {command: search-server}\n")
    (tmp_path / ".flowc").mkdir()
    (tmp_path / ".flowc" / "mcp-tools.json").write_text(json.dumps({"servers": {"s": {
        "ok": True, "tools": [{"name": "count", "inputSchema": {"type": "object"},
                               "outputSchema": {"type": "object", "title": "countOutput",
                                                "properties": {"result": {"type": "integer"}},
                                                "required": ["result"]}}]}}}))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent("""\
        name: t
        steps:
          - {id: n, type: mcp_tool, server: s, tool: count}
          - {id: a, type: llm, model: gpt-4o, prompt: "${n.result}", when: "${n} > 2"}
        output: ${a ?? n}
        """))
    result = compile_file(pipeline)
    assert [(d.rule, d.message) for d in result.diagnostics] == [
        ("unknown-field-path", "'n' is an integer: it has no field 'result'")]


def test_an_if_else_pair_that_may_both_skip_for_a_missing_read_is_no_join():
    """`when: C` / `when: not (C)` join only when exactly one branch runs: with
    `on_missing: skip` and C reading a maybe-missing value, both may skip."""
    src = textwrap.dedent("""\
        name: m1
        inputs:
          depth: {type: integer}
        steps:
          - id: a
            type: llm
            model: gpt-4o
            when: ${input.depth} > 1
            prompt: classify
          - {id: vip, type: llm, model: gpt-4o, on_missing: skip, when: '${a} == "vip"',
             prompt: vip}
          - {id: normal, type: llm, model: gpt-4o, on_missing: skip,
             when: 'not (${a} == "vip")', prompt: normal}
        output: ${vip ?? normal}
        """)
    result = compile_source(src, "m1.yaml")
    assert [(d.rule, d.line) for d in result.diagnostics] == [("maybe-skipped", 14)]
    assert "step 'vip' may be skipped (it has a `when:` condition and reads 'a', which " \
           "may be missing)" in result.diagnostics[0].message
    fixed = compile_source(src.replace("${vip ?? normal}", "${vip ?? normal ?? a ?? ''}"))
    assert fixed.ok, fixed.diagnostics


def test_a_misspelt_name_of_a_step_with_errors_of_its_own_still_gets_a_suggestion():
    """Step `summary` has a bad value; a typo of its name (in a reference or in `needs`)
    is still told which name was meant, and naming it correctly is no second finding."""
    src = textwrap.dedent("""\
        name: t
        steps:
          - {id: summary, type: llm, model: gpt-4o, prompt: hi, temperature: hot}
          - {id: use, type: llm, model: gpt-4o, prompt: "${sumary}", needs: [sumary]}
          - {id: after, type: llm, model: gpt-4o, prompt: "${summary}", needs: [summary]}
          - {id: route, type: switch, value: "${use}", cases: {a: sumary, b: summary}}
        output: ${use}
        """)
    result = compile_source(src, "t.yaml")
    assert [(d.rule, d.line, d.message) for d in result.diagnostics] == [
        ("invalid-value", 3, "invalid 'temperature': Input should be a valid number, "
                             "unable to parse string as a number"),
        ("undefined-reference", 4,
         "undefined reference 'sumary': no step produces it; did you mean 'summary'?"),
        ("unknown-step", 4, "`needs` names unknown step 'sumary'; did you mean 'summary'?"),
        ("switch-case", 6, "case \"a\" of switch 'route' runs unknown step 'sumary'; "
                           "did you mean 'summary'?")]
