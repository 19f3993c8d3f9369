"""Invalidations: the Authenticator forgets a key, a user's keys or everything, and a change made
through one gateway (or the CLI) reaches every other gateway's cache through Redis pub/sub, well
within a second even when the cache would keep an entry for an hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apibox import accounts, bus
from apibox.auth import Authenticator
from apibox.bus import NO_NOTIFIER, Change, GatewayNotifier, RedisPublisher, Subscriber
from apibox.cli.main import app as cli_app
from apibox.config import load_settings
from apibox.errors import InvalidApiKey, PermissionDenied
from apibox.keys import hash_key
from apibox.models import ApiKey, User, UserState
from apibox.redis_link import RedisLink
from apibox.settings import RedisSettings
from apibox.store.base import Store
from tests.conftest import fund
from tests.redis_helpers import PrivateRedis, link_for, unique_prefix
from tests.waiting import eventually

HOUR = 3600.0
# A revoked key or suspended user is refused within this on every instance (DESIGN.md). The instances
# here cache for an hour, so any refusal within it came over Redis.
PROMISED_SECONDS = 1.0

# -- the message ------------------------------------------------------------------------------------------


def test_a_change_goes_over_the_wire_and_back() -> None:
    for change in (Change(key_id=12), Change(user_id=7), Change(), Change(key_id=1, user_id=2)):
        assert Change.decode(change.encode()) == change
        assert Change.decode(change.encode().encode()) == change


@pytest.mark.parametrize("garbage", ["", "not json", "[1, 2]", '{"key_id": "12"}', '{"user_id": true}',
                                     '{"key_id": 1.5}', "null"])
def test_a_message_that_cannot_be_read_means_everything(garbage: str) -> None:
    assert Change.decode(garbage) == Change()


# -- the Authenticator forgets --------------------------------------------------------------------------------


class FakeStore:
    """Just the lookup the Authenticator makes, counted; ``gate`` holds lookups until set."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[ApiKey, User]] = {}
        self.lookups = 0
        self.gate: asyncio.Event | None = None

    def add(self, secret: str, key_id: int, user_id: int) -> None:
        user = User(user_id, f"u{user_id}@example.com", "", "default", UserState.ACTIVE, "", datetime.now(UTC))
        self.rows[hash_key(secret)] = (ApiKey(key_id, user_id, "", "sk-ab-"), user)

    def revoke(self, secret: str) -> None:
        key, user = self.rows[hash_key(secret)]
        self.rows[hash_key(secret)] = (replace(key, revoked_at=datetime.now(UTC)), user)

    async def find_key_by_hash(self, key_hash: str) -> tuple[ApiKey, User] | None:
        self.lookups += 1
        row = self.rows.get(key_hash)  # read now, delivered when the gate opens
        if self.gate is not None:
            await self.gate.wait()
        return row


def secret(n: int) -> str:
    return "sk-ab-" + f"{n:02d}" * 24


@pytest.fixture
def fake_store() -> FakeStore:
    store = FakeStore()
    store.add(secret(1), key_id=1, user_id=10)
    store.add(secret(2), key_id=2, user_id=10)
    store.add(secret(3), key_id=3, user_id=20)
    return store


async def lookups_after_touching_all(auth: Authenticator, store: FakeStore) -> int:
    before = store.lookups
    for n in (1, 2, 3):
        await auth.authenticate(secret(n))
    return store.lookups - before


async def test_invalidate_forgets_one_key_one_users_keys_or_everything(fake_store: FakeStore) -> None:
    auth = Authenticator(fake_store, ttl=HOUR)  # type: ignore[arg-type]
    assert await lookups_after_touching_all(auth, fake_store) == 3
    assert await lookups_after_touching_all(auth, fake_store) == 0  # all cached
    auth.invalidate(key_id=2)
    assert await lookups_after_touching_all(auth, fake_store) == 1
    auth.invalidate(user_id=10)
    assert await lookups_after_touching_all(auth, fake_store) == 2
    auth.invalidate()
    assert await lookups_after_touching_all(auth, fake_store) == 3
    auth.invalidate(key_id=99, user_id=99)  # nothing of theirs is cached
    assert await lookups_after_touching_all(auth, fake_store) == 0


