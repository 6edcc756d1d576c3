"""What a pipeline run can cost, before it runs: the worst case per step and per run.

A step's worst case is its prompt at the bounds of everything it reads (inputs at their
`max_length`, upstream outputs at their schema's bounds or their producer's `max_tokens`),
its largest answer (`max_tokens`, or the model's context window), every attempt its
`retries:` allow and every round of its tool loop, priced at the costliest model it may be
routed or fall back to. Tokens are counted at about four characters a token, as the ledger
estimates them (no tokenizer is bundled). What cannot be bounded is reported as unbounded,
with the bound that would fix it; a model no price source knows, as unknown. docs/cost.md
describes it all.

The price data (genai-prices) is imported only here, only when a cost is asked for, and only
for a model not looked up before (the rates are cached per genai-prices version): the import
costs ~200 ms, most of `flowc check`'s start-up budget.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Literal

from flowc.config import ProjectConfig, ToolCatalog
from flowc.expr import Literal as Lit
from flowc.expr import Path, Ref
from flowc.known_models import cache_file, provider_id
from flowc.model import ApprovalStep, BlockStep, InputSpec, LLMStep, MCPToolStep, PipelineStep
from flowc.template import LIMITS, Template, to_text

if TYPE_CHECKING:
    from flowc.ir import CompiledPipeline

CHARS_PER_TOKEN = 4  # as runtime/providers/base.py estimates a call it has no count for
TOKENS_NOTE = f"tokens counted at ~{CHARS_PER_TOKEN} characters a token"
_MILLION = Decimal(1_000_000)
FREE_PROVIDERS = ("ollama",)  # local models cost $0 unless flowc.yaml prices them
# JSON escapes a character in at most 6 (`\u001f`); Python's repr, which Jinja uses for
# lists and mappings, in at most 10 (`\U000e0001`).
_JSON_ESCAPE, _REPR_ESCAPE = 6, 10


def tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Unbounded:
    """Why a size has no bound, and the declaration that would give it one."""

    why: str
    fix: str


Size = int | Unbounded  # characters


def _add(*sizes: Size) -> Size:
    for s in sizes:
        if isinstance(s, Unbounded):
            return s
    return sum(sizes)  # type: ignore[arg-type]


def _max(sizes: list[Size]) -> Size:
    for s in sizes:
        if isinstance(s, Unbounded):
            return s
    return max(sizes, default=0)  # type: ignore[type-var]


# -- prices ------------------------------------------------------------------------------------
Tiers = tuple[tuple[int, Decimal], ...]  # (prompt tokens from which it applies, price)


@dataclass(frozen=True)
class Rates:
    """USD per 1M tokens, and the model's context window when the price data knows it. A
    long-context tier prices the whole call once the prompt reaches its start."""

    input: Decimal
    output: Decimal
    context: int | None
    source: str
    input_tiers: Tiers = ()
    output_tiers: Tiers = ()

    def cost(self, prompt_tokens: int, output_tokens: int) -> Decimal:
        def at(base: Decimal, tiers: Tiers) -> Decimal:
            return max([base, *(p for start, p in tiers if prompt_tokens >= start)])

        return (prompt_tokens * at(self.input, self.input_tiers)
                + output_tokens * at(self.output, self.output_tiers)) / _MILLION

    @property
    def free(self) -> bool:
        return self.input == 0 and self.output == 0


@cache
def _rates_cache() -> dict[str, Any]:
    """Rates looked up before, per genai-prices version: `flowc check` on a pipeline with a
    budget then needs no ~200 ms import of the price data."""
    path = cache_file("rates")
    with contextlib.suppress(OSError, ValueError, TypeError):
        if path is not None:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                return loaded
    return {}


@lru_cache(maxsize=1024)
def _library_rates(provider: str, model: str) -> Rates | None:
    key = f"{provider}/{model}"
    table = _rates_cache()
    if key in table:
        with contextlib.suppress(TypeError, ValueError, KeyError, ArithmeticError):
            v = table[key]
            return None if v is None else Rates(
                Decimal(v["input"]), Decimal(v["output"]), v["context"], v["source"],
                tuple((s, Decimal(p)) for s, p in v["input_tiers"]),
                tuple((s, Decimal(p)) for s, p in v["output_tiers"]))
    found = _lookup_rates(provider, model)
    table[key] = None if found is None else {
        "input": str(found.input), "output": str(found.output), "context": found.context,
        "source": found.source, "input_tiers": [[s, str(p)] for s, p in found.input_tiers],
        "output_tiers": [[s, str(p)] for s, p in found.output_tiers]}
    path = cache_file("rates")
    with contextlib.suppress(OSError):  # a read-only home still works, just slower
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            tmp.replace(path)
    return found


@lru_cache(maxsize=1024)
def _lookup_rates(provider: str, model: str) -> Rates | None:
    import genai_prices

    try:
        calc = genai_prices.calc_price(genai_prices.Usage(input_tokens=0, output_tokens=0),
                                       model, provider_id=provider_id(provider))
    except LookupError:
        return None

    def base(value: Any) -> Decimal:
        return Decimal(0) if value is None else getattr(value, "base", value)

    def tiers(value: Any) -> Tiers:
        return tuple((t.start, t.price) for t in getattr(value, "tiers", None) or ())

    mp = calc.model_price
    return Rates(base(mp.input_mtok), base(mp.output_mtok), calc.model.context_window,
                 f"genai-prices {genai_prices.__version__}", tiers(mp.input_mtok),
                 tiers(mp.output_mtok))


def rates(provider: str, model: str, config: ProjectConfig | None = None) -> Rates | None:
    """What ``provider/model`` costs, as the ledger prices it (flowc.yaml's `prices:` first);
    None when no price source knows it."""
    override = (config.prices if config else {}).get(f"{provider}/{model}")
    if override is not None:
        library = None if provider in FREE_PROVIDERS else _library_rates(provider, model)
        return Rates(override.input, override.output,
                     library.context if library else None, "flowc.yaml")
    if provider in FREE_PROVIDERS:
        return Rates(Decimal(0), Decimal(0), None, f"{provider}: local, unpriced")
    return _library_rates(provider, model)


def targets_of(model: str, config: ProjectConfig | None) -> list[tuple[str, str]] | str:
    """Every ``(provider, model)`` a pipeline's call to ``model`` may reach: the model, the
    targets of each routing rule that may match it (a pipeline call has no tags), and their
    fallbacks. A name that resolves to nothing is returned as a string."""
    cfg = config or ProjectConfig()
    names = [model]
    for route in cfg.routes:
        if route.match.model in (None, model) and not route.match.tags:
            names.extend(route.targets)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while names:
        name = names.pop(0)
        if name in seen:
            continue
        seen.add(name)
        resolved = cfg.resolve_model(name)
        if resolved is None:
            return name
        if resolved not in out:
            out.append(resolved)
        names.extend(cfg.fallbacks.get(name, []))
        names.extend(cfg.fallbacks.get(f"{resolved[0]}/{resolved[1]}", []))
    return out


# -- sizes of values ---------------------------------------------------------------------------
def schema_chars(schema: Any, nested: bool = False) -> int | None:
    """Most characters a value valid under ``schema`` takes as a prompt reads it (a string
    as it is, anything else, or a string inside something else, as JSON); None when the
    schema does not bound it."""
    if not isinstance(schema, dict):
        return None
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            return None
        return max(len(json.dumps(v, ensure_ascii=False) if nested or not isinstance(v, str)
                       else v) for v in values)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            rest = {k: v for k, v in schema.items() if k != key}
            subs = [schema_chars({**rest, **s}, nested) for s in schema[key]
                    if isinstance(s, dict)]
            return None if not subs or None in subs else max(subs)  # type: ignore[type-var]
    kind = schema.get("type")
    if kind is None and "properties" in schema:
        kind = "object"
    if isinstance(kind, list):
        subs = [schema_chars({**schema, "type": k}, nested) for k in kind]
        return None if not subs or None in subs else max(subs)  # type: ignore[type-var]
    if kind == "string":
        n = schema.get("maxLength")
        if not isinstance(n, int):
            return None
        return 2 + _JSON_ESCAPE * n if nested else n
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if not all(isinstance(b, int | float) and not isinstance(b, bool)
                   for b in (low, high)):
            return None
        digits = max(len(str(int(low))), len(str(int(high))))  # type: ignore[arg-type]
        return digits if kind == "integer" else max(digits, 24)  # 24: the longest float
    if kind == "object":
        if schema.get("additionalProperties", True) is not False:
            return None
        total = 2
        for key, sub in (schema.get("properties") or {}).items():
            n = schema_chars(sub, True)
            if n is None:
                return None
            total += len(json.dumps(key, ensure_ascii=False)) + 4 + n
        return total
    if kind == "array":
        n, item = schema.get("maxItems"), schema_chars(schema.get("items"), True)
        if not isinstance(n, int) or item is None:
            return None
        return 2 + n * (item + 2)
    return None


def _sub_schema(schema: Any, segments: tuple[str | int, ...]) -> Any:
    for seg in segments:
        if not isinstance(schema, dict):
            return None
        if isinstance(seg, int):
            schema = schema.get("items")
        else:
            schema = (schema.get("properties") or {}).get(seg)
    return schema


# -- one pipeline ------------------------------------------------------------------------------
Kind = Literal["ok", "unbounded", "unknown"]


@dataclass(frozen=True)
class StepCost:
    """A step's worst case. ``worst_usd`` is None when ``kind`` is unbounded or unknown;
    ``problem`` says why and ``fix`` what would bound it."""

    step_id: str
    model: str | None  # as the step names it; None for an MCP tool step
    target: str | None  # the costliest provider/model it may reach
    prompt_tokens: int | None  # per model call, everything it reads at its bounds
    output_tokens: int | None  # per model call
    calls: int  # most billed model calls: attempts x tool-loop rounds
    worst_usd: Decimal | None
    kind: Kind = "ok"
    problem: str | None = None
    fix: str | None = None
    runs: str = "always"
    note: str | None = None
    expected_usd: Decimal | None = None  # the ledger's average for this step, per run
    expected_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step_id, "model": self.model, "target": self.target,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "calls": self.calls, "runs": self.runs, "kind": self.kind,
                "worst_usd": _num(self.worst_usd), "problem": self.problem, "fix": self.fix,
                "note": self.note, "expected_usd": _num(self.expected_usd),
                "expected_runs": self.expected_runs}


@dataclass(frozen=True)
class RunCost:
    workflow: str
    steps: list[StepCost]
    worst_usd: Decimal | None
    kind: Kind
    problem: str | None
    budget: Decimal | None
    branches: list[tuple[list[str], list[str]]] = field(default_factory=list)
    expected_usd: Decimal | None = None

    @property
    def over_budget(self) -> bool:
        return (self.budget is not None and self.worst_usd is not None
                and self.worst_usd > self.budget)

    def to_dict(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "tokens": TOKENS_NOTE,
                "steps": [s.to_dict() for s in self.steps], "kind": self.kind,
                "worst_usd": _num(self.worst_usd), "problem": self.problem,
                "max_cost_usd": _num(self.budget), "over_budget": self.over_budget,
                "branches": [{"if": a, "else": b} for a, b in self.branches],
                "expected_usd": _num(self.expected_usd)}


def _num(d: Decimal | None) -> float | None:
    return None if d is None else float(d)


# The ledger's history: workflow name -> step id -> (average USD per run of the step, runs).
History = Callable[[str], Mapping[str, tuple[Decimal, int]]]


class _Bounds:
    """Sizes of what one pipeline's prompts read."""

    def __init__(self, compiled: CompiledPipeline, config: ProjectConfig | None,
                 catalog: ToolCatalog | None) -> None:
        self.c = compiled
        self.config = config
        self.catalog = catalog
        self.producers = {compiled.node(s).step.output_name: s for s in compiled.order}
        self._outputs: dict[str, Size] = {}
        self._targets: dict[str, list[tuple[str, str]] | str] = {}
        self.around: _Bounds | None = None  # a block's: the pipeline it is in

    def targets(self, model: str) -> list[tuple[str, str]] | str:
        if model not in self._targets:  # steps share a few models
            self._targets[model] = targets_of(model, self.config)
        return self._targets[model]

    def input(self, name: str) -> Size:
        spec: InputSpec | None = self.c.inputs.get(name)
        if spec is None:
            return Unbounded(f"input '{name}' is not declared",
                             f"declare '{name}' under `inputs:` with a max_length")
        if spec.type == "boolean":
            return 5
        if spec.max_length is None:
            return Unbounded(f"input '{name}' has no max_length",
                             f"declare `max_length:` on input '{name}'")
        return spec.max_length

    def path(self, path: Path) -> Size:
        if path.root == "input":
            if path.segments:
                return self.input(str(path.segments[0]))
            sizes = [self.input(n) for n in self.c.inputs]
            return _add(*sizes, 2 + sum(len(n) + 8 for n in self.c.inputs))
        sid = self.producers.get(path.root)
        if sid is None and self.around is not None:  # a block reads around it
            return self.around.path(path)
        if sid is None and path.root == "self":
            return Unbounded("a repeated step's prompt reads its previous answer",
                             "the run's max_cost_usd still stops it before a call that "
                             "could go past it")
        if sid is None:
            return Unbounded(f"'{path.root}' has no producer", "fix the reference")
        whole = self.output(sid)
        sub = schema_chars(_sub_schema(self._schema_of(sid), path.segments))
        if sub is not None:
            return sub if isinstance(whole, Unbounded) else min(sub, whole)
        return whole

    def ref(self, ref: Ref) -> Size:
        return _max([len(to_text(a.value)) if isinstance(a, Lit) else self.path(a)
                     for a in ref.alts])

    def _schema_of(self, sid: str) -> Any:
        step = self.c.node(sid).step
        if isinstance(step, PipelineStep | BlockStep) or step.for_each is not None:
            return None
        if isinstance(step, LLMStep):
            rf = step.response_format
            return rf.schema_ if rf is not None else None
        if isinstance(step, ApprovalStep):
            return step.schema_ if step.schema_ is not None or step.value is not None \
                else {"type": "boolean"}
        if not isinstance(step, MCPToolStep):
            return None  # a transform or switch: sized from what it reads (`_output`)
        tool = self._tool(step.server, step.tool)
        return tool.output_schema if tool is not None else None

    def _tool(self, server: str, tool: str) -> Any:
        tools = self.catalog.tools_of(server) if self.catalog else None
        return (tools or {}).get(tool)

    def output(self, sid: str) -> Size:
        """Characters of a step's result as a prompt reads it."""
        if sid not in self._outputs:
            self._outputs[sid] = self._output(sid)
        return self._outputs[sid]

    def _output(self, sid: str) -> Size:
        step = self.c.node(sid).step
        if isinstance(step, PipelineStep | BlockStep) or step.for_each is not None:
            return Unbounded(f"the result of step '{sid}' has no size bound",
                             "read a bounded field of it, or bound the inputs it reads")
        if not isinstance(step, LLMStep | MCPToolStep):
            return self._construct_output(sid)
        whole = schema_chars(self._schema_of(sid))
        if isinstance(step, ApprovalStep):  # the approver may send an edited value
            return whole if whole is not None else Unbounded(
                f"the value approval step '{sid}' outputs may be edited by its approver, and "
                "has no size bound", f"give step '{sid}' a `schema:` that bounds it "
                                     "(maxLength, maxItems, enum)")
        if isinstance(step, MCPToolStep):
            if whole is not None:
                return whole
            return Unbounded(f"the result of MCP tool {step.server}.{step.tool} has no size "
                             "bound", f"give {step.server}.{step.tool} an outputSchema that "
                                      "bounds it (maxLength, maxItems, enum)")
        out = self.max_output(step)
        if isinstance(out, Unbounded):
            return out if whole is None else whole
        return out * CHARS_PER_TOKEN if whole is None else min(whole, out * CHARS_PER_TOKEN)

    def _construct_output(self, sid: str) -> Size:
        """A template transform is as long as its template can render; an expression's
        result has no bound flowc can work out."""
        node = self.c.node(sid)
        if "template" in node.templates:
            return self.template(node.templates["template"])[0]
        return Unbounded(f"the result of step '{sid}' ({node.step.type}) has no size bound",
                         "read a bounded value instead, or compute it with a `template:`")

    def max_output(self, step: LLMStep) -> int | Unbounded:
        """Most tokens one answer of the step may have: `max_tokens`, or the largest context
        window among the models it may reach."""
        if step.max_tokens is not None:
            return step.max_tokens
        targets = step_targets(self, step)
        windows = [] if isinstance(targets, str) else [
            r.context if r else None for r in (rates(p, m, self.config) for p, m in targets)]
        if not windows or None in windows:
            return Unbounded(f"step '{step.id}' has no max_tokens and the context window of "
                             f"{step.model} is not known", f"set `max_tokens:` on step "
                                                           f"'{step.id}'")
        return max(windows)  # type: ignore[type-var]

    def template(self, t: Template) -> tuple[Size, str | None]:
        """A template's rendered size and, for Jinja code, a note on how it was bounded."""
        parts = [self.ref(p.ref) if p.ref is not None else 0 for p in t.parts]
        if t.jinja_source is None:
            literal = len(t.text) - sum(p.end - p.start for p in t.parts)
            return _add(literal, *parts), None
        size, capped = _JinjaBound(self, parts).size(t.jinja_source)
        note = (f"Jinja code it cannot bound counts at the render limit "
                f"({LIMITS.max_output:,} characters)" if capped else None)
        return size, note


class _JinjaBound:
    """A static bound on what Jinja code writes: literal text, each read at its bound, a
    loop's body once per item its iterable can hold, the larger branch of an `if`. Any
    other construct counts at the render limit, which no render passes."""

    def __init__(self, bounds: _Bounds, parts: list[Size]) -> None:
        self.b = bounds
        self.cap = LIMITS.max_output
        self.parts = [self.cap if isinstance(p, Unbounded) else min(p, self.cap)
                      for p in parts]
        self.locals: dict[str, int] = {}
        self.capped = False

    def size(self, source: str) -> tuple[int, bool]:
        from flowc.template import jinja_env

        try:
            ast = jinja_env().parse(source)
        except Exception:  # the checker reported it; a render would fail before any call
            return self.cap, True
        return min(self.cap, self.body(ast.body)), self.capped

    def _capped(self) -> int:
        self.capped = True
        return self.cap

    def body(self, stmts: list[Any]) -> int:
        return min(self.cap, sum(self.stmt(s) for s in stmts))

    def stmt(self, n: Any) -> int:
        from jinja2 import nodes

        if isinstance(n, nodes.Output):
            return sum(len(c.data) if isinstance(c, nodes.TemplateData) else self.expr(c)
                       for c in n.nodes)
        if isinstance(n, nodes.If):
            return max([self.body(n.body), *(self.body(e.body) for e in n.elif_),
                        self.body(n.else_)])
        if isinstance(n, nodes.For) and isinstance(n.target, nodes.Name) \
                and n.test is None and not n.recursive:
            items, item, total = self.iterable(n.iter)
            var = n.target.name
            uses = sum(1 for x in n.find_all(nodes.Name) if x.name == var) - 1
            nested = any(True for _ in n.find_all(nodes.For)) or any(
                isinstance(x, nodes.Macro | nodes.CallBlock) for x in n.find_all(nodes.Node))
            try:
                self.locals[var] = 0 if not nested else item
                body = self.body(n.body)
                if nested:  # every item at its largest, every time
                    return min(self.cap, items * body + self.body(n.else_))
                # each item is written where the body reads it: the items' sizes add up
                return min(self.cap, items * body + uses * total + self.body(n.else_))
            finally:
                self.locals.pop(var, None)
        return self._capped()

    def iterable(self, n: Any) -> tuple[int, int, int]:
        """How many items ``n`` may hold, how long one may read, and all of them together."""
        from jinja2 import nodes

        if isinstance(n, nodes.List | nodes.Tuple):
            sizes = [self.expr(i) for i in n.items]
            return len(sizes), max(sizes, default=0), sum(sizes)
        chain = self._chain(n)
        raw = None
        if chain is not None and not chain[0].startswith("__flowc_ref_") \
                and chain[0] not in self.locals and chain[0] != "loop":
            size = self.b.path(Path(*chain))
            raw = None if isinstance(size, Unbounded) else size
        if raw is not None:  # L characters of JSON: at most L items, their texts 10 L
            each = min(self.cap, raw * _REPR_ESCAPE)
            return raw, each, each
        size = self.expr(n)  # a text: as many items as characters
        return size, size, size

    def expr(self, n: Any) -> int:
        from jinja2 import nodes

        if isinstance(n, nodes.Filter) and n.name == "join" and n.node is not None:
            items, _, total = self.iterable(n.node)
            sep = self.expr(n.args[0]) if n.args else 0
            return min(self.cap, items * sep + total)
        if isinstance(n, nodes.Const):
            return len(str(n.value))
        if isinstance(n, nodes.CondExpr):
            return max(self.expr(n.expr1), self.expr(n.expr2) if n.expr2 else 0)
        if isinstance(n, nodes.Concat):
            return min(self.cap, sum(self.expr(c) for c in n.nodes))
        if isinstance(n, nodes.Filter) and n.name in ("length", "count", "wordcount"):
            return 20
        if isinstance(n, nodes.Filter) and n.name in ("default", "d") and n.node is not None:
            return max(self.expr(n.node), *(self.expr(a) for a in n.args[:1]))
        chain = self._chain(n)
        if chain is None:
            return self._capped()
        root, segments = chain
        if root.startswith("__flowc_ref_"):
            return self.parts[int(root.rsplit("_", 1)[1])]
        if root in self.locals:
            return self.locals[root]
        if root == "loop":
            return 20
        size = self.b.path(Path(root, segments))
        if isinstance(size, Unbounded):
            return self._capped()
        return min(self.cap, size if self._is_text(root, segments) else size * _REPR_ESCAPE)

    def _is_text(self, root: str, segments: tuple[str | int, ...]) -> bool:
        """Whether the value is a string (Jinja writes anything else as Python's repr)."""
        if root == "input":
            spec = self.b.c.inputs.get(str(segments[0])) if len(segments) == 1 else None
            return spec is not None and spec.type == "string"
        sid = self.b.producers.get(root)
        if sid is None:
            return False
        schema = _sub_schema(self.b._schema_of(sid), segments)
        step = self.b.c.node(sid).step
        if schema is None:
            return not segments and isinstance(step, LLMStep) and step.response_format is None
        return isinstance(schema, dict) and schema.get("type") == "string"

    @staticmethod
    def _chain(n: Any) -> tuple[str, tuple[str | int, ...]] | None:
        from jinja2 import nodes

        segments: list[str | int] = []
        while True:
            if isinstance(n, nodes.Getattr):
                segments.append(n.attr)
            elif isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) \
                    and isinstance(n.arg.value, str | int):
                segments.append(n.arg.value)
            elif isinstance(n, nodes.Name):
                return n.name, tuple(reversed(segments))
            else:
                return None
            n = n.node


