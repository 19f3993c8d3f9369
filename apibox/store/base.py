"""The Store protocol: every database operation apibox needs, at the level of the domain.

Methods take and return dataclasses from ``apibox.models``, never rows. Each money-moving
method is atomic on its own: callers never compose a balance change out of several calls.
``SqlStore`` implements it once in SQL both engines speak; ``SqliteStore`` and
``PostgresStore`` run it, and the whole test suite runs against both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

from apibox.models import (
    ALL_USERS,
    EVERY,
    AdminAction,
    ApiKey,
    Balance,
    Hold,
    LedgerEntry,
    LedgerKind,
    Page,
    ReportRow,
    StoredResponse,
    UsageRecord,
    User,
    UserFilter,
    UserOverview,
    UserState,
)

REPORT_DIMENSIONS = ("day", "hour", "model", "user", "key", "provider")
# Told how long work is getting on: (what, done, total), from the start (0 done) to the end (total done).
ProgressFn = Callable[[str, int, int], None]


# What `keys update` may change on a key: KeySpec's fields, but its owner and its secret.
KEY_SETTINGS = ("name", "models", "budget", "expires_at", "rpm", "tpm", "concurrency", "allow_ips")


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Everything `keys create` can set on a key, minus the secret (only its hash is stored)."""

    user_id: int
    key_hash: str
    prefix: str
    name: str = ""
    models: tuple[str, ...] = ()
    budget: int | None = None
    expires_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    allow_ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Credit:
    """A top-up or an adjustment as the store records it."""

    user_id: int
    amount: int  # signed micro-USD
    kind: LedgerKind
    note: str = ""
    reference: str | None = None
    actor: str = "cli"


@dataclass(frozen=True, slots=True)
class CreditResult:
    entry: LedgerEntry
    balance: Balance
    created: bool  # False when the reference had already been credited (idempotent replay)


