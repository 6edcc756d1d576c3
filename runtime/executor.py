"""Running a compiled pipeline: every step whose inputs are ready starts at once.

The join rule is the compiler's (docs/dsl.md): a skipped step's output is *missing*; a read
of a missing value takes its `??` fallback, or skips the reader when it says
`on_missing: skip`. `when:` false skips a step. `needs:` waits for a step to finish or be
skipped. A failure either fails the run and cancels what is running (`on_error: fail`) or
leaves the step's output missing (`on_error: continue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from flowc.caching import cache_of
from flowc.cost import usd
from flowc.expr import (
    MISSING,
    EvalError,
    Missing,
    Path,
    Ref,
    evaluate,
    resolve_ref,
    single_reference,
)
from flowc.ir import CompiledPipeline, StepNode
from flowc.model import LLMStep, MCPToolStep, PipelineStep
from flowc.schemas import json_path, schema_key, schema_validator
from flowc.template import Template, TemplateLimitError, render_async
from flowc.types import WRAPPED_RESULT, is_wrapped_result
from runtime import approval, frame, observe
from runtime.access.gate import Principal
from runtime.gateway.calls import CallContext, Outcome
from runtime.inputs import check_inputs
from runtime.providers import FlowcError
from runtime.resume import Paused, Resume, fingerprints
from runtime.step_cache import StepCache, cache_key, elapsed_ms, entry_now

log = logging.getLogger("flowc.run")


class ModelCalls(Protocol):
    async def complete(self, req: dict[str, Any], *, tags: str | None = ...,
                       ctx: CallContext = ...) -> Outcome: ...


@dataclass
class ToolResult:
    structured: Any
    text: str
    is_error: bool


class ToolCalls(Protocol):
    async def call_tool(self, server: str, tool: str, args: dict[str, Any],
                        timeout: float | None = None) -> ToolResult: ...

    async def function_tools(self, refs: list[str]) -> list[dict[str, Any]]: ...

    async def start(self, server: str) -> None:
        """Have the server running (started once, then kept): before a step's timeout."""


class StepFailed(Exception):
    pass


def schema_violation_error(message: str, answer: str, problem: str) -> StepFailed:
    """A model's answer that is not JSON or breaks the step's `response_format` schema:
    what `repeat:` repairs (``answer``: the text, ``problem``: what is wrong). Still a
    StepFailed to everyone else (the run record's error type)."""
    exc = StepFailed(message)
    exc.answer, exc.problem = answer, problem  # type: ignore[attr-defined]
    return exc


def is_schema_violation(exc: BaseException) -> bool:
    return isinstance(exc, StepFailed) and hasattr(exc, "problem")


class StepSkipped(Exception):
    """A step that finds, as it runs, that it has no result (a switch whose case produced
    none): its output is missing, as if it had been skipped."""


class BudgetExceeded(Exception):
    """The run would spend, or spent, more than its `max_cost_usd`: it fails whatever the
    step's `retries:` and `on_error:` say."""


@dataclass
class StepResult:
    id: str
    # pending (not started) | running | done | skipped | failed | cancelled | waiting (an
    # approval paused for a decision: `waiting_for` says what for)
    status: str = "pending"
    output: Any = None
    error: str | None = None
    skip_reason: str | None = None
    latency_ms: float = 0.0
    cost: Decimal | None = Decimal(0)
    tokens: int = 0
    attempts: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)  # each model and tool call
    items: list[dict[str, Any]] | None = None  # a `for_each` step's items, in order
    steps: dict[str, StepResult] | None = None  # a sub-pipeline's own steps
    cached: bool = False  # its result came from the step cache (`cache:`)
    saved: Decimal | None = None  # on a cache hit: what the call had cost
    marks: dict[str, Any] = field(default_factory=dict)  # resumed_from, waiting_for, ...
    fingerprint: str | None = None  # of the step's definition (a resume reuses a match)

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "status": self.status, "latency_ms": round(self.latency_ms, 1),
               "cost": None if self.cost is None else float(self.cost),
               "tokens": self.tokens, "attempts": self.attempts,
               "model_calls": self.model_calls, "tool_calls": self.tool_calls,
               "calls": self.calls,
               "error": self.error, "skip_reason": self.skip_reason}
        if self.items is not None:
            out["items"] = self.items
        if self.steps is not None:
            out["steps"] = [s.to_dict() for s in self.steps.values()]
        if self.status == "done":  # what a resume of the run reuses
            out["output"] = self.output
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        if self.cached:
            out["cached"] = True
            out["saved_usd"] = None if self.saved is None else float(self.saved)
        return {**out, **self.marks}