def _tool_defs(bounds: _Bounds, step: LLMStep) -> list[dict[str, Any]] | Unbounded:
    """The function tools the step offers, as the runtime sends them."""
    defs: list[dict[str, Any]] = []
    for ref in step.tool_refs:
        server, _, name = ref.partition(".")
        tools = bounds.catalog.tools_of(server) if bounds.catalog else None
        if tools is None:
            return Unbounded(f"the tools of MCP server '{server}' are not known",
                             "declare them under the server's `tools:` in flowc.yaml, or "
                             "run `flowc check --live`")
        chosen = tools.items() if name == "*" else [(name, tools.get(name))]
        for tool, schema in chosen:
            if schema is None:
                return Unbounded(f"tool {ref} is not known", f"declare {ref} in flowc.yaml")
            defs.append({"type": "function", "function": {
                "name": f"{server}__{tool}", "description": (schema.description or "")[:1024],
                "parameters": schema.input_schema}})
    return defs


def _tool_result_chars(bounds: _Bounds, step: LLMStep) -> Size:
    """The largest result a tool the step offers may pass back to the model."""
    sizes: list[Size] = []
    for ref in step.tool_refs:
        server, _, name = ref.partition(".")
        tools = (bounds.catalog.tools_of(server) if bounds.catalog else None) or {}
        names = list(tools) if name == "*" else [name]
        for tool in names:
            schema = tools.get(tool)
            n = schema_chars(schema.output_schema, True) if schema is not None else None
            sizes.append(Unbounded(
                f"the result of tool {server}.{tool}, which step '{step.id}' passes back to "
                "the model, has no size bound",
                f"give {server}.{tool} an outputSchema that bounds it (maxLength, maxItems, "
                "enum)") if n is None else n)
    return _max(sizes)


