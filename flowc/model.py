"""The pipeline language (v1) as pydantic models.

These models are the single definition of the language: the compiler validates against them,
`flowc schema` prints their JSON Schema, and the compiled DAG carries them as node data.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)

from flowc.schemas import schema_key, schema_problem

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
InputType = Literal["string", "integer", "number", "boolean", "object", "array"]


class _Strict(BaseModel):
    # defer_build: validators are built on first use (steps validate inside the Step and
    # Pipeline validators; the runtime's and the LSP's uses build the rest).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class InputSpec(_Strict):
    """One declared pipeline input."""

    type: InputType = "string"
    required: bool | list[str] | None = Field(
        default=None,
        description="Defaults to true unless a default is given. On an object input, a "
                    "list names the fields that must be present (JSON Schema's `required`); "
                    "the input itself is then required unless it has a default.")
    default: Any = None
    description: str | None = None
    max_length: int | None = Field(
        default=None, gt=0,
        description="Most characters the value may have as a prompt reads it (a string as "
                    "it is, any other type as JSON). A run refuses a longer value; the "
                    "worst-case cost (`flowc cost`) needs it for every input a prompt reads.")

    items: dict[str, Any] | None = Field(
        default=None, description="An array input's element type, as JSON Schema: "
                                  "`{type: object, properties: {...}}`.")
    properties: dict[str, Any] | None = Field(
        default=None, description="An object input's fields, each a JSON Schema.")
    enum: list[Any] | None = Field(
        default=None, min_length=1, description="The only values the input may have.")
    min_items: int | None = Field(
        default=None, ge=0, description="The fewest items an array input may have (JSON "
                                         "Schema's `minItems`): `${input.x[0]}` then needs "
                                         "no fallback when it is 1 or more.")

    @property
    def is_required(self) -> bool:
        if self.required is None or isinstance(self.required, list):
            return self.default is None
        return self.required

    def json_schema(self) -> dict[str, Any]:
        """The input's value as JSON Schema: its type, elements, fields and values."""
        schema: dict[str, Any] = {"type": self.type}
        if self.items is not None:
            schema["items"] = self.items
        if self.properties is not None:
            schema["properties"] = self.properties
        if isinstance(self.required, list):
            schema["required"] = self.required
        if self.enum is not None:
            schema["enum"] = self.enum
        if self.min_items is not None:
            schema["minItems"] = self.min_items
        return schema

    @model_validator(mode="after")
    def _typed_parts_fit(self) -> InputSpec:
        if self.items is not None and self.type != "array":
            raise ValueError(f"`items` is only allowed with type array, not {self.type}")
        if self.properties is not None and self.type != "object":
            raise ValueError(f"`properties` is only allowed with type object, not {self.type}")
        if self.min_items is not None and self.type != "array":
            raise ValueError(f"`min_items` is only allowed with type array, not {self.type}")
        if isinstance(self.required, list):
            if self.type != "object":
                raise ValueError("a list of `required` fields is only allowed with type "
                                 f"object, not {self.type}")
            unknown = [f for f in self.required if f not in (self.properties or {})]
            if unknown:
                raise ValueError(f"required field '{unknown[0]}' is not one of the input's "
                                 "`properties`")
        if self.items is not None or self.properties is not None or self.enum is not None:
            problem = schema_problem(schema_key(self.json_schema()))
            if problem:
                raise ValueError(problem)
        if self.enum is not None and self.default is not None and self.default not in self.enum:
            raise ValueError(f"the default {json.dumps(self.default, default=str)} is not one "
                             "of the input's `enum` values")
        return self

    @model_validator(mode="after")
    def _default_fits(self) -> InputSpec:
        if self.max_length is not None and self.default is not None:
            text = self.default if isinstance(self.default, str) else json.dumps(
                self.default, ensure_ascii=False, default=str)
            if len(text) > self.max_length:
                raise ValueError(f"the default is {len(text)} characters, more than "
                                 f"max_length {self.max_length}")
        return self


