"""Two live gateways on one database and one Redis, as two `apibox serve` processes would run.

Each gateway has its own event loop and thread, its own key cache, limiter and subscriber; they
share only the database and Redis. One user's rate limit holds across both; a key revoked or a
user suspended through one gateway's admin API, or through the CLI, is refused by the other well
within a second (faster than its 1 s cache could notice by itself); /metrics says Redis is up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import web
from typer.testing import CliRunner

from apibox import accounts, auth
from apibox.cli.main import app as cli_app
from apibox.config import LimitSet, Settings
from apibox.gateway.app import create_app
from apibox.settings import RedisSettings
from tests.conftest import Live, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account
from tests.live_variants import ADMIN_KEY, Variant, limits, openai_error, request, server, store_of
from tests.redis_helpers import unique_prefix

DEMO = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
USER_RPM = 4
HOUR = 3600.0
PROMISED_SECONDS = 1.0  # a revoked key or suspended user is refused within it on every instance (DESIGN.md)


class TwoGateways(Variant):
    """Gateway A beside the fake upstream (as every live test runs it) and gateway B on a loop of its own."""

    def __init__(self, tmp_path: Path, database_url: str, fake: FakeUpstream, redis_url: str,
                 user_limits: LimitSet) -> None:
        # a generous timeout: on a loaded CI machine a slow reply must not send a gateway to local limits
        self.redis = RedisSettings(url=redis_url, prefix=unique_prefix(), timeout=5.0)
        super().__init__(tmp_path, database_url, fake, limits(user=user_limits), server(admin_key=ADMIN_KEY),
                         self.with_redis)
        self.other_loop = asyncio.new_event_loop()
        self.other_thread = threading.Thread(target=self.other_loop.run_forever, daemon=True)
        self.other_runner: web.AppRunner | None = None

    def with_redis(self, settings: Settings) -> Settings:
        return replace(settings, redis=self.redis)

    async def _start(self) -> Live:
        live = await super()._start()
        with live.config_path.open("a") as config:  # so that CLI commands publish their changes too
            config.write(f"\nredis: {{url: '{self.redis.url}', prefix: {self.redis.prefix}, "
                         f"timeout: {self.redis.timeout}}}\n")
        return live

    def start(self) -> Live:
        live = super().start()
        self.other_thread.start()
        self.other_url = asyncio.run_coroutine_threadsafe(self._serve_other(live.settings),
                                                          self.other_loop).result(timeout=30)
        return live

    async def _serve_other(self, settings: Settings) -> str:
        runner = self.other_runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.other_runner is not None:
            asyncio.run_coroutine_threadsafe(self.other_runner.cleanup(), self.other_loop).result(timeout=30)
        self.other_loop.call_soon_threadsafe(self.other_loop.stop)
        self.other_thread.join(timeout=10)
        self.other_loop.close()
        super().stop()


@dataclass
class Pair:
    a: Live
    b: Live  # the same settings and config file, gateway B's address

    @property
    def both(self) -> tuple[Live, Live]:
        return self.a, self.b


@pytest.fixture
def pair(tmp_path: Path, database_url: str, fake: FakeUpstream, redis_url: str,
         request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    """Both gateways; a test may give the users' default limits (``indirect`` parameter), else none.
    Their key caches keep entries for an hour, so a change that reaches a gateway within the
    promised second came over Redis."""
    monkeypatch.setattr(auth, "CACHE_TTL_SECONDS", HOUR)
    user_limits = getattr(request, "param", LimitSet())
    gateways = TwoGateways(tmp_path, database_url, fake, redis_url, user_limits)
    with serving(gateways) as live:  # the books must balance afterwards
        yield Pair(live, replace(live, url=gateways.other_url))


async def chat(live: Live, key: str) -> int:
    status, _, _ = await request(live, "POST", "/v1/chat/completions", key=key, json_body=DEMO)
    return status


async def refused_within(live: Live, key: str, status: int, limit: float) -> float:
    """Seconds until ``live`` answers ``key`` with ``status`` (asked every 10 ms); fails the test after ``limit``."""
    started = time.monotonic()
    while (answer := await chat(live, key)) != status:
        assert answer == 200, answer
        if time.monotonic() - started > limit:
            raise AssertionError(f"still served after {limit} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("pair", [LimitSet(rpm=USER_RPM)], indirect=True, ids=["user_rpm"])
async def test_one_users_rate_limit_holds_across_both_gateways(pair: Pair) -> None:
    async with store_of(pair.a) as db:
        ann = await account(db, pair.a, "ann@example.com", "1")
        laptop = (await accounts.create_key(db, "ann@example.com", accounts.KeyOptions(name="laptop"),
                                            known_models=pair.a.settings.model_index())).secret
    for i in range(USER_RPM):  # her two keys, on alternating gateways
        assert await chat(pair.both[i % 2], (ann.key, laptop)[i // 2 % 2]) == 200
    for gateway in pair.both:
        for key in (ann.key, laptop):
            status, headers, raw = await request(gateway, "POST", "/v1/chat/completions", key=key, json_body=DEMO)
            assert status == 429, raw
            error = openai_error(raw)
            assert error["code"] == "rate_limit_exceeded"
            assert f"user {ann.user_id} on requests per min: limit {USER_RPM}" in error["message"]
            assert 50 <= int(headers["Retry-After"]) <= 60
    async with store_of(pair.a) as db:  # another user is not held back by hers
        bob = await account(db, pair.a, "bob@example.com", "1")
    assert [await chat(gateway, bob.key) for gateway in pair.both] == [200, 200]


async def test_a_key_revoked_through_one_gateways_admin_api_is_refused_by_the_other(pair: Pair) -> None:
    async with store_of(pair.a) as db:
        ann = await account(db, pair.a, "ann@example.com", "1")
        key_id = (await accounts.list_keys(db))[0].id
    assert await chat(pair.b, ann.key) == 200  # B has just cached the key: its cache alone would serve ~1 s more
    status, _, raw = await request(pair.a, "POST", f"/admin/keys/{key_id}/revoke", key=ADMIN_KEY)
    assert status == 200, raw
    assert await chat(pair.a, ann.key) == 401
    await refused_within(pair.b, ann.key, 401, PROMISED_SECONDS)


async def test_the_cli_revokes_and_suspends_on_every_gateway_at_once(pair: Pair) -> None:
    async with store_of(pair.a) as db:
        ann = await account(db, pair.a, "ann@example.com", "1")
        bob = await account(db, pair.a, "bob@example.com", "1")
        ann_key = (await accounts.list_keys(db, "ann@example.com"))[0].id

    def cli(*args: str) -> None:
        result = CliRunner().invoke(cli_app, [*args, "--config", str(pair.a.config_path)])
        assert result.exit_code == 0, result.output

    for gateway in pair.both:
        assert await chat(gateway, ann.key) == 200
    await asyncio.to_thread(cli, "keys", "revoke", str(ann_key))
    for gateway in pair.both:
        await refused_within(gateway, ann.key, 401, PROMISED_SECONDS)

    for gateway in pair.both:
        assert await chat(gateway, bob.key) == 200
    await asyncio.to_thread(cli, "users", "suspend", "bob@example.com", "--reason", "unpaid")
    for gateway in pair.both:
        await refused_within(gateway, bob.key, 403, PROMISED_SECONDS)


async def test_both_gateways_say_redis_is_up(pair: Pair) -> None:
    for gateway in pair.both:
        status, _, raw = await request(gateway, "GET", "/metrics")
        assert status == 200
        lines = raw.decode().splitlines()
        assert "apibox_redis_up 1.0" in lines
        assert "apibox_redis_fallbacks_total 0.0" in lines


async def test_without_redis_there_is_no_redis_gauge(live: Live) -> None:
    status, _, raw = await request(live, "GET", "/metrics")
    assert status == 200 and b"apibox_redis" not in raw