async def test_a_revoked_key_is_refused_right_after_its_invalidation(fake_store: FakeStore) -> None:
    auth = Authenticator(fake_store, ttl=HOUR)  # type: ignore[arg-type]
    await auth.authenticate(secret(1))
    fake_store.revoke(secret(1))
    await auth.authenticate(secret(1))  # the cache still says yes (for an hour)
    auth.invalidate(key_id=1)
    with pytest.raises(InvalidApiKey, match="revoked"):
        await auth.authenticate(secret(1))


async def test_a_lookup_overtaken_by_an_invalidation_is_not_kept(fake_store: FakeStore) -> None:
    """A read that began before the change may carry the old row: used once, never cached."""
    auth = Authenticator(fake_store, ttl=HOUR)  # type: ignore[arg-type]
    fake_store.gate = asyncio.Event()
    reading = asyncio.create_task(auth.authenticate(secret(1)))
    await asyncio.sleep(0.01)
    auth.invalidate(key_id=1)  # announced while the read is under way
    fake_store.revoke(secret(1))
    fake_store.gate.set()
    fake_store.gate = None
    await reading  # the old row: accepted this once
    with pytest.raises(InvalidApiKey, match="revoked"):
        await auth.authenticate(secret(1))


async def test_a_gateway_notifier_without_redis_clears_its_own_cache(fake_store: FakeStore) -> None:
    auth = Authenticator(fake_store, ttl=HOUR)  # type: ignore[arg-type]
    await auth.authenticate(secret(1))
    fake_store.revoke(secret(1))
    await GatewayNotifier(auth).changed(Change(key_id=1))
    with pytest.raises(InvalidApiKey, match="revoked"):
        await auth.authenticate(secret(1))


def test_the_cli_publishes_only_when_redis_is_configured(tmp_path: Path) -> None:
    plain = load_settings(None)
    assert bus.publisher(plain) is NO_NOTIFIER
    with_redis = replace(plain, redis=RedisSettings(url="redis://127.0.0.1:6379/0"))
    assert isinstance(bus.publisher(with_redis), RedisPublisher)


# -- across gateways, through Redis ------------------------------------------------------------------------------


class Instance:
    """One gateway's worth: an Authenticator with an hour-long cache, its link and its subscriber."""

    def __init__(self, store: Store, link: RedisLink) -> None:
        self.auth = Authenticator(store, ttl=HOUR)
        self.link = link
        self.subscriber = Subscriber(link, self.auth, poll_seconds=0.2)
        self.notifier = GatewayNotifier(self.auth, link)

    async def start(self) -> Instance:
        await self.link.start()
        await self.subscriber.start()
        return self

    async def close(self) -> None:
        await self.subscriber.close()
        await self.link.close()


@pytest.fixture
async def instances(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Instance] = []
    prefix = unique_prefix()

    async def make(store: Store, url: str = redis_url, **options: Any) -> Instance:
        instance = await Instance(store, link_for(url, prefix, **options)).start()
        made.append(instance)
        return instance
    yield make
    for instance in made:
        await instance.close()


async def refused_within(auth: Authenticator, secret_: str, expected: type[Exception], limit: float) -> float:
    """Seconds until ``auth`` refuses ``secret_`` (polled every 5 ms); fails the test after ``limit``."""
    started = time.monotonic()
    while True:
        try:
            await auth.authenticate(secret_)
        except expected:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise AssertionError(f"still accepted after {limit} s")
        await asyncio.sleep(0.005)


