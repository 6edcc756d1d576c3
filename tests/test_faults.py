"""Fault injection: upstreams that hang, reset, send garbage or wrong-shaped JSON, cut their
streams short or send none, and echo the key they were sent, in front of a real
`flowc serve`, called through the official SDKs and raw HTTP.

What a user checks: every call sent upstream is one ledger row (counted on the loopback
servers, against the rows), each with the right status and error class; the client gets an
error in its own API's shape; and no provider key shows in a response, a row or the log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import duckdb
import httpx
import openai
import pytest

from tests.fakes import (
    FakeServer,
    anthropic_stream,
    anthropic_text,
    cut,
    echo_key,
    empty_stream,
    free_port,
    garbage,
    hang,
    http_error,
    json_body,
    ollama_text,
    openai_stream_text,
    openai_text,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"openai": "sk-proj-FaultOpenAIKey0123456789abcdef",
        "anthropic": "sk-ant-api03-FaultAnthropicKey987654321",
        "tiny": "k3y"}  # a short key: redacted too, without mangling text around it
MODELS = {"openai": "fast", "anthropic": "smart", "ollama": "local", "tiny": "tiny"}
CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
  local: ollama/qwen2.5:7b
  tiny: tiny/tiny-model
fallbacks:
  openai/gpt-4o: [anthropic/claude-sonnet-4-6]
retry: {{attempts: 1, backoff: 0.01, max_backoff: 1}}
providers:
  openai: {{timeout: 1}}
  anthropic: {{timeout: {timeout}}}
  ollama: {{timeout: 1}}
  tiny: {{kind: openai_compatible, base_url: "{tiny}/v1", api_key_env: TINY_KEY, timeout: 1}}
prices:
  tiny/tiny-model: {{input: 1, output: 2}}
ledger: {{flush_interval: 0.1}}
"""
COLUMNS = ("status", "success", "error_class", "error", "provider", "prompt_tokens",
           "completion_tokens", "cost_usd", "usage_estimated", "stream", "run_id", "step_id")
HANGS = 200  # steps of the hanging pipeline


def hanging_pipeline() -> str:
    steps = "".join(f"""
  - {{id: s{i}, type: llm, model: fast, prompt: "hang {i}", timeout: 0.5,
     on_error: continue}}""" for i in range(HANGS))
    return "name: hangs\nsteps:" + steps + "\n"


SIBLINGS = """\
name: siblings
steps:
  - {id: bad, type: llm, model: fast, prompt: "bad"}
  - {id: slow, type: llm, model: fast, prompt: "slow"}
"""
PARTIAL = """\
name: partial
steps:
  - {id: bad, type: llm, model: fast, prompt: "bad", on_error: continue}
  - {id: good, type: llm, model: fast, prompt: "good"}
output: {a: "${bad ?? 'none'}", b: "${good}"}
"""


@dataclass
class Server:
    url: str
    project: Path
    proc: subprocess.Popen
    log: Path
    fakes: dict[str, FakeServer]

    def sql(self, query: str) -> list[list[Any]]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    def sent(self) -> int:
        return sum(len(f.requests) for f in self.fakes.values())

    def count(self) -> int:
        return self.sql("SELECT count(*) FROM requests")[0][0]


def start(project: Path, fakes: dict[str, FakeServer], timeout: float = 1) -> Server:
    (project / "flowc.yaml").write_text(CONFIG.format(tiny=fakes["tiny"].url, timeout=timeout))
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": KEYS["openai"],
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "ANTHROPIC_API_KEY": KEYS["anthropic"], "OLLAMA_HOST": fakes["ollama"].url,
           "TINY_KEY": KEYS["tiny"]}
    port = free_port()
    log = project / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--port",
                                 str(port), "--log-level", "info"], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30)
    return Server(url, project, proc, log, fakes)


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(5)