class ResponseFormat(_Strict):
    """Structured output: `json_object` (any JSON object) or `json_schema` (with `schema`)."""

    type: Literal["text", "json_object", "json_schema"] = "json_schema"
    name: str = Field(default="output", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool = True

    @field_validator("schema_")
    @classmethod
    def _valid_json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            problem = schema_problem(schema_key(schema))
            if problem:
                raise ValueError(problem)
        return schema

    def wire(self) -> dict[str, Any] | None:
        """As a chat completions request's `response_format` (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema_,
                                                        "strict": self.strict}}

    @model_validator(mode="after")
    def _schema_matches_type(self) -> ResponseFormat:
        if self.type == "json_schema" and not self.schema_:
            raise ValueError("response_format of type json_schema needs a `schema`")
        if self.type != "json_schema" and self.schema_:
            raise ValueError(f"`schema` is only allowed with type json_schema, not {self.type}")
        return self


class Repeat(_Strict):
    """`repeat:` on a step: a loop with a bound, for validate-and-repair."""

    until: str | bool | None = Field(
        default=None,
        description="Condition over `${self.output}` (the attempt's answer) and any earlier "
                    "value; without it, a step repeats until its answer matches its "
                    "`response_format` schema.")
    max: int = Field(ge=1, le=10, description="Most attempts, the first included.")


DURATION_PATTERN = r"^[1-9][0-9]*(s|m|h|d)$"


class CacheSpec(_Strict):
    """`cache:` with settings (`cache: true` is the same with none)."""

    ttl: str | None = Field(
        default=None, pattern=DURATION_PATTERN,
        description="How long a cached result is reused: `30s`, `10m`, `1h`, `7d`. "
                    "Without it, until the ledger is cleared.")


def _cache_shape(value: Any) -> Any:
    """One clear message for a wrong `cache:` instead of one per member of its union."""
    if isinstance(value, bool | CacheSpec):
        return value
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k != "ttl")
        if unknown:
            raise ValueError(f"unknown cache setting '{unknown[0]}' (cache takes only ttl)")
        ttl = value.get("ttl")
        if ttl is not None and not (isinstance(ttl, str) and re.match(DURATION_PATTERN, ttl)):
            raise ValueError(f"cache ttl must be a duration such as 30s, 10m, 1h or 7d, "
                             f"not {ttl!r}")
        return value
    raise ValueError("`cache` must be true, false or {ttl: <duration>}, not "
                     f"{type(value).__name__} {value!r}")


CACHE_DESCRIPTION = ("Reuse the result of an identical earlier call (same rendered "
                     "request, model and parameters) instead of calling again: $0 in the "
                     "ledger, with the saving recorded. `true`, or `{ttl: 1h}`.")

Cache = Annotated[bool | CacheSpec, BeforeValidator(_cache_shape)]


class PromptFile(_Strict):
    """A prompt kept in its own file (a template like an inline one)."""

    file: str = Field(min_length=1, description="Path of the template, relative to the "
                                                "pipeline file: prompts/answer.md.j2")


class _StepBase(_Strict):
    id: str = Field(pattern=NAME_PATTERN, description="Unique step id.")
    output: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="Name the step's result is bound to; defaults to the step id.")
    when: str | bool | None = Field(
        default=None, description="Condition; the step is skipped when it is false.")
    needs: list[str] = Field(
        default_factory=list, description="Steps that must finish (or be skipped) first.")
    on_missing: Literal["error", "skip"] = Field(
        default="error",
        description="What happens when a value this step reads is missing because its "
                    "producer was skipped or failed: `skip` skips this step too. With "
                    "`error` (the default) the compiler demands a `??` fallback.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds per attempt.")
    retries: int = Field(default=0, ge=0, le=10, description="Retries after a failure.")
    on_error: Literal["fail", "continue"] = Field(
        default="fail",
        description="`fail` fails the run and cancels running steps; `continue` lets other "
                    "branches go on, and the step's output is missing (like a skip).")
    for_each: str | None = Field(
        default=None,
        description="Map: run the step once per item of this list reference (`${input.docs}`); "
                    "its result is the list of the items' results, in order. `when:`, "
                    "`retries:`, `timeout:` and `on_error:` then apply to each item.")
    as_: str = Field(default="item", alias="as", pattern=NAME_PATTERN,
                     description="With `for_each`: the name the current item is read by "
                                 "(`${item}`, `${item.field}`).")
    max_concurrency: int | None = Field(
        default=None, ge=1, le=1000,
        description="With `for_each`: most items running at once (default 10).")
    repeat: Repeat | None = Field(
        default=None,
        description="Run the step again until `until` holds (and its answer matches its "
                    "`response_format`), at most `max` times; `${self.previous}` and "
                    "`${self.error}` tell an attempt what the last one answered and what was "
                    "wrong with it.")

    @property
    def output_name(self) -> str:
        return self.output or self.id


class LLMStep(_StepBase):
    """Calls a model."""

    type: Literal["llm"]
    model: str = Field(min_length=1, description="An alias from flowc.yaml or provider/model.")
    prompt: str | PromptFile = Field(
        description="The user message: a template with ${...} references, or {file: ...}.")
    system: str | PromptFile | None = Field(
        default=None, description="The system message: a template, or {file: ...} (a "
                                  "snippet several pipelines share).")
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    response_format: ResponseFormat | None = None
    tools: list[str] | str | None = Field(
        default=None,
        description="MCP tools offered to the model: `server.tool`, or `server.*`.")
    max_tool_calls: int = Field(default=10, ge=1, le=100)
    cache: Cache = Field(default=False, description=CACHE_DESCRIPTION)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Up to 4 sequences where the model stops.")
    seed: int | None = Field(default=None, description="For providers that sample "
                                                        "deterministically with one.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        Field(default=None, description="How hard a reasoning model thinks (a thinking "
                                        "budget on Anthropic, `think` on Ollama)."))
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Other request parameters, passed to the provider as written "
                    "(e.g. frequency_penalty, logit_bias, user, service_tier).")
    fallback_models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=10,
        description="Models to try, in order, when the step's model fails (after the "
                    "gateway's own fallbacks for it).")

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and not 1 <= len(stop) <= 4:
            raise ValueError("`stop` takes 1 to 4 sequences")
        return stop

    @field_validator("params")
    @classmethod
    def _params_are_extra(cls, params: dict[str, Any]) -> dict[str, Any]:
        for key in params:
            if key in _LLM_FIELDS_OF_REQUEST:
                raise ValueError(f"`{key}` is a step field: set it on the step, not under "
                                 "`params`")
            if key in _SET_BY_FLOWC:
                raise ValueError(f"`{key}` is set by flowc from the step (it cannot go "
                                 "under `params`)")
        return params

    @property
    def tool_refs(self) -> list[str]:
        if self.tools is None:
            return []
        return [self.tools] if isinstance(self.tools, str) else list(self.tools)


# Request parameters a step sets with its own fields, and those flowc itself sends.
_LLM_FIELDS_OF_REQUEST = {"temperature", "max_tokens", "response_format", "tools", "top_p",
                          "stop", "seed", "reasoning_effort"}
_SET_BY_FLOWC = {"model", "messages", "stream", "stream_options", "n", "tool_choice",
                 "max_completion_tokens"}


class MCPToolStep(_StepBase):
    """Calls one tool of an MCP server."""

    type: Literal["mcp_tool"]
    server: str = Field(min_length=1)
    tool: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    cache: Cache = Field(default=False, description=CACHE_DESCRIPTION)


class TransformStep(_StepBase):
    """Computes a value from references, with no model call: an expression (or a mapping
    of names to expressions, for an object), or a template."""

    type: Literal["transform"]
    expr: str | dict[str, str] | None = Field(
        default=None,
        description="An expression over ${...} references with the pure functions "
                    "(join, split, len, get, merge, sum, to_json, ...), or a mapping of "
                    "field names to expressions: the result is that object.")
    template: str | None = Field(
        default=None, description="A template (${...} and sandboxed Jinja2): the result is "
                                  "its text, or the value itself when it is one ${...}.")

    @model_validator(mode="after")
    def _one_body(self) -> TransformStep:
        if (self.expr is None) == (self.template is None):
            raise ValueError("a transform step needs exactly one of `expr` and `template`")
        return self


class PipelineStep(_StepBase):
    """Runs another pipeline (a sub-pipeline) and takes its `output:` as the result."""

    type: Literal["pipeline"]
    pipeline: str = Field(
        min_length=1,
        description="A pipeline file relative to this one (`./summarize.yaml`), or the `name:` "
                    "of a pipeline file in this one's folder.")
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="The callee's inputs: values or templates with ${...} references.")


class ApprovalStep(_StepBase):
    """Waits for a person's decision: the run stops in the `waiting` state until the step
    is approved (`flowc runs approve`, `POST /v1/runs/{id}/steps/{step}/approve`) or
    rejected; only then do the steps that read it run."""

    type: Literal["approval"]
    message: str = Field(
        min_length=1, description="What to approve, shown to the approver: a template "
                                  "with ${...} references.")
    value: str | None = Field(
        default=None,
        description="The value put up for approval (a reference such as ${draft}, or a "
                    "template): the step's output once approved, unless the approver "
                    "sends an edited one. Without it and `schema`, the output is true.")
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema",
        description="JSON Schema of the value: the step's output type; an edited value "
                    "must match it. Without `value`, the approver must send one.")

    @field_validator("schema_")
    @classmethod
    def _valid_json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return ResponseFormat._valid_json_schema(schema)  # the same check


CaseBody = Annotated[str | list[str], Field(
    description="The step id the case runs, or a list of them: the last one's result is the "
                "case's (and the switch's) result.")]


class SwitchStep(_StepBase):
    """Runs one case of several by a value: the steps a case names run only when it is
    taken, and the switch's result is the result of the case that ran."""

    type: Literal["switch"]
    value: str = Field(min_length=1, description="The value to switch on: an expression, "
                                              "usually one reference (${classify.label}).")
    cases: dict[str | bool | int, CaseBody] = Field(
        min_length=1, description="Case value -> the step (or steps) it runs.")
    default: CaseBody | None = Field(
        default=None, description="What runs when no case matches. Without it, the cases "
                                  "must cover every value of an enum-typed `value` for the "
                                  "switch's result to be always there.")

    @model_validator(mode="after")
    def _no_condition(self) -> SwitchStep:
        if self.when is not None:
            raise ValueError("a switch takes no `when:`: its cases are its conditions (give "
                             "the value it switches on a case, or a `default`)")
        if self.for_each is not None:
            # Its cases are steps of the pipeline, run once: a switch per item is a switch
            # inside a block mapped over the items.
            raise ValueError("a switch takes no `for_each:`: its cases run once; to switch on "
                             "each item, put the switch and its cases' steps in a `type: "
                             "block` step with the `for_each:`")
        return self

    def case_bodies(self) -> list[tuple[str | int | None, list[str]]]:
        """Each case's value (None for the default) and its steps."""
        bodies = [*self.cases.items(), *([(None, self.default)] if self.default else [])]
        return [(label, [body] if isinstance(body, str) else list(body))
                for label, body in bodies]


def _raw_steps(value: Any) -> list[dict[str, Any]]:
    """A block's steps stay as written: the compiler checks each one as it checks a
    pipeline's, at its own place in the file (the JSON Schema still describes them)."""
    if not isinstance(value, list) or not value:
        raise ValueError("a block's `steps` is a list of one or more steps")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"step [{i}] of the block is a {type(item).__name__}, not a "
                             "mapping with `id` and `type`")
    return value


