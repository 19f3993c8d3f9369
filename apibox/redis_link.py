"""A gateway's connection to the shared Redis, and whether Redis answers right now.

Every Redis call goes through ``RedisLink.call`` with a short timeout. The first failure marks
Redis as away: a WARNING in the log (once per outage), ``apibox_redis_up`` 0, and the callers
fall back to what they can do alone (local limits; the 1 s key cache). While away, nothing
waits on Redis: a background task pings it every ``retry_seconds`` and, when it answers, says
so (INFO, gauge 1). While up, the same task runs the heartbeats (the limiter's leases).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from apibox.deadlines import Deadlines
from apibox.metrics import RedisInstruments
from apibox.settings import RedisSettings
from apibox.urls import masked_url

log = logging.getLogger("apibox.redis")

# What a failing Redis raises: its own errors, socket errors, and our timeout.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
POOL_SIZE = 64  # connections per process; a script takes well under a millisecond, so few are busy at once
T = TypeVar("T")


STOP_RETRY_SECONDS = 0.1
STOP_GRACE_SECONDS = 5.0


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it to end. A cancellation can be lost inside a
    client library (one arriving in the same pass as a timeout of the library's own); it is
    sent again every ``STOP_RETRY_SECONDS``, so that closing never waits for ever. After
    ``STOP_GRACE_SECONDS`` the task is left behind, with a warning."""
    loop = asyncio.get_running_loop()
    given_up = loop.time() + STOP_GRACE_SECONDS
    while not task.done():
        if loop.time() >= given_up:
            log.warning("the background task %s did not stop when cancelled; left behind", task.get_name())
            return
        task.cancel()
        await asyncio.wait((task,), timeout=STOP_RETRY_SECONDS)
    if not task.cancelled():
        task.result()  # its own failure, if it had one, raised as awaiting it would have


def connect(settings: RedisSettings, *, timeout: float | None = None) -> Redis:
    """A client that fails fast: short socket timeouts, no retries (the caller decides what a failure means)."""
    seconds = timeout if timeout is not None else settings.timeout
    pool = BlockingConnectionPool.from_url(
        settings.url, max_connections=POOL_SIZE, timeout=seconds, socket_timeout=seconds,
        socket_connect_timeout=seconds, retry=Retry(NoBackoff(), 0), decode_responses=True)
    return Redis.from_pool(pool)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisLink:
    def __init__(self, settings: RedisSettings, *, instruments: RedisInstruments | None = None,
                 heartbeat_seconds: float = 10.0, retry_seconds: float = 1.0) -> None:
        self.settings = settings
        self.client = connect(settings)
        self.heartbeat_seconds = heartbeat_seconds
        self.retry_seconds = retry_seconds
        self.up = True
        self._instruments = instruments
        self._heartbeats: list[Callable[[], Awaitable[None]]] = []
        self._on_recovery: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._away = asyncio.Event()  # set while Redis is away: wakes the watch to start probing at once
        self._deadlines = Deadlines()  # every call's timeout on one timer (a limited request makes two calls)

    def key(self, *parts: str) -> str:
        """A Redis key (or channel) under the configured prefix: ``apibox:rate:key:12``."""
        return ":".join((self.settings.prefix, *parts))

    async def call(self, awaitable: Awaitable[T]) -> T:
        """One Redis round trip, given up after the configured timeout (twice it, with a wait for a connection)."""
        with self._deadlines.timeout(self.settings.timeout * 2):
            return await awaitable

    def failed(self, exc: BaseException) -> None:
        """A call failed: Redis is away until the background ping gets an answer."""
        if self.up:
            self.up = False
            self._away.set()
            log.warning("redis unavailable, using local limits (%s at %s); retrying every %g s", describe(exc),
                        masked_url(self.settings.url), self.retry_seconds)
            if self._instruments is not None:
                self._instruments.up.set(0)

    def recovered(self) -> None:
        if not self.up:
            self.up = True
            self._away.clear()
            log.info("redis available again at %s: limits are shared again", masked_url(self.settings.url))
            if self._instruments is not None:
                self._instruments.up.set(1)

    def fell_back(self) -> None:
        """One request's limits were checked in this process alone."""
        if self._instruments is not None:
            self._instruments.fallbacks.inc()

    def on_heartbeat(self, beat: Callable[[], Awaitable[None]]) -> None:
        """Run ``beat`` every ``heartbeat_seconds`` while Redis is up (a failure marks it away)."""
        self._heartbeats.append(beat)

    def on_recovery(self, catch_up: Callable[[], Awaitable[None]]) -> None:
        """Run ``catch_up`` each time Redis answers again (what could not be done while it was away)."""
        self._on_recovery.append(catch_up)

    async def start(self) -> None:
        """Check that Redis answers (serving goes on either way) and start the background task."""
        try:
            await self.call(self.client.ping())
        except REDIS_ERRORS as exc:
            self.failed(exc)
        self._task = asyncio.create_task(self._watch(), name="apibox-redis-watch")

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        await self.client.aclose()

    async def _watch(self) -> None:
        while True:
            if self.up:
                try:
                    async with asyncio.timeout(self.heartbeat_seconds):
                        await self._away.wait()
                except TimeoutError:
                    await self._beat()
            else:
                await asyncio.sleep(self.retry_seconds)
                await self._probe()

    async def _beat(self) -> None:
        await self._run(self._heartbeats, "redis heartbeat failed")

    async def _run(self, tasks: list[Callable[[], Awaitable[None]]], what: str) -> None:
        for task in tasks:
            try:
                await task()
            except REDIS_ERRORS as exc:
                self.failed(exc)
                return
            except Exception:  # a bug in one task must not end the watch (and with it the recovery)
                log.exception(what)

    async def _probe(self) -> None:
        try:
            await self.call(self.client.ping())
        except REDIS_ERRORS:
            return
        # The pool's other connections were opened to the Redis that went away: after a restart each
        # would fail once, and each failure mark Redis away again. They are opened afresh instead.
        try:
            await self.client.connection_pool.disconnect(inuse_connections=False)  # (not the subscriber's, say)
        except Exception as exc:  # closing old sockets may fail: the watch, and the recovery, must go on
            log.warning("could not close the connections to the redis that went away (%s)", type(exc).__name__)
        self.recovered()
        await self._run(self._on_recovery, "catching up with redis failed")

