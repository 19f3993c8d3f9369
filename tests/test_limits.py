"""The in-process limiters, driven by a fake clock: rpm, tpm, concurrency, headers, bad keys.

No server here: each test moves the clock by hand, so "within a minute" and "a minute
later" are exact.
"""

from __future__ import annotations

import pytest

from apibox.config import LimitSet
from apibox.errors import RateLimited
from apibox.limits import FailedAuthLimiter, LocalLimiter, Subject
from tests.garbage import apiboxs_own, collected_garbage


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None,
        name: str = "key:1") -> Subject:
    return Subject(name, LimitSet(rpm=rpm, tpm=tpm, concurrency=concurrency))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LocalLimiter:
    return LocalLimiter(clock=clock)


async def test_a_refusal_leaves_nothing_to_the_cyclic_garbage_collector(limiter: LocalLimiter) -> None:
    """A refusal is raised as it is made: one kept in a local is held by its own traceback, a
    reference cycle a 429, and a client over its limit can send many (runs on Redis too)."""
    subject = key(rpm=1)
    await limiter.admit([subject], 0)
    refused = 0
    with collected_garbage() as left:
        for _ in range(3):
            try:  # not pytest.raises, whose ExceptionInfo in this frame would make a cycle of its own
                await limiter.admit([subject], 0)
            except RateLimited:
                refused += 1
    assert refused == 3
    assert apiboxs_own(left) == []


# -- requests per minute -------------------------------------------------------------------


async def test_rpm_3_refuses_the_fourth_request_in_a_minute_with_retry_after(limiter: LocalLimiter,
                                                                           clock: Clock) -> None:
    subject = key(rpm=3)
    for _ in range(3):
        await limiter.finish(await limiter.admit([subject], 10), 10)
        clock.now += 5
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 10)
    assert refused.value.status == 429
    assert refused.value.code == "rate_limit_exceeded"
    assert "requests per min" in refused.value.message and "limit 3" in refused.value.message
    # the first request (15 s ago) leaves the window 45 s from now
    assert refused.value.retry_after == 45


async def test_rpm_window_slides_so_each_old_request_frees_one_slot(limiter: LocalLimiter, clock: Clock) -> None:
    subject = key(rpm=2)
    await limiter.admit([subject], 0)  # t=1000
    clock.now = 1030
    await limiter.admit([subject], 0)  # t=1030
    clock.now = 1059.9  # still inside the first request's minute
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 0)
    assert refused.value.retry_after == 1
    clock.now = 1060  # the first request's minute is over; the second still counts
    await limiter.admit([subject], 0)
    with pytest.raises(RateLimited) as again:
        await limiter.admit([subject], 0)
    assert again.value.retry_after == 30  # until the request made at t=1030 ages out
    clock.now = 1090
    await limiter.admit([subject], 0)


async def test_an_idle_minute_resets_the_count(limiter: LocalLimiter, clock: Clock) -> None:
    subject = key(rpm=3)
    for _ in range(3):
        await limiter.admit([subject], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 0)
    clock.now += 60
    for _ in range(3):
        await limiter.admit([subject], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 0)


async def test_old_buckets_reused_after_a_long_pause_do_not_carry_stale_counts(limiter: LocalLimiter,
                                                                               clock: Clock) -> None:
    """A second's bucket is reused 60, 120, ... seconds later; its old count must not leak in."""
    subject = key(rpm=2)
    await limiter.admit([subject], 0)
    await limiter.admit([subject], 0)
    clock.now += 120  # lands on the same bucket as the two requests above
    await limiter.admit([subject], 0)
    await limiter.admit([subject], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 0)


