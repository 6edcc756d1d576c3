"""`GET /metrics` on a real `flowc serve` (auth on, loopback providers, a real MCP server):
read with prometheus_client's own parser after a mixed load (answered calls, an upstream
error retried and fallen back from, a refused model, a stream, the Anthropic wire, a
pipeline run with a model step and an MCP tool step), every counter checked against the
ledger's rows; who may read it; and the label values a client's model names can reach."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from flowc.config import ProjectConfig
from runtime.observe.metrics import MAX_LEARNED, OTHER, Metrics
from tests.fakes import http_error, openai_text, wait_until
from tests.keyed import ADMIN, Keyed, close, keyed

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  smart: anthropic/claude-sonnet-4-6
fallbacks:
  openai/gpt-4o: [anthropic/claude-sonnet-4-6]
retry:
  attempts: 1
  backoff: 0.01
  max_backoff: 1
mcpServers:
  time: {command: mcp-server-time, args: ["--local-timezone", "UTC"]}
ledger:
  flush_interval: 0.1
"""
PIPELINE = """\
name: brief
inputs: {topic: {type: string}}
steps:
  - {id: now, type: mcp_tool, server: time, tool: get_current_time, params: {timezone: UTC}}
  - {id: say, type: llm, model: fast, prompt: "say ${input.topic} at ${now.datetime}"}
  - {id: never, type: llm, model: fast, when: "${input.topic} == 'x'", prompt: "no"}
output: ${say}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("metrics"), CONFIG)
    k.keys({"name": "scraper", "read_only": True}, {"name": "teamed", "team": "a"},
           {"name": "teamed-ro", "team": "a", "read_only": True})
    k.start()
    yield k
    close(k)


def scrape(k: Keyed, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(k.url + "/metrics", headers=headers or {"authorization": f"Bearer {ADMIN}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    # Prometheus refuses a scrape with two samples of one name and label set.
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in families.values()
              for s in f.samples]
    assert len(series) == len(set(series)), sorted(series)
    return families


def samples(families: dict[str, Any], family: str, sample: str) -> list[Any]:
    return [s for s in families[family].samples if s.name == sample] if family in families \
        else []


def total(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in samples(families, family, sample)
               if all(s.labels.get(k) == v for k, v in labels.items()))


def mixed_load(k: Keyed) -> None:
    oa = openai.OpenAI(base_url=k.url + "/v1", api_key=ADMIN, max_retries=0)
    for _ in range(3):
        oa.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    chunks = list(oa.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "stream"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    # gpt-4o fails twice (a retry), then its fallback on Anthropic answers.
    k.openai.then(http_error(500, "boom"), http_error(500, "boom again"))
    fell = oa.chat.completions.create(model="openai/gpt-4o",
                                      messages=[{"role": "user", "content": "hi"}])
    assert fell.model.startswith("claude")
    with pytest.raises(openai.NotFoundError):  # refused: no provider heard of it
        oa.chat.completions.create(model="nobody-knows-this-model",
                                   messages=[{"role": "user", "content": "hi"}])
    # A provider/model name flowc.yaml does not know, which the provider refuses for good.
    k.openai.then(http_error(404, "The model `zz-1` does not exist"))
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="openai/zz-1",
                                   messages=[{"role": "user", "content": "hi"}])
    an = anthropic.Anthropic(base_url=k.url, api_key=ADMIN, max_retries=0)
    an.messages.create(model="smart", max_tokens=100,
                       messages=[{"role": "user", "content": "hello"}])
    r = httpx.put(k.url + "/v1/workflows/brief", content=PIPELINE, timeout=30,
                  headers={"authorization": f"Bearer {ADMIN}",
                           "content-type": "application/yaml"})
    assert r.status_code == 200, r.text
    k.openai.then(openai_text("noted"))
    r = httpx.post(k.url + "/v1/workflow/brief", json={"input": {"topic": "tea"}},
                   headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


def test_counters_match_the_ledger_after_a_mixed_load(srv: Keyed) -> None:
    mixed_load(srv)
    rows = srv.sql("SELECT count(*) FROM requests")[0][0]
    wait_until(lambda: srv.sql("SELECT count(*) FROM requests")[0][0] >= 10, 20)
    m = scrape(srv)
    counted = total(m, "flowc_requests", "flowc_requests_total")
    ledger = srv.sql("SELECT count(*) FROM requests")[0][0]
    assert counted == ledger >= 10, (counted, ledger, rows)

    # By provider and outcome, as the ledger has them.
    by = srv.sql("SELECT coalesce(provider, 'none'), status, stream, count(*), "
                 "sum(prompt_tokens), sum(completion_tokens), "
                 "CAST(sum(cost_usd) AS VARCHAR) FROM requests GROUP BY ALL")
    for provider, status, stream, n, _, _, _ in by:
        assert total(m, "flowc_requests", "flowc_requests_total",
                     gen_ai_provider_name=provider, status=status,
                     stream=str(stream).lower()) == n, (provider, status, stream)
    assert {r[1] for r in by} >= {"ok", "error", "refused"}
    assert any(r[2] for r in by)  # the streamed call

    # Tokens: the histogram sums by token type; cost summed per provider.
    for kind, column in (("input", 4), ("output", 5)):
        assert total(m, "gen_ai_client_token_usage", "gen_ai_client_token_usage_sum",
                     gen_ai_token_type=kind) == sum(r[column] or 0 for r in by)
    ledger_cost = sum((Decimal(r[6]) for r in by if r[6] is not None), Decimal(0))
    assert total(m, "flowc_cost_usd", "flowc_cost_usd_total") == pytest.approx(
        float(ledger_cost), rel=1e-9)
    assert ledger_cost > 0

    # Upstream latency: one observation per call that reached a provider.
    upstream = srv.sql("SELECT count(*) FROM requests WHERE provider IS NOT NULL")[0][0]
    assert total(m, "gen_ai_client_operation_duration_seconds",
                 "gen_ai_client_operation_duration_seconds_count") == upstream
    inf = [s for s in samples(m, "gen_ai_client_operation_duration_seconds",
                              "gen_ai_client_operation_duration_seconds_bucket")
           if s.labels["le"] == "+Inf"]
    assert sum(s.value for s in inf) == upstream

    # The stream's time to first token.
    assert total(m, "gen_ai_server_time_to_first_token_seconds",
                 "gen_ai_server_time_to_first_token_seconds_count") == srv.sql(
        "SELECT count(*) FROM requests WHERE ttft_ms IS NOT NULL")[0][0] >= 1

    # gpt-4o: one retry, then a fallback to Anthropic.
    assert total(m, "flowc_retries", "flowc_retries_total", gen_ai_provider_name="openai",
                 gen_ai_request_model="gpt-4o") == 1
    assert total(m, "flowc_fallbacks", "flowc_fallbacks_total",
                 gen_ai_provider_name="openai", gen_ai_request_model="gpt-4o") == 1
    errors = total(m, "flowc_request_errors", "flowc_request_errors_total",
                   error_type="UpstreamError")
    assert errors == srv.sql("SELECT count(*) FROM requests WHERE error_class = "
                             "'UpstreamError'")[0][0] == 3

    # flowc's own time on every model API request answered; none in flight now.
    answered = total(m, "flowc_overhead_seconds", "flowc_overhead_seconds_count")
    assert answered >= 6
    assert total(m, "flowc_in_flight_requests", "flowc_in_flight_requests") == 0

    # The pipeline run, its steps and its MCP call.
    assert total(m, "flowc_pipeline_runs", "flowc_pipeline_runs_total", workflow="brief",
                 status="succeeded") == 1
    assert total(m, "flowc_pipeline_steps", "flowc_pipeline_steps_total", workflow="brief",
                 status="done") == 2
    assert total(m, "flowc_pipeline_steps", "flowc_pipeline_steps_total", workflow="brief",
                 status="skipped") == 1
    assert total(m, "flowc_mcp_calls", "flowc_mcp_calls_total", mcp_server="time",
                 gen_ai_tool_name="get_current_time", outcome="ok") == 1
    run_cost = srv.sql("SELECT CAST(sum(cost_usd) AS VARCHAR) FROM requests "
                       "WHERE workflow_name = 'brief'")[0][0]
    assert total(m, "flowc_pipeline_cost_usd", "flowc_pipeline_cost_usd_total",
                 workflow="brief") == pytest.approx(float(Decimal(run_cost)), rel=1e-9)

    # The ledger wrote every row it was given.
    wait_until(lambda: total(scrape(srv), "flowc_ledger_rows_written",
                             "flowc_ledger_rows_written_total") >= ledger, 10)
    m = scrape(srv)
    assert total(m, "flowc_ledger_queue_rows", "flowc_ledger_queue_rows") == 0


def test_model_labels_stay_bounded(srv: Keyed) -> None:
    """Model names are flowc.yaml's, or `other`: a name no provider accepted never becomes
    a label value (nor a request id, a key or a tag)."""
    m = scrape(srv)
    models = {s.labels["gen_ai_request_model"] for s in
              samples(m, "flowc_requests", "flowc_requests_total")}
    assert "nobody-knows-this-model" not in models and "zz-1" not in models
    assert OTHER in models
    assert models <= {"gpt-4o-mini", "gpt-4o", "claude-sonnet-4-6", OTHER}
    labels = {k for f in m.values() for s in f.samples for k in s.labels}
    assert not labels & {"key", "key_id", "key_name", "team", "tags", "run_id", "request_id"}


def test_who_may_read_metrics(srv: Keyed) -> None:
    url = srv.url + "/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    for name in ("teamed", "teamed-ro"):
        r = httpx.get(url, headers=srv.auth(name), timeout=10)
        assert r.status_code == 403, r.text
        assert "read-only key without a team" in r.json()["error"]["message"]
    scrape(srv, srv.auth("scraper"))
    # A scraper that asks for OpenMetrics gets it.
    r = httpx.get(url, headers={**srv.auth("scraper"),
                                "accept": "application/openmetrics-text; version=1.0.0"},
                  timeout=10)
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.booleans()), max_size=300))
def test_model_label_values_are_bounded(names: list[tuple[str, bool]]) -> None:
    """Whatever model names clients send (``accepted``: a provider answered the call), the
    label values are flowc.yaml's names, at most MAX_LEARNED names providers answered, and
    `other`."""
    config = ProjectConfig.model_validate({"models": {"fast": "openai/gpt-4o-mini"}})
    metrics = Metrics()
    metrics.configure(config)
    labels = {metrics.model(name, accepted) for name, accepted in names}
    known = {"fast", "openai/gpt-4o-mini", "gpt-4o-mini"}
    learned = labels - known - {OTHER}
    assert len(learned) <= MAX_LEARNED
    assert learned <= {name for name, accepted in names if accepted}
    for name, accepted in names:
        if name in known:
            assert metrics.model(name, accepted) == name


def test_the_doc_lists_every_metric_and_its_panel_queries_them(srv: Keyed) -> None:
    """docs/observability.md's table names each family /metrics has (after the mixed load
    every family has samples) and no other; the Grafana panel is JSON over real metrics."""
    import json
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    section = doc.split("## Metrics", 1)[1]
    listed = set(re.findall(r"^\| `((?:flowc|gen_ai)_[a-z_]+)` \|", section, re.M))
    m = scrape(srv)
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in m.values()}
    assert listed == exposed
    panel = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    for target in panel["targets"]:
        used = set(re.findall(r"\b((?:flowc|gen_ai)_[a-z_]+)[\[{]", target["expr"]))
        assert used and all(any(u.startswith(e) for e in exposed) for u in used), used
