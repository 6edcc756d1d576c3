"""Docs that are generated from the code must not drift from it."""

from pathlib import Path

from flowc.diagnostics import RULES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_rules_doc_lists_every_rule_with_its_severity():
    text = (DOCS / "rules.md").read_text()
    for rule in RULES.values():
        assert f"| `{rule.code}` | {rule.severity.value} | {rule.summary} |" in text


def test_public_api_is_pinned():
    import flowc

    assert sorted(flowc.__all__) == sorted([
        "RULES", "CompileResult", "CompiledPipeline", "Diagnostic", "InputSpec", "LLMStep",
        "MCPToolStep", "Pipeline", "Project", "Severity", "StepNode", "__version__",
        "compile_file", "compile_source"])
    for name in flowc.__all__:
        assert hasattr(flowc, name)


def test_the_language_doc_opens_with_the_research_example_unchanged():
    text = (DOCS / "dsl.md").read_text()
    first_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    research = (DOCS.parent / "pipelines" / "research.yaml").read_text()
    assert first_block == research


def test_the_readme_example_passes_check():
    from flowc import Project, compile_source

    root = DOCS.parent
    text = (root / "README.md").read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    result = compile_source(text, "README.md", Project.load(root / "flowc.yaml"))
    assert result.diagnostics == []
