"""The SQLite write connection: one thread, whole transactions, committed in groups.

aiosqlite sends each statement to its thread and back, so a settlement of eight statements
costs eight hops. Here a transaction is a plain function that runs start to end in the
writer's own thread (``concurrent.futures`` with one worker), which also serializes every
write. Transactions that queue up while the writer is busy go together in the next hop as
one group commit: each runs inside its own SAVEPOINT, so each is still all-or-nothing, and
each caller is answered only after the COMMIT that made its work durable. There is no
waiting window: a lone transaction is committed at once. Reads stay on aiosqlite.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class SqliteWriter:
    def __init__(self, path: str, pragmas: tuple[str, ...]) -> None:
        self._path = path
        self._pragmas = pragmas
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apibox-sqlite-writer")
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

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
        """Run ``body(db)`` all-or-nothing and return its result once it is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((body, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            try:
                outcomes = await self.run(partial(self._commit_group, [body for body, _ in group]))
            except Exception as exc:  # the COMMIT itself failed: nothing of the group happened
                outcomes = [(False, exc)] * len(group)
            for (_, future), (ok, value) in zip(group, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _commit_group(self, bodies: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        db = self._connection()
        outcomes: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for body in bodies:
                db.execute("SAVEPOINT one")
                try:
                    value = body(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO one")
                    db.execute("RELEASE one")
                    outcomes.append((False, exc))
                else:
                    db.execute("RELEASE one")
                    outcomes.append((True, value))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    async def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """One autocommitted statement (atomic on its own), returning any RETURNING rows."""
        return await self.run(lambda: self._connection().execute(sql, params).fetchall())

    async def bulk(self, batches: AsyncIterator[tuple[str, list[Sequence[Any]]]]) -> None:
        """Many ``executemany`` batches in one transaction, all or nothing (``db copy``). Nothing
        else may write meanwhile: the batches come from the event loop between hops."""
        db = self._connection()
        await self.run(lambda: db.execute("BEGIN IMMEDIATE"))
        try:
            async for sql, rows in batches:
                await self.run(partial(db.executemany, sql, rows))
            await self.run(lambda: db.execute("COMMIT"))
        except BaseException:
            await self.run(lambda: db.execute("ROLLBACK"))
            raise

    def _connection(self) -> sqlite3.Connection:
        assert self._db is not None, "the writer is not open"
        return self._db

    async def close(self) -> None:
        if self._drainer is not None:
            await self._drainer
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
