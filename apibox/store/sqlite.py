"""The SQLite store (aiosqlite): WAL, foreign keys, a busy timeout, CHECK-guarded money.

One write connection, used under an asyncio lock so a transaction from one coroutine never
interleaves with statements from another; one read connection for lookups and reports
(WAL lets it read while the writer writes).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
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
    UsageRecord,
    User,
    UserOverview,
    UserState,
)
from apibox.money import format_usd
from apibox.store.base import Credit, CreditResult, KeySpec
from apibox.store.migrations import SQLITE_MIGRATIONS, Migration
from apibox.store.sqlite_reports import SqliteReports
from apibox.store.sqlite_writer import SqliteWriter
from apibox.store.sqltime import from_ms, now_ms, to_ms

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA foreign_keys=ON",
           "PRAGMA busy_timeout=10000")

USER_COLUMNS = "u.id, u.email, u.name, u.grp, u.state, u.state_reason, u.created_at"
KEY_COLUMNS = ("k.id, k.user_id, k.name, k.prefix, k.models, k.budget, k.spent, k.expires_at, k.rpm, k.tpm, "
               "k.concurrency, k.allow_ips, k.revoked_at, k.created_at, k.last_used_at")
LEDGER_COLUMNS = "id, user_id, kind, amount, balance_after, note, reference, actor, usage_id, created_at"
USAGE_FIELDS = ("request_id", "created_at", "user_id", "key_id", "model", "provider", "endpoint", "status",
                "http_status", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                "reasoning_tokens", "estimated", "cost", "charged", "latency_ms", "ttft_ms")

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


class SqliteStore(SqliteReports):
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