def new_fakes() -> dict[str, FakeServer]:
    return {name: FakeServer("openai" if name == "tiny" else name).start()
            for name in ("openai", "anthropic", "ollama", "tiny")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = tmp_path_factory.mktemp("faults")
    (project / "pipelines").mkdir()
    (project / "pipelines" / "hangs.yaml").write_text(hanging_pipeline())
    (project / "pipelines" / "siblings.yaml").write_text(SIBLINGS)
    (project / "pipelines" / "partial.yaml").write_text(PARTIAL)
    fakes = new_fakes()
    srv = start(project, fakes)
    yield srv
    stop(srv.proc)
    for f in fakes.values():
        f.stop()


class Calls:
    """The calls one test sends upstream, and the rows they became."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        for f in srv.fakes.values():
            f.script.clear()
        self.sent0 = srv.sent()
        self.rows0 = srv.count()
        self.start = {k: len(f.requests) for k, f in srv.fakes.items()}

    def sent_to(self, kind: str) -> int:
        return len(self.srv.fakes[kind].requests) - self.start[kind]

    def rows(self) -> list[dict[str, Any]]:
        """Every new row, once the ledger holds one per call sent upstream (and no more)."""
        sent = self.srv.sent() - self.sent0
        wait_until(lambda: self.srv.count() >= self.rows0 + sent, 15)
        time.sleep(0.3)  # a few flush intervals: a row too many would show by now
        rows = self.srv.sql(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY ts")
        new = [dict(zip(COLUMNS, r, strict=True)) for r in rows[self.rows0:]]
        assert len(new) == sent, (sent, new)  # calls sent upstream = rows recorded
        return new


@pytest.fixture
def srv(server: Server) -> Server:
    return server


def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="client-key", max_retries=0,
                         timeout=30)


def ant(srv: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="client-key", max_retries=0,
                               timeout=30)


def say(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def good(kind: str, text: str = "fine thanks") -> Any:
    return {"openai": openai_text, "tiny": openai_text, "anthropic": anthropic_text,
            "ollama": ollama_text}[kind](text)


def streamed(kind: str, text: str) -> Any:
    """A normal stream of ``text`` in ``kind``'s wire format (input 1234 tokens)."""
    if kind == "anthropic":
        return anthropic_stream([("text", text)], input_tokens=1234, output_tokens=99)
    if kind == "ollama":
        return ollama_text(text, prompt_eval_count=1234, eval_count=99)
    return openai_stream_text(text, prompt_tokens=1234, completion_tokens=99)


# -- wrong-shaped and unreadable answers --------------------------------------------------------
SHAPES: dict[str, list[Any]] = {
    "openai": [[{"choices": []}], {"id": "x", "object": "chat.completion"},
               {"choices": "none"}, {"choices": [{"index": 0}]},
               {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": "lots"},
               {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": "many"}}],
    "anthropic": [["message"], {"type": "message", "content": "hi"},
                  {"type": "message", "content": [{"type": "text", "text": "hi"}],
                   "usage": {"input_tokens": [3]}},
                  {"type": "message", "content": [{"type": "tool_use", "name": "f"}],
                   "usage": {"input_tokens": 3, "output_tokens": 1}}],
    "ollama": [[], {"message": "hi", "done": True}, {"model": "m", "done": True},
               {"message": {"role": "assistant", "content": "hi"}, "done": True,
                "prompt_eval_count": {"n": 1}}],
}
CASES = [(kind, i) for kind, shapes in SHAPES.items() for i in range(len(shapes))]


@pytest.mark.parametrize(("kind", "i"), CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_wrong_shaped_answers_are_502s_retried_and_recorded(srv, kind, i):
    calls = Calls(srv)
    fake = srv.fakes[kind]
    fake.then(json_body(SHAPES[kind][i]), json_body(SHAPES[kind][i]))
    with pytest.raises(openai.InternalServerError) as exc:
        oai(srv).chat.completions.create(model=MODELS[kind], messages=say())
    assert exc.value.status_code == 502
    assert exc.value.body["message"].startswith(f"{kind}: malformed response body")
    rows = calls.rows()
    assert calls.sent_to(kind) == 2  # retried once, as configured
    assert [(r["status"], r["error_class"]) for r in rows] == [("error", "UpstreamError")] * 2
    assert all(r["error"].startswith(f"{kind}: malformed response body") for r in rows)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_garbage_then_a_good_answer_recovers_on_retry(srv, kind):
    calls = Calls(srv)
    srv.fakes[kind].then(garbage(), good(kind, "recovered"))
    out = oai(srv).chat.completions.create(model=MODELS[kind], messages=say())
    assert out.choices[0].message.content == "recovered"
    assert [(r["status"], r["error_class"]) for r in calls.rows()] == [
        ("error", "UpstreamError"), ("ok", None)]


def test_a_malformed_answer_falls_back(srv):
    calls = Calls(srv)
    srv.fakes["openai"].then(json_body([1, 2]), json_body([1, 2]))
    raw = oai(srv).chat.completions.with_raw_response.create(model="openai/gpt-4o",
                                                             messages=say())
    assert raw.headers["x-flowc-provider"] == "anthropic"
    assert [(r["provider"], r["status"]) for r in calls.rows()] == [
        ("openai", "error"), ("openai", "error"), ("anthropic", "ok")]
    assert "openai/gpt-4o failed (openai: malformed response body" in srv.log.read_text()
    assert "falling back to anthropic/claude-sonnet-4-6" in srv.log.read_text()


# -- no answer, or half of one ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_a_hanging_upstream_times_out_and_gives_up(srv, kind):
    calls = Calls(srv)
    srv.fakes[kind].then(hang(5), hang(5))
    with pytest.raises(openai.APIStatusError) as exc:
        oai(srv).chat.completions.create(model=MODELS[kind], messages=say())
    assert exc.value.status_code == 504
    assert exc.value.body["message"] == f"{kind}: no answer within 1 s"
    rows = calls.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [("error", "UpstreamTimeout")] * 2
    log = srv.log.read_text()
    target = {"openai": "openai/gpt-4o-mini", "anthropic": "anthropic/claude-sonnet-4-6",
              "ollama": "ollama/qwen2.5:7b"}[kind]
    assert f"{target} failed ({kind}: no answer within 1 s): giving up, no fallback left" in log
    assert f"{target} failed ({kind}: no answer within 1 s): falling back" not in log


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_a_reset_in_the_middle_of_the_body(srv, kind):
    calls = Calls(srv)
    srv.fakes[kind].then(cut(good(kind), 1), cut(good(kind), 1))
    with pytest.raises(openai.InternalServerError) as exc:
        oai(srv).chat.completions.create(model=MODELS[kind], messages=say())
    assert exc.value.status_code == 502 and "connection failed" in exc.value.body["message"]
    rows = calls.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [
        ("error", "UpstreamUnavailable")] * 2


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
@pytest.mark.parametrize("how", ["reset", "end", "stall"])
def test_a_stream_cut_short_is_an_error_with_the_tokens_so_far(srv, kind, how):
    """Four events reach the client, then the upstream drops the connection, ends the body
    cleanly without its last events, or goes silent past the timeout."""
    calls = Calls(srv)
    srv.fakes[kind].then(cut(streamed(kind, "one two three four five six seven"), 4, how))
    text = ""
    with pytest.raises(openai.APIError) as exc:
        for chunk in oai(srv).chat.completions.create(model=MODELS[kind], messages=say(),
                                                      stream=True):
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text  # part of the answer arrived before the error
    message = exc.value.body["message"]
    if how == "stall":
        assert message == f"{kind}: no answer within 1 s"
    elif how == "reset":
        assert message.startswith(f"{kind}: connection failed (stream cut off")
    else:
        assert message.startswith(f"{kind}: the stream ended before")
    (row,) = calls.rows()
    assert row["status"] == "error" and row["stream"]
    assert row["error_class"] == ("UpstreamTimeout" if how == "stall" else
                                  "UpstreamUnavailable" if how == "reset" else "UpstreamError")
    # the answer's words so far are counted, estimated; Anthropic said the input up front
    assert row["usage_estimated"] and row["completion_tokens"] >= 1
    assert row["prompt_tokens"] == (1234 if kind == "anthropic" else 3)  # "hello there"
    assert row["cost_usd"] is not None and (kind == "ollama" or Decimal(row["cost_usd"]) > 0)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_a_200_stream_with_no_events_is_an_error_in_each_clients_shape(srv, kind):
    calls = Calls(srv)
    srv.fakes[kind].then(empty_stream(), empty_stream())
    with pytest.raises(openai.InternalServerError) as exc:
        list(oai(srv).chat.completions.create(model=MODELS[kind], messages=say(),
                                              stream=True))
    assert exc.value.status_code == 502
    assert "the stream ended before" in exc.value.body["message"]
    srv.fakes[kind].then(empty_stream(), empty_stream())
    with pytest.raises(anthropic.InternalServerError) as aexc, ant(srv).messages.stream(
            model=MODELS[kind], max_tokens=20, messages=say()) as stream:
        list(stream.text_stream)
    assert aexc.value.status_code == 502
    assert aexc.value.body["error"]["type"] == "api_error"
    assert "the stream ended before" in aexc.value.body["error"]["message"]
    rows = calls.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [("error", "UpstreamError")] * 4


def test_a_stream_without_usage_is_a_success_with_estimated_tokens(srv):
    calls = Calls(srv)
    answer = "a complete answer without any usage report"
    srv.fakes["openai"].then(openai_stream_text(answer, usage=False))
    chunks = list(oai(srv).chat.completions.create(
        model="fast", messages=say(), stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == \
        answer
    (row,) = calls.rows()
    assert (row["status"], row["success"], row["usage_estimated"]) == ("ok", True, True)
    # ~4 characters a token: "hello there" (11) -> 3; the streamed words, each with the
    # space the upstream put after it (44) -> 11
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 11)
    assert Decimal(row["cost_usd"]) == (3 * Decimal("0.15") + 11 * Decimal("0.6")) / 10**6


def test_a_priced_answer_without_usage_is_estimated_never_zero(srv):
    calls = Calls(srv)
    srv.fakes["openai"].then(json_body({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "12345678"},
                     "finish_reason": "stop"}]}))
    raw = oai(srv).chat.completions.with_raw_response.create(model="fast", messages=say())
    assert raw.parse().choices[0].message.content == "12345678"
    (row,) = calls.rows()
    assert (row["status"], row["usage_estimated"]) == ("ok", True)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 2)
    assert Decimal(row["cost_usd"]) > 0
    assert Decimal(raw.headers["x-flowc-cost-usd"]) == Decimal(row["cost_usd"])


# -- keys ---------------------------------------------------------------------------------------
def no_key_anywhere(srv: Server, *texts: str) -> None:
    everything = json.dumps(srv.sql("SELECT * FROM requests"), default=str)
    log = srv.log.read_text()
    for key in KEYS.values():
        for where, text in (("a response", "\n".join(texts)), ("the ledger", everything),
                            ("the log", log)):
            if len(key) >= 8:
                assert key not in text and key[:8] not in text, where
            else:  # a short key as a word of its own; "k3yboard" may stay
                assert f" {key}" not in text and f"{key}\"" not in text, (where, text)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "tiny"])
