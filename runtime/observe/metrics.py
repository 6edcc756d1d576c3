"""Prometheus metrics for `GET /metrics`.

Counting happens on the request path, so it is plain Python: each series is a small object
found by one dict lookup on its label values, its histogram buckets are a list of counts
found by bisection (1.7 us of CPU a model call, measured in docs/benchmarks.md). No
lock: every update runs on the event loop's thread. `prometheus_client` turns the counts
into its metric families only when `/metrics` is read (a custom collector), and writes the
text format; it is imported then, not before.

Names: the OpenTelemetry GenAI metrics as Prometheus spells them (`gen_ai.client.token.usage`
-> `gen_ai_client_token_usage`, durations in seconds with the unit as a suffix), `flowc_*`
for the rest. Label values are bounded: providers and model names come from flowc.yaml;
a model name a client sent that the configuration does not know counts under its own name
only once a provider has answered it, for the first `MAX_LEARNED` such names, and as
`other` after that (or when no provider accepted it). No request ids, keys or tags.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# Bucket boundaries the GenAI semantic conventions advise for each metric.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                    20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
# flowc's own time per request is microseconds to milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_LEARNED = 64
OTHER = "other"


class Histogram:
    """Counts per bucket (not cumulative: cumulated when read), their sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # `le` buckets: a value equal to a bound counts in that bound's bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class _Call:
    """The series of one (operation, provider, model, status, stream) combination."""

    __slots__ = ("cost", "duration", "errors", "n", "tokens_in", "tokens_out", "ttft")

    def __init__(self) -> None:
        self.n = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.tokens_in = Histogram(TOKEN_BUCKETS)
        self.tokens_out = Histogram(TOKEN_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.cost = 0.0
        self.errors: dict[str, int] = {}


def known_models(config: Any) -> set[str]:
    """Every model name flowc.yaml mentions: aliases and what they stand for, route
    targets, fallbacks, prices and quality scores (both `provider/model` and `model`)."""
    names: set[str] = set(config.models)
    spelled: list[str] = [*config.models.values(), *config.fallbacks, *config.prices,
                          *config.quality]
    for fallbacks in config.fallbacks.values():
        spelled.extend(fallbacks)
    for route in config.routes:
        spelled.extend(route.targets)
        model = getattr(route.match, "model", None)
        if isinstance(model, str):
            names.add(model)
    for name in spelled:
        names.add(name)
        if "/" in name:
            names.add(name.partition("/")[2])
    return names


class Metrics:
    """What the process has counted since it started; ``render`` gives the text format."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, str, str, bool], _Call] = {}
        self.retries: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.in_flight: dict[str, int] = {}
        self.overhead: dict[str, Histogram] = {}
        self.runs: dict[tuple[str, str], tuple[list[float], Histogram]] = {}
        self.steps: dict[tuple[str, str], int] = {}
        self.tools: dict[tuple[str, str, str], Histogram] = {}
        self.known: set[str] = set()
        self.learned: set[str] = set()
        self._labels: dict[str, str] = {}  # model name -> its label (a cache of `model`)
        self.ledger: Any = None  # the ledger whose queue is reported (set by the server)

    def configure(self, config: Any) -> None:
        """The model names that are label values as they are (flowc.yaml's)."""
        self.known = known_models(config)
        self._labels.clear()

    def model(self, name: str, accepted: bool) -> str:
        """``name`` as a label value: itself when flowc.yaml knows it, or a provider
        answered it (the first `MAX_LEARNED` such names); otherwise `other`."""
        label = self._labels.get(name)
        if label is not None:
            return label
        if name in self.known or name in self.learned:
            label = name
        elif accepted and len(self.learned) < MAX_LEARNED:
            self.learned.add(name)
            label = name
        else:
            return OTHER  # not cached: a later answered call may still learn it
        if len(self._labels) < 4096:
            self._labels[name] = label
        return label

    # -- updates (the request path) --------------------------------------------------------
    def call(self, operation: str, provider: str | None, model: str, status: str,
             stream: bool, latency_ms: float, usage: Any, cost: Decimal | None,
             ttft_ms: float | None, error: BaseException | None) -> None:
        """One model call as its ledger row says (one per attempt)."""
        key = (operation, provider or "none", self.model(model, status == "ok"), status, stream)
        series = self.calls.get(key)
        if series is None:
            series = self.calls[key] = _Call()
        series.n += 1
        if provider is not None:  # a refused request never went upstream
            series.duration.observe(latency_ms / 1000)
        if usage is not None:
            series.tokens_in.observe(usage.prompt_tokens)
            series.tokens_out.observe(usage.completion_tokens)
        if cost is not None:
            series.cost += float(cost)
        if ttft_ms is not None:
            series.ttft.observe(ttft_ms / 1000)
        if error is not None:
            kind = type(error).__name__
            series.errors[kind] = series.errors.get(kind, 0) + 1

    def retry(self, provider: str, model: str) -> None:
        key = (provider, self.model(model, False))
        self.retries[key] = self.retries.get(key, 0) + 1

    def fallback(self, provider: str, model: str) -> None:
        key = (provider, self.model(model, False))
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def request_started(self, path: str) -> None:
        self.in_flight[path] = self.in_flight.get(path, 0) + 1

    def request_ended(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """A model API request answered: its `x-flowc-overhead-ms` (flowc's own time, the
        upstream's excluded) goes into the overhead histogram."""
        self.in_flight[path] -= 1
        for name, value in headers:
            if name == b"x-flowc-overhead-ms":
                h = self.overhead.get(path)
                if h is None:
                    h = self.overhead[path] = Histogram(OVERHEAD_BUCKETS)
                h.observe(float(value) / 1000)
                return

    def run(self, workflow: str, status: str, seconds: float, cost: Decimal | None,
            steps: Iterable[str], dry_run: bool) -> None:
        key = (workflow, "dry_run" if dry_run and status == "succeeded" else status)
        entry = self.runs.get(key)
        if entry is None:
            entry = self.runs[key] = ([0.0, 0.0], Histogram(RUN_BUCKETS))
        entry[1].observe(seconds)
        if cost is not None:
            entry[0][1] += float(cost)
        for step_status in steps:
            skey = (workflow, step_status)
            self.steps[skey] = self.steps.get(skey, 0) + 1

    def tool(self, server: str, tool: str, outcome: str, seconds: float) -> None:
        key = (server, tool, outcome)
        h = self.tools.get(key)
        if h is None:
            h = self.tools[key] = Histogram(TOOL_BUCKETS)
        h.observe(seconds)

    # -- reading ---------------------------------------------------------------------------
    def render(self, ledger: Any = None, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks for it) and
        its content type, with ``ledger``'s queue and rows written."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]  # a collector by its collect()
        self.ledger = ledger
        encode, content_type = choose_encoder(accept)
        return encode(registry), content_type

    def collect(self) -> Iterator[Metric]:  # prometheus_client's Collector protocol
        yield from self._calls()
        yield from self._gateway()
        yield from self._pipelines()
        yield from self._ledger()

    def _calls(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        base = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        requests = CounterMetricFamily(
            "flowc_requests", "Model calls, one per ledger row (every attempt: retries and "
            "fallbacks each count), by outcome", labels=[*base, "status", "stream"])
        errors = CounterMetricFamily(
            "flowc_request_errors", "Model calls that did not answer, by error class",
            labels=[*base, "error_type"])
        cost = CounterMetricFamily("flowc_cost_usd", "Cost of model calls in USD, as the "
                                   "ledger prices them (unpriced calls add nothing)",
                                   labels=[*base])
        tokens = HistogramMetricFamily(
            "gen_ai_client_token_usage", "Tokens per model call (input: every prompt token "
            "billed; output: completion tokens, reasoning included)",
            labels=[*base, "gen_ai_token_type"])
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds", "Upstream time of a model call, from "
            "sending it to its last byte", labels=[*base, "status"])
        ttft = HistogramMetricFamily(
            "gen_ai_server_time_to_first_token_seconds", "Time to the first token of a "
            "streamed answer, from sending the request upstream", labels=[*base])
        # Series that differ only in stream (or status) add up where that is no label.
        merged: dict[tuple[str, ...], list[Any]] = {}
        durations: dict[tuple[str, ...], list[Histogram]] = {}
        failures: dict[tuple[str, ...], int] = {}
        for (op, provider, model, status, stream), s in self.calls.items():
            labels = [op, provider, model]
            requests.add_metric([*labels, status, str(stream).lower()], s.n)
            for kind, n in s.errors.items():
                failures[(op, provider, model, kind)] = failures.get(
                    (op, provider, model, kind), 0) + n
            if any(s.duration.counts):
                durations.setdefault((op, provider, model, status), []).append(s.duration)
            acc = merged.setdefault((op, provider, model), [0.0, [], [], []])
            acc[0] += s.cost
            acc[1].append(s.tokens_in)
            acc[2].append(s.tokens_out)
            acc[3].append(s.ttft)
        for key, n in failures.items():
            errors.add_metric(list(key), n)
        for key, parts in durations.items():
            h = _sum(parts)
            duration.add_metric(list(key), h.buckets(), h.sum)
        for labels, (usd, tin, tout, tt) in merged.items():
            cost.add_metric(list(labels), usd)
            for kind, parts in (("input", tin), ("output", tout)):
                h = _sum(parts)
                if any(h.counts):
                    tokens.add_metric([*labels, kind], h.buckets(), h.sum)
            h = _sum(tt)
            if any(h.counts):
                ttft.add_metric(list(labels), h.buckets(), h.sum)
        yield from (requests, errors, cost, tokens, duration, ttft)

    def _gateway(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        pm = ["gen_ai_provider_name", "gen_ai_request_model"]
        retries = CounterMetricFamily("flowc_retries", "Retries of the same target after a "
                                      "retryable failure", labels=pm)
        fallbacks = CounterMetricFamily("flowc_fallbacks", "Moves to the next target after "
                                        "a target failed (labels: the target that failed)",
                                        labels=pm)
        for (p, m), n in self.retries.items():
            retries.add_metric([p, m], n)
        for (p, m), n in self.fallbacks.items():
            fallbacks.add_metric([p, m], n)
        in_flight = GaugeMetricFamily("flowc_in_flight_requests", "Model API requests being "
                                      "answered now (a stream until its last byte)",
                                      labels=["path"])
        for path, n in self.in_flight.items():
            in_flight.add_metric([path], n)
        overhead = HistogramMetricFamily(
            "flowc_overhead_seconds", "flowc's own time per model API request (its "
            "x-flowc-overhead-ms: the whole request less the upstream's time; for a stream, "
            "the time before the upstream call)", labels=["path"])
        for path, h in self.overhead.items():
            overhead.add_metric([path], h.buckets(), h.sum)
        yield from (retries, fallbacks, in_flight, overhead)

    def _pipelines(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        runs = HistogramMetricFamily("flowc_pipeline_run_duration_seconds", "Pipeline runs "
                                     "by outcome (succeeded, failed, cancelled, dry_run)",
                                     labels=["workflow", "status"])
        cost = CounterMetricFamily("flowc_pipeline_cost_usd", "Cost of pipeline runs in USD",
                                   labels=["workflow", "status"])
        count = CounterMetricFamily("flowc_pipeline_runs", "Pipeline runs by outcome",
                                    labels=["workflow", "status"])
        for (wf, status), (sums, h) in self.runs.items():
            runs.add_metric([wf, status], h.buckets(), h.sum)
            cost.add_metric([wf, status], sums[1])
            count.add_metric([wf, status], sum(h.counts))
        steps = CounterMetricFamily("flowc_pipeline_steps", "Pipeline steps by outcome "
                                    "(done, skipped, failed, cancelled)",
                                    labels=["workflow", "status"])
        for (wf, status), n in self.steps.items():
            steps.add_metric([wf, status], n)
        tools = HistogramMetricFamily("flowc_mcp_call_duration_seconds", "MCP tool calls "
                                      "by outcome (ok; error: the tool said isError; failed: "
                                      "no answer)", labels=["mcp_server", "gen_ai_tool_name",
                                                            "outcome"])
        tool_count = CounterMetricFamily("flowc_mcp_calls", "MCP tool calls by outcome",
                                         labels=["mcp_server", "gen_ai_tool_name", "outcome"])
        for (server, tool, outcome), h in self.tools.items():
            tools.add_metric([server, tool, outcome], h.buckets(), h.sum)
            tool_count.add_metric([server, tool, outcome], sum(h.counts))
        yield from (count, runs, cost, steps, tool_count, tools)

    def _ledger(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ledger = self.ledger
        if ledger is None or not hasattr(ledger, "queued"):
            return
        queued = GaugeMetricFamily("flowc_ledger_queue_rows", "Ledger rows recorded and not "
                                   "yet written")
        queued.add_metric([], ledger.queued())
        written = CounterMetricFamily("flowc_ledger_rows_written", "Ledger rows written (to "
                                      "the ledger file, or to its inbox while another "
                                      "process holds it)")
        written.add_metric([], ledger.rows_written)
        yield from (queued, written)


def _sum(parts: list[Histogram]) -> Histogram:
    if len(parts) == 1:
        return parts[0]
    out = Histogram(parts[0].bounds)
    for h in parts:
        out.sum += h.sum
        for i, n in enumerate(h.counts):
            out.counts[i] += n
    return out


METRICS = Metrics()
