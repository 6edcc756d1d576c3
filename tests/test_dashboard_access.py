"""The dashboard with auth on, in headless Chromium against a real `flowc serve`: it asks for
a flowc key, shows a team member their own team's spend and the admin everyone's, narrows
by team, key and tag, lists budget alerts, and forgets the key on sign out."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import openai_text, wait_until
from tests.keyed import ADMIN, Keyed, close, keyed
from tests.tools import require

# flat-model costs $10 per 1M output tokens and nothing for input: 1,000 tokens is $0.01.
CONFIG = """\
models:
  flat: openai/flat-model
prices:
  openai/flat-model: {input: 0, output: 10}
budgets:
  teams:
    finance: {usd: 0.05}
alerts:
  thresholds: [50, 80, 100]
ledger:
  flush_interval: 0.1
"""
# Who spends what: finance $0.03 of its $0.05 (60%: its 50% alert), research-bot $0.04 of
# its own $0.05 (80%: its 50% and 80% alerts, in one call).
SPEND = [("billing-bot", 1000), ("billing-bot", 1000), ("ledger-bot", 1000),
         ("research-bot", 4000)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("dashboard"), CONFIG)
    k.keys({"name": "billing-bot", "team": "finance"},
           {"name": "ledger-bot", "team": "finance", "tags": ["project=apollo"]},
           {"name": "research-bot", "team": "research", "budget_usd": "0.05"},
           {"name": "leaver", "team": "finance"})
    k.start()
    try:
        for name, tokens in SPEND:  # one at a time: the alert fires on the third
            k.openai.then(openai_text("ok", prompt_tokens=12, completion_tokens=tokens))
            r = httpx.post(k.url + "/v1/chat/completions", headers=k.auth(name), timeout=30,
                           json={"model": "flat", "max_tokens": tokens,
                                 "messages": [{"role": "user", "content": "Tally it."}]})
            assert r.status_code == 200, r.text
        wait_until(lambda: k.sql("SELECT count(*) FROM requests")[0][0] == len(SPEND)
                   and k.sql("SELECT count(*) FROM alerts")[0][0] == 3, 15)
        yield k
    finally:
        close(k)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


class Visit:
    """One browser tab on the dashboard, and every request it made."""

    def __init__(self, browser: Any, srv: Keyed) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 1400},
                                           accept_downloads=True)
        self.page = self.context.new_page()
        self.sent: list[tuple[str, str | None]] = []  # (url, authorization)
        self.page.on("request", lambda r: self.sent.append(
            (r.url, r.headers.get("authorization"))))
        self.srv = srv
        self.page.goto(srv.url + "/dashboard")

    def sign_in(self, secret: str) -> None:
        self.page.get_by_label("flowc key").fill(secret)
        self.page.get_by_role("button", name="sign in").click()

    def panel(self, heading: str) -> Any:
        return self.page.locator("section").filter(
            has=self.page.get_by_role("heading", name=heading, exact=True))

    def rows(self, heading: str) -> list[list[str]]:
        """A panel's table as the user reads it: the text of each body row's cells."""
        return self.panel(heading).locator("tr").evaluate_all(
            "trs => trs.slice(1).map(tr => [...tr.cells].map(c => c.innerText.trim()))")

    def shows(self, text: str) -> Any:
        from playwright.sync_api import expect
        expect(self.page.get_by_text(text, exact=False).first).to_be_visible(timeout=15000)

    def spend(self, value: str) -> None:
        from playwright.sync_api import expect
        expect(self.page.locator(".kpi", has_text="spend").locator("b")).to_have_text(
            value, timeout=15000)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: Any, srv: Keyed) -> Iterator[Visit]:
    v = Visit(browser, srv)
    yield v
    v.close()


def test_with_auth_on_the_page_asks_for_a_key_and_refuses_a_wrong_one(visit, srv):
    visit.shows("This flowc server needs a key")
    page = visit.page
    assert not page.get_by_text("Daily spend (USD)").is_visible()
    visit.sign_in("sk-flowc-not-a-key-of-this-server")
    visit.shows("That key was not accepted")
    assert page.get_by_label("flowc key").is_visible()
    assert not page.get_by_text("Daily spend (USD)").is_visible()
    before = len(visit.sent)
    visit.sign_in(ADMIN)
    visit.spend("$0.07")
    visit.shows("signed in as admin")
    # The key goes in a header on every call to the API, never in a URL, and is kept
    # nowhere but the tab.
    api = [a for u, a in visit.sent[before:] if "/v1/" in u]
    assert api and all(a == f"Bearer {ADMIN}" for a in api), api
    assert all(srv.secrets["billing-bot"] not in u and ADMIN not in u and "not-a-key" not in u
               for u, _ in visit.sent)
    assert visit.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0


def test_sign_out_forgets_the_key(visit):
    visit.sign_in(ADMIN)
    visit.spend("$0.07")
    visit.page.get_by_role("button", name="sign out").click()
    visit.shows("This flowc server needs a key")
    assert not visit.page.get_by_text("$0.07").first.is_visible()
    visit.page.reload()  # the tab no longer holds it
    visit.shows("This flowc server needs a key")
    assert visit.page.evaluate("sessionStorage.length") == 0


def shown(srv: Keyed, name: str) -> str:
    """How the page names a key: two keys may share a name, never an id."""
    return f"{name} ({srv.ids[name]})"


def download_csv(visit: Visit) -> list[dict[str, str]]:
    with visit.page.expect_download() as dl:
        visit.page.get_by_role("link", name="CSV").click()
    return list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))


def test_a_team_members_key_sees_its_teams_spend_only(visit, srv):
    visit.sign_in(srv.secrets["billing-bot"])
    visit.spend("$0.03")
    visit.shows("signed in with key billing-bot")
    visit.shows("You see team finance's spend")
    visit.shows("Team finance's budget: $0.05 a month, $0.03 spent.")
    assert visit.rows("Spend by team") == [["finance", "3", "0", "3,036", "$0.03"]]
    assert visit.rows("Spend by key") == [
        [shown(srv, "billing-bot"), "2", "0", "2,024", "$0.02"],
        [shown(srv, "ledger-bot"), "1", "0", "1,012", "$0.01"]]
    assert len(visit.rows("Latest calls")) == 3
    # Nothing from the other team anywhere on the page, nor in the export.
    assert "research" not in visit.page.inner_text("body")
    table = download_csv(visit)
    assert sorted(r["key_name"] for r in table) == ["billing-bot", "billing-bot", "ledger-bot"]


def test_the_admin_sees_every_team_and_the_filters_narrow_it(visit, srv):
    visit.sign_in(ADMIN)
    visit.spend("$0.07")
    assert [(r[0], r[-1]) for r in visit.rows("Spend by team")] == [
        ("research", "$0.04"), ("finance", "$0.03")]
    page = visit.page
    page.get_by_label("team", exact=True).select_option(label="research")
    visit.spend("$0.04")
    assert [r[0] for r in visit.rows("Spend by key")] == [shown(srv, "research-bot")]
    # time, workflow, step, model, served by, key, team, ...
    assert [r[5:7] for r in visit.rows("Latest calls")] == [["research-bot", "research"]]
    assert [r["key_name"] for r in download_csv(visit)] == ["research-bot"]
    page.get_by_label("team", exact=True).select_option(label="all teams")
    page.get_by_label("key", exact=True).select_option(label=shown(srv, "billing-bot"))
    visit.spend("$0.02")
    assert [r[0] for r in visit.rows("Spend by team")] == ["finance"]
    page.get_by_label("key", exact=True).select_option(label="all keys")
    page.get_by_label("tag", exact=True).select_option(label="project=apollo")
    visit.spend("$0.01")
    assert [r[0] for r in visit.rows("Spend by key")] == [shown(srv, "ledger-bot")]


def test_a_crossed_budget_threshold_shows_as_an_alert(visit, srv):
    month = datetime.now(UTC).date().replace(day=1).isoformat()
    visit.sign_in(ADMIN)
    visit.spend("$0.07")
    assert [r[1:] for r in visit.rows("Budget alerts")] == [
        ["key research-bot", "80%", "$0.04", "$0.05", f"month from {month}"],
        ["key research-bot", "50%", "$0.04", "$0.05", f"month from {month}"],
        ["team finance", "50%", "$0.03", "$0.05", f"month from {month}"]]
    # A team member sees its team's alerts, not another team's key's.
    visit.page.get_by_role("button", name="sign out").click()
    visit.sign_in(srv.secrets["ledger-bot"])
    visit.spend("$0.03")
    assert [r[1:3] for r in visit.rows("Budget alerts")] == [["team finance", "50%"]]


def test_a_key_revoked_while_signed_in_is_asked_for_again(visit, srv):
    visit.sign_in(srv.secrets["leaver"])
    visit.spend("$0.03")
    r = httpx.delete(f"{srv.url}/v1/keys/{srv.ids['leaver']}",
                     headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200, r.text
    visit.page.get_by_role("button", name="apply").click()
    visit.shows("That key was not accepted")
    assert not visit.page.get_by_text("$0.03").first.is_visible()


def test_the_dashboard_prints_dollars_as_every_flowc_output_does(visit):
    """Its amounts read as `flowc costs`, `flowc run` and the run graph print them
    (flowc.cost.usd): a cost under a millionth is not $0.000000, and none has an exponent."""
    import random

    from flowc.cost import usd

    rng = random.Random(7)
    amounts = [0, 1e-7, 1.234e-8, 9.99e-7, 1e-6, 0.01, 0.0100004, 1, 12.345678, 1234.5, -0.5,
               *(rng.uniform(0, 10) * 10 ** rng.randint(-12, 4) for _ in range(300))]
    shown = visit.page.evaluate("amounts => amounts.map(fmtUsd)", amounts)
    assert shown == [usd(a) for a in amounts]
    assert shown[1:3] == ["$0.0000001", "$0.000000012"]
