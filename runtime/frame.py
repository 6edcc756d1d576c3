"""What one execution of a step sees besides inputs and outputs: the `for_each` item and
`self` of a `repeat:` (names), and the label its calls carry in the ledger's `step_id`
(`translate[3]`, `map[2]/summarize`). Context variables, so each item's task has its own."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

NAMES: ContextVar[dict[str, Any] | None] = ContextVar("flowc_frame_names", default=None)
LABEL: ContextVar[str | None] = ContextVar("flowc_frame_label", default=None)


def with_names(**names: Any) -> None:
    """Bind ``names`` for the rest of the current task (on top of those already bound)."""
    NAMES.set({**(NAMES.get() or {}), **names})


def label(step_id: str) -> str:
    """The ledger's `step_id` of a call the step makes now."""
    return LABEL.get() or step_id
