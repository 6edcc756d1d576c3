"""Golden cases: `tests/cases/NAME.yaml` beside `NAME.out`, the exact text `flowc check`
prints for it. Adding a rule means adding a pair.

Regenerate after an intended change with `python -m tests.golden`, then review the diff.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from flowc.compiler import Project, compile_source
from flowc.report import format_text

CASES = Path(__file__).parent / "cases"


def project() -> Project:
    return Project.load(CASES / "flowc.yaml")


def case_files() -> list[Path]:
    return sorted(p for p in CASES.glob("*.yaml") if p.name != "flowc.yaml")


def render(case: Path, proj: Project) -> str:
    text = case.read_text()
    with contextlib.chdir(case.parent):  # a sub-pipeline is found relative to its caller
        result = compile_source(text, case.name, proj)
    return format_text(result.diagnostics, sources={case.name: text})


if __name__ == "__main__":
    proj = project()
    for case in case_files():
        case.with_suffix(".out").write_text(render(case, proj))
        print("wrote", case.with_suffix(".out"))
