"""Printing findings: text (with source excerpt and caret), JSON, GitHub annotations, SARIF."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from flowc import __version__
from flowc.diagnostics import RULES, Diagnostic, Severity


def _source_line(path: str, line: int, cache: dict[str, list[str]]) -> str:
    if path not in cache:
        try:
            cache[path] = Path(path).read_text(encoding="utf-8-sig",
                                               errors="replace").splitlines()
        except OSError:
            cache[path] = []
    lines = cache[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


_EXCERPT = 120  # characters of a long source line shown around the finding


def _excerpt(text: str, col: int) -> tuple[str, int]:
    """A long line cut to a window around ``col`` (marked with "..."), and where ``col``
    falls in it: a finding on a minified or generated line must not print all of it."""
    if len(text) <= _EXCERPT:
        return text, col
    start = max(0, min(col - 1 - _EXCERPT // 4, len(text) - _EXCERPT))
    head = "..." if start else ""
    tail = "..." if start + _EXCERPT < len(text) else ""
    return head + text[start : start + _EXCERPT] + tail, col - start + len(head)


def format_text(diags: Iterable[Diagnostic], sources: dict[str, str] | None = None) -> str:
    """``path:line:col: severity: message [rule]``, the source line with a caret under the
    problem, and ``help:`` when there is a suggestion."""
    cache: dict[str, list[str]] = {k: v.splitlines() for k, v in (sources or {}).items()}
    out: list[str] = []
    for d in diags:
        out.append(f"{d.path}:{d.line}:{d.col}: {d.severity.value}: {d.message} [{d.rule}]")
        text = _source_line(d.path, d.line, cache)
        if text:
            width = max(1, (d.end_col - d.col) if d.end_line == d.line else len(text) - d.col + 1)
            text, col = _excerpt(text, d.col)
            gutter = f"{d.line:>4} | "
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * (col - 1) + "^" + "~" * (
                min(width, max(1, len(text) - col + 1)) - 1))
        if d.help:
            out.append(f"     = help: {d.help}")
    return "\n".join(out) + ("\n" if out else "")


def format_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_dict() for d in diags], indent=2) + "\n"


def _gh_escape(s: str, prop: bool = False) -> str:
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def format_github(diags: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands: one annotation per finding."""
    lines = []
    for d in diags:
        level = "error" if d.severity is Severity.ERROR else "warning"
        props = (f"file={_gh_escape(d.path, True)},line={d.line},col={d.col},"
                 f"endLine={d.end_line},endColumn={d.end_col},title={_gh_escape(d.rule, True)}")
        msg = d.message + (f"\n\nhelp: {d.help}" if d.help else "")
        lines.append(f"::{level} {props}::{_gh_escape(msg)}")
    return "\n".join(lines) + ("\n" if lines else "")


def format_sarif(diags: Iterable[Diagnostic]) -> str:
    """SARIF 2.1.0, as code-scanning tools read it."""
    diags = list(diags)
    rules = [{"id": r.code, "shortDescription": {"text": r.summary},
              "defaultConfiguration": {"level": r.severity.value}} for r in RULES.values()]
    index = {r.code: i for i, r in enumerate(RULES.values())}
    results = []
    for d in diags:
        result = {
            "ruleId": d.rule,
            "ruleIndex": index[d.rule],
            "level": d.severity.value,
            "message": {"text": d.message + (f" (help: {d.help})" if d.help else "")},
            "locations": [{"physicalLocation": {
                "artifactLocation": {"uri": Path(d.path).as_posix()},
                "region": {"startLine": d.line, "startColumn": d.col,
                           "endLine": d.end_line, "endColumn": d.end_col},
            }}],
        }
        results.append(result)
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{"tool": {"driver": {"name": "flowc", "version": __version__,
                                      "informationUri": "https://github.com/flowc/flowc",
                                      "rules": rules}},
                  "results": results}],
    }
    return json.dumps(doc, indent=2) + "\n"


FORMATS: dict[str, Callable[[Iterable[Diagnostic]], str]] = {
    "text": format_text,
    "json": format_json,
    "github": format_github,
    "sarif": format_sarif,
}


def summary_line(diags: list[Diagnostic], files: int) -> str:
    errors = sum(d.severity is Severity.ERROR for d in diags)
    warnings = len(diags) - errors
    noun = "file" if files == 1 else "files"
    if not diags:
        return f"All checks passed ({files} {noun})."
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return f"Found {' and '.join(parts)} in {files} {noun}."
