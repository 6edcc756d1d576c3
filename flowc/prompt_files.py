"""Prompt files: `prompt: {file: prompts/answer.md.j2}` and `system: {file: ...}`, read
relative to the pipeline file when it is checked and compiled into the same templates as an
inline prompt (the runtime never reads them). A finding in one names that file and line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowc.context import Context
from flowc.source import SourceFile

MAX_PROMPT_FILE = 1_000_000  # bytes


def read_prompt_file(ctx: Context, path: tuple[Any, ...], name: str) -> str | None:
    """The text of the prompt file named at ``path`` (None after reporting why not)."""
    at = ctx.source.span_of((*path, "file"))
    pipeline = Path(ctx.source.path)
    where = (pipeline.parent if pipeline.name and pipeline.exists() else Path.cwd()) / name
    try:
        if where.stat().st_size > MAX_PROMPT_FILE:
            raise ValueError(f"it is larger than {MAX_PROMPT_FILE:,} bytes")
        text = where.read_bytes().decode("utf-8")
    except OSError as exc:
        ctx.out.add("prompt-file", f"cannot read prompt file '{name}': "
                    f"{exc.strerror or exc}", at.start, at.end,
                    help="a prompt file's path is relative to the pipeline file's folder")
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
        ctx.out.add("prompt-file", f"cannot use prompt file '{name}': {reason}", at.start,
                    at.end)
        return None
    text = text.removeprefix("\ufeff")
    shown = os.path.normpath(where)  # prompts/../shared/tone.md as shared/tone.md
    ctx.file_bases[path] = ctx.source.attach(SourceFile(shown, text))
    return text
