"""Plain dataclasses that the store returns and the use-cases pass around.

Amounts are micro-USD integers; times are UTC ``datetime`` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class UserState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    BANNED = "banned"
    CLOSED = "closed"


class LedgerKind(StrEnum):
    TOPUP = "topup"
    CHARGE = "charge"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str
    name: str
    group: str
    state: UserState
    state_reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Balance:
    user_id: int
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    user_id: int
    name: str
    prefix: str
    models: tuple[str, ...] = ()  # empty: every model
    budget: int | None = None  # micro-USD over the key's life
    spent: int = 0
    expires_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    allow_ips: tuple[str, ...] = ()
    revoked_at: datetime | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def status(self) -> str:
        return "revoked" if self.revoked_at else "active"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key as just created: the only object that ever carries the secret."""

    key: ApiKey
    secret: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    user_id: int
    kind: LedgerKind
    amount: int  # signed
    balance_after: int
    note: str
    reference: str | None
    actor: str
    usage_id: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Hold:
    """Money set aside for one request in flight."""

    id: int
    user_id: int
    key_id: int
    amount: int
    request_id: str
    # Its key has a budget: the settlement then caps the charge at what the budget has left even
    # within the hold, since the budget may have been lowered while the request was in flight.
    budgeted: bool = True


@dataclass(slots=True)
class UsageRecord:
    """One billed (or refused-mid-way) request: metadata only, never prompts or answers."""

    request_id: str
    user_id: int
    key_id: int
    model: str
    provider: str
    endpoint: str
    status: str  # ok | error | cut | client_gone | interrupted
    http_status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    cost: int = 0  # what the usage costs at the price
    charged: int = 0  # what was taken from the balance (cost, capped at what was there)
    latency_ms: int = 0
    ttft_ms: int | None = None
    created_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response the upstream keeps (OpenAI's Responses API stores them unless asked not to):
    whose it is and which upstream account has it. All users share the operator's account, so
    apibox alone knows the owner: only they may continue, read or delete it, and only there."""

    response_id: str
    user_id: int
    provider: str
    model: str  # apibox's name for the model that answered
    context_tokens: int = 0  # its input and output: what the upstream reads again when it is continued
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a usage report. ``cost`` is what was charged (the ledger's charges).

    Percentiles are nearest-rank (always an observed value) over the group's live usage rows;
    None when it has none (no rows kept, or for time to first token, no stream)."""

    group: dict[str, str]
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: int
    avg_latency_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    p50_latency_ms: int | None = None
    p95_latency_ms: int | None = None
    p50_ttft_ms: int | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Page:
    """A stretch of a listing, in id order: the items whose id is above ``after``, at most ``limit``
    of them (every one when None). A full page's last id is where the next one starts: unlike an
    offset, that skips and repeats nothing when items are added meanwhile."""

    after: int = 0
    limit: int | None = None

    def is_full(self, items: int) -> bool:
        """Whether a page of ``items`` may have more after it."""
        return self.limit is not None and items >= self.limit


EVERY = Page()


@dataclass(frozen=True, slots=True)
class UserFilter:
    """Which users a listing shows; each condition given narrows it."""

    state: UserState | None = None
    group: str | None = None
    below: int | None = None  # micro-USD: only users who have less than this to spend (balance less holds)


ALL_USERS = UserFilter()


@dataclass(frozen=True, slots=True)
class UserOverview:
    """A user with the figures lists show beside them."""

    user: User
    balance: Balance
    key_count: int


@dataclass(frozen=True, slots=True)
class AdminAction:
    """One entry of the admin log: who did what to which record, with its state before and after."""

    id: int
    created_at: datetime
    actor: str
    action: str
    target: str
    before: dict[str, object] | None
    after: dict[str, object] | None
