"""The Store protocol in SQL both engines speak: users, keys, money, the admin log, instances.

Every write is a transaction script (``apibox.store.script``), so SQLite and PostgreSQL run
the same statements in the same order. The engines differ only in how a script is run, how
rows are read, and in ``row_locks``: PostgreSQL runs transactions side by side, so a script
that reads a balance before changing it first locks the row (``FOR UPDATE``); SQLite runs one
write transaction at a time, so the lock is a no-op there and is left out. (And in the
settlement and the hold of a key with a budget, which PostgreSQL runs as one call of a function
each: see ``postgres``.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, TypeVar

from apibox.errors import Conflict, InvalidRequest, NotFound, StoreError
from apibox.models import (
    ALL_USERS,
    EVERY,
    ApiKey,
    Balance,
    Hold,
    LedgerEntry,
    LedgerKind,
    Page,
    UsageRecord,
    User,
    UserFilter,
    UserOverview,
    UserState,
)
from apibox.money import MAX_STORED_MICRO, format_usd
from apibox.offloop import off_the_loop
from apibox.store.base import KEY_SETTINGS, Credit, CreditResult, KeySpec
from apibox.store.script import IntegrityViolation, Row, Script, Want, single
from apibox.store.sql_records import SqlRecords
from apibox.store.sql_reports import SqlReports
from apibox.store.sqltime import from_ms, now_ms, to_ms

USER_COLUMNS = "u.id, u.email, u.name, u.grp, u.state, u.state_reason, u.created_at"
KEY_COLUMNS = ("k.id, k.user_id, k.name, k.prefix, k.models, k.budget, k.spent, k.expires_at, k.rpm, k.tpm, "
               "k.concurrency, k.allow_ips, k.revoked_at, k.created_at, k.last_used_at")
LEDGER_COLUMNS = "id, user_id, kind, amount, balance_after, note, reference, actor, usage_id, created_at"
USAGE_FIELDS = ("request_id", "created_at", "user_id", "key_id", "model", "provider", "endpoint", "status",
                "http_status", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                "reasoning_tokens", "estimated", "cost", "charged", "latency_ms", "ttft_ms")
_usage_fields = attrgetter(*USAGE_FIELDS)
INSERT_USAGE_SQL = f"INSERT INTO usage ({', '.join(USAGE_FIELDS)}) VALUES ({', '.join('?' * len(USAGE_FIELDS))})"
RELEASE_SQL = "DELETE FROM holds WHERE id = ?"  # the holds_release trigger lowers balances.held
# The hold: inserted only if the available balance covers it and the key's budget (if any) does,
# net of the key's spend and its other holds; the holds_take trigger raises balances.held.
HOLD_SQL = (
    "INSERT INTO holds (user_id, key_id, amount, request_id, model, created_at, instance) "
    "SELECT b.user_id, k.id, CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT), "
    "CAST(? AS TEXT) FROM balances b JOIN api_keys k ON k.id = ? AND k.user_id = b.user_id "
    "WHERE b.user_id = ? AND b.balance - b.held >= ? AND (k.budget IS NULL OR "
    "k.budget - k.spent - (SELECT coalesce(sum(h.amount), 0) FROM holds h WHERE h.key_id = k.id) >= ?)")
KEY_SPEND_SQL = "UPDATE api_keys SET spent = spent + ?, last_used_at = ? WHERE id = ?"
KEY_HEADROOM_SQL = ("SELECT k.budget - k.spent - (SELECT coalesce(sum(h.amount), 0) FROM holds h "
                    "WHERE h.key_id = k.id) FROM api_keys k WHERE k.id = ? AND k.budget IS NOT NULL")
CHARGE_BALANCE_SQL = "UPDATE balances SET balance = balance - ? WHERE user_id = ?"
CHARGE_LEDGER_SQL = ("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, note, actor, usage_id) "
                     "SELECT user_id, ?, 'charge', ?, balance, ?, 'gateway', ? FROM balances WHERE user_id = ?")
# A stored value to its enum member: a dict lookup takes 0.08 us, calling the enum (``UserState(value)``)
# 0.9 us, paid once a row by a list of 100,000 users or a 40,000-entry statement.
USER_STATES = {state.value: state for state in UserState}
LEDGER_KINDS = {kind.value: kind for kind in LedgerKind}
# A gateway whose heartbeat is older than this is taken for dead: its holds are released.
INSTANCE_STALE_MS = 120_000
T = TypeVar("T")


def _split(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _limit(page: Page) -> str:
    """The LIMIT clause of a page (none for every item; a whole number, so safe to write in)."""
    return "" if page.limit is None else f" LIMIT {int(page.limit)}"


def _overview(row: Row) -> UserOverview:
    """A user with the balance and the count of live keys ``list_users`` reads with it."""
    return UserOverview(_user(row), Balance(row[0], row[7], row[8]), row[9])


def _user(row: Row) -> User:
    return User(id=row[0], email=row[1], name=row[2], group=row[3], state=USER_STATES[row[4]],
                state_reason=row[5], created_at=from_ms(row[6]))  # type: ignore[arg-type]


def _key(row: Row) -> ApiKey:
    return ApiKey(id=row[0], user_id=row[1], name=row[2], prefix=row[3], models=_split(row[4]), budget=row[5],
                  spent=row[6], expires_at=from_ms(row[7]), rpm=row[8], tpm=row[9], concurrency=row[10],
                  allow_ips=_split(row[11]), revoked_at=from_ms(row[12]), created_at=from_ms(row[13]),
                  last_used_at=from_ms(row[14]))


def _entry(row: Row) -> LedgerEntry:
    return LedgerEntry(id=row[0], user_id=row[1], kind=LEDGER_KINDS[row[2]], amount=row[3], balance_after=row[4],
                       note=row[5], reference=row[6], actor=row[7], usage_id=row[8],
                       created_at=from_ms(row[9]))  # type: ignore[arg-type]


class SqlStore(SqlRecords, SqlReports):
    """Everything but connections: an engine subclass supplies ``_read``, ``_run`` and ``row_locks``."""

    row_locks = False  # True where write transactions run concurrently (PostgreSQL)
    _instance = ""  # the gateway instance that owns the holds this store takes ("" for the CLI)
    _instance_started: tuple[str, int, int] = ("", 0, 0)  # its host, pid and start (ms)

    async def _run(self, script: Callable[[], Script[T]], *, durable: bool = True) -> T:
        """Run ``script()`` all-or-nothing and return its result once committed. An engine may
        start it again from the top after a deadlock or serialization failure. ``durable=False``
        (holds and settlements): the engine may answer before the commit reaches the disk, so the
        user's balance row is locked for the transaction's work only (see docs/BILLING.md)."""
        raise NotImplementedError

    async def _run_to_the_end(self, script: Callable[[], Script[T]]) -> T:
        """``_run(script, durable=False)``, finished even if the awaiting task is cancelled meanwhile
        (a settlement records money already spent); ``close`` waits for it. Only ``settle`` calls it
        (PostgreSQL, which settles in one call of a function, does without)."""
        raise NotImplementedError

    async def _import_rows(self, batches: Any) -> None:
        """Insert ``(table, rows)`` batches (``db copy``) in one transaction, ids as given."""
        raise NotImplementedError

    async def _run_statement(self, sql: str, params: Sequence[Any], *, durable: bool = True,
                             want: Want | None = None) -> list[Row]:
        """One statement as a transaction of its own (``_run`` of ``single``); it raises
        IntegrityViolation when it breaks a constraint. An engine may run a non-durable one without
        a transaction around it (PostgreSQL: one round trip instead of three)."""
        return await self._run(lambda: single(sql, params, want), durable=durable)

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._run_statement(sql, params)

    @property
    def _lock(self) -> str:
        # Nothing references balances or api_keys by a changing key, so the weaker lock is enough.
        return " FOR NO KEY UPDATE" if self.row_locks else ""

    async def ping(self) -> None:
        await self._read("SELECT 1")

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, email: str, name: str, group: str) -> User:
        def insert() -> Script[int]:
            try:
                rows = yield ("INSERT INTO users (email, name, grp, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                              (email, name, group, now_ms()))
            except IntegrityViolation:
                raise Conflict(f"a user with email {email} already exists") from None
            yield "INSERT INTO balances (user_id) VALUES (?)", (rows[0][0],)
            return int(rows[0][0])
        return await self._require_user(await self._run(insert))

    async def get_user(self, user_id: int) -> User | None:
        rows = await self._read(f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?", (user_id,))
        return _user(rows[0]) if rows else None

    async def find_user_by_email(self, email: str) -> User | None:
        rows = await self._read(f"SELECT {USER_COLUMNS} FROM users u WHERE u.email = ?", (email,))
        return _user(rows[0]) if rows else None

    async def list_users(self, page: Page = EVERY, only: UserFilter = ALL_USERS) -> list[UserOverview]:
        conditions, params = ["u.id > ?"], [page.after]
        for condition, value in (("u.state = ?", only.state and only.state.value), ("u.grp = ?", only.group),
                                 ("b.balance - b.held < ?", only.below)):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        return await self._read_each(
            _overview,
            f"SELECT {USER_COLUMNS}, b.balance, b.held, "
            "(SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL) "
            f"FROM users u JOIN balances b ON b.user_id = u.id WHERE {' AND '.join(conditions)} ORDER BY u.id"
            + _limit(page), params)

    async def _read_each(self, convert: Callable[[Row], T], sql: str, params: Sequence[Any] = ()) -> list[T]:
        """The rows of a statement that may return many (a listing), each made an object: off the
        event loop when they are many (``offloop``)."""
        rows = await self._read(sql, params)
        return await off_the_loop(lambda: [convert(r) for r in rows], len(rows))

    async def update_user(self, user_id: int, *, name: str | None, group: str | None) -> User:
        await self._write("UPDATE users SET name = coalesce(?, name), grp = coalesce(?, grp) WHERE id = ?",
                          (name, group, user_id))
        return await self._require_user(user_id)

    async def set_user_state(self, user_id: int, state: UserState, reason: str) -> User:
        await self._write("UPDATE users SET state = ?, state_reason = ? WHERE id = ?", (state.value, reason, user_id))
        return await self._require_user(user_id)

    async def _require_user(self, user_id: int) -> User:
        user = await self.get_user(user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}")
        return user

    # -- keys ----------------------------------------------------------------------------

    async def create_key(self, spec: KeySpec) -> ApiKey:
        rows = await self._write(
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

    async def list_keys(self, user_id: int | None = None, page: Page = EVERY) -> list[ApiKey]:
        mine = "" if user_id is None else " AND k.user_id = ?"
        params = (page.after,) if user_id is None else (page.after, user_id)
        return await self._read_each(
            _key, f"SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id > ?{mine} ORDER BY k.id" + _limit(page), params)

    async def update_key(self, key_id: int, settings: Mapping[str, Any]) -> ApiKey:
        unknown = set(settings) - set(KEY_SETTINGS)
        if unknown or not settings:
            raise ValueError(f"not key settings: {sorted(unknown) or 'none given'}")
        encode = {"models": ",".join, "allow_ips": ",".join, "expires_at": to_ms}
        columns = ", ".join(f"{name} = ?" for name in settings)  # names from KEY_SETTINGS only
        values = [encode[name](value) if name in encode else value for name, value in settings.items()]
        await self._write(f"UPDATE api_keys SET {columns} WHERE id = ?", (*values, key_id))
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"no key with id {key_id}")
        return key

    async def revoke_key(self, key_id: int) -> ApiKey:
        await self._write("UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (now_ms(), key_id))
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"no key with id {key_id}")
        return key

    async def revoke_user_keys(self, user_id: int) -> int:
        rows = await self._write(
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

    def _record_and_release(self, usage: UsageRecord, created: int, hold: Hold) -> Script[bool]:
        """The usage row, then the hold's release (its trigger lowers ``balances.held``): whether the
        hold was still there to release."""
        yield from _insert_usage(usage, created)
        return _changed((yield RELEASE_SQL, (hold.id,), Want.COUNT))

    def _charge(self, hold: Hold, amount: int, created: int, note: str, usage_id: int | None) -> Script[None]:
        """Take a settlement's ``amount``: from the balance, with its ledger row (the balance after),
        and into the key's spend. The ledger row reads the new balance itself: SQLite's ``RETURNING``
        would buffer it in a temporary b-tree (the two statements cost a third less this way)."""
        if not _changed((yield CHARGE_BALANCE_SQL, (amount, hold.user_id), Want.COUNT)):
            raise no_balance(hold.user_id)
        yield CHARGE_LEDGER_SQL, (created, -amount, note, usage_id, hold.user_id)
        yield KEY_SPEND_SQL, (amount, created, hold.key_id)

    def _balance(self, user_id: int) -> Script[Balance]:
        rows = yield f"SELECT balance, held FROM balances WHERE user_id = ?{self._lock}", (user_id,)
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return Balance(user_id, rows[0][0], rows[0][1])

    async def credit(self, credit: Credit) -> CreditResult:
        def apply() -> Script[CreditResult]:
            if credit.reference is not None:
                rows = yield f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE reference = ?", (credit.reference,)
                if rows:
                    entry = _entry(rows[0])
                    if entry.user_id != credit.user_id or entry.amount != credit.amount:
                        raise Conflict(f"reference {credit.reference!r} was already used for a different "
                                       "user or amount; nothing was credited")
                    return CreditResult(entry, (yield from self._balance(credit.user_id)), created=False)
            # One conditional statement: a debit can never take the balance below what is held.
            rows = yield ("UPDATE balances SET balance = balance + ? WHERE user_id = ? AND balance + ? >= held "
                          "RETURNING balance, held", (credit.amount, credit.user_id, credit.amount))
            if not rows:
                current = yield from self._balance(credit.user_id)
                raise InvalidRequest(
                    f"the balance cannot go below zero or below the amount held for requests in flight "
                    f"(balance {format_usd(current.balance)} USD, held {format_usd(current.held)} USD); "
                    "nothing was changed")
            balance = Balance(credit.user_id, rows[0][0], rows[0][1])
            try:
                entry_rows = yield (
                    f"INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, note, reference, actor) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {LEDGER_COLUMNS}",
                    (credit.user_id, now_ms(), credit.kind.value, credit.amount, balance.balance, credit.note,
                     credit.reference, credit.actor))
            except IntegrityViolation:  # the same reference, credited at this very moment by another process
                raise Conflict(f"reference {credit.reference!r} is being credited by another request; "
                               "nothing was credited twice") from None
            return CreditResult(_entry(entry_rows[0]), balance, created=True)
        return await self._run(apply)

    async def ledger(self, user_id: int, since: datetime | None = None,
                     until: datetime | None = None, page: Page = EVERY) -> list[LedgerEntry]:
        sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE user_id = ? AND created_at >= ? AND id > ?"
        params: list[Any] = [user_id, to_ms(since) or 0, page.after]
        if until is not None:
            sql += " AND created_at < ?"
            params.append(to_ms(until))
        return await self._read_each(_entry, sql + " ORDER BY id" + _limit(page), params)

    async def ledger_sum(self, user_id: int, before: datetime) -> int:
        rows = await self._read("SELECT coalesce(sum(amount), 0) FROM ledger WHERE user_id = ? AND created_at < ?",
                                (user_id, to_ms(before)))
        return int(rows[0][0])

    async def hold(self, user_id: int, key_id: int, amount: int, request_id: str, model: str, *,
                   budgeted: bool = True) -> Hold | None:
        params = (amount, request_id, model, now_ms(), self._instance, key_id, user_id, amount, amount)
        try:
            rows = await self._run_statement(HOLD_SQL, params, durable=False, want=Want.NEW_ID)
        except IntegrityViolation:
            # PostgreSQL, concurrent holds: this one read the balance before another's hold committed,
            # and the holds_take trigger found held > balance (the CHECK). The money is not there.
            return None
        return Hold(rows[0][0], user_id, key_id, amount, request_id, budgeted) if rows else None

    async def settle(self, hold: Hold, usage: UsageRecord) -> UsageRecord:
        created = settled_at(usage)  # once: three statements use it

        def apply() -> Script[UsageRecord]:
            # Releasing the hold frees at least its amount (held <= balance before), so a cost within
            # it is paid in full without reading the balance: the usual case. Its usage row then goes
            # first, before the DELETE's trigger (lowering balances.held) locks the user's balance
            # row. (PostgreSQL overrides this with one call of a function taking the same steps.)
            within_hold = usage.cost <= hold.amount and not hold.budgeted
            if within_hold:
                usage.charged = usage.cost
                released = yield from self._record_and_release(usage, created, hold)
            else:
                released = _changed((yield RELEASE_SQL, (hold.id,), Want.COUNT))
            if not released:
                raise already_settled(hold)
            if not within_hold:  # capped at what the user has, and at what the key's budget has left now
                try:
                    available = (yield from self._balance(hold.user_id)).available
                except NotFound:
                    raise no_balance(hold.user_id) from None
                usage.charged = min(usage.cost, available, (yield from self._budget_left(hold.key_id)))
                yield from _insert_usage(usage, created)
            if usage.charged > 0:
                yield from self._charge(hold, usage.charged, created, charge_note(usage), usage.id)
            else:
                yield KEY_SPEND_SQL, (0, created, hold.key_id)  # nothing spent, but the key was used
            return usage
        return await self._run_to_the_end(apply)

    async def key_headroom(self, key_id: int) -> int | None:
        rows = await self._read(KEY_HEADROOM_SQL, (key_id,))
        return max(0, int(rows[0][0])) if rows else None

    def _budget_left(self, key_id: int) -> Script[int]:
        """What the key's budget has left after its spend and its other open holds (no limit
        without a budget), inside a settlement's transaction."""
        rows = yield KEY_HEADROOM_SQL, (key_id,)
        return max(0, int(rows[0][0])) if rows else MAX_STORED_MICRO

    # -- gateway instances and their holds --------------------------------------------------

    async def register_instance(self, instance: str, host: str, pid: int) -> None:
        """Record a running gateway; the holds this store takes from now on belong to it."""
        self._instance, self._instance_started = instance, (host, pid, now_ms())
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """Tell other instances this one is alive (and so are its holds). An upsert: an instance taken
        for dead after a long stall (its row reaped, its holds released) is alive again from here on."""
        if self._instance:
            host, pid, started = self._instance_started
            await self._write("INSERT INTO instances (id, host, pid, started_at, seen_at) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                              (self._instance, host, pid, started, now_ms()))

    async def retire_instance(self) -> None:
        """A clean stop, after every request was settled: the instance leaves no holds behind."""
        if self._instance:
            await self._write("DELETE FROM instances WHERE id = ?", (self._instance,))
            self._instance = ""

    async def recover_holds(self, stale_ms: int = INSTANCE_STALE_MS) -> list[Hold]:
        """Release the holds of gateways that are gone (no heartbeat for ``stale_ms``, or never
        registered, as the CLI's) and log each as an interrupted request. Live instances' holds stay."""
        def apply() -> Script[list[Hold]]:
            cutoff = now_ms() - stale_ms
            yield "DELETE FROM instances WHERE seen_at < ? AND id != ?", (cutoff, self._instance)
            rows = yield ("DELETE FROM holds WHERE instance NOT IN (SELECT id FROM instances) "
                          "RETURNING id, user_id, key_id, amount, request_id, model", ())
            now = datetime.now(UTC)
            for row in rows:
                yield from _insert_usage(UsageRecord(
                    request_id=row[4], user_id=row[1], key_id=row[2], model=row[5], provider="", endpoint="",
                    status="interrupted", http_status=0, created_at=now), to_ms(now))
            return [Hold(r[0], r[1], r[2], r[3], r[4]) for r in rows]
        return await self._run(apply)

def settled_at(usage: UsageRecord) -> int:
    """The settlement's time in ms, also set on ``usage`` when its caller left it empty (now)."""
    usage.created_at = usage.created_at or datetime.now(UTC)
    created = to_ms(usage.created_at)
    assert created is not None
    return created


def charge_note(usage: UsageRecord) -> str:
    """The note of a settlement's ledger charge: the model and the request."""
    return f"{usage.model} {usage.request_id}"


def already_settled(hold: Hold) -> StoreError:
    """A settlement found its hold gone: settled (or released) before."""
    return StoreError(f"hold {hold.id} of request {hold.request_id} is already settled or released; "
                      "nothing was charged again")


def no_balance(user_id: int) -> StoreError:
    """A settlement's charge found no balance row for its user (never written without one)."""
    return StoreError(f"user {user_id} has no balance to charge; nothing was charged")


def usage_values(usage: UsageRecord, created: int) -> list[Any]:
    """The usage row's values in ``USAGE_FIELDS`` order; ``created``: its ``created_at`` in ms,
    which the settlement's other rows share."""
    values = list(_usage_fields(usage))
    values[1] = created
    values[14] = int(usage.estimated)
    return values


def _changed(rows: list[Row]) -> bool:
    """Whether a statement asked for its ``Want.COUNT`` changed any row."""
    return bool(rows[0][0])


def _insert_usage(usage: UsageRecord, created: int) -> Script[None]:
    rows = yield INSERT_USAGE_SQL, usage_values(usage, created), Want.NEW_ID
    usage.id = rows[0][0]
