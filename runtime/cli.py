"""The full `flowc` command: the compiler's commands plus the runtime's (serve, costs, routes).

The compiler's CLI (`flowc.cli`) never imports the runtime; this module adds to it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from flowc.cli import cli
from flowc.compiler import Project
from flowc.config import CONFIG_NAME, ProjectConfig, find_config
from flowc.report import format_text


def load_project(config: Path | None) -> tuple[ProjectConfig, Path]:
    """The project config (empty without flowc.yaml) and the project directory."""
    path = config or find_config(Path.cwd())
    if path is None:
        return ProjectConfig(), Path.cwd()
    project = Project.load(path)
    if project.config is None:
        click.echo(format_text(project.diagnostics), err=True, nl=False)
        sys.exit(1)
    return project.config, path.parent


_config_option = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"Project config (default: the nearest {CONFIG_NAME}, else none).")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@_config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(host: str, port: int, config: Path | None, log_level: str) -> None:
    """Serve the gateway (OpenAI-compatible) and the runtime over HTTP."""
    import uvicorn

    from runtime.server import create_app

    cfg, project_dir = load_project(config)
    url = f"http://{host}:{port}"
    app = create_app(cfg, project_dir, public_url=url)
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools",
                log_level=log_level, timeout_graceful_shutdown=10, access_log=False)


def _ledger_select(cfg: ProjectConfig, project_dir: Path) -> Callable[..., Any]:
    """Query the ledger directly, or through the server that holds it."""
    import duckdb

    from runtime.ledger.store import connect, is_locked_error, run_select
    from runtime.server import SERVER_FILE

    path = project_dir / cfg.ledger.path
    try:
        con = connect(path, read_only=True)
    except duckdb.IOException as exc:
        if not is_locked_error(exc):
            if not path.exists():
                con = connect(path)  # an empty ledger: create it so queries work
                return lambda sql, params=(): run_select(con, sql, params)
            raise click.ClickException(f"cannot open the ledger {path}: {exc}") from None
        return _remote_select(project_dir / SERVER_FILE, path)
    return lambda sql, params=(): run_select(con, sql, params)


def _remote_select(server_file: Path, path: Path) -> Callable[..., Any]:
    import httpx

    try:
        url = json.loads(server_file.read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise click.ClickException(
            f"the ledger {path} is held by another process, and no flowc server in this "
            "project answers for it") from None

    def select(sql: str, params: Any = ()) -> tuple[list[str], list[Any]]:
        try:
            r = httpx.post(f"{url}/v1/costs/sql", json={"sql": sql, "params": list(params)},
                           timeout=60)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the flowc server at {url} did not answer: {exc}"
                                       ) from None
        body = r.json()
        if r.status_code != 200:
            raise click.ClickException(body["error"]["message"])
        return body["columns"], [tuple(row) for row in body["rows"]]

    return select


@cli.command()
@click.option("--since", help="From this date (YYYY-MM-DD) or ISO time.")
@click.option("--until", help="Up to this date (inclusive) or ISO time.")
@click.option("--by", type=click.Choice(["day", "model", "workflow", "provider"]),
              default="day", show_default=True)
@click.option("--sql", "query", help="Run a read-only SQL query over the `requests` table.")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Export every call in the range to a CSV file ('-' for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_option
def costs(since: str | None, until: str | None, by: str, query: str | None,
          csv_file: Path | None, as_json: bool, config: Path | None) -> None:
    """Spend by day, model or workflow; any read-only SQL; CSV export."""
    from runtime.ledger import reports
    from runtime.ledger.store import SQLRefused

    cfg, project_dir = load_project(config)
    select = _ledger_select(cfg, project_dir)
    try:
        if query:
            columns, rows = select(query)
            if as_json:
                click.echo(json.dumps([dict(zip(columns, r, strict=True)) for r in rows],
                                      default=str, indent=2))
            else:
                click.echo(reports.table(columns, rows))
            return
        if csv_file:
            text = reports.export_csv(select, since, until)
            if str(csv_file) == "-":
                click.echo(text, nl=False)
            else:
                csv_file.write_text(text)
                click.echo(f"wrote {text.count(chr(10)) - 1} rows to {csv_file}", err=True)
            return
        data = reports.summary(select, since, until, by)
    except (SQLRefused, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # DuckDB's message names the problem in the user's SQL
        if type(exc).__module__.startswith(("duckdb", "_duckdb")):
            raise click.ClickException(f"query failed: {exc}") from None
        raise
    if as_json:
        click.echo(json.dumps(data, default=str, indent=2))
        return
    cols = [by, "calls", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "p50_ms"]
    rows = [(r["key"], r["calls"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
             r["cost_usd"], r["p50_ms"]) for r in data["rows"]]
    click.echo(reports.table(cols, rows))
    t = data["totals"]
    note = f" ({t['unpriced']} calls with no known price)" if t["unpriced"] else ""
    click.echo(f"\n{t['calls']} calls, {t['tokens']} tokens, ${t['cost_usd']:.6f}{note}")


@cli.group()
def routes() -> None:
    """Inspect routing rules."""


@routes.command("explain")
@click.option("--model", required=True, help="The model a client asks for.")
@click.option("--tags", default="", help="Comma-separated, as in x-flowc-tags.")
@click.option("--tools", is_flag=True, help="The request offers tools.")
@click.option("--vision", is_flag=True, help="The request has images.")
@click.option("--prompt-chars", default=0, type=int)
@_config_option
def explain(model: str, tags: str, tools: bool, vision: bool, prompt_chars: int,
            config: Path | None) -> None:
    """Show which rule picks which model for a request, and why."""
    from runtime.gateway.routing import Router, Traits
    from runtime.providers import Providers, RequestError

    cfg, _ = load_project(config)
    router = Router(cfg, Providers(cfg))
    traits = Traits(model, tools, vision, prompt_chars,
                    frozenset(t.strip() for t in tags.split(",") if t.strip()))
    try:
        for line in router.explain(traits):
            click.echo(line)
    except RequestError as exc:
        raise click.ClickException(exc.message) from None


def main() -> None:
    cli(prog_name="flowc")


if __name__ == "__main__":
    main()