def test_an_echoed_key_never_reaches_the_client_the_ledger_or_the_log(srv, kind):
    calls = Calls(srv)
    fake = srv.fakes[kind]
    responses: list[str] = []
    fake.then(echo_key(kind, "error"))
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODELS[kind], "messages": say()})
    assert r.status_code == 401 and "Incorrect API key provided" in r.text
    responses.append(r.text)
    fake.then(echo_key(kind, "text"), echo_key(kind, "text"))
    r = httpx.post(srv.url + "/v1/messages", timeout=30,
                   json={"model": MODELS[kind], "max_tokens": 9, "messages": say()})
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
    assert "[redacted]" in r.text
    responses.append(r.text)
    fake.then(echo_key(kind, "sse"), echo_key(kind, "sse"))
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODELS[kind], "messages": say(), "stream": True})
    assert r.status_code == 502 and "malformed response body (not JSON)" in r.text
    responses.append(r.text)
    fake.then(cut(streamed(kind, "partial answer"), 3, "end"))  # then the error event
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODELS[kind], "messages": say(), "stream": True})
    responses.append(r.text)
    fake.then(echo_key(kind, "content"))
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODELS[kind], "messages": say()})
    assert r.status_code == 200 and "you sent" in r.json()["choices"][0]["message"]["content"]
    responses.append(r.text)
    if len(KEYS[kind]) >= 8:
        # A streamed answer that quotes the key (the fakes stream a word per event). A short
        # key is told from text only beside its label in one event (docs/gateway.md), and
        # these events split "Bearer" from it, so this is for long keys.
        fake.then(echo_key(kind, "content"))
        with ant(srv).messages.stream(model=MODELS[kind], max_tokens=20,
                                      messages=say()) as s:
            streamed_text = "".join(s.text_stream)
        assert "you sent" in streamed_text and "[redacted]" in streamed_text
        responses.append(streamed_text)
    fake.then(echo_key(kind, "stream_error"))
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODELS[kind], "messages": say(), "stream": True})
    responses.append(r.text)
    calls.rows()
    no_key_anywhere(srv, *responses)


