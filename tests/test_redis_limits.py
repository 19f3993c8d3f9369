"""RedisLimiter against a real redis-server: the LocalLimiter's semantics, shared by instances.

Every case of tests/test_limits.py runs again on Redis with the same fake clock. Then two limiters
with connections of their own (two gateways' worth) share one user's rpm, tpm and concurrency;
a refusal counts nowhere; nothing is left behind in Redis; a dead instance's requests stop
counting when their leases end; and when Redis is killed or hangs, requests are still admitted
by local limits, with one warning, ``apibox_redis_up`` 0 and a fallback count, until it is back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from apibox.config import LimitSet
from apibox.errors import RateLimited
from apibox.limits import Subject
from apibox.metrics import RedisInstruments
from apibox.redis_limits import RedisLimiter, SharedAdmission
from apibox.redis_link import REDIS_ERRORS, RedisLink
from apibox.settings import RedisSettings
from tests import test_limits
from tests.redis_helpers import PrivateRedis, link_for, unique_prefix
from tests.test_limits import Clock
from tests.waiting import eventually


def subject(name: str, rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None) -> Subject:
    return Subject(name, LimitSet(rpm=rpm, tpm=tpm, concurrency=concurrency))


@pytest.fixture
async def links(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Make started links to the session's Redis (closed after the test); all share one fresh prefix
    unless given one, as the gateways of one deployment do."""
    made: list[RedisLink] = []
    prefix = unique_prefix()

    async def make(**options: Any) -> RedisLink:
        link = link_for(options.pop("url", redis_url), options.pop("prefix", prefix), **options)
        await link.start()
        made.append(link)
        return link
    yield make
    for link in made:
        await link.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def limiter(links: Callable[..., Any], clock: Clock) -> RedisLimiter:
    return RedisLimiter(await links(), clock=clock)


@pytest.fixture
async def pair(links: Callable[..., Any]) -> tuple[RedisLimiter, RedisLimiter]:
    """Two gateways' limiters: each its own connection pool, one Redis, one prefix, Redis's clock."""
    return RedisLimiter(await links()), RedisLimiter(await links())


# -- the same semantics as the local limiter ----------------------------------------------------------------

LOCAL_CASES = [case for name, case in vars(test_limits).items()
               if name.startswith("test_") and inspect.iscoroutinefunction(case)
               and "limiter" in inspect.signature(case).parameters]


def test_the_local_cases_are_found() -> None:
    assert len(LOCAL_CASES) >= 15


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[case.__name__.removeprefix("test_") for case in LOCAL_CASES])
async def test_every_local_limiter_case_holds_on_redis(case: Callable[..., Any], limiter: RedisLimiter,
                                                       clock: Clock) -> None:
    """Same fake clock, same assertions: messages, Retry-After, headers, windows, corrections."""
    given = {"limiter": limiter, "clock": clock}
    await case(**{name: given[name] for name in inspect.signature(case).parameters})


async def test_admissions_go_through_redis_not_the_local_fallback(limiter: RedisLimiter) -> None:
    admission = await limiter.admit([subject("key:1", rpm=5, concurrency=2)], 10)
    assert isinstance(admission, SharedAdmission)


# -- shared by instances -----------------------------------------------------------------------------------


