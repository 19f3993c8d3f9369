"""Fair-use limits: requests per minute, tokens per minute and requests at once.

A request is checked against every subject it belongs to (its key, its user) before any
money is held; all must admit it, or none is charged a slot. Counts live in one-second
buckets over a sliding minute. This is the in-process limiter (the default); the Redis one
for many instances implements the same protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from apibox.config import LimitSet
from apibox.errors import RateLimited

WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit applies to, e.g. ``key:12`` with that key's limits."""

    name: str
    limits: LimitSet


@dataclass(slots=True)
class Admission:
    """A request let in: what it counted against, to correct and release at the end."""

    subjects: Sequence[Subject]
    tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    second: int = 0  # when it was let in: its token count is corrected in that second's bucket


class RateLimiter(Protocol):
    async def admit(self, subjects: Sequence[Subject], tokens: int) -> Admission: ...
    async def finish(self, admission: Admission, actual_tokens: int) -> None: ...


class _Window:
    """Counts over the last minute, in one-second buckets."""

    __slots__ = ("counts", "seconds")

    def __init__(self) -> None:
        self.counts = [0] * WINDOW_SECONDS
        self.seconds = [-1] * WINDOW_SECONDS

    @classmethod
    def of(cls, buckets: Sequence[tuple[int, int]]) -> _Window:
        """A window holding these (second, count) buckets, e.g. as read back from Redis."""
        window = cls()
        for second, count in buckets:
            window.add(second, count)
        return window

    def total(self, now: int) -> int:
        return sum(c for c, s in zip(self.counts, self.seconds, strict=True) if s > now - WINDOW_SECONDS)

    def add(self, now: int, amount: int) -> None:
        slot = now % WINDOW_SECONDS
        if self.seconds[slot] != now:
            self.seconds[slot], self.counts[slot] = now, 0
        self.counts[slot] += amount

    def wait(self, now: int, need: int, limit: int) -> int:
        """Seconds until ``need`` more fits under ``limit`` (0 if it fits now)."""
        used = self.total(now)
        if used + need <= limit:
            return 0
        for second, count in sorted((s, c) for c, s in zip(self.counts, self.seconds, strict=True)
                                    if s > now - WINDOW_SECONDS):
            used -= count
            if used + need <= limit:
                return second + WINDOW_SECONDS - now
        return WINDOW_SECONDS


@dataclass(slots=True)
class _State:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    in_flight: int = 0


class LocalLimiter:
    """Limits kept in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _State()
        return state

    async def admit(self, subjects: Sequence[Subject], tokens: int) -> Admission:
        now = int(self._clock())
        for subject in subjects:  # check everything first, so a refusal counts nowhere
            try:
                self._check(subject, self._state(subject.name), now, tokens)
            except RateLimited as refused:
                refused.headers.update(self._headers(subjects[0], now))  # a 429 shows the key's limits too
                raise
        for subject in subjects:
            state = self._state(subject.name)
            state.requests.add(now, 1)
            state.tokens.add(now, tokens)
            state.in_flight += 1
        admission = Admission(subjects, tokens, second=now)
        if subjects:
            admission.headers = self._headers(subjects[0], now)
        return admission

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        """Release the concurrency slot and replace the token estimate with the real count."""
        if admission.finished:
            return
        admission.finished = True
        now = int(self._clock())
        for subject in admission.subjects:
            state = self._state(subject.name)
            state.in_flight -= 1
            if now - admission.second < WINDOW_SECONDS:  # else the estimate has already left the window
                state.tokens.add(admission.second, actual_tokens - admission.tokens)

    @staticmethod
    def _check(subject: Subject, state: _State, now: int, tokens: int) -> None:
        limits = subject.limits
        if limits.concurrency is not None and state.in_flight >= limits.concurrency:
            raise refusal(subject, "concurrency", 1)
        if limits.rpm is not None:
            wait = state.requests.wait(now, 1, limits.rpm)
            if wait:
                raise refusal(subject, "requests", wait)
        if limits.tpm is not None:
            if tokens > limits.tpm:
                raise refusal(subject, "too_large", WINDOW_SECONDS, tokens)
            wait = state.tokens.wait(now, tokens, limits.tpm)
            if wait:
                raise refusal(subject, "tokens", wait)

    def _headers(self, subject: Subject, now: int) -> dict[str, str]:
        state = self._state(subject.name)
        return rate_headers(subject.limits, state.requests, state.tokens, now)


def refusal(subject: Subject, kind: str, wait: int, tokens: int = 0,
            headers: dict[str, str] | None = None) -> RateLimited:
    """The 429 for ``subject`` over one of its limits (``kind``: concurrency, requests, tokens or
    too_large), to be tried again in ``wait`` seconds, with ``headers`` (the key's x-ratelimit-*
    state). Every limiter words its refusals this way."""
    limits, who = subject.limits, subject.name.replace(":", " ")
    if kind == "concurrency":
        message = (f"Too many requests at once for {who}: the limit is {limits.concurrency} concurrent requests. "
                   "Wait for one to finish.")
        retry_after = 1.0
    elif kind == "requests":
        message = f"Rate limit reached for {who} on requests per min: limit {limits.rpm}. Try again in {wait}s."
        retry_after = float(wait)
    elif kind == "too_large":  # no wait will let it in: the SDKs are told not to retry
        message = (f"This request ({tokens} tokens: its prompt and the most it may answer, its max_tokens or, "
                   f"when it sets none, the model's default) is larger than the {limits.tpm} tokens per min "
                   f"limit for {who}; set a lower max_tokens.")
        return RateLimited(message, retry_after=float(WINDOW_SECONDS), headers=headers, retryable=False)
    else:
        message = f"Rate limit reached for {who} on tokens per min: limit {limits.tpm}. Try again in {wait}s."
        retry_after = float(wait)
    return RateLimited(message, retry_after=retry_after, headers=headers)


def rate_headers(limits: LimitSet, requests: _Window, tokens: _Window, now: int) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers, describing one subject's (the key's) limits."""
    headers = {}
    for kind, limit, window in (("requests", limits.rpm, requests), ("tokens", limits.tpm, tokens)):
        if limit is None:
            continue
        used = window.total(now)
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
        headers[f"x-ratelimit-reset-{kind}"] = f"{window.wait(now, limit, limit) if used else 0}s"
    return headers


class FailedAuthLimiter:
    """Refuses an address that keeps presenting bad keys, so keys cannot be guessed."""

    def __init__(self, per_minute: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def check(self, address: str) -> None:
        window = self._windows.get(address)
        if window is None:
            return
        now = int(self._clock())
        wait = window.wait(now, 1, self._per_minute)
        if wait:
            raise RateLimited(f"Too many requests with invalid API keys from your address. Try again in {wait}s.",
                              retry_after=float(wait))

    def failed(self, address: str) -> None:
        if len(self._windows) > 100_000:
            self._windows.clear()  # bounded memory under a spray of addresses
        self._windows.setdefault(address, _Window()).add(int(self._clock()), 1)

