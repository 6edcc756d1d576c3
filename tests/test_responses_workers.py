"""`previous_response_id` under `flowc serve --workers 2`: the conversations flowc keeps live
in the supervisor, so a follow-up finds the response it names whichever worker answered
that one. A chain of 21 calls, each on a fresh connection (spread over both workers),
translated to a loopback Anthropic: every follow-up is answered, and Anthropic is sent the
whole conversation each time."""

from __future__ import annotations

import itertools
import os
import textwrap
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port
from tests.responses_chain import CONFIG, respond, turn

FOLLOW_UPS = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeServer]]:
    project = tmp_path_factory.mktemp("responses-workers")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("anthropic").start()
    env = {**os.environ, "ANTHROPIC_BASE_URL": upstream.url,
           "ANTHROPIC_API_KEY": "sk-ant-test", "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_ADMIN_KEY", None)
    port = free_port()
    proc = start_server(project, env, port, "--workers", "2")
    yield f"http://127.0.0.1:{port}", upstream
    assert stop_server(proc) == 0
    upstream.stop()


def test_every_follow_up_is_answered_whichever_worker_gets_it(served):
    base, upstream = served
    rid, who = turn(upstream, base, 0, None)
    answered_by = [who]
    for i in range(1, FOLLOW_UPS + 1):
        rid, who = turn(upstream, base, i, rid, stream=bool(i % 2))
        answered_by.append(who)
    # Both workers answered, and follow-ups crossed from one to the other.
    assert len(set(answered_by)) == 2
    assert any(a != b for a, b in itertools.pairwise(answered_by))


def test_an_unknown_previous_response_is_not_found_on_either_worker(served):
    base, upstream = served
    sent = len(upstream.requests)
    for _ in range(6):  # fresh connections: both workers are asked
        status, body, _, _ = respond(base, 1, "resp_never_made", stream=False)
        assert status == 400
        assert "Previous response with id 'resp_never_made' not found." in body
        assert "previous_response_not_found" in body
    assert len(upstream.requests) == sent