async def test_two_instances_share_one_users_requests_per_minute(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = pair
    user = subject("user:7", rpm=4)
    for i in range(4):  # alternate, as a load balancer would
        await (first if i % 2 else second).admit([subject(f"key:{i}"), user], 0)
    for limiter in pair:
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([subject("key:9"), user], 0)
        assert "user 7 on requests per min: limit 4" in refused.value.message
        assert 55 <= refused.value.retry_after <= 60


async def test_two_instances_share_tokens_and_the_correction(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = pair
    user = subject("user:7", tpm=1000)
    big = await first.admit([user], 600)
    with pytest.raises(RateLimited) as refused:
        await second.admit([user], 500)
    assert "tokens per min: limit 1000" in refused.value.message
    await first.finish(big, 100)  # it really used 100: the other instance sees the room at once
    await second.admit([user], 900)
    with pytest.raises(RateLimited):
        await first.admit([user], 1)


async def test_two_instances_share_requests_at_once(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = pair
    user = subject("user:7", concurrency=2)
    a = await first.admit([user], 0)
    await second.admit([user], 0)
    for limiter in pair:
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([user], 0)
        assert "Too many requests at once for user 7: the limit is 2" in refused.value.message
    await first.finish(a, 0)
    await first.finish(a, 0)  # finishing twice frees one slot, not two
    await second.admit([user], 0)
    with pytest.raises(RateLimited):
        await first.admit([user], 0)


async def test_a_refusal_by_one_subject_counts_against_none(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = pair
    own = subject("key:1", rpm=10, tpm=10_000, concurrency=10)
    user = subject("user:1", rpm=2)
    await first.admit([own, user], 100)
    await second.admit([own, user], 100)
    for limiter in pair * 3:
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([own, user], 100)
        assert "user 1" in refused.value.message
        assert refused.value.headers["x-ratelimit-remaining-requests"] == "8"  # the key's own headers
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == "9800"
    other_user = subject("user:2", rpm=100)
    admitted = [await first.admit([own, other_user], 100) for _ in range(8)]  # the key kept 8 of its 10
    assert admitted[-1].headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        await second.admit([own, other_user], 100)
    assert "key 1" in refused.value.message


async def test_headers_count_what_every_instance_let_in(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = pair
    own = subject("key:3", rpm=10, tpm=1000)
    await first.admit([own], 200)
    admission = await second.admit([own], 300)
    assert admission.headers == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "60s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "60s",
    }


async def test_concurrent_admissions_from_both_never_exceed_the_limits(pair: tuple[RedisLimiter, RedisLimiter]
                                                                       ) -> None:
    """Many admits at once from both instances: exactly the limit gets in (the script is atomic)."""
    user = subject("user:5", rpm=25, concurrency=1000)

    async def attempt(limiter: RedisLimiter) -> bool:
        try:
            await limiter.admit([user], 0)
        except RateLimited:
            return False
        return True
    results = await asyncio.gather(*(attempt(pair[i % 2]) for i in range(80)))
    assert sum(results) == 25


# -- nothing leaks -----------------------------------------------------------------------------------------


async def test_every_key_expires_and_old_buckets_are_deleted(links: Callable[..., Any], clock: Clock) -> None:
    link = await links()
    limiter = RedisLimiter(link, clock=clock)
    own = subject("key:1", rpm=5, tpm=1000, concurrency=3)
    done = await limiter.admit([own], 100)
    await limiter.finish(done, 50)
    await limiter.admit([own], 100)
    rate, busy = link.key("rate", "key:1"), link.key("busy", "key:1")
    assert 0 < await link.client.ttl(rate) <= 120
    assert 0 < await link.client.ttl(busy) <= 30 + 60
    assert set(await link.client.keys(f"{link.settings.prefix}:*")) == {rate, busy}
    clock.now += 61  # the minute is over: reading the subject again deletes its old buckets
    await limiter.admit([own], 7)
    assert await link.client.hgetall(rate) == {f"r:{int(clock.now)}": "1", f"t:{int(clock.now)}": "7"}


async def test_subjects_without_a_kind_of_limit_write_nothing_for_it(links: Callable[..., Any]) -> None:
    link = await links()
    limiter = RedisLimiter(link)
    admission = await limiter.admit([subject("key:1", concurrency=2), subject("user:1", rpm=9)], 50)
    assert await link.client.exists(link.key("rate", "key:1")) == 0
    assert await link.client.exists(link.key("busy", "user:1")) == 0
    await limiter.finish(admission, 10)
    assert await link.client.zcard(link.key("busy", "key:1")) == 0


# Seconds between heartbeats in the lease tests (a lease is three): short enough for a quick test,
# long enough that a loaded CI machine's stall of half a second does not end a lease early.
LOADED_CI_HEARTBEAT = 0.5


async def test_a_dead_instance_stops_counting_when_its_leases_end(links: Callable[..., Any]) -> None:
    """A process that dies mid-request never finishes it; its slot comes back after the lease (3 heartbeats)."""
    dying = RedisLimiter(await links(heartbeat=LOADED_CI_HEARTBEAT))
    survivor = RedisLimiter(await links(heartbeat=LOADED_CI_HEARTBEAT))
    user = subject("user:1", concurrency=1)
    await dying.admit([user], 0)
    await dying._link.close()  # gone without finishing: no more heartbeats
    with pytest.raises(RateLimited):
        await survivor.admit([user], 0)
    await asyncio.sleep(3 * LOADED_CI_HEARTBEAT + 0.2)  # past the lease
    await survivor.admit([user], 0)


async def test_a_live_instance_keeps_a_long_request_counted(links: Callable[..., Any]) -> None:
    """Heartbeats renew the leases of requests in flight, however long they run."""
    streaming = RedisLimiter(await links(heartbeat=LOADED_CI_HEARTBEAT))
    other = RedisLimiter(await links(heartbeat=LOADED_CI_HEARTBEAT))
    user = subject("user:1", concurrency=1)
    long_one = await streaming.admit([user], 0)
    await asyncio.sleep(3 * LOADED_CI_HEARTBEAT + 0.5)  # longer than a lease: renewed meanwhile
    with pytest.raises(RateLimited):
        await other.admit([user], 0)
    await streaming.finish(long_one, 0)
    await other.admit([user], 0)


async def test_a_finished_request_is_not_brought_back_by_a_heartbeat(links: Callable[..., Any]) -> None:
    link = await links()
    limiter = RedisLimiter(link)
    user = subject("user:1", concurrency=1)
    admission = await limiter.admit([user], 0)
    await limiter.finish(admission, 0)
    await limiter.renew_leases()
    assert await link.client.zcard(link.key("busy", "user:1")) == 0
    await limiter.admit([user], 0)


# -- Redis goes away ---------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def samples(registry: CollectorRegistry) -> dict[str, float]:
    return {s.name: s.value for family in registry.collect() for s in family.samples}


async def test_redis_killed_mid_run_falls_back_to_local_limits_and_comes_back(
        private_redis: PrivateRedis, links: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    link = await links(url=private_redis.url, retry=0.1, instruments=RedisInstruments(registry))
    limiter = RedisLimiter(link)
    own = subject("key:1", rpm=3, concurrency=5)
    assert samples(registry)["apibox_redis_up"] == 1
    before = await limiter.admit([own], 10)
    assert isinstance(before, SharedAdmission)

    caplog.set_level(logging.INFO, logger="apibox.redis")
    private_redis.kill()
    admitted = [await limiter.admit([own], 10) for _ in range(3)]  # served: local limits now
    assert not any(isinstance(a, SharedAdmission) for a in admitted)
    with pytest.raises(RateLimited) as refused:  # and they are limits: 3 a minute in this process
        await limiter.admit([own], 10)
    assert "key 1 on requests per min: limit 3" in refused.value.message
    await limiter.finish(before, 10)  # finishing a request Redis let in, with Redis gone, is quiet
    for admission in admitted:
        await limiter.finish(admission, 10)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "redis unavailable, using local limits" in warnings[0].getMessage()
    assert samples(registry)["apibox_redis_up"] == 0
    assert samples(registry)["apibox_redis_fallbacks_total"] == 4

    private_redis.start()  # back on the same port, empty
    await eventually(lambda: link.up, timeout=5)
    assert samples(registry)["apibox_redis_up"] == 1
    assert any(r.levelno == logging.INFO and "redis available again" in r.getMessage() for r in caplog.records)
    again = await limiter.admit([own], 10)
    assert isinstance(again, SharedAdmission)
    assert await link.client.hget(link.key("rate", "key:1"), f"r:{again.second}") == "1"
    assert samples(registry)["apibox_redis_fallbacks_total"] == 4
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_after_a_restart_the_pools_old_connections_do_not_send_it_away_again(
        private_redis: PrivateRedis, links: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """Requests at once open several connections; after Redis restarts, each would fail once and
    mark Redis away again, while requests admitted meanwhile kept their slots past their end."""
    link = await links(url=private_redis.url, retry=0.05)
    limiter = RedisLimiter(link)
    own = subject("key:1", concurrency=8)
    for admission in await asyncio.gather(*(limiter.admit([own], 1) for _ in range(8))):  # 8 connections
        await limiter.finish(admission, 1)
    caplog.set_level(logging.INFO, logger="apibox.redis")
    private_redis.kill()
    private_redis.start()
    await limiter.admit([own], 1)  # notices it is away
    await eventually(lambda: link.up, timeout=5)
    for _ in range(3):
        admitted = await asyncio.gather(*(limiter.admit([own], 1) for _ in range(8)))
        assert all(isinstance(a, SharedAdmission) for a in admitted)
        for admission in admitted:
            await limiter.finish(admission, 1)
    assert link.up and await link.client.zcard(link.key("busy", "key:1")) == 0  # every slot given back
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # one outage, one warning


async def test_requests_running_when_redis_restarted_count_again_once_it_answers(
        private_redis: PrivateRedis, links: Callable[..., Any]) -> None:
    """A restart loses the busy sets: once Redis answers, this process's running requests are put
    back, so a key with one slot, whose request still runs, gets no second one."""
    link = await links(url=private_redis.url, retry=0.05)
    limiter = RedisLimiter(link)
    own = subject("key:1", concurrency=1)
    running = await limiter.admit([own], 1)
    assert isinstance(running, SharedAdmission)
    private_redis.kill()
    private_redis.start()  # empty
    with pytest.raises(REDIS_ERRORS) as gone:
        await link.call(link.client.ping())
    link.failed(gone.value)
    await eventually(lambda: link.up, timeout=5)
    for _ in range(500):  # the catching up runs just after Redis is marked back
        if await link.client.zcard(link.key("busy", "key:1")):
            break
        await asyncio.sleep(0.01)
    with pytest.raises(RateLimited):
        await limiter.admit([own], 1)
    await limiter.finish(running, 1)
    again = await limiter.admit([own], 1)  # and the slot is free once it ends
    assert isinstance(again, SharedAdmission)
    await limiter.finish(again, 1)


async def test_a_failure_to_close_the_old_connections_does_not_end_the_watch(
        private_redis: PrivateRedis, links: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis comes back and closing the pool's old connections fails: it is still marked back, and the
    next outage is still noticed and recovered from (the watch did not die with the failure)."""
    link = await links(url=private_redis.url, retry=0.05)

    async def fails(**_: Any) -> None:
        raise RuntimeError("cannot close")
    with monkeypatch.context() as patched:  # (closing the link at the end closes the pool for real)
        patched.setattr(link.client.connection_pool, "disconnect", fails)
        for _ in range(2):
            private_redis.kill()
            with pytest.raises(REDIS_ERRORS) as gone:
                await link.call(link.client.ping())
            link.failed(gone.value)
            private_redis.start()
            await eventually(lambda: link.up, timeout=5)


async def test_slots_finished_while_redis_was_away_are_given_back_when_it_answers(
        private_redis: PrivateRedis, links: Callable[..., Any]) -> None:
    """A blip (Redis keeps its data): the request that ended during it frees its slot once Redis is
    back, not when its 30 s lease ends."""
    link = await links(url=private_redis.url, retry=0.05, timeout=0.2)
    limiter = RedisLimiter(link)
    own = subject("key:1", concurrency=1)
    first = await limiter.admit([own], 1)
    assert isinstance(first, SharedAdmission)
    private_redis.pause()
    try:
        await limiter.finish(first, 1)  # Redis does not answer: the slot cannot be given back now
        assert not link.up
    finally:
        private_redis.resume()
    await eventually(lambda: link.up, timeout=5)
    await eventually(lambda: not limiter._unfinished, timeout=5)
    second = await limiter.admit([own], 1)  # the one slot is free again
    assert isinstance(second, SharedAdmission)
    await limiter.finish(second, 1)


async def test_a_hung_redis_costs_a_request_a_fraction_of_a_second(
        private_redis: PrivateRedis, links: Callable[..., Any]) -> None:
    link = await links(url=private_redis.url, retry=0.1, timeout=RedisSettings(url="").timeout)  # the gateway's
    limiter = RedisLimiter(link)
    own = subject("key:1", rpm=100)
    await limiter.admit([own], 1)
    private_redis.pause()
    try:
        started = time.monotonic()
        admission = await limiter.admit([own], 1)
        assert time.monotonic() - started < 1.0  # the gateway's 0.25 s timeout, not the tests' 5 s
        assert not isinstance(admission, SharedAdmission) and not link.up
        started = time.monotonic()
        for _ in range(20):  # while away, requests do not wait on Redis at all
            await limiter.admit([own], 1)
        assert time.monotonic() - started < 0.1
    finally:
        private_redis.resume()
    await eventually(lambda: link.up, timeout=5)


async def test_a_gateway_starts_and_serves_when_redis_is_not_there(links: Callable[..., Any],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    caplog.set_level(logging.WARNING, logger="apibox.redis")
    link = await links(url="redis://127.0.0.1:9/0", instruments=RedisInstruments(registry))  # nothing listens
    assert not link.up and samples(registry)["apibox_redis_up"] == 0
    assert "redis unavailable, using local limits" in caplog.text
    limiter = RedisLimiter(link)
    admission = await limiter.admit([subject("key:1", rpm=1)], 5)
    await limiter.finish(admission, 5)
    with pytest.raises(RateLimited):
        await limiter.admit([subject("key:1", rpm=1)], 5)