def test_a_short_key_does_not_mangle_ordinary_text(srv):
    calls = Calls(srv)
    srv.fakes["tiny"].then(good("tiny", "the k3yboard and k3y-value stay as written"))
    out = oai(srv).chat.completions.create(model="tiny", messages=say())
    assert out.choices[0].message.content == "the k3yboard and k3y-value stay as written"
    assert [r["status"] for r in calls.rows()] == ["ok"]


# -- cancelled calls ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_a_client_that_goes_away_mid_stream_leaves_a_cancelled_row(srv, kind):
    calls = Calls(srv)
    srv.fakes[kind].then(cut(streamed(kind, "alpha beta gamma delta epsilon"), 4, "stall"))
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      json={"model": MODELS[kind], "messages": say(), "stream": True}) as r:
        got = b""
        for part in r.iter_bytes():
            got += part
            if b"alpha" in got:
                break  # the client leaves while the upstream is still answering
    (row,) = calls.rows()
    assert (row["status"], row["success"], row["error_class"]) == (
        "cancelled", False, "CancelledError")
    assert row["usage_estimated"] and row["completion_tokens"] >= 2  # "alpha " at least
    assert row["prompt_tokens"] == (1234 if kind == "anthropic" else 3)
    assert row["cost_usd"] is not None


