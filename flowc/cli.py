"""The compiler's commands: `flowc check`, `flowc cost`, `flowc graph`, `flowc schema`.

Exit codes: 0 clean (warnings allowed unless --strict), 1 findings, 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from flowc import __version__
from flowc.compiler import CompileResult, Project, compile_file
from flowc.config import CONFIG_NAME, ProjectConfig, find_config
from flowc.diagnostics import RULES, Diagnostic, Severity
from flowc.model import Pipeline
from flowc.report import FORMATS, format_text, summary_line

if TYPE_CHECKING:
    from flowc.cost import History, RunCost

PIPELINE_SUFFIXES = (".yaml", ".yml")


def pipeline_files(paths: tuple[Path, ...]) -> list[Path]:
    """The pipeline files named, folders searched recursively (flowc.yaml is not one)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(
                f for f in p.rglob("*")
                if f.suffix in PIPELINE_SUFFIXES and f.name != CONFIG_NAME and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            files.append(p)
    return files


def _parse_rules(values: tuple[str, ...]) -> frozenset[str]:
    rules = {r.strip() for v in values for r in v.split(",") if r.strip()}
    unknown = sorted(rules - set(RULES))
    if unknown:
        raise click.BadParameter(f"unknown rule(s): {', '.join(unknown)}", param_hint="--ignore")
    return frozenset(rules)


def _project_for(config: Path | None, first: Path) -> Project:
    return Project.load(config) if config else Project.discover(first)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowc")
def cli() -> None:
    """flowc: a compiler and runtime for AI pipelines, and an AI gateway."""


@cli.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="text",
              show_default=True, help="Output format.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) on warnings too.")
@click.option("--ignore", "ignore", multiple=True, metavar="RULE[,RULE]",
              help="Rules to ignore (repeatable).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"Project config (default: the nearest {CONFIG_NAME}).")
@click.option("--cost", "cost", is_flag=True,
              help="Also print each pipeline's worst-case cost per step and per run "
                   "(and the ledger's average where it has one).")
def check(paths: tuple[Path, ...], fmt: str, strict: bool, ignore: tuple[str, ...],
          config: Path | None, cost: bool = False) -> None:
    """Check pipeline files (and folders of them) without running anything."""
    ignored = _parse_rules(ignore)
    files = pipeline_files(paths)
    projects: dict[Path | None, Project] = {}
    diags: list[Diagnostic] = []
    crashed: list[Path] = []
    costs: list[str] = []
    for f in files:
        key = config or find_config(f)
        try:
            if key not in projects:
                projects[key] = Project.load(key)
                diags.extend(d for d in projects[key].diagnostics if d.rule not in ignored)
            result = compile_file(f, projects[key], ignored)
            diags.extend(result.diagnostics)
            if cost and result.compiled is None and all(
                    d.rule in BUDGET_RULES for d in result.errors):  # still show why
                result = compile_file(f, projects[key], ignored | BUDGET_RULES)
            if cost and result.compiled is not None:
                costs.append(f"{f}: " + _cost_text(result, projects[key], key))
        except Exception as exc:  # a bug in flowc, not a finding: CI must tell them apart
            crashed.append(f)
            click.echo(f"{f}: internal error: {type(exc).__name__}: {exc}"[:2000], err=True)
    diags.sort()
    click.echo(FORMATS[fmt](diags), nl=False)
    for text in costs:  # machine-readable formats keep stdout to themselves
        click.echo(text, nl=False, err=fmt != "text")
    if fmt == "text" and not crashed:
        click.echo(summary_line(diags, len(files)), err=bool(diags))
    if crashed:
        click.echo(f"flowc could not check {len(crashed)} file(s): this is a bug in flowc, "
                   "not in your pipeline. Please report it with the file that triggers it.",
                   err=True)
        _hard_exit(EXIT_INTERNAL)
    failed = any(d.severity is Severity.ERROR or strict for d in diags)
    _hard_exit(1 if failed else 0)


# Where `flowc cost` and `check --cost` find the ledger's history: set by the runtime's CLI
# (the compiler never imports the runtime). Called with the config's path and the config.
CostHistory = Callable[[Path | None, ProjectConfig | None], "History | None"]
_cost_history: CostHistory | None = None
BUDGET_RULES = frozenset({"over-budget", "unbounded-cost"})


def set_cost_history(source: CostHistory | None) -> None:
    global _cost_history
    _cost_history = source


def _run_cost(result: CompileResult, project: Project, config_path: Path | None) -> RunCost:
    from flowc.cost import pipeline_cost

    assert result.compiled is not None
    history = _cost_history(config_path, project.config) if _cost_history else None
    return pipeline_cost(result.compiled, project.config, project.catalog, history)


def _cost_text(result: CompileResult, project: Project, config_path: Path | None) -> str:
    from flowc.cost import format_cost

    return format_cost(_run_cost(result, project, config_path))


EXIT_INTERNAL = 3  # flowc itself failed (exit 1 means findings, 2 a usage error)


def _hard_exit(code: int) -> None:
    """Exit without tearing down the compiled pipelines' objects one by one: on a
    10,000-step file that teardown took longer than a second. Output is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to OUT.svg, OUT.png or OUT.dot (default: DOT on stdout).")
@click.option("--no-legend", is_flag=True, help="Leave out the legend.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def graph(file: Path, output: Path | None, no_legend: bool, config: Path | None) -> None:
    """Draw a pipeline's DAG with Graphviz."""
    from flowc.render import EDGE_LABELS_UP_TO, to_dot

    result = _compile_or_exit(file, _project_for(config, file))
    assert result.compiled is not None
    dot = to_dot(result.compiled, legend=not no_legend)
    if len(result.compiled.order) > EDGE_LABELS_UP_TO:
        click.echo(f"note: {len(result.compiled.order)} steps: edges are drawn without labels "
                   f"past {EDGE_LABELS_UP_TO} steps, to keep Graphviz's layout time down",
                   err=True)
    if output is None:
        click.echo(dot.source, nl=False)
        return
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "dot", "gv", "pdf"):
        raise click.BadParameter("use a .svg, .png, .pdf or .dot file", param_hint="-o")
    if fmt in ("dot", "gv"):
        output.write_text(dot.source)
    else:
        import graphviz

        try:
            output.write_bytes(dot.pipe(format=fmt))
        except graphviz.ExecutableNotFound:
            click.echo("error: Graphviz's `dot` program is not installed "
                       "(apt-get install graphviz, brew install graphviz); "
                       "write a .dot file instead", err=True)
            sys.exit(1)
    click.echo(f"wrote {output}", err=True)


