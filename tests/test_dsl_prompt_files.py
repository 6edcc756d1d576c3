"""Prompt files: `prompt: {file: ...}` and shared `system: {file: ...}` snippets, read
relative to the pipeline, checked like inline prompts, with findings at their own file and
line; a run renders them like inline prompts."""

from __future__ import annotations

from pathlib import Path

from flowc import Project
from flowc.compiler import compile_file
from flowc.config import ProjectConfig
from tests.test_soundness import CONFIG, _run

PIPELINE = """\
name: answer
inputs:
  question: {type: string}
  verbose: {type: boolean, default: false}
steps:
  - id: retrieve
    type: transform
    expr: upper(${input.question})
  - id: answer
    type: llm
    model: m
    system: {file: ../shared/tone.md}
    prompt: {file: prompts/answer.md.j2}
output: ${answer}
"""
ANSWER = """\
Answer the question.

Question: ${input.question}
Context: ${retrieve}
{% if input.verbose %}Be thorough.{% endif %}
"""


def project() -> Project:
    return Project(config=ProjectConfig.model_validate(CONFIG))


def write(tmp_path: Path, answer: str = ANSWER, tone: str = "Be kind.\n") -> Path:
    (tmp_path / "flows" / "prompts").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "flows" / "prompts" / "answer.md.j2").write_text(answer)
    (tmp_path / "shared" / "tone.md").write_text(tone)
    pipeline = tmp_path / "flows" / "answer.yaml"
    pipeline.write_text(PIPELINE)
    return pipeline


def test_prompt_files_compile_and_run_like_inline_prompts(tmp_path):
    result = compile_file(write(tmp_path), project())
    assert result.diagnostics == []
    run = _run(result.compiled, {"question": "why?", "verbose": True}, None)
    assert run.status == "succeeded"
    assert run.output == ("[dry-run] m: Answer the question.\n\n"
                          "Question: why?\nContext: WHY?\nBe thorough.\n")


def test_findings_in_a_prompt_file_name_its_file_and_line(tmp_path):
    answer = ANSWER.replace("${retrieve}", "${retreive}").replace("{% endif %}", "{% endif")
    pipeline = write(tmp_path, answer, tone="Today is ${input.today}.\n")
    found = [(str(Path(d.path).relative_to(tmp_path)), d.line, d.col, d.rule)
             for d in compile_file(pipeline, project()).diagnostics if d.rule != "unused-step"]
    assert found == [("flows/prompts/answer.md.j2", 4, 10, "undefined-reference"),
                     ("flows/prompts/answer.md.j2", 5, 1, "template-syntax"),
                     ("shared/tone.md", 1, 10, "undefined-input")]


def test_a_prompt_file_that_cannot_be_read_is_an_error_at_its_name(tmp_path):
    pipeline = write(tmp_path)
    (tmp_path / "shared" / "tone.md").unlink()
    [d] = compile_file(pipeline, project()).diagnostics
    assert (Path(d.path).name, d.line, d.rule) == ("answer.yaml", 12, "prompt-file")
    assert d.message == ("cannot read prompt file '../shared/tone.md': No such file or "
                         "directory")
    (tmp_path / "shared" / "tone.md").write_bytes(b"\xff\xfe bad")
    [d] = compile_file(pipeline, project()).diagnostics
    assert d.message == "cannot use prompt file '../shared/tone.md': it is not UTF-8"


def test_the_json_schema_covers_prompt_files():
    import json

    from click.testing import CliRunner

    from flowc.cli import cli

    doc = json.loads(CliRunner().invoke(cli, ["schema"]).output)
    assert doc["$defs"]["PromptFile"]["properties"]["file"]["type"] == "string"
