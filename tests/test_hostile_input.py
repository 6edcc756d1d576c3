"""Hostile input: pipelines written to exhaust flowc, through the paths a user or an attacker
reaches (a real `flowc serve`, the real `flowc check` and `flowc run`).

- Jinja in prompts: loops, amplifying operators and filters, recursion and sheer time are
  bounded (docs/dsl.md "Limits"); rendering never blocks the gateway's event loop, and a
  step's `timeout:` stops it.
- YAML: aliases that expand to billions of values, aliases inside themselves and absurdly
  deep nesting are diagnostics at the offending alias or collection (rules `yaml-alias`,
  `yaml-nesting`), not minutes of CPU, gigabytes or a crash.

Subprocesses run under an address-space limit, so a regression fails instead of eating the
machine.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flowc import Project, compile_source
from flowc import source as yaml_source
from flowc.expr import MISSING
from flowc.source import SourceFile, YamlError, load_yaml
from flowc.template import TemplateLimitError, TemplateLimits, parse_template, render

ROOT = Path(__file__).resolve().parent.parent
MEMORY = 1536 << 20  # bytes of address space a CLI subprocess may use


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `flowc` command, under an address-space limit (and a generous timeout,
    only so a hung process cannot hang the suite)."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, preexec_fn=_bounded)


# -- Jinja ----------------------------------------------------------------------------------
def render_text(text: str, values: dict[str, Any] | None = None, **limits: Any) -> str:
    values = values or {}
    return render(parse_template(text), lambda n: values.get(n, MISSING), values,
                  limits=TemplateLimits(**limits))


NESTED_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}"
                "{% endfor %}{% endfor %}")
SILENT_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                "{% endfor %}{% endfor %}done")
# Exponentially many macro calls, each cheap and under every size limit: only time ends it.
SLOW = ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
        "{% endmacro %}{{ f(0) }}")

ATTACKS = {
    "nested range loops": (NESTED_LOOPS, "loop iteration"),
    "nested loops without output": (SILENT_LOOPS, "loop iteration"),
    "a huge range": ("{% for i in range(10**20) %}{% endfor %}", "loop iteration"),
    "loops over a list": ("{% set l = range(1000)|list %}{% for a in l %}{% for b in l %}"
                          "{% endfor %}{% endfor %}", "loop iteration"),
    "string times a billion": ("{{ 'a' * 10**9 }}", "value size"),
    "string times a billion, kept": ("{% set x = 'a' * 10**9 %}ok", "value size"),
    "list times a billion": ("{{ ([1] * 10**9)|length }}", "value size"),
    "power": ("{{ 7 ** 100000000 }}", "integer size"),
    "repeated squaring": ("{% set ns = namespace(x=3) %}{% for i in range(64) %}"
                          "{% set ns.x = ns.x * ns.x %}{% endfor %}", "integer size"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "value size"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                        "{% set ns.s = ns.s + ns.s %}{% endfor %}", "value size"),
    "replace of replace": ("{% set a = 'a' * 1000 %}{% set b = a|replace('a', a) %}"
                           "{{ b|replace('a', a) }}", "value size"),
    "str.replace": ("{% set a = 'a' * 1000 %}{{ a.replace('a', a).replace('a', a) }}",
                    "value size"),
    "center filter": ("{{ 'x'|center(10**9) }}", "value size"),
    "str.ljust": ("{{ 'x'.ljust(10**9) }}", "value size"),
    "% width": ("{{ '%1000000000s' % 'x' }}", "value size"),
    "format filter width": ("{{ '%1000000000s'|format('x') }}", "value size"),
    "str.format width from an argument": ("{{ '{:>{}}'.format('x', 10**9) }}", "value size"),
    "str.format repeating a field": ("{% set a = 'a' * 100000 %}{{ ('{0}' * 100000)"
                                     ".format(a) }}", "value size"),
    "join with a long separator": ("{{ range(100000)|join('a' * 100000) }}", "value size"),
    "str.translate": ("{% set a = 'a' * 100000 %}{{ a.translate({97: a}) }}", "value size"),
    "a list of a shared list": ("{% set a = ['x' * 1000] * 1000 %}{{ [a] * 1000 }}",
                                "output size"),
    "a set block written in a loop": ("{% set x %}{% for i in range(100000) %}"
                                      "{{ 'y' * 100000 }}{% endfor %}{% endset %}",
                                      "output size"),
    "literal text in a loop": ("{% for i in range(100000) %}" + "z" * 100 + "{% endfor %}",
                               "output size"),
    "batch padding": ("{{ [1]|batch(10**9, 0)|list|length }}", "value size"),
    "tojson indent": ("{{ (range(10000)|list)|tojson(indent=100000) }}", "value size"),
    "lipsum": ("{{ lipsum(10**8) }}", "value size"),
    "self-recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                             "recursion depth"),
    "recursive loop over itself": ("{% set ns = namespace() %}{% set ns.x = ns %}"
                                   "{% for a in [ns] recursive %}{{ loop([a.x, a.x]) }}"
                                   "{% endfor %}", "recursion depth"),
    "exponential macro calls": (SLOW, "render time"),
}


@pytest.mark.parametrize("text,kind", ATTACKS.values(), ids=ATTACKS.keys())
def test_an_amplifying_template_stops_at_its_limit(text, kind):
    with pytest.raises(TemplateLimitError) as caught:
        render_text(text, max_seconds=0.5)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(f"exceeded the {kind} limit")
    assert "(limit " in str(caught.value)


LEGIT = {
    "loop with filters": ("{% for it in items %}- {{ it.lang|upper }}: {{ it.text|trim }}"
                          " ({{ loop.index }}/{{ loop.length }})\n{% endfor %}"),
    "join, map, default": "{{ items|map(attribute='lang')|join(', ') }} {{ x|default('none') }}",
    "arithmetic": "{{ 3 * 4 }} {{ 2 ** 10 }} {{ 7 + 8 }} {{ 10 % 3 }} {{ 'ab' * 3 }} "
                  "{{ [1] + [2] }} {{ 'a' ~ 1 ~ none }}",
    "formatting": "{{ '%-6s|%3d' % ('ab', 5) }} {{ '{:>8}|{}'.format('x', 2) }} "
                  "{{ '%s and %s'|format('a', 'b') }} {{ '{a}'.format_map({'a': 1}) }}",
    "string methods": "{{ 'x'.center(9, '*') }} {{ 'a-b'.replace('-', '+') }} "
                      "{{ ','.join(['a', 'b']) }} {{ '7'.zfill(3) }}",
    "filters that build text": "{{ 'a b c'|wordwrap(2) }}|{{ 'l1\nl2'|indent(2, true) }}|"
                               "{{ 'x'|center(5) }}|{{ items[0]|tojson }}|"
                               "{{ range(5)|batch(2, 0)|list }}|{{ [[1], [2]]|sum(start=[]) }}",
    "macro and call block": ("{% macro row(a, b) %}[{{ a }}={{ b }}]{% endmacro %}"
                             "{% macro wrap() %}<{{ caller() }}>{% endmacro %}"
                             "{% for k in ['p', 'q'] %}{{ row(k, loop.index) }}"
                             "{% call wrap() %}!{% endcall %}{% endfor %}"),
    "recursive loop": ("{% for n in tree recursive %}<{{ n.name }}{% if n.kids %}"
                       "{{ loop(n.kids) }}{% endif %}>{% endfor %}"),
    "set blocks and namespace": ("{% set ns = namespace(total=0) %}{% for i in range(10) %}"
                                 "{% set ns.total = ns.total + i %}{% endfor %}"
                                 "{% set block %}sum={{ ns.total }}{% endset %}{{ block }}"),
    "whitespace control": "{%- for i in range(3) -%}\n  {{ i }}\n{%- endfor %}\n",
}
VALUES = {
    "items": [{"lang": "fr", "text": " bonjour "}, {"lang": "de", "text": "hallo "}],
    "tree": [{"name": "a", "kids": [{"name": "b", "kids": []}, {"name": "c", "kids": []}]}],
    "x": None,
}


@pytest.mark.parametrize("text", LEGIT.values(), ids=LEGIT.keys())
def test_a_template_within_its_limits_renders_as_jinja_does(text):
    plain = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                          keep_trailing_newline=True)
    assert render_text(text, VALUES) == plain.from_string(text).render(VALUES)


@settings(max_examples=60, deadline=None)
@given(outer=st.integers(0, 60), inner=st.integers(0, 60), budget=st.integers(1, 2000))
def test_every_loop_iteration_counts_against_the_limit(outer, inner, budget):
    text = "{% for i in range(" + str(outer) + ") %}{% for j in range(" + str(inner) + \
           ") %}x{% endfor %}{% endfor %}"
    iterations = outer + outer * inner
    if iterations <= budget:
        assert render_text(text, max_iterations=budget) == "x" * (outer * inner)
    else:
        with pytest.raises(TemplateLimitError,
                           match=rf"loop iteration limit.*\(limit {budget} iterations\)$"):
            render_text(text, max_iterations=budget)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), budget=st.integers(1, 4000))
def test_output_and_values_are_bounded_exactly(n, budget):
    if n <= budget:
        assert render_text("{{ 'y' * " + str(n) + " }}", max_output=budget) == "y" * n
        return
    with pytest.raises(TemplateLimitError) as caught:
        render_text("{{ 'y' * " + str(n) + " }}", max_output=budget)
    assert caught.value.kind == "value size" and caught.value.limit == budget


# -- the runtime: `flowc serve` and `flowc run` ------------------------------------------------
def _yaml_prompt(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def hostile(name: str, prompt: str, timeout: float | None = None, probe: bool = False) -> str:
    """A pipeline whose step `x` has ``prompt``. With ``probe``, two more steps run beside
    `x` (declared first, so they start first): `b` calls the model, then `c` calls it with
    `b`'s answer. `c`'s call can only be made if the event loop is free while `x` renders."""
    lines = [f"name: {name}", "steps:"]
    if probe:
        lines += ["  - {id: b, type: llm, model: gpt-4o-mini, prompt: probe}",
                  "  - {id: c, type: llm, model: gpt-4o-mini, prompt: '${b} again'}"]
    lines += ["  - id: x", "    type: llm", "    model: gpt-4o-mini",
              f"    prompt: {_yaml_prompt(prompt)}"]
    if timeout is not None:
        lines.append(f"    timeout: {timeout}")
    return "\n".join(lines) + "\n"


def run_while_polling_health(gw: Any, name: str, body: dict[str, Any]
                             ) -> tuple[dict[str, Any], int]:
    """Run ``name`` and GET /health until the run answers; returns the run's answer and how
    many /health answers arrived after the provider saw two calls and before the run
    answered."""
    answer: dict[str, Any] = {}

    def post() -> None:
        r = httpx.post(f"{gw.url}/v1/workflow/{name}", json=body, timeout=120)
        answer["status"], answer["body"] = r.status_code, r.json()

    thread = threading.Thread(target=post)
    thread.start()
    during = 0
    with httpx.Client(timeout=60) as client:
        while thread.is_alive():
            probed = len(gw.openai.requests) >= 2
            ok = client.get(f"{gw.url}/health").status_code == 200
            if ok and probed and thread.is_alive():
                during += 1
    thread.join()
    assert answer["status"] == 200, answer
    return answer["body"], during


def register(url: str, name: str, text: str) -> None:
    r = httpx.put(f"{url}/v1/workflows/{name}", content=text,
                  headers={"content-type": "application/yaml"}, timeout=60)
    assert r.status_code == 200, r.text


def test_serve_a_looping_prompt_fails_its_step_and_the_gateway_keeps_answering(gw):
    register(gw.url, "hostile-loops", hostile("hostile-loops", NESTED_LOOPS))
    register(gw.url, "hostile-slow", hostile("hostile-slow", SLOW, probe=True))
    body, _ = run_while_polling_health(gw, "hostile-loops", {"dry_run": True})
    assert body["status"] == "failed"
    assert body["error"]["message"] == ("prompt template of step 'x' exceeded the loop "
                                        "iteration limit (limit 100000 iterations)")
    # A prompt that renders for its whole 2 s budget (it held the event loop 22 s): the
    # run's other steps go on meanwhile, one model call after another, and /health answers.
    body, during = run_while_polling_health(gw, "hostile-slow", {})
    assert body["status"] == "failed"
    assert body["error"]["message"] == ("prompt template of step 'x' exceeded the render "
                                        "time limit (limit 2 s)")
    assert [r.body["messages"][-1]["content"] for r in gw.openai.requests] == [
        "probe", "echo: probe again"]
    assert {s["id"]: s["status"] for s in body["metrics"]["steps"]}["c"] == "done"
    assert during >= 1


def test_serve_a_step_timeout_stops_a_rendering_prompt(gw):
    register(gw.url, "hostile-timeout", hostile("hostile-timeout", SLOW, 0.3))
    for _ in range(6):  # more runs than render threads: each timed-out render let its go
        body, _ = run_while_polling_health(gw, "hostile-timeout", {"dry_run": True})
        assert body["status"] == "failed"
        assert body["error"]["message"] == "timed out after 0.3 s"
    assert httpx.get(f"{gw.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("prompt,message", [
    (NESTED_LOOPS, "prompt template of step 'x' exceeded the loop iteration limit "
                   "(limit 100000 iterations)"),
    ("{{ 'a' * 10**9 }}", "prompt template of step 'x' exceeded the value size limit: `*` "
                          "would build 1000000000 characters (limit 1048576 characters)"),
    (SILENT_LOOPS, "prompt template of step 'x' exceeded the loop iteration limit "
                   "(limit 100000 iterations)"),
], ids=["nested loops", "amplification", "loops without output"])
def test_flowc_run_reports_a_template_past_its_limits(tmp_path, prompt, message):
    (tmp_path / "p.yaml").write_text(hostile("p", prompt))
    done = cli("run", "p.yaml", "--dry-run", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"failed at step 'x': {message}" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_flowc_run_step_timeout_holds_while_a_prompt_renders(tmp_path):
    (tmp_path / "p.yaml").write_text(hostile("p", SLOW, timeout=0.5))
    done = cli("run", "p.yaml", "--dry-run", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed at step 'x': timed out after 0.5 s" in done.stdout + done.stderr


def test_a_tool_params_template_is_bounded_too(tmp_path):
    (tmp_path / "flowc.yaml").write_text("mcpServers:\n  s: {command: unused}\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        name: p
        inputs: {x: {type: string, default: hi}}
        steps:
          - id: t
            type: mcp_tool
            server: s
            tool: echo
            params: {text: "${input.x} {{ 'a' * 10**9 }}"}
        """))
    done = cli("run", "p.yaml", "--dry-run", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("params template of step 't' exceeded the value size limit: `*` would build "
            "1000000000 characters") in done.stdout + done.stderr


# -- YAML ------------------------------------------------------------------------------------
def laughs(levels: int, width: int) -> str:
    """The billion-laughs file: each level an alias list of the one before."""
    lines = ["name: laughs", "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines += ["steps:", "  - id: x", "    type: llm", "    model: gpt-4o-mini",
              f"    prompt: *a{levels - 1}"]
    return "\n".join(lines) + "\n"


SMALL_BOMB = laughs(9, 9)  # 9**9 "lol"s
BIG_BOMB = laughs(12, 12)  # 12**12


@pytest.mark.parametrize("text,line,col", [(SMALL_BOMB, 7, 10), (BIG_BOMB, 6, 25)],
                         ids=["a few hundred bytes", "about 1 KB"])
def test_flowc_check_refuses_an_alias_bomb_at_the_alias(tmp_path, text, line, col):
    assert len(text) < 1200  # the files: 428 and 565 bytes
    (tmp_path / "bomb.yaml").write_text(text)
    done = cli("check", "bomb.yaml", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"bomb.yaml:{line}:{col}: error: aliases expand past the limit "
                            "of 100000 values: *a")
    assert first.endswith("[yaml-alias]")
    # the caret is under the alias
    assert text.splitlines()[line - 1][col - 1:].startswith("*a")


@pytest.mark.parametrize("text,rule,where", [
    ("name: r\nsteps: &a [*a]\n", "yaml-alias", "2:12"),
    ("name: r\nx: &a {k: [1, {j: *a}]}\nsteps: []\n", "yaml-alias", "2:19"),
    ("name: d\nsteps: []\nx: " + "[" * 100_000 + "]" * 100_000 + "\n", "yaml-nesting", "3:67"),
    ("name: d\nsteps: []\nx:\n" + "".join("  " * i + "- \n" for i in range(100)),
     "yaml-nesting", "67:127"),
    ("name: d\nsteps: []\nx: " + '["]", ' * 100_000 + "]" * 100_000 + "\n", "yaml-nesting",
     "3:382"),
], ids=["recursive alias", "recursive alias, nested", "deep flow nesting",
        "deep block nesting", "deep flow nesting with closing brackets in strings"])
def test_flowc_check_reports_a_recursive_alias_or_deep_nesting(tmp_path, text, rule, where):
    (tmp_path / "p.yaml").write_text(text)
    done = cli("check", "p.yaml", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith(f"p.yaml:{where}: error: ")
    assert done.stdout.splitlines()[0].endswith(f"[{rule}]")


def test_serve_refuses_an_alias_bomb_with_a_diagnostic_and_stays_healthy(gw):
    for text in (SMALL_BOMB, BIG_BOMB, "name: r\nsteps: &a [*a]\n"):
        r = httpx.put(f"{gw.url}/v1/workflows/laughs", content=text, timeout=120)
        assert r.status_code == 422, r.text
        (d,) = r.json()["error"]["diagnostics"]
        assert d["rule"] == "yaml-alias"
        assert text.splitlines()[d["line"] - 1][d["column"] - 1:].startswith("*a")
        assert httpx.get(f"{gw.url}/health", timeout=10).status_code == 200
    assert gw.proc.poll() is None
    register(gw.url, "laughs", "name: laughs\nsteps:\n  - {id: x, type: llm, "
                               "model: gpt-4o-mini, prompt: hi}\n")


DEFAULTS = """\
name: merged
steps:
  - id: a
    <<: &defaults
      type: llm
      model: gpt-4o-mini
      timeout: 30
      retries: 2
    prompt: &shared "Answer briefly."
  - id: b
    <<: *defaults
    retries: 0
    prompt: "${a} again"
  - {<<: *defaults, id: c, prompt: *shared}
output: {b: "${b}", c: "${c}"}
"""


def test_anchors_aliases_and_merge_keys_keep_working():
    result = compile_source(DEFAULTS, "merged.yaml", Project())
    assert result.diagnostics == [] and result.compiled is not None
    steps = {s.id: s for s in result.compiled.pipeline.steps}
    assert (steps["b"].model, steps["b"].timeout, steps["b"].retries) == ("gpt-4o-mini", 30, 0)
    assert (steps["c"].retries, steps["c"].prompt) == (2, "Answer briefly.")
    source = SourceFile("merged.yaml", DEFAULTS)
    assert load_yaml(source) == yaml.safe_load(DEFAULTS)
    # a merged value points at the anchor's text, a step's own value at its own line
    assert source.position(source.span_of(("steps", 1, "model")).start).line == 6
    assert source.position(source.span_of(("steps", 1, "retries")).start).line == 12


@st.composite
def alias_documents(draw: st.DrawFn) -> str:
    """Anchored flow collections whose items are scalars or aliases to earlier anchors, and
    mappings that merge earlier mappings (`<<`)."""
    scalars = st.sampled_from(["lol", "1", "2.5", "true", "null", "'q'", '"x y"', "~"])
    n = draw(st.integers(1, 7))
    lines, maps = [], []
    for i in range(n):
        earlier = st.sampled_from([f"*a{j}" for j in range(i)]) if i else scalars
        items = draw(st.lists(st.one_of(scalars, earlier), max_size=7))
        if draw(st.booleans()):
            pairs = [f"k{k}: {v}" for k, v in enumerate(items)]
            if maps and draw(st.booleans()):
                pairs.insert(draw(st.integers(0, len(pairs))),
                             f"<<: *a{draw(st.sampled_from(maps))}")
            lines.append(f"a{i}: &a{i} {{{', '.join(pairs)}}}")
            maps.append(i)
        else:
            lines.append(f"a{i}: &a{i} [{', '.join(items)}]")
    lines.append(f"top: [{', '.join(f'*a{i}' for i in range(n))}]")
    return "\n".join(lines) + "\n"


def _expansion(text: str) -> tuple[int, int]:
    """Values and characters that aliases add, from PyYAML's own node graph (where an alias
    is the anchor's node, shared): the fully expanded tree minus the nodes written."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    memo: dict[int, tuple[int, int]] = {}
    seen: dict[int, tuple[int, int]] = {}

    def size(node: yaml.Node) -> tuple[int, int]:
        if id(node) not in memo:
            if isinstance(node, yaml.ScalarNode):
                own = (1, len(node.value))
                kids: list[yaml.Node] = []
            else:
                own = (1, 0)
                kids = ([n for pair in node.value for n in pair]
                        if isinstance(node, yaml.MappingNode) else list(node.value))
            seen[id(node)] = own
            sub = [size(k) for k in kids]
            memo[id(node)] = (own[0] + sum(s[0] for s in sub), own[1] + sum(s[1] for s in sub))
        return memo[id(node)]

    values, chars = size(root)
    return values - sum(v for v, _ in seen.values()), chars - sum(c for _, c in seen.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=alias_documents(), limit=st.integers(1, 400))
def test_aliases_under_the_bound_load_as_pyyaml_does_and_over_it_are_refused(text, limit):
    added, _ = _expansion(text)
    with mock.patch.object(yaml_source, "MAX_ALIAS_VALUES", limit):
        try:
            raw = load_yaml(SourceFile("t.yaml", text))
        except YamlError as exc:
            assert exc.rule == "yaml-alias"
            assert added > limit
            at = text[exc.offset:]
            assert at.startswith("*a")
            return
    assert added <= limit
    assert raw == yaml.safe_load(text)
