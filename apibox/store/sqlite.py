"""The SQLite store (aiosqlite): WAL, foreign keys, a busy timeout, CHECK-guarded money.

One write connection, used under an asyncio lock so a transaction from one coroutine never
interleaves with statements from another; one read connection for lookups and reports
(WAL lets it read while the writer writes).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any

import aiosqlite

from apibox.errors import Conflict, InvalidRequest, NotFound, StoreError
from apibox.models import (
    AdminAction,
    ApiKey,
    Balance,
    Hold,
    LedgerEntry,
    LedgerKind,
    ReportRow,
    UsageRecord,
    User,
    UserOverview,
    UserState,
)
from apibox.money import format_usd
from apibox.store.base import REPORT_DIMENSIONS, Credit, CreditResult, KeySpec, PruneResult, UsageFilter
from apibox.store.migrations import SQLITE_MIGRATIONS, Migration
from apibox.store.sqlite_writer import SqliteWriter

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA foreign_keys=ON",
           "PRAGMA busy_timeout=10000")

USER_COLUMNS = "u.id, u.email, u.name, u.grp, u.state, u.state_reason, u.created_at"
KEY_COLUMNS = ("k.id, k.user_id, k.name, k.prefix, k.models, k.budget, k.spent, k.expires_at, k.rpm, k.tpm, "
               "k.concurrency, k.allow_ips, k.revoked_at, k.created_at, k.last_used_at")
LEDGER_COLUMNS = "id, user_id, kind, amount, balance_after, note, reference, actor, usage_id, created_at"
USAGE_FIELDS = ("request_id", "created_at", "user_id", "key_id", "model", "provider", "endpoint", "status",
                "http_status", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                "reasoning_tokens", "estimated", "cost", "charged", "latency_ms", "ttft_ms")

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How each report dimension is grouped in the live rows (g) and in the daily aggregates (a): raw
# values (day and hour numbers since the epoch, ids), labelled in Python after grouping. The unary
# + keeps SQLite from walking an index in group order, which reads the whole table at random
# (at 1M rows, 2.5x slower than a scan and a sort).
DIMENSION_SQL = {
    "day": (f"g.created_at / {DAY_MS}", f"a.day / {DAY_MS}"),
    "hour": (f"g.created_at / {HOUR_MS}", f"a.day / {HOUR_MS}"),
    "model": ("g.model", "a.model"),
    "user": ("+g.user_id", "+a.user_id"),
    "key": ("+g.key_id", "+a.key_id"),
    "provider": ("g.provider", "a.provider"),
}
# requests, errors, five token classes, charged, latency sum and count: the same ten in both sources.
LIVE_SUMS = ("count(*), sum(g.status != 'ok'), sum(g.prompt_tokens), sum(g.completion_tokens), "
             "sum(g.cached_tokens), sum(g.cache_write_tokens), sum(g.reasoning_tokens), sum(g.charged), "
             "sum(g.latency_ms), count(*)")
DAILY_SUMS = ("sum(a.requests), sum(a.errors), sum(a.prompt_tokens), sum(a.completion_tokens), "
              "sum(a.cached_tokens), sum(a.cache_write_tokens), sum(a.reasoning_tokens), sum(a.charged), "
              "sum(a.latency_ms_sum), sum(a.latency_count)")
# Percentiles: each group's latencies come back as one string, counted in Python; memory is one
# group's values at a time, not a million rows.
LIVE_SAMPLES = ", group_concat(g.latency_ms), group_concat(g.ttft_ms)"

# A usage row may be folded only if its ledger charge matches it (user and amount): the audit then
# matches each user's folded charges, their count and sum, to the user's daily aggregates.
FOLD_MISMATCH_SQL = (
    "SELECT u.id FROM usage u LEFT JOIN ledger l ON l.usage_id = u.id WHERE u.created_at < ? AND "
    "CASE WHEN l.id IS NULL THEN u.charged != 0 ELSE l.kind != 'charge' OR -l.amount != u.charged "
    "OR l.user_id != u.user_id END LIMIT 1")
FOLD_SUMS = ("requests", "errors", "estimated", "prompt_tokens", "completion_tokens", "cached_tokens",
             "cache_write_tokens", "reasoning_tokens", "cost", "charged", "charges", "latency_ms_sum", "latency_count",
             "ttft_ms_sum", "ttft_count")
FOLD_SQL = (
    "INSERT INTO usage_daily (day, user_id, key_id, model, provider, status, " + ", ".join(FOLD_SUMS) + ") "
    f"SELECT created_at / {DAY_MS} * {DAY_MS}, user_id, key_id, model, provider, status, count(*), "
    "sum(status != 'ok'), sum(estimated), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), "
    "sum(cache_write_tokens), sum(reasoning_tokens), sum(cost), sum(charged), sum(charged > 0), sum(latency_ms), "
    "count(*), "
    "coalesce(sum(ttft_ms), 0), count(ttft_ms) FROM usage WHERE created_at < ? GROUP BY 1, 2, 3, 4, 5, 6 "
    "ON CONFLICT (day, user_id, key_id, model, provider, status) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in FOLD_SUMS))
PRUNE_BATCH_ROWS = 50_000
SORTED_TEXT_MAX = 16_384  # about 3,500 values: below, sorting a list is faster; above, counting


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def from_ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=UTC)


def _json_or_none(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _user(row: Sequence[Any]) -> User:
    return User(id=row[0], email=row[1], name=row[2], group=row[3], state=UserState(row[4]),
                state_reason=row[5], created_at=from_ms(row[6]))  # type: ignore[arg-type]


def _key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(id=row[0], user_id=row[1], name=row[2], prefix=row[3], models=_split(row[4]), budget=row[5],
                  spent=row[6], expires_at=from_ms(row[7]), rpm=row[8], tpm=row[9], concurrency=row[10],
                  allow_ips=_split(row[11]), revoked_at=from_ms(row[12]), created_at=from_ms(row[13]),
                  last_used_at=from_ms(row[14]))


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(id=row[0], user_id=row[1], kind=LedgerKind(row[2]), amount=row[3], balance_after=row[4],
                       note=row[5], reference=row[6], actor=row[7], usage_id=row[8],
                       created_at=from_ms(row[9]))  # type: ignore[arg-type]


class SqliteStore:
    """The Store protocol on one SQLite file."""

    def __init__(self, writer: SqliteWriter, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        if path == ":memory:":
            raise StoreError("an in-memory SQLite database cannot be shared by the reader and the writer; "
                             "use a file (sqlite:///./apibox.db)")
        writer = SqliteWriter(path, PRAGMAS)
        try:
            await writer.open()
        except sqlite3.Error as exc:
            await writer.close()
            raise StoreError(f"cannot open the SQLite database {path}: {exc}") from None
        return cls(writer, await _connect(path))

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    # -- schema --------------------------------------------------------------------------

    async def _applied(self) -> set[str]:
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS _apibox_migrations (name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)")
        rows = await self._writer.execute("SELECT name FROM _apibox_migrations")
        return {str(row[0]) for row in rows}

    async def pending_migrations(self) -> list[str]:
        applied = await self._applied()
        return [m.name for m in SQLITE_MIGRATIONS if m.name not in applied]

    async def migrate(self) -> list[str]:
        done: list[str] = []
        applied = await self._applied()
        for migration in SQLITE_MIGRATIONS:
            if migration.name in applied:
                continue

            def apply(db: sqlite3.Connection, migration: Migration = migration) -> None:
                try:
                    for statement in _statements(migration.sql):
                        db.execute(statement)
                except sqlite3.Error as exc:
                    raise StoreError(f"migration {migration.name} failed and was rolled back: {exc}") from exc
                db.execute("INSERT INTO _apibox_migrations (name, applied_at) VALUES (?, ?)",
                           (migration.name, now_ms()))
            await self._writer.transaction(apply)
            done.append(migration.name)
        return done

    async def ping(self) -> None:
        await self._read("SELECT 1")

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, email: str, name: str, group: str) -> User:
        def insert(db: sqlite3.Connection) -> int:
            try:
                cursor = db.execute("INSERT INTO users (email, name, grp, created_at) VALUES (?, ?, ?, ?)",
                                    (email, name, group, now_ms()))
            except sqlite3.IntegrityError:
                raise Conflict(f"a user with email {email} already exists") from None
            db.execute("INSERT INTO balances (user_id) VALUES (?)", (cursor.lastrowid,))
            return cursor.lastrowid  # type: ignore[return-value]
        user = await self.get_user(await self._writer.transaction(insert))
        assert user is not None
        return user

    async def get_user(self, user_id: int) -> User | None:
        rows = await self._read(f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?", (user_id,))
        return _user(rows[0]) if rows else None

    async def find_user_by_email(self, email: str) -> User | None:
        rows = await self._read(f"SELECT {USER_COLUMNS} FROM users u WHERE u.email = ?", (email,))
        return _user(rows[0]) if rows else None

    async def list_users(self) -> list[UserOverview]:
        rows = await self._read(
            f"SELECT {USER_COLUMNS}, b.balance, b.held, "
            "(SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL) "
            "FROM users u JOIN balances b ON b.user_id = u.id ORDER BY u.id")
        return [UserOverview(_user(r), Balance(r[0], r[7], r[8]), r[9]) for r in rows]

    async def update_user(self, user_id: int, *, name: str | None, group: str | None) -> User:
        await self._writer.execute("UPDATE users SET name = coalesce(?, name), grp = coalesce(?, grp) WHERE id = ?",
                              (name, group, user_id))
        return await self._require_user(user_id)

    async def set_user_state(self, user_id: int, state: UserState, reason: str) -> User:
        await self._writer.execute("UPDATE users SET state = ?, state_reason = ? WHERE id = ?",
                              (state.value, reason, user_id))
        return await self._require_user(user_id)

    async def _require_user(self, user_id: int) -> User:
        user = await self.get_user(user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}")
        return user

    # -- keys ----------------------------------------------------------------------------

    async def create_key(self, spec: KeySpec) -> ApiKey:
        rows = await self._writer.execute(
            "INSERT INTO api_keys (user_id, name, key_hash, prefix, models, budget, expires_at, rpm, tpm, "
            "concurrency, allow_ips, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (spec.user_id, spec.name, spec.key_hash, spec.prefix, ",".join(spec.models), spec.budget,
             to_ms(spec.expires_at), spec.rpm, spec.tpm, spec.concurrency, ",".join(spec.allow_ips), now_ms()))
        key = await self.get_key(rows[0][0])
        assert key is not None
        return key

    async def get_key(self, key_id: int) -> ApiKey | None:
        rows = await self._read(f"SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = ?", (key_id,))
        return _key(rows[0]) if rows else None

    async def list_keys(self, user_id: int | None = None) -> list[ApiKey]:
        if user_id is None:
            rows = await self._read(f"SELECT {KEY_COLUMNS} FROM api_keys k ORDER BY k.id")
        else:
            rows = await self._read(f"SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.user_id = ? ORDER BY k.id",
                                    (user_id,))
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: int) -> ApiKey:
        await self._writer.execute("UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                              (now_ms(), key_id))
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"no key with id {key_id}")
        return key

    async def revoke_user_keys(self, user_id: int) -> int:
        rows = await self._writer.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL RETURNING id",
            (now_ms(), user_id))
        return len(rows)

    async def find_key_by_hash(self, key_hash: str) -> tuple[ApiKey, User] | None:
        rows = await self._read(
            f"SELECT {KEY_COLUMNS}, {USER_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id "
            "WHERE k.key_hash = ?", (key_hash,))
        if not rows:
            return None
        row = rows[0]
        return _key(row[:15]), _user(row[15:])

    # -- money ---------------------------------------------------------------------------

    async def get_balance(self, user_id: int) -> Balance:
        rows = await self._read("SELECT balance, held FROM balances WHERE user_id = ?", (user_id,))
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return Balance(user_id, rows[0][0], rows[0][1])

    async def credit(self, credit: Credit) -> CreditResult:
        def apply(db: sqlite3.Connection) -> CreditResult:
            if credit.reference is not None:
                rows = db.execute(f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE reference = ?",
                                  (credit.reference,)).fetchall()
                if rows:
                    entry = _entry(rows[0])
                    if entry.user_id != credit.user_id or entry.amount != credit.amount:
                        raise Conflict(f"reference {credit.reference!r} was already used for a different "
                                       "user or amount; nothing was credited")
                    return CreditResult(entry, _balance_in(db, credit.user_id), created=False)
            # One conditional statement: a debit can never take the balance below what is held.
            rows = db.execute(
                "UPDATE balances SET balance = balance + ? WHERE user_id = ? AND balance + ? >= held "
                "RETURNING balance, held", (credit.amount, credit.user_id, credit.amount)).fetchall()
            if not rows:
                current = _balance_in(db, credit.user_id)
                raise InvalidRequest(
                    f"the balance cannot go below zero or below the amount held for requests in flight "
                    f"(balance {format_usd(current.balance)} USD, held {format_usd(current.held)} USD); "
                    "nothing was changed")
            balance = Balance(credit.user_id, rows[0][0], rows[0][1])
            entry_rows = db.execute(
                f"INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, note, reference, actor) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {LEDGER_COLUMNS}",
                (credit.user_id, now_ms(), credit.kind.value, credit.amount, balance.balance, credit.note,
                 credit.reference, credit.actor)).fetchall()
            return CreditResult(_entry(entry_rows[0]), balance, created=True)
        return await self._writer.transaction(apply)

    async def ledger(self, user_id: int, since: datetime | None = None,
                     until: datetime | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE user_id = ? AND created_at >= ?"
        params: list[Any] = [user_id, to_ms(since) or 0]
        if until is not None:
            sql += " AND created_at < ?"
            params.append(to_ms(until))
        return [_entry(r) for r in await self._read(sql + " ORDER BY id", params)]

    async def ledger_sum(self, user_id: int, before: datetime) -> int:
        rows = await self._read("SELECT coalesce(sum(amount), 0) FROM ledger WHERE user_id = ? AND created_at < ?",
                                (user_id, to_ms(before)))
        return int(rows[0][0])

    async def hold(self, user_id: int, key_id: int, amount: int, request_id: str, model: str) -> Hold | None:
        # One statement: the row is inserted only if the available balance covers it, and the
        # holds_take trigger raises balances.held in the same statement.
        # The key's budget (if any) must also cover it, net of its spend and its other holds.
        rows = await self._writer.transaction(lambda db: db.execute(
            "INSERT INTO holds (user_id, key_id, amount, request_id, model, created_at) "
            "SELECT b.user_id, k.id, ?, ?, ?, ? FROM balances b JOIN api_keys k ON k.id = ? AND k.user_id = b.user_id "
            "WHERE b.user_id = ? AND b.balance - b.held >= ? AND (k.budget IS NULL OR "
            "k.budget - k.spent - (SELECT coalesce(sum(h.amount), 0) FROM holds h WHERE h.key_id = k.id) >= ?) "
            "RETURNING id",
            (amount, request_id, model, now_ms(), key_id, user_id, amount, amount)).fetchall())
        return Hold(rows[0][0], user_id, key_id, amount, request_id) if rows else None

    async def settle(self, hold: Hold, usage: UsageRecord) -> UsageRecord:
        usage.created_at = usage.created_at or datetime.now(UTC)

        def apply(db: sqlite3.Connection) -> UsageRecord:
            if not db.execute("DELETE FROM holds WHERE id = ? RETURNING id", (hold.id,)).fetchall():
                raise StoreError(f"hold {hold.id} of request {hold.request_id} is already settled or released; "
                                 "nothing was charged again")
            usage.charged = min(usage.cost, _balance_in(db, hold.user_id).available)
            _insert_usage(db, usage)
            if usage.charged > 0:
                rows = db.execute("UPDATE balances SET balance = balance - ? WHERE user_id = ? RETURNING balance",
                                  (usage.charged, hold.user_id)).fetchall()
                db.execute(
                    "INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, note, actor, usage_id) "
                    "VALUES (?, ?, 'charge', ?, ?, ?, 'gateway', ?)",
                    (hold.user_id, to_ms(usage.created_at), -usage.charged, rows[0][0],
                     f"{usage.model} {usage.request_id}", usage.id))
            db.execute("UPDATE api_keys SET spent = spent + ?, last_used_at = ? WHERE id = ?",
                       (usage.charged, to_ms(usage.created_at), hold.key_id))
            return usage
        return await self._writer.transaction(apply)

    async def recover_holds(self) -> list[Hold]:
        def apply(db: sqlite3.Connection) -> list[Hold]:
            rows = db.execute("DELETE FROM holds RETURNING id, user_id, key_id, amount, request_id, model").fetchall()
            for row in rows:
                _insert_usage(db, UsageRecord(
                    request_id=row[4], user_id=row[1], key_id=row[2], model=row[5], provider="", endpoint="",
                    status="interrupted", http_status=0, created_at=datetime.now(UTC)))
            return [Hold(r[0], r[1], r[2], r[3], r[4]) for r in rows]
        return await self._writer.transaction(apply)

    async def key_headroom(self, key_id: int) -> int | None:
        rows = await self._read(
            "SELECT k.budget - k.spent - (SELECT coalesce(sum(h.amount), 0) FROM holds h WHERE h.key_id = k.id) "
            "FROM api_keys k WHERE k.id = ? AND k.budget IS NOT NULL", (key_id,))
        return max(0, rows[0][0]) if rows else None

    async def log_admin_action(self, actor: str, action: str, target: str, before: dict[str, Any] | None,
                               after: dict[str, Any] | None) -> None:
        await self._writer.execute(
            "INSERT INTO admin_log (created_at, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?)",
            (now_ms(), actor, action, target, _json_or_none(before), _json_or_none(after)))

    async def admin_actions(self, limit: int = 100) -> list[AdminAction]:
        rows = await self._read("SELECT id, created_at, actor, action, target, before, after FROM admin_log "
                                "ORDER BY id DESC LIMIT ?", (limit,))
        return [AdminAction(r[0], from_ms(r[1]), r[2], r[3], r[4],  # type: ignore[arg-type]
                            json.loads(r[5]) if r[5] else None, json.loads(r[6]) if r[6] else None) for r in rows]

    # -- reports and audit ---------------------------------------------------------------

    async def usage_report(self, by: Sequence[str], where: UsageFilter, *,
                           percentiles: bool = False) -> list[ReportRow]:
        return (await self._usage(by, where, percentiles))[0]

    async def usage_summary(self, by: Sequence[str], where: UsageFilter) -> tuple[list[ReportRow], ReportRow]:
        return await self._usage(by, where, True)

    async def _usage(self, by: Sequence[str], where: UsageFilter,
                     percentiles: bool) -> tuple[list[ReportRow], ReportRow]:
        unknown = [d for d in by if d not in REPORT_DIMENSIONS]
        if unknown:
            raise InvalidRequest(f"cannot group by {unknown[0]!r} (choose from {', '.join(REPORT_DIMENSIONS)})")
        n = len(by)
        groups: dict[tuple[Any, ...], _Group] = {}
        total = _Group()
        # the total's percentiles are over every live row: its values are counted (memory: distinct values)
        latencies: Counter[int] = Counter()
        ttfts: Counter[int] = Counter()
        for folded, table, sums in ((False, "usage g", LIVE_SUMS), (True, "usage_daily a", DAILY_SUMS)):
            alias = table[-1]
            clauses, params = _usage_where(alias, "a.day" if folded else "g.created_at", where)
            columns = "".join(f"{DIMENSION_SQL[d][folded]} AS d{i}, " for i, d in enumerate(by))
            samples = LIVE_SAMPLES if percentiles and not folded else ""
            group = f" GROUP BY {', '.join(f'd{i}' for i in range(n))}" if n else ""
            for r in await self._read(f"SELECT {columns}{sums}{samples} FROM {table} WHERE {clauses}{group}",
                                      params):
                if not r[n]:
                    continue
                key = tuple((v, not folded) if d == "hour" else v for d, v in zip(by, r[:n], strict=True))
                acc = groups.setdefault(key, _Group())
                acc.add(r[n:n + 10])
                if samples:  # a group's live rows come in one result row: its percentiles are final
                    acc.percentiles = (*_percentiles(r[n + 10], (50, 95), latencies),
                                       *_percentiles(r[n + 11], (50,), ttfts))
        emails = {}
        if "user" in by:
            emails = {r[0]: r[1] for r in await self._read("SELECT id, email FROM users")}
        out: list[tuple[tuple[Any, ...], ReportRow]] = []
        for key, acc in groups.items():
            total.add(acc.sums)
            labels = [_label(d, v, emails) for d, v in zip(by, key, strict=True)]
            out.append((tuple(sort for sort, _ in labels),
                        acc.row({d: text for d, (_, text) in zip(by, labels, strict=True)}, percentiles)))
        out.sort(key=lambda item: item[0])
        total.percentiles = (*_nearest_rank(latencies, (50, 95)), *_nearest_rank(ttfts, (50,)))
        return [row for _, row in out], total.row({}, percentiles)

    async def prune_usage(self, before: datetime, *, batch_rows: int = PRUNE_BATCH_ROWS) -> PruneResult:
        before_ms = to_ms(before)
        assert before_ms is not None
        rows = requests = cost = charged = batches = 0
        first: int | None = None
        last: int | None = None
        while True:
            folded = await self._writer.transaction(lambda db: _fold_batch(db, before_ms, batch_rows))
            if folded is None:
                break
            stats, finished = folded
            batches += 1
            rows, requests, cost, charged = (rows + stats[0], requests + stats[1], cost + stats[2],
                                             charged + stats[3])
            first = stats[4] if first is None else min(first, stats[4])
            last = stats[5] if last is None else max(last, stats[5])
            if finished:
                break
        daily_rows = (await self._read("SELECT count(*) FROM usage_daily"))[0][0]
        return PruneResult(before=before, rows=rows, requests=requests, cost=cost, charged=charged,
                           first_day=_utc_date(first), last_day=_utc_date(last), batches=batches,
                           daily_rows=daily_rows)

    async def audit(self) -> list[str]:
        problems: list[str] = []
        checks = (
            ("SELECT b.user_id, b.balance, coalesce((SELECT sum(amount) FROM ledger l WHERE l.user_id = b.user_id), 0) "
             "AS total FROM balances b WHERE b.balance != total",
             "user {0}: balance {1} differs from the ledger's sum {2}"),
            ("SELECT b.user_id, b.held, coalesce((SELECT sum(amount) FROM holds h WHERE h.user_id = b.user_id), 0) "
             "AS total FROM balances b WHERE b.held != total",
             "user {0}: held {1} differs from the open holds' sum {2}"),
            ("SELECT user_id, balance, held FROM balances WHERE balance < 0 OR held < 0 OR held > balance",
             "user {0}: balance {1} / held {2} break balance >= held >= 0"),
            ("SELECT id, user_id, balance_after, running FROM (SELECT id, user_id, balance_after, "
             "sum(amount) OVER (PARTITION BY user_id ORDER BY id) AS running FROM ledger) "
             "WHERE balance_after != running",
             "ledger row {0} (user {1}): balance_after {2} differs from the running sum {3}"),
            # A charge whose usage row is gone was folded by `usage prune`: the next check covers it.
            ("SELECT l.id, -l.amount, u.charged FROM ledger l LEFT JOIN usage u ON u.id = l.usage_id "
             "WHERE l.kind = 'charge' AND (l.usage_id IS NULL OR u.charged != -l.amount OR u.user_id != l.user_id)",
             "ledger charge {0} of {1} does not match its usage row (charged {2})"),
            ("SELECT user_id, sum(charges), sum(in_ledger), sum(folded_charges), sum(folded) FROM ("
             "SELECT l.user_id, 1 AS charges, -l.amount AS in_ledger, 0 AS folded_charges, 0 AS folded FROM ledger l "
             "WHERE l.kind = 'charge' AND l.usage_id IS NOT NULL "
             "AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.id = l.usage_id) "
             "UNION ALL SELECT user_id, 0, 0, charges, charged FROM usage_daily) "
             "GROUP BY user_id HAVING sum(charges) != sum(folded_charges) OR sum(in_ledger) != sum(folded)",
             "user {0}: the ledger has {1} charges of {2} for usage rows no longer kept, the daily aggregates "
             "{3} of {4}"),
            ("SELECT u.id, u.charged FROM usage u LEFT JOIN ledger l ON l.usage_id = u.id "
             "WHERE u.charged > 0 AND l.id IS NULL",
             "usage row {0} charged {1} but has no ledger row"),
            ("SELECT id, cost, charged FROM usage WHERE charged > cost OR charged < 0",
             "usage row {0}: charged {2} is more than its cost {1}"),
        )
        for sql, message in checks:
            for row in await self._read(sql):
                problems.append(message.format(*row))
        return problems


@dataclass(slots=True)
class _Group:
    """One report group being summed: the ten sums, and p50, p95 latency and p50 ttft of its live rows."""

    sums: list[int] = field(default_factory=lambda: [0] * 10)
    percentiles: tuple[int | None, ...] = (None, None, None)

    def add(self, sums: Sequence[Any]) -> None:
        for i, value in enumerate(sums):
            self.sums[i] += value or 0

    def row(self, group: dict[str, str], percentiles: bool) -> ReportRow:
        s = self.sums
        p50, p95, ttft = self.percentiles if percentiles else (None, None, None)
        return ReportRow(group=group, requests=s[0], errors=s[1], prompt_tokens=s[2], completion_tokens=s[3],
                         cached_tokens=s[4], cache_write_tokens=s[5], reasoning_tokens=s[6], cost=s[7],
                         avg_latency_ms=s[8] / s[9] if s[9] else 0.0, p50_latency_ms=p50, p95_latency_ms=p95,
                         p50_ttft_ms=ttft)


def _utc_date(ms: int | None) -> date | None:
    return None if ms is None else (EPOCH + timedelta(milliseconds=ms)).date()


def _percentiles(text: str | None, percents: Sequence[int], total: Counter[int]) -> list[int | None]:
    """Nearest-rank percentiles of one group's values (a group_concat list), also counted into
    ``total``. Up to SORTED_TEXT_MAX characters the values are sorted as a list (fastest); a larger
    group is counted 64 kB at a time, so memory stays near the text (about 5 bytes a value), never a
    million Python objects."""
    if not text:
        return [None] * len(percents)
    if len(text) <= SORTED_TEXT_MAX:
        values = list(map(int, text.split(",")))
        total.update(values)
        values.sort()
        return [values[(len(values) * p + 99) // 100 - 1] for p in percents]
    counts: Counter[int] = Counter()
    start, size = 0, len(text)
    while start < size:
        end = text.find(",", min(start + 65_536, size))
        end = size if end < 0 else end
        values = list(map(int, text[start:end].split(",")))
        counts.update(values)
        total.update(values)
        start = end + 1
    return _nearest_rank(counts, percents)


def _nearest_rank(counts: Counter[int], percents: Sequence[int]) -> list[int | None]:
    """The p-th percentiles of the counted values: the smallest value with at least ceil(p% of n)
    values at or below it (nearest rank: always an observed value, no interpolation)."""
    values = sorted(counts)
    cumulative = list(accumulate(counts[v] for v in values))
    if not cumulative:
        return [None] * len(percents)
    n = cumulative[-1]
    return [values[bisect_left(cumulative, (n * p + 99) // 100)] for p in percents]


def _label(dimension: str, value: Any, emails: dict[int, str]) -> tuple[Any, str]:
    """(sort key, label) of one group value: days and hours in UTC; a folded day under `hour`
    is labelled with its date alone and sorts before that day's live hours."""
    if dimension == "day":
        return value, (EPOCH + timedelta(days=value)).date().isoformat()
    if dimension == "hour":
        hour, live = value
        moment = EPOCH + timedelta(hours=hour)
        return value, moment.strftime("%Y-%m-%d %H:00") if live else moment.date().isoformat()
    if dimension == "user":
        email = emails.get(value, str(value))
        return email, email
    if dimension == "key":
        return value, str(value)
    return str(value), str(value)


