"""Prices and the one rounding rule.

A price is integer micro-USD per 1M tokens for each token class, an optional fixed fee per
request, and the user's group multiplier (in millionths). A request's cost is
``ceil((sum(tokens_k * price_k) + fee * 1e6) * multiplier / 1e12)`` micro-USD: exact integer
math, one rounding per request, never in the user's favour by more than 1 micro-USD. With
no fee and multiplier 1 that is ``ceil(sum(tokens_k * price_k) / 1e6)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any

from apibox.money import ceil_div

PER_MILLION = 1_000_000
MULTIPLIER_ONE = 1_000_000  # a group multiplier of 1.0, in millionths


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-USD per 1M tokens of each class. Optional classes fall back as DESIGN.md says."""

    input: int
    output: int
    cached_input: int | None = None  # default: input
    cache_write: int | None = None  # default: input
    cache_write_1h: int | None = None  # a write kept an hour (Anthropic's); default: cache_write's rate
    reasoning: int | None = None  # default: output
    per_request: int = 0  # a fixed fee per request, micro-USD
    multiplier: int = MULTIPLIER_ONE  # the user's group multiplier, in millionths (applies to everything)

    def for_group(self, multiplier: int) -> Price:
        """This price as a user of a group with ``multiplier`` (millionths) pays it."""
        if multiplier == self.multiplier:
            return self  # the usual case, on every request: dataclasses.replace is slow
        return replace(self, multiplier=multiplier)

    @property
    def cached_input_rate(self) -> int:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def cache_write_rate(self) -> int:
        return self.input if self.cache_write is None else self.cache_write

    @property
    def cache_write_1h_rate(self) -> int:
        return self.cache_write_rate if self.cache_write_1h is None else self.cache_write_1h

    @property
    def reasoning_rate(self) -> int:
        return self.output if self.reasoning is None else self.reasoning

    @property
    def max_input_rate(self) -> int:
        """The dearest rate an input token can be billed at, for worst-case holds."""
        write = self.cache_write_rate
        hour = write if self.cache_write_1h is None else self.cache_write_1h
        return max(self.input, self.cached_input_rate, write, hour)

    @property
    def max_output_rate(self) -> int:
        return max(self.output, self.reasoning_rate)


TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                "reasoning_tokens")
_token_counts = attrgetter(*TOKEN_COUNTS)  # a Usage's counts as a tuple, read in C: clamped() runs on every settlement


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, in OpenAI's convention.

    ``prompt_tokens`` includes ``cached_tokens`` and ``cache_write_tokens``, which includes
    ``cache_write_1h_tokens`` (written to be kept an hour, dearer); ``completion_tokens``
    includes ``reasoning_tokens``.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    estimated: bool = False  # counted by apibox because the upstream reported nothing

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def uncached_prompt_tokens(self) -> int:
        return max(0, self.prompt_tokens - self.cached_tokens - self.cache_write_tokens)

    @property
    def plain_output_tokens(self) -> int:
        return max(0, self.completion_tokens - self.reasoning_tokens)

    def clamped(self, most: int) -> Usage:
        """The same usage with no count above ``most``."""
        counts = _token_counts(self)
        if max(counts) <= most:
            return self
        return replace(self, **{name: min(count, most) for name, count in zip(TOKEN_COUNTS, counts, strict=True)})


def token_count(value: Any) -> int | None:
    """A token count as an upstream's JSON gave it: a whole number, or None when it is not a
    number (true and false are not) or is below 0. JSON readers give numbers past 2**64 as
    floats: those round up, so an absurd count is clamped by billing, never read as nothing.

    A usage report is billed as it stands only with a prompt of at least one token (no request
    reaches a model with none) and an answer count that is a number; anything less is no report,
    and the gateway estimates rather than charge nothing (PROTOCOLS.md 5.1)."""
    kind = type(value)
    if kind is int:
        return value if value >= 0 else None  # type: ignore[no-any-return]
    if kind is float and value >= 0:  # (NaN is not)
        return math.ceil(min(value, 1e18))
    return None


def count_at(raw: dict[str, Any], name: str) -> int:
    """``raw[name]`` as a token count; 0 when it is absent, not a number or below 0."""
    return token_count(raw.get(name)) or 0


def cost_micro(price: Price, usage: Usage) -> int:
    """The cost of ``usage`` at ``price`` in micro-USD, rounded up once."""
    # Each prompt token is billed once, even if an upstream reports more cache hits and
    # writes than its prompt had.
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cache_write = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    writes = cache_write * price.cache_write_rate
    if usage.cache_write_1h_tokens:  # (Anthropic's alone, and only when asked for)
        write_1h = min(usage.cache_write_1h_tokens, cache_write)
        writes += write_1h * (price.cache_write_1h_rate - price.cache_write_rate)
    scaled = (
        usage.uncached_prompt_tokens * price.input
        + cached * price.cached_input_rate
        + writes
        + usage.plain_output_tokens * price.output
        + min(usage.reasoning_tokens, usage.completion_tokens) * price.reasoning_rate
    )
    return _rounded(price, scaled)


def _rounded(price: Price, token_cost: int) -> int:
    """The one rounding: token cost (micro-USD x 1e6) plus the fee, times the multiplier, up."""
    return ceil_div((token_cost + price.per_request * PER_MILLION) * price.multiplier, PER_MILLION * MULTIPLIER_ONE)


def worst_case_micro(price: Price, prompt_tokens: int, output_tokens: int) -> int:
    """The most a request with this prompt bound and output cap can cost (the hold)."""
    return _rounded(price, prompt_tokens * price.max_input_rate + output_tokens * price.max_output_rate)


def affordable_output_tokens(price: Price, available_micro: int, prompt_tokens: int) -> int:
    """How many output tokens ``available_micro`` pays for after the prompt and fee (0 when none)."""
    if price.multiplier == 0:
        return 2**31 - 1
    # worst_case <= available  <=>  token cost + fee <= floor(available * 1e12 / multiplier)
    budget = available_micro * PER_MILLION * MULTIPLIER_ONE // price.multiplier
    left = budget - prompt_tokens * price.max_input_rate - price.per_request * PER_MILLION
    if left < 0:
        return 0
    if price.max_output_rate == 0:
        return 2**31 - 1
    return left // price.max_output_rate
