"""The Gateway: everything a request handler needs, built once per server."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from apibox.auth import Authenticator
from apibox.config import Settings
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
