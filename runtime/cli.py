"""The full `flowc` command: the compiler's commands plus the runtime's (serve, costs, routes).

The compiler's CLI (`flowc.cli`) never imports the runtime; this module adds to it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from flowc.cli import cli, set_cost_history
from flowc.compiler import Project
from flowc.config import CONFIG_NAME, TOOL_CACHE, ProjectConfig, ToolCatalog, find_config
from flowc.report import format_text
from runtime.access.keys import PERIODS


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
_store_option = click.option(
    "--store", metavar="URL", help="A shared Postgres (postgresql://user:pass@host/db) "
    "instead of the project's own ledger file; else FLOWC_STORE_URL, else flowc.yaml's "
    "`store:` (docs/scaling.md).")


def _store_url(flag: str | None, cfg: ProjectConfig) -> str | None:
    """The shared store's URL, or None for the embedded ledger; a bad URL is a usage
    error."""
    from runtime.pg.db import StoreError, store_url

    try:
        return store_url(flag, cfg.store)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="'--store'") from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@_config_option
@_store_option
@click.option("--instance", metavar="ID", envvar="FLOWC_INSTANCE",
              help="With --store: this instance's name on its rows and its spool folder "
                   "(default: hostname:port; also FLOWC_INSTANCE).")
@click.option("--pipelines", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of pipelines to serve (default: ./pipelines).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST",
              help="Also answer requests for this Host name (or host:port); repeatable. "
                   "Adds to server.allowed_hosts in flowc.yaml.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Also accept browser requests from this origin (http://host:port), with "
                   "CORS headers; repeatable. Adds to server.allowed_origins.")
@click.option("--admin-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file holding the admin key (instead of FLOWC_ADMIN_KEY); auth is on "
                   "once an admin key is set.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve a non-loopback --host without an admin key: anyone who can "
                   "connect may use it.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Server processes on the port (one per core uses them all); they share "
                   "the ledger, keys, budgets and rate limits through one supervisor (with "
                   "--store, each is an instance of the store, named <instance>/w<k>).")
@click.option("--listen", default="shared", hidden=True,
              type=click.Choice(["shared", "reuseport"]),
              help="With --workers: one socket all workers accept from, or one "
                   "SO_REUSEPORT socket each (docs/benchmarks.md compares them).")
def serve(host: str, port: int, config: Path | None, pipelines: Path | None,
          log_level: str, allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...],
          admin_key_file: Path | None, insecure_no_auth: bool, workers: int,
          listen: str, store: str | None = None, instance: str | None = None) -> None:
    """Serve the gateway (OpenAI-compatible) and the runtime over HTTP."""
    import logging

    import uvicorn
    from pydantic import ValidationError

    from flowc.config import ServerConfig
    from runtime.access.gate import admin_key
    from runtime.http_server import uvicorn_options
    from runtime.server import create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    cfg, project_dir = load_project(config)
    try:  # the same checks as flowc.yaml's
        ServerConfig(allowed_hosts=list(allow_hosts), allowed_origins=list(allow_origins))
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--allow-host" if err["loc"][0] == "allowed_hosts" else "--allow-origin"
        raise click.BadParameter(str(err["msg"]).removeprefix("Value error, "),
                                 param_hint=f"'{flag}'") from None
    env = None  # the server reads the environment (provider keys, FLOWC_ADMIN_KEY)
    if admin_key_file is not None:
        env = {**os.environ, "FLOWC_ADMIN_KEY": _read_admin_key_file(admin_key_file)}
    try:
        auth_on = admin_key(cfg, project_dir, env) is not None
    except ValueError as exc:  # server.admin_key_file names a file that cannot be read
        raise click.ClickException(str(exc)) from None
    if not auth_on and not _is_loopback(host):
        risk = ("anyone who can connect can spend your provider API credits, read and query "
                "the cost ledger, and register and run pipelines")
        if not insecure_no_auth:
            click.echo(
                f"Error: refusing to listen on {host}:{port} without authentication: other "
                f"machines can reach it, and {risk}. Turn auth on with an admin key (set "
                "FLOWC_ADMIN_KEY, pass --admin-key-file PATH, or set server.admin_key_file "
                "in flowc.yaml; see docs/keys.md), serve on 127.0.0.1 (the default), or pass "
                "--insecure-no-auth to serve anyway (on a trusted network or behind an "
                "authenticating proxy).", err=True)
            sys.exit(2)
        click.secho(
            f"WARNING: flowc is listening on {host}:{port}, which other machines can reach, "
            f"and it has no authentication (--insecure-no-auth): {risk}.",
            err=True, fg="red", bold=True)
    url = f"http://{host}:{port}"
    shared = _store_url(store, cfg)
    if shared is not None:
        from runtime.pg.ledger import default_instance
        from runtime.workers.worker import worker_instance

        instance = instance or default_instance(port)
        # With --workers, each worker is an instance of the store (its own spool).
        for name in ([instance] if workers == 1 else
                     [worker_instance(instance, k) for k in range(workers)]):
            _check_store(shared, project_dir, name)
    if workers > 1:
        from runtime.workers.supervisor import serve_workers
        from runtime.workers.worker import ServeArgs

        args = ServeArgs(host, port, config, pipelines, log_level, allow_hosts, allow_origins,
                         env, shared, instance)
        try:
            serve_workers(args, cfg, project_dir, workers, listen,
                          admin_key(cfg, project_dir, env), url)
        except OSError as exc:  # the port is taken, most often
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}"
                                       ) from None
        return
    app = create_app(cfg, project_dir, pipelines=pipelines or project_dir / "pipelines",
                     env=env, public_url=url, bind_host=host, allow_hosts=allow_hosts,
                     allow_origins=allow_origins, store=shared,
                     instance=instance)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options())


def _check_store(url: str, project_dir: Path, instance: str) -> None:
    """Before serving: the shared store answers and its schema is current, and no other
    process uses this instance's spool; else a clear error, not a start-up traceback."""
    import psycopg

    from runtime.pg.db import redact
    from runtime.pg.ledger import migrate
    from runtime.pg.spool import Spool, SpoolLocked
    from runtime.server import SPOOL, spool_name

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            migrate(conn)
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise click.ClickException(f"cannot use the shared store {redact(url)}: {reason}"
                                   ) from None
    try:
        Spool(project_dir / SPOOL / spool_name(instance)).close()
    except SpoolLocked as exc:
        raise click.ClickException(str(exc)) from None


def _read_admin_key_file(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}",
                                 param_hint="'--admin-key-file'") from None
    if not value:
        raise click.BadParameter(f"{path} is empty", param_hint="'--admin-key-file'")
    return value


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def _ledger_select(cfg: ProjectConfig, project_dir: Path, store: str | None = None
                   ) -> Callable[..., Any]:
    """Query the ledger directly, or through the server that holds it, or the shared store
    (``store``, FLOWC_STORE_URL or flowc.yaml's `store:`). The callable takes
    (sql, params=(), timeout=-1): user SQL stops after FLOWC_SQL_TIMEOUT seconds (through a
    server, after the server's), flowc's own reports pass timeout=None."""
    import duckdb

    from runtime.ledger.store import connect, default_sql_timeout, is_locked_error, run_select

    shared = _store_url(store, cfg)
    if shared is not None:
        from runtime.ledger.store import LedgerUnavailable
        from runtime.pg.reports import remote_select

        try:
            return remote_select(shared, default_sql_timeout())
        except LedgerUnavailable as exc:
            raise click.ClickException(str(exc)) from None

    path = project_dir / cfg.ledger.path
    try:
        con = connect(path, read_only=True)
    except duckdb.IOException as exc:
        if not is_locked_error(exc):
            if not path.exists():
                con = connect(path)  # an empty ledger: create it so queries work
            else:
                raise click.ClickException(f"cannot open the ledger {path}: {exc}") from None
        else:
            return _remote_select(cfg, project_dir, path)
    except duckdb.Error as exc:
        raise click.ClickException(f"cannot open the ledger {path}: {exc}") from None
    limit = default_sql_timeout()

    def select(sql: str, params: Any = (), timeout: float | None = -1.0
               ) -> tuple[list[str], list[Any]]:
        return run_select(con, sql, params, limit if timeout is not None and timeout < 0
                          else timeout)

    return select


