"""What a gateway shares with the other instances: limits, and news of key and user changes.

Without ``redis:`` in the config, limits are kept in this process and the admin API's changes
reach only this process's cache at once (others within its 1 s lifetime). With it, limits live
in Redis and changes are published to every instance. Redis is imported only then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from apibox.auth import Authenticator
from apibox.bus import GatewayNotifier, Notifier
from apibox.config import Settings
from apibox.limits import LocalLimiter, RateLimiter
from apibox.metrics import Metrics, RedisInstruments


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Sharing:
    limiter: RateLimiter
    notifier: Notifier
    close: Callable[[], Awaitable[None]] = _nothing


async def open_sharing(settings: Settings, auth: Authenticator, metrics: Metrics,
                       on_config: Callable[[], None] | None = None) -> Sharing:
    """The limiter and notifier for this gateway; with Redis, connected and listening (or, if Redis does
    not answer yet, serving with local limits and retrying in the background). ``on_config`` is called
    when another instance or the CLI announces a config reload."""
    if settings.redis is None:
        return Sharing(LocalLimiter(), GatewayNotifier(auth))
    from apibox.bus import Subscriber
    from apibox.redis_limits import RedisLimiter
    from apibox.redis_link import RedisLink

    link = RedisLink(settings.redis, instruments=RedisInstruments(metrics.registry))
    limiter = RedisLimiter(link)
    subscriber = Subscriber(link, auth, on_config=on_config)
    await link.start()
    await subscriber.start(wait_seconds=2.0 if link.up else 0.0)

    async def close() -> None:
        await subscriber.close()
        await link.close()
    return Sharing(limiter, GatewayNotifier(auth, link), close)
