"""The compiled form of a pipeline: the runtime's only input.

``CompiledPipeline.dag`` (flowc.dag) is the step graph; ``.graph`` is the same graph as a
networkx DiGraph, made on first use (checking a file never imports networkx). Each node is a
step id whose data holds a :class:`StepNode`; each edge ``producer -> consumer`` carries
``vars`` (the output names the consumer reads from the producer), ``conditions`` (names its
`when:` reads) and ``order`` (true when `needs:` asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from flowc.dag import Dag
from flowc.expr import Node, Ref
from flowc.model import (
    ApprovalStep,
    BlockStep,
    InputSpec,
    LLMStep,
    MCPToolStep,
    Pipeline,
    PipelineStep,
    SwitchStep,
    TransformStep,
)
from flowc.template import Template
from flowc.types import Type

if TYPE_CHECKING:
    import networkx as nx


@dataclass(frozen=True)
class StepNode:
    step: (LLMStep | MCPToolStep | TransformStep | SwitchStep | PipelineStep | ApprovalStep
           | BlockStep)
    condition: Node | None  # parsed `when:` (None: always runs)
    templates: dict[str, Template]  # parsed prompt/system
    reads: tuple[str, ...]  # output names the step reads (data and condition)
    refs: tuple[tuple[Ref, str], ...]  # every reference with its role: "data" | "condition"
    output_type: Type
    runs: Literal["always", "maybe", "never"]  # as far as the compiler can tell
    skip_reason: str | None = None
    params: Any = None  # an mcp_tool step's params, each templated string a parsed Template
    construct: Any = None  # a transform's parsed expression(s); a switch's cases
    items: Ref | None = None  # `for_each:` (the step runs once per item)
    until: Node | None = None  # `repeat: {until:}`
    callee: CompiledPipeline | None = None  # a `type: pipeline` step's pipeline, a block's steps
    case: str | None = None  # the switch case that gates the step ("case 'x' of switch 'y'")
    case_test: Node | None = None  # when that case is taken


@dataclass(frozen=True)
class CompiledPipeline:
    pipeline: Pipeline
    dag: Dag
    order: tuple[str, ...]  # a topological order of step ids
    output: Template | dict[str, Template] | None  # the pipeline `output:`
    source_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def inputs(self) -> dict[str, InputSpec]:
        return self.pipeline.inputs or {}

    @cached_property
    def graph(self) -> nx.DiGraph:
        return self.dag.to_networkx()

    def node(self, step_id: str) -> StepNode:
        return self.dag.nodes[step_id]["node"]
