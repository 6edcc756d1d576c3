"""Drawing a compiled pipeline with Graphviz.

Shapes and colours by step type; the model or tool on each node; edges labelled with the
variable they carry; edges a `when:` reads labelled with the condition; steps that may be
skipped drawn dashed, steps that never run greyed out. A legend explains the marks.
"""

from __future__ import annotations

import graphviz

from flowc.expr import Path
from flowc.ir import CompiledPipeline
from flowc.model import LLMStep

_STYLE = {
    "llm": {"shape": "box", "style": "rounded,filled", "fillcolor": "#dbeafe",
            "color": "#1d4ed8"},
    "mcp_tool": {"shape": "component", "style": "filled", "fillcolor": "#dcfce7",
                 "color": "#15803d"},
}
_INPUT = {"shape": "invhouse", "style": "filled", "fillcolor": "#f3f4f6", "color": "#4b5563"}
_OUTPUT = {"shape": "house", "style": "filled", "fillcolor": "#fef3c7", "color": "#b45309"}
_CONDITION = {"color": "#b45309", "fontcolor": "#b45309", "style": "bold"}
_MAX_LABEL = 72
INPUT_NODE, OUTPUT_NODE = "__input__", "__output__"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def to_dot(compiled: CompiledPipeline, legend: bool = True) -> graphviz.Digraph:
    dot = graphviz.Digraph(name=compiled.name)
    dot.attr(rankdir="TB", fontname="Helvetica", label=compiled.name, labelloc="t")
    dot.attr("node", fontname="Helvetica", fontsize="11")
    dot.attr("edge", fontname="Helvetica", fontsize="9", color="#374151")
    if compiled.inputs or any(_input_names(compiled.node(s).refs, None)
                              for s in compiled.order):
        dot.node(INPUT_NODE, "input", **_INPUT)

    for sid in compiled.order:
        node = compiled.node(sid)
        step = node.step
        attrs = dict(_STYLE[step.type])
        detail = (step.model + (f"\ntools: {', '.join(step.tool_refs)}" if step.tools else "")
                  if isinstance(step, LLMStep) else f"{step.server}.{step.tool}")
        label = f"{sid}\n[{step.type}] {detail}"
        if step.output and step.output != sid:
            label += f"\n→ {step.output}"
        if node.runs == "maybe":
            attrs["style"] += ",dashed"
            label += "\n(may be skipped)"
        elif node.runs == "never":
            attrs.update(style="filled,dotted", fillcolor="#e5e7eb", fontcolor="#6b7280")
            label += "\n(never runs)"
        dot.node(sid, label, tooltip=node.skip_reason or "", **attrs)
        condition = _short(str(step.when))
        for name in sorted(_input_names(node.refs, "data")):
            dot.edge(INPUT_NODE, sid, label=f"input.{name}")
        for name in sorted(_input_names(node.refs, "condition")):
            dot.edge(INPUT_NODE, sid, label=f"input.{name}\nwhen {condition}", **_CONDITION)

    for producer, consumer, data in compiled.graph.edges(data=True):
        variables, conds = data.get("vars", []), data.get("conditions", [])
        if conds:
            condition = _short(str(compiled.node(consumer).step.when))
            dot.edge(producer, consumer, label=f"{', '.join(sorted(set(conds)))}\n"
                     f"when {condition}", **_CONDITION)
        if variables:
            dot.edge(producer, consumer, label=", ".join(variables))
        if data.get("order") and not variables and not conds:
            dot.edge(producer, consumer, label="needs", style="dotted")

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
        maybe = dict(_STYLE["llm"])
        maybe["style"] += ",dashed"
        lg.node("__legend_maybe", "may be skipped", **maybe)
        lg.edge("__legend_llm", "__legend_mcp", label="data")
        lg.edge("__legend_mcp", "__legend_maybe", label="when …", **_CONDITION)