# -- a running server of this project ----------------------------------------------------------
# runtime.server.SERVER_FILE, named here so that `flowc keys` need not import the server
# (1.5 s); tests/test_keys_cli.py checks the two agree.
SERVER_FILE = Path(".flowc") / "server.json"


def _server_info(project_dir: Path) -> dict[str, Any] | None:
    """What the project's server wrote in .flowc/server.json (its url, pid and, with auth
    on, the admin key), if the file is there."""
    try:
        info = json.loads((project_dir / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("url"), str) else None


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, another user's
    except (OSError, OverflowError):
        return False
    return True


def _running_server(project_dir: Path) -> dict[str, Any] | None:
    """The server file, when the server that wrote it is still running."""
    info = _server_info(project_dir)
    return info if info is not None and _pid_alive(info.get("pid")) else None


def _cli_admin_key(cfg: ProjectConfig, project_dir: Path,
                   info: dict[str, Any] | None) -> str | None:
    """The admin key the CLI presents: FLOWC_ADMIN_KEY, else the one the running server
    wrote to its server file (readable by its owner only), else server.admin_key_file."""
    key = os.environ.get("FLOWC_ADMIN_KEY", "").strip()
    if key:
        return key
    key = (info or {}).get("admin_key")
    if isinstance(key, str) and key.strip():
        return key.strip()
    from runtime.access.gate import admin_key  # 0.6 s: only when it is needed

    try:
        return admin_key(cfg, project_dir, {})
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


class _Server:
    """The project's running server, called with the admin key (when there is one).
    Its errors (`{"error": {"message": ...}}`) become the command's error."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        self.url, self.admin_key = url.rstrip("/"), admin_key

    def call(self, method: str, path: str, *, body: Any = None,
             params: dict[str, str] | None = None, timeout: float | None = 60) -> Any:
        import httpx

        headers = {"authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        try:
            r = httpx.request(method, self.url + path, json=body, params=params,
                              headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the flowc server at {self.url} did not answer: "
                                       f"{exc}") from None
        try:
            answer = r.json()
        except ValueError:
            raise click.ClickException(f"the flowc server at {self.url} answered "
                                       f"{r.status_code} with a body that is not JSON") from None
        if r.status_code < 400:
            return answer
        try:
            message = str(answer["error"]["message"])
        except (KeyError, TypeError):
            message = f"HTTP {r.status_code}"
        if r.status_code == 401 and not self.admin_key:
            raise click.ClickException(
                f"this server ({self.url}) requires the admin key: set FLOWC_ADMIN_KEY, or "
                "server.admin_key_file in flowc.yaml, to the key it was started with")
        if r.status_code in (401, 403):
            raise click.ClickException(f"the flowc server at {self.url} refused the admin "
                                       f"key: {message}")
        raise click.ClickException(message)


def _remote_select(cfg: ProjectConfig, project_dir: Path, path: Path) -> Callable[..., Any]:
    info = _server_info(project_dir)
    if info is None:
        raise click.ClickException(
            f"the ledger {path} is held by another process, and no flowc server in this "
            "project answers for it")
    server = _Server(info["url"], _cli_admin_key(cfg, project_dir, info))

    def select(sql: str, params: Any = (), timeout: float | None = -1.0
               ) -> tuple[list[str], list[Any]]:
        body = server.call("POST", "/v1/costs/sql", body={"sql": sql, "params": list(params)},
                           timeout=None if timeout is None else 600)
        return body["columns"], [tuple(row) for row in body["rows"]]

    return select


def _report_select(select: Callable[..., Any]) -> Callable[..., Any]:
    """flowc's own reports run without the user-SQL time limit."""
    return lambda sql, params=(): select(sql, params, timeout=None)


def _write_csv(csv_file: Path, columns: list[str], rows: list[Any]) -> None:
    from runtime.ledger.reports import csv_text

    text = csv_text(columns, rows)
    if str(csv_file) == "-":
        click.echo(text, nl=False)
        return
    try:
        csv_file.write_text(text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {csv_file}: {exc.strerror}") from None
    click.echo(f"wrote {len(rows)} rows to {csv_file}", err=True)


@cli.command()
@click.option("--since", help="From this date (YYYY-MM-DD) or ISO time.")
@click.option("--until", help="Up to this date (inclusive) or ISO time.")
@click.option("--by", type=click.Choice(["day", "model", "workflow", "provider", "key",
                                         "team", "tag", "instance"]),
              default="day", show_default=True)
@click.option("--team", help="Only this team's calls.")
@click.option("--key", "key_id", metavar="KEY_ID", help="Only this key's calls.")
@click.option("--tag", metavar="K=V", help="Only calls with this tag.")
@click.option("--instance", metavar="NAME", help="Only calls this instance served (a "
              "shared store's; the embedded ledger's rows are '(local)').")
@click.option("--sql", "query", help="Run a read-only SQL query over the `requests` table "
              "(stopped after FLOWC_SQL_TIMEOUT seconds, default 5; DuckDB's dialect, or "
              "PostgreSQL's with --store).")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Export every call in the range (or the --sql query's result) to a CSV "
                   "file ('-' for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_option
@_store_option
def costs(since: str | None, until: str | None, by: str, team: str | None,
          key_id: str | None, tag: str | None, query: str | None, csv_file: Path | None,
          as_json: bool, config: Path | None, store: str | None = None,
          instance: str | None = None) -> None:
    """Spend by day, model, workflow, provider, key, team, tag or instance; any read-only
    SQL; CSV export."""
    from flowc.cost import json_default
    from runtime.ledger import reports
    from runtime.ledger.store import LedgerUnavailable, QueryTimeout, SQLRefused

    cfg, project_dir = load_project(config)
    whose = {"team": team, "key_id": key_id, "tag": tag, "instance": instance}
    if query and any(whose.values()):
        raise click.UsageError("--team, --key, --tag and --instance narrow the reports; with "
                               "--sql, say it in the query (WHERE team = '...')")
    select = _ledger_select(cfg, project_dir, store)
    report = _report_select(select)
    try:
        if query:
            columns, rows = select(query)
            if csv_file:
                _write_csv(csv_file, columns, rows)
            elif as_json:
                click.echo(json.dumps([dict(zip(columns, r, strict=True)) for r in rows],
                                      default=json_default, indent=2))
            else:
                click.echo(reports.table(columns, rows))
            return
        if csv_file:
            columns, rows = reports.export_rows(report, since, until, **whose)
            _write_csv(csv_file, columns, rows)
            return
        data = reports.summary(report, since, until, by, **whose)
    except (SQLRefused, QueryTimeout, LedgerUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # DuckDB's (Postgres') message names the problem in the SQL
        if type(exc).__module__.startswith(("duckdb", "_duckdb", "psycopg")):
            raise click.ClickException(f"query failed: {exc}") from None
        raise
    if as_json:
        click.echo(json.dumps(data, default=json_default, indent=2))
        return
    cols = [by, "calls", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "p50_ms"]
    rows = [(r["key"], r["calls"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
             _usd(r["cost_usd"]), r["p50_ms"]) for r in data["rows"]]
    click.echo(reports.table(cols, rows))
    t = data["totals"]
    note = f" ({t['unpriced']} calls with no known price)" if t["unpriced"] else ""
    click.echo(f"\n{t['calls']} calls, {t['tokens']} tokens, {_usd(t['cost_usd'])}{note}")


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


# -- runs ------------------------------------------------------------------------------------
_ICON = {"running": "▶", "done": "✓", "skipped": "↷", "failed": "✗", "cancelled": "⊘",
         "waiting": "⏸", "pending": "·"}


def _live(step: Any) -> None:
    """One line per step state change, on stderr (readable in a terminal and in CI logs)."""
    detail = ""
    if step.status == "done" and step.marks.get("resumed_from"):
        detail = f"reused from run {step.marks['resumed_from']}"
    elif step.status == "done":
        cost = "?" if step.cost is None else _usd(step.cost)
        detail = f"{step.latency_ms:7.0f} ms  {cost}  {step.tokens} tokens" + (
            "  (cached)" if step.cached else "")
    elif step.status == "skipped":
        detail = step.skip_reason or ""
    elif step.status == "failed":
        detail = step.error or ""
    elif step.status == "waiting" and step.marks.get("waiting_for"):
        detail = f"for approval: {step.marks['waiting_for'].get('message')}"
    click.echo(f"  {_ICON.get(step.status, ' ')} {step.id:<20} {step.status:<9} {detail}",
               err=True)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "-i", "pairs", multiple=True, metavar="KEY=VALUE",
              help="An input (repeatable); non-string inputs are read as JSON.")
@click.option("--input-json", help="All inputs as one JSON object.")
@click.option("--dry-run", is_flag=True,
              help="Replace model and tool calls by deterministic stand-ins ($0).")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Resume a failed or cancelled run: reuse what its steps produced and "
                   "run only the steps that did not succeed, with the run's own inputs.")
@_config_option
@_store_option
def run(file: Path, pairs: tuple[str, ...], input_json: str | None, dry_run: bool,
        as_json: bool, config: Path | None, resume_id: str | None = None,
        store: str | None = None) -> None:
    """Run a pipeline, showing each step as it goes."""
    import asyncio

    from flowc.compiler import compile_file
    from runtime.inputs import InputError, check_inputs, parse_cli_inputs

    cfg_path = config or find_config(file)
    cfg, project_dir = load_project(cfg_path)
    shared = _store_url(store, cfg)
    project = Project(cfg, ToolCatalog.load(cfg, project_dir / TOOL_CACHE,
                                            _store_tools(shared))) if cfg_path else Project()
    result = compile_file(file, project)
    if result.compiled is None:
        click.echo(format_text(result.errors), err=True, nl=False)
        raise click.ClickException(f"{file} does not compile ({len(result.errors)} errors)")
    compiled = result.compiled
    if resume_id and dry_run:
        raise click.ClickException("--resume cannot be combined with --dry-run")
    try:
        inputs = json.loads(input_json) if input_json else {}
        inputs.update(parse_cli_inputs(pairs, compiled.pipeline.inputs))
        if resume_id and not (input_json or pairs):
            inputs = None  # the run's own, as recorded
        else:
            check_inputs(compiled.pipeline.inputs, inputs)
    except InputError as exc:
        raise click.ClickException("; ".join(exc.problems)) from None
    except ValueError as exc:
        raise click.ClickException(f"--input-json is not valid JSON: {exc}") from None
    if dry_run:
        click.echo("DRY RUN: model and tool calls are stand-ins; nothing is billed.", err=True)
    outcome = asyncio.run(_run(compiled, inputs, cfg, project_dir, dry_run, not as_json,
                               resume_id, shared))
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        _print_outcome(outcome)
    # 3: waiting for an approval (flowc runs approve), neither done nor failed
    sys.exit({"succeeded": 0, "waiting": 3}.get(outcome.status, 1))


async def _run(compiled: Any, inputs: dict[str, Any] | None, cfg: ProjectConfig,
               project_dir: Path, dry_run: bool, live: bool, resume_id: str | None = None,
               shared: str | None = None) -> Any:
    import asyncio

    from runtime import runs
    from runtime.dryrun import DryRunModels, DryRunTools
    from runtime.executor import Executor
    from runtime.gateway.calls import ModelCaller
    from runtime.gateway.routing import Router
    from runtime.ledger.store import Ledger
    from runtime.mcp.manager import MCPManager
    from runtime.providers import Providers
    from runtime.step_cache import StepCache

    ledger = _command_ledger(cfg, project_dir, shared) if shared else \
        Ledger(project_dir / cfg.ledger.path, cfg.ledger.flush_interval)
    providers = Providers(cfg)
    mcp = MCPManager(cfg.mcp_servers, project_dir)
    try:
        if dry_run:
            executor = Executor(DryRunModels(ledger), DryRunTools(_output_schemas(cfg)),
                                dry_run=True)
        else:
            caller = ModelCaller(cfg, providers, Router(cfg, providers), ledger)
            executor = Executor(caller, mcp, cache=StepCache(ledger))
        if resume_id:
            from runtime.resume import ResumeError, resume_run

            record = _run_record(ledger, cfg, project_dir, resume_id)
            try:
                outcome = await resume_run(executor, compiled, resume_id, record, inputs,
                                           listener=_live if live else None)
            except ResumeError as exc:
                raise click.ClickException(str(exc)) from None
            runs.save(ledger, outcome)
            return outcome
        # Ctrl-C cancels the run's steps; the record of what had finished is kept.
        outcome = await executor.run(compiled, inputs or {}, listener=_live if live else None,
                                     on_cancel=lambda r: runs.save(ledger, r))
        runs.save(ledger, outcome)
        return outcome
    finally:
        await mcp.close()
        await providers.close()
        await asyncio.to_thread(ledger.close)


def _store_tools(shared: str | None) -> dict[str, Any] | None:
    """The MCP tools discovered on any instance of the shared store (None: no store)."""
    if shared is None:
        return None
    from runtime.pg.commands import StoreUnusable, store_tools

    try:
        return store_tools(shared)
    except StoreUnusable as exc:
        raise click.ClickException(str(exc)) from None


def _command_ledger(cfg: ProjectConfig, project_dir: Path, shared: str) -> Any:
    """The shared store's ledger for this command (runtime/pg/commands.py)."""
    from runtime.pg.commands import StoreUnusable, command_ledger

    try:
        return command_ledger(cfg, project_dir, shared)
    except StoreUnusable as exc:
        raise click.ClickException(str(exc)) from None


def _run_record(ledger: Any, cfg: ProjectConfig, project_dir: Path, run_id: str
                ) -> dict[str, Any]:
    """A run's record: from the ledger this process holds, else through the project's
    server (which holds it)."""
    from runtime.resume import parse_record

    sql = "SELECT record FROM runs WHERE id = ?"
    rows = (ledger.execute(sql, [run_id]) if ledger.owner
            else _remote_select(cfg, project_dir, ledger.path)(sql, [run_id])[1])
    if not rows:
        raise click.ClickException(f"no run '{run_id}'")
    return parse_record(rows[0][0])


def _output_schemas(cfg: ProjectConfig) -> dict[tuple[str, str], dict[str, Any]]:
    return {(server, tool): schema.output_schema
            for server, sc in cfg.mcp_servers.items() for tool, schema in (sc.tools or {}).items()
            if schema.output_schema}


def _print_outcome(outcome: Any) -> None:
    if outcome.status == "waiting":
        _print_waiting(json.loads(json.dumps(outcome.to_dict(), default=str)))
        return
    if outcome.status != "succeeded":
        err = outcome.error or {}
        click.echo(f"\nrun {outcome.run_id} failed at step '{err.get('step')}': "
                   f"{err.get('message')}", err=True)
        return
    out = outcome.output
    click.echo(out if isinstance(out, str) else json.dumps(out, indent=2, default=str))
    cost = outcome.total_cost
    tag = "  (dry run)" if outcome.dry_run else ""
    click.echo(f"\nrun {outcome.run_id}: {outcome.total_tokens} tokens, "
               f"{'cost unknown' if cost is None else _usd(cost)}, "
               f"{outcome.latency_ms:.0f} ms{tag}", err=True)


class _RunsGroup(click.Group):
    """`flowc runs [RUN_ID]` shows runs; `flowc runs approve|reject ...` decides."""

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands:  # a run id
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


_RUNS_OPTIONS = (
    click.option("--graph", "graph_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="Draw the run to this .svg file: its pipeline's DAG with each step "
                      "coloured by status, its cost and latency, skip reasons and errors on "
                      "hover."),
    click.option("--pipelines", type=click.Path(file_okay=False, path_type=Path),
                 help="Folder of the project's pipelines, for --graph without a running "
                      "server (default: ./pipelines)."),
    _config_option,
    _store_option,
)


def _runs_options(f: Any) -> Any:
    for option in reversed(_RUNS_OPTIONS):
        f = option(f)
    return f


@cli.group("runs", cls=_RunsGroup, invoke_without_command=True)
@click.option("--limit", default=20, show_default=True)
@_runs_options
@click.pass_context
def runs_group(ctx: click.Context, limit: int, graph_file: Path | None,
               pipelines: Path | None, config: Path | None, store: str | None = None) -> None:
    """List recent runs; `flowc runs RUN_ID` shows one (with why each skipped step was
    skipped; `--graph out.svg` draws it); `flowc runs approve|reject RUN_ID STEP` decides a
    waiting approval."""
    if ctx.invoked_subcommand is None:
        runs_cmd(None, limit, graph_file, pipelines, config, store)


@runs_group.command("show", hidden=True)
@click.argument("run_id")
@_runs_options
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, graph_file: Path | None,
              pipelines: Path | None, config: Path | None, store: str | None = None) -> None:
    # `flowc runs --graph x.svg RUN_ID` and `flowc runs RUN_ID --graph x.svg` both work
    given = ctx.parent.params if ctx.parent is not None else {}
    runs_cmd(run_id, 20, graph_file or given.get("graph_file"),
             pipelines or given.get("pipelines"), config or given.get("config"),
             store or given.get("store"))


def runs_cmd(run_id: str | None, limit: int, graph_file: Path | None,
             pipelines: Path | None, config: Path | None, store: str | None = None) -> None:
    """List recent runs, or show one (with why each skipped step was skipped)."""
    from runtime.ledger import reports

    cfg, project_dir = load_project(config)
    if graph_file is not None:
        if not run_id:
            raise click.UsageError("--graph draws one run: give its RUN_ID")
        if graph_file.suffix.lower() != ".svg":
            raise click.BadParameter("write the drawing to a .svg file", param_hint="--graph")
        svg, note = _run_graph(cfg, project_dir, run_id, pipelines, store)
        try:
            graph_file.write_bytes(svg)
        except OSError as exc:
            raise click.ClickException(f"cannot write {graph_file}: {exc.strerror}") from None
        if note:
            click.echo(f"note: {note}", err=True)
        click.echo(f"wrote {graph_file}", err=True)
        return
    select = _report_select(_ledger_select(cfg, project_dir, store))  # flowc's own queries
    if run_id:
        _, rows = select("SELECT record FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise click.ClickException(f"no run '{run_id}'")
        record = rows[0][0]
        click.echo(json.dumps(json.loads(record) if isinstance(record, str) else record,
                              indent=2))
        return
    columns, rows = select("SELECT id, workflow_name, status, started_at, "
                           "round(latency_ms) AS ms, dry_run FROM runs "
                           "ORDER BY started_at DESC LIMIT ?", [limit])
    click.echo(reports.table(columns, rows))


def _run_graph(cfg: ProjectConfig, project_dir: Path, run_id: str,
               pipelines: Path | None, store: str | None = None) -> tuple[bytes, str | None]:
    """The run's SVG (runtime/rungraph.py): from the running server, whose pipelines are the
    ones that ran, else drawn here from the ledger file and the project's pipelines."""
    info = _running_server(project_dir)
    if info is not None:
        import httpx

        server = _Server(info["url"], _cli_admin_key(cfg, project_dir, info))
        headers = {"authorization": f"Bearer {server.admin_key}"} if server.admin_key else {}
        try:
            r = httpx.get(f"{server.url}/v1/runs/{run_id}/graph.svg", headers=headers,
                          timeout=120)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the flowc server at {server.url} did not answer: "
                                       f"{exc}") from None
        if r.status_code != 200:
            try:
                message = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = f"the flowc server at {server.url} answered {r.status_code}"
            raise click.ClickException(message)
        return r.content, r.headers.get("x-flowc-graph-note")

    from flowc.compiler import compile_source
    from flowc.ir import CompiledPipeline
    from runtime.rungraph import GraphUnavailable, run_svg

    select = _ledger_select(cfg, project_dir, store)
    _, rows = select("SELECT record FROM runs WHERE id = ?", [run_id], timeout=None)
    if not rows:
        raise click.ClickException(f"no run '{run_id}'")
    record = rows[0][0]
    record = json.loads(record) if isinstance(record, str) else record
    project = Project(cfg, ToolCatalog.load(cfg, project_dir / TOOL_CACHE))
    folder = pipelines or project_dir / "pipelines"
    # As the server loads them: the folder's, then those registered over the API (which
    # win a shared name).
    sources = [(p.read_text(encoding="utf-8", errors="replace"), str(p))
               for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
               ] if folder.is_dir() else []
    _, registered = select("SELECT name, config_yaml FROM workflows", (), timeout=None)
    sources += [(text, f"<registered {name}>") for name, text in registered]
    workflows: dict[str, CompiledPipeline] = {}
    for text, origin in sources:
        compiled = compile_source(text, origin, project).compiled
        if compiled is not None:
            workflows[compiled.name] = compiled
    try:
        return run_svg(record, workflows)
    except GraphUnavailable as exc:
        raise click.ClickException(str(exc)) from None


@runs_group.command("approve")
@click.argument("run_id")
@click.argument("step")
@click.option("--value", "value_json", metavar="JSON",
              help="An edited value to approve instead of the one put up (JSON; checked "
                   "against the step's type).")
@click.option("--json", "as_json", is_flag=True, help="Print the continued run as JSON.")
@_config_option
@_store_option
def runs_approve(run_id: str, step: str, value_json: str | None, as_json: bool,
                 config: Path | None, store: str | None = None) -> None:
    """Approve a waiting approval step: the run goes on as a new run that resumes it."""
    body: dict[str, Any] = {}
    if value_json is not None:
        try:
            body["value"] = json.loads(value_json)
        except ValueError as exc:
            raise click.ClickException(f"--value is not valid JSON: {exc}") from None
    _decide(run_id, step, body, True, as_json, config, store)


@runs_group.command("reject")
@click.argument("run_id")
@click.argument("step")
@click.option("--reason", help="Why: recorded with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the continued run as JSON.")
@_config_option
@_store_option
def runs_reject(run_id: str, step: str, reason: str | None, as_json: bool,
                config: Path | None, store: str | None = None) -> None:
    """Reject a waiting approval step: it fails, and the run with it unless the step says
    `on_error: continue`."""
    _decide(run_id, step, {} if reason is None else {"reason": reason}, False, as_json,
            config, store)


def _decide(run_id: str, step: str, body: dict[str, Any], approved: bool, as_json: bool,
            config: Path | None, store: str | None = None) -> None:
    """Through the project's server when one runs (it holds the ledger), else here; with a
    shared store, here, on the store."""
    import asyncio

    cfg, project_dir = load_project(config)
    shared = _store_url(store, cfg)
    info = None if shared else _running_server(project_dir)
    if info is not None:
        server = _Server(info["url"], _cli_admin_key(cfg, project_dir, info))
        verb = "approve" if approved else "reject"
        out = server.call("POST", f"/v1/runs/{_quoted(run_id)}/steps/{_quoted(step)}/{verb}",
                          body=body, timeout=None)
    else:
        out = asyncio.run(_decide_here(run_id, step, body, approved, cfg, project_dir,
                                       shared))
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    click.echo(f"run {run_id}: step '{step}' {'approved' if approved else 'rejected'}; "
               f"continued as run {out.get('run_id')} ({out.get('status')})", err=True)
    if out.get("status") == "succeeded":
        result = out.get("output")
        click.echo(result if isinstance(result, str) else json.dumps(result, indent=2))
    elif out.get("status") == "waiting":
        _print_waiting(out)
    elif out.get("error"):
        click.echo(f"failed at step '{out['error'].get('step')}': "
                   f"{out['error'].get('message')}", err=True)


async def _decide_here(run_id: str, step: str, body: dict[str, Any], approved: bool,
                       cfg: ProjectConfig, project_dir: Path, shared: str | None = None
                       ) -> dict[str, Any]:
    import asyncio

    from flowc.compiler import compile_file
    from runtime import runs
    from runtime.approval import continued, decide
    from runtime.executor import Executor
    from runtime.gateway.calls import ModelCaller
    from runtime.gateway.routing import Router
    from runtime.ledger.store import Ledger
    from runtime.mcp.manager import MCPManager
    from runtime.providers import Providers
    from runtime.resume import ResumeError, resume_run
    from runtime.step_cache import StepCache

    ledger = _command_ledger(cfg, project_dir, shared) if shared else \
        Ledger(project_dir / cfg.ledger.path, cfg.ledger.flush_interval)
    providers = Providers(cfg)
    mcp = MCPManager(cfg.mcp_servers, project_dir)
    try:
        record = _run_record(ledger, cfg, project_dir, run_id)
        name = record.get("workflow")
        project = Project(cfg, ToolCatalog.load(cfg, project_dir / TOOL_CACHE))
        found = [r.compiled for p in sorted((project_dir / "pipelines").glob("*.y*ml"))
                 if (r := compile_file(p, project)).compiled is not None
                 and r.compiled.name == name]
        if not found and shared:  # registered over HTTP on an instance
            from flowc.compiler import compile_source
            from runtime.pg.commands import registered_pipeline

            text = registered_pipeline(ledger, str(name))
            compiled = compile_source(text, f"<registered {name}>", project).compiled \
                if text is not None else None
            found = [compiled] if compiled is not None else []
        if not found:
            raise click.ClickException(f"run '{run_id}' is of pipeline '{name}', which is "
                                       f"not in {project_dir / 'pipelines'}" +
                                       (" nor registered on the shared store" if shared
                                        else ""))
        try:
            decision = decide(found[0], run_id, record, step, approved=approved,
                              value=body.get("value"), has_value="value" in body,
                              by="cli", reason=body.get("reason"))
            caller = ModelCaller(cfg, providers, Router(cfg, providers), ledger)
            outcome = await resume_run(Executor(caller, mcp, cache=StepCache(ledger)),
                                       found[0], run_id, record, check=False,
                                       decisions={step: decision}, listener=_live)
        except ResumeError as exc:
            raise click.ClickException(str(exc)) from None
        runs.save(ledger, outcome)
        ledger.execute("UPDATE runs SET status = 'continued', record = ? WHERE id = ?",
                       [json.dumps(continued(record, outcome.run_id, step, decision),
                                   default=str), run_id])
        return json.loads(json.dumps(outcome.to_dict(), default=str))
    finally:
        await mcp.close()
        await providers.close()
        await asyncio.to_thread(ledger.close)


def _print_waiting(out: dict[str, Any]) -> None:
    for s in (out.get("metrics") or {}).get("steps") or []:
        what = s.get("waiting_for")
        if s.get("status") == "waiting" and what:
            click.echo(f"\nrun {out.get('run_id')} waits for approval of step '{s['id']}': "
                       f"{what.get('message')}", err=True)
            if what.get("value") is not None:
                click.echo("value put up: " + json.dumps(what["value"], default=str),
                           err=True)
            click.echo(f"  flowc runs approve {out.get('run_id')} {s['id']} [--value JSON]"
                       f"\n  flowc runs reject {out.get('run_id')} {s['id']} [--reason TEXT]",
                       err=True)


# -- keys --------------------------------------------------------------------------------------
# Each setting as `POST/PATCH /v1/keys` names it, and the flag that sets it.
_KEY_FLAGS = {"name": "--name", "team": "--team", "budget_usd": "--budget",
              "period": "--period", "rpm": "--rpm", "tpm": "--tpm", "models": "--models",
              "pipelines": "--pipelines", "read_only": "--read-only", "tags": "--tag",
              "expires": "--expires"}


def _key_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The settings `keys create` and `keys update` share."""
    options = [
        click.option("--name", help="What the key is for; shows in the ledger."),
        click.option("--team", help="The key's team (its costs, runs and team budget)."),
        click.option("--budget", help="A hard limit in USD per --period."),
        click.option("--period", type=click.Choice(PERIODS),
                     help="The budget's period (calendar, UTC); default month."),
        click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute."),
        click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute."),
        click.option("--models", help="Models and aliases the key may use: comma-separated "
                                      "glob patterns ('fast,openai/*'); default any."),
        click.option("--pipelines", help="Pipelines the key may run (glob patterns)."),
        click.option("--read-only/--no-read-only", "read_only", default=None,
                     help="Read its team's costs and runs; call no model."),
        click.option("--tag", "tags", multiple=True, metavar="K=V",
                     help="A tag on every call the key makes (repeatable)."),
        click.option("--expires", help="30d, 12h, 2w from now, or an ISO date."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
        _config_option,
        _store_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _key_spec(given: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line, checked here so that a mistake names its
    flag (exit 2) before any server or ledger is opened."""
    from datetime import UTC, datetime

    from runtime.access.keys import Key, KeySpecError, apply_spec

    values = {"name": given.get("name"), "team": given.get("team"),
              "budget_usd": given.get("budget"), "period": given.get("period"),
              "rpm": given.get("rpm"), "tpm": given.get("tpm"),
              "models": given.get("models"), "pipelines": given.get("pipelines"),
              "read_only": given.get("read_only"), "tags": list(given.get("tags") or ()) or None,
              "expires": given.get("expires")}
    spec = {k: v for k, v in values.items() if v is not None}
    for setting, value in spec.items():
        if setting in ("models", "pipelines"):
            spec[setting] = [s.strip() for s in value.split(",") if s.strip()]
        try:
            apply_spec(Key(id="", name="-", hash="", created_at=datetime.now(UTC)),
                       {setting: value}, datetime.now(UTC))
        except KeySpecError as exc:
            flag = _KEY_FLAGS[setting]
            raise click.BadParameter(str(exc).removeprefix(f"{setting}: ").removeprefix(
                "budget: ").removeprefix("expires: "), param_hint=f"'{flag}'") from None
    return spec


class _LocalKeys:
    """Keys in the project's ledger file, opened here (no server is running)."""

    def __init__(self, cfg: ProjectConfig, project_dir: Path) -> None:
        import duckdb

        from runtime.access.gate import Gate
        from runtime.access.store import LedgerAccessStore
        from runtime.ledger.store import Ledger

        path = project_dir / cfg.ledger.path
        try:
            self.ledger = Ledger(path, cfg.ledger.flush_interval, take_over=False)
        except duckdb.Error as exc:
            raise click.ClickException(f"cannot open the ledger {path}: {exc}") from None
        if not self.ledger.owner:
            self.ledger.close()
            raise click.ClickException(
                f"the ledger {path} is held by another process, and no flowc server in this "
                "project answers for it: try again once that process is done")
        self.gate = Gate(cfg, LedgerAccessStore(self.ledger), None)
        self.gate.load()

    def _shown(self, key: Any) -> dict[str, Any]:
        return {**key.public(), "spend": self.gate.budget_status(key)}

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        key, secret = self.gate.create(spec)
        return {"key": secret, **key.public()}

    def list(self, team: str | None) -> list[dict[str, Any]]:
        return [self._shown(k) for k in self.gate.keys.values()
                if team is None or k.team == team]

    def show(self, key_id: str) -> dict[str, Any]:
        return self._shown(self.gate.get(key_id))

    def update(self, key_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self._shown(self.gate.update(key_id, spec))

    def revoke(self, key_id: str) -> dict[str, Any]:
        return self._shown(self.gate.revoke(key_id))

    def close(self) -> None:
        self.ledger.close()


class _SharedKeys(_LocalKeys):
    """Keys on the shared store: written where every instance reads them; a change reaches
    the running instances within their next tick (docs/scaling.md)."""

    def __init__(self, cfg: ProjectConfig, url: str) -> None:
        import socket

        from runtime.access.gate import Gate
        from runtime.pg.access import PgAccessStore

        # A command is no instance: it never ticks (no event loop), so it holds no lease
        # and is not among the live instances that share rate limits.
        self.store = PgAccessStore(url, instance=f"{socket.gethostname()}:cli")
        self.gate = Gate(cfg, self.store, None)
        self.gate.load()
        self.store.read_totals()  # each budget's spend so far, for `list` and `show`

    def close(self) -> None:
        self.store.close_connections()


class _RemoteKeys:
    """Keys through the running server's admin API (`/v1/keys`)."""

    def __init__(self, server: _Server) -> None:
        self.server = server

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.server.call("POST", "/v1/keys", body=spec))

    def list(self, team: str | None) -> list[dict[str, Any]]:
        body = self.server.call("GET", "/v1/keys", params={"team": team} if team else None)
        return list(body["keys"])

    def show(self, key_id: str) -> dict[str, Any]:
        return dict(self.server.call("GET", f"/v1/keys/{_quoted(key_id)}"))

    def update(self, key_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.server.call("PATCH", f"/v1/keys/{_quoted(key_id)}", body=spec))

    def revoke(self, key_id: str) -> dict[str, Any]:
        return dict(self.server.call("DELETE", f"/v1/keys/{_quoted(key_id)}"))

    def close(self) -> None:
        pass


def _quoted(key_id: str) -> str:
    from urllib.parse import quote

    return quote(key_id, safe="")


def _with_keys(config: Path | None, act: Callable[[Any], Any], store: str | None = None
               ) -> Any:
    """``act`` on the keys where they live: on the shared store when there is one, else
    through the project's running server (it holds the ledger), else in the ledger file
    itself."""
    from runtime.access.keys import KeySpecError
    from runtime.ledger.store import LedgerUnavailable

    cfg, project_dir = load_project(config)
    shared = _store_url(store, cfg)
    info = None if shared else _running_server(project_dir)
    keys: _LocalKeys | _RemoteKeys
    if shared:
        try:
            keys = _SharedKeys(cfg, shared)
        except LedgerUnavailable as exc:  # the store is unreachable
            raise click.ClickException(str(exc)) from None
    elif info is not None:
        keys = _RemoteKeys(_Server(info["url"], _cli_admin_key(cfg, project_dir, info)))
    else:
        keys = _LocalKeys(cfg, project_dir)
    try:
        return act(keys)
    except (KeySpecError, LedgerUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyError as exc:
        raise click.ClickException(f"no key '{exc.args[0]}' (see `flowc keys list`)") from None
    finally:
        keys.close()


def _usd(value: Any) -> str:
    """flowc's one way to print dollars, imported when first used (not at start-up)."""
    from flowc.cost import usd

    return usd(value)


def _budget_text(k: dict[str, Any]) -> str | None:
    if k.get("budget_usd") is None:
        return None
    period = k.get("period") or "month"
    return _usd(k["budget_usd"]) + (" total" if period == "total" else f"/{period}")


def _spent_text(k: dict[str, Any]) -> str | None:
    status = (k.get("spend") or {}).get("key")
    return _usd(status["spent_usd"]) if status else None


@cli.group()
def keys() -> None:
    """Virtual keys: each with its team, budget, rate limits and allowed models."""


@keys.command("create")
@_key_options
def keys_create(as_json: bool, config: Path | None, store: str | None = None,
                **given: Any) -> None:
    """Make a key and print it, once: only its hash is kept."""
    if not given.get("name"):
        raise click.UsageError("give the key a name: --name billing-bot")
    spec = _key_spec(given)
    made = _with_keys(config, lambda keys: keys.create(spec), store)
    secret = made.pop("key")
    if as_json:
        click.echo(json.dumps({"key": secret, **made}, indent=2))
        return
    click.echo(f"Created key {made['id']} ({made['name']}). This is the only time it is "
               "shown: store it now (only its hash is kept).", err=True)
    _print_key(made, err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--team", help="Only this team's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_option
@_store_option
def keys_list(team: str | None, as_json: bool, config: Path | None,
              store: str | None = None) -> None:
    """The keys, with their limits and spend this period."""
    from runtime.ledger.reports import table

    found = _with_keys(config, lambda keys: keys.list(team), store)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    cols = ["id", "name", "team", "state", "budget", "spent", "rpm", "tpm", "models", "hint"]
    rows = [(k["id"], k["name"], k.get("team"), k.get("state"), _budget_text(k),
             _spent_text(k), k.get("rpm"), k.get("tpm"), ",".join(k.get("models") or ()) or None,
             k.get("key_hint")) for k in found]
    click.echo(table(cols, rows))


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_option
@_store_option
def keys_show(key_id: str, as_json: bool, config: Path | None,
              store: str | None = None) -> None:
    """One key's settings and spend."""
    _print_key(_with_keys(config, lambda keys: keys.show(key_id), store), as_json=as_json)


@keys.command("update")
@click.argument("key_id")
@_key_options
@click.option("--no-team", is_flag=True, help="Take the key out of its team.")
@click.option("--no-budget", is_flag=True, help="Drop the key's budget.")
@click.option("--no-rpm", is_flag=True, help="Drop the requests-per-minute limit.")
@click.option("--no-tpm", is_flag=True, help="Drop the tokens-per-minute limit.")
@click.option("--no-models", is_flag=True, help="Allow any model.")
@click.option("--no-pipelines", is_flag=True, help="Allow any pipeline.")
@click.option("--no-tags", is_flag=True, help="Drop the key's tags.")
@click.option("--no-expires", is_flag=True, help="The key never expires.")
def keys_update(key_id: str, as_json: bool, config: Path | None, store: str | None = None,
                **given: Any) -> None:
    """Change a key's settings (only those given); --no-X clears one."""
    cleared = {}
    for setting, empty in (("team", None), ("budget", None), ("rpm", None), ("tpm", None),
                           ("models", []), ("pipelines", []), ("tags", []),
                           ("expires", None)):
        if not given.pop(f"no_{setting}"):
            continue
        flag = "--tag" if setting == "tags" else f"--{setting}"
        if given.get(setting):
            raise click.UsageError(f"{flag} and --no-{setting} contradict each other")
        cleared[{"budget": "budget_usd"}.get(setting, setting)] = empty
    spec = {**_key_spec(given), **cleared}
    if not spec:
        raise click.UsageError("nothing to change: give the settings to change (see --help)")
    _print_key(_with_keys(config, lambda keys: keys.update(key_id, spec), store),
               as_json=as_json)


@keys.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_option
@_store_option
def keys_revoke(key_id: str, as_json: bool, config: Path | None,
                store: str | None = None) -> None:
    """Revoke a key: its next request is refused."""
    _print_key(_with_keys(config, lambda keys: keys.revoke(key_id), store), as_json=as_json)


def _print_key(k: dict[str, Any], *, as_json: bool = False, err: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(k, indent=2))
        return
    lines = [("id", k["id"]), ("name", k["name"]), ("team", k.get("team")),
             ("state", k.get("state")), ("key", k.get("key_hint")),
             ("budget", _budget_text(k)), ("rpm", k.get("rpm")), ("tpm", k.get("tpm")),
             ("models", ", ".join(k.get("models") or ()) or "any"),
             ("pipelines", ", ".join(k.get("pipelines") or ()) or "any"),
             ("read only", "yes" if k.get("read_only") else "no"),
             ("tags", ", ".join(k.get("tags") or ()) or None),
             ("created", k.get("created_at")), ("expires", k.get("expires_at")),
             ("revoked", k.get("revoked_at"))]
    for scope, status in (k.get("spend") or {}).items():
        if status:
            per = "in total" if status["period"] == "total" else f"this {status['period']}"
            lines.append((f"{scope} spend", (
                f"{_usd(status['spent_usd'])} {per} of {_usd(status['limit_usd'])}, "
                f"{_usd(status['left_usd'])} left")))
    for name, value in lines:
        if value is not None:
            click.echo(f"{name + ':':<12} {value}", err=err)


# -- MCP -------------------------------------------------------------------------------------
@cli.group()
def mcp() -> None:
    """MCP servers from flowc.yaml: discover tools, call one by hand."""


@mcp.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--tokens", is_flag=True,
              help="What each server's tool list costs in context tokens (estimated).")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds per server.")
@_config_option
@_store_option
def mcp_list(as_json: bool, tokens: bool, timeout: float, config: Path | None,
             store: str | None = None) -> None:
    """Start each server, list its tools, and refresh the discovery cache (with a shared
    store, the one every instance reads)."""
    found, cache = _discover(config, timeout, store)
    if tokens:
        from runtime.mcp.serve_catalog import token_lines

        click.echo("\n".join(token_lines(found)))
        sys.exit(0 if all(e["ok"] for e in found.values()) else 1)
    if as_json:
        click.echo(json.dumps(found, indent=2, default=str))
        return
    for name, entry in sorted(found.items()):
        if not entry["ok"]:
            click.echo(f"✗ {name}: {entry['error']}")
            continue
        click.echo(f"✓ {name} ({len(entry['tools'])} tools, {entry['ms']} ms)")
        for tool in entry["tools"]:
            props = ", ".join((tool.get("inputSchema") or {}).get("properties", {}))
            click.echo(f"    {tool['name']}({props})")
    click.echo(f"cache: {cache}", err=True)
    if not all(e["ok"] for e in found.values()):
        sys.exit(1)


def _discover(config: Path | None, timeout: float, store: str | None = None
              ) -> tuple[dict[str, Any], Path]:
    import asyncio

    from runtime.mcp.manager import MCPManager

    cfg, project_dir = load_project(config)
    if not cfg.mcp_servers:
        raise click.ClickException("no mcpServers in flowc.yaml")
    shared = _store_url(store, cfg)

    async def go() -> tuple[dict[str, Any], Path]:
        manager = MCPManager(cfg.mcp_servers, project_dir)
        try:
            found = await manager.discover(timeout)
            return found, manager.write_cache(found)
        finally:
            await manager.close()

    found, cache = asyncio.run(go())
    if shared is not None:
        from runtime.pg.commands import StoreUnusable, save_tools

        try:
            save_tools(shared, found)
        except StoreUnusable as exc:
            raise click.ClickException(str(exc)) from None
        from runtime.pg.db import redact

        click.echo(f"shared with every instance: {redact(shared)}", err=True)
    return found, cache


def _pull_tools(config: Path | None, paths: tuple[Path, ...], store: str | None) -> None:
    """`flowc check` with a shared store: the tools discovered on any instance, into each
    checked project's discovery cache file, which the compiler reads. An unreachable
    store is a warning: the check goes on with the file as it is."""
    from runtime.mcp.discovered import write_file
    from runtime.pg.commands import StoreUnusable, store_tools
    from runtime.pg.db import STORE_ENV

    configs = {config} if config else {find_config(p) for p in paths}
    for path in sorted(c for c in configs if c is not None):
        if not (store or os.environ.get(STORE_ENV) or "store:" in path.read_text(
                encoding="utf-8", errors="replace")):
            continue  # no store: nothing to parse twice
        project = Project.load(path)
        if project.config is None:
            continue  # the check reports why
        shared = _store_url(store, project.config)
        if shared is None:
            continue
        project_dir = path.parent
        try:
            write_file(project_dir, store_tools(shared))
        except StoreUnusable as exc:
            click.echo(f"warning: MCP tools discovered on other instances are not known: "
                       f"{exc}", err=True)


@mcp.command("serve")
@_config_option
@click.option("--pipelines", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of pipelines to offer (default: ./pipelines).")
@click.option("--key", envvar="FLOWC_API_KEY", help="A flowc key (sk-flowc-...) the calls "
              "are charged to (default: $FLOWC_API_KEY).")
@_store_option
def mcp_serve(config: Path | None, pipelines: Path | None, key: str | None,
              store: str | None = None) -> None:
    """Serve the pipelines and the exposed MCP tools over stdio (docs/mcp.md)."""
    import asyncio
    import logging

    from runtime.access.gate import Denied
    from runtime.mcp.serve import ExposeError, serve_stdio

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    cfg, project_dir = load_project(config)
    shared = _store_url(store, cfg)
    instance = None
    if shared:
        from runtime.pg.commands import StoreUnusable, command_instance

        try:
            instance = command_instance(project_dir)
        except StoreUnusable as exc:
            raise click.ClickException(str(exc)) from None
        _check_store(shared, project_dir, instance)
    try:
        asyncio.run(serve_stdio(cfg, project_dir, pipelines or project_dir / "pipelines", key,
                                store=shared, instance=instance))
    except (ExposeError, Denied) as exc:
        raise click.ClickException(f"not serving: {exc}") from None


@mcp.command("call")
@click.argument("server")
@click.argument("tool")
@click.option("--arg", "-a", "pairs", multiple=True, metavar="KEY=VALUE",
              help="An argument (repeatable); values that parse as JSON are JSON.")
@click.option("--timeout", default=30.0, show_default=True)
@_config_option
def mcp_call(server: str, tool: str, pairs: tuple[str, ...], timeout: float,
             config: Path | None) -> None:
    """Call one tool by hand."""
    import asyncio

    from runtime.executor import StepFailed
    from runtime.inputs import InputError, parse_cli_inputs
    from runtime.mcp.manager import MCPManager

    cfg, project_dir = load_project(config)
    try:
        args = parse_cli_inputs(pairs, None)
    except InputError as exc:
        raise click.ClickException(str(exc).replace("--input", "--arg")) from None

    async def go() -> Any:
        manager = MCPManager(cfg.mcp_servers, project_dir)
        try:
            return await manager.call_tool(server, tool, args, timeout)
        finally:
            await manager.close()

    try:
        res = asyncio.run(go())
    except StepFailed as exc:
        raise click.ClickException(str(exc)) from None
    if res.structured is not None:
        click.echo(json.dumps(res.structured, indent=2))
    else:
        click.echo(res.text)
    if res.is_error:
        sys.exit(1)


def _with_live_check() -> None:
    """`flowc check --live`: refresh the MCP discovery cache, then check (the compiler itself
    never starts servers)."""
    original = cli.commands["check"]

    def callback(live: bool, store: str | None = None, **kwargs: Any) -> Any:
        _pull_tools(kwargs.get("config"), kwargs.get("paths") or (), store)
        if live:
            found, _ = _discover(kwargs.get("config"), 15.0, store)
            for name, entry in sorted(found.items()):
                if not entry["ok"]:
                    click.echo(f"warning: MCP server '{name}' did not answer: "
                               f"{entry['error']}", err=True)
        assert original.callback is not None
        return original.callback(**kwargs)

    live = click.Option(["--live"], is_flag=True,
                        help="Start the MCP servers first and refresh their tool schemas.")
    store = next(p for p in _store_option(click.Command("x")).params)
    cli.add_command(click.Command("check", params=[*original.params, live, store],
                                  callback=callback, help=original.help,
                                  short_help=original.short_help))


_with_live_check()

# A step's expected cost: the average, over the runs that ran it (dry runs left out), of
# what its calls cost in that run. A run-step with an unpriced call is left out: its cost
# is not known. Failed and refused calls are not billed (their cost is NULL).
_STEP_HISTORY = """
SELECT step_id, avg(cost) AS avg_cost, count(*) AS runs FROM (
    SELECT run_id, step_id, sum(cost_usd) AS cost FROM requests
    WHERE workflow_name = ? AND run_id IS NOT NULL AND step_id IS NOT NULL
      AND NOT coalesce(dry_run, false)
      AND coalesce(status, CASE WHEN success THEN 'ok' ELSE 'error' END)
          NOT IN ('error', 'refused')
    GROUP BY run_id, step_id HAVING count(cost_usd) = count(*))
GROUP BY step_id"""


def _cost_history(config_path: Path | None, cfg: ProjectConfig | None) -> Any:
    """`flowc cost`'s expected column: the ledger's history of each step, when there is a
    ledger (none is created for the asking)."""
    from decimal import Decimal

    cfg = cfg or ProjectConfig()
    project_dir = config_path.parent if config_path else Path.cwd()
    if not (project_dir / cfg.ledger.path).exists() and _store_url(None, cfg) is None:
        return None
    try:
        select = _ledger_select(cfg, project_dir)
    except click.ClickException as exc:
        click.echo(f"warning: no expected costs: {exc.message}", err=True)
        return None

    def history(workflow: str) -> dict[str, tuple[Decimal, int]]:
        try:
            _, rows = select(_STEP_HISTORY, (workflow,), timeout=None)
        except Exception as exc:  # the worst case stands without it
            click.echo(f"warning: no expected costs: the ledger could not be read: {exc}",
                       err=True)
            return {}
        return {step: (Decimal(str(avg)), int(n)) for step, avg, n in rows}

    return history


set_cost_history(_cost_history)


@cli.group("cache")
def cache_group() -> None:
    """The step cache (`cache:` on a step): its entries live in the ledger."""


@cache_group.command("clear")
@click.option("--pipeline", help="Only this pipeline's entries.")
@click.option("--step", help="Only this step's entries (its id, as the ledger's step_id).")
@click.option("--older-than", metavar="DURATION",
              help="Only entries stored longer ago than this: 30s, 10m, 1h, 7d.")
@_config_option
@_store_option
def cache_clear(pipeline: str | None, step: str | None, older_than: str | None,
                config: Path | None, store: str | None) -> None:
    """Delete step cache entries (all of them without options); identical calls later are
    misses and store their results again. Through the project's server when one runs (it
    holds the ledger)."""
    from runtime.api.cache import DURATION

    if older_than is not None and not DURATION.fullmatch(older_than):
        raise click.BadParameter(f"{older_than!r} is not a duration like 30s, 10m, 1h or 7d",
                                 param_hint="--older-than")
    cfg, project_dir = load_project(config)
    url = _store_url(store, cfg)
    info = None if url else _running_server(project_dir)
    params = {k: v for k, v in (("pipeline", pipeline), ("step", step),
                                ("older_than", older_than)) if v is not None}
    if info is not None:
        server = _Server(info["url"], _cli_admin_key(cfg, project_dir, info))
        deleted = server.call("DELETE", "/v1/cache", params=params)["deleted"]
    else:
        deleted = _clear_here(cfg, project_dir, url, pipeline, step, older_than)
    click.echo(f"deleted {deleted} cache entr{'y' if deleted == 1 else 'ies'}")


def _clear_here(cfg: ProjectConfig, project_dir: Path, url: str | None, pipeline: str | None,
                step: str | None, older_than: str | None) -> int:
    from flowc.caching import duration_seconds
    from runtime import step_cache

    ledger: Any
    if url:
        from runtime.pg.db import connect

        ledger = _PgStatements(connect(url))
    else:
        from runtime.ledger.store import Ledger

        ledger = Ledger(project_dir / cfg.ledger.path, cfg.ledger.flush_interval)
    try:
        return step_cache.clear(ledger, pipeline=pipeline, step=step, older_than=None
                                if older_than is None else duration_seconds(older_than))
    finally:
        ledger.close()


class _PgStatements:
    """flowc's own `?`-placeholder statements on a Postgres connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> list[Any]:
        cur = self.conn.execute(sql.replace("?", "%s"), list(params))
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.conn.close()


def main() -> None:
    cli(prog_name="flowc")


if __name__ == "__main__":
    main()
