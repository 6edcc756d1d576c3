"""Recent responses kept by flowc, so `previous_response_id` works on every provider.

OpenAI keeps the responses it answers itself (unless `store: false`); flowc keeps the rest:
each translated response, and each verbatim one sent with `store: false`, as the whole
conversation up to it (its input items, the previous response's included, then its output
items).

Where they are kept is chosen when the server starts (runtime/server.py), behind one
interface (`Conversations`: `remember` and `recall`):

- one process (`ResponseStore`, here): its memory, bounded by count and by size, the least
  recently used dropped first; a restart forgets them.
- `flowc serve --workers N`: the same bounded store, in the supervisor (runtime/workers/
  hub.py); each worker's `remember` is acknowledged before its response is answered, so a
  follow-up sent to any worker finds it (runtime/workers/link.py's `SupervisedResponses`).
- instances sharing one Postgres: a table there, bounded by age (runtime/pg/responses.py);
  it outlives a restart.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

import orjson

from runtime.providers import FlowcError

MAX_RESPONSES = 1000
MAX_BYTES = 64 * 1024 * 1024

Items = list[dict[str, Any]]


class ResponsesUnavailable(FlowcError):
    """The shared store of responses cannot be reached (a 503 the client may retry)."""

    status = 503
    code = "response_store_unavailable"


class Conversations(Protocol):
    """Where flowc keeps the responses OpenAI does not."""

    async def remember(self, response_id: str, items: Items) -> None:
        """Keep ``items`` (the conversation: input then output) as ``response_id``'s; done
        when a follow-up sent anywhere would find it."""

    async def recall(self, response_id: str) -> Items | None:
        """The conversation up to and including ``response_id``, or None when it is not
        (or no longer) kept. Raises `ResponsesUnavailable` when that cannot be known."""

    def close(self) -> None:
        """When the server stops."""


def encode(items: Items) -> bytes:
    """A conversation as it is kept outside this process (and sized everywhere)."""
    return orjson.dumps(items, default=str)


class ResponseStore:
    """An LRU bounded by count and by size. Its values are any object with a size: a
    process keeps the items themselves, the supervisor of workers their JSON bytes."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, items: Items) -> None:
        """Keep the conversation ``items`` (input then output) as ``response_id``'s. One
        larger than the whole store is not kept."""
        self.keep(response_id, items, len(encode(items)))

    def keep(self, response_id: str, value: Any, size: int) -> None:
        """``value`` (``size`` bytes) as ``response_id``'s, dropping the least recently
        used past either bound."""
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(response_id, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[response_id] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> Any:
        """What is kept as ``response_id``, or None when it is not (or no longer) kept."""
        with self._lock:
            found = self._items.get(response_id)
            if found is None:
                return None
            self._items.move_to_end(response_id)
            return found[0]

    async def remember(self, response_id: str, items: Items) -> None:
        self.put(response_id, items)

    async def recall(self, response_id: str) -> Items | None:
        return self.get(response_id)  # type: ignore[no-any-return]

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._items)
