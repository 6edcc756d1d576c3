"""What a model API's handler is given: one request, its body already read and bounded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.access.gate import OPEN, Principal
from runtime.gateway.calls import CallContext


@dataclass(slots=True)
class Incoming:
    """A request to a model API, as its handler gets it: the body already read and bounded,
    the raw headers (a same-wire call forwards the client's own, e.g. `anthropic-beta`),
    the query string, `x-flowc-tags`, and when it arrived (for `x-flowc-overhead-ms`)."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    query: bytes
    tags: str | None
    t0: float
    who: Principal = OPEN  # the caller, from its key (runtime/access/gate.py)
    # What is left to do once the answer is written (see `CallContext.after`).
    after: list[Callable[[], None]] = field(default_factory=list)

    def context(self) -> CallContext:
        """The call's context: who makes it, the body's size as the bound on its prompt's
        tokens (for reserving a budget), and where its bookkeeping waits for the answer."""
        return CallContext(who=self.who, prompt_bound=len(self.body), after=self.after)

    def header(self, name: bytes) -> str | None:
        """One header's value (``name`` in lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None