def step_targets(bounds: _Bounds, step: LLMStep) -> list[tuple[str, str]] | str:
    """Every target a step's call may reach: its model's, then its `fallback_models:`'
    (a name that resolves to nothing, as `targets` gives it)."""
    found = bounds.targets(step.model)
    if isinstance(found, str):
        return found
    out = list(found)
    for name in step.fallback_models:
        more = bounds.targets(name)
        if isinstance(more, str):
            return more
        out += [t for t in more if t not in out]
    return out


def step_cost(bounds: _Bounds, sid: str) -> StepCost:
    node = bounds.c.node(sid)
    step = node.step
    if not isinstance(step, LLMStep | PipelineStep | BlockStep):  # no model call, even per item
        return StepCost(sid, None, None, None, None, 0, Decimal(0), runs=node.runs)
    if step.for_each is not None:  # the list's length has no bound the compiler knows
        return StepCost(sid, "block" if isinstance(step, BlockStep) else getattr(
                        step, "model", None), None, None, None, 0, None,
                        kind="unbounded", runs=node.runs,
                        problem=f"for_each runs once per item of {step.for_each}, a list "
                                "of no known length",
                        fix="the run's max_cost_usd still stops it before a call that "
                            "could go past it")
    if isinstance(step, PipelineStep | BlockStep):  # the callee's own worst case
        assert node.callee is not None
        block = isinstance(step, BlockStep)
        inner = pipeline_cost(node.callee, bounds.config, bounds.catalog,
                              around=bounds if block else None)
        times = (step.retries + 1) * (step.repeat.max if step.repeat and block else 1)
        calls = sum(s.calls for s in inner.steps) * times
        what = "block" if block else f"pipeline {node.callee.name}"
        if inner.worst_usd is None:
            return StepCost(sid, what, None, None, None, calls, None,
                            kind=inner.kind, runs=node.runs,
                            problem=(f"block '{sid}'" if block else
                                     f"pipeline '{node.callee.name}'") + f": {inner.problem}",
                            fix=next((s.fix for s in inner.steps if s.worst_usd is None),
                                     None) if block else
                            f"`flowc cost {step.pipeline}` shows what to bound")
        return StepCost(sid, what, None, None, None, calls, inner.worst_usd * times,
                        runs=node.runs)
    base = StepCost(sid, step.model, None, None, None, 0, None, runs=node.runs)
    targets = step_targets(bounds, step)
    if isinstance(targets, str):
        return replace(base, kind="unknown", problem=f"model '{targets}' resolves to nothing",
                       fix="name a model flowc.yaml or a provider knows")
    priced = [(f"{p}/{m}", rates(p, m, bounds.config)) for p, m in targets]
    unpriced = [name for name, r in priced if r is None]
    if unpriced:
        return replace(base, target=unpriced[0], kind="unknown",
                       problem=f"no price for {unpriced[0]}",
                       fix=f"price {unpriced[0]} under `prices:` in flowc.yaml")
    prompt, note = bounds.template(node.templates["prompt"])
    sizes: list[Size] = [prompt]
    if "system" in node.templates:
        system, system_note = bounds.template(node.templates["system"])
        sizes.append(system)
        note = note or system_note
    # The response format and the tools are sent with the prompt, counted as the runtime
    # counts them when it checks the budget before a call.
    extra: dict[str, Any] = {}
    wire = step.response_format.wire() if step.response_format else None
    if wire is not None:
        extra["response_format"] = wire
    rounds = 1
    if step.tools:  # each round's prompt holds the answers and tool results so far
        rounds = step.max_tool_calls + 1
        answer = bounds.max_output(step)
        result = _tool_result_chars(bounds, step)
        defs = _tool_defs(bounds, step)
        if isinstance(defs, Unbounded):
            sizes.append(defs)
        else:
            extra["tools"] = defs
        sizes.append(_add(result, answer) if isinstance(result, Unbounded) or isinstance(
            answer, Unbounded) else step.max_tool_calls * (answer * CHARS_PER_TOKEN + result))
    if extra:
        sizes.append(len(json.dumps(extra)))
    calls = (1 + step.retries) * rounds * (step.repeat.max if step.repeat else 1)
    base = replace(base, calls=calls, note=note)
    chars = _add(*sizes)
    best: tuple[Decimal, str, int, int] | None = None
    problem: Unbounded | None = None
    for name, r in priced:
        assert r is not None
        if r.free:  # $0 however long the prompt
            cost, p_tok, o_tok = Decimal(0), None, None
        else:
            if isinstance(chars, Unbounded):
                problem = chars
                continue
            p_tok = tokens(chars)
            if r.context is not None:  # a longer prompt is refused, unbilled
                p_tok = min(p_tok, r.context)
            # No answer is longer than the context window; counting all of it next to the
            # whole prompt over-counts, but a shorter prompt leaves room for a costlier answer.
            out = step.max_tokens if step.max_tokens is not None else r.context
            if out is None:
                problem = Unbounded(f"step '{step.id}' has no max_tokens and the output limit "
                                    f"of {name} is not known", f"set `max_tokens:` on step "
                                                               f"'{step.id}'")
                continue
            o_tok = out
            cost = r.cost(p_tok, o_tok) * calls
        if best is None or cost > best[0]:
            best = (cost, name, p_tok or 0, o_tok or 0)
    if problem is not None:
        return replace(base, target=best[1] if best else None, kind="unbounded",
                       problem=problem.why, fix=problem.fix)
    assert best is not None
    return replace(base, target=best[1], prompt_tokens=best[2], output_tokens=best[3],
                   worst_usd=best[0])


