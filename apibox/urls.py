"""What may be shown of a URL or a secret, and what is wrong with a Redis URL, said before
anything connects. Pure: used by the config parser, `config check` and every log line that
names a database or a Redis."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, said before anything tries to connect (None: nothing)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock"
    problem = _address_problem(parts, "redis://127.0.0.1:6379/0")
    if problem is not None:
        return problem
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return "the database after the host must be a number, e.g. /0"
    return None


def proxy_url_problem(url: str) -> str | None:
    """What is wrong with an HTTP proxy's URL, http://[user:password@]host:port (None: nothing)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// proxy URL (SOCKS proxies are not supported)"
    problem = _address_problem(parts, "http://proxy.internal:3128")
    if problem is not None:
        return problem
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "is the proxy's address alone, with nothing after host:port"
    return None


def _address_problem(parts: SplitResult, example: str) -> str | None:
    """What is wrong with a URL's host and port (None: nothing)."""
    try:
        parts.port  # noqa: B018 (it raises for a port that is not one)
    except ValueError:
        return "the port must be a number from 0 to 65535"
    if not parts.hostname:
        return f"needs a host, e.g. {example}"
    return None


def masked(secret: str | None) -> str | None:
    """How `config check` shows a secret: whether it is set, never any of its characters."""
    return "****" if secret else None


_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^:@/]*):[^@]*@")


def masked_url(url: str) -> str:
    """A URL with any password in it replaced: ``postgresql://u:pw@h/db`` -> ``postgresql://u:****@h/db``."""
    return _URL_PASSWORD.sub(r"\1:****@", url)
