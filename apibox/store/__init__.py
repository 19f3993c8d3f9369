"""Persistence. The only package that speaks SQL; ``open_store(url)`` picks the engine."""

from __future__ import annotations

from pathlib import Path

from apibox.errors import ConfigError
from apibox.store.base import Store


async def open_store(url: str, *, migrate: bool = True, pool_size: int = 10) -> Store:
    """Open the database at ``url`` (``sqlite:///path`` or ``postgresql://...``) and bring its
    schema up to date. ``pool_size``: PostgreSQL connections this process may open."""
    store: Store
    if url.startswith("sqlite://"):
        from apibox.store.sqlite import SqliteStore

        store = await SqliteStore.open(sqlite_path(url))
    elif url.startswith(("postgresql://", "postgres://")):
        from apibox.store.postgres import PostgresStore

        store = await PostgresStore.open(url, pool_size)
    else:
        raise ConfigError(f"database.url: unsupported database {url.split(':', 1)[0]!r} "
                          "(use sqlite:///PATH or postgresql://USER@HOST/DB)")
    if migrate:
        await store.migrate()
    return store


def missing_sqlite_file(url: str) -> str | None:
    """The path of the SQLite file ``url`` names when there is no such file (None for PostgreSQL,
    or when it is there): opening it would make a new, empty database."""
    if not url.startswith("sqlite://"):
        return None
    path = sqlite_path(url)
    return None if Path(path).is_file() else path


def sqlite_path(url: str) -> str:
    """``sqlite:///./apibox.db`` -> ``./apibox.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    path = url.removeprefix("sqlite://")
    return path[1:] if path.startswith("/") else path