async def test_subjects_are_counted_separately(limiter: LocalLimiter) -> None:
    first, second = key(rpm=1, name="key:1"), key(rpm=1, name="key:2")
    await limiter.admit([first], 0)
    await limiter.admit([second], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([first], 0)


async def test_no_limits_no_refusals(limiter: LocalLimiter) -> None:
    for _ in range(500):
        admission = await limiter.admit([key()], 1_000_000)
        assert admission.headers == {}
    assert (await limiter.admit([], 5)).headers == {}


# -- the key and the user together ---------------------------------------------------------


async def test_a_refusal_by_one_subject_counts_against_none(limiter: LocalLimiter) -> None:
    own, user = key(rpm=10, concurrency=10, name="key:1"), key(rpm=2, name="user:1")
    await limiter.admit([own, user], 0)
    await limiter.admit([own, user], 0)
    for _ in range(5):
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([own, user], 0)
        assert "user 1" in refused.value.message
    # the key itself was charged only the two admitted requests: 8 of its 10 remain
    other_user = key(rpm=100, name="user:2")
    for _ in range(8):
        await limiter.admit([own, other_user], 0)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([own, other_user], 0)
    assert "key 1" in refused.value.message


async def test_user_limits_hold_across_that_users_keys(limiter: LocalLimiter) -> None:
    user = key(rpm=3, name="user:7")
    await limiter.admit([key(name="key:1"), user], 0)
    await limiter.admit([key(name="key:2"), user], 0)
    await limiter.admit([key(name="key:1"), user], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([key(name="key:3"), user], 0)


# -- requests at once ----------------------------------------------------------------------


async def test_concurrency_limit_and_release(limiter: LocalLimiter) -> None:
    subject = key(concurrency=2)
    first = await limiter.admit([subject], 0)
    await limiter.admit([subject], 0)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 0)
    assert "at once" in refused.value.message and refused.value.retry_after == 1
    await limiter.finish(first, 0)
    third = await limiter.admit([subject], 0)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 0)
    await limiter.finish(third, 0)
    await limiter.admit([subject], 0)


async def test_finishing_twice_releases_one_slot(limiter: LocalLimiter) -> None:
    subject = key(concurrency=1, tpm=100)
    first = await limiter.admit([subject], 50)
    await limiter.finish(first, 10)
    await limiter.finish(first, 10)  # a second finish must not free a slot someone else holds
    await limiter.admit([subject], 10)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 10)


# -- tokens per minute ---------------------------------------------------------------------


async def test_a_request_larger_than_tpm_is_refused_outright(limiter: LocalLimiter) -> None:
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([key(tpm=1000)], 1001)
    assert "set a lower max_tokens" in refused.value.message and "the model's default" in refused.value.message
    assert refused.value.retry_after == 60 and not refused.value.retryable  # no wait lets it in
    await limiter.admit([key(tpm=1000)], 1000)  # exactly the limit fits, and the refusal counted nothing


async def test_tpm_estimate_is_corrected_at_settlement(limiter: LocalLimiter, clock: Clock) -> None:
    subject = key(tpm=1000)
    first = await limiter.admit([subject], 600)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 500)  # 600 + 500 estimated > 1000
    assert "tokens per min" in refused.value.message
    clock.now += 2
    await limiter.finish(first, 100)  # it really used 100 tokens
    second = await limiter.admit([subject], 500)  # 100 + 500 fits now
    await limiter.finish(second, 500)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 401)  # 100 + 500 + 401 does not
    await limiter.admit([subject], 400)


async def test_a_late_correction_does_not_outlive_the_estimate_it_corrects(limiter: LocalLimiter,
                                                                          clock: Clock) -> None:
    """A long request's correction belongs to the second it was let in; booked later, its negative
    remainder would outlive the estimate and lend the key capacity it never had."""
    subject = key(tpm=1000, concurrency=5)
    long_stream = await limiter.admit([subject], 900)
    clock.now += 30
    await limiter.finish(long_stream, 100)  # settled 30 s later: it used 100 tokens
    clock.now += 31  # the request's minute is over: all 1000 tokens are free again, and no more
    await limiter.admit([subject], 1000)
    with pytest.raises(RateLimited):
        await limiter.admit([subject], 1)


