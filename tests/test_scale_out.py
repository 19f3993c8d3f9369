"""Issue 6's promise, on the real thing: two `apibox serve` processes (two hosts' worth, each on
its own port) on one PostgreSQL database and one Redis.

Loaded together against one small balance they never overdraw it and the books balance; a key
revoked through one gateway's admin API is refused by the other within a second; one user's
rate limit holds across both; a config reload announced by the CLI reaches both.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import pytest
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from tests.conftest import PostgresDatabase, write_config
from tests.fake_upstream import FakeUpstream
from tests.serve_helpers import add_model, assert_books, db_check, make_keys, serve_process, slow_upstream

ADMIN_KEY = "admin-secret-for-scale-out-tests"
USER_RPM = 6


@pytest.fixture
def shared(tmp_path: Path, postgres_database: PostgresDatabase, redis_url: str) -> Iterator[tuple[Path, str]]:
    """A config on a fresh PostgreSQL database and a Redis prefix of its own, with the fake upstream
    (its answers take 0.2 s, so requests overlap); yields (config, database URL)."""
    name, database_url = postgres_database.create()
    with slow_upstream(FakeUpstream(delay=0.2)) as upstream:
        config = write_config(tmp_path, database_url, upstream)
        with config.open("a") as extra:
            extra.write(f"server: {{admin_key: {ADMIN_KEY}}}\n"
                        f"redis: {{url: '{redis_url}', prefix: 't{uuid.uuid4().hex[:12]}'}}\n"
                        f"limits: {{user: {{rpm: {USER_RPM}}}}}\n")
        yield config, database_url
    postgres_database.drop(name)


@contextmanager
def gateway(config: Path, directory: Path) -> Iterator[str]:
    """One `apibox serve` process on its own port until the block ends (then it must stop cleanly)."""
    with serve_process(config, directory) as running:
        yield running.url
        running.process.terminate()
        assert running.process.wait(timeout=30) == 0, running.log.read_text()


@contextmanager
def two_gateways(config: Path, directory: Path) -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        yield stack.enter_context(gateway(config, directory)), stack.enter_context(gateway(config, directory))


async def chat(session: aiohttp.ClientSession, url: str, key: str, model: str = "gpt-fake") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
    async with session.post(f"{url}/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        await response.read()
        return response.status


def test_two_gateways_never_overdraw_one_small_balance(shared: tuple[Path, str], tmp_path: Path) -> None:
    config, database_url = shared
    # Enough for about 15 of these requests; 120 arrive at once, split between the two gateways, from
    # 20 users' worth of connections but one account (its rate limit is per user: raise it out of the way).
    config.write_text(config.read_text().replace(f"rpm: {USER_RPM}", "rpm: 100000"))
    (key,) = asyncio.run(make_keys(config, {"small@example.com": "0.005"}))
    with two_gateways(config, tmp_path) as urls:
        async def load() -> list[int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                return await asyncio.gather(*(chat(session, urls[i % 2], key) for i in range(120)))
        statuses = asyncio.run(load())
    assert set(statuses) <= {200, 402}, statuses
    assert 0 < statuses.count(200) < 120 and statuses.count(402) > 0
    topped_up = 5_000
    assert_books(database_url, topped_up)
    db_check(config, tmp_path)


def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_within_a_second(
        shared: tuple[Path, str], tmp_path: Path) -> None:
    config, _ = shared
    (key,) = asyncio.run(make_keys(config, {"ann@example.com": "5"}))
    with two_gateways(config, tmp_path) as (first, second):
        async def revoke_and_watch() -> float:
            async with aiohttp.ClientSession() as session:
                assert await chat(session, second, key) == 200  # the second gateway has the key cached
                admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
                async with session.get(f"{first}/admin/keys", headers=admin) as response:
                    key_id = (await response.json())[0]["id"]
                async with session.post(f"{first}/admin/keys/{key_id}/revoke", headers=admin) as response:
                    assert response.status == 200, await response.text()
                revoked = time.monotonic()
                while await chat(session, second, key) != 401:
                    assert time.monotonic() - revoked < 1.0, "the other gateway still accepts the revoked key"
                return time.monotonic() - revoked
        assert asyncio.run(revoke_and_watch()) < 1.0


def test_one_users_rate_limit_holds_across_both_gateways(shared: tuple[Path, str], tmp_path: Path) -> None:
    config, _ = shared
    keys = asyncio.run(make_keys(config, {"ann@example.com": "5"}))
    with two_gateways(config, tmp_path) as urls:
        async def burst() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [await chat(session, urls[i % 2], keys[0]) for i in range(2 * USER_RPM)]
        statuses = asyncio.run(burst())
    assert statuses.count(200) == USER_RPM, statuses  # not USER_RPM on each gateway
    assert statuses.count(429) == USER_RPM


def test_config_reload_through_redis_reaches_both_gateways(shared: tuple[Path, str], tmp_path: Path) -> None:
    config, _ = shared
    (key,) = asyncio.run(make_keys(config, {"ann@example.com": "5"}))
    with two_gateways(config, tmp_path) as urls:
        async def statuses() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [await chat(session, url, key, model="gpt-new") for url in urls]
        assert asyncio.run(statuses()) == [404, 404]
        add_model(config)
        result = CliRunner().invoke(cli_app, ["config", "reload", "--config", str(config)])
        assert result.exit_code == 0, result.output
        told = time.monotonic()
        while asyncio.run(statuses()) != [200, 200]:
            assert time.monotonic() - told < 1.0, "a gateway did not reload within a second"
