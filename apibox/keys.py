"""API key generation and hashing (pure).

Keys are 256-bit random secrets, so a plain SHA-256 is the right hash: there is nothing to
brute-force, and lookups stay one indexed equality. Only the hash and a short display
prefix are ever stored.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-ab-"
DISPLAY_LENGTH = len(KEY_PREFIX) + 6


def generate_key() -> str:
    """A new secret key, e.g. ``sk-ab-3kT...`` (shown to the operator exactly once)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def display_prefix(secret: str) -> str:
    """What lists show so a person can tell keys apart: ``sk-ab-3kT9xQ...``."""
    return secret[:DISPLAY_LENGTH] + "..."


def looks_like_key(secret: str) -> bool:
    """Cheap shape check before any hashing or lookup."""
    return secret.startswith(KEY_PREFIX) and 20 <= len(secret) <= 200
