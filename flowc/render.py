"""Drawing a compiled pipeline with Graphviz.

Shapes and colours by step type; the model or tool on each node, with its condition and the
inputs it reads; one edge per pair of steps, labelled with the names it carries (bold when
the consumer's `when:` reads one); steps that may be skipped drawn dashed, steps that never
run greyed out. A legend explains the marks.

Drawn to stay readable and fast in `dot` as pipelines grow: the input node has edges only to
steps that read nothing else, and only when there are at most `INPUT_EDGES` of them; every
other step lists the inputs it reads. An edge from the input node to every step that reads
an input made a 6-step pipeline 3,000 px wide, and a 200-step one took `dot` minutes: long
edges across many ranks are what its crossing minimisation chokes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import graphviz

from flowc.approval import approval_label
from flowc.caching import cache_of
from flowc.expr import Path
from flowc.ir import CompiledPipeline, StepNode
from flowc.model import LLMStep, MCPToolStep, PipelineStep, SwitchStep, TransformStep

_STYLE = {
    "llm": {"shape": "box", "style": "rounded,filled", "fillcolor": "#dbeafe",
            "color": "#1d4ed8"},
    "mcp_tool": {"shape": "component", "style": "filled", "fillcolor": "#dcfce7",
                 "color": "#15803d"},
    "transform": {"shape": "parallelogram", "style": "filled", "fillcolor": "#f5f3ff",
                  "color": "#6d28d9"},
    "pipeline": {"shape": "box3d", "style": "filled", "fillcolor": "#ede9fe",
                 "color": "#6d28d9"},
    "approval": {"shape": "octagon", "style": "filled", "fillcolor": "#fce7f3",
                 "color": "#be185d"},
    "switch": {"shape": "diamond", "style": "filled", "fillcolor": "#ffedd5",
               "color": "#c2410c"},
    "block": {"shape": "box3d", "style": "filled", "fillcolor": "#f1f5f9",
              "color": "#334155"},
}
_INPUT = {"shape": "invhouse", "style": "filled", "fillcolor": "#f3f4f6", "color": "#4b5563"}
_OUTPUT = {"shape": "house", "style": "filled", "fillcolor": "#fef3c7", "color": "#b45309"}
_CONDITION = {"color": "#b45309", "fontcolor": "#b45309", "style": "bold"}
_MAX_LABEL = 72
INPUT_EDGES = 8  # input-node edges drawn at most (see the module docstring)
EDGE_LABELS_UP_TO = 1500  # steps: past this, edge labels (each one a node to `dot`) are left out
INPUT_NODE, OUTPUT_NODE = "__input__", "__output__"


@dataclass(frozen=True)
class Mark:
    """What a run did at a step, drawn over the step's node (runtime/rungraph.py): a line
    added to its label, attributes over its style, and the text shown on hover."""

    note: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    tooltip: str = ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def to_dot(compiled: CompiledPipeline, legend: bool = True,
           marks: Mapping[str, Mark] | None = None) -> graphviz.Digraph:
    dot = graphviz.Digraph(name=compiled.name)
    dot.attr(rankdir="TB", fontname="Helvetica", label=compiled.name, labelloc="t")
    dot.attr("node", fontname="Helvetica", fontsize="11")
    dot.attr("edge", fontname="Helvetica", fontsize="9", color="#374151")
    labels = len(compiled.order) <= EDGE_LABELS_UP_TO
    if compiled.inputs or any(_input_names(compiled.node(s).refs, None)
                              for s in compiled.order):
        names = "\n".join(f"{k}: {v.type}" for k, v in compiled.inputs.items())
        dot.node(INPUT_NODE, "input" + (f"\n{names}" if names else ""), **_INPUT)

    roots = [s for s in compiled.order if compiled.graph.in_degree(s) == 0
             and _input_names(compiled.node(s).refs, None)]
    input_edges = set(roots) if len(roots) <= INPUT_EDGES else set()
    for sid in compiled.order:
        node = compiled.node(sid)
        step = node.step
        attrs = dict(_STYLE[step.type])
        detail = (step.model + (f"\ntools: {', '.join(step.tool_refs)}" if step.tools else "")
                  if isinstance(step, LLMStep) else f"{step.server}.{step.tool}"
                  if isinstance(step, MCPToolStep) else step.pipeline
                  if isinstance(step, PipelineStep) else approval_label(step)
                  if step.type == "approval" else construct_detail(node))
        label = f"{sid}\n[{step.type}] {detail}"
        cached, ttl = cache_of(step)
        if cached:
            label += "\ncached" + (f" (ttl {step.cache.ttl})" if ttl else "")
        if step.output_name != sid:
            label += f"\n→ {step.output_name}"
        if step.for_each is not None:  # a map: drawn as a stack of its items
            label += (f"\nfor each {step.as_} in {_short(step.for_each)}"
                      f"\n(≤{step.max_concurrency or 10} at once)")
            attrs["peripheries"] = "2"
        if step.when is not None:
            label += f"\nwhen {_short(str(step.when))}"
        if node.case is not None:
            label += f"\nin {_short(node.case)}"
        inputs = sorted(_input_names(node.refs, None))
        if inputs and sid not in input_edges:
            label += f"\nreads input.{', input.'.join(inputs)}"
        if node.runs == "maybe":
            attrs["style"] += ",dashed"
            label += "\n(may be skipped)"
        elif node.runs == "never":
            attrs.update(style="filled,dotted", fillcolor="#e5e7eb", fontcolor="#6b7280")
            label += "\n(never runs)"
        tooltip = node.skip_reason or ""
        mark = marks.get(sid) if marks else None
        if mark is not None:
            label += f"\n{mark.note}"
            attrs.update(mark.attrs)
            tooltip = mark.tooltip
        dot.node(sid, label, tooltip=tooltip, **attrs)
        if step.repeat is not None:
            until = step.repeat.until if isinstance(step.repeat.until, str) else "valid"
            dot.edge(sid, sid, label=_short(f"repeat until {until} (max {step.repeat.max})")
                     if labels else None, style="dashed", color="#6d28d9")
        if node.callee is not None:
            _callee(dot, sid, node.callee, step.type == "block")
        if sid in input_edges:
            style = _CONDITION if _input_names(node.refs, "condition") else {}
            dot.edge(INPUT_NODE, sid, label=f"input.{', input.'.join(inputs)}"
                     if labels else None, **style)

    for producer, consumer, data in compiled.graph.edges(data=True):
        names = sorted({*data.get("vars", []), *data.get("conditions", [])})
        style = _CONDITION if data.get("conditions") else {}
        plan = compiled.node(consumer).construct
        if isinstance(compiled.node(consumer).step, SwitchStep) and names and \
                names[0] in getattr(plan, "results", {}):  # a case's result joins the switch
            dot.edge(producer, consumer, label=f"case {plan.label_of(names[0])}"
                     if labels else None, style="dashed", color="#c2410c")
            continue
        if names:
            dot.edge(producer, consumer, label=", ".join(names) if labels else None, **style)
        elif data.get("order"):
            dot.edge(producer, consumer, label="needs" if labels else None, style="dotted")

    if compiled.output is not None:
        dot.node(OUTPUT_NODE, "output", **_OUTPUT)
        templates = (compiled.output.values() if isinstance(compiled.output, dict)
                     else [compiled.output])
        producers = {compiled.node(s).step.output_name: s for s in compiled.order}
        drawn: set[str] = set()
        for template in templates:
            for part in template.parts:
                for alt in part.ref.alts if part.ref else ():
                    if not isinstance(alt, Path) or alt.root in drawn:
                        continue
                    drawn.add(alt.root)
                    src = INPUT_NODE if alt.root == "input" else producers.get(alt.root)
                    if src:
                        dot.edge(src, OUTPUT_NODE, label=alt.root)
    if legend:
        _legend(dot)
    return dot


def construct_detail(node: StepNode) -> str:
    """What a transform, switch or block step computes, in a line or two."""
    step = node.step
    if isinstance(step, TransformStep):
        if step.template is not None:
            return "template → " + str(node.output_type)
        body = step.expr if isinstance(step.expr, str) else ", ".join(step.expr or {})
        return f"{_short(body)}\n→ {node.output_type}"
    if isinstance(step, SwitchStep):
        return f"on {_short(step.value)}\n→ {node.output_type}"
    if step.type == "block":
        return f"→ {_short(str(node.output_type))}"
    return ""
def _callee(dot: graphviz.Digraph, sid: str, callee: CompiledPipeline,
            block: bool = False) -> None:
    """A sub-pipeline's (or a block's) steps, in a box beside the step that runs them."""
    with dot.subgraph(name=f"cluster_{sid}") as sub:
        sub.attr(label=f"{sid}: " + ("block" if block else f"pipeline {callee.name}"),
                 style="dashed", color="#334155" if block else "#6d28d9", fontsize="10")
        for inner in callee.order:
            step = callee.node(inner).step
            sub.node(f"{sid}/{inner}", f"{inner}\n[{step.type}]", **_STYLE[step.type])
            if callee.node(inner).callee is not None:
                _callee(dot, f"{sid}/{inner}", callee.node(inner).callee,  # type: ignore[arg-type]
                        step.type == "block")
        for producer, consumer in callee.graph.edges():
            sub.edge(f"{sid}/{producer}", f"{sid}/{consumer}")
    roots = [s for s in callee.order if callee.graph.in_degree(s) == 0]
    for root in roots:
        dot.edge(sid, f"{sid}/{root}", style="dotted", label="runs", color="#6d28d9")


def _input_names(refs: tuple, kind: str | None) -> set[str]:
    """Input names read by references of the given role (any role when ``kind`` is None)."""
    return {str(alt.segments[0]) for ref, k in refs if kind in (None, k)
            for alt in ref.alts
            if isinstance(alt, Path) and alt.root == "input" and alt.segments}


def _legend(dot: graphviz.Digraph) -> None:
    with dot.subgraph(name="cluster_legend") as lg:
        lg.attr(label="legend", fontsize="10", style="dashed", color="#9ca3af")
        lg.node("__legend_llm", "llm step\n(model)", **_STYLE["llm"])
        lg.node("__legend_mcp", "mcp_tool step\n(server.tool)", **_STYLE["mcp_tool"])
        lg.node("__legend_approval", "approval step\n(waits for a person)",
                **_STYLE["approval"])
        maybe = dict(_STYLE["llm"])
        maybe["style"] += ",dashed"
        lg.node("__legend_maybe", "may be skipped", **maybe)
        lg.node("__legend_pipeline", "pipeline step\n(its steps boxed beside it)",
                **_STYLE["pipeline"])
        lg.node("__legend_map", "for_each step\n(once per item)", **_STYLE["llm"],
                peripheries="2")
        lg.edge("__legend_maybe", "__legend_pipeline", style="invis")
        lg.edge("__legend_pipeline", "__legend_map", style="invis")
        lg.edge("__legend_llm", "__legend_mcp", label="data")
        lg.edge("__legend_mcp", "__legend_maybe", label="read in when", **_CONDITION)