def _branches(compiled: CompiledPipeline) -> list[tuple[list[str], list[str]]]:
    """Steps guarded by `when: C` and `when: not (C)`: exactly one side runs."""
    from flowc.expr import Not

    by_condition: dict[Any, list[str]] = {}
    for sid in compiled.order:
        cond = compiled.node(sid).condition
        if cond is not None:
            try:
                by_condition.setdefault(cond, []).append(sid)
            except TypeError:  # a literal list in it: not hashable, and no pair to find
                continue
    pairs = []
    for cond, sids in by_condition.items():
        try:
            other = by_condition.get(Not(cond))
        except TypeError:
            continue
        if other is not None and not isinstance(cond, Not):
            pairs.append((sids, other))
    return pairs


def pipeline_cost(compiled: CompiledPipeline, config: ProjectConfig | None = None,
                  catalog: ToolCatalog | None = None, history: History | None = None,
                  around: _Bounds | None = None) -> RunCost:
    """The worst case of one run, per step and in all; with ``history``, the ledger's
    average next to it. ``around``: a block's steps read the pipeline it is in."""
    bounds = _Bounds(compiled, config, catalog)
    bounds.around = around
    seen = history(compiled.name) if history else {}
    steps = []
    for sid in compiled.order:
        sc = step_cost(bounds, sid)
        if sid in seen:
            avg, n = seen[sid]
            sc = replace(sc, expected_usd=avg, expected_runs=n)
        steps.append(sc)
    by_id = {s.step_id: s for s in steps}
    counted = [s for s in steps if s.runs != "never"]
    branches = _branches(compiled)
    # Each if/else pair counts its costlier side; a side that cannot be bounded counts as such.
    paired: set[str] = set()
    total = Decimal(0)
    problems = [s for s in counted if s.worst_usd is None]
    for a, b in branches:
        sides = []
        for side in (a, b):
            costs = [by_id[s].worst_usd for s in side if by_id[s].runs != "never"]
            sides.append(None if None in costs else sum(costs, Decimal(0)))  # type: ignore[arg-type]
        paired.update(a + b)
        if None not in sides:
            total += max(sides)  # type: ignore[type-var]
    for s in counted:
        if s.step_id not in paired and s.worst_usd is not None:
            total += s.worst_usd
    kind: Kind = "ok"
    problem = None
    if problems:
        kind = "unbounded" if any(s.kind == "unbounded" for s in problems) else "unknown"
        first = next(s for s in problems if s.kind == kind)
        problem = f"step '{first.step_id}': {first.problem}"
    expected = [s.expected_usd for s in counted if s.expected_usd is not None]
    budget = compiled.pipeline.max_cost_usd
    return RunCost(compiled.name, steps, None if problems else total, kind, problem,
                   None if budget is None else Decimal(str(budget)), branches,
                   sum(expected, Decimal(0)) if expected else None)


