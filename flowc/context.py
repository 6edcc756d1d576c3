"""What the checks share while compiling one file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flowc.config import ProjectConfig, ToolCatalog
from flowc.dag import Dag
from flowc.diagnostics import Collector
from flowc.expr import Node, Path, Ref
from flowc.model import (
    ApprovalStep,
    BlockStep,
    InputSpec,
    LLMStep,
    MCPToolStep,
    PipelineStep,
    SwitchStep,
    TransformStep,
)
from flowc.source import SourceFile, Span
from flowc.template import Template
from flowc.types import Type

Step = (LLMStep | MCPToolStep | TransformStep | SwitchStep | PipelineStep | ApprovalStep
        | BlockStep)


@dataclass(frozen=True)
class Use:
    """One reference in the file: who reads it, where, and in what role."""

    consumer: str | None  # step id, or None for the pipeline output
    ref: Ref
    span: Span
    # guarded: a Jinja read whose last part may be missing (`| default(..)`, `is defined`):
    # typed and checked, never a missing-value finding or a missing read at run time.
    # until: a `repeat: {until:}` condition, read after each attempt (it may read `self`).
    kind: Literal["data", "condition", "output", "guarded", "until"]
    jinja: bool = False  # read by Jinja code (`{{ a.b }}`), not a `${...}` reference


@dataclass
class StepInfo:
    index: int
    step: Step
    uses: list[Use] = field(default_factory=list)
    templates: dict[str, Template] = field(default_factory=dict)  # prompt, system
    params: Any = None  # an mcp_tool step's params, templated strings parsed
    construct: Any = None  # what flowc.constructs parsed for a transform or switch step
    case: str | None = None  # "case 'billing' of switch 'route'": the case that gates it
    case_test: Node | None = None  # when that case is taken
    runs_in_case: str = "always"  # whether it runs once its case is taken
    condition: Node | None = None
    constant: bool | None = None  # the condition's value when it is constant
    runs: Literal["always", "maybe", "never"] = "always"
    skip_reason: str | None = None
    items: Ref | None = None  # `for_each:` parsed
    until: Node | None = None  # `repeat: {until:}` parsed
    locals: dict[str, Type] = field(default_factory=dict)  # names only this step reads
    local_ref_types: dict[Ref, Type] = field(default_factory=dict)  # refs reading them
    callee: Any = None  # a `type: pipeline` step's compiled callee


@dataclass
class Context:
    source: SourceFile
    out: Collector
    raw: Any
    config: ProjectConfig | None = None
    catalog: ToolCatalog | None = None
    inputs: dict[str, InputSpec] | None = None
    steps: dict[str, StepInfo] = field(default_factory=dict)  # valid steps, file order
    producers: dict[str, str] = field(default_factory=dict)  # output name -> step id
    unchecked_outputs: set[str] = field(default_factory=set)  # names of invalid steps
    unchecked_ids: set[str] = field(default_factory=set)  # ids of invalid steps
    partial: set[str] = field(default_factory=set)  # steps checked without a misspelt field
    output_uses: list[Use] = field(default_factory=list)
    output_types: dict[str, Type] = field(default_factory=dict)
    ref_types: dict[Ref, Type] = field(default_factory=dict)  # static type of each reference
    input_types: dict[str, Type] = field(default_factory=dict)  # input name -> its type
    graph: Dag = field(default_factory=Dag)
    acyclic: bool = True
    order: list[str] = field(default_factory=list)  # steps in dependency order, when acyclic
    schema_errors: dict[tuple[tuple[str, str], str], Any] = field(default_factory=dict)
    file_bases: dict[tuple[Any, ...], int] = field(default_factory=dict)  # prompt files
    # In a block (flowc/constructs/block.py): names its steps read from around it, typed.
    outer: dict[str, Type] = field(default_factory=dict)
    inner_names: dict[str, str] = field(default_factory=dict)  # a block's step -> the block
    # In a block: the names its run binds for its steps (runtime/frame.py: the items and
    # `self` of it and the blocks around it), which a step's id may not hide -> what each is.
    bound: dict[str, str] = field(default_factory=dict)
    # In a block: values from around it that may be missing when it runs, for the skip
    # check of a reference that falls back between one and a step's (`${a ?? b}`):
    # name -> (maybe | never, why, the condition that alone may skip it or None).
    around: dict[str, tuple[str, str, Node | None]] = field(default_factory=dict)
    pipelines: Any = None  # name -> (YAML text, label) of callable pipelines (Project)
    output_label: str = "the pipeline output"  # what `output:` is, in findings
    pipelines_dir: Any = None  # Project.pipelines_dir

    def value_span(self, path: tuple[Any, ...], text: str, start: int, end: int) -> Span:
        """The span in the file of ``text[start:end]``, ``text`` being the value at ``path``
        (or the text of the prompt file the value at ``path`` names)."""
        base = self.file_bases.get(path)
        if base is not None:
            return Span(base + start, base + max(end, start + 1))
        return self.source.span_in_value(path, text, start, end - start)

    def step_path(self, step_id: str) -> tuple[Any, ...]:
        return ("steps", self.steps[step_id].index)

    def input_type(self, name: str) -> Type:
        """The static type of a declared input, from its JSON Schema (`items`, `properties`,
        `enum`)."""
        t = self.input_types.get(name)
        if t is None:
            from flowc.types import from_json_schema

            t = self.input_types[name] = from_json_schema(
                (self.inputs or {})[name].json_schema())
        return t

    def producer_of(self, path: Path) -> str | None:
        return None if path.root == "input" else self.producers.get(path.root)
