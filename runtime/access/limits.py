"""Requests and tokens per minute, over a sliding 60-second window.

A sliding log (the time of each request, and of each call's tokens) rather than a token
bucket: a key limited to 100 requests a minute gets exactly 100 in any 60 seconds, however
they bunch, which is what the limit says and what a user checks. The log holds at most
``rpm`` times per key.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import repeat

from runtime.http_server import head_fields

WINDOW = 60.0
_NEVER = float("inf")


class RateLimited(Exception):
    """Over a per-minute limit; ``retry_after`` seconds until the window has room."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class Window:
    """One scope's use of its limits (``rpm``/``tpm`` None: no limit on that).

    The logs are flat arrays read from a start index, not deques of Python objects: the
    garbage collector walks every object a deque holds on each full collection, and a key
    with a high limit holds a minute of requests (100k+ at a few thousand a second: ~10 ms
    a collection). Both logs are in time order (the clock is monotonic), so what has left
    the window is found by bisection, and only once ``due`` says something may have."""

    label: str
    rpm: int | None
    tpm: int | None
    times: array[float] = field(default_factory=lambda: array("d"))  # each request's
    head: int = 0  # the oldest request still in the window
    token_times: array[float] = field(default_factory=lambda: array("d"))
    token_counts: array[int] = field(default_factory=lambda: array("q"))
    token_head: int = 0
    token_sum: int = 0
    # The limits as configured, for messages and headers, when ``rpm``/``tpm`` are this
    # instance's part of limits shared by several (runtime/pg/access.py).
    shown_rpm: int | None = None
    shown_tpm: int | None = None
    # No entry of either log is older than this (inf: both empty): until ``due`` leaves
    # the window nothing does, so a request in the meantime trims nothing (one comparison).
    due: float = _NEVER
    # The `x-ratelimit-*` head lines of the limits, and which limits they show (made by
    # `limit`, not on every response).
    _lines: tuple[int, bytes] = (0, b"")

    def __post_init__(self) -> None:
        self.limit(self.rpm, self.tpm, self.shown_rpm, self.shown_tpm)

    def limit(self, rpm: int | None, tpm: int | None, shown_rpm: int | None = None,
              shown_tpm: int | None = None) -> None:
        """Set the limits (``shown_*``: as configured, when these are a part of them)."""
        self.rpm, self.tpm, self.shown_rpm, self.shown_tpm = rpm, tpm, shown_rpm, shown_tpm
        self._lines = _limit_lines(rpm, tpm)

    def _trim(self, now: float) -> None:
        edge = now - WINDOW
        t = self.times
        h = _past(t, edge, self.head)
        if h > 1024 and 2 * h > len(t):  # drop what has left the window, amortised
            del t[:h]
            h = 0
        self.head = h
        tt, counts, th = self.token_times, self.token_counts, self.token_head
        gone = _past(tt, edge, th)
        if gone != th:
            self.token_sum -= sum(counts[th:gone])
            if gone > 1024 and 2 * gone > len(tt):
                del tt[:gone]
                del counts[:gone]
                gone = 0
            self.token_head = th = gone
        oldest = t[h] if h < len(t) else _NEVER
        oldest_tokens = tt[th] if th < len(tt) else _NEVER
        self.due = oldest if oldest < oldest_tokens else oldest_tokens

    def _oldest(self) -> float | None:
        return self.times[self.head] if self.head < len(self.times) else None

    def _oldest_tokens(self) -> float | None:
        t = self.token_times
        return t[self.token_head] if self.token_head < len(t) else None

    def check(self, now: float) -> None:
        if self.due <= now - WINDOW:
            self._trim(now)
        rpm = self.rpm
        if rpm is not None and len(self.times) - self.head >= rpm:
            first = self._oldest()
            wait = first + WINDOW - now if first is not None else WINDOW
            raise RateLimited(f"rate limit reached for {self.label}: "
                              f"{self.shown_rpm or rpm} requests per minute; try again "
                              f"in {_duration(wait)}", wait)
        if self.tpm is not None and self.token_sum >= self.tpm:
            first = self._oldest_tokens()
            wait = first + WINDOW - now if first is not None else WINDOW
            raise RateLimited(f"rate limit reached for {self.label}: "
                              f"{self.shown_tpm or self.tpm} tokens per minute used; try "
                              f"again in {_duration(wait)}", wait)

    def take(self, now: float) -> None:
        if self.rpm is not None:
            self.times.append(now)
            if self.due > now:  # the log was empty
                self.due = now

    def lease(self, now: float, want: int, among: int) -> int:
        """Take up to ``want`` request slots at once for one of ``among`` processes that
        admit calls against them (after `check`): at least one, at most an eighth of what
        is left shared among them, so near the limit every call asks again."""
        rpm = self.rpm
        if rpm is None:
            return want
        room = rpm - len(self.times) + self.head
        k = max(1, min(want, room // (8 * among)))
        self.times.extend(repeat(now, k))
        if self.due > now:
            self.due = now
        return k

    def give_back(self, at: float, n: int) -> None:
        """``n`` slots leased at ``at`` went unused: they stop counting (if still inside
        the window). The log is in time order, so they are found by bisection."""
        if self.rpm is None or n <= 0:
            return
        t = self.times
        i = bisect_left(t, at, self.head)
        j = i
        while j < len(t) and j - i < n and t[j] == at:
            j += 1
        del t[i:j]

    def state(self, now: float) -> tuple[int | None, float | None, int, float | None]:
        """What a process leasing from this window shows in its headers: requests left,
        when the oldest request leaves, tokens counted, when the oldest tokens leave."""
        if self.due <= now - WINDOW:
            self._trim(now)
        left = self.rpm - len(self.times) + self.head if self.rpm is not None else None
        return left, self._oldest(), self.token_sum, self._oldest_tokens()

    def add_tokens(self, now: float, n: int) -> None:
        if self.tpm is not None and n > 0:
            self.token_times.append(now)
            self.token_counts.append(n)
            self.token_sum += n
            if self.due > now:
                self.due = now

    def head_lines(self, now: float) -> bytes:
        """OpenAI's `x-ratelimit-*` headers for this window, as lines of a response head
        (they go on every response of a limited key: trimmed only when something has left
        the window, and formatted in one go from lines made once for the limits)."""
        if self.due <= now - WINDOW:
            self._trim(now)
        t, h, tt, th = self.times, self.head, self.token_times, self.token_head
        # (What is left of a limit that is not set is not shown.)
        return self.shown_lines(now, (self.rpm or 0) - len(t) + h,
                                t[h] if h < len(t) else None,
                                (self.tpm or 0) - self.token_sum,
                                tt[th] if th < len(tt) else None)

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """`head_lines` as (name, value) pairs, for a response not written in one go."""
        return head_fields(self.head_lines(now))

    def shown_lines(self, now: float, left: int, oldest: float | None, tokens_left: int,
                    oldest_tokens: float | None) -> bytes:
        """The head lines for these limits: ``left`` requests and ``tokens_left`` tokens,
        and when the oldest of each leaves the window (None: nothing in it)."""
        shown, lines = self._lines
        if shown == _BOTH:
            return lines % (left if left > 0 else 0, _until(oldest, now),
                            tokens_left if tokens_left > 0 else 0, _until(oldest_tokens, now))
        if shown == _REQUESTS:
            return lines % (left if left > 0 else 0, _until(oldest, now))
        if shown == _TOKENS:
            return lines % (tokens_left if tokens_left > 0 else 0, _until(oldest_tokens, now))
        return b""


_REQUESTS, _TOKENS, _BOTH = 1, 2, 3


def _limit_lines(rpm: int | None, tpm: int | None) -> tuple[int, bytes]:
    """Which limits are shown (None: not limited on that), and their `x-ratelimit-*` head
    lines, to be formatted with what is left of each and when it resets."""
    lines, shown = b"", 0
    if rpm is not None:
        lines += (b"x-ratelimit-limit-requests: %d\r\n" % rpm
                  + b"x-ratelimit-remaining-requests: %d\r\nx-ratelimit-reset-requests: %b\r\n")
        shown |= _REQUESTS
    if tpm is not None:
        lines += (b"x-ratelimit-limit-tokens: %d\r\n" % tpm
                  + b"x-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %b\r\n")
        shown |= _TOKENS
    return shown, lines


def _past(log: array[float], edge: float, lo: int) -> int:
    """The first index from ``lo`` of a log in time order whose time is after ``edge``.
    A trim on a busy window drops an entry or two: the next few are looked at before the
    whole log (each look at an array makes a float)."""
    n = len(log)
    near = lo + 4
    if near >= n:
        return bisect_right(log, edge, lo)
    i = bisect_right(log, edge, lo, near)
    return i if i < near else bisect_right(log, edge, near)


def _reset(seconds: float) -> bytes:
    """Seconds as OpenAI writes them in `x-ratelimit-reset-*`: `1s`, `6m0s`, `120ms` (to the
    millisecond)."""
    ms = int(seconds * 1000 + 0.5) if seconds > 0 else 0
    if ms < 1000:
        return _MILLISECONDS[ms]
    minutes, ms = divmod(ms, _MINUTE_MS)
    text = _SECONDS[ms // 1000] + _FRACTIONS[ms % 1000]
    return b"%dm%b" % (minutes, text) if minutes else text


def _until(oldest: float | None, now: float) -> bytes:
    """The reset of a log whose oldest entry is at ``oldest`` (None: empty): `_reset`, with
    the case of every reset of a window with something in it for a second or more first
    (two go on every response)."""
    if oldest is None:
        return b"0ms"
    seconds = oldest + WINDOW - now
    ms = int(seconds * 1000 + 0.5)
    if 1000 <= ms < _MINUTE_MS:
        return _SECONDS[ms // 1000] + _FRACTIONS[ms % 1000]
    return _reset(seconds)


_MINUTE_MS = int(WINDOW * 1000)
_MILLISECONDS = [b"%dms" % ms for ms in range(1000)]
# Then a reset is its whole seconds and its milliseconds as the fraction OpenAI writes:
# `s` (none), `.5s`, `.25s`, `.125s`.
_SECONDS = [b"%d" % whole for whole in range(60)]
_FRACTIONS = [b"s"] + [(b".%03d" % frac).rstrip(b"0") + b"s" for frac in range(1, 1000)]


def _duration(seconds: float) -> str:
    return _reset(seconds).decode()
