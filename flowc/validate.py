"""Structural validation: pydantic errors turned into positioned findings with suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from flowc.diagnostics import Collector
from flowc.source import Path


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """The closest option to ``word``, if one is close enough to be a likely typo."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggest(hint: str | None) -> str:
    """The tail of a message for a likely typo: "; did you mean 'x'?" (or nothing)."""
    return f"; did you mean '{hint}'?" if hint else ""


def field_names(model: type[BaseModel]) -> list[str]:
    """The names a user writes for a model's fields (aliases where they exist)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(loc: Path) -> str:
    parts = [str(p) if isinstance(p, str) else f"[{p}]" for p in loc]
    return ".".join(parts).replace(".[", "[")


def _strip_tag(loc: Path, tags: set[str]) -> Path:
    return loc[1:] if loc and loc[0] in tags else loc


def report_validation_error(
    out: Collector,
    exc: ValidationError,
    base: Path,
    fields_at: Any,
    what: str = "field",
    tags: Iterable[str] = (),
) -> None:
    """Report every error of ``exc``. ``base`` is the path of the validated value in the file;
    ``fields_at(loc)`` gives the allowed field names of the mapping at ``loc`` (relative);
    ``tags`` are discriminator values pydantic inserts into locations (step types)."""
    tags = set(tags)
    src = out.source
    errors = exc.errors(include_url=False)
    # A misspelt field also makes the intended one "missing": report the typo only.
    suggested: set[tuple] = set()
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), fields_at(_strip_tag(loc, tags)[:-1]))
            if hint:
                suggested.add((*loc[:-1], hint))
    for err in errors:
        if err["type"] == "missing" and tuple(err["loc"]) in suggested:
            continue
        loc: Path = tuple(err["loc"])
        kind = err["type"]
        if kind.startswith("union_tag"):
            ctx = err.get("ctx") or {}
            if kind == "union_tag_invalid":
                expected = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
                tag = str(ctx.get("tag", ""))
                span = src.span_of((*base, *loc, "type"))
                out.add("unknown-step-type",
                        f"unknown step type '{tag}'; expected one of {', '.join(expected)}",
                        span.start, span.end,
                        help=(f"did you mean '{m}'?" if (m := did_you_mean(tag, expected))
                              else None))
            else:
                span = src.span_of((*base, *loc))
                out.add("missing-field", "step has no 'type'; expected one of "
                        + ", ".join(sorted(tags)), span.start, span.start + 1)
            continue
        loc = _strip_tag(loc, tags)
        path = (*base, *loc)
        name = str(loc[-1]) if loc else ""
        if kind == "extra_forbidden":
            span = src.span_of(path, key=True)
            allowed = fields_at(loc[:-1])
            hint = did_you_mean(name, allowed)
            out.add("unknown-field", f"unknown {what} '{name}'"
                    + suggest(hint),
                    span.start, span.end,
                    help=f"allowed fields: {', '.join(sorted(allowed))}" if not hint else None)
        elif kind == "missing":
            parent = src.span_of(path[:-1])
            out.add("missing-field", f"missing required {what} '{name}'",
                    parent.start, parent.start + 1)
        else:
            span = src.span_of(path)
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            where = f"'{_describe(loc)}'" if loc else "value"
            out.add("invalid-value", f"invalid {where}: {msg}", span.start, span.end)
