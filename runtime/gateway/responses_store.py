"""Recent responses kept in memory, so `previous_response_id` works on every provider.

OpenAI keeps the responses it answers itself (unless `store: false`); flowc keeps the rest:
each translated response, and each verbatim one sent with `store: false`, as the whole
conversation up to it (its input items, the previous response's included, then its output
items). Bounded by count and by size, the least recently used dropped first; a process's
memory, not a database: a restart forgets them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import orjson

MAX_RESPONSES = 1000
MAX_BYTES = 64 * 1024 * 1024


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, items: list[dict[str, Any]]) -> None:
        """Keep the conversation ``items`` (input then output) as ``response_id``'s. One
        larger than the whole store is not kept."""
        size = len(orjson.dumps(items, default=str))
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(response_id, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[response_id] = (items, size)
            self._bytes += size
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including ``response_id``, or None when it is not
        (or no longer) kept."""
        with self._lock:
            found = self._items.get(response_id)
            if found is None:
                return None
            self._items.move_to_end(response_id)
            return found[0]

    def __len__(self) -> int:
        return len(self._items)


STORE = ResponseStore()
