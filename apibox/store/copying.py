"""`apibox db copy`: every row of one database into another, ids and all, then proven equal.

The target must be empty (its schema freshly migrated) and the source quiet (no request in
flight, so no open hold): a copy of a moving database would not balance. Rows go over in
batches, by primary key, in the order the foreign keys need; the target takes them all in
one transaction, so a failed copy leaves it as empty as it was. Afterwards the row counts,
the balance and ledger totals must match table for table, and the target's own audit
(`apibox db check`) must be clean.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from apibox.errors import InvalidRequest, StoreError
from apibox.store.base import ProgressFn
from apibox.store.script import Row
from apibox.store.sql_store import KEY_COLUMNS, LEDGER_COLUMNS, USAGE_FIELDS, USER_COLUMNS, SqlStore

BATCH_ROWS = 5_000


def _bare(columns: str) -> tuple[str, ...]:
    return tuple(c.strip().split(".")[-1] for c in columns.split(","))


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    order: str  # the primary key: batches are read in its order, past the last one read

    @property
    def keyed_by_id(self) -> bool:
        return self.order in ("id", "user_id")


# Parents before children; instances and holds are not copied (the source must have no holds).
TABLES = (
    Table("users", _bare(USER_COLUMNS), "id"),
    Table("balances", ("user_id", "balance", "held"), "user_id"),
    Table("api_keys", (*_bare(KEY_COLUMNS), "key_hash"), "id"),
    Table("usage", ("id", *USAGE_FIELDS), "id"),
    Table("ledger", _bare(LEDGER_COLUMNS), "id"),
    Table("usage_daily", ("day", "user_id", "key_id", "model", "provider", "status", "requests", "errors",
                          "estimated", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                          "reasoning_tokens", "cost", "charged", "charges", "latency_ms_sum", "latency_count",
                          "ttft_ms_sum", "ttft_count"), "day, user_id, key_id, model, provider, status"),
    Table("admin_log", ("id", "created_at", "actor", "action", "target", "before", "after"), "id"),
    Table("stored_responses", ("response_id", "user_id", "provider", "model", "context_tokens", "created_at"),
          "response_id"),
)
# What must be equal on both sides besides the row counts.
TOTALS = {
    "balance": "SELECT coalesce(sum(balance), 0) FROM balances",
    "ledger": "SELECT coalesce(sum(amount), 0) FROM ledger",
    "charged": "SELECT coalesce(sum(charged), 0) FROM usage",
    "folded charged": "SELECT coalesce(sum(charged), 0) FROM usage_daily",
}


@dataclass(slots=True)
class CopyResult:
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    totals: dict[str, int] = field(default_factory=dict)


async def count_rows(store: SqlStore) -> dict[str, int]:
    return {t.name: int((await store._read(f"SELECT count(*) FROM {t.name}"))[0][0]) for t in TABLES}


async def totals(store: SqlStore) -> dict[str, int]:
    return {name: int((await store._read(sql))[0][0]) for name, sql in TOTALS.items()}


async def copy_database(source: SqlStore, target: SqlStore,
                        progress: ProgressFn = lambda table, done, total: None) -> CopyResult:
    """Copy every table of ``source`` into the empty ``target`` and verify the copy; raises
    InvalidRequest (nothing written) when the target has data or the source has requests in flight.
    ``progress``: told each table's rows copied so far, then the audit's checks of the copy."""
    if await source.pending_migrations() or await target.pending_migrations():
        raise StoreError("both databases must be migrated first (apibox db migrate)")
    held = await source._read("SELECT count(*) FROM holds")
    if held[0][0]:
        raise InvalidRequest(f"the source has {held[0][0]} requests in flight (open holds); stop every gateway "
                             "using it and copy again")
    existing = {name: n for name, n in (await count_rows(target)).items() if n}
    if existing:
        listed = ", ".join(f"{name} ({n} rows)" for name, n in existing.items())
        raise InvalidRequest(f"the target database is not empty ({listed}); copy into a new, empty database")
    expected = await count_rows(source)

    async def batches() -> AsyncIterator[tuple[Table, list[Row]]]:
        for table in TABLES:
            done = 0
            progress(table.name, done, expected[table.name])
            async for rows in _read_table(source, table):
                done += len(rows)
                yield table, rows
                progress(table.name, done, expected[table.name])

    await target._import_rows(batches())
    result = CopyResult(rows=await count_rows(target), totals=await totals(target))
    problems = [f"{name}: {expected[name]} rows in the source, {n} in the target"
                for name, n in result.rows.items() if n != expected[name]]
    source_totals = await totals(source)
    problems += [f"{name} total: {source_totals[name]} in the source, {n} in the target"
                 for name, n in result.totals.items() if n != source_totals[name]]
    problems += await target.audit(progress)
    if problems:
        raise StoreError("the copy does not match its source: " + "; ".join(problems))
    return result


async def _read_table(store: SqlStore, table: Table) -> AsyncIterator[list[Row]]:
    """A table's rows a batch at a time, by primary key (past the last key read, or by offset for
    the composite key of the daily aggregates)."""
    columns = ", ".join(table.columns)
    last, offset = -1, 0
    while True:
        if table.keyed_by_id:
            rows = await store._read(f"SELECT {columns} FROM {table.name} WHERE {table.order} > ? "
                                     f"ORDER BY {table.order} LIMIT ?", (last, BATCH_ROWS))
        else:
            rows = await store._read(f"SELECT {columns} FROM {table.name} ORDER BY {table.order} LIMIT ? OFFSET ?",
                                     (BATCH_ROWS, offset))
        if not rows:
            return
        yield rows
        offset += len(rows)
        last = rows[-1][table.columns.index(table.order)] if table.keyed_by_id else last