def run_pipeline(srv: Server, name: str) -> dict[str, Any]:
    r = httpx.post(f"{srv.url}/v1/workflow/{name}", json={"input": {}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_steps_that_time_out_leave_a_cancelled_row_per_call(srv):
    calls = Calls(srv)
    srv.fakes["openai"].then(*[hang(5)] * HANGS)
    out = run_pipeline(srv, "hangs")
    assert out["status"] == "failed"  # every step failed: nothing the run was for happened
    assert out["error"]["message"].startswith("every step that ran failed")
    assert len(out["failed_steps"]) == HANGS
    assert calls.sent_to("openai") == HANGS
    rows = calls.rows()
    assert {(r["status"], r["error_class"], r["run_id"]) for r in rows} == {
        ("cancelled", "CancelledError", out["run_id"])}
    assert sorted(r["step_id"] for r in rows) == sorted(f"s{i}" for i in range(HANGS))
    assert all(r["usage_estimated"] and r["prompt_tokens"] >= 1 for r in rows)


def by_prompt(mapping: dict[str, Any]) -> Any:
    def act(rec: Any) -> Any:
        return mapping[rec.body["messages"][-1]["content"]](rec)
    return act


def test_a_sibling_cancelled_by_a_failure_leaves_a_cancelled_row(srv):
    calls = Calls(srv)
    act = by_prompt({"bad": http_error(400, "bad request"), "slow": hang(5)})
    srv.fakes["openai"].then(act, act)
    out = run_pipeline(srv, "siblings")
    assert out["status"] == "failed" and out["error"]["step"] == "bad"
    rows = {r["step_id"]: r for r in calls.rows()}
    assert (rows["bad"]["status"], rows["bad"]["error_class"]) == ("error", "UpstreamError")
    assert (rows["slow"]["status"], rows["slow"]["error_class"]) == (
        "cancelled", "CancelledError")


def test_a_run_with_some_failed_steps_succeeds_and_names_them(srv):
    calls = Calls(srv)
    act = by_prompt({"bad": http_error(400, "bad request"), "good": openai_text("fine")})
    srv.fakes["openai"].then(act, act)
    out = run_pipeline(srv, "partial")
    assert out["status"] == "succeeded" and out["failed_steps"] == ["bad"]
    assert out["output"] == {"a": "none", "b": "fine"}
    assert sorted(r["status"] for r in calls.rows()) == ["error", "ok"]


def test_a_stream_cut_by_shutdown_is_on_the_books(tmp_path):
    """SIGTERM while a stream waits on its upstream (which has a minute to answer): the
    server lets it run for its grace period (10 s), then cancels it; the row is written
    before the ledger closes."""
    fakes = new_fakes()
    srv = start(tmp_path, fakes, timeout=60)
    try:
        fakes["anthropic"].then(cut(streamed("anthropic", "one two three"), 4, "stall", 30))
        # the server ends the connection mid-body when its grace period is over
        with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
                "POST", srv.url + "/v1/chat/completions", timeout=30,
                json={"model": "smart", "messages": say(), "stream": True}) as r:
            got, stopping = b"", False
            for part in r.iter_bytes():
                got += part
                if b"one" in got and not stopping:
                    stopping = True
                    srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        if srv.proc.poll() is None:
            stop(srv.proc)
        for f in fakes.values():
            f.stop()
    con = duckdb.connect(str(tmp_path / ".flowc" / "ledger.duckdb"), read_only=True)
    rows = con.execute("SELECT status, error_class, prompt_tokens, usage_estimated, stream "
                       "FROM requests").fetchall()
    con.close()
    assert len(fakes["anthropic"].requests) == 1
    assert rows == [("cancelled", "CancelledError", 1234, True, True)]
