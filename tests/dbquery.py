"""Engine-neutral, synchronous SQL for tests that read or poke the database directly.

``query(url, sql, params)`` and ``execute(url, sql, params)`` take the store's URL
(``sqlite:///PATH`` or ``postgresql://...?search_path=SCHEMA``) and the SQL with ``?``
placeholders. On SQLite they use the sqlite3 module; on PostgreSQL, asyncpg on a private event
loop in a worker thread (so they also work from inside an async test), with ``?`` turned into
``$1..$n``. Rows are tuples that can also be read by column name (``row["amount"]``, ``dict(row)``);
``sum()`` and other numerics PostgreSQL returns as Decimal come back as int, as SQLite returns them.

Each call autocommits; on PostgreSQL they share one cached connection per URL (``forget(url)``
closes it, before its database is dropped). ``connect(url)`` opens a connection of its own for a
series of statements. Constraint and trigger violations raise the engine's own exception: catch ``INTEGRITY_ERRORS``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from apibox.store import sqlite_path

T = TypeVar("T")

# A CHECK, UNIQUE, NOT NULL or foreign key violation, or a trigger's RAISE, on either engine.
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError,
                                                 asyncpg.RaiseError)


def engine(url: str) -> str:
    """``sqlite`` or ``postgresql``."""
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith(("postgresql:", "postgres:")):
        return "postgresql"
    raise ValueError(f"not a database URL: {url!r}")


class Row(tuple):  # type: ignore[type-arg]
    """A result row: a tuple whose values can also be read by column name."""

    _names: tuple[str, ...]

    def __new__(cls, values: Sequence[Any], names: tuple[str, ...]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, item: Any) -> Any:  # type: ignore[override]
        if isinstance(item, str):
            return tuple.__getitem__(self, self._names.index(item))
        return tuple.__getitem__(self, item)

    def keys(self) -> tuple[str, ...]:
        return self._names


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def _row(values: Sequence[Any], names: tuple[str, ...]) -> Row:
    return Row([_plain(v) for v in values], names)


def postgres_sql(sql: str) -> str:
    """``?`` placeholders as ``$1..$n``, leaving quoted text, identifiers and comments alone."""
    out, n, i = [], 0, 0
    while i < len(sql):
        char = sql[i]
        if char in "'\"":
            end = i + 1
            while end < len(sql):
                if sql[end] == char:
                    if sql[end + 1:end + 2] == char:  # a doubled quote inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i:end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = len(sql) if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif char == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


# -- PostgreSQL: asyncpg on a private event loop ------------------------------------------------------


class _Loop:
    """One event loop in a daemon thread, for every asyncpg call of the process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        with self.lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="dbquery", daemon=True).start()
            loop = self.loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.submit(coroutine).result(timeout)


_LOOP = _Loop()


async def _pg_connect(url: str) -> asyncpg.Connection:
    # Query parameters asyncpg does not know (search_path) are sent as server settings.
    return await asyncpg.connect(url, timeout=30)


async def _pg_run(connection: asyncpg.Connection, sql: str, params: Sequence[Any]) -> list[Row]:
    returns_rows = sql.lstrip().upper().startswith(("SELECT", "WITH", "VALUES")) or " RETURNING " in sql.upper()
    if not params and not returns_rows:  # the simple protocol: several statements, DDL, function bodies
        await connection.execute(sql)
        return []
    records = await connection.fetch(postgres_sql(sql), *params)
    return [_row(tuple(r.values()), tuple(r.keys())) for r in records]


class _Cached:
    """A connection per URL for ``query`` and ``execute``, one statement at a time (used on the private loop)."""

    def __init__(self) -> None:
        self.locks: dict[str, asyncio.Lock] = {}
        self.connections: dict[str, asyncpg.Connection] = {}

    async def run(self, url: str, sql: str, params: Sequence[Any]) -> list[Row]:
        async with self.locks.setdefault(url, asyncio.Lock()):
            if url not in self.connections or self.connections[url].is_closed():
                self.connections[url] = await _pg_connect(url)
            return await _pg_run(self.connections[url], sql, params)

    async def forget(self, url: str) -> None:
        async with self.locks.setdefault(url, asyncio.Lock()):
            connection = self.connections.pop(url, None)
            if connection is not None:
                await connection.close()
        self.locks.pop(url, None)


_CACHED = _Cached()


# -- SQLite ------------------------------------------------------------------------------------------


def _sqlite_connect(url: str) -> sqlite3.Connection:
    connection = sqlite3.connect(sqlite_path(url), timeout=10, isolation_level=None)
    connection.execute("PRAGMA foreign_keys=ON")  # as PostgreSQL always does
    return connection


def _sqlite_run(connection: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Row]:
    cursor = connection.execute(sql, tuple(params)) if params or ";" not in sql.strip().rstrip(";") \
        else connection.executescript(sql)
    names = tuple(d[0] for d in cursor.description or ())
    return [_row(r, names) for r in cursor.fetchall()]


# -- the API -----------------------------------------------------------------------------------------


def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """The rows of one statement, in its own connection (and transaction)."""
    if engine(url) == "sqlite":
        connection = _sqlite_connect(url)
        try:
            return _sqlite_run(connection, sql, params)
        finally:
            connection.close()
    return _LOOP.run(_CACHED.run(url, sql, params))


def execute_soon(url: str, sql: str) -> Future[list[Row]]:
    """Start a PostgreSQL statement and return at once (its future has the outcome)."""
    assert engine(url) == "postgresql"
    return _LOOP.submit(_CACHED.run(url, sql, ()))


def forget(url: str) -> None:
    """Close the cached PostgreSQL connection to ``url``, if any."""
    if engine(url) == "postgresql" and url in _CACHED.connections:
        _LOOP.run(_CACHED.forget(url))


def execute(url: str, sql: str, params: Sequence[Any] = ()) -> None:
    """Run one statement and commit (without params, a script of several statements)."""
    query(url, sql, params)


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the private loop and wait for it: works from sync code and from inside
    another running loop alike."""
    return _LOOP.run(coroutine)


class Connection:
    """One connection for several statements, each committed as it runs; ``with connect(url) as db``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite = _sqlite_connect(url) if engine(url) == "sqlite" else None
        self._pg = None if self._sqlite else _LOOP.run(_pg_connect(url))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        if self._sqlite is not None:
            return Result(_sqlite_run(self._sqlite, sql, params))
        return Result(_LOOP.run(_pg_run(self._pg, sql, params)))

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        elif self._pg is not None:
            _LOOP.run(self._pg.close())
            self._pg = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Result:
    """Rows as a cursor hands them out: iterate, ``fetchone()``, ``fetchall()``."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return list(self.rows)


def connect(url: str) -> Connection:
    return Connection(url)


def tables(url: str) -> set[str]:
    """The tables in the database (on PostgreSQL: in the connection's current schema); none if it does not exist yet."""
    if engine(url) == "sqlite":
        try:
            connection = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            return set()
        try:
            return {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    return {r[0] for r in query(url, "SELECT table_name FROM information_schema.tables "
                                     "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")}
