"""The SQLite write connection: whole transactions on the event loop's thread, committed in groups.

A hold or a settlement is a few dozen microseconds of SQLite work. Sending it to a thread and
back cost more than the work itself (two thread wake-ups and the GIL passed back and forth for
every statement) and was most of the latency a request added. So a transaction runs on the
loop's own thread, and the two ways SQLite could block a thread are taken away:

- **Lock waits.** The connection's busy timeout is 0: when another process (a second worker,
  the CLI) holds the write lock, ``BEGIN IMMEDIATE`` fails at once and the group is tried again
  from a timer a little later, up to ``LOCK_WAIT_SECONDS``; the loop serves meanwhile.
- **Disk syncs.** In WAL mode with ``synchronous=NORMAL`` a commit appends to the WAL without
  fsync; only a checkpoint syncs. The connection's automatic checkpoints are off and a
  checkpointer thread with its own connection copies the WAL back once it has grown past
  ``CHECKPOINT_BYTES``; a wound-back WAL file keeps its size, so from then on that is every
  ``CHECKPOINT_EVERY_GROUPS`` group commits (truncating the file at each wind-back, for fewer
  and bigger checkpoints, made the slowest requests slower: measured at one connection).
  Commits go on while a checkpoint runs, although the frames they add keep the WAL from
  winding back after it (it grows until a checkpoint runs with no commit meanwhile); once a
  checkpoint has left ``CHECKPOINT_WAIT_FACTOR`` times ``CHECKPOINT_BYTES`` in the WAL, the next
  group waits for one (the loop does not) in RESTART mode, which holds other processes' writers
  off too (``serve --workers``: another worker's commits kept a WAL from ever winding back, to
  over 100 MB) and copies it all. Waiting for every checkpoint, with its two disk syncs, stalled
  one request in thirty at one connection.

A transaction is queued, and the group commit comes a pass of the loop later; while each pass
brings more transactions (requests arriving together), it waits one pass more, up to ``GROUP_MAX``.
After a group of more than one (the gateway is busy) it waits a second pass even when the first
brought nothing: the pass it waits for begins with it, before the requests that pass's I/O woke,
whose transactions then queue behind it (at 16 connections: groups of 15.6 transactions instead
of 12, and 8% less CPU a request). After a lone group (one request at a time) a lone
transaction is committed at the first pass: no other is coming. When its caller knows that no
other work in flight could queue one (``alone``, which the store answers from the requests
between their hold and their settlement), it is committed at once, in the caller's own step:
no pass to wait for, and no suspending and resuming the caller's chain of coroutines (at one
request at a time, 4.8% of a non-streamed request's instructions).
Each transaction of a group is still all-or-nothing: should one fail, the group is rolled back
and run again with each transaction inside a SAVEPOINT of its own (not at first: the savepoints
were a third of the statements a request runs). Each caller is answered only after the COMMIT
that made its work durable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

log = logging.getLogger("apibox.store")
T = TypeVar("T")
Body = Callable[[sqlite3.Cursor], Any]  # given the writer's one cursor

LOCK_WAIT_SECONDS = 10.0  # as long as a busy timeout would have waited for another process's lock
FIRST_RETRY_SECONDS = 0.0005
LAST_RETRY_SECONDS = 0.02
CHECKPOINT_BYTES = 4 * 1024 * 1024  # about SQLite's own automatic checkpoint (1,000 pages of 4 KiB)
CHECKPOINT_EVERY_GROUPS = 64  # how often the WAL's size is looked at (and, once it is big, checkpointed)
CHECKPOINT_WAIT_FACTOR = 4  # commits wait for a checkpoint once one left this many CHECKPOINT_BYTES in the WAL
RESTART_WAIT_MS = 10  # how long that checkpoint waits for other processes' writers and for readers
GROUP_MAX = 64  # transactions in one group commit, at most


class Queued(NamedTuple):
    body: Body
    future: asyncio.Future[Any]  # its caller's
    keep: bool  # commit it even if the caller has gone


class Locked(Exception):
    """Another connection holds the write lock: try the group again later."""


def _deliver(group: list[Queued], outcomes: list[tuple[bool, Any]]) -> None:
    """Each queued transaction's outcome to its caller."""
    for (_, future, _), (ok, value) in zip(group, outcomes, strict=True):
        if future.done():  # a kept transaction whose caller has gone: only the log can tell of a failure
            if not ok:
                log.error("a transaction whose caller had gone failed and was rolled back: %s", value)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SqliteWriter:
    """The one write connection of a process, used only on the event loop it was opened on (and its thread)."""

    def __init__(self, path: str, pragmas: tuple[str, ...]) -> None:
        self._path = path
        self._pragmas = pragmas
        # the connection, held as its one cursor (``.connection`` is the connection): every statement goes
        # through it, since Connection.execute makes a cursor for each (1.5k instructions)
        self._db: sqlite3.Cursor | None = None
        # the loop it was opened on, kept: asyncio.get_running_loop() makes a getpid system call on
        # Python 3.11, and a queued transaction would ask for it every time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[Queued] = []
        self._scheduled = False  # a group commit is on its way (a pass, a lock retry or a checkpoint away)
        self._waiting_since: float | None = None  # the current group's first refusal of the lock
        self._retry = FIRST_RETRY_SECONDS
        self._idle = asyncio.Event()
        self._idle.set()
        self._gathered = 0  # the queue's length at the last pass
        self._last_group = 0  # transactions in the last group committed
        self._groups = 0
        self._checkpointer = Checkpointer(path, pragmas)
        # whether no other work in flight could queue a transaction for this pass's group; the store
        # sets it (without, every transaction waits a pass for company)
        self.alone: Callable[[], bool] = _never

    async def open(self) -> None:
        # The pragmas (WAL among them) may wait for other processes at start-up, with their busy timeout.
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            for pragma in self._pragmas:
                db.execute(pragma)
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute("PRAGMA temp_store=MEMORY")
        except BaseException:
            db.close()
            raise
        self._db = db.cursor()
        self._loop = asyncio.get_running_loop()

    async def transaction(self, body: Callable[[sqlite3.Cursor], T], *, keep: bool = False) -> T:
        """Run ``body(cursor)`` all-or-nothing and return its result once it is committed. A caller
        cancelled before its group runs leaves nothing behind: the body is not run, unless
        ``keep`` (a settlement, money already spent): then it is committed all the same."""
        if not self._scheduled and self.alone() and not self._checkpointer.overdue():
            try:
                ((ok, value),) = self._commit_group([body])
            except Locked:  # another process is writing: queued, and tried again on the timer
                pass
            else:
                self._committed(1)
                if ok:
                    return value  # type: ignore[no-any-return]
                try:
                    raise value
                finally:  # the failure's traceback holds this frame: kept here too, a reference cycle
                    del value
        loop = self._event_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(Queued(body, future, keep))
        if not self._scheduled:
            self._scheduled = True
            self._idle.clear()
            # busy (the last group was not alone): counted as one short, so the first pass waits anyway
            self._gathered = len(self._queue) - (self._last_group > 1)
            loop.call_soon(self._gather)
        try:
            return await future
        finally:  # a failure the future carries holds this frame in its traceback: the same cycle
            del future

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the writer is not open"
        return self._loop

    def _gather(self) -> None:
        """One pass of the loop later (two when the last group was not alone): commit, unless the
        pass brought more transactions."""
        queued = len(self._queue)
        if self._gathered < queued < GROUP_MAX:
            self._gathered = queued
            self._event_loop().call_soon(self._gather)
        else:
            self._flush()

    def _flush(self, after_checkpoint: bool = False) -> None:
        """Commit every queued transaction in one group, or come back when the lock is free (or
        once a checkpoint has wound the WAL back, when it has not been for too long)."""
        loop = self._event_loop()
        if not after_checkpoint and self._checkpointer.overdue():  # one wait, even if a reader holds it back
            self._checkpointer.start(alone=True)
            self._checkpointer.when_done(lambda: loop.call_soon_threadsafe(self._flush, True))
            return
        self._scheduled = False
        group = [queued for queued in self._queue if queued.keep or not queued.future.done()]
        self._queue = []
        if not group:
            self._last_group = 0
            self._idle.set()
            return
        try:
            outcomes = self._commit_group([queued.body for queued in group])
        except Locked:
            now = loop.time()
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < LOCK_WAIT_SECONDS:
                self._queue = group + self._queue
                self._scheduled = True
                loop.call_later(self._retry, self._flush)
                self._retry = min(self._retry * 2, LAST_RETRY_SECONDS)
                return
            error = sqlite3.OperationalError("database is locked")
            outcomes = [(False, error)] * len(group)
        except Exception as exc:  # the COMMIT itself failed: nothing of the group happened
            outcomes = [(False, exc)] * len(group)
        self._waiting_since, self._retry = None, FIRST_RETRY_SECONDS
        _deliver(group, outcomes)
        committed = len(group)
        # a failure's traceback holds the frames it was raised through and their callers, this one
        # among them: holding the failure here too (in the group's futures, in the outcomes) would
        # make a reference cycle
        del group, outcomes
        self._idle.set()
        self._committed(committed)

    def _committed(self, transactions: int) -> None:
        """A group of ``transactions`` is over; now and then the WAL's size is looked at."""
        self._last_group = transactions
        self._groups += 1
        if self._groups % CHECKPOINT_EVERY_GROUPS == 0:
            self._maybe_checkpoint()

    def _commit_group(self, bodies: list[Body]) -> list[tuple[bool, Any]]:
        """Run ``bodies`` in one transaction. Optimistically without savepoints (four statements a
        request): a body that raises is rare, and then the whole group is rolled back and run again
        with a savepoint around each body, so that only the failing one is undone."""
        db = self._cursor()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise Locked from None
            raise
        try:
            try:
                outcomes: list[tuple[bool, Any]] | None = [(True, body(db)) for body in bodies]
            except Exception:
                if len(bodies) == 1:
                    raise
                outcomes = None  # run again below, out of this handler: its failure is no context of theirs
            if outcomes is None:
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")  # should another process take the lock meanwhile: Locked, below
                outcomes = self._each_in_savepoint(db, bodies)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.connection.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                raise Locked from None  # the bodies are scripts that can run again from the top
            if len(bodies) == 1 and isinstance(exc, Exception):
                return [(False, exc)]  # alone in its group: its own failure, nothing else to keep
            raise
        try:
            return outcomes
        finally:  # a failure among them holds this frame (its traceback's frames link to their callers'): a cycle
            del outcomes

    @staticmethod
    def _each_in_savepoint(db: sqlite3.Cursor, bodies: list[Body]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
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
        try:
            return outcomes
        finally:  # a failure among them holds this frame in its traceback: kept here too, a reference cycle
            del outcomes

    def _maybe_checkpoint(self) -> None:
        try:
            size = os.stat(self._path + "-wal").st_size
        except OSError:
            return
        if size >= CHECKPOINT_BYTES:
            self._checkpointer.start()

    async def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """One statement in a transaction of its own, returning any RETURNING rows."""
        return await self.transaction(lambda db: db.execute(sql, params).fetchall())

    async def bulk(self, batches: AsyncIterator[tuple[str, list[Sequence[Any]]]]) -> None:
        """Many ``executemany`` batches in one transaction, all or nothing (``db copy``, a CLI
        command: the batches may keep the loop for as long as they take)."""
        await self._idle.wait()
        db = self._cursor()
        db.execute("PRAGMA busy_timeout=10000")  # nothing else runs on this loop meanwhile
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                async for sql, rows in batches:
                    db.executemany(sql, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA busy_timeout=0")

    def _cursor(self) -> sqlite3.Cursor:
        assert self._db is not None, "the writer is not open"
        return self._db

    async def close(self) -> None:
        while not self._idle.is_set():
            await self._idle.wait()
        await self._checkpointer.close()
        if self._db is not None:
            self._db.connection.close()  # the last connection to close checkpoints and removes the WAL
            self._db = None
            self._loop = None  # closed: a late transaction fails on the assertion, not on a stale loop


def _never() -> bool:
    return False


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0)  # absent on errors not raised by SQLite itself
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # its extended codes too


class Checkpointer:
    """Copies the WAL back into the database on a thread and connection of its own, one checkpoint
    at a time: PASSIVE (it copies what it can and waits for no one) or, run alone, RESTART.

    RESTART waits up to ``RESTART_WAIT_MS`` for other processes' writers and for readers, then
    keeps new writers out while it copies everything, so the next commit winds the WAL back. When
    it could not (a reader on an old snapshot, say a long report), it is held back: commits wait
    for the next one only once the WAL has grown by another ``CHECKPOINT_WAIT_FACTOR`` times
    ``CHECKPOINT_BYTES``, not before every group while that reader reads. The first PASSIVE that
    copies everything shows the reader has gone: the wait is due again at once (else the WAL, big
    from the reader, would grow by that much again before it wound back).
    """

    def __init__(self, path: str, pragmas: tuple[str, ...]) -> None:
        self._path = path
        self._pragmas = pragmas
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._running: Future[None] | None = None
        self._left_bytes = 0  # in the WAL at the last checkpoint (0 once a RESTART wound it back, or one failed)
        self._held_back_bytes = 0  # in the WAL when a RESTART last could not wind it back (0: it did)
        self._page_bytes = 0

    def busy(self) -> bool:
        return self._running is not None and not self._running.done()

    def overdue(self) -> bool:
        """The WAL has not been wound back for a while (commits added frames while each checkpoint
        ran) and held ``CHECKPOINT_WAIT_FACTOR`` times ``CHECKPOINT_BYTES`` at the last one (over
        what it held when a RESTART was last held back): commits should wait for one that runs
        alone and copies it all."""
        return self._left_bytes >= self._held_back_bytes + CHECKPOINT_WAIT_FACTOR * CHECKPOINT_BYTES

    def when_done(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (on the checkpointer's thread) once the running checkpoint is over."""
        assert self._running is not None
        self._running.add_done_callback(lambda _: callback())

    def start(self, *, alone: bool = False) -> None:
        """Start a checkpoint unless one is running; ``alone``: the writer commits nothing until it
        ends, and it is a RESTART."""
        if self.busy():
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apibox-sqlite-checkpoint")
        self._running = self._thread.submit(self._checkpoint, alone)

    def _checkpoint(self, alone: bool = False) -> None:
        try:
            if self._db is None:
                self._db = sqlite3.connect(self._path, isolation_level=None)
                for pragma in self._pragmas:
                    self._db.execute(pragma)
                self._page_bytes = self._db.execute("PRAGMA page_size").fetchone()[0]
                self._db.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")  # PASSIVE never waits
            mode = "RESTART" if alone else "PASSIVE"
            busy, frames, copied = self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            left = frames * self._page_bytes
            if alone:  # unless held back (busy), it copied all with every writer waiting: the next
                # commit winds the WAL back to its start
                self._left_bytes = self._held_back_bytes = left if busy or copied != frames else 0
            else:
                self._left_bytes = left
                if copied == frames or left < self._held_back_bytes:
                    # it copied all (no reader holds an old snapshot now) or the WAL was wound back
                    # since: whatever held the last RESTART back has gone
                    self._held_back_bytes = 0
        except sqlite3.Error as exc:  # the WAL keeps growing until one succeeds: say so, and try again later
            self._left_bytes = 0  # (at the usual pace, not before every group)
            log.warning("SQLite checkpoint of %s failed: %s", self._path, exc)

    def _close_connection(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.wrap_future(self._thread.submit(self._close_connection))
            self._thread.shutdown(wait=True)
            self._thread = None
