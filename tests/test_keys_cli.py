"""`flowc keys`, `flowc serve`'s admin key, and `flowc costs`/`runs` against a server with
auth on, as a user runs them: a real `flowc` subprocess, a real server, the official openai
SDK as the client, a loopback OpenAI as the provider."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import duckdb
import openai
import pytest

from runtime.access.keys import hash_secret
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port

ADMIN = "sk-flowc-admin-" + "a1b2c3d4" * 5
CONFIG = "models: {fast: openai/gpt-4o-mini}\nledger: {flush_interval: 0.2}\n"
SECRET = re.compile(r"sk-flowc-[A-Za-z0-9_-]{43}")


@dataclass
class Project:
    path: Path
    env: dict[str, str]

    def flowc(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=self.path,
                              env={**self.env, **env}, capture_output=True, text=True,
                              timeout=120)
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
        return done

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        done = self.flowc(*args, **env)
        assert done.returncode == 0, done.stderr
        return done

    def create(self, *args: str) -> tuple[str, str]:
        """A new key's secret and id."""
        made = self.ok("keys", "create", *args)
        secret = made.stdout.strip()
        assert made.stdout == secret + "\n" and SECRET.fullmatch(secret), made.stdout
        key_id = re.search(r"Created key (key_[0-9a-f]{16})", made.stderr)
        assert key_id, made.stderr
        return secret, key_id.group(1)

    def files_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.path.rglob("*") if p.is_file())


