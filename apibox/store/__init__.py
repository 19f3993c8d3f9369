"""Persistence. The only package that speaks SQL; ``open_store(url)`` picks the engine."""

from __future__ import annotations

from apibox.errors import ConfigError
from apibox.store.base import Store


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open the database at ``url`` (``sqlite:///path``) and bring its schema up to date."""
    if url.startswith("sqlite://"):
        from apibox.store.sqlite import SqliteStore

        store = await SqliteStore.open(sqlite_path(url))
    else:
        raise ConfigError(f"database.url: unsupported database {url.split(':', 1)[0]!r} (use sqlite:///PATH)")
    if migrate:
        await store.migrate()
    return store


def sqlite_path(url: str) -> str:
    """``sqlite:///./apibox.db`` -> ``./apibox.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    path = url.removeprefix("sqlite://")
    return path[1:] if path.startswith("/") else path
