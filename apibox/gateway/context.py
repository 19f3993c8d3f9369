"""The Gateway: everything a request handler needs, built once per server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from apibox.auth import Authenticator
from apibox.bus import NO_NOTIFIER, Notifier
from apibox.config import Settings
from apibox.deadlines import Deadlines
from apibox.limits import RateLimiter
from apibox.metrics import Metrics
from apibox.providers.base import Provider
from apibox.router import Router
from apibox.store.base import Store


@dataclass(slots=True)
class Gateway:
    settings: Settings
    store: Store
    session: aiohttp.ClientSession
    providers: dict[str, Provider]
    router: Router
    auth: Authenticator
    limiter: RateLimiter
    clock: Callable[[], datetime]  # when requests arrive, for price schedules (tests set their own)
    metrics: Metrics = field(default_factory=Metrics)  # the app's, from create_app
    notifier: Notifier = NO_NOTIFIER  # announces key and user changes made through the admin API
    # the server's, kept: asking asyncio for the running loop costs a getpid() system call each time
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    deadlines: Deadlines = field(default_factory=Deadlines)  # the streams' keep-alives, on one timer
    # True once the server stops taking requests and drains those in flight: a stream cancelled
    # after that, but not by its keep-alive finding the client gone, was cut by the drain's end
    stopping: bool = False
