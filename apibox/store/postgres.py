"""The PostgreSQL engine (asyncpg): one database shared by every gateway on every host.

Transaction scripts run on one pooled connection inside one transaction; scripts that read
a balance before changing it lock the row first (``row_locks``), so concurrent gateways
queue on a user's balance row and never both spend the same money. A script that loses a
deadlock or serialization race is run again from the top (it changed nothing). Migrations
run under an advisory lock, so hosts starting together apply each one once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg

from apibox.errors import StoreError, StoreUnavailable
from apibox.models import Hold, UsageRecord
from apibox.store.copying import Table
from apibox.store.migrations import MIGRATIONS
from apibox.store.script import IntegrityViolation, Row, Script, Want, single
from apibox.store.sql_store import (
    USAGE_FIELDS,
    SqlStore,
    already_settled,
    charge_note,
    no_balance,
    settled_at,
    usage_values,
)
from apibox.store.sqltime import now_ms

log = logging.getLogger("apibox.store")
T = TypeVar("T")
RETRIES = 5  # attempts at a script that keeps losing deadlock or serialization races
MIGRATION_LOCK = 0x61706962  # pg_advisory_lock key: "apib"
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# How a database that cannot be reached may show (``_unavailable`` decides): no connection to it
# (an OSError: refused, reset, asyncpg's ConnectionError when one closes in its handshake, or a
# TimeoutError: connecting, or a statement without an answer for command_timeout's 60 s, which for
# apibox's sub-millisecond statements is a network that drops what it carries), one lost in the
# middle of a statement (ConnectionDoesNotExistError, SQLSTATE 08003, as every class 08 connection
# exception), or the server refusing work while it shuts down or starts (class 57, operator
# intervention). Not a statement the server cancelled (57014, statement_timeout): it answered. Not
# asyncpg's InterfaceError (a closed pool, a connection used twice at once): apibox's own doing,
# which waiting for the database would never mend.
LOST = (OSError, asyncpg.PostgresError)
QUERY_CANCELED = "57014"
SETTLE_RETRY_SECONDS = 1.0  # how often a settlement the database could not take is tried again
CLOSE_WAIT_SECONDS = 10.0  # how long closing waits for settlements still being written (or retried)
# The settlement (SqlStore.settle's steps) as one call of a function of migration 0008: one round
# trip where BEGIN, two statements and COMMIT took four. ``p_charged``: the cost when the hold
# covers it, else NULL (the function caps it at the balance left).
SETTLE_SQL = f"SELECT usage_id, charged FROM apibox_settle(?, ?, ?, {', '.join('?' * (len(USAGE_FIELDS) - 1))})"
CHARGED = USAGE_FIELDS.index("charged")  # worked out by the function, not passed
# The hold of a key with a budget, its locks and HOLD_SQL's conditions in one call (migration 0008).
HOLD_BUDGETED_SQL = "SELECT apibox_hold_budgeted(?, ?, ?, ?, ?, ?, ?)"
ALREADY_SETTLED, NO_BALANCE = "AB001", "AB002"  # the function's own SQLSTATEs
# The usage row apibox_settle wrote, by the values it wrote into it (the key and time lead the index
# usage_key_created): a settlement whose reply was lost may have been committed.
SETTLED_SQL = "SELECT id, charged FROM usage WHERE key_id = ? AND created_at = ? AND request_id = ? AND user_id = ?"
# What a statement gives back, when its caller asked (``Want``) rather than for rows.
_RETURNING = {Want.NEW_ID: " RETURNING id", Want.COUNT: " RETURNING 1"}


@lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """``?`` placeholders -> ``$1, $2, ...`` (apibox's SQL has no ``?`` inside literals)."""
    parts = sql.split("?")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


@lru_cache(maxsize=256)
def _returning(sql: str, want: Want) -> str:
    """``sql`` numbered, with the RETURNING clause that gives back what ``want`` asks for."""
    return numbered(sql + _RETURNING[want])


def _plain(rows: Sequence[asyncpg.Record]) -> list[Row]:
    """Rows as tuples; ``sum`` over BIGINT is NUMERIC in PostgreSQL: money and counts stay int."""
    return [tuple(int(v) if isinstance(v, Decimal) else v for v in row) for row in rows]


class PostgresStore(SqlStore):
    """The Store protocol on a PostgreSQL database."""

    row_locks = True

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._finishing: set[asyncio.Task[Any]] = set()  # settlements whose callers may have gone

    @classmethod
    async def open(cls, url: str, pool_size: int = 10) -> PostgresStore:
        try:
            # Holds and settlements, the hot path, commit without waiting for the WAL flush (see
            # _transaction); asking for that per connection costs no round trip per request.
            pool = await asyncpg.create_pool(url, min_size=0, max_size=pool_size, command_timeout=60,
                                             server_settings={"synchronous_commit": "off"},
                                             reset=_nothing_to_reset)
            async with pool.acquire():  # reached now, or refused now (the pool keeps no connection floor:
                pass                    # asyncpg logs a traceback each time it fails to restore one)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from None
        return cls(pool)

    async def close(self) -> None:
        await self._finished()
        await self._pool.close()

    async def retire_instance(self) -> None:
        await self._finished()  # a settlement still being written needs its hold, which retiring gives up
        await super().retire_instance()

    async def _finished(self) -> None:
        """Wait for the settlements still being written; those the database has not taken within
        CLOSE_WAIT_SECONDS (it is down) are given up: their holds stay, for a gateway's look for
        orphaned holds to release."""
        if not self._finishing:
            return
        _, waiting = await asyncio.wait(set(self._finishing), timeout=CLOSE_WAIT_SECONDS)
        for task in waiting:
            task.cancel()
        if waiting:
            log.warning("%d settlements were not written (the database cannot be reached); their holds "
                        "are released, uncharged, by the first gateway to look for orphaned holds once it is back",
                        len(waiting))
            await asyncio.wait(waiting)

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return _plain(await self._pool.fetch(numbered(sql), *params))
        except LOST as exc:
            raise _unavailable(exc) from None

    async def _run(self, script: Callable[[], Script[T]], *, durable: bool = True) -> T:
        async def attempt() -> T:
            async with self._pool.acquire() as conn, _transaction(conn, durable=durable):
                return await _drive(conn, script())
        return await _retried(attempt)

    async def _run_statement(self, sql: str, params: Sequence[Any], *, durable: bool = True,
                             want: Want | None = None) -> list[Row]:
        if durable:  # SET LOCAL needs the transaction around it
            return await super()._run_statement(sql, params, durable=durable, want=want)

        # On its own, a statement is its own transaction: no BEGIN and no COMMIT to wait for, and the
        # rows it locks (a hold's on the balance) are held only while it runs.
        async def attempt() -> list[Row]:
            async with self._pool.acquire() as conn:
                return await _drive(conn, single(sql, params, want))
        return await _retried(attempt)

    async def _to_the_end(self, work: Awaitable[T]) -> T:
        """``work`` in a task of its own, which a cancelled caller does not take down with it."""
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return await asyncio.shield(task)

    @staticmethod
    def _concat(column: str) -> str:
        return f"string_agg({column}::text, ',')"

    async def hold(self, user_id: int, key_id: int, amount: int, request_id: str, model: str, *,
                   budgeted: bool = True) -> Hold | None:
        if not budgeted:  # HOLD_SQL alone: it locks nothing before it (the balance's CHECK guards it)
            return await super().hold(user_id, key_id, amount, request_id, model, budgeted=False)
        params = (amount, request_id, model, now_ms(), self._instance, key_id, user_id)
        try:
            ((hold_id,),) = await self._run_statement(HOLD_BUDGETED_SQL, params, durable=False)
        except IntegrityViolation:  # as SqlStore.hold: a CHECK refused it, the money is not there
            return None
        return Hold(hold_id, user_id, key_id, amount, request_id) if hold_id is not None else None

    async def settle(self, hold: Hold, usage: UsageRecord) -> UsageRecord:
        """SqlStore.settle in one statement (``SETTLE_SQL``), finished even if its caller is cancelled."""
        created = settled_at(usage)
        values = usage_values(usage, created)
        del values[CHARGED]
        # None: the function caps it (at the balance, and at the budget's rest: it may have been lowered)
        charged = usage.cost if usage.cost <= hold.amount and not hold.budgeted else None
        params = (hold.id, charged, charge_note(usage), *values)
        written = (usage.key_id, created, usage.request_id, usage.user_id)
        try:
            rows = await self._to_the_end(self._settled(params, written))
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == ALREADY_SETTLED:
                raise already_settled(hold) from None
            if exc.sqlstate == NO_BALANCE:
                raise no_balance(hold.user_id) from None
            raise
        usage.id, usage.charged = rows[0]
        return usage

    async def _settled(self, params: Sequence[Any], written: Sequence[Any]) -> list[Row]:
        """The settlement's statement, tried again every second while the database cannot be
        reached: the hold stays until it is written (answered meanwhile, it would be released
        only once this instance stopped, and the answer never charged). Its caller waits; a
        shutdown gives up on it after its drain, and a look for orphaned holds releases the hold.
        ``written``: SETTLED_SQL's parameters, which find the usage row the statement writes."""
        lost = False
        while True:
            try:
                if lost:
                    return await self._settled_again(params, written)
                return await self._run_statement(SETTLE_SQL, params, durable=False)
            except StoreUnavailable as exc:
                if not lost:
                    log.warning("a settlement waits for the database: %s", exc.message)
                    lost = True
                await asyncio.sleep(SETTLE_RETRY_SECONDS)

    async def _settled_again(self, params: Sequence[Any], written: Sequence[Any]) -> list[Row]:
        """The settlement's statement after an attempt whose connection was lost: that attempt may
        have been committed with only its reply lost, and then its hold is gone (AB001) but its usage
        row and charge are there; they are the settlement's result. Without them, it was settled before."""
        try:
            return await self._run_statement(SETTLE_SQL, params, durable=False)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == ALREADY_SETTLED and (rows := await self._read(SETTLED_SQL, written)):
                log.info("a settlement's reply was lost, but the database had written it (usage row %s)", rows[0][0])
                return rows
            raise

    async def _import_rows(self, batches: AsyncIterator[tuple[Table, list[Row]]]) -> None:
        try:
            async with self._pool.acquire() as conn, _transaction(conn, durable=True):
                copied: list[Table] = []
                async for table, rows in batches:
                    await conn.copy_records_to_table(table.name, records=rows, columns=list(table.columns))
                    if table.order == "id" and table not in copied:
                        copied.append(table)
                for table in copied:  # new rows continue after the copied ids
                    await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), max(id)) "
                                       f"FROM {table.name} HAVING max(id) IS NOT NULL")
        except asyncpg.PostgresError as exc:
            raise StoreError(f"the copy failed and the target was rolled back (it is empty again): {exc}") from exc

    # -- schema --------------------------------------------------------------------------

    async def pending_migrations(self) -> list[str]:
        async with self._pool.acquire() as conn:
            applied = await _applied(conn)
        return [m.name for m in MIGRATIONS if m.name not in applied]

    async def migrate(self) -> list[str]:
        done: list[str] = []
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                applied = await _applied(conn)
                for migration in MIGRATIONS:
                    if migration.name in applied:
                        continue
                    try:
                        async with _transaction(conn, durable=True):
                            await conn.execute(migration.postgresql)
                            await conn.execute("INSERT INTO _apibox_migrations (name, applied_at) VALUES ($1, $2)",
                                               migration.name, now_ms())
                    except asyncpg.PostgresError as exc:
                        raise StoreError(f"migration {migration.name} failed and was rolled back: {exc}") from exc
                    done.append(migration.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        return done


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is. asyncpg's default reset is a query (RESET ALL,
    UNLISTEN, CLOSE ALL, advisory unlocks): one more round trip for every transaction, a fifth of a
    request's. apibox leaves nothing of that behind: its only session settings are the ones each
    connection opens with (RESET ALL would restore those), it opens no cursors and listens to
    nothing, and it releases the migration lock itself; asyncpg still rolls back a transaction
    left open."""


async def _retried(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, made again after it lost a deadlock or serialization race (it changed
    nothing), up to RETRIES times."""
    for number in range(RETRIES):
        try:
            return await attempt()
        except RETRYABLE:
            if number == RETRIES - 1:
                raise
            await asyncio.sleep(0.005 * (number + 1))
        except LOST as exc:
            raise _unavailable(exc) from None
    raise AssertionError("unreachable")


