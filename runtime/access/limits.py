"""Requests and tokens per minute, over a sliding 60-second window.

A sliding log (the time of each request, and of each call's tokens) rather than a token
bucket: a key limited to 100 requests a minute gets exactly 100 in any 60 seconds, however
they bunch, which is what the limit says and what a user checks. The log holds at most
``rpm`` times per key.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 60.0


class RateLimited(Exception):
    """Over a per-minute limit; ``retry_after`` seconds until the window has room."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class Window:
    """One scope's use of its limits (``rpm``/``tpm`` None: no limit on that)."""

    label: str
    rpm: int | None
    tpm: int | None
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def _trim(self, now: float) -> None:
        edge = now - WINDOW
        r = self.requests
        while r and r[0] <= edge:
            r.popleft()
        t = self.tokens
        while t and t[0][0] <= edge:
            self.token_sum -= t.popleft()[1]

    def check(self, now: float) -> None:
        self._trim(now)
        if self.rpm is not None and len(self.requests) >= self.rpm:
            wait = (self.requests[0] + WINDOW - now) if self.requests else WINDOW
            raise RateLimited(f"rate limit reached for {self.label}: {self.rpm} requests "
                              f"per minute; try again in {_duration(wait)}", wait)
        if self.tpm is not None and self.token_sum >= self.tpm:
            wait = self.tokens[0][0] + WINDOW - now if self.tokens else WINDOW
            raise RateLimited(f"rate limit reached for {self.label}: {self.tpm} tokens per "
                              f"minute used; try again in {_duration(wait)}", wait)

    def take(self, now: float) -> None:
        if self.rpm is not None:
            self.requests.append(now)

    def add_tokens(self, now: float, n: int) -> None:
        if self.tpm is not None and n > 0:
            self.tokens.append((now, n))
            self.token_sum += n

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's `x-ratelimit-*` headers for this window."""
        self._trim(now)
        out: list[tuple[bytes, bytes]] = []
        if self.rpm is not None:
            r = self.requests
            out += [(b"x-ratelimit-limit-requests", b"%d" % self.rpm),
                    (b"x-ratelimit-remaining-requests", b"%d" % max(self.rpm - len(r), 0)),
                    (b"x-ratelimit-reset-requests",
                     _reset(r[0] + WINDOW - now if r else 0.0))]
        if self.tpm is not None:
            t = self.tokens
            out += [(b"x-ratelimit-limit-tokens", b"%d" % self.tpm),
                    (b"x-ratelimit-remaining-tokens", b"%d" % max(self.tpm - self.token_sum, 0)),
                    (b"x-ratelimit-reset-tokens", _reset(t[0][0] + WINDOW - now if t else 0.0))]
        return out


def _reset(seconds: float) -> bytes:
    """Seconds as OpenAI writes them in `x-ratelimit-reset-*`: `1s`, `6m0s`, `120ms` (to the
    millisecond; integer formatting, as this runs on every response)."""
    ms = round(seconds * 1000) if seconds > 0 else 0
    if ms < 1000:
        return b"%dms" % ms
    minutes, ms = divmod(ms, 60000)
    whole, frac = divmod(ms, 1000)
    text = (b"%d.%03d" % (whole, frac)).rstrip(b"0") if frac else b"%d" % whole
    return b"%dm%bs" % (minutes, text) if minutes else text + b"s"


def _duration(seconds: float) -> str:
    return _reset(seconds).decode()
