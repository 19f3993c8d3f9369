"""Telling running gateways that a key or a user changed, so they drop their cached copies at once.

A ``Change`` names a key, a user, or everything. The use-cases that change keys and users
(``apibox.accounts``) announce it through a ``Notifier``:

- the CLI's is ``publisher(settings)``: with ``redis:`` configured it publishes the change on
  the ``<prefix>:invalidate`` channel; without, it does nothing;
- a gateway's (its admin API) is a ``GatewayNotifier``: its own cache forgets at once, and with
  Redis the change is published for the other instances.

Every gateway with Redis runs a ``Subscriber`` that applies what it hears to its
``Authenticator``. Correctness never depends on it: the cache keeps its 1 s lifetime, so a
change missed while Redis was away still shows within a second, and a subscriber that comes
back forgets everything it may have missed.

Redis is imported only when a change is really published, so CLI commands stay quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from apibox.errors import ConfigError

if TYPE_CHECKING:
    from apibox.auth import Authenticator
    from apibox.redis_link import RedisLink
    from apibox.settings import RedisSettings, Settings

log = logging.getLogger("apibox.bus")

CHANNEL = "invalidate"
CLI_TIMEOUT_SECONDS = 2.0  # a command may wait a little longer than a request for Redis


@dataclass(frozen=True, slots=True)
class Change:
    """What changed: one key, every key of one user, or (neither given) everything; or, with
    ``config``, the config files (every gateway reloads its own)."""

    key_id: int | None = None
    user_id: int | None = None
    config: bool = False

    def encode(self) -> str:
        if self.config:
            return json.dumps({"config": True})
        return json.dumps({"key_id": self.key_id, "user_id": self.user_id})

    @classmethod
    def decode(cls, text: str | bytes) -> Change:
        """The change a message announces; a message that cannot be read means everything (the safe side)."""
        try:
            data = json.loads(text)
            key_id, user_id = data.get("key_id"), data.get("user_id")
            if data.get("config") is True:
                return cls(config=True)
        except (ValueError, TypeError, AttributeError):
            return cls()
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (key_id, user_id)):
            return cls()
        return cls(key_id, user_id)

    def apply(self, auth: Authenticator) -> None:
        if not self.config:
            auth.invalidate(key_id=self.key_id, user_id=self.user_id)


class Notifier(Protocol):
    async def changed(self, change: Change) -> None: ...


class NoNotifier:
    """Without Redis a command has no one to tell: the gateways' 1 s cache catches up by itself."""

    async def changed(self, change: Change) -> None:
        return None


NO_NOTIFIER = NoNotifier()


def channel(prefix: str) -> str:
    return f"{prefix}:{CHANNEL}"


class RedisPublisher:
    """Publishes each change with a connection of its own (a CLI command makes one or two)."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings

    async def changed(self, change: Change) -> None:
        from apibox.redis_link import REDIS_ERRORS, connect, describe

        client = connect(self._settings, timeout=max(self._settings.timeout, CLI_TIMEOUT_SECONDS))
        try:
            async with asyncio.timeout(CLI_TIMEOUT_SECONDS * 2):
                await client.publish(channel(self._settings.prefix), change.encode())
        except REDIS_ERRORS as exc:
            if change.config:  # nothing else would tell the gateways: say so
                raise ConfigError(f"could not reach redis ({describe(exc)}), so no gateway was told to reload; "
                                  "try again, or send each gateway SIGHUP") from None
            # a key or user change is written: gateways see it within a second anyway
            log.warning("could not tell running gateways through redis (%s); they will notice within a second",
                        describe(exc))
        finally:
            await client.aclose()


def publisher(settings: Settings) -> Notifier:
    """The notifier for commands run outside the gateway (the CLI)."""
    return RedisPublisher(settings.redis) if settings.redis is not None else NO_NOTIFIER


class GatewayNotifier:
    """A gateway's own notifier (its admin API): this instance forgets at once, the others through Redis."""

    def __init__(self, auth: Authenticator, link: RedisLink | None = None) -> None:
        self._auth, self._link = auth, link

    async def changed(self, change: Change) -> None:
        change.apply(self._auth)
        link = self._link
        if link is None or not link.up:  # away: the others' 1 s cache has to do
            return
        from apibox.redis_link import REDIS_ERRORS, describe

        try:
            await link.call(link.client.publish(channel(link.settings.prefix), change.encode()))
        except REDIS_ERRORS as exc:
            log.warning("could not tell other gateways through redis (%s); they will notice within a second",
                        describe(exc))
            link.failed(exc)


class Subscriber:
    """Listens on the invalidation channel and applies every change to this gateway's ``Authenticator``
    (and a config change by calling ``on_config``)."""

    def __init__(self, link: RedisLink, auth: Authenticator, *, poll_seconds: float = 1.0,
                 on_config: Callable[[], None] | None = None) -> None:
        self._link, self._auth = link, auth
        self._on_config = on_config
        self._poll = poll_seconds
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.received = 0  # changes applied, for tests and curiosity

    async def start(self, wait_seconds: float = 2.0) -> None:
        """Start listening; wait (a little) until subscribed, so a gateway that says it is ready hears changes."""
        self._task = asyncio.create_task(self._run(), name="apibox-redis-subscriber")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await self._listening.wait()

    async def close(self) -> None:
        from apibox.redis_link import stop_task

        if self._task is not None:
            await stop_task(self._task)

    async def _run(self) -> None:
        from apibox.redis_link import REDIS_ERRORS

        missed = False  # after an outage, changes may have gone by unheard
        while True:
            pubsub = self._link.client.pubsub()
            try:
                await self._link.call(pubsub.subscribe(channel(self._link.settings.prefix)))
                if missed:
                    self._auth.invalidate()
                self._link.recovered()
                self._listening.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll)
                    if message is not None and message.get("type") == "message":
                        self._apply(message["data"])
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
                missed = True
                self._listening.clear()
            except Exception:  # a bug here must not stop the listening for good
                log.exception("the invalidation subscriber failed; subscribing again")
                missed = True
                self._listening.clear()
            finally:
                await _close_quietly(pubsub)
            await asyncio.sleep(self._link.retry_seconds)

    def _apply(self, data: Any) -> None:
        change = Change.decode(data)
        change.apply(self._auth)
        if change.config and self._on_config is not None:
            self._on_config()
        self.received += 1


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
