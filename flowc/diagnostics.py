"""Findings: what the compiler reports, the rules it knows, and per-file/per-line ignores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowc.source import SourceFile


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    summary: str


_E, _W = Severity.ERROR, Severity.WARNING

#: Every rule the compiler can report, by code. Docs (docs/rules.md) and SARIF use this table.
RULES: dict[str, Rule] = {
    r.code: r
    for r in [
        Rule("yaml-syntax", _E, "the file is not valid YAML"),
        Rule("yaml-alias", _E, "a YAML alias that repeats too much when expanded, or itself"),
        Rule("yaml-nesting", _E, "YAML collections nested too deeply"),
        Rule("duplicate-key", _E, "a mapping repeats a key"),
        Rule("invalid-document", _E, "the file is not a mapping of pipeline fields"),
        Rule("unknown-field", _E, "a field the language does not define"),
        Rule("missing-field", _E, "a required field is absent"),
        Rule("invalid-value", _E, "a field's value has the wrong type or is out of range"),
        Rule("unknown-step-type", _E, "a step `type` the language does not define"),
        Rule("duplicate-id", _E, "two steps share an id"),
        Rule("duplicate-output", _E, "two steps bind their result to the same name"),
        Rule("reference-syntax", _E, "a `${...}` reference that does not parse"),
        Rule("template-syntax", _E, "a prompt's Jinja2 template that does not parse"),
        Rule("undefined-input", _E, "`${input.x}` names an input that `inputs:` does not declare"),
        Rule("undefined-reference", _E, "a reference to an output no step produces"),
        Rule("unknown-step", _E, "`needs:` names a step that does not exist"),
        Rule("cycle", _E, "steps depend on each other in a cycle"),
        Rule("condition-syntax", _E, "a `when:` condition that does not parse"),
        Rule("type-mismatch", _E, "an operation on values whose types cannot work together"),
        Rule("unknown-function", _E, "a condition calls a function that does not exist"),
        Rule("unknown-field-path", _E, "a field path into a value whose schema lacks the field"),
        Rule("not-in-enum", _E, "a literal compared with a value whose schema's enum lacks it"),
        Rule("maybe-skipped", _E, "a read of a maybe-skipped value with no fallback"),
        Rule("unknown-model", _E, "a model that is neither an alias nor a known provider model"),
        Rule("unlisted-model", _W, "a provider model the price data does not list (a typo?)"),
        Rule("unknown-mcp-server", _E, "an MCP server that flowc.yaml does not define"),
        Rule("unknown-tool", _E, "a tool the MCP server does not offer"),
        Rule("tool-params", _E, "tool params that violate the tool's input schema"),
        Rule("over-budget", _E, "a run's worst-case cost is above the pipeline's max_cost_usd"),
        Rule("unbounded-cost", _E, "max_cost_usd cannot be checked: a run's worst case is "
                                   "unbounded or unpriced"),
        Rule("expression-syntax", _E, "a transform's `expr:` that does not parse"),
        Rule("for-each-not-a-list", _E, "`for_each` names a value that is not a list"),
        Rule("pipeline-not-found", _E, "a `type: pipeline` step names no pipeline file"),
        Rule("pipeline-cycle", _E, "pipelines call each other in a cycle"),
        Rule("pipeline-errors", _E, "a sub-pipeline that does not compile"),
        Rule("pipeline-inputs", _E, "a sub-pipeline's inputs: unknown, missing or mistyped"),
        Rule("repeat-without-check", _E, "`repeat` with no `until:` and no schema to match"),
        Rule("prompt-file", _E, "a prompt file that cannot be read"),
        Rule("switch-case", _E, "a switch case names an unknown step, or one another case "
                                "or switch already runs"),
        Rule("unreachable-case", _W, "a switch's `default` when its cases cover every value"),
        Rule("constant-condition", _W, "a condition that is always true or always false"),
        Rule("unreachable-step", _W, "a step that can never run"),
        Rule("unused-output", _W, "an output no step and no pipeline output reads"),
        Rule("unused-step", _W, "a step whose result nothing uses"),
        Rule("approval-value", _E, "an approval step's value is not of the type its `schema:` "
                                   "declares"),
        Rule("block-approval", _E, "an approval step inside a `type: block`"),
        Rule("pipeline-approval", _E, "a sub-pipeline with an approval step"),
        Rule("cached-tool-calls", _W, "a cached model step that offers MCP tools: a hit makes "
                                      "no tool calls"),
    ]
}


@dataclass(frozen=True, order=True)
class Diagnostic:
    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    rule: str
    message: str = field(compare=False)
    help: str | None = field(default=None, compare=False)

    @property
    def severity(self) -> Severity:
        return RULES[self.rule].severity

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "line": self.line,
            "column": self.col,
            "end_line": self.end_line,
            "end_column": self.end_col,
            "severity": self.severity.value,
            "rule": self.rule,
            "message": self.message,
            "help": self.help,
        }


_IGNORE = re.compile(r"#\s*flowc:\s*(ignore-file|ignore)(?:\[([A-Za-z0-9_,\s-]*)\])?")


@dataclass
class Ignores:
    """`# flowc: ignore[rule, ...]` silences rules on its own line; `# flowc: ignore-file[...]`
    silences them in the whole file. With no list, every rule is silenced."""

    file_rules: set[str] | None = field(default_factory=set)  # None = all
    line_rules: dict[int, set[str] | None] = field(default_factory=dict)

    @classmethod
    def scan(cls, text: str) -> Ignores:
        out = cls()
        for lineno, line in enumerate(text.splitlines(), start=1):
            if "flowc:" not in line:
                continue
            for m in _IGNORE.finditer(line):
                rules = None if m.group(2) is None else {
                    r.strip() for r in m.group(2).split(",") if r.strip()}
                if m.group(1) == "ignore-file":
                    out.file_rules = None if rules is None or out.file_rules is None else (
                        out.file_rules | rules)
                else:
                    prev = out.line_rules.get(lineno, set())
                    out.line_rules[lineno] = None if rules is None or prev is None else (
                        prev | rules)
        return out

    def suppresses(self, d: Diagnostic) -> bool:
        if self.file_rules is None or d.rule in self.file_rules:
            return True
        if d.line in self.line_rules:
            rules = self.line_rules[d.line]
            return rules is None or d.rule in rules
        return False


class Collector:
    """Collects findings for one file; de-duplicates and sorts them by position."""

    def __init__(self, source: SourceFile) -> None:
        self.source = source
        self._found: dict[tuple[int, int, str, str], Diagnostic] = {}

    def add(self, rule: str, message: str, start: int, end: int | None = None,
            help: str | None = None) -> None:
        assert rule in RULES, rule
        source, local = self.source.locate(start)  # a prompt file's finding names that file
        end_local = local + (end - start if end is not None and end > start else 1)
        a = source.position(local)
        b = source.position(end_local)
        d = Diagnostic(source.path, a.line, a.col, b.line, b.col, rule, message, help)
        self._found.setdefault((d.line, d.col, d.rule, d.message), d)

    def results(self, ignore: frozenset[str] = frozenset()) -> list[Diagnostic]:
        ignores = Ignores.scan(self.source.text)
        kept = [d for d in self._found.values()
                if d.rule not in ignore and not ignores.suppresses(d)]
        return sorted(kept)
