"""The SQLite engine (the default): WAL, foreign keys, a busy timeout, CHECK-guarded money.

Writes run as transaction scripts on the event loop's thread (``SqliteWriter``: whole
transactions, group commits, never a wait for a lock or a disk sync); reads go through one
aiosqlite connection, which WAL lets read while the writer writes. Several processes
(``serve --workers``) may share the file: SQLite's own locking serializes their write
transactions, and the writer retries a refused lock on a timer until it is its turn.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from apibox.errors import StoreError
from apibox.models import Hold, UsageRecord
from apibox.store.copying import Table
from apibox.store.migrations import MIGRATIONS, Migration
from apibox.store.script import Row, Script, Want, drive, unless_refused
from apibox.store.sql_store import SqlStore
from apibox.store.sqlite_writer import SqliteWriter
from apibox.store.sqltime import now_ms

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA foreign_keys=ON",
           "PRAGMA busy_timeout=10000")
# The hold of a key without a budget (SqliteStore.hold): the holds_take trigger raises balances.held,
# and balances' CHECK (held <= balance) refuses the hold when the available balance does not cover it.
HOLD_VALUES_SQL = ("INSERT INTO holds (user_id, key_id, amount, request_id, model, created_at, instance) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")
T = TypeVar("T")


def run_script(cursor: sqlite3.Cursor, script: Script[T]) -> T:
    """Drive a transaction script on the writer's cursor (inside the writer's transaction)."""

    def execute(sql: str, params: Sequence[Any], want: Want | None = None) -> list[Row]:
        cursor.execute(sql, params)
        if want is None:
            return cursor.fetchall()
        if want is Want.COUNT:
            return [(cursor.rowcount,)]
        return [(cursor.lastrowid,)] if cursor.rowcount > 0 else []
    return drive(script, execute, (sqlite3.IntegrityError,))


def _create_private(path: str) -> None:
    """A new database file readable by its owner alone: it holds emails, balances and key hashes.
    SQLite gives its journal files the database file's permissions; an existing file keeps its own."""
    with contextlib.suppress(OSError):  # there already; or no such directory, not writable: SQLite's open says so
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _why_not_writable(path: str) -> str:
    """What SQLite's "unable to open database file" leaves unsaid, when it can be told."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f" (there is no directory {folder})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f" ({path} is read-only)"
    if not os.access(folder, os.W_OK):
        return f" ({folder} is read-only, and SQLite writes its journal beside the file)"
    return ""


class SqliteStore(SqlStore):
    """The Store protocol on one SQLite file."""

    def __init__(self, writer: SqliteWriter, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        # This process's requests between the start of their hold and the end of their settlement:
        # holds being taken, and the ids of those taken. With one request (or none) nothing else
        # could queue a transaction for the writer's next group, so it commits at once, without
        # waiting a pass of the loop for company.
        self._taking = 0
        self._held: set[int] = set()
        writer.alone = lambda: self._taking + len(self._held) <= 1

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        if path == ":memory:":
            raise StoreError("an in-memory SQLite database cannot be shared by the reader and the writer; "
                             "use a file (sqlite:///./apibox.db)")
        _create_private(path)
        writer = SqliteWriter(path, PRAGMAS)
        try:
            await writer.open()
        except sqlite3.Error as exc:
            await writer.close()
            raise StoreError(f"cannot open the SQLite database {path}: {exc}{_why_not_writable(path)}") from None
        return cls(writer, await _connect(path))

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    async def _run(self, script: Callable[[], Script[T]], *, durable: bool = True) -> T:
        # every commit is as durable as synchronous=NORMAL in WAL mode makes it: safe from a crash of
        # the process, not from a power cut, whatever ``durable`` says
        return await self._writer.transaction(lambda db: run_script(db, script()))

    async def _run_to_the_end(self, script: Callable[[], Script[T]]) -> T:
        # the writer commits a kept transaction whether or not its caller still waits, and closes
        # only once it has
        return await self._writer.transaction(lambda db: run_script(db, script()), keep=True)

    async def hold(self, user_id: int, key_id: int, amount: int, request_id: str, model: str, *,
                   budgeted: bool = True) -> Hold | None:
        self._taking += 1
        try:
            if budgeted:
                hold = await super().hold(user_id, key_id, amount, request_id, model)
            else:
                # Without a budget to check, the hold needs no INSERT ... SELECT, which SQLite runs through
                # a temporary b-tree when the table has a trigger: 48k instructions against 21k (callgrind).
                params = (user_id, key_id, amount, request_id, model, now_ms(), self._instance)
                rows = await self._run(lambda: unless_refused(HOLD_VALUES_SQL, params, Want.NEW_ID), durable=False)
                hold = Hold(rows[0][0], user_id, key_id, amount, request_id, budgeted=False) if rows else None
        finally:
            self._taking -= 1
        if hold is not None:
            self._held.add(hold.id)
        return hold

    async def settle(self, hold: Hold, usage: UsageRecord) -> UsageRecord:
        try:
            return await super().settle(hold, usage)
        finally:
            self._held.discard(hold.id)

    @staticmethod
    def _concat(column: str) -> str:
        return f"group_concat({column})"

    async def _import_rows(self, batches: AsyncIterator[tuple[Table, list[Row]]]) -> None:
        async def inserts() -> AsyncIterator[tuple[str, list[Row]]]:
            async for table, rows in batches:
                yield (f"INSERT INTO {table.name} ({', '.join(table.columns)}) "
                       f"VALUES ({', '.join('?' * len(table.columns))})", rows)
        try:
            await self._writer.bulk(inserts())
        except sqlite3.Error as exc:
            raise StoreError(f"the copy failed and the target was rolled back (it is empty again): {exc}") from exc

    # -- schema --------------------------------------------------------------------------

    async def _applied(self) -> set[str]:
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS _apibox_migrations (name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)")
        rows = await self._writer.execute("SELECT name FROM _apibox_migrations")
        return {str(row[0]) for row in rows}

    async def pending_migrations(self) -> list[str]:
        applied = await self._applied()
        return [m.name for m in MIGRATIONS if m.name not in applied]

    async def migrate(self) -> list[str]:
        done: list[str] = []
        applied = await self._applied()
        for migration in MIGRATIONS:
            if migration.name in applied:
                continue

            def apply(db: sqlite3.Cursor, migration: Migration = migration) -> bool:
                if db.execute("SELECT 1 FROM _apibox_migrations WHERE name = ?", (migration.name,)).fetchall():
                    return False  # another process applied it since we looked
                try:
                    for statement in _statements(migration.sqlite):
                        db.execute(statement)
                except sqlite3.Error as exc:
                    raise StoreError(f"migration {migration.name} failed and was rolled back: {exc}") from exc
                db.execute("INSERT INTO _apibox_migrations (name, applied_at) VALUES (?, ?)",
                           (migration.name, now_ms()))
                return True
            if await self._writer.transaction(apply):
                done.append(migration.name)
        return done


async def _connect(path: str) -> aiosqlite.Connection:
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the SQLite database {path}: {exc}") from None
    for pragma in PRAGMAS:
        await db.execute(pragma)
    # Reports sort up to millions of rows (GROUP BY): let SQLite's sorter use helper threads.
    await db.execute(f"PRAGMA threads = {min(4, os.cpu_count() or 1)}")
    return db


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    return statements