def _unavailable(exc: OSError | asyncpg.PostgresError) -> BaseException:
    """``exc`` as StoreUnavailable when it says the database cannot be reached (see LOST); else as it is."""
    if isinstance(exc, asyncpg.PostgresError) and (
            (exc.sqlstate or "")[:2] not in ("08", "57") or exc.sqlstate == QUERY_CANCELED):
        return exc
    return StoreUnavailable(f"the database cannot be reached ({type(exc).__name__}); try again shortly")


@asynccontextmanager
async def _transaction(conn: asyncpg.Connection, *, durable: bool) -> AsyncIterator[None]:
    """A transaction on one of the pool's connections. They commit with synchronous_commit off (the
    commit returns before its WAL flush, which follows within 3 x wal_writer_delay): right for holds
    and settlements (docs/BILLING.md). A durable one (top-ups, users, keys, migrations, copies) waits."""
    async with conn.transaction():
        if durable:
            await conn.execute("SET LOCAL synchronous_commit TO on")
        yield


async def _applied(conn: asyncpg.Connection) -> set[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS _apibox_migrations (name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)")
    return {row[0] for row in await conn.fetch("SELECT name FROM _apibox_migrations")}


async def _drive(conn: asyncpg.Connection, script: Script[T]) -> T:
    """``script.drive`` for asyncpg: each statement awaited on the transaction's connection."""
    try:
        query = next(script)
        while True:
            sql, params, *want = query
            try:
                rows = _plain(await conn.fetch(_returning(sql, want[0]) if want else numbered(sql), *params))
                if want and want[0] is Want.COUNT:
                    rows = [(len(rows),)]
            except asyncpg.IntegrityConstraintViolationError as exc:
                query = script.throw(IntegrityViolation(str(exc)))
            else:
                query = script.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
