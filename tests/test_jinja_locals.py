"""Names a Jinja template sets itself (`{% set %}`, `{% for %}`, `{% with %}`) against the
values it reads from the run: what `flowc check` takes as a read is what a run needs, so a
template it accepts renders, and a value it reads through one of its own names is a
dependency (the step waits for it), inside a `block:` as at the top."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateSyntaxError, UndefinedError

from flowc.template import jinja_reads, parse_template, render
from tests.dsl_b import Answers, compiled_at, diagnostics, execute, write
from tests.fakes import FakeServer, openai_text, slow


@pytest.fixture(scope="module")
def fake():
    server = FakeServer("openai").start()
    yield server
    server.stop()


# A template's own names (t, u), a value from the run (tone) and a condition (c).
LEAF = st.sampled_from(["{% set t = tone %}", "{% set u = t %}", "{% set t = 'x' %}",
                        "{{ t }}", "{{ u }}", "{{ tone }}", "."])


def _nest(body: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    many = st.lists(body, max_size=3).map("".join)
    return st.one_of(
        st.tuples(many, many).map(lambda p: f"{{% if c %}}{p[0]}{{% else %}}{p[1]}{{% endif %}}"),
        many.map(lambda b: f"{{% if c %}}{b}{{% endif %}}"),
        st.tuples(st.sampled_from(["[1]", "[]"]), many, many).map(
            lambda p: f"{{% for i in {p[0]} %}}{p[1]}{{% else %}}{p[2]}{{% endfor %}}"),
        many.map(lambda b: f"{{% filter upper %}}{b}{{% endfilter %}}"),
        many.map(lambda b: f"{{% with t = tone %}}{b}{{% endwith %}}"),
        many.map(lambda b: f"{{% set t %}}{b}{{% endset %}}"))


TEMPLATES = st.lists(st.recursive(LEAF, _nest, max_leaves=12), min_size=1, max_size=6).map(
    "".join)


def _renders(text: str, names: dict[str, object]) -> bool:
    try:
        render(parse_template(text), lambda _: None, names)
    except UndefinedError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(TEMPLATES)
def test_what_check_reads_is_what_a_render_needs(text):
    """Accepted (no read of a name no step has): it renders whichever way `c` goes. A run
    value it does not read as a dependency: it renders without it. (Refused outright, as
    reading a name before its `set`: no run of it is made.)"""
    try:
        roots = {r[0][0] for r in jinja_reads(parse_template(text))}
    except TemplateSyntaxError:
        return
    for c in (True, False):
        if roots <= {"tone", "c"}:
            assert _renders(text, {"tone": "dry", "c": c}), (text, roots)
        if "tone" not in roots and _renders(text, {"tone": "dry", "c": c}):
            assert _renders(text, {"c": c}), (text, roots)


def test_a_name_set_in_every_branch_is_the_templates_own():
    text = "{% if c %}{% set t = tone %}{% else %}{% set t = 'x' %}{% endif %}{{ t }}"
    assert sorted(r[0] for r in jinja_reads(parse_template(text))) == [("c",), ("tone",)]
    one_branch = "{% if c %}{% set t = tone %}{% endif %}{{ t }}"  # unset when c is false
    assert ("t",) in [r[0] for r in jinja_reads(parse_template(one_branch))]
    assert not _renders(one_branch, {"tone": "dry", "c": False})
    in_loop = "{% for i in [1] %}{% set t = tone %}{% endfor %}{{ t }}"  # ends with the loop
    assert ("t",) in [r[0] for r in jinja_reads(parse_template(in_loop))]
    assert not _renders(in_loop, {"tone": "dry"})


def test_a_loop_reading_a_name_set_after_it_is_refused_as_every_render_fails():
    """Jinja takes `t` as the template's own throughout (its `set` is at the top level), so
    the loop never reads the run's `t`: each render fails. Jinja's own analysis of free
    names misses it; the check says where."""
    text = "{% for i in [1] %}{{ t }}{% endfor %}\n{% set t = 'x' %}"
    assert not _renders(text, {"t": "from the run"})
    with pytest.raises(TemplateSyntaxError, match=re.escape("'t' is read before the `{% set %}`")):
        jinja_reads(parse_template(text))


BLOCK = """\
name: toned
inputs:
  formal: {type: boolean}
steps:
  - {id: tone, type: llm, model: m, prompt: "Pick a tone"}
  - id: per
    type: block
    steps:
      - id: draft
        type: llm
        model: m
        prompt: "PROMPT"
    output: ${draft}
output: ${per}
"""


def test_a_value_read_only_through_set_for_or_with_inside_a_block_is_waited_for(fake,
                                                                               tmp_path):
    """`tone` answers slowly: the block's step reads it only inside Jinja statements, and
    still runs after it, with its value."""
    prompts = {
        "{% set t = tone %}Draft in a {{ t }} tone": "Draft in a dry tone",
        "{% for w in [tone] %}Draft in a {{ w }} tone{% endfor %}": "Draft in a dry tone",
        "{% with t = tone %}Draft in a {{ t }} tone{% endwith %}": "Draft in a dry tone",
        "{% set t %}{{ tone | upper }}{% endset %}Draft in a {{ t }} tone":
            "Draft in a DRY tone",
        "{% if input.formal %}{% set t = 'formal' %}{% else %}{% set t = tone %}{% endif %}"
        "Draft in a {{ t }} tone": "Draft in a dry tone",
    }
    for i, (prompt, sent) in enumerate(prompts.items()):
        folder = tmp_path / str(i)
        folder.mkdir()
        path = write(folder, toned=BLOCK.replace('"PROMPT"', json.dumps(prompt)))
        assert diagnostics(path) == [], prompt
        answers = Answers({"Pick a tone": [slow(0.3, openai_text("dry"))]})
        answers.serve(fake)
        result, rows = execute(compiled_at(path), {"formal": False}, fake, folder)
        assert result.status == "succeeded", result.error
        assert answers.prompts == ["Pick a tone", sent]
        assert [r[0] for r in rows] == ["per/draft", "tone"]


def test_a_name_set_on_some_paths_only_is_refused_where_a_run_would_fail(fake, tmp_path):
    prompt = "{% if input.formal %}{% set t = tone %}{% endif %}Draft in a {{ t }} tone"
    path = write(tmp_path, toned=BLOCK.replace('"PROMPT"', json.dumps(prompt)))
    assert [rule for rule, _ in diagnostics(path)] == ["undefined-reference"]
    # What the run would do: with `formal` false, `t` was never set.
    assert not _renders(prompt.replace("input.formal", "formal"),
                        {"tone": "dry", "formal": False})