async def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_at_once(
        store: Store, config_path: Path, instances: Callable[..., Any]) -> None:
    settings = load_settings(str(config_path))
    key = await fund(store, settings, "ann@example.com", "1")
    one, other = await instances(store), await instances(store)
    for instance in (one, other):
        await instance.auth.authenticate(key)  # cached for an hour
    key_id = (await accounts.list_keys(store))[0].id
    await accounts.revoke_key(store, str(key_id), notify=one.notifier)
    with pytest.raises(InvalidApiKey):  # its own cache forgot before the call returned
        await one.auth.authenticate(key)
    await refused_within(other.auth, key, InvalidApiKey, PROMISED_SECONDS)
    assert other.subscriber.received == 1


async def test_the_cli_path_reaches_every_gateway(store: Store, config_path: Path,
                                                  instances: Callable[..., Any], redis_url: str) -> None:
    """What `apibox users suspend` does: a publisher with a connection of its own."""
    settings = load_settings(str(config_path))
    ann, bob = await fund(store, settings, "ann@example.com", "1"), await fund(store, settings, "bob@example.com", "1")
    gateways = [await instances(store), await instances(store)]
    for gateway in gateways:
        for key in (ann, bob):
            await gateway.auth.authenticate(key)
    prefix = gateways[0].link.settings.prefix
    await accounts.set_user_state(store, "ann@example.com", UserState.SUSPENDED, "unpaid",
                                  notify=RedisPublisher(RedisSettings(url=redis_url, prefix=prefix)))
    for gateway in gateways:
        await refused_within(gateway.auth, ann, PermissionDenied, PROMISED_SECONDS)
        await gateway.auth.authenticate(bob)  # another user's key is untouched


async def test_the_cli_command_publishes_to_running_gateways(store: Store, config_path: Path,
                                                             instances: Callable[..., Any], redis_url: str) -> None:
    settings = load_settings(str(config_path))
    key = await fund(store, settings, "ann@example.com", "1")
    gateway = await instances(store)
    await gateway.auth.authenticate(key)
    config_path.write_text(config_path.read_text() + f"\nredis: {{url: '{redis_url}', "
                                                     f"prefix: {gateway.link.settings.prefix}}}\n")
    key_id = (await accounts.list_keys(store))[0].id
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["keys", "revoke", str(key_id),
                                                                   "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    await refused_within(gateway.auth, key, InvalidApiKey, PROMISED_SECONDS)


async def test_a_change_published_while_redis_is_away_still_stands(store: Store, config_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(str(config_path))
    await fund(store, settings, "ann@example.com", "1")
    key_id = (await accounts.list_keys(store))[0].id
    caplog.set_level(logging.WARNING, logger="apibox.bus")
    nowhere = RedisPublisher(RedisSettings(url="redis://127.0.0.1:9/0"))  # nothing listens there
    revoked = await accounts.revoke_key(store, str(key_id), notify=nowhere)
    assert revoked.revoked_at is not None
    assert "could not tell running gateways through redis" in caplog.text


async def test_a_subscriber_back_from_an_outage_forgets_everything(tmp_path: Path, instances: Callable[..., Any],
                                                                  fake_store: FakeStore) -> None:
    """Changes made while it was away went by unheard: it forgets all it cached once it hears again."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        gateway = await instances(fake_store, url=server.url, retry=0.1)
        assert await lookups_after_touching_all(gateway.auth, fake_store) == 3
        server.kill()
        await eventually(lambda: not gateway.link.up, timeout=5)
        assert await lookups_after_touching_all(gateway.auth, fake_store) == 0  # still cached meanwhile
        server.start()
        await eventually(lambda: gateway.subscriber._listening.is_set(), timeout=5)
        assert await lookups_after_touching_all(gateway.auth, fake_store) == 3
        await gateway.link.client.publish(bus.channel(gateway.link.settings.prefix), Change(key_id=3).encode())
        await eventually(lambda: gateway.subscriber.received == 1, timeout=2)
        assert await lookups_after_touching_all(gateway.auth, fake_store) == 1
    finally:
        server.stop()
