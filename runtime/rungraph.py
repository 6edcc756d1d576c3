"""One run drawn: the pipeline's DAG as `flowc graph` draws it (flowc/render.py), each step
coloured by what it did in the run, with its cost and latency, and its skip reason or error
on hover. Shared by `GET /v1/runs/{id}/graph.svg` (the dashboard's run page) and
`flowc runs RUN_ID --graph`.

A run record keeps its steps but not the pipeline's edges, so the graph comes from the
pipeline the server offers under the run's workflow name. When that pipeline is gone, or its
steps are no longer the run's, the picture is drawn from the record's steps alone (in the
order they were scheduled, no edges) and says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import graphviz

from flowc.cost import usd
from flowc.ir import CompiledPipeline
from flowc.render import Mark, to_dot

# fill, border, text, line style: by step status (runtime/executor.py StepResult.status).
STATUS_STYLE: dict[str, dict[str, str]] = {
    "done": {"fillcolor": "#dcfce7", "color": "#15803d", "fontcolor": "#14532d",
             "style": "filled,bold"},
    "failed": {"fillcolor": "#fee2e2", "color": "#b91c1c", "fontcolor": "#7f1d1d",
               "style": "filled,bold"},
    "skipped": {"fillcolor": "#f3f4f6", "color": "#6b7280", "fontcolor": "#4b5563",
                "style": "filled,dashed"},
    "cancelled": {"fillcolor": "#ffedd5", "color": "#c2410c", "fontcolor": "#7c2d12",
                  "style": "filled"},
    "pending": {"fillcolor": "#ffffff", "color": "#9ca3af", "fontcolor": "#6b7280",
                "style": "filled,dotted"},  # not started ("waiting" in older records)
    "waiting": {"fillcolor": "#fef3c7", "color": "#b45309", "fontcolor": "#78350f",
                "style": "filled,bold"},  # an approval paused for a decision
    "running": {"fillcolor": "#dbeafe", "color": "#1d4ed8", "fontcolor": "#1e3a8a",
                "style": "filled,bold"},
}


class GraphUnavailable(Exception):
    """Graphviz's `dot` is not installed: the picture cannot be drawn here."""


def steps_of(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    steps = (record.get("metrics") or {}).get("steps") or []
    return [s for s in steps if isinstance(s, dict) and isinstance(s.get("id"), str)]


def pipeline_for(record: Mapping[str, Any], workflows: Mapping[str, CompiledPipeline]
                 ) -> tuple[CompiledPipeline | None, str | None]:
    """The pipeline to draw the run over, or None and why the record's steps are drawn
    instead."""
    name = str(record.get("workflow"))
    compiled = workflows.get(name)
    if compiled is None:
        return None, (f"pipeline '{name}' is not served any more: drawn from the run "
                      "record's steps (no edges)")
    ran = [s["id"] for s in steps_of(record)]
    if set(compiled.order) != set(ran):
        return None, (f"pipeline '{name}' has changed since this run (its steps are not the "
                      "run's): drawn from the run record's steps (no edges)")
    return compiled, None


def fmt_cost(cost: Any) -> str:
    return "cost unknown" if cost is None else usd(cost)


def mark(step: Mapping[str, Any]) -> Mark:
    """A step's status, cost and latency on its node; why it was skipped or failed on
    hover. The node's SVG group gets `id="step-<id>"` and `class="step status-<status>"`."""
    status = str(step.get("status") or "pending")
    if status == "waiting" and not step.get("waiting_for"):  # a record from before `pending`
        status = "pending"
    note = status
    if status in ("done", "failed"):
        note += f" · {fmt_cost(step.get('cost'))} · {float(step.get('latency_ms') or 0):.0f} ms"
    why = step.get("skip_reason") if status == "skipped" else step.get("error")
    attrs = {**STATUS_STYLE.get(status, STATUS_STYLE["pending"]),
             "id": f"step-{step['id']}", "class": f"step status-{status}"}
    return Mark(note, attrs, f"{step['id']}: {status}" + (f": {why}" if why else ""))


def _title(record: Mapping[str, Any], note: str | None) -> str:
    m = record.get("metrics") or {}
    title = (f"{record.get('workflow')} · run {record.get('run_id')} · {record.get('status')}"
             f" · {fmt_cost(m.get('total_cost_usd'))} · {float(m.get('latency_ms') or 0):.0f}"
             " ms")
    return title + (f"\n{note}" if note else "")


def _legend(dot: graphviz.Digraph, seen: list[str]) -> None:
    with dot.subgraph(name="cluster_status") as lg:
        lg.attr(label="step status", fontsize="10", style="dashed", color="#9ca3af")
        for status in seen:
            lg.node(f"__status_{status}", status, shape="box",
                    **STATUS_STYLE.get(status, STATUS_STYLE["pending"]))


def run_dot(record: Mapping[str, Any], compiled: CompiledPipeline | None,
            note: str | None = None) -> graphviz.Digraph:
    """The run over its pipeline's DAG, or over its own steps when ``compiled`` is None."""
    steps = steps_of(record)
    marks = {s["id"]: mark(s) for s in steps}
    if compiled is not None:
        dot = to_dot(compiled, legend=False, marks=marks)
    else:
        dot = graphviz.Digraph(name=str(record.get("workflow")))
        dot.attr("node", fontname="Helvetica", fontsize="11", shape="box")
        previous = None
        for s in steps:
            m = marks[s["id"]]
            dot.node(s["id"], f"{s['id']}\n{m.note}", tooltip=m.tooltip, **m.attrs)
            if previous is not None:  # keeps the scheduled order top to bottom
                dot.edge(previous, s["id"], style="invis")
            previous = s["id"]
    dot.attr(fontname="Helvetica", labelloc="t", label=_title(record, note))
    _legend(dot, [st for st in STATUS_STYLE if any(s.get("status") == st for s in steps)])
    return dot


def run_svg(record: Mapping[str, Any], workflows: Mapping[str, CompiledPipeline]
            ) -> tuple[bytes, str | None]:
    """The run as SVG, and the note saying it was drawn from the record (or None)."""
    compiled, note = pipeline_for(record, workflows)
    try:
        return run_dot(record, compiled, note).pipe(format="svg"), note
    except graphviz.ExecutableNotFound:
        raise GraphUnavailable("Graphviz's `dot` program is not installed (apt-get install "
                               "graphviz, brew install graphviz): the run cannot be "
                               "drawn") from None
