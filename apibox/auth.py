"""API key authentication with a short-lived in-memory cache.

A key lookup is served from memory for at most ``ttl`` seconds, so a revoked key or a
suspended user is refused within that time without a database read on every request.
``invalidate`` forgets entries sooner, when a change is announced (``apibox.bus``).
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from apibox.errors import InvalidApiKey, PermissionDenied
from apibox.keys import hash_key, looks_like_key
from apibox.limits import FailedAuthLimiter
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


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str]) -> str:
    """The caller's address: the peer, or the last hop of X-Forwarded-For that is not a trusted proxy
    (the header is believed only when the peer itself is a trusted proxy)."""
    address = peer or ""
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies]

    def trusted(candidate: str) -> bool:
        try:
            ip = ipaddress.ip_address(candidate)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if forwarded_for and trusted(address):
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            address = hop
            if not trusted(hop):
                break
    return address


def address_allowed(address: str, allowed: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(cidr, strict=False) for cidr in allowed)


class Authenticator:
    def __init__(self, store: Store, ttl: float | None = None,
                 failures: FailedAuthLimiter | None = None) -> None:
        self._store = store
        # CACHE_TTL_SECONDS as it is when the gateway starts: a test lengthens it to tell an
        # invalidation that came over Redis from an entry that expired
        self._ttl = CACHE_TTL_SECONDS if ttl is None else ttl
        self._cache: dict[str, tuple[float, tuple[ApiKey, User] | None]] = {}
        self._failures = failures or FailedAuthLimiter()
        self._generation = 0  # moves on every invalidation: a lookup read before one is not kept

    async def authenticate(self, secret: str | None, address: str = "") -> Caller:
        """The caller behind ``secret`` calling from ``address``, or the 401/403/429 that says why not.

        An address that keeps presenting bad keys is refused with 429 before any lookup."""
        self._failures.check(address)
        try:
            caller = await self._identify(secret)
        except InvalidApiKey:
            self._failures.failed(address)
            raise
        if caller.key.allow_ips and not address_allowed(address, caller.key.allow_ips):
            raise PermissionDenied(f"Your address {address or 'unknown'} is not allowed to use this API key.",
                                   code="ip_not_allowed")
        return caller

    def check_secret(self, given: str, expected: str, address: str) -> bool:
        """A constant-time comparison for other secrets (the admin key), under the same guessing lockout."""
        self._failures.check(address)
        ok = hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))
        if not ok:
            self._failures.failed(address)
        return ok

    async def _identify(self, secret: str | None) -> Caller:
        if not secret:
            raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
                                "(Anthropic clients: 'x-api-key: YOUR_KEY').")
        if not looks_like_key(secret):
            raise InvalidApiKey("Incorrect API key provided. You can get a key from your apibox operator.")
        found = await self._lookup(hash_key(secret))
        if found is None:
            raise InvalidApiKey("Incorrect API key provided. You can get a key from your apibox operator.")
        key, user = found
        if user.state != UserState.ACTIVE:  # first: closing an account also revokes its keys, and says so
            reason = f" ({user.state_reason})" if user.state_reason else ""
            raise PermissionDenied(f"{STATE_MESSAGES[user.state]}{reason}; contact your apibox operator.",
                                   code=f"account_{user.state.value}")
        if key.revoked_at is not None:
            raise InvalidApiKey("This API key has been revoked. Ask your apibox operator for a new one.")
        if key.is_expired(datetime.now(UTC)):
            raise InvalidApiKey("This API key has expired. Ask your apibox operator for a new one.")
        return Caller(key, user)

    async def _lookup(self, key_hash: str) -> tuple[ApiKey, User] | None:
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        found = await self._store.find_key_by_hash(key_hash)
        if generation != self._generation:
            return found  # a change was announced while it was read: use it once, keep nothing that may be stale
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[key_hash] = (now + self._ttl, found)
        return found

    def invalidate(self, *, key_id: int | None = None, user_id: int | None = None) -> None:
        """Forget the cached lookups of one key, of every key of one user, or (neither given) all of them."""
        self._generation += 1
        if key_id is None and user_id is None:
            self._cache.clear()
            return
        stale = [key_hash for key_hash, (_, found) in self._cache.items()
                 if found is not None and (found[0].id == key_id or found[1].id == user_id)]
        for key_hash in stale:
            del self._cache[key_hash]
