"""A paused approval is told apart from a step that has not started: in the run record
(`waiting`, with `waiting_for`, against `pending`), in the runs list's step counts and on the
run's graph; cancelling the run cancels both, the approval keeping what it waited for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from flowc.config import ProjectConfig
from runtime import runlist, runs
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from runtime.rungraph import mark
from tests.dsl_b import CONFIG, compiled_at, write
from tests.fakes import FakeServer, hang, openai_text

GATED = """\
name: gated
steps:
  - id: draft
    type: llm
    model: m
    prompt: Draft a post
  - id: review
    type: approval
    message: "Publish ${draft}?"
    value: ${draft}
  - id: publish
    type: llm
    model: m
    prompt: Publish ${review}
  - id: slow
    type: llm
    model: m
    prompt: Something slow
output: {published: "${publish}", slow: "${slow}"}
"""


def answer(rec):
    """`slow` hangs; the draft is answered at once."""
    if "slow" in rec.body["messages"][-1]["content"]:
        return hang(30)(rec)
    return openai_text("draft")(rec)


def test_a_paused_approval_is_waiting_and_what_follows_it_is_pending(tmp_path: Path):
    compiled = compiled_at(write(tmp_path, gated=GATED))
    fake = FakeServer("openai").start()

    async def go() -> tuple[dict, dict, list]:
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={"OPENAI_BASE_URL": fake.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        ledger = Ledger(tmp_path / "ledger.duckdb", 0.1)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            result = await Executor(caller).run(compiled, {})
            runs.save(ledger, result)
            # A second run is cancelled while its approval waits and `slow` still runs.
            cancelled: list = []
            fake.script.clear()
            fake.then(*[answer] * 2)
            task = asyncio.create_task(Executor(caller).run(
                compiled, {}, on_cancel=cancelled.append))
            while len(fake.requests) < 4:  # the draft answered, `slow` hangs
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            listed = runlist.recent(lambda sql, params=(), **_: ledger.select(sql, params),
                                    run_id=result.run_id)
            return json.loads(json.dumps(result.to_dict(), default=str)), \
                json.loads(json.dumps(cancelled[0].to_dict(), default=str)), listed["runs"]
        finally:
            await providers.close()
            ledger.close()

    try:
        fake.then(*[lambda rec: openai_text("draft")(rec)] * 2)  # the first run: no hang
        record, stopped, listed = asyncio.run(go())
    finally:
        fake.stop()
    steps = {s["id"]: s for s in record["metrics"]["steps"]}
    assert record["status"] == "waiting"
    assert {k: s["status"] for k, s in steps.items()} == {
        "draft": "done", "review": "waiting", "publish": "pending", "slow": "done"}
    assert steps["review"]["waiting_for"]["message"] == "Publish draft?"
    assert "waiting_for" not in steps["publish"]
    # The runs list counts them apart; the graph draws them apart.
    assert listed[0]["step_statuses"] == {"done": 2, "waiting": 1, "pending": 1}
    assert mark(steps["review"]).attrs["class"] == "step status-waiting"
    assert mark(steps["publish"]).attrs["class"] == "step status-pending"
    # Cancelled: both are cancelled; the approval keeps what it was waiting for.
    cancelled = {s["id"]: s for s in stopped["metrics"]["steps"]}
    assert stopped["status"] == "cancelled"
    assert {k: s["status"] for k, s in cancelled.items()} == {
        "draft": "done", "review": "cancelled", "publish": "cancelled", "slow": "cancelled"}
    assert cancelled["review"]["waiting_for"]["message"] == "Publish draft?"
    assert "waiting_for" not in cancelled["publish"]


def test_a_record_from_before_pending_is_drawn_as_not_started():
    assert mark({"id": "x", "status": "waiting"}).attrs["class"] == "step status-pending"
