"""Who may do what over HTTP once auth is on: every endpoint against {no key, a key, another
team's key, the admin key}; the `/v1/keys` admin API; a key's reads held to its team; a
pipeline run charged to the key that ran it. A real `flowc serve` with loopback providers."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.access.keys import Key, KeySpecError, apply_spec, hash_secret
from tests.fakes import openai_text, wait_until
from tests.keyed import ADMIN, Keyed, close, keyed

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  flat: openai/flat-model
prices:
  openai/flat-model: {input: 0, output: 10}
ledger:
  flush_interval: 0.1
"""
PIPELINE = """\
name: {name}
inputs: {{topic: {{type: string}}}}
steps:
  - {{id: a, type: llm, model: fast, prompt: "say ${{input.topic}}"}}
output: ${{a}}
"""
# Each caller of the matrix, by the key it presents (None: no key).
CALLERS = ("none", "user", "other", "admin")


class Server:
    def __init__(self, k: Keyed) -> None:
        self.k = k
        self.secrets: dict[str, str] = {"admin": ADMIN}
        self.ids: dict[str, str] = {}
        self.runs: dict[str, str] = {}  # key name -> a run it made

    def headers(self, who: str | None) -> dict[str, str]:
        if who is None or who == "none":
            return {}
        return {"authorization": f"Bearer {self.secrets[who]}"}

    def call(self, method: str, path: str, who: str | None, body: Any = None,
             **params: Any) -> httpx.Response:
        return httpx.request(method, self.k.url + path, headers=self.headers(who),
                             json=body, params=params or None, timeout=30)

    def make_key(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.call("POST", "/v1/keys", "admin", spec)
        assert r.status_code == 201, r.text
        made = r.json()
        self.secrets[spec["name"]], self.ids[spec["name"]] = made["key"], made["id"]
        return dict(made)

    def chat(self, who: str, tag: str | None = None, model: str = "fast") -> httpx.Response:
        headers = self.headers(who) | ({"x-flowc-tags": tag} if tag else {})
        return httpx.post(self.k.url + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": model, "max_tokens": 1000,
                                "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    k = keyed(tmp_path_factory.mktemp("access"), CONFIG)
    k.start()
    s = Server(k)
    # "user" and "mate" are team finance, "other" is team ops, "solo" has no team.
    s.make_key({"name": "user", "team": "finance", "tags": ["app=billing"]})
    s.make_key({"name": "mate", "team": "finance"})
    s.make_key({"name": "other", "team": "ops", "tags": ["app=pager"]})
    s.make_key({"name": "solo"})
    s.make_key({"name": "reader", "team": "finance", "read_only": True})
    s.make_key({"name": "narrow", "team": "finance", "pipelines": ["report-*"]})
    s.make_key({"name": "spare", "team": "ops"})
    for name in ("echo", "report-weekly"):
        r = s.call("PUT", f"/v1/workflows/{name}", "admin", {"yaml": PIPELINE.format(name=name)})
        assert r.status_code == 200, r.text
    for who in ("user", "mate", "other", "solo"):
        assert s.chat(who, tag="env=test").status_code == 200
    for who in ("user", "other"):
        r = s.call("POST", "/v1/workflow/echo", who, {"input": {"topic": who}})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        s.runs[who] = r.json()["run_id"]
    k.ids = s.ids
    k.rows("user", 2)  # the chat and the run's step are in the ledger
    yield s
    out = k.stop()
    close(k)
    for name, secret in s.secrets.items():
        assert secret not in out, f"{name}'s secret is in the server's log"


# -- the permission matrix -------------------------------------------------------------------
# (method, path, body, {caller: status}); a missing caller means 401 for "none" and 200
# for everyone else. Paths name keys and runs as {user_key}, {spare_key}, {user_run}.
OPEN = {"none": 200}
ADMIN_ONLY = {"user": 403, "other": 403}
MATRIX: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/", None, OPEN),
    ("GET", "/health", None, OPEN),
    ("GET", "/dashboard", None, OPEN),
    ("GET", "/ready", None, {}),
    ("GET", "/docs", None, {}),
    ("GET", "/v1/models", None, {}),
    ("GET", "/v1/models/fast", None, {}),
    ("POST", "/v1/chat/completions", {"model": "fast", "messages": [
        {"role": "user", "content": "hi"}]}, {}),
    ("GET", "/v1/workflows", None, {}),
    ("PUT", "/v1/workflows/matrix", {"yaml": PIPELINE.format(name="matrix")}, ADMIN_ONLY),
    ("POST", "/v1/workflow/echo", {"input": {"topic": "m"}}, {}),
    ("GET", "/v1/runs", None, {}),
    ("GET", "/v1/runs/{user_run}", None, {"other": 404}),
    ("GET", "/v1/costs/summary", None, {}),
    ("GET", "/v1/costs/summary?team=finance", None, {"other": 403}),
    ("GET", "/v1/costs/summary?team=ops", None, {"user": 403}),
    ("GET", "/v1/costs/dashboard", None, {}),
    ("GET", "/v1/costs/dashboard?team=ops", None, {"user": 403}),
    ("GET", "/v1/costs/export.csv", None, {}),
    ("GET", "/v1/costs/export.csv?team=finance", None, {"other": 403}),
    ("POST", "/v1/costs/sql", {"sql": "SELECT 1"}, ADMIN_ONLY),
    ("GET", "/v1/alerts", None, {}),
    ("GET", "/v1/mcp/servers", None, {}),
    ("GET", "/v1/mcp/tools", None, {}),
    ("POST", "/v1/mcp/refresh", None, ADMIN_ONLY),
    ("GET", "/v1/keys", None, ADMIN_ONLY),
    ("POST", "/v1/keys", {"name": "made-in-matrix"}, {**ADMIN_ONLY, "admin": 201}),
    ("GET", "/v1/keys/self", None, {"admin": 400}),
    ("GET", "/v1/keys/{user_key}", None, ADMIN_ONLY),
    ("PATCH", "/v1/keys/{user_key}", {"rpm": 1000}, ADMIN_ONLY),  # a key cannot raise its own
    ("DELETE", "/v1/keys/{spare_key}", None, ADMIN_ONLY),
    ("DELETE", "/v1/cache?pipeline=none-such", None, ADMIN_ONLY),
]


@pytest.mark.parametrize(("method", "path", "body", "expected"), MATRIX,
                         ids=[f"{m} {p}" for m, p, _, _ in MATRIX])
def test_every_endpoint_answers_each_caller_as_the_permission_table_says(
        srv: Server, method: str, path: str, body: Any, expected: dict[str, int]) -> None:
    path = path.format(user_key=srv.ids["user"], spare_key=srv.ids["spare"],
                       user_run=srv.runs["user"])
    got = {}
    for who in CALLERS:  # the admin last: its DELETE revokes a key
        r = srv.call(method, path, who, body)
        got[who] = r.status_code
        if r.status_code in (401, 403):
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, r.text
            assert err["type"] == ("permission_error" if r.status_code == 403
                                   else "invalid_request_error"), r.text
            if who in srv.secrets:
                assert srv.secrets[who] not in r.text
    want = {"none": 401, "user": 200, "other": 200, "admin": 200} | expected
    assert got == want


# -- a key's reads are its team's ------------------------------------------------------------
def test_a_key_sees_only_its_teams_cost_rows(srv: Server) -> None:
    by_key = srv.call("GET", "/v1/costs/summary", "user", by="key").json()
    names = {r["key"].split(" ")[0] for r in by_key["rows"]}
    assert names <= {"user", "mate", "narrow", "reader"} and {"user", "mate"} <= names
    everyone = srv.call("GET", "/v1/costs/summary", "admin", by="team").json()
    teams = {r["key"]: r["calls"] for r in everyone["rows"]}
    assert by_key["totals"]["calls"] == teams["finance"] < everyone["totals"]["calls"]

    text = srv.call("GET", "/v1/costs/export.csv", "user").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and {r["team"] for r in rows} == {"finance"}
    board = srv.call("GET", "/v1/costs/dashboard", "other").json()
    assert board["overall"]["calls"] == teams["ops"]
    latest = srv.call("GET", "/v1/costs/dashboard", "user").json()["latest"]
    finance = {"user", "mate", "narrow", "reader", "tiny"}
    assert latest and all(r["team"] == "finance" and r["key_name"] in finance for r in latest)
    # one key's rows within the team; another team's key is refused
    mine = srv.call("GET", "/v1/costs/summary", "user", key=srv.ids["mate"]).json()
    assert mine["totals"]["calls"] >= 1
    assert srv.call("GET", "/v1/costs/summary", "user", key=srv.ids["other"]).json()[
        "totals"]["calls"] == 0


def test_a_key_without_a_team_sees_only_its_own_rows(srv: Server) -> None:
    solo = srv.call("GET", "/v1/costs/summary", "solo", by="key").json()
    assert [r["key"] for r in solo["rows"]] == [f"solo ({srv.ids['solo']})"]
    assert srv.call("GET", "/v1/costs/summary", "solo", team="finance").status_code == 403
    r = srv.call("GET", "/v1/costs/summary", "solo", key=srv.ids["user"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert srv.call("GET", "/v1/runs", "solo").json()["runs"] == []


def test_a_key_lists_and_reads_only_its_teams_runs(srv: Server) -> None:
    listed = srv.call("GET", "/v1/runs", "mate").json()["runs"]
    assert srv.runs["user"] in {r["run_id"] for r in listed}
    assert {r["team"] for r in listed} == {"finance"}
    assert srv.runs["other"] not in {r["run_id"] for r in listed}
    r = srv.call("GET", f"/v1/runs/{srv.runs['other']}", "user")
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        f"no run '{srv.runs['other']}'")
    assert srv.call("GET", f"/v1/runs/{srv.runs['other']}", "admin").status_code == 200


def test_a_key_runs_and_lists_only_the_pipelines_it_is_allowed(srv: Server) -> None:
    names = {w["name"] for w in srv.call("GET", "/v1/workflows", "narrow").json()["workflows"]}
    assert "report-weekly" in names and "echo" not in names
    r = srv.call("POST", "/v1/workflow/echo", "narrow", {"input": {"topic": "x"}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "pipeline_not_allowed"
    assert "report-*" in r.json()["error"]["message"]
    r = srv.call("POST", "/v1/workflow/report-weekly", "narrow", {"input": {"topic": "x"}})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    r = srv.call("POST", "/v1/workflow/echo", "reader", {"input": {"topic": "x"}})
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    assert srv.call("GET", "/v1/costs/summary", "reader").status_code == 200


# -- a run is charged to its key -------------------------------------------------------------
def test_a_pipeline_run_over_http_is_charged_to_the_callers_key(srv: Server) -> None:
    run_id = srv.runs["user"]
    rows = srv.k.sql(f"SELECT key_id, key_name, team, workflow_name FROM requests "
                     f"WHERE run_id = '{run_id}'")
    assert rows == [[srv.ids["user"], "user", "finance", "echo"]]
    assert srv.k.sql(f"SELECT key_id, team FROM runs WHERE id = '{run_id}'") == [
        [srv.ids["user"], "finance"]]


def test_max_cost_usd_in_the_request_caps_the_run(srv: Server) -> None:
    r = srv.call("POST", "/v1/workflow/echo", "user",
                 {"input": {"topic": "x"}, "max_cost_usd": 0.0000001})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and "max_cost_usd" in json.dumps(r.json())
    r = srv.call("POST", "/v1/workflow/echo", "user",
                 {"input": {"topic": "x"}, "max_cost_usd": 5})
    assert r.json()["status"] == "succeeded"
    for bad in ("lots", -1, True, [1]):
        r = srv.call("POST", "/v1/workflow/echo", "user",
                     {"input": {"topic": "x"}, "max_cost_usd": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_cost_usd", bad


# -- costs by key, team, tag -----------------------------------------------------------------
def test_costs_by_key_team_and_tag(srv: Server) -> None:
    by_team = {r["key"]: r["calls"] for r in
               srv.call("GET", "/v1/costs/summary", "admin", by="team").json()["rows"]}
    assert by_team["ops"] >= 2 and by_team["finance"] >= 3 and by_team["(no team)"] >= 1
    by_tag = {r["key"]: r["calls"] for r in
              srv.call("GET", "/v1/costs/summary", "admin", by="tag").json()["rows"]}
    assert by_tag["env=test"] >= 4 and by_tag["app=billing"] >= 2 and by_tag["app=pager"] >= 2
    by_key = srv.call("GET", "/v1/costs/summary", "admin", by="key").json()["rows"]
    assert f"other ({srv.ids['other']})" in {r["key"] for r in by_key}
    tagged = srv.call("GET", "/v1/costs/summary", "admin", tag="app=pager").json()
    assert tagged["totals"]["calls"] == by_tag["app=pager"]
    # a filter is a value, not SQL
    r = srv.call("GET", "/v1/costs/summary", "admin", team="x' OR '1'='1")
    assert r.status_code == 200 and r.json()["totals"]["calls"] == 0
    assert srv.call("GET", "/v1/costs/summary", "admin", by="nope").status_code == 400


# -- the keys API ----------------------------------------------------------------------------
def test_keys_create_list_show_update_and_revoke(srv: Server) -> None:
    made = srv.make_key({"name": "lifecycle", "team": "ops", "budget": "2.5", "rpm": 60,
                         "models": "fast", "expires": "30d"})
    secret = made.pop("key")
    assert secret.startswith("sk-flowc-") and made["key_hint"].endswith(secret[-4:])
    assert made["budget_usd"] == "2.5" and made["state"] == "active" and "hash" not in made
    key_id = made["id"]
    assert srv.chat("lifecycle").status_code == 200

    listed = srv.call("GET", "/v1/keys", "admin", team="ops")
    assert key_id in {k["id"] for k in listed.json()["keys"]}
    assert {k["team"] for k in listed.json()["keys"]} == {"ops"}
    shown = srv.call("GET", f"/v1/keys/{key_id}", "admin").json()
    assert shown["spend"]["key"]["limit_usd"] == "2.5"
    own = srv.call("GET", "/v1/keys/self", "lifecycle").json()
    assert own["id"] == key_id and own["spend"]["key"]["period"] == "month"
    for r in (listed, srv.call("GET", f"/v1/keys/{key_id}", "admin"),
              srv.call("GET", "/v1/keys/self", "lifecycle")):
        assert secret not in r.text and hash_secret(secret) not in r.text

    r = srv.call("PATCH", f"/v1/keys/{key_id}", "admin", {"rpm": 5, "team": None})
    assert r.status_code == 200 and r.json()["rpm"] == 5 and r.json()["team"] is None
    assert srv.chat("lifecycle").headers["x-ratelimit-limit-requests"] == "5"

    r = srv.call("DELETE", f"/v1/keys/{key_id}", "admin")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = srv.chat("lifecycle")  # the very next request
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
    assert srv.call("GET", "/v1/keys/self", "lifecycle").status_code == 401


def test_changes_to_one_key_sent_at_once_all_take_effect(srv: Server) -> None:
    """Each change reads the key as the one before it left it: none is lost to another
    made at the same moment (an admin script setting limits in parallel)."""
    key_id = srv.make_key({"name": "parallel", "team": "ops"})["id"]
    changes = [{"rpm": 70}, {"tpm": 9000}, {"budget": "3"}, {"models": "fast"},
               {"read_only": True}, {"tags": ["env=prod"]}, {"expires": "40d"},
               {"pipelines": ["echo"]}]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.k.url, timeout=30,
                                     headers=srv.headers("admin")) as client:
            return await asyncio.gather(*(client.patch(f"/v1/keys/{key_id}", json=c)
                                          for c in changes))

    assert all(r.status_code == 200 for r in asyncio.run(send_all()))
    key = srv.call("GET", f"/v1/keys/{key_id}", "admin").json()
    assert (key["rpm"], key["tpm"], key["budget_usd"], key["models"], key["read_only"],
            key["tags"], key["pipelines"]) == (70, 9000, "3", ["fast"], True,
                                               ["env=prod"], ["echo"])
    assert key["expires_at"] is not None


@pytest.mark.parametrize(("spec", "param"), [
    ({"name": "x", "budget": "lots"}, "budget"),
    ({"name": "x", "period": "year"}, "period"),
    ({"name": "x", "rpm": -1}, "rpm"),
    ({"name": "x", "read_only": "yes"}, "read_only"),
    ({"name": "x", "expires": "soon"}, "expires"),
    ({"name": "x", "colour": "red"}, None),
    ({"team": "ops"}, "name"),
])
def test_a_bad_key_setting_is_a_400_naming_it(srv: Server, spec: dict[str, Any],
                                              param: str | None) -> None:
    r = srv.call("POST", "/v1/keys", "admin", spec)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_key_setting" and err["param"] == param
    assert (param or "colour") in err["message"]
    patch = {"name": ""} if param == "name" else {k: v for k, v in spec.items() if k != "name"}
    r = srv.call("PATCH", f"/v1/keys/{srv.ids['mate']}", "admin", patch)
    assert r.status_code == 400, r.text


def test_the_keys_api_refuses_what_is_not_a_key(srv: Server) -> None:
    r = srv.call("GET", "/v1/keys/key_0000000000000000", "admin")
    assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
    assert srv.call("PATCH", "/v1/keys/nope", "admin", {"rpm": 1}).status_code == 404
    assert srv.call("DELETE", "/v1/keys/nope", "admin").status_code == 404
    r = httpx.post(srv.k.url + "/v1/keys", content=b"[1, 2]", timeout=10,
                   headers=srv.headers("admin") | {"content-type": "application/json"})
    assert r.status_code == 400
    r = srv.call("GET", "/v1/keys/self", "admin")
    assert "the admin key is not a virtual key" in r.json()["error"]["message"]


def test_alerts_show_a_key_its_own_and_its_teams(srv: Server) -> None:
    # flat-model costs $10 per 1M output tokens: 1,000 of them are half of $0.02
    srv.make_key({"name": "tiny", "team": "finance", "budget": "0.02"})
    srv.k.openai.then(openai_text("ok", prompt_tokens=5, completion_tokens=1000))
    assert srv.chat("tiny", model="flat").status_code == 200
    wait_until(lambda: srv.call("GET", "/v1/alerts", "admin").json()["alerts"], 10)
    alerts = srv.call("GET", "/v1/alerts", "admin").json()["alerts"]
    assert [(a["scope_kind"], a["scope_name"], a["threshold"]) for a in alerts] == [
        ("key", srv.ids["tiny"], 50)]
    assert srv.call("GET", "/v1/alerts", "tiny").json()["alerts"] == alerts
    assert srv.call("GET", "/v1/alerts", "other").json()["alerts"] == []
    assert srv.call("GET", "/v1/alerts", "user").json()["alerts"] == []


def test_the_server_file_is_the_owners_only_and_holds_the_admin_key(srv: Server) -> None:
    path = srv.k.project / ".flowc" / "server.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["admin_key"] == ADMIN and info["url"].endswith(f":{srv.k.port}")


# -- the settings parser ---------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)
SETTINGS = st.sampled_from(["name", "team", "budget_usd", "budget", "period", "rpm", "tpm",
                            "models", "pipelines", "read_only", "tags", "expires_at",
                            "expires"]) | st.text(max_size=8)
DURATIONS = st.from_regex(r"\A[0-9]{1,14} ?[smhdw]\Z")


@settings(max_examples=100, deadline=None)
@given(DURATIONS)
def test_any_expiry_duration_makes_a_key_or_a_key_spec_error(text: str) -> None:
    now = datetime.now(UTC)
    key = Key(id="key_1", name="k", hash="h", created_at=now)
    try:
        assert apply_spec(key, {"expires": text}, now).expires_at is not None
    except KeySpecError as exc:
        assert str(exc).startswith("expires: ")


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(SETTINGS, JSON, max_size=4))
def test_any_json_settings_make_a_key_or_a_key_spec_error(spec: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    key = Key(id="key_1", name="k", hash="h", created_at=now)
    try:
        out = apply_spec(key, spec, now)
    except KeySpecError:
        return
    assert isinstance(out, Key) and out.name.strip()
