"""A pipeline's tool schemas, from what the compiler typed: `inputSchema` from its `inputs:`,
`outputSchema` from its `output:` (each entry's type: a lone reference has the type of what
it reads, a template with text is a string).

An MCP output schema is an object at its root (through 2025-11-25): an `output:` that is one
value is wrapped as `{"result": value}`, the convention the MCP SDKs use for plain values.
"""

from __future__ import annotations

from typing import Any

from flowc.expr import Literal, Path, single_reference
from flowc.ir import CompiledPipeline
from flowc.template import Template
from flowc.types import ANY, STRING, WRAPPED_RESULT, Type

_JSON_KIND = {"string": "string", "integer": "integer", "number": "number",
              "boolean": "boolean", "object": "object", "array": "array", "null": "null"}


def input_schema(compiled: CompiledPipeline) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for name, spec in compiled.inputs.items():
        prop = spec.json_schema()  # its elements, fields and values too (DSL v2 inputs)
        if spec.description:
            prop["description"] = spec.description
        if spec.default is not None:
            prop["default"] = spec.default
        if spec.max_length is not None and spec.type == "string":
            prop["maxLength"] = spec.max_length
        props[name] = prop
        if spec.is_required:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": props,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def output_schema(compiled: CompiledPipeline) -> dict[str, Any] | None:
    """The run's `output` as a JSON Schema; None when the pipeline declares no `output:`
    (its output is then whichever results no step read: not known before it runs)."""
    spec = compiled.output
    if spec is None:
        return None
    if isinstance(spec, dict):
        props = {k: schema_of(template_type(compiled, t)) for k, t in spec.items()}
        return {"type": "object", "properties": props, "required": list(props)}
    return {"type": "object", "properties": {
        WRAPPED_RESULT: schema_of(template_type(compiled, spec))}, "required": [WRAPPED_RESULT]}


def template_type(compiled: CompiledPipeline, template: Template) -> Type:
    ref = single_reference(template.text)
    if ref is None:
        return STRING
    kinds = [_alt_type(compiled, alt) for alt in ref.alts]
    first = kinds[0]
    # `a ?? b`: one type when every alternative has it, else any
    return first if all(k == first for k in kinds) else ANY


def _alt_type(compiled: CompiledPipeline, alt: Path | Literal) -> Type:
    if isinstance(alt, Literal):
        value = alt.value
        kind = ("boolean" if isinstance(alt.value, bool) else "integer" if isinstance(value, int)
                else "number" if isinstance(value, float) else "string" if isinstance(value, str)
                else "any")
        return Type(kind)
    if alt.root == "input":
        spec = compiled.inputs.get(str(alt.segments[0])) if alt.segments else None
        t, rest = (Type(spec.type) if spec else ANY), alt.segments[1:]
    else:
        t, rest = _output_type(compiled, alt.root), alt.segments
    for seg in rest:
        if t.kind == "any":
            return ANY
        if isinstance(seg, int):
            t = (t.items or ANY) if t.kind == "array" else ANY
        else:
            t = (t.field(seg) or ANY) if t.kind == "object" else ANY
    return t


def _output_type(compiled: CompiledPipeline, name: str) -> Type:
    for sid in compiled.order:
        node = compiled.node(sid)
        if node.step.output_name == name:
            return node.output_type
    return ANY


def schema_of(t: Type, nullable: bool = False) -> dict[str, Any]:
    """A JSON Schema for a static type (``any``: no constraint)."""
    kind = _JSON_KIND.get(t.kind)
    if kind is None:
        return {}
    out: dict[str, Any] = {"type": [kind, "null"] if nullable else kind}
    if t.values is not None:
        out["enum"] = [*t.values, None] if nullable else list(t.values)
    if t.kind == "array" and t.items is not None and t.items.kind != "any":
        out["items"] = schema_of(t.items)
    if t.kind == "object" and t.fields is not None:
        # a field left out of `required` (or nullable) may be absent or null in the value
        out["properties"] = {k: schema_of(v, k in t.optional) for k, v in t.fields}
        required = [k for k, _ in t.fields if k not in t.optional]
        if required:
            out["required"] = required
    return out