@dataclass
class RunResult:
    run_id: str
    workflow: str
    status: str  # succeeded | failed | cancelled
    output: Any
    steps: dict[str, StepResult]
    latency_ms: float
    inputs_hash: str
    dry_run: bool
    error: dict[str, Any] | None = None
    started_at: float = 0.0
    inputs: dict[str, Any] | None = None  # as checked: a resume runs with them again
    resumed_from: str | None = None  # the run this one resumed (`flowc run --resume`)

    @property
    def total_cost(self) -> Decimal | None:
        costs = [s.cost for s in self.steps.values()]
        return None if any(c is None for c in costs) else sum(costs, Decimal(0))  # type: ignore[arg-type]

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.steps.values())

    def to_dict(self) -> dict[str, Any]:
        cost = self.total_cost
        out = {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "output": self.output,
            "metrics": {
                "total_cost_usd": None if cost is None else float(cost),
                "total_tokens": self.total_tokens,
                "latency_ms": round(self.latency_ms, 1),
                "steps": [s.to_dict() for s in self.steps.values()],
            },
            "dry_run": self.dry_run,
        }
        if self.inputs is not None:
            out["inputs"] = self.inputs
            out["inputs_hash"] = self.inputs_hash
        if self.resumed_from is not None:
            out["resumed_from"] = self.resumed_from
        if self.error:
            out["error"] = self.error
        failed = [s.id for s in self.steps.values() if s.status == "failed"]
        if failed:
            out["failed_steps"] = failed
        return out


Listener = Callable[[StepResult], None]


