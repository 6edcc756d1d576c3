"""Prompt templates: `${...}` references, plus sandboxed Jinja2 where a prompt needs loops or
filters.

A reference is replaced by a Jinja variable before Jinja sees the text, so a value is
inserted as data and never parsed as template code (no template injection through a model's
output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from flowc.expr import TemplatePart, resolve_ref, scan_template

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

_JINJA_SYNTAX = re.compile(r"\{\{|\{%|\{#")


@cache
def jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja2 environment (imported on first use: most prompts need none)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[TemplatePart, ...]
    jinja_source: str | None  # set when the text uses Jinja syntax

    @property
    def uses_jinja(self) -> bool:
        return self.jinja_source is not None


def _placeholder(i: int) -> str:
    return f"__flowc_ref_{i}"


def _literal(text: str) -> str:
    return text.replace("$${", "${")  # `$${` writes a literal `${`


def parse_template(text: str) -> Template:
    """Scan ``text``; Jinja syntax, if any, is parsed later by :func:`jinja_names`."""
    parts = tuple(scan_template(text))
    if not _JINJA_SYNTAX.search(text):
        return Template(text, parts, None)
    pieces, pos = [], 0
    for i, part in enumerate(parts):
        pieces.append(_literal(text[pos : part.start]))
        pieces.append("{{ " + _placeholder(i) + " }}")
        pos = part.end
    pieces.append(_literal(text[pos:]))
    return Template(text, parts, "".join(pieces))


def jinja_names(template: Template) -> set[str]:
    """Free variable names a Jinja template reads (ours excluded). Raises
    ``jinja2.TemplateSyntaxError``."""
    if template.jinja_source is None:
        return set()
    from jinja2 import meta

    ast = jinja_env().parse(template.jinja_source)
    return {n for n in meta.find_undeclared_variables(ast) if not n.startswith("__flowc_ref_")}


def to_text(value: Any) -> str:
    """How a value reads inside a prompt: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def render(template: Template, scope: Callable[[str], Any],
           names: Mapping[str, Any] | None = None) -> str:
    """Render with ``scope`` resolving reference roots; ``names`` are the variables Jinja
    code may read (outputs and ``input``). Raises :class:`flowc.expr.Missing`."""
    values = [to_text(resolve_ref(p.ref, scope)) for p in template.parts if p.ref is not None]
    if template.jinja_source is None:
        out, pos = [], 0
        for part, value in zip(template.parts, values, strict=True):
            out.append(_literal(template.text[pos : part.start]))
            out.append(value)
            pos = part.end
        out.append(_literal(template.text[pos:]))
        return "".join(out)
    variables = dict(names or {})
    variables.update({_placeholder(i): v for i, v in enumerate(values)})
    return jinja_env().from_string(template.jinja_source).render(variables)
