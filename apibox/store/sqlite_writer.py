"""The SQLite write connection: one thread, one whole transaction per hop.

aiosqlite sends each statement to its thread and back, so a settlement of eight statements
costs eight hops. Here a transaction is a plain function that runs start to end in the
writer's own thread (``concurrent.futures`` with one worker), so it costs one hop, and the
single worker also serializes every write. Reads stay on aiosqlite connections.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")


class SqliteWriter:
    def __init__(self, path: str, pragmas: tuple[str, ...]) -> None:
        self._path = path
        self._pragmas = pragmas
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apibox-sqlite-writer")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.run(self._connect)

    def _connect(self) -> None:
        # check_same_thread=False only because close() may run on another thread; every use
        # of the connection happens on the single writer thread.
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        for pragma in self._pragmas:
            self._db.execute(pragma)

    async def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body(db)`` inside BEGIN IMMEDIATE ... COMMIT, rolled back if it raises; one hop."""
        return await self.run(partial(self._in_transaction, body))

    def _in_transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """One autocommitted statement (atomic on its own), returning any RETURNING rows."""
        return await self.run(lambda: self._connection().execute(sql, params).fetchall())

    def _connection(self) -> sqlite3.Connection:
        assert self._db is not None, "the writer is not open"
        return self._db

    async def close(self) -> None:
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