class BlockStep(_StepBase):
    """A block of steps written inline: an inline sub-pipeline whose inputs are the names
    its steps read (inputs, the `for_each` item, steps before the block). Its result is its
    `output:`; its steps are not visible outside it."""

    type: Literal["block"]
    steps: Annotated[list[dict[str, Any]], PlainValidator(
        _raw_steps, json_schema_input_type=list[Step])] = Field(
        description="The block's steps, as a pipeline's: they may read inputs, the item "
                    "(`as:`), steps of the enclosing pipeline and earlier steps of the "
                    "block, and run concurrently as their reads allow.")
    output: str | dict[str, str] = Field(  # type: ignore[assignment]
        description="The block's result: one reference, or a mapping of names to "
                    "references (`{summary: ${summary}}`), typed from what they read. The "
                    "result is bound to the block's id (`${per_doc.summary}`).")

    @property
    def output_name(self) -> str:
        return self.id


Step = Annotated[LLMStep | MCPToolStep | TransformStep | SwitchStep | PipelineStep
                 | ApprovalStep | BlockStep, Field(discriminator="type")]
STEP_TYPES: dict[str, type[_StepBase]] = {
    "llm": LLMStep, "mcp_tool": MCPToolStep, "transform": TransformStep, "switch": SwitchStep,
    "pipeline": PipelineStep, "approval": ApprovalStep, "block": BlockStep}


class Pipeline(_Strict):
    """A pipeline file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str | None = None
    inputs: dict[str, InputSpec] | None = None
    steps: list[Step] = Field(min_length=1)
    output: str | dict[str, str] | None = Field(
        default=None, description="One reference, or a mapping of names to references.")
    max_cost_usd: float | None = Field(
        default=None, gt=0,
        description="Most a run may spend, in USD: `flowc check` reports a worst case above "
                    "it, and a run stops before a model call that could go past it.")

    @field_validator("output", mode="before")
    @classmethod
    def _output_shape(cls, value: Any) -> Any:
        # One clear message instead of one per member of the union.
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(item, str):
                    raise ValueError(f"output '{key}' must be a reference such as "
                                     f"${{{key}}}, not a {type(item).__name__}")
            return value
        raise ValueError("`output` must be one reference (a string) or a mapping of names "
                         f"to references, not a {type(value).__name__}")


def step_fields(step_type: str | None) -> list[str]:
    """Field names a step of this type accepts (all step fields when the type is unknown)."""
    if step_type in STEP_TYPES:
        return list(STEP_TYPES[step_type].model_fields)
    return sorted({f for m in STEP_TYPES.values() for f in m.model_fields})
