"""Routing: which provider models may serve a request, in the order to try them.

Rules (`routes:` in flowc.yaml) are tried in order; the first whose `match` fits the request
chooses among its targets by strategy (`first`, `cheapest` from the price table, `fastest`
from observed latency, `best` from declared quality), after dropping targets that break its
constraints. The remaining targets, then the configured fallbacks, are the order of attempts.
Without a matching rule the requested name is resolved directly (alias, provider/model or a
well-known bare name).
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from flowc.config import ProjectConfig, Route
from flowc.cost import usd
from runtime.ledger.pricing import price_per_million
from runtime.providers import Providers, RequestError, Target

# Image parts in chat completions, Anthropic messages and responses.
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})


@dataclass(frozen=True)
class Traits:
    model: str
    needs_tools: bool
    needs_vision: bool
    prompt_chars: int
    tags: frozenset[str]

    @classmethod
    def of(cls, req: dict[str, Any], tags_header: str | None = None) -> Traits:
        """The traits of a request in any wire served: `messages` (chat completions,
        Anthropic messages) or `input` (responses)."""
        vision, chars = False, 0
        items = req.get("input")
        if isinstance(items, str):
            chars += len(items)
            items = None
        for msg in items if isinstance(items, list) else req.get("messages") or ():
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        continue
                    if part.get("type") in _IMAGE_PARTS:
                        vision = True
                    text = part.get("text")
                    if isinstance(text, str):
                        chars += len(text)
        tags = frozenset(t.strip() for t in (tags_header or "").split(",") if t.strip())
        return cls(str(req.get("model", "")), bool(req.get("tools")), vision, chars, tags)


@dataclass
class Plan:
    targets: list[Target]
    rule: str | None
    reasons: list[str] = field(default_factory=list)  # for `flowc routes explain`


class LatencyStats:
    """Recent latencies per target (the last 200 calls), for `fastest` and `max_p50_ms`."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=200))

    def add(self, target: Target, ms: float) -> None:
        self._samples[str(target)].append(ms)

    def seed(self, target: str, p50: float) -> None:
        if not self._samples[target]:
            self._samples[target].append(p50)

    def p50(self, target: Target) -> float | None:
        s = self._samples.get(str(target))
        return statistics.median(s) if s else None


class Router:
    def __init__(self, config: ProjectConfig, providers: Providers,
                 latency: LatencyStats | None = None) -> None:
        self.config = config
        self.providers = providers
        self.latency = latency or LatencyStats()

    def _resolve(self, name: str) -> Target:
        target = self.providers.resolve(name)
        if target is None:
            aliases = ", ".join(sorted(self.config.models)) or "none"
            providers = ", ".join(sorted(self.providers.endpoints))
            raise RequestError(
                f"unknown model '{name}'. Available: aliases {aliases}; any provider/model "
                f"of {providers}; gpt-*, o1/o3/o4*, claude-* and Ollama name:tag names, "
                "and the bare names GET /v1/models lists", param="model", status=404,
                code="model_not_found")
        return target

    def plan(self, traits: Traits) -> Plan:
        for route in self.config.routes:
            why = self._mismatch(route, traits)
            if why is None:
                return self._plan_route(route)
        target = self._resolve(traits.model)
        return Plan(self._with_fallbacks([target], traits.model), None,
                    [f"no rule matched; '{traits.model}' resolves to {target}"])

    def explain(self, traits: Traits) -> list[str]:
        """Why each rule does or does not match, then the plan the matching one makes."""
        lines = []
        for route in self.config.routes:
            why = self._mismatch(route, traits)
            if why is None:
                lines.append(f"rule '{route.name}' matches")
                break
            lines.append(f"rule '{route.name}' does not match: {why}")
        plan = self.plan(traits)
        indent = "  " if plan.rule else ""
        lines.extend(indent + r for r in plan.reasons)
        lines.append(indent + "order: " + " -> ".join(map(str, plan.targets)))
        return lines

    @staticmethod
    def _mismatch(route: Route, t: Traits) -> str | None:
        m = route.match
        if m.model is not None and m.model != t.model:
            return f"model is '{t.model}', not '{m.model}'"
        if m.needs_tools is not None and m.needs_tools != t.needs_tools:
            return "request " + ("has" if t.needs_tools else "has no") + " tools"
        if m.needs_vision is not None and m.needs_vision != t.needs_vision:
            return "request " + ("has" if t.needs_vision else "has no") + " images"
        if m.min_prompt_chars is not None and t.prompt_chars < m.min_prompt_chars:
            return f"prompt has {t.prompt_chars} chars, fewer than {m.min_prompt_chars}"
        if m.max_prompt_chars is not None and t.prompt_chars > m.max_prompt_chars:
            return f"prompt has {t.prompt_chars} chars, more than {m.max_prompt_chars}"
        missing = set(m.tags) - t.tags
        if missing:
            return f"tags {sorted(missing)} not in x-flowc-tags"
        return None

    def _plan_route(self, route: Route) -> Plan:
        reasons: list[str] = []
        candidates: list[tuple[Target, Decimal | None, float | None]] = []
        for name in route.targets:
            target = self._resolve(name)
            cost = price_per_million(target.provider, target.model, self.config.prices)
            p50 = self.latency.p50(target)
            if route.max_cost_per_1m is not None and (cost is None
                                                      or cost > route.max_cost_per_1m):
                reasons.append(f"{target} dropped: price per 1M tokens "
                               f"{'unknown' if cost is None else usd(cost)} > "
                               f"{usd(route.max_cost_per_1m)}")
                continue
            if route.max_p50_ms is not None and p50 is not None and p50 > route.max_p50_ms:
                reasons.append(f"{target} dropped: p50 {p50:.0f} ms > {route.max_p50_ms:g} ms")
                continue
            candidates.append((target, cost, p50))
        if route.strategy == "cheapest":
            candidates.sort(key=lambda c: (c[1] is None, c[1] or 0))
        elif route.strategy == "fastest":
            candidates.sort(key=lambda c: (c[2] is None, c[2] or 0.0))
        elif route.strategy == "best":
            candidates.sort(key=lambda c: -self.config.quality.get(str(c[0]), 0.0))
        for target, cost, p50 in candidates:
            reasons.append(f"{target}: price/1M {'unknown' if cost is None else usd(cost)}"
                           f", p50 {'unknown' if p50 is None else f'{p50:.0f} ms'}, quality "
                           f"{self.config.quality.get(str(target), 'unset')}")
        if not candidates:
            raise RequestError(f"route '{route.name}': no target meets its constraints ("
                               + "; ".join(reasons) + ")", status=503, code="no_route")
        reasons.insert(0, f"strategy {route.strategy}")
        targets = [c[0] for c in candidates]
        return Plan(self._with_fallbacks(targets, str(targets[0])), route.name, reasons)

    def with_fallbacks(self, plan: Plan, models: tuple[str, ...]) -> Plan:
        """The plan with a caller's own fallback models after its targets (a pipeline
        step's `fallback_models:`); an unknown one is an error, as an unknown model is."""
        targets = list(plan.targets)
        for name in models:
            target = self._resolve(name)
            if target not in targets:
                targets.append(target)
        return Plan(targets, plan.rule, [*plan.reasons,
                                         "then the step's fallback_models: " + ", ".join(models)])

    def _with_fallbacks(self, targets: list[Target], name: str) -> list[Target]:
        out = list(targets)
        for fb in self.config.fallbacks.get(name, []) + self.config.fallbacks.get(
                str(targets[0]), []):
            t = self._resolve(fb)
            if t not in out:
                out.append(t)
        return out