def _compile_or_exit(file: Path, project: Project) -> CompileResult:
    result = compile_file(file, project)
    problems = [d for d in project.diagnostics + result.diagnostics
                if d.severity is Severity.ERROR]
    if problems:
        click.echo(format_text(problems), nl=False, err=True)
        click.echo(summary_line(problems, 1), err=True)
        sys.exit(1)
    return result


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"Project config (default: the nearest {CONFIG_NAME}).")
def cost(file: Path, fmt: str, config: Path | None) -> None:
    """What a run can cost: the worst case per step and per run, before running anything.

    Exit 0 when it is within the pipeline's max_cost_usd (or it declares none), 1 when the
    file has errors, the worst case is above the budget or cannot be bounded under one."""
    key = config or find_config(file)
    project = Project.load(key)
    result = compile_file(file, project, BUDGET_RULES)
    errors = [d for d in project.diagnostics + result.diagnostics
              if d.severity is Severity.ERROR]
    if errors or result.compiled is None:
        click.echo(format_text(errors), nl=False, err=True)
        click.echo(summary_line(errors, 1), err=True)
        sys.exit(1)
    rc = _run_cost(result, project, key)
    if fmt == "json":
        click.echo(json.dumps(rc.to_dict(), indent=2))
    else:
        from flowc.cost import format_cost

        click.echo(format_cost(rc), nl=False)
    sys.exit(1 if rc.budget is not None and (rc.over_budget or rc.worst_usd is None) else 0)


@cli.command()
@click.option("--config", "which", flag_value="config",
              help=f"The schema of {CONFIG_NAME} instead of a pipeline's.")
def schema(which: str | None) -> None:
    """Print the JSON Schema of the pipeline language (for editors)."""
    model = ProjectConfig if which == "config" else Pipeline
    doc = model.model_json_schema(by_alias=True)
    doc = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "$id": f"https://flowc.dev/schema/{'config' if which else 'pipeline'}-v1.json",
           **doc}
    click.echo(json.dumps(doc, indent=2))


@cli.command()
@click.option("--stdio", is_flag=True,
              help="Talk over stdin and stdout (the only transport; some editors pass it).")
def lsp(stdio: bool) -> None:
    """Serve editors as a Language Server over stdio (docs/editor.md)."""
    from flowc.lsp.server import main as serve  # pygls loads here only: `check` starts fast

    serve()


def main() -> None:
    cli(prog_name="flowc")


if __name__ == "__main__":
    main()