@dataclass(frozen=True, slots=True)
class UsageFilter:
    since: datetime | None = None
    until: datetime | None = None
    user_id: int | None = None
    key_id: int | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What `usage prune` folded into the daily aggregates (and deleted from the usage rows)."""

    before: datetime
    rows: int = 0  # usage rows folded and deleted
    requests: int = 0  # of which reports count (interrupted requests are not reported)
    cost: int = 0
    charged: int = 0
    first_day: date | None = None
    last_day: date | None = None
    batches: int = 0  # transactions it took
    daily_rows: int = 0  # rows in the aggregate table afterwards
    responses: int = 0  # stored responses made before the cut, forgotten with the rows


class Store(Protocol):
    async def close(self) -> None: ...
    async def migrate(self) -> list[str]: ...
    async def pending_migrations(self) -> list[str]: ...
    async def ping(self) -> None: ...

    async def create_user(self, email: str, name: str, group: str) -> User: ...
    async def get_user(self, user_id: int) -> User | None: ...
    async def find_user_by_email(self, email: str) -> User | None: ...
    async def list_users(self, page: Page = EVERY, only: UserFilter = ALL_USERS) -> list[UserOverview]: ...
    async def update_user(self, user_id: int, *, name: str | None, group: str | None) -> User: ...
    async def set_user_state(self, user_id: int, state: UserState, reason: str) -> User: ...

    async def create_key(self, spec: KeySpec) -> ApiKey: ...
    async def get_key(self, key_id: int) -> ApiKey | None: ...
    async def list_keys(self, user_id: int | None = None, page: Page = EVERY) -> list[ApiKey]: ...
    async def update_key(self, key_id: int, settings: Mapping[str, Any]) -> ApiKey:
        """Set some of a key's ``KEY_SETTINGS`` (by name, with ``KeySpec``'s types)."""
        ...
    async def revoke_key(self, key_id: int) -> ApiKey: ...
    async def revoke_user_keys(self, user_id: int) -> int: ...
    async def find_key_by_hash(self, key_hash: str) -> tuple[ApiKey, User] | None: ...

    async def get_balance(self, user_id: int) -> Balance: ...
    async def credit(self, credit: Credit) -> CreditResult: ...
    async def ledger(self, user_id: int, since: datetime | None = None,
                     until: datetime | None = None, page: Page = EVERY) -> list[LedgerEntry]: ...
    async def ledger_sum(self, user_id: int, before: datetime) -> int:
        """The sum of a user's ledger entries made before ``before``: the balance at that moment."""
        ...

    async def hold(self, user_id: int, key_id: int, amount: int, request_id: str, model: str, *,
                   budgeted: bool = True) -> Hold | None:
        """Set ``amount`` aside if the user's available balance (and the key's budget) covers it, else
        return None. ``budgeted=False`` says the key has no budget (as the caller last read it: a budget
        set meanwhile applies from its next read of the key), so an engine need not lock or check it."""
        ...

    async def settle(self, hold: Hold, usage: UsageRecord) -> UsageRecord:
        """Release the hold, charge ``usage.cost`` (capped at what the user has), write the
        usage row and its ledger row, all in one transaction. Returns the record as written."""
        ...

    async def register_instance(self, instance: str, host: str, pid: int) -> None:
        """Record a running gateway; the holds this store takes from now on belong to it."""
        ...

    async def heartbeat(self) -> None:
        """Mark this store's gateway instance alive, so no other instance reaps its holds."""
        ...

    async def retire_instance(self) -> None:
        """A clean stop (every request settled): forget this instance."""
        ...

    async def recover_holds(self) -> list[Hold]:
        """Release the open holds of gateways that are gone (no heartbeat for two minutes, or never
        registered) and log each as an interrupted request; live gateways' holds stay."""
        ...

    async def remember_response(self, stored: StoredResponse) -> None:
        """Record that the upstream keeps a response for this user (its first record stands)."""
        ...

    async def stored_response(self, response_id: str) -> StoredResponse | None:
        """Whose a stored response is, and where; None when apibox never saw it (or forgot it)."""
        ...

    async def forget_response(self, response_id: str) -> None:
        """A stored response deleted upstream: nobody may refer to it any more."""
        ...

    async def key_headroom(self, key_id: int) -> int | None:
        """What the key's budget still allows after its spend and open holds (None: no budget)."""
        ...

    async def log_admin_action(self, actor: str, action: str, target: str, before: dict[str, Any] | None,
                               after: dict[str, Any] | None) -> None: ...
    async def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]:
        """The admin log, newest first: ``limit`` entries, those older than entry ``before`` when given."""
        ...

    async def usage_report(self, by: Sequence[str], where: UsageFilter, *,
                           percentiles: bool = False) -> list[ReportRow]:
        """Usage grouped by ``by`` (REPORT_DIMENSIONS), over the live rows and the daily aggregates
        that `prune` folded them into, interrupted requests left out. A folded row counts at the
        start (UTC midnight) of its day for ``where.since/until``; grouped by hour, a folded day is
        one group labelled with the date alone. Percentiles only when asked (they cost a pass)."""
        ...

    async def usage_summary(self, by: Sequence[str], where: UsageFilter) -> tuple[list[ReportRow], ReportRow]:
        """``usage_report`` with percentiles, and the total of every group (its percentiles exact too)."""
        ...

    async def prune_usage(self, before: datetime, *, progress: ProgressFn | None = None) -> PruneResult:
        """Fold the usage rows made before ``before`` into the daily aggregates and delete them,
        a batch at a time, each batch in one transaction (so no report ever sees a row twice or not
        at all). Refuses rows whose ledger charge does not match them. ``progress``: told the rows
        folded so far, of those there were to fold, after each batch. The stored responses made
        before ``before`` are forgotten too (their users may no longer continue them)."""
        ...

    async def audit(self, progress: ProgressFn | None = None) -> list[str]:
        """Every broken money invariant, as sentences; empty when the books are right. ``progress``:
        told the checks done so far (each is a pass over a table: seconds at a million rows)."""
        ...