def _env(openai_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWC_ADMIN_KEY"}
    return {**env, "OPENAI_BASE_URL": openai_url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    fake = FakeServer("openai").start()
    yield fake
    fake.stop()


@pytest.fixture
def project(tmp_path: Path, upstream: FakeServer) -> Project:
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    return Project(tmp_path, _env(upstream.url))


# -- no server: the ledger file ----------------------------------------------------------------
def test_keys_are_made_listed_changed_and_revoked_in_the_ledger_file(project):
    secret, key_id = project.create(
        "--name", "billing-bot", "--team", "finance", "--budget", "50", "--period", "month",
        "--rpm", "600", "--tpm", "200000", "--models", "fast,openai/*", "--pipelines",
        "triage", "--expires", "30d", "--tag", "env=prod", "--tag", "owner=ana")
    outputs = []

    listed = project.ok("keys", "list")
    outputs.append(listed)
    header, _, row = listed.stdout.splitlines()
    assert header.split() == ["id", "name", "team", "state", "budget", "spent", "rpm", "tpm",
                              "models", "hint"]
    assert row.split() == [key_id, "billing-bot", "finance", "active", "$50.00/month", "$0",
                           "600", "200000", "fast,openai/*", f"sk-flowc-...{secret[-4:]}"]

    shown = json.loads(project.ok("keys", "show", key_id, "--json").stdout)
    assert Decimal(shown["budget_usd"]) == 50
    assert {k: shown[k] for k in ("id", "name", "team", "state", "period", "rpm", "tpm",
                                  "models", "pipelines", "read_only", "tags")} == {
        "id": key_id, "name": "billing-bot", "team": "finance", "state": "active",
        "period": "month", "rpm": 600, "tpm": 200000,
        "models": ["fast", "openai/*"], "pipelines": ["triage"], "read_only": False,
        "tags": ["env=prod", "owner=ana"]}
    assert shown["expires_at"] > shown["created_at"] and "hash" not in shown
    assert Decimal(shown["spend"]["key"]["limit_usd"]) == 50
    assert Decimal(shown["spend"]["key"]["spent_usd"]) == 0
    text = project.ok("keys", "show", key_id)
    outputs.append(text)
    assert "budget:      $50.00/month" in text.stdout
    assert "key spend:   $0 this month of $50.00, $50.00 left" in text.stdout

    updated = json.loads(project.ok("keys", "update", key_id, "--no-budget", "--rpm", "5",
                                    "--no-tags", "--read-only", "--name", "billing",
                                    "--json").stdout)
    assert (updated["name"], updated["budget_usd"], updated["rpm"], updated["tpm"],
            updated["tags"], updated["read_only"]) == ("billing", None, 5, 200000, [], True)
    revoked = project.ok("keys", "revoke", key_id)
    outputs.append(revoked)
    assert "state:       revoked" in revoked.stdout
    assert json.loads(project.ok("keys", "show", key_id, "--json").stdout)["state"] == "revoked"

    other, _ = project.create("--name", "ops-bot", "--team", "ops")
    by_team = json.loads(project.ok("keys", "list", "--team", "ops", "--json").stdout)
    assert [k["name"] for k in by_team] == ["ops-bot"]
    assert json.loads(project.ok("keys", "list", "--team", "nobody", "--json").stdout) == []

    # The secret was printed once, and is nowhere else: not in any later output, not in
    # the ledger (which holds its hash).
    for done in outputs:
        assert secret not in done.stdout + done.stderr
    with duckdb.connect(str(project.path / ".flowc" / "ledger.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
    assert [r[2] for r in rows] == [hash_secret(secret), hash_secret(other)]
    assert not any(secret in str(v) for r in rows for v in r)
    assert secret.encode() not in project.files_bytes()


def test_amounts_from_the_ledger_file_print_plainly(project):
    """Without a server the CLI reads the file: a tenth of a millionth (str() of which is
    `1.00E-7`) prints as 0.0000001 in a key's JSON, a query's table, JSON and CSV."""
    _, key_id = project.create("--name", "tiny", "--budget", "0.0000001")
    shown = json.loads(project.ok("keys", "show", key_id, "--json").stdout)
    assert (shown["budget_usd"], shown["spend"]["key"]["limit_usd"]) == ("0.0000001",) * 2
    tiny = "SELECT budget_usd FROM keys"
    for extra in ((), ("--json",), ("--csv", "-")):
        out = project.ok("costs", "--sql", tiny, *extra).stdout
        assert "0.0000001" in out and "E-" not in out, (extra, out)


BAD_FLAGS = [
    (["--budget", "-5"], "--budget", "'-5' is not an amount in USD (>= 0)"),
    (["--budget", "lots"], "--budget", "'lots' is not an amount in USD"),
    (["--period", "year"], "--period", "'year' is not one of 'day', 'week', 'month', 'total'"),
    (["--tag", "nokv"], "--tag", "tag 'nokv' is not k=v"),
    (["--expires", "soon"], "--expires", "'soon' is neither a duration (30d, 12h, 2w) nor "
                                         "an ISO date"),
    (["--rpm", "-1"], "--rpm", "-1 is not in the range x>=0"),
    (["--tpm", "many"], "--tpm", "'many' is not a valid integer"),
]


@pytest.mark.parametrize(("args", "flag", "message"), BAD_FLAGS)
def test_a_bad_setting_names_its_flag_and_makes_no_key(project, args, flag, message):
    done = project.flowc("keys", "create", "--name", "x", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert f"Error: Invalid value for '{flag}': {message}" in done.stderr
    _, key_id = project.create("--name", "good")
    done = project.flowc("keys", "update", key_id, *args)
    assert done.returncode == 2
    assert f"Error: Invalid value for '{flag}': {message}" in done.stderr
    assert [k["name"] for k in json.loads(project.ok("keys", "list", "--json").stdout)] == [
        "good"]


def test_usage_mistakes_are_named_without_a_traceback(project):
    done = project.flowc("keys", "create", "--team", "finance")
    assert done.returncode == 2 and "give the key a name: --name" in done.stderr
    _, key_id = project.create("--name", "x")
    done = project.flowc("keys", "update", key_id)
    assert done.returncode == 2 and "nothing to change" in done.stderr
    done = project.flowc("keys", "update", key_id, "--budget", "5", "--no-budget")
    assert done.returncode == 2
    assert "--budget and --no-budget contradict each other" in done.stderr
    for cmd in (["show", "key_nope"], ["revoke", "key_nope"], ["update", "key_nope",
                                                               "--rpm", "1"]):
        done = project.flowc("keys", *cmd)
        assert done.returncode == 1
        assert "Error: no key 'key_nope' (see `flowc keys list`)" in done.stderr


def test_a_server_file_left_by_a_dead_server_is_not_called(project):
    # A server killed without cleaning up leaves .flowc/server.json behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (project.path / ".flowc").mkdir()
    (project.path / ".flowc" / "server.json").write_text(json.dumps(
        {"url": f"http://127.0.0.1:{free_port()}", "pid": dead.pid}))
    _, key_id = project.create("--name", "x")
    assert json.loads(project.ok("keys", "show", key_id, "--json").stdout)["name"] == "x"


def test_serve_names_an_admin_key_file_it_cannot_use(project):
    (project.path / "empty.key").write_text("\n")
    args = ("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    done = project.flowc(*args, "--admin-key-file", "empty.key")
    assert done.returncode == 2
    assert "Invalid value for '--admin-key-file': empty.key is empty" in done.stderr
    (project.path / "flowc.yaml").write_text(CONFIG + "server: {admin_key_file: gone.key}\n")
    done = project.flowc(*args)
    assert done.returncode == 1
    assert f"server.admin_key_file: cannot read {project.path / 'gone.key'}" in done.stderr


# -- a server with auth on ---------------------------------------------------------------------
@dataclass
class Served(Project):
    url: str = ""
    proc: subprocess.Popen | None = None
    key: str = ""
    revoked: str = ""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, upstream: FakeServer) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("served")
    (path / "flowc.yaml").write_text(CONFIG)
    (path / "admin.key").write_text(ADMIN + "\n")
    srv = Served(path, _env(upstream.url))
    # Keys made before the server starts (in the ledger file) are the server's keys.
    srv.key, _ = srv.create("--name", "app", "--team", "finance")
    srv.revoked, revoked_id = srv.create("--name", "old")
    srv.ok("keys", "revoke", revoked_id)
    port = free_port()
    # With auth on, serving every interface is allowed, and there is nothing to warn about.
    srv.proc = start_server(path, srv.env, port, "--host", "0.0.0.0", "--admin-key-file",
                            "admin.key")
    srv.url = f"http://127.0.0.1:{port}"
    yield srv
    stop_server(srv.proc)
    out = srv.proc.stdout.read().decode() if srv.proc.stdout else ""
    assert "WARNING" not in out and ADMIN not in out


def _chat(url: str, key: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    done = client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}])
    return done.choices[0].message.content or ""


def test_a_cli_key_calls_models_and_a_revoked_one_gets_401(served):
    assert _chat(served.url, served.key)
    with pytest.raises(openai.AuthenticationError) as err:
        _chat(served.url, served.revoked)
    assert err.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _chat(served.url, "sk-flowc-" + "x" * 43)


def test_costs_and_runs_present_the_admin_key_from_the_environment(served):
    _chat(served.url, served.key)
    done = served.ok("costs", "--by", "model", FLOWC_ADMIN_KEY=ADMIN)
    assert "openai/gpt-4o-mini" in done.stdout and "calls" in done.stdout
    done = served.ok("costs", "--json", "--sql",
                     "SELECT key_name, team FROM requests WHERE key_name = 'app' LIMIT 1",
                     FLOWC_ADMIN_KEY=ADMIN)
    assert json.loads(done.stdout) == [{"key_name": "app", "team": "finance"}]
    served.ok("runs", FLOWC_ADMIN_KEY=ADMIN)


def test_costs_without_the_admin_key_says_what_to_set(served):
    server_file = served.path / ".flowc" / "server.json"
    info = json.loads(server_file.read_text())
    # A server file without the key (one this user cannot read the key from).
    server_file.write_text(json.dumps({k: v for k, v in info.items() if k != "admin_key"}))
    try:
        for args in (["costs"], ["costs", "--sql", "SELECT 1"], ["runs"]):
            done = served.flowc(*args)
            assert done.returncode == 1
            assert "this server (" in done.stderr
            assert "requires the admin key: set FLOWC_ADMIN_KEY" in done.stderr
        done = served.flowc("costs", FLOWC_ADMIN_KEY="sk-flowc-wrong")
        assert done.returncode == 1 and "refused the admin key" in done.stderr
        assert "sk-flowc-wrong" not in done.stderr
    finally:
        server_file.write_text(json.dumps(info))


def test_the_cli_names_the_server_file_the_server_writes():
    from runtime.cli import SERVER_FILE
    from runtime.server import SERVER_FILE as WRITTEN

    assert SERVER_FILE == WRITTEN



def test_keys_through_the_running_server_take_effect_on_the_next_request(served):
    admin = {"FLOWC_ADMIN_KEY": ADMIN}
    made = served.ok("keys", "create", "--name", "live", "--team", "ops", "--budget", "2",
                     "--tag", "env=dev", **admin)
    secret = made.stdout.strip()
    assert SECRET.fullmatch(secret)
    key_id = re.search(r"Created key (key_[0-9a-f]{16})", made.stderr).group(1)
    assert _chat(served.url, secret)  # known to the server at once
    listed = served.ok("keys", "list", "--team", "ops", **admin)
    assert key_id in listed.stdout and "$2.00/month" in listed.stdout
    shown = json.loads(served.ok("keys", "show", key_id, "--json", **admin).stdout)
    assert (shown["name"], shown["team"], shown["tags"]) == ("live", "ops", ["env=dev"])
    assert Decimal(shown["spend"]["key"]["spent_usd"]) > 0
    served.ok("keys", "update", key_id, "--read-only", **admin)
    with pytest.raises(openai.PermissionDeniedError):
        _chat(served.url, secret)
    served.ok("keys", "revoke", key_id, **admin)
    with pytest.raises(openai.AuthenticationError) as err:
        _chat(served.url, secret)
    assert err.value.status_code == 401
    for done in (listed, served.ok("keys", "show", key_id, **admin),
                 served.ok("keys", "list", "--json", **admin)):
        assert secret not in done.stdout + done.stderr
    done = served.flowc("keys", "show", "key_nope", **admin)
    assert done.returncode == 1 and "key_nope" in done.stderr


def test_the_server_file_gives_the_cli_the_admin_key_and_only_its_owner_reads_it(served):
    server_file = served.path / ".flowc" / "server.json"
    assert server_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(server_file.read_text())["admin_key"] == ADMIN
    assert "app" in served.ok("keys", "list").stdout
    served.ok("costs")
    served.ok("runs")


def test_costs_by_key_team_and_tag(served):
    admin = {"FLOWC_ADMIN_KEY": ADMIN}
    made = served.ok("keys", "create", "--name", "tagged", "--team", "research", "--tag",
                     "proj=x", **admin)
    _chat(served.url, made.stdout.strip())
    rows = {by: {r["key"]: r for r in json.loads(
                 served.ok("costs", "--by", by, "--json", **admin).stdout)["rows"]}
            for by in ("key", "team", "tag")}
    assert rows["team"]["research"]["calls"] == 1
    assert rows["tag"]["proj=x"]["calls"] == 1
    assert [r["calls"] for k, r in rows["key"].items() if "tagged" in str(k)] == [1]
    table = served.ok("costs", "--by", "team", **admin).stdout
    assert table.splitlines()[0].split()[0] == "team" and "research" in table
    key_id = re.search(r"Created key (key_[0-9a-f]{16})", made.stderr).group(1)
    for only in (["--team", "research"], ["--key", key_id], ["--tag", "proj=x"]):
        data = json.loads(served.ok("costs", "--by", "model", "--json", *only, **admin).stdout)
        assert data["totals"]["calls"] == 1, only
    done = served.flowc("costs", "--sql", "SELECT 1", "--team", "research", **admin)
    assert done.returncode == 2 and "with --sql, say it in the query" in done.stderr
