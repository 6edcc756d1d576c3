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
    # The `x-ratelimit-limit-*` headers, formatted once for the limits they were made for.
    _limits: tuple[int | None, int | None, tuple[bytes, bytes] | None,
                   tuple[bytes, bytes] | None] | None = None

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

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's `x-ratelimit-*` headers for this window. They go on every response of a
        limited key: trimmed only when something has left the window, the fixed parts
        made once."""
        if self.due <= now - WINDOW:
            self._trim(now)
        t, h, tt, th = self.times, self.head, self.token_times, self.token_head
        # (What is left of a limit that is not set is not shown.)
        return self.shown_headers(now, (self.rpm or 0) - len(t) + h,
                                  t[h] if h < len(t) else None,
                                  (self.tpm or 0) - self.token_sum,
                                  tt[th] if th < len(tt) else None)

    def shown_headers(self, now: float, left: int, oldest: float | None, tokens_left: int,
                      oldest_tokens: float | None) -> list[tuple[bytes, bytes]]:
        """The headers for these limits: ``left`` requests and ``tokens_left`` tokens, and
        when the oldest of each leaves the window (None: nothing in it)."""
        made = self._limits
        if made is None or made[0] != self.rpm or made[1] != self.tpm:
            made = self._limits = _limit_headers(self.rpm, self.tpm)
        out: list[tuple[bytes, bytes]] = []
        if made[2] is not None:
            out += (made[2],
                    (b"x-ratelimit-remaining-requests", b"%d" % left if left > 0 else b"0"),
                    (b"x-ratelimit-reset-requests",
                     _reset(oldest + WINDOW - now) if oldest is not None else b"0ms"))
        if made[3] is not None:
            out += (made[3],
                    (b"x-ratelimit-remaining-tokens",
                     b"%d" % tokens_left if tokens_left > 0 else b"0"),
                    (b"x-ratelimit-reset-tokens", _reset(oldest_tokens + WINDOW - now)
                     if oldest_tokens is not None else b"0ms"))
        return out


def _limit_headers(rpm: int | None, tpm: int | None
                   ) -> tuple[int | None, int | None, tuple[bytes, bytes] | None,
                              tuple[bytes, bytes] | None]:
    """The `x-ratelimit-limit-*` headers of these limits (None: not limited on that)."""
    return (rpm, tpm,
            (b"x-ratelimit-limit-requests", b"%d" % rpm) if rpm is not None else None,
            (b"x-ratelimit-limit-tokens", b"%d" % tpm) if tpm is not None else None)


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
    millisecond). Two go on every response of a limited key, and within a window they are
    at most a minute: those are formatted once each and kept."""
    ms = int(seconds * 1000 + 0.5) if seconds > 0 else 0
    if ms >= _MINUTE_MS:
        return _format_ms(ms)
    text = _RESETS[ms]
    if text is None:
        text = _RESETS[ms] = _format_ms(ms)
    return text


def _format_ms(ms: int) -> bytes:
    if ms < 1000:
        return b"%dms" % ms
    minutes, ms = divmod(ms, 60000)
    text = _SECONDS[ms // 1000] + _FRACTIONS[ms % 1000]
    return b"%dm%b" % (minutes, text) if minutes else text


_MINUTE_MS = int(WINDOW * 1000)
_RESETS: list[bytes | None] = [None] * _MINUTE_MS
# Under a minute, a reset is its whole seconds and then its milliseconds as the fraction
# OpenAI writes: `s` (none), `.5s`, `.25s`, `.125s`.
_SECONDS = [b"%d" % whole for whole in range(60)]
_FRACTIONS = [b"s"] + [(b".%03d" % frac).rstrip(b"0") + b"s" for frac in range(1, 1000)]


def _duration(seconds: float) -> str:
    return _reset(seconds).decode()
