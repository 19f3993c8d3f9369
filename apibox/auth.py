"""API key authentication with a short-lived in-memory cache.

A key lookup is served from memory for at most ``ttl`` seconds, so a revoked key or a
suspended user is refused within that time without a database read on every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from apibox.errors import InvalidApiKey, PermissionDenied
from apibox.keys import hash_key, looks_like_key
from apibox.models import ApiKey, User, UserState
from apibox.store.base import Store

CACHE_TTL_SECONDS = 1.0
CACHE_MAX_ENTRIES = 100_000

STATE_MESSAGES = {
    UserState.SUSPENDED: "Your account is suspended",
    UserState.BANNED: "Your account is banned",
    UserState.CLOSED: "Your account is closed",
}


@dataclass(frozen=True, slots=True)
class Caller:
    key: ApiKey
    user: User


class Authenticator:
    def __init__(self, store: Store, ttl: float = CACHE_TTL_SECONDS) -> None:
        self._store = store
        self._ttl = ttl
        self._cache: dict[str, tuple[float, tuple[ApiKey, User] | None]] = {}

    async def authenticate(self, secret: str | None) -> Caller:
        """The caller behind ``secret``, or the 401/403 that explains why not."""
        if not secret:
            raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        if not looks_like_key(secret):
            raise InvalidApiKey("Incorrect API key provided. You can get a key from your apibox operator.")
        found = await self._lookup(hash_key(secret))
        if found is None:
            raise InvalidApiKey("Incorrect API key provided. You can get a key from your apibox operator.")
        key, user = found
        if key.revoked_at is not None:
            raise InvalidApiKey("This API key has been revoked. Ask your apibox operator for a new one.")
        if key.is_expired(datetime.now(UTC)):
            raise InvalidApiKey("This API key has expired. Ask your apibox operator for a new one.")
        if user.state != UserState.ACTIVE:
            reason = f" ({user.state_reason})" if user.state_reason else ""
            raise PermissionDenied(f"{STATE_MESSAGES[user.state]}{reason}; contact your apibox operator.",
                                   code=f"account_{user.state.value}")
        return Caller(key, user)

    async def _lookup(self, key_hash: str) -> tuple[ApiKey, User] | None:
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._store.find_key_by_hash(key_hash)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[key_hash] = (now + self._ttl, found)
        return found