def _usage_where(alias: str, time_column: str, where: UsageFilter) -> tuple[str, list[Any]]:
    clauses, params = [f"{alias}.status != 'interrupted'"], []
    for clause, value in ((f"{time_column} >= ?", to_ms(where.since)), (f"{time_column} < ?", to_ms(where.until)),
                          (f"{alias}.user_id = ?", where.user_id), (f"{alias}.key_id = ?", where.key_id),
                          (f"{alias}.model = ?", where.model)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def _fold_batch(db: sqlite3.Connection, before_ms: int,
                limit: int) -> tuple[tuple[int, int, int, int, int, int], bool] | None:
    """Fold (and delete) the oldest ``limit`` or so usage rows made before ``before_ms``: all rows
    of one millisecond go together. Returns (rows, reported requests, cost, charged, first and
    last created_at) and whether nothing older is left, or None when there was nothing to fold."""
    first = db.execute("SELECT min(created_at) FROM usage WHERE created_at < ?", (before_ms,)).fetchone()[0]
    if first is None:
        return None
    row = db.execute("SELECT created_at FROM usage WHERE created_at < ? ORDER BY created_at LIMIT 1 OFFSET ?",
                     (before_ms, limit)).fetchone()
    cut = before_ms if row is None else max(row[0], first + 1)
    bad = db.execute(FOLD_MISMATCH_SQL, (cut,)).fetchone()
    if bad is not None:
        raise StoreError(f"usage row {bad[0]} does not match its ledger charge, so it was not folded (rows before "
                         "it were); `apibox db check` lists what is wrong")
    stats = db.execute("SELECT count(*), sum(status != 'interrupted'), sum(cost), sum(charged), min(created_at), "
                       "max(created_at) FROM usage WHERE created_at < ?", (cut,)).fetchone()
    db.execute(FOLD_SQL, (cut,))
    db.execute("DELETE FROM usage WHERE created_at < ?", (cut,))
    return tuple(stats), cut == before_ms  # type: ignore[return-value]


def _balance_in(db: sqlite3.Connection, user_id: int) -> Balance:
    rows = db.execute("SELECT balance, held FROM balances WHERE user_id = ?", (user_id,)).fetchall()
    if not rows:
        raise NotFound(f"no user with id {user_id}")
    return Balance(user_id, rows[0][0], rows[0][1])


def _insert_usage(db: sqlite3.Connection, usage: UsageRecord) -> None:
    values = [getattr(usage, f) for f in USAGE_FIELDS]
    values[1] = to_ms(usage.created_at)
    values[14] = int(usage.estimated)
    cursor = db.execute(
        f"INSERT INTO usage ({', '.join(USAGE_FIELDS)}) VALUES ({', '.join('?' * len(USAGE_FIELDS))})", values)
    usage.id = cursor.lastrowid


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