async def test_a_correction_after_the_window_changes_nothing(limiter: LocalLimiter, clock: Clock) -> None:
    subject = key(tpm=1000)
    very_long = await limiter.admit([subject], 50)
    clock.now += 120
    await limiter.finish(very_long, 900)  # its estimate left the window long ago
    await limiter.admit([subject], 1000)


async def test_tokens_age_out_after_a_minute(limiter: LocalLimiter, clock: Clock) -> None:
    subject = key(tpm=100)
    await limiter.admit([subject], 100)
    clock.now += 59
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 1)
    assert refused.value.retry_after == 1
    clock.now += 1
    await limiter.admit([subject], 100)


# -- x-ratelimit-* headers -----------------------------------------------------------------


async def test_headers_describe_the_first_subject_after_admission(limiter: LocalLimiter, clock: Clock) -> None:
    own = key(rpm=3, tpm=1000, name="key:1")
    user = key(rpm=100, name="user:1")
    first = await limiter.admit([own, user], 200)
    assert first.headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "60s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "800",
        "x-ratelimit-reset-tokens": "60s",
    }
    clock.now += 10
    second = await limiter.admit([own, user], 300)
    assert second.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-tokens"] == "500"
    # reset = until the limit is back to its initial state: when the newest use leaves the window
    assert second.headers["x-ratelimit-reset-requests"] == "60s"
    assert second.headers["x-ratelimit-reset-tokens"] == "60s"
    clock.now += 20
    third = await limiter.admit([own, user], 0)  # a request using no tokens
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["x-ratelimit-reset-requests"] == "60s"
    assert third.headers["x-ratelimit-reset-tokens"] == "40s"  # the 300 tokens of 20 s ago leave in 40 s


async def test_headers_only_name_limits_that_exist(limiter: LocalLimiter) -> None:
    admission = await limiter.admit([key(rpm=5)], 10)
    assert set(admission.headers) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                      "x-ratelimit-reset-requests"}


# -- bad keys per address ------------------------------------------------------------------


def test_an_address_is_refused_after_too_many_bad_keys(clock: Clock) -> None:
    failures = FailedAuthLimiter(per_minute=3, clock=clock)
    failures.check("192.0.2.1")  # never seen: fine
    for _ in range(3):
        failures.check("192.0.2.1")
        failures.failed("192.0.2.1")
        clock.now += 1
    with pytest.raises(RateLimited) as refused:
        failures.check("192.0.2.1")
    assert refused.value.status == 429
    assert "invalid API keys" in refused.value.message
    assert refused.value.retry_after == 57  # the first failure, 3 s ago, leaves the window in 57 s
    failures.check("192.0.2.2")  # other addresses are unaffected
    failures.check("")


def test_bad_key_refusal_ends_when_the_minute_passes(clock: Clock) -> None:
    failures = FailedAuthLimiter(per_minute=2, clock=clock)
    failures.failed("198.51.100.9")
    failures.failed("198.51.100.9")
    with pytest.raises(RateLimited):
        failures.check("198.51.100.9")
    clock.now += 59
    with pytest.raises(RateLimited):
        failures.check("198.51.100.9")
    clock.now += 1
    failures.check("198.51.100.9")


def test_fewer_failures_than_the_limit_pass(clock: Clock) -> None:
    failures = FailedAuthLimiter(per_minute=5, clock=clock)
    for _ in range(4):
        failures.failed("203.0.113.5")
    failures.check("203.0.113.5")
    failures.failed("203.0.113.5")
    with pytest.raises(RateLimited):
        failures.check("203.0.113.5")


async def test_a_refusal_carries_the_keys_rate_limit_headers(limiter: LocalLimiter) -> None:
    subject = key(rpm=2, tpm=1_000)
    for _ in range(2):
        await limiter.finish(await limiter.admit([subject], 100), 100)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit([subject], 100)
    headers = refused.value.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "800"