def inputs_hash(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Executor:
    def __init__(self, models: ModelCalls, tools: ToolCalls | None = None, *,
                 dry_run: bool = False, max_concurrency: int = 64,
                 global_limit: asyncio.Semaphore | None = None,
                 cache: StepCache | None = None) -> None:
        self.models = models
        self.tools = tools
        self.cache = cache  # for steps with `cache:` (never in a dry run)
        self.dry_run = dry_run
        self.max_concurrency = max_concurrency
        self.global_limit = global_limit

    async def run(self, compiled: CompiledPipeline, inputs: dict[str, Any], *,
                  run_id: str | None = None, listener: Listener | None = None,
                  who: Principal | None = None,
                  max_cost_usd: Decimal | None = None,
                  on_cancel: Callable[[RunResult], None] | None = None,
                  resume: Resume | None = None) -> RunResult:
        """``who``: the caller its model calls are charged to (a virtual key, over HTTP);
        ``max_cost_usd``: a cap on this run beside the pipeline's own (the smaller holds).

        Cancelling the call cancels every running step before the CancelledError goes on;
        ``on_cancel`` then gets the run as it stood (status "cancelled"), to be recorded.

        ``resume``: the recorded outputs of another run's steps to reuse instead of running
        them again (runtime/resume.py), and approval decisions."""
        values = check_inputs(compiled.pipeline.inputs, inputs)
        run = _Run(self, compiled, values, run_id or uuid.uuid4().hex, listener, who,
                   max_cost_usd, resume)
        with observe.pipeline_run(compiled.name, run.run_id, self.dry_run, run.results) as seen:
            try:
                return seen(await run.execute())
            except asyncio.CancelledError:
                if on_cancel is not None:
                    on_cancel(run.result("cancelled", None, {
                        "step": None, "type": "Cancelled",
                        "message": "the run was cancelled by its caller"}))
                raise


class _Run:
    # What the run's `output:` is, in its errors; a nested run's error is worded by its caller
    # ("block 'b' failed: ..."), so there it is "its output".
    output_what: str | None = None

    def __init__(self, ex: Executor, compiled: CompiledPipeline, inputs: dict[str, Any],
                 run_id: str, listener: Listener | None, who: Principal | None = None,
                 max_cost_usd: Decimal | None = None, resume: Resume | None = None) -> None:
        self.ex = ex
        self.c = compiled
        self.inputs = inputs
        self.run_id = run_id
        self.listener = listener
        self.values: dict[str, Any] = {}  # output name -> value (absent = not yet / missing)
        self.missing_why: dict[str, str] = {}
        fingerprint = fingerprints(compiled)
        self.results = {sid: StepResult(sid, fingerprint=fingerprint[sid])
                        for sid in compiled.order}
        self.resume = resume or Resume()
        self.paused: set[str] = set()  # approval steps waiting for a decision
        self.started, self.t0 = time.time(), time.perf_counter()
        self.limit = asyncio.Semaphore(ex.max_concurrency)
        caps = [Decimal(str(c)) for c in (compiled.pipeline.max_cost_usd, max_cost_usd)
                if c is not None]
        self.budget = min(caps) if caps else None
        self.spent = Decimal(0)  # the ledger-priced cost of the run's calls so far
        self.reserved = Decimal(0)  # the worst case of the calls under way
        self.over_budget = False  # a call was refused or went past this run's own cap
        self.ctx = lambda sid: CallContext(  # a step's own `retries:` replace the gateway's
            compiled.name, run_id, frame.label(sid), ex.dry_run,
            retries=compiled.node(sid).step.retries == 0, who=who,
            fallbacks=tuple(getattr(compiled.node(sid).step, "fallback_models", ())))

    # -- scope -----------------------------------------------------------------------------
    def scope(self, name: str) -> Any:
        if name == "input":
            return self.inputs
        names = frame.NAMES.get()
        if names is not None and name in names:  # a `for_each` item, `self` in a `repeat:`
            return names[name]
        return self.values.get(name, MISSING)

    def jinja_names(self) -> dict[str, Any]:
        return {"input": self.inputs, **{k: v for k, v in self.values.items()
                                         if v is not MISSING}, **(frame.NAMES.get() or {})}

    def _emit(self, r: StepResult) -> None:
        if self.listener:
            self.listener(r)

    # -- the schedule ----------------------------------------------------------------------
    def result(self, status: str, output: Any, error: dict[str, Any] | None) -> RunResult:
        return RunResult(self.run_id, self.c.name, status, output, self.results,
                         (time.perf_counter() - self.t0) * 1000, inputs_hash(self.inputs),
                         self.ex.dry_run, error, self.started, self.inputs,
                         self.resume.run_id)

    async def execute(self) -> RunResult:
        self.started, self.t0 = time.time(), time.perf_counter()
        tasks: dict[asyncio.Task[None], str] = {}
        try:
            error = await self._schedule(tasks)
        except asyncio.CancelledError:  # the caller gave up: so does every running step
            for task in tasks:
                task.cancel()
            self._cancel_unfinished()
            # Wait for the steps to unwind unless cancelled again: an anyio cancel scope
            # (the MCP server's) re-raises at every await inside it.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if error is not None:
            self._cancel_unfinished()
        elif self.paused:  # an approval waits: what depends on it has not started
            return self.result("waiting", None, None)
        else:
            error = self._all_failed()
        output = None
        if error is None:
            try:
                output = await self._output()
            except (Missing, StepFailed, EvalError) as exc:  # a failed run, never a crash
                error = {"step": None, "type": type(exc).__name__,
                         "message": (self.output_what or f"the output of pipeline "
                                                         f"'{self.c.name}'")
                                    + " could not be built: "
                                    + (f"'{exc}' is missing" if isinstance(exc, Missing)
                                       else str(exc))}
        return self.result("failed" if error else "succeeded", output, error)

    def _cancel_unfinished(self) -> None:
        for r in self.results.values():
            if r.status in ("pending", "waiting", "running"):
                r.status = "cancelled"
                self._emit(r)

    async def _schedule(self, tasks: dict[asyncio.Task[None], str]) -> dict[str, Any] | None:
        """Start each step when its producers are finished; the first failure (under
        `on_error: fail`) cancels the rest and is returned."""
        g = self.c.graph
        waiting = {sid: g.in_degree(sid) for sid in self.c.order}
        error: dict[str, Any] | None = None

        def start(sid: str) -> None:
            tasks[asyncio.create_task(observe.step(self._step(sid), sid, self.results[sid]),
                                      name=sid)] = sid

        for sid in self.c.order:
            if waiting[sid] == 0:
                start(sid)
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                sid = tasks.pop(task)
                exc = task.exception()
                if exc is not None and error is None:
                    error = {"step": sid, "type": type(exc).__name__,
                             "message": self.results[sid].error or str(exc)}
                if error is None and sid not in self.paused:
                    for succ in g.successors(sid):
                        waiting[succ] -= 1
                        if waiting[succ] == 0:
                            start(succ)
            if error is not None and tasks:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                tasks.clear()
        return error

    def _all_failed(self) -> dict[str, Any] | None:
        """A run whose every step that ran failed (each under `on_error: continue`) failed:
        nothing it was meant to do happened. Some failed and some done: the run succeeded,
        as its author asked, and its record lists the failed steps (`failed_steps`)."""
        ran = [r for r in self.results.values() if r.status in ("done", "failed")]
        if not ran or any(r.status == "done" for r in ran):
            return None
        return {"step": ran[0].id, "type": "StepFailed",
                "message": f"every step that ran failed; first '{ran[0].id}': {ran[0].error}"}

    async def _output(self) -> Any:
        spec = self.c.output
        if spec is None:  # every step's result that no other step read
            return {self.c.node(s).step.output_name: self.values.get(
                self.c.node(s).step.output_name) for s in self.c.order
                if self.c.graph.out_degree(s) == 0
                and self.values.get(self.c.node(s).step.output_name, MISSING) is not MISSING}
        if isinstance(spec, dict):
            return {k: await self._value_of(t, "output template") for k, t in spec.items()}
        return await self._value_of(spec, "output template")

    async def _value_of(self, template: Template, what: str) -> Any:
        ref = single_reference(template.text)
        if ref is not None:
            return resolve_ref(ref, self.scope)
        return await self._render(template, self.jinja_names(), what)

    async def _render(self, template: Template, names: dict[str, Any], what: str) -> str:
        """Render off the event loop (Jinja code runs in a worker thread, bounded; a step's
        `timeout:` cancels it); a template past its limits fails the step."""
        from jinja2 import TemplateError

        try:
            return await render_async(template, self.scope, names)
        except TemplateLimitError as exc:
            raise StepFailed(f"{what} {exc}") from None
        except TemplateError as exc:  # a read `flowc check` cannot see (a loop variable's
            # field), or a value of another shape than its schema said
            raise StepFailed(f"{what} failed: {exc}") from None
        except (Missing, EvalError):
            raise
        except Exception as exc:  # the template's own code on these values: `{{ 1 // n }}`
            raise StepFailed(f"{what} failed: {type(exc).__name__}: {exc}") from None

    # -- one step --------------------------------------------------------------------------
    async def _step(self, sid: str) -> None:
        node = self.c.node(sid)
        step = node.step
        r = self.results[sid]
        t0 = time.perf_counter()
        if sid in self.resume.outputs:  # it succeeded in the run resumed: not run again
            r.status, r.output, r.marks["resumed_from"] = ("done", self.resume.outputs[sid],
                                                          self.resume.run_id)
            self.values[step.output_name] = r.output
            self._emit(r)
            return
        try:
            # A map's `when:` and reads are each item's: the step needs only its list.
            reason = self._skip_reason(node) if node.items is None else \
                self._missing_read(step, [node.items])
            if reason is not None:
                r.status, r.skip_reason = "skipped", reason
                self.missing_why[step.output_name] = f"step '{sid}' was skipped: {reason}"
                self._emit(r)
                return
            r.status = "running"
            self._emit(r)
            if node.items is not None:
                from runtime.foreach import run_foreach

                output = await run_foreach(self, node, r)
            else:
                async with self.limit:
                    if self.ex.global_limit is not None:
                        async with self.ex.global_limit:
                            output = await self.body(node, r)
                    else:
                        output = await self.body(node, r)
        except asyncio.CancelledError:
            r.latency_ms = (time.perf_counter() - t0) * 1000
            raise
        except Paused as waiting:
            r.latency_ms = (time.perf_counter() - t0) * 1000
            r.status, r.marks["waiting_for"] = "waiting", waiting.what
            self.paused.add(sid)
            self._emit(r)
            return
        except StepSkipped as skipped:
            r.status, r.skip_reason = "skipped", str(skipped)
            self.missing_why[step.output_name] = f"step '{sid}' was skipped: {skipped}"
            self._emit(r)
            return
        except Exception as exc:
            r.latency_ms = (time.perf_counter() - t0) * 1000
            r.status = "failed"
            r.error = r.error or _describe(exc)
            self._emit(r)
            if step.on_error == "continue" and not isinstance(exc, BudgetExceeded):
                self.missing_why[step.output_name] = f"step '{sid}' failed: {r.error}"
                return
            raise
        r.latency_ms = (time.perf_counter() - t0) * 1000
        r.status, r.output = "done", output
        self.values[step.output_name] = output
        self._emit(r)

    def _skip_reason(self, node: StepNode) -> str | None:
        """Why the step is skipped, or None if it runs. The condition's reads and the
        condition come first: a step whose `when:` is false never reads its data (`when:
        length(${input.docs}) > 1` guards `${input.docs[1]}`). A read of a missing value
        without a fallback skips the step (`on_missing: skip`) or fails it."""
        step = node.step
        reason = self._missing_read(step, [ref for ref, kind in node.refs if kind == "condition"])
        if reason is not None:
            return reason
        if node.case_test is not None:  # a switch case's step: is its case taken?
            try:
                if not evaluate(node.case_test, self.scope):
                    return f"{node.case} was not taken"
            except Missing:
                return f"{node.case} has no value to switch on"
            except EvalError as exc:
                raise StepFailed(f"{node.case} could not be decided: {exc}") from None
        if node.condition is not None:
            try:
                holds = bool(evaluate(node.condition, self.scope))
            except EvalError as exc:
                raise StepFailed(f"condition `{step.when}` could not be evaluated: {exc}"
                                 ) from None
            if not holds:
                return f"condition `{step.when}` was false"
        elif step.when is False:
            return "condition is false"
        return self._missing_read(step, [ref for ref, kind in node.refs
                                         if kind not in ("condition", "guarded", "until")
                                         and not _reads_self(step, ref)])

    def _missing_read(self, step: Any, refs: list[Ref]) -> str | None:
        for ref in refs:
            try:
                resolve_ref(ref, self.scope)
            except Missing as m:
                why = "; ".join(self.missing_why.get(a.root, f"'{a}' has no value")
                                for a in ref.alts if isinstance(a, Path))
                if step.on_missing == "skip":
                    return f"it reads {m} which is missing ({why})"
                raise StepFailed(f"'{m}' is missing ({why})") from None
        return None

    async def body(self, node: StepNode, r: StepResult) -> Any:
        """One execution of the step (one item of a map): its attempts, repeated until
        valid under `repeat:`."""
        if node.step.repeat is not None:
            from runtime.repeat import run_repeat

            return await run_repeat(self, node, r)
        return await self._attempts(node, r)

    async def _attempts(self, node: StepNode, r: StepResult) -> Any:
        step = node.step
        for attempt in range(step.retries + 1):
            r.attempts = attempt + 1
            try:
                # A server's cold start (~0.5-2 s for a stdio process) is not the step's
                # work: it happens before the step's `timeout:` starts counting.
                for server in self._servers_of(step):
                    await self.ex.tools.start(server)  # type: ignore[union-attr]
                if step.timeout:
                    async with asyncio.timeout(step.timeout):
                        return await self._execute(node, r)
                return await self._execute(node, r)
            except TimeoutError:
                err: Exception = StepFailed(f"timed out after {step.timeout:g} s")
            except (FlowcError, StepFailed) as exc:
                err = exc
                if step.repeat is not None and is_schema_violation(exc):
                    raise  # `repeat:` asks again with the violation: no blind retry
            if attempt < step.retries:
                r.error = None
                await asyncio.sleep(min(8.0, 0.2 * 2 ** attempt))
                continue
            r.error = _describe(err)
            raise err
        raise AssertionError("unreachable")  # pragma: no cover

    def _servers_of(self, step: Any) -> list[str]:
        if self.ex.tools is None or isinstance(step, PipelineStep):
            return []
        if isinstance(step, MCPToolStep):
            return [step.server]
        return sorted({ref.partition(".")[0] for ref in step.tool_refs}) \
            if isinstance(step, LLMStep) and step.tools else []

    async def _execute(self, node: StepNode, r: StepResult) -> Any:
        step = node.step
        if isinstance(step, LLMStep):
            return await self._llm(node, step, r)
        if step.type == "approval":
            return await approval.run_step(self, node, r)
        if isinstance(step, PipelineStep):
            from runtime.subpipeline import run_pipeline

            return await run_pipeline(self, node, r)
        if not isinstance(step, MCPToolStep):  # transform, switch: runtime/constructs
            from runtime.constructs import run_construct

            return await run_construct(self, node, r)
        assert isinstance(step, MCPToolStep)
        if self.ex.tools is None:
            raise StepFailed("no MCP servers are configured (mcpServers in flowc.yaml)")
        args = await self._params(node.params, f"params template of step '{step.id}'")
        key = await self._cache_key(step, "mcp_tool", {
            "server": step.server, "tool": step.tool, "arguments": args})
        if key is not None and (hit := await self._cache_hit(step, key, r)) is not None:
            return hit[0]
        res = await self._call_tool(r, step.server, step.tool, args, step.timeout)
        if res.is_error:
            raise StepFailed(f"tool {step.server}.{step.tool} failed: {res.text}")
        if res.structured is None or node.output_type.kind == "string":
            value = res.text  # typed as text: the tool's text, whatever else it sent
        elif is_wrapped_result(res.structured) and \
                node.output_type.field(WRAPPED_RESULT) is None:
            value = res.structured[WRAPPED_RESULT]  # a plain value, as the compiler typed it
        else:
            value = res.structured
        if key is not None:
            await self._cache_store(step, key, entry_now(value, Decimal(0), 0))
        return value

    # -- the step cache (`cache:`) ---------------------------------------------------------
    async def _cache_key(self, step: LLMStep | MCPToolStep, kind: str,
                         request: dict[str, Any]) -> str | None:
        """The step's cache key, or None when it is not cached (off, a dry run, no cache)."""
        on, _ = cache_of(step)
        if not on or self.ex.cache is None or self.ex.dry_run:
            return None
        return cache_key(kind, request)

    async def _cache_hit(self, step: LLMStep | MCPToolStep, key: str, r: StepResult,
                         req: dict[str, Any] | None = None) -> tuple[Any] | None:
        """A cached result (as a 1-tuple: a result may be null), recorded as a $0 call
        with its saving; None on a miss. A model step's hit goes only to a caller who may
        make its call ``req``: else it is refused as the call would be (an MCP tool call
        has no per-key restriction to check)."""
        assert self.ex.cache is not None
        t0 = time.perf_counter()
        entry = await self.ex.cache.get(key, cache_of(step)[1])
        if entry is None:
            return None
        permit = getattr(self.ex.models, "permit", None)
        if req is not None and permit is not None:
            permit(req, self.ctx(step.id))
        r.cached, r.saved, r.cost = True, entry.cost, Decimal(0)
        r.calls.append({"kind": "cache", "key": key, "model": entry.served_model or entry.model,
                        "cost": 0.0, "saved_usd": None if entry.cost is None
                        else float(entry.cost), "ms": round(elapsed_ms(t0), 1)})
        record = getattr(self.ex.models, "record_cached", None)
        if isinstance(step, LLMStep) and record is not None:
            record(step.model, entry.provider, entry.served_model, entry.cost, elapsed_ms(t0),
                   self.ctx(step.id))
        return (entry.output,)

    async def _cache_store(self, step: LLMStep | MCPToolStep, key: str, entry: Any) -> None:
        assert self.ex.cache is not None
        await self.ex.cache.put(key, entry, workflow=self.c.name, step_id=step.id,
                                run_id=self.run_id)

    async def _params(self, value: Any, what: str) -> Any:
        """Tool params with references filled in (a lone reference keeps its type); the
        compiler parsed them (`StepNode.params`)."""
        if isinstance(value, Template):
            return await self._value_of(value, what)
        if isinstance(value, dict):
            return {k: await self._params(v, what) for k, v in value.items()}
        if isinstance(value, list):
            return [await self._params(v, what) for v in value]
        return value

    async def _llm(self, node: StepNode, step: LLMStep, r: StepResult) -> Any:
        names = self.jinja_names()
        messages: list[dict[str, Any]] = []
        if step.system is not None:
            messages.append({"role": "system", "content": await self._render(
                node.templates["system"], names, f"system template of step '{step.id}'")})
        messages.append({"role": "user", "content": await self._render(
            node.templates["prompt"], names, f"prompt template of step '{step.id}'")})
        req: dict[str, Any] = {**step.params, "model": step.model, "messages": messages}
        for name in ("top_p", "stop", "seed", "reasoning_effort"):
            if getattr(step, name) is not None:
                req[name] = getattr(step, name)
        if step.temperature is not None:
            req["temperature"] = step.temperature
        if step.max_tokens is not None:
            req["max_tokens"] = step.max_tokens
        rf = step.response_format
        if rf is not None and rf.type != "text":
            req["response_format"] = rf.wire()
        tools: list[dict[str, Any]] = []
        if step.tools:
            if self.ex.tools is None:
                raise StepFailed("the step offers MCP tools but no MCP servers are configured")
            tools = await self.ex.tools.function_tools(step.tool_refs)
            req["tools"] = tools
        offered = {t["function"]["name"] for t in tools}
        # An alias pointed elsewhere in flowc.yaml is another request: the key has its target.
        config = getattr(self.ex.models, "config", None)
        target = config.resolve_model(step.model) if config is not None else None
        key = await self._cache_key(step, "llm", {**req, "target": target})
        if key is not None and (hit := await self._cache_hit(step, key, r, req)) is not None:
            return hit[0]
        paid: list[tuple[Decimal | None, int]] = []  # this attempt's calls: cost, tokens
        calls = 0
        while True:
            t0 = time.perf_counter()
            worst = self._reserve(step, req)
            try:
                out = await self.ex.models.complete(req, ctx=self.ctx(step.id))
            except FlowcError as exc:  # its failed upstream calls count too
                r.model_calls += getattr(exc, "attempts", 1)
                self.reserved -= worst
                raise
            except asyncio.CancelledError:  # the ledger prices the prompt of a cut-off call
                self.reserved -= worst
                self.spent += self._prompt_cost(req)
                raise
            self.reserved -= worst
            r.model_calls += out.attempts
            r.calls.append({"kind": "model", "provider": out.target.provider,
                            "model": out.body.get("model") or out.target.model,
                            "tokens": out.usage.total_tokens,
                            "cost": None if out.cost is None else float(out.cost),
                            "ms": round((time.perf_counter() - t0) * 1000, 1)})
            r.tokens += out.usage.total_tokens
            paid.append((out.cost, out.usage.total_tokens))
            r.cost = None if r.cost is None or out.cost is None else r.cost + out.cost
            self._spend(step, out.cost)  # after the step's record has the call
            message = out.body["choices"][0]["message"]
            tool_calls = message.get("tool_calls") or []
            if not tool_calls:
                break
            if calls + len(tool_calls) > step.max_tool_calls:
                raise StepFailed(f"the model asked for more than max_tool_calls="
                                 f"{step.max_tool_calls} tool calls")
            req["messages"] = [*req["messages"], message]
            for call in tool_calls:
                calls += 1
                req["messages"].append(await self._tool_message(r, call, offered))
        content = message.get("content") or ""
        if rf is not None and rf.type != "text":
            try:
                value = json.loads(content)
            except ValueError:
                raise schema_violation_error(f"model {step.model} did not answer with JSON: "
                                             f"{content[:200]!r}", content,
                                             "the answer is not JSON") from None
            problem = schema_violation(rf.schema_ or {"type": "object"}, value)
            if problem is not None:  # the compiler typed what follows by this schema
                raise schema_violation_error(f"model {step.model} answered JSON that does not "
                                             f"match the step's schema: {problem}", content,
                                             problem)
        else:
            value = content
        if key is not None:
            costs = [c for c, _ in paid]
            cost = None if None in costs else sum(costs, Decimal(0))  # type: ignore[arg-type]
            await self._cache_store(step, key, entry_now(
                value, cost, sum(t for _, t in paid), step.model, out.target.provider,
                r.calls[-1].get("model")))
        return value

    # -- the budget (`max_cost_usd`) -------------------------------------------------------
    def capped(self) -> list[_Run]:
        """The runs whose `max_cost_usd` covers this run's calls (a sub-pipeline's run is
        covered by its own and its callers')."""
        return [self] if self.budget is not None else []

    def _reserve(self, step: LLMStep, req: dict[str, Any]) -> Decimal:
        """Before a model call: its worst case (the prompt as sent, the most tokens it may
        answer, at the costliest model it may be routed to), held against the budget while
        it runs so that concurrent steps cannot overspend together. Dry runs cost $0."""
        caps = self.capped()
        if not caps or self.ex.dry_run:
            return Decimal(0)
        worst, what = self._call_worst(step, req)
        for run in caps:
            run._hold(step, worst, what)
        self.reserved += worst
        return worst

    def _hold(self, step: LLMStep, worst: Decimal | None, what: str) -> None:
        """Whether this run's cap has room for a call that may cost up to ``worst``."""
        assert self.budget is not None
        if worst is None:
            raise self._over(f"max_cost_usd {usd(self.budget)} cannot be enforced: {what}")
        if self.spent + self.reserved + worst > self.budget:
            raise self._over(
                f"the run would go past max_cost_usd {usd(self.budget)}: it has spent "
                f"{usd(self.spent)}" + (f" ({usd(self.reserved)} more under way)"
                                         if self.reserved else "")
                + f", and the next call of step '{step.id}' may cost up to {usd(worst)} ({what})")

    def _over(self, message: str) -> BudgetExceeded:
        self.over_budget = True  # this run's own cap, not a caller's (runtime/subpipeline.py)
        return BudgetExceeded(message)

    def _spend(self, step: LLMStep, cost: Decimal | None) -> None:
        """After a model call: its ledger-priced cost counts against the budget."""
        caps = self.capped()
        if not caps or self.ex.dry_run:
            return
        if cost is None:
            raise caps[0]._over(
                f"max_cost_usd {usd(caps[0].budget)} cannot be enforced: the call of step "
                f"'{step.id}' has no price (price its model under `prices:` in flowc.yaml)")
        self.spent += cost
        for run in caps:
            if run.spent > run.budget:  # type: ignore[operator]
                raise run._over(f"the run spent {usd(run.spent)}, more than max_cost_usd "
                                f"{usd(run.budget)} (the call of step '{step.id}' cost "
                                f"{usd(cost)})")

    def _targets(self, req: dict[str, Any], step: LLMStep | None = None) -> list[Any]:
        plan = getattr(self.ex.models, "plan", None)
        fallbacks = tuple(step.fallback_models) if step is not None else ()
        try:
            return list((plan(req, None, fallbacks) if fallbacks else plan(req, None)).targets
                        ) if plan else []
        except Exception:  # an unknown model: the call itself is refused, on the books
            return []

    def _call_worst(self, step: LLMStep, req: dict[str, Any]) -> tuple[Decimal | None, str]:
        from flowc.cost import rates
        from runtime.ledger.pricing import price
        from runtime.providers import Usage
        from runtime.providers.base import request_chars, tokens_of

        config = getattr(self.ex.models, "config", None)
        extra = {k: req[k] for k in ("tools", "response_format") if k in req}
        prompt = tokens_of(request_chars(req) + (len(json.dumps(extra)) if extra else 0))
        worst: tuple[Decimal, str] | None = None
        for target in self._targets(req, step):
            name = f"{target.provider}/{target.model}"
            limit = step.max_tokens
            if limit is None:  # an answer can be no longer than the context window
                known = rates(target.provider, target.model, config)
                if known is None or known.context is None:
                    if known is not None and known.free:
                        continue
                    return None, (f"step '{step.id}' has no max_tokens and the output limit "
                                  f"of {name} is not known")
                limit = known.context
            cost, _ = price(target.provider, target.model,
                            Usage(prompt_tokens=prompt, completion_tokens=limit),
                            config.prices if config else None)
            if cost is None:
                return None, f"no price for {name} (price it under `prices:` in flowc.yaml)"
            if worst is None or cost > worst[0]:
                worst = (cost, f"{name}: {prompt:,} prompt tokens, up to {limit:,} output")
        return worst or (Decimal(0), "no priced target")

    def _prompt_cost(self, req: dict[str, Any]) -> Decimal:
        if not self.capped() or self.ex.dry_run:
            return Decimal(0)
        from runtime.ledger.pricing import price
        from runtime.providers.base import estimate_usage

        config = getattr(self.ex.models, "config", None)
        costs = [price(t.provider, t.model, estimate_usage(req, 0),
                       config.prices if config else None)[0] for t in self._targets(req)]
        return max((c for c in costs if c is not None), default=Decimal(0))

    async def _call_tool(self, r: StepResult, server: str, tool: str, args: dict[str, Any],
                         timeout: float | None = None) -> ToolResult:
        """Call one MCP tool and record the call in the step's result."""
        assert self.ex.tools is not None
        t0 = time.perf_counter()
        record: dict[str, Any] = {"kind": "tool", "server": server, "tool": tool}
        r.tool_calls += 1
        r.calls.append(record)
        try:
            res = await self.ex.tools.call_tool(server, tool, args, timeout)
        except Exception as exc:
            record.update(ok=False, error=_describe(exc))
            raise
        finally:
            record["ms"] = round((time.perf_counter() - t0) * 1000, 1)
        record.update(ok=not res.is_error, error=res.text[:500] if res.is_error else None)
        return res

    async def _tool_message(self, r: StepResult, call: dict[str, Any], offered: set[str]
                            ) -> dict[str, Any]:
        """Run one tool call the model asked for; the answer (or error) goes back to it.
        Only the tools the step offered can be called."""
        from runtime.mcp.tools import split_function_name

        assert self.ex.tools is not None
        fn = call.get("function") or {}
        try:
            if fn.get("name") not in offered:
                raise StepFailed(f"tool '{fn.get('name')}' was not offered to the model")
            server, tool = split_function_name(fn.get("name", ""))
            args = json.loads(fn.get("arguments") or "{}")
            res = await self._call_tool(r, server, tool, args)
            text = res.text if res.structured is None else json.dumps(res.structured)
            content = ("error: " + text) if res.is_error else text
        except (ValueError, FlowcError, StepFailed) as exc:
            content = f"error: {exc}"
        return {"role": "tool", "tool_call_id": call.get("id"), "content": content}


def schema_violation(schema: dict[str, Any], value: Any) -> str | None:
    """The first way ``value`` breaks ``schema`` (a structured output's contract), or None.
    The compiler checked the schema itself."""
    validator = schema_validator(schema_key(schema))
    err = None if validator is None else next(iter(validator.iter_errors(value)), None)
    if err is None:
        return None
    at = json_path(err.absolute_path)
    return f"{at[1:] if at.startswith('.') else at or 'the answer'}: {err.message}"[:500]


def _reads_self(step: LLMStep | MCPToolStep | PipelineStep, ref: Ref) -> bool:
    """A read of `self` in a repeated step: bound per attempt (runtime/repeat.py)."""
    return step.repeat is not None and any(
        isinstance(a, Path) and a.root == "self" for a in ref.alts)


def _describe(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__