# -- printing ----------------------------------------------------------------------------------
def usd(amount: Decimal | float | int | str | None) -> str:
    """A dollar amount as every flowc output prints it: to the millionth (a small step's cost
    is a few of them), cents at least; under a millionth, two significant digits, so a tiny
    cost never shows as $0. Always fixed-point: $0.0000001, never $1e-07."""
    if amount is None:
        return "-"
    d = amount if isinstance(amount, Decimal) else Decimal(str(amount))
    if not d.is_finite():
        return "-"
    sign, d = ("-", -d) if d < 0 else ("", d)
    if d == 0:
        return "$0"
    if d < Decimal("0.000001"):
        return f"{sign}${Decimal(f'{d:.2g}').normalize():f}"
    whole, _, frac = f"{d:.6f}".partition(".")
    return f"{sign}${whole}.{frac.rstrip('0').ljust(2, '0')}"


def amount(d: Decimal) -> str:
    """A dollar amount as machines read it (JSON, headers, CSV, webhooks, alert rows): exact,
    plain decimal notation without trailing zeros: `0.0000001`, `50`; never `1.00E-7` (what
    `str()` gives a small Decimal) nor `50.000000000` (as the ledger stores it)."""
    if not d.is_finite():
        raise ValueError(f"not an amount: {d}")
    if d == 0:
        return "0"
    text = format(d, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def json_default(value: object) -> str:
    """`default=` for json/orjson: an amount (a Decimal) by `amount`, so a small one is not
    written `1.00E-7`; anything else (a datetime, a UUID) as `str()`."""
    return amount(value) if isinstance(value, Decimal) and value.is_finite() else str(value)


def format_cost(rc: RunCost) -> str:
    """A table per step and the run's total, then what could not be bounded and why."""
    rows = [("step", "model", "prompt tok", "output tok", "calls", "worst case", "expected")]
    for s in rc.steps:
        worst = usd(s.worst_usd) if s.kind == "ok" else s.kind
        if s.runs == "never":
            worst = "never runs"
        expected = (f"{usd(s.expected_usd)} ({s.expected_runs} run"
                    f"{'s' if s.expected_runs != 1 else ''})"
                    if s.expected_usd is not None else "-")
        rows.append((s.step_id, s.target or s.model or "(mcp tool)",
                     "-" if s.prompt_tokens is None else f"{s.prompt_tokens:,}",
                     "-" if s.output_tokens is None else f"{s.output_tokens:,}",
                     str(s.calls), worst, expected))
    rows.append(("run", "", "", "", "", usd(rc.worst_usd) if rc.kind == "ok" else rc.kind,
                 usd(rc.expected_usd) if rc.expected_usd is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5, 6}
    lines = [f"cost of {rc.workflow}: worst case per run ({TOKENS_NOTE}); expected from "
             "the ledger's history"]
    for i, r in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.rjust(w) if j in right else c.ljust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True)))
                     .rstrip())
    for s in rc.steps:
        if s.problem:
            lines.append(f"  {s.step_id}: {s.kind}: {s.problem} (fix: {s.fix})")
        if s.note:
            lines.append(f"  {s.step_id}: {s.note}")
    for a, b in rc.branches:
        lines.append(f"  if/else: {', '.join(a)} | {', '.join(b)}: the costlier side counts")
    if rc.budget is not None:
        verdict = ("over budget" if rc.over_budget else "within budget" if rc.kind == "ok"
                   else f"cannot be checked ({rc.kind})")
        lines.append(f"max_cost_usd {usd(rc.budget)}: {verdict}")
    return "\n".join(lines) + "\n"


# -- run time ----------------------------------------------------------------------------------
def input_too_long(specs: Mapping[str, InputSpec] | None, values: Mapping[str, Any]
                   ) -> list[str]:
    """Each input longer than its `max_length` (the bound a worst case was computed at)."""
    problems = []
    for name, spec in (specs or {}).items():
        if spec.max_length is not None and name in values:
            n = len(to_text(values[name]))
            if n > spec.max_length:
                problems.append(f"input '{name}' is {n:,} characters, more than its "
                                f"max_length of {spec.max_length:,}")
    return problems
