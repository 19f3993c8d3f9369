"""The Store contract, over the ``store`` fixture, on every engine (conftest's ``engine``).

The first part uses only the Store protocol. The last part ("under the protocol") reaches
under it with raw SQL (tests/dbquery.py, either engine): the append-only ledger, the CHECK
constraints, one-transaction settlement, and the audit finding tampering.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apibox import accounts
from apibox.errors import Conflict, InvalidRequest, NotFound, StoreError
from apibox.keys import generate_key, hash_key
from apibox.models import EVERY, ApiKey, Hold, LedgerKind, Page, UsageRecord, User, UserFilter, UserState
from apibox.store import open_store, sql_reports
from apibox.store.base import Credit, KeySpec, Store, UsageFilter
from apibox.store.migrations import MIGRATIONS
from apibox.store.script import IntegrityViolation
from apibox.store.sql_reports import _usage_where
from apibox.store.sql_store import (
    CHARGE_BALANCE_SQL,
    CHARGE_LEDGER_SQL,
    INSERT_USAGE_SQL,
    KEY_SPEND_SQL,
    RELEASE_SQL,
    no_balance,
)
from apibox.store.sqlite import HOLD_VALUES_SQL
from apibox.store.sqltime import from_ms, to_ms
from tests import dbquery
from tests.conftest import Databases, PostgresDatabase
from tests.dbquery import INTEGRITY_ERRORS, Connection, connect, tables

TABLES = {"users", "balances", "api_keys", "holds", "usage", "ledger"}


async def new_user(store: Store, email: str = "ann@example.com") -> User:
    return await store.create_user(email, "Ann", "default")


async def new_key(store: Store, user: User, **spec: object) -> ApiKey:
    secret = generate_key()
    return await store.create_key(KeySpec(user_id=user.id, key_hash=hash_key(secret), prefix=secret[:12],
                                          **spec))  # type: ignore[arg-type]


async def topup(store: Store, user: User, amount: int, reference: str | None = None) -> None:
    await store.credit(Credit(user.id, amount, LedgerKind.TOPUP, "test", reference))


def record(hold: Hold, cost: int, **fields: object) -> UsageRecord:
    values: dict[str, object] = {"model": "m", "provider": "p", "endpoint": "chat", "status": "ok", **fields}
    return UsageRecord(request_id=hold.request_id, user_id=hold.user_id, key_id=hold.key_id, cost=cost,
                       **values)  # type: ignore[arg-type]


async def funded(store: Store, amount: int) -> tuple[User, ApiKey]:
    user = await new_user(store)
    key = await new_key(store, user)
    await topup(store, user, amount)
    return user, key


async def usage_total(store: Store, user: User) -> tuple[int, int]:
    """(requests, sum of charged) of a user's non-interrupted usage rows."""
    rows = await store.usage_report([], UsageFilter(user_id=user.id))
    return (rows[0].requests, rows[0].cost) if rows else (0, 0)


# == the contract ==========================================================================

# -- schema --------------------------------------------------------------------------------

async def test_fixture_store_is_fully_migrated(store: Store) -> None:
    assert await store.pending_migrations() == []
    assert await store.migrate() == []  # nothing left to apply, nothing applied twice
    await store.ping()


async def test_migrations_apply_once_and_record_themselves(databases: Databases) -> None:
    url = databases.new(migrated=False)
    db = await open_store(url, migrate=False)
    try:
        assert await db.pending_migrations() == [m.name for m in MIGRATIONS]
        assert await db.migrate() == [m.name for m in MIGRATIONS]
        assert await db.pending_migrations() == []
        assert await db.migrate() == []
    finally:
        await db.close()
    again = await open_store(url)  # reopening migrates nothing and loses nothing
    try:
        assert await again.pending_migrations() == []
        assert await again.audit() == []
    finally:
        await again.close()


# -- users ---------------------------------------------------------------------------------

async def test_create_and_find_user(store: Store) -> None:
    user = await store.create_user("ann@example.com", "Ann", "vip")
    assert (user.email, user.name, user.group, user.state) == ("ann@example.com", "Ann", "vip", UserState.ACTIVE)
    assert await store.get_user(user.id) == user
    assert await store.find_user_by_email("ann@example.com") == user
    assert await store.get_user(user.id + 1000) is None
    assert await store.find_user_by_email("bob@example.com") is None
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held, balance.available) == (0, 0, 0)


async def test_duplicate_email_is_a_conflict(store: Store) -> None:
    first = await new_user(store)
    with pytest.raises(Conflict):
        await store.create_user("ann@example.com", "Other", "default")
    assert [o.user.id for o in await store.list_users()] == [first.id]


async def test_emails_are_unique_case_insensitively(store: Store) -> None:
    await accounts.create_user(store, "Ann@Example.com")
    with pytest.raises(Conflict):
        await accounts.create_user(store, "ANN@example.COM")


async def test_update_and_state(store: Store) -> None:
    user = await new_user(store)
    updated = await store.update_user(user.id, name=None, group="vip")
    assert (updated.name, updated.group) == ("Ann", "vip")
    suspended = await store.set_user_state(user.id, UserState.SUSPENDED, "unpaid")
    assert (suspended.state, suspended.state_reason) == (UserState.SUSPENDED, "unpaid")
    with pytest.raises(NotFound):
        await store.update_user(user.id + 99, name="x", group=None)


# -- keys ----------------------------------------------------------------------------------

async def test_keys_are_found_by_hash_only(store: Store) -> None:
    user = await new_user(store)
    secret = generate_key()
    key = await store.create_key(KeySpec(user_id=user.id, key_hash=hash_key(secret), prefix=secret[:12],
                                         name="ci", models=("a", "b"), budget=5_000_000, rpm=10,
                                         allow_ips=("10.0.0.0/8",)))
    found = await store.find_key_by_hash(hash_key(secret))
    assert found is not None
    found_key, found_user = found
    assert found_key == key and found_user == user
    assert (key.models, key.budget, key.rpm, key.allow_ips, key.spent) == (
        ("a", "b"), 5_000_000, 10, ("10.0.0.0/8",), 0)
    assert await store.find_key_by_hash(secret) is None  # the secret itself is not a lookup key
    assert await store.find_key_by_hash(hash_key(generate_key())) is None
    assert await store.get_key(key.id) == key
    assert key.prefix == secret[:12] and secret not in repr(key)


async def test_list_and_revoke_keys(store: Store) -> None:
    ann, bob = await new_user(store), await new_user(store, "bob@example.com")
    k1, k2, k3 = await new_key(store, ann), await new_key(store, ann), await new_key(store, bob)
    assert [k.id for k in await store.list_keys(ann.id)] == [k1.id, k2.id]
    assert [k.id for k in await store.list_keys()] == [k1.id, k2.id, k3.id]
    revoked = await store.revoke_key(k1.id)
    assert revoked.revoked_at is not None and revoked.status == "revoked"
    assert (await store.revoke_key(k1.id)).revoked_at == revoked.revoked_at  # revoking again keeps the time
    assert await store.revoke_user_keys(ann.id) == 1
    assert (await store.get_key(k3.id)).revoked_at is None  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await store.revoke_key(k3.id + 100)


async def test_a_keys_settings_change_and_nothing_else_does(store: Store) -> None:
    ann = await new_user(store)
    key = await new_key(store, ann, name="a", models=("m1",), budget=5, rpm=3, allow_ips=("10.0.0.0/8",))
    other = await new_key(store, ann)
    later = key.created_at + timedelta(days=3)
    changed = await store.update_key(key.id, {"models": ("m2", "m3"), "budget": None, "expires_at": later,
                                              "concurrency": 2, "allow_ips": ()})
    assert changed == replace(key, models=("m2", "m3"), budget=None, expires_at=later, concurrency=2, allow_ips=())
    assert await store.get_key(other.id) == other
    assert await store.update_key(key.id, {"name": "b"}) == replace(changed, name="b")
    with pytest.raises(ValueError):
        await store.update_key(key.id, {"key_hash": "x"})  # not a setting: never written
    with pytest.raises(NotFound):
        await store.update_key(other.id + 100, {"rpm": 1})


async def test_users_are_listed_by_state_group_and_what_they_have_to_spend(store: Store) -> None:
    ann, bob, cat = [await new_user(store, f"{name}@example.com") for name in ("ann", "bob", "cat")]
    for user, amount in ((ann, 5_000_000), (bob, 800_000), (cat, 2_000_000)):
        await store.credit(Credit(user.id, amount, LedgerKind.TOPUP))
    hold = await store.hold(cat.id, (await new_key(store, cat)).id, 1_500_000, "req-1", "m")  # 0.5 left to spend
    assert hold is not None
    await store.set_user_state(bob.id, UserState.SUSPENDED, "late")
    await store.update_user(ann.id, name=None, group="vip")

    async def listed(**only: Any) -> list[str]:
        return [o.user.email for o in await store.list_users(EVERY, UserFilter(**only))]
    assert await listed() == ["ann@example.com", "bob@example.com", "cat@example.com"]
    assert await listed(below=1_000_000) == ["bob@example.com", "cat@example.com"]  # cat's hold counts
    assert await listed(below=500_000) == []  # less than, not as much as
    assert await listed(state=UserState.SUSPENDED) == ["bob@example.com"]
    assert await listed(group="vip") == ["ann@example.com"]
    assert await listed(state=UserState.ACTIVE, below=1_000_000) == ["cat@example.com"]
    assert [o.user.email for o in await store.list_users(Page(after=bob.id, limit=5), UserFilter(below=10**7))] == [
        "cat@example.com"]
    await store.settle(hold, record(hold, 0))


async def test_listings_in_pages_are_the_whole_listing_in_order(store: Store) -> None:
    """Every page size splits users, keys (all, or one user's) and a ledger into pages that,
    joined, are the listing itself: none skipped, none twice."""
    users = [await new_user(store, f"u{i}@example.com") for i in range(5)]
    for owner in (users[0], users[1], users[0], users[2], users[0]):
        await new_key(store, owner)
    for amount in (1, 2, 3, 4):
        await store.credit(Credit(users[0].id, amount, LedgerKind.TOPUP))

    async def users_page(page: Page) -> list[int]:
        return [o.user.id for o in await store.list_users(page)]

    async def keys_page(page: Page) -> list[int]:
        return [k.id for k in await store.list_keys(None, page)]

    async def first_users_keys_page(page: Page) -> list[int]:
        return [k.id for k in await store.list_keys(users[0].id, page)]

    async def ledger_page(page: Page) -> list[int]:
        return [e.id for e in await store.ledger(users[0].id, page=page)]

    for read in (users_page, keys_page, first_users_keys_page, ledger_page):
        whole = await read(EVERY)
        assert len(whole) >= 3 and whole == sorted(whole), read.__name__
        for size in range(1, len(whole) + 2):
            pages, after = [], 0
            while not pages or len(pages[-1]) == size:
                pages.append(await read(Page(after=after, limit=size)))
                after = pages[-1][-1] if pages[-1] else after
            assert [i for page in pages for i in page] == whole, (read.__name__, size)
            assert len(pages) == len(whole) // size + 1, (read.__name__, size)


# -- credits and debits ---------------------------------------------------------------------

async def test_topup_writes_a_ledger_row(store: Store) -> None:
    user = await new_user(store)
    result = await store.credit(Credit(user.id, 10_000_000, LedgerKind.TOPUP, "first", "ref-1", "admin"))
    assert result.created
    assert (result.balance.balance, result.balance.held) == (10_000_000, 0)
    entry = result.entry
    assert (entry.kind, entry.amount, entry.balance_after, entry.note, entry.reference, entry.actor) == (
        LedgerKind.TOPUP, 10_000_000, 10_000_000, "first", "ref-1", "admin")
    assert await store.ledger(user.id) == [entry]


async def test_credit_is_idempotent_by_reference(store: Store) -> None:
    user = await new_user(store)
    first = await store.credit(Credit(user.id, 5_000_000, LedgerKind.TOPUP, reference="stripe-42"))
    again = await store.credit(Credit(user.id, 5_000_000, LedgerKind.TOPUP, reference="stripe-42"))
    assert first.created and not again.created
    assert again.entry == first.entry
    assert (await store.get_balance(user.id)).balance == 5_000_000
    assert len(await store.ledger(user.id)) == 1


async def test_reused_reference_with_another_amount_or_user_is_a_conflict(store: Store) -> None:
    ann, bob = await new_user(store), await new_user(store, "bob@example.com")
    await store.credit(Credit(ann.id, 5_000_000, LedgerKind.TOPUP, reference="r"))
    with pytest.raises(Conflict):
        await store.credit(Credit(ann.id, 6_000_000, LedgerKind.TOPUP, reference="r"))
    with pytest.raises(Conflict):
        await store.credit(Credit(bob.id, 5_000_000, LedgerKind.TOPUP, reference="r"))
    assert (await store.get_balance(ann.id)).balance == 5_000_000
    assert (await store.get_balance(bob.id)).balance == 0
    assert len(await store.ledger(ann.id)) == 1 and await store.ledger(bob.id) == []


async def test_debit_cannot_go_below_zero(store: Store) -> None:
    user = await new_user(store)
    await topup(store, user, 1_000)
    with pytest.raises(InvalidRequest):
        await store.credit(Credit(user.id, -1_001, LedgerKind.ADJUSTMENT, "too much"))
    assert (await store.get_balance(user.id)).balance == 1_000
    result = await store.credit(Credit(user.id, -1_000, LedgerKind.ADJUSTMENT, "all of it"))
    assert result.balance.balance == 0 and result.entry.balance_after == 0
    assert [e.amount for e in await store.ledger(user.id)] == [1_000, -1_000]


async def test_debit_cannot_go_below_what_is_held(store: Store) -> None:
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 600, "r1", "m")
    assert hold is not None
    with pytest.raises(InvalidRequest, match="held"):
        await store.credit(Credit(user.id, -401, LedgerKind.ADJUSTMENT, "eats the hold"))
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (1_000, 600)
    await store.credit(Credit(user.id, -400, LedgerKind.ADJUSTMENT, "exactly the free part"))
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held, balance.available) == (600, 600, 0)
    await store.settle(hold, record(hold, 0))


async def test_credit_for_a_missing_user(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.credit(Credit(12345, 1_000, LedgerKind.TOPUP))
    with pytest.raises(NotFound):
        await store.get_balance(12345)


# -- holds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("budgeted", [False, True])
async def test_concurrent_holds_take_exactly_what_is_there(store: Store, budgeted: bool) -> None:
    """Sixty holds at once against a balance for twenty: exactly twenty succeed, the rest are refused
    (never an error), and held never passes the balance. On PostgreSQL the holds of a key without a
    budget take no lock; a hold that read the balance before another committed is refused by the
    balance's CHECK and reported as refused."""
    user, key = await funded(store, 2_000)
    holds = await asyncio.gather(*(store.hold(user.id, key.id, 100, f"r{i}", "m", budgeted=budgeted)
                                   for i in range(60)))
    taken = [h for h in holds if h is not None]
    assert len(taken) == 20
    assert (await store.get_balance(user.id)).held == 2_000
    for hold in taken:
        await store.settle(hold, record(hold, 100))
    assert (await store.get_balance(user.id)).balance == 0
    assert await store.audit() == []


async def test_concurrent_holds_on_one_key_take_exactly_its_budget(store: Store) -> None:
    """Sixty holds at once on a key whose budget pays for twenty (the balance for a hundred):
    exactly twenty succeed. Each sees the others' holds (on PostgreSQL through the locks it takes
    on the balance and the key), and what the key has spent counts against its budget."""
    user = await new_user(store)
    key = await new_key(store, user, budget=2_500)
    await topup(store, user, 10_000)
    spent = await store.hold(user.id, key.id, 500, "spent", "m")
    assert spent is not None
    await store.settle(spent, record(spent, 500))
    holds = await asyncio.gather(*(store.hold(user.id, key.id, 100, f"r{i}", "m") for i in range(60)))
    taken = [h for h in holds if h is not None]
    assert len(taken) == 20
    assert (await store.get_balance(user.id)).held == 2_000
    for hold in taken:
        await store.settle(hold, record(hold, 100))
    used = await store.get_key(key.id)
    assert used is not None and used.spent == 2_500
    assert await store.audit() == []


@pytest.mark.parametrize("budgeted", [False, True])
async def test_hold_is_all_or_nothing(store: Store, budgeted: bool) -> None:
    user, key = await funded(store, 1_000)
    take = partial(store.hold, budgeted=budgeted)
    assert await take(user.id, key.id, 1_001, "too-big", "m") is None
    assert (await store.get_balance(user.id)).held == 0
    first = await take(user.id, key.id, 700, "r1", "m")
    assert first is not None and (first.amount, first.user_id, first.key_id, first.request_id) == (700, user.id,
                                                                                                   key.id, "r1")
    assert await take(user.id, key.id, 301, "r2", "m") is None  # only 300 left
    second = await take(user.id, key.id, 300, "r3", "m")
    assert second is not None
    assert await take(user.id, key.id, 1, "r4", "m") is None
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held, balance.available) == (1_000, 1_000, 0)
    assert await take(user.id + 99, key.id, 1, "nobody", "m") is None
    for hold in (first, second):
        await store.settle(hold, record(hold, 0))
    assert await store.audit() == []


# -- settlement ----------------------------------------------------------------------------

async def test_settle_charges_the_cost_and_releases_the_hold(store: Store) -> None:
    user, key = await funded(store, 10_000)
    hold = await store.hold(user.id, key.id, 3_000, "req-1", "m")
    assert hold is not None
    written = await store.settle(hold, record(hold, 1_234, prompt_tokens=10, completion_tokens=5))
    assert (written.cost, written.charged) == (1_234, 1_234)
    assert written.id is not None and written.created_at is not None
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (10_000 - 1_234, 0)
    charge = (await store.ledger(user.id))[-1]
    assert (charge.kind, charge.amount, charge.balance_after, charge.usage_id) == (
        LedgerKind.CHARGE, -1_234, 10_000 - 1_234, written.id)
    assert "req-1" in charge.note
    assert await usage_total(store, user) == (1, 1_234)
    assert (await store.get_key(key.id)).spent == 1_234  # type: ignore[union-attr]


async def test_settle_may_charge_more_than_the_hold_when_the_balance_has_it(store: Store) -> None:
    user, key = await funded(store, 10_000)
    hold = await store.hold(user.id, key.id, 100, "req", "m")
    assert hold is not None
    written = await store.settle(hold, record(hold, 5_000))
    assert written.charged == 5_000
    assert (await store.get_balance(user.id)).balance == 5_000


async def test_settle_caps_the_charge_at_what_the_user_has(store: Store) -> None:
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 900, "req", "m")
    assert hold is not None
    written = await store.settle(hold, record(hold, 5_000))
    assert (written.cost, written.charged) == (5_000, 1_000)
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (0, 0)
    assert (await store.ledger(user.id))[-1].amount == -1_000


async def test_a_hold_is_settled_at_most_once(store: Store) -> None:
    user, key = await funded(store, 10_000)
    hold = await store.hold(user.id, key.id, 3_000, "req-once", "m")
    assert hold is not None
    await store.settle(hold, record(hold, 1_000))
    with pytest.raises(StoreError, match="already settled"):
        await store.settle(hold, record(hold, 1_000))
    assert (await store.get_balance(user.id)).balance == 9_000
    assert await usage_total(store, user) == (1, 1_000)


async def test_a_settlement_refused_among_others_at_once_charges_only_the_others(store: Store) -> None:
    """Settled together (one group commit on SQLite), a repeated settlement fails alone: the others
    are charged once each, and the failing one undoes nothing of theirs."""
    user, key = await funded(store, 10_000)
    holds = [await store.hold(user.id, key.id, 1_000, f"req-{i}", "m") for i in range(4)]
    assert all(h is not None for h in holds)
    await store.settle(holds[0], record(holds[0], 100))  # holds[0] settled: its repeat below must fail
    outcomes = await asyncio.gather(*(store.settle(h, record(h, 100 * (i + 1))) for i, h in enumerate(holds)),
                                    return_exceptions=True)
    assert isinstance(outcomes[0], StoreError)
    assert [o.charged for o in outcomes[1:]] == [200, 300, 400]
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (10_000 - 1_000, 0)
    assert await usage_total(store, user) == (4, 1_000)


async def test_a_settlement_whose_caller_is_cancelled_is_still_written(store: Store) -> None:
    """A request cut short (a shutdown's last resort) while its settlement is on its way is still charged."""
    user, key = await funded(store, 10_000)
    hold = await store.hold(user.id, key.id, 3_000, "req-cut", "m")
    # another request in flight: on SQLite the settlement then waits a pass for company (alone, it
    # would be committed at once, before it could be cancelled)
    other = await store.hold(user.id, key.id, 1_000, "req-other", "m")
    assert hold is not None and other is not None
    settling = asyncio.ensure_future(store.settle(hold, record(hold, 1_234)))
    await asyncio.sleep(0)  # on its way to the database
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    for _ in range(200):  # written in the background, without its caller
        balance = await store.get_balance(user.id)
        if balance.held == 1_000:
            break
        await asyncio.sleep(0.01)
    assert (balance.balance, balance.held) == (10_000 - 1_234, 1_000)
    assert await usage_total(store, user) == (1, 1_234)
    await store.settle(other, record(other, 0))


async def test_settle_never_takes_money_held_for_other_requests(store: Store) -> None:
    user, key = await funded(store, 1_000)
    a = await store.hold(user.id, key.id, 300, "a", "m")
    b = await store.hold(user.id, key.id, 500, "b", "m")
    assert a is not None and b is not None
    written = await store.settle(a, record(a, 10_000))
    assert written.charged == 500  # 1,000 minus the 500 still held for b
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (500, 500)
    assert (await store.settle(b, record(b, 10_000))).charged == 500
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (0, 0)


async def test_free_settlement_writes_usage_but_no_ledger_row(store: Store) -> None:
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 10, "failed", "m")
    assert hold is not None
    written = await store.settle(hold, record(hold, 0, status="error", http_status=502))
    assert (written.cost, written.charged) == (0, 0)
    assert [e.kind for e in await store.ledger(user.id)] == [LedgerKind.TOPUP]
    balance = await store.get_balance(user.id)
    assert (balance.balance, balance.held) == (1_000, 0)
    assert await usage_total(store, user) == (1, 0)


# -- recovery ------------------------------------------------------------------------------

async def test_recover_holds_releases_everything_and_logs_interrupted(store: Store) -> None:
    ann, ann_key = await funded(store, 1_000)
    bob = await new_user(store, "bob@example.com")
    bob_key = await new_key(store, bob)
    await topup(store, bob, 500)
    holds = [await store.hold(ann.id, ann_key.id, 100, "a1", "m"), await store.hold(ann.id, ann_key.id, 200, "a2", "m"),
             await store.hold(bob.id, bob_key.id, 500, "b1", "m")]
    assert all(holds)
    ledger_before = await store.ledger(ann.id) + await store.ledger(bob.id)
    recovered = await store.recover_holds()
    assert sorted(h.request_id for h in recovered) == ["a1", "a2", "b1"]
    assert sorted(h.amount for h in recovered) == [100, 200, 500]
    for user, balance in ((ann, 1_000), (bob, 500)):
        state = await store.get_balance(user.id)
        assert (state.balance, state.held) == (balance, 0)
    assert await store.ledger(ann.id) + await store.ledger(bob.id) == ledger_before  # nothing charged
    assert await store.usage_report([], UsageFilter()) == []  # interrupted rows stay out of reports
    assert await store.recover_holds() == []


async def test_gateways_sharing_a_database_release_only_the_holds_of_dead_ones(store: Store,
                                                                                database_url: str) -> None:
    """Two gateway instances on one database: one starting does not release the other's holds while it
    beats; once it stops beating they are released (and logged interrupted); an instance taken for
    dead after a stall is alive again at its next heartbeat, and its new holds are its own."""
    user, key = await funded(store, 1_000)
    await store.register_instance("gateway-a", "host-a", 1)
    mine = await store.hold(user.id, key.id, 300, "a1", "m")
    assert mine is not None
    other = await open_store(database_url)
    try:
        await other.register_instance("gateway-b", "host-b", 2)
        assert await other.recover_holds() == []  # a is alive: its hold stays
        assert (await store.get_balance(user.id)).held == 300
        # a falls silent (a cutoff in the future makes every other instance stale): b reaps it
        assert [h.request_id for h in await other.recover_holds(stale_ms=-60_000)] == ["a1"]
        assert (await store.get_balance(user.id)).held == 0
        with pytest.raises(StoreError, match="already settled or released"):
            await store.settle(mine, record(mine, 100))  # nothing is charged for a released hold
        await store.heartbeat()  # a was only stalled: it is back
        again = await store.hold(user.id, key.id, 200, "a2", "m")
        assert again is not None
        assert await other.recover_holds() == []
        await store.settle(again, record(again, 150))
        await other.retire_instance()
        await store.retire_instance()
    finally:
        await other.close()
    assert (await store.get_balance(user.id)).balance == 850


async def test_recover_holds_with_nothing_open(store: Store) -> None:
    await funded(store, 1_000)
    assert await store.recover_holds() == []


# -- reports -------------------------------------------------------------------------------

async def test_usage_report_sums_what_was_charged(store: Store) -> None:
    user, key = await funded(store, 1_000)
    for cost, model in ((100, "a"), (200, "a"), (5_000, "b")):
        hold = await store.hold(user.id, key.id, 1, f"r-{cost}", model)
        assert hold is not None
        await store.settle(hold, replace(record(hold, cost, prompt_tokens=cost), model=model))
    rows = {r.group["model"]: r for r in await store.usage_report(["model"], UsageFilter())}
    assert (rows["a"].requests, rows["a"].cost, rows["a"].prompt_tokens) == (2, 300, 300)
    assert (rows["b"].requests, rows["b"].cost) == (1, 700)  # capped at what was left
    with pytest.raises(InvalidRequest):
        await store.usage_report(["colour"], UsageFilter())


async def test_a_thousand_small_charges_sum_exactly(store: Store) -> None:
    user, key = await funded(store, 1_000_000)
    for i in range(1_000):
        hold = await store.hold(user.id, key.id, 450, f"r{i}", "m")
        assert hold is not None
        await store.settle(hold, record(hold, 450))
    assert (await store.get_balance(user.id)).balance == 1_000_000 - 450_000
    assert await usage_total(store, user) == (1_000, 450_000)
    assert sum(e.amount for e in await store.ledger(user.id)) == 550_000


# == under the protocol (raw SQL, either engine) ===============================================

# SQL that is not the same on both engines: a trigger that fails every ledger insert, and
# removing holds without the trigger that keeps balances.held equal to their sum.
FAIL_LEDGER = {
    "sqlite": ("CREATE TRIGGER test_fail_ledger BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'boom'); END",
               "DROP TRIGGER test_fail_ledger"),
    "postgresql": ("CREATE FUNCTION test_fail_ledger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "RAISE EXCEPTION 'boom' USING ERRCODE = 'integrity_constraint_violation'; END $$; "
                   "CREATE TRIGGER test_fail_ledger BEFORE INSERT ON ledger "
                   "FOR EACH ROW EXECUTE FUNCTION test_fail_ledger()",
                   "DROP TRIGGER test_fail_ledger ON ledger; DROP FUNCTION test_fail_ledger()"),
}
DROP_HOLDS_RELEASE = {"sqlite": "DROP TRIGGER holds_release", "postgresql": "DROP TRIGGER holds_release ON holds"}


@pytest.fixture
def raw(store: Store, database_url: str) -> Iterator[Connection]:
    """A plain connection to the ``store`` fixture's database (foreign keys enforced on both engines)."""
    conn = connect(database_url)
    yield conn
    conn.close()


def test_schema_tables_exist(raw: Connection, database_url: str) -> None:
    assert tables(database_url) >= TABLES | {"_apibox_migrations"}
    applied = [r[0] for r in raw.execute("SELECT name FROM _apibox_migrations ORDER BY name")]
    assert applied == [m.name for m in MIGRATIONS]  # each recorded exactly once


@pytest.mark.sqlite_only  # WAL is SQLite's journal mode
def test_sqlite_runs_in_wal_mode(raw: Connection) -> None:
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_ledger_is_append_only(store: Store, raw: Connection) -> None:
    user = await new_user(store)
    await topup(store, user, 1_000)
    with pytest.raises(INTEGRITY_ERRORS, match="append-only"):
        raw.execute("UPDATE ledger SET amount = 1")
    with pytest.raises(INTEGRITY_ERRORS, match="append-only"):
        raw.execute("UPDATE ledger SET note = 'rewritten'")
    with pytest.raises(INTEGRITY_ERRORS, match="append-only"):
        raw.execute("DELETE FROM ledger")
    assert raw.execute("SELECT amount, note FROM ledger").fetchall() == [(1_000, "test")]


async def test_ledger_refuses_an_unknown_kind_and_a_reference_twice(store: Store, raw: Connection) -> None:
    user = await new_user(store)
    await store.credit(Credit(user.id, 1_000, LedgerKind.TOPUP, reference="pay-1"))
    await store.credit(Credit(user.id, 5, LedgerKind.TOPUP))
    await store.credit(Credit(user.id, 6, LedgerKind.TOPUP))  # any number without a reference
    insert = ("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor, reference) "
              "VALUES (?, 0, ?, 1, 1, 'cli', ?)")
    with pytest.raises(INTEGRITY_ERRORS):
        raw.execute(insert, (user.id, "gift", None))
    with pytest.raises(INTEGRITY_ERRORS):
        raw.execute(insert, (user.id, "topup", "pay-1"))
    assert raw.execute("SELECT count(*) FROM ledger").fetchone()[0] == 3


@pytest.mark.sqlite_only  # the SQLite writer's group commits
async def test_one_request_at_a_time_commits_its_hold_and_settlement_at_once(store: Store) -> None:
    """With no other request between its hold and its settlement, nothing could join a group: each
    transaction commits in its caller's step. With another in flight, transactions wait for company."""
    writer = store._writer  # type: ignore[attr-defined]
    user, key = await funded(store, 10_000)
    groups: list[int] = []  # the size of each group the writer commits
    real = writer._commit_group

    def recording(bodies):
        groups.append(len(bodies))
        return real(bodies)
    writer._commit_group = recording
    passes: list[str] = []

    async def in_one_step(work: Awaitable[Any]) -> Any:
        """``work``'s result, recorded as in one step when no pass of the loop came first."""
        passes.clear()
        asyncio.get_running_loop().call_soon(passes.append, "pass")
        result = await work
        passes.append("done")
        return result

    hold = await in_one_step(store.hold(user.id, key.id, 3_000, "alone", "m"))
    assert hold is not None and passes[0] == "done"
    await in_one_step(store.settle(hold, record(hold, 100)))
    assert passes[0] == "done"
    refused = await in_one_step(store.hold(user.id, key.id, 10**9, "too dear", "m"))
    assert refused is None and passes[0] == "done"

    a = await store.hold(user.id, key.id, 1_000, "a", "m")
    b = await in_one_step(store.hold(user.id, key.id, 1_000, "b", "m"))  # a is in flight
    assert a is not None and b is not None and passes[0] == "pass"
    groups.clear()
    await asyncio.gather(store.settle(a, record(a, 10)), store.settle(b, record(b, 20)))
    assert groups == [2]  # the two settlements in one group
    hold = await in_one_step(store.hold(user.id, key.id, 3_000, "alone again", "m"))
    assert hold is not None and passes[0] == "done"
    await store.settle(hold, record(hold, 0))
    assert await store.audit() == []


@pytest.mark.sqlite_only  # what SQLite's planner builds for a statement
@pytest.mark.parametrize("sql", [HOLD_VALUES_SQL, INSERT_USAGE_SQL, RELEASE_SQL, CHARGE_BALANCE_SQL,
                                 CHARGE_LEDGER_SQL, KEY_SPEND_SQL])
async def test_a_hold_and_its_settlement_build_no_temporary_btree(store: Store, raw: Connection, sql: str) -> None:
    # A temporary b-tree (its own pager, opened and closed) doubled the cost of the statements that
    # built one: `kind IN (...)` in the ledger's CHECK, RETURNING, INSERT ... SELECT into holds.
    program = raw.execute(f"EXPLAIN {sql}", (None,) * sql.count("?")).fetchall()
    assert "OpenEphemeral" not in {row[1] for row in program}


@pytest.mark.sqlite_only  # SQLite's plan
async def test_a_lookup_by_reference_uses_the_partial_index(store: Store, raw: Connection) -> None:
    (plan,) = raw.execute("EXPLAIN QUERY PLAN SELECT id FROM ledger WHERE reference = 'pay-1'").fetchall()
    assert plan[3].endswith("INDEX ledger_reference (reference=?)")


@pytest.mark.sqlite_only  # SQLite's plan
async def test_a_users_live_usage_is_read_through_the_index_of_their_keys(store: Store, raw: Connection) -> None:
    clauses, params = _usage_where(False, UsageFilter(user_id=1))
    plan = raw.execute(f"EXPLAIN QUERY PLAN SELECT count(*) FROM usage g WHERE {clauses}", params).fetchall()
    assert any("INDEX usage_key_created (key_id=?)" in row[3] for row in plan), plan
    assert not any(row[3].startswith("SCAN g") for row in plan), plan


async def test_check_constraints_stop_a_negative_balance(store: Store, raw: Connection) -> None:
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 400, "r", "m")
    assert hold is not None
    bad = [
        ("UPDATE balances SET balance = -1 WHERE user_id = ?", (user.id,)),
        ("UPDATE balances SET balance = balance - 1001 WHERE user_id = ?", (user.id,)),
        ("UPDATE balances SET balance = 399 WHERE user_id = ?", (user.id,)),  # below held
        ("UPDATE balances SET held = -1 WHERE user_id = ?", (user.id,)),
        ("UPDATE balances SET held = 1001 WHERE user_id = ?", (user.id,)),
        ("INSERT INTO holds (user_id, key_id, amount, request_id, model, created_at) VALUES (?, ?, 601, 'x', 'm', 0)",
         (user.id, key.id)),  # the trigger would lift held above the balance
        ("INSERT INTO holds (user_id, key_id, amount, request_id, model, created_at) VALUES (?, ?, 0, 'x', 'm', 0)",
         (user.id, key.id)),
        ("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor) "
         "VALUES (?, 0, 'adjustment', -2000, -1000, 'x')", (user.id,)),
        ("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor) "
         "VALUES (?, 0, 'gift', 1, 1001, 'x')", (user.id,)),
        ("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor) "
         "VALUES (?, 0, 'topup', 0, 1000, 'x')", (user.id,)),
        ("INSERT INTO usage (request_id, created_at, user_id, key_id, model, provider, endpoint, status, "
         "http_status, cost, charged) VALUES ('x', 0, ?, ?, 'm', 'p', 'e', 'ok', 200, 5, 6)", (user.id, key.id)),
        ("INSERT INTO usage (request_id, created_at, user_id, key_id, model, provider, endpoint, status, "
         "http_status, cost, charged) VALUES ('x', 0, ?, ?, 'm', 'p', 'e', 'ok', 200, 5, -1)", (user.id, key.id)),
    ]
    for sql, params in bad:
        with pytest.raises(INTEGRITY_ERRORS):
            raw.execute(sql, params)
    assert raw.execute("SELECT balance, held FROM balances WHERE user_id = ?", (user.id,)).fetchone() == (1_000, 400)
    await store.settle(hold, record(hold, 0))


async def test_settlement_is_one_transaction(store: Store, raw: Connection, engine: str) -> None:
    """If the ledger row cannot be written, nothing of the settlement is: the hold stays, no usage row,
    no balance change, no key spend."""
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 500, "r", "m")
    assert hold is not None
    create_trigger, drop_trigger = FAIL_LEDGER[engine]
    raw.execute(create_trigger)
    with pytest.raises(IntegrityViolation, match="boom"):
        await store.settle(hold, record(hold, 300))
    raw.execute(drop_trigger)
    assert raw.execute("SELECT balance, held FROM balances WHERE user_id = ?", (user.id,)).fetchone() == (1_000, 500)
    assert raw.execute("SELECT count(*) FROM holds").fetchone() == (1,)
    assert raw.execute("SELECT count(*) FROM usage").fetchone() == (0,)
    assert raw.execute("SELECT spent FROM api_keys").fetchone() == (0,)
    assert await store.audit() == []
    written = await store.settle(hold, record(hold, 300))  # the store is still usable afterwards
    assert written.charged == 300


@pytest.mark.parametrize(("budgeted", "cost"), [(True, 300), (False, 300), (False, 700)],
                         ids=["capped, a budgeted hold", "within a budgetless hold", "capped, past a budgetless hold"])
async def test_a_charge_without_a_balance_row_fails_and_writes_nothing(store: Store, raw: Connection,
                                                                       budgeted: bool, cost: int) -> None:
    """A balance row is never missing; were it, the charge must fail as no_balance and not leave a usage
    row, a key spend or a released hold behind, whether it is the hold's (within a budgetless hold) or
    capped at the balance (a budgeted hold, or a cost past the hold), on either engine."""
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 500, "r", "m", budgeted=budgeted)
    assert hold is not None
    saved = raw.execute("SELECT balance, held FROM balances WHERE user_id = ?", (user.id,)).fetchone()
    raw.execute("DELETE FROM balances WHERE user_id = ?", (user.id,))
    with pytest.raises(StoreError, match=f"^{re.escape(str(no_balance(user.id)))}$"):
        await store.settle(hold, record(hold, cost))
    assert raw.execute("SELECT count(*) FROM holds").fetchone() == (1,)
    assert raw.execute("SELECT count(*) FROM usage").fetchone() == (0,)
    assert raw.execute("SELECT spent FROM api_keys").fetchone() == (0,)
    raw.execute("INSERT INTO balances (user_id, balance, held) VALUES (?, ?, ?)", (user.id, *saved))
    assert (await store.settle(hold, record(hold, cost))).charged == cost


async def test_failed_usage_insert_keeps_the_hold(store: Store, raw: Connection) -> None:
    user, key = await funded(store, 1_000)
    hold = await store.hold(user.id, key.id, 500, "r", "m")
    assert hold is not None
    bad = replace(record(hold, 300), key_id=key.id + 999)  # violates the usage row's foreign key
    with pytest.raises(IntegrityViolation):
        await store.settle(hold, bad)
    assert raw.execute("SELECT balance, held FROM balances").fetchone() == (1_000, 500)
    assert raw.execute("SELECT count(*) FROM holds").fetchone() == (1,)
    await store.settle(hold, record(hold, 0))


async def test_recovered_holds_are_logged_as_interrupted(store: Store, raw: Connection) -> None:
    user, key = await funded(store, 1_000)
    assert await store.hold(user.id, key.id, 300, "crashed-1", "gpt-x") is not None
    assert await store.hold(user.id, key.id, 200, "crashed-2", "gpt-y") is not None
    await store.recover_holds()
    rows = raw.execute("SELECT request_id, model, status, cost, charged, user_id, key_id FROM usage "
                       "ORDER BY request_id").fetchall()
    assert rows == [("crashed-1", "gpt-x", "interrupted", 0, 0, user.id, key.id),
                    ("crashed-2", "gpt-y", "interrupted", 0, 0, user.id, key.id)]
    assert raw.execute("SELECT count(*) FROM holds").fetchone() == (0,)
    assert raw.execute("SELECT count(*) FROM ledger WHERE kind = 'charge'").fetchone() == (0,)


# -- the audit finds tampering --------------------------------------------------------------

@pytest.fixture(params=["in turn", "side by side"])
async def loose(databases: Databases, request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Store, Connection, User, ApiKey]]:
    """A store with one funded user and a settled request, whose books the test will break
    (so no audit at teardown). Its audit runs the checks in turn, as on a small database, or side
    by side, as on a large one."""
    if request.param == "side by side":
        monkeypatch.setattr(sql_reports, "PARALLEL_AUDIT_ROWS", 1)
    url = databases.new("tampered")
    db = await open_store(url)
    conn = connect(url)
    user, key = await funded(db, 10_000)
    hold = await db.hold(user.id, key.id, 1_000, "ok-1", "m")
    assert hold is not None
    await db.settle(hold, record(hold, 700))
    assert await db.audit() == []
    yield db, conn, user, key
    conn.close()
    await db.close()


Loose = tuple[Store, Connection, User, ApiKey]


def raw_usage(conn: Connection, user: User, key: ApiKey, request_id: str, cost: int, charged: int) -> int:
    """A usage row written behind the store's back (as a bug or a hand edit would): its id."""
    return conn.execute(
        "INSERT INTO usage (request_id, created_at, user_id, key_id, model, provider, endpoint, status, "
        "http_status, cost, charged) VALUES (?, 0, ?, ?, 'm', 'p', 'e', 'ok', 200, ?, ?) RETURNING id",
        (request_id, user.id, key.id, cost, charged)).fetchone()[0]


def raw_ledger(conn: Connection, user_id: int, kind: str, amount: int, balance_after: int,
               usage_id: int | None = None) -> None:
    """A ledger row written behind the store's back."""
    conn.execute("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor, usage_id) "
                 "VALUES (?, 0, ?, ?, ?, 'x', ?)", (user_id, kind, amount, balance_after, usage_id))


async def test_audit_finds_a_balance_off_by_one(loose: Loose) -> None:
    db, conn, user, _ = loose
    conn.execute("UPDATE balances SET balance = balance + 1 WHERE user_id = ?", (user.id,))
    problems = await db.audit()
    assert len(problems) == 1
    assert f"user {user.id}: balance 9301 differs from the ledger's sum 9300" in problems[0]


async def test_audit_finds_held_off(loose: Loose) -> None:
    db, conn, user, _ = loose
    conn.execute("UPDATE balances SET held = held + 1 WHERE user_id = ?", (user.id,))
    problems = await db.audit()
    assert problems == [f"user {user.id}: held 1 differs from the open holds' sum 0"]


async def test_audit_finds_a_hold_row_removed_without_its_trigger(loose: Loose, engine: str) -> None:
    db, conn, user, key = loose
    hold = await db.hold(user.id, key.id, 50, "open", "m")
    assert hold is not None
    conn.execute(DROP_HOLDS_RELEASE[engine])
    conn.execute("DELETE FROM holds")
    problems = await db.audit()
    assert problems == [f"user {user.id}: held 50 differs from the open holds' sum 0"]


async def test_audit_finds_a_charge_without_usage(loose: Loose) -> None:
    db, conn, user, _ = loose
    conn.execute("UPDATE balances SET balance = balance - 5 WHERE user_id = ?", (user.id,))
    raw_ledger(conn, user.id, "charge", -5, 9295)
    problems = await db.audit()
    assert len(problems) == 1
    assert "does not match its usage row" in problems[0] and "of 5" in problems[0]


async def test_audit_finds_usage_charged_without_a_ledger_row(loose: Loose) -> None:
    db, conn, user, key = loose
    raw_usage(conn, user, key, "ghost", 9, 9)
    problems = await db.audit()
    assert len(problems) == 1 and "charged 9 but has no ledger row" in problems[0]


async def test_audit_finds_a_charge_that_differs_from_its_usage(loose: Loose) -> None:
    db, conn, user, key = loose
    usage_id = raw_usage(conn, user, key, "r2", 10, 10)
    conn.execute("UPDATE balances SET balance = balance - 4 WHERE user_id = ?", (user.id,))
    raw_ledger(conn, user.id, "charge", -4, 9296, usage_id)
    problems = await db.audit()
    assert len(problems) == 1 and "of 4 does not match its usage row (charged 10)" in problems[0]


async def test_audit_finds_a_charge_on_another_users_usage(loose: Loose) -> None:
    db, conn, user, key = loose
    other = await new_user(db, "bob@example.com")
    await topup(db, other, 100)
    usage_id = conn.execute("SELECT id FROM usage").fetchone()[0]
    conn.execute("UPDATE balances SET balance = 99 WHERE user_id = ?", (other.id,))
    # the usage row is already paired with user's charge; a second charge needs a fresh usage row of user's
    fresh = raw_usage(conn, user, key, "r3", 1, 1)
    assert fresh != usage_id
    raw_ledger(conn, other.id, "charge", -1, 99, fresh)
    problems = await db.audit()
    assert len(problems) == 1 and "does not match its usage row" in problems[0]


async def test_audit_finds_a_wrong_balance_after(loose: Loose) -> None:
    db, conn, user, _ = loose
    conn.execute("UPDATE balances SET balance = balance + 10 WHERE user_id = ?", (user.id,))
    raw_ledger(conn, user.id, "adjustment", 10, 9999)
    problems = await db.audit()
    assert len(problems) == 1
    assert "balance_after 9999 differs from the running sum 9310" in problems[0]


async def test_audit_finds_several_problems_at_once(loose: Loose) -> None:
    db, conn, user, _ = loose
    conn.execute("UPDATE balances SET balance = balance + 3, held = held + 2 WHERE user_id = ?", (user.id,))
    problems = await db.audit()
    assert len(problems) == 2
    assert any("differs from the ledger's sum" in p for p in problems)
    assert any("differs from the open holds' sum" in p for p in problems)


@asynccontextmanager
async def noting_postgres(postgres_database: PostgresDatabase,
                          tables: tuple[str, ...]) -> AsyncIterator[tuple[Store, str]]:
    """A store on a database of its own whose ``tables`` note each row written, in the table ``seen``:
    in order (``n``), the table and operation (``what``) and the transaction's synchronous_commit."""
    name, url = postgres_database.create()
    try:
        db = await open_store(url)
        try:
            dbquery.execute(url, "CREATE TABLE seen (n SERIAL, what TEXT, setting TEXT)")
            dbquery.execute(url, "CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                 "INSERT INTO seen (what, setting) VALUES (TG_TABLE_NAME || ' ' || TG_OP, "
                                 "current_setting('synchronous_commit')); RETURN NULL; END $$")
            for table in tables:
                dbquery.execute(url, f"CREATE TRIGGER note AFTER INSERT OR DELETE ON {table} "
                                     "FOR EACH ROW EXECUTE FUNCTION note()")
            yield db, url
            assert await db.audit() == []
        finally:
            await db.close()
    finally:
        postgres_database.drop(name)


async def test_postgresql_commits_top_ups_durably_and_holds_and_settlements_fast(
        postgres_database: PostgresDatabase) -> None:
    """docs/BILLING.md's promise, seen from inside PostgreSQL: each transaction's synchronous_commit,
    recorded by triggers as its rows are written."""
    async with noting_postgres(postgres_database, ("ledger", "holds", "usage", "api_keys", "users")) as (db, url):
        user, key = await funded(db, 1_000)
        hold = await db.hold(user.id, key.id, 100, "r", "m", budgeted=False)
        assert hold is not None
        await db.settle(hold, record(hold, 40))
        seen = {(what, setting) for what, setting in dbquery.query(url, "SELECT what, setting FROM seen")}
        assert seen == {("users INSERT", "on"), ("api_keys INSERT", "on"), ("ledger INSERT", "on"),  # top-up
                        ("holds INSERT", "off"), ("holds DELETE", "off"), ("usage INSERT", "off"),
                        ("ledger INSERT", "off")}  # the settlement's charge


async def test_postgresql_keeps_a_users_balance_row_locked_only_briefly(
        postgres_database: PostgresDatabase, monkeypatch) -> None:
    """Every hold and settlement of a user locks the user's balance row until its COMMIT, so on
    PostgreSQL one user's requests queue on it. A hold of a key without a budget is one statement,
    run as a transaction of its own (no BEGIN before it, no COMMIT round trip after it), and so is a
    settlement (the apibox_settle function): it releases its hold (whose trigger locks the balance
    row), writes its usage row, takes the charge from the balance, writes its ledger row and adds it
    to the key's spend, with no round trip while the row is locked."""
    async with noting_postgres(postgres_database, ("holds", "usage", "ledger")) as (db, url):
        user, key = await funded(db, 1_000)
        dbquery.execute(url, "DELETE FROM seen")  # the top-up's ledger row
        begun: list[str] = []
        statements: list[str] = []
        execute, fetch = asyncpg.Connection.execute, asyncpg.Connection.fetch

        async def counting(self, query: str, *args, **kwargs):  # a transaction starts with a BEGIN
            if query.lstrip().upper().startswith("BEGIN"):
                begun.append("BEGIN")
            return await execute(self, query, *args, **kwargs)

        async def fetching(self, query: str, *args, **kwargs):  # a statement of a script
            statements.append(query.split()[0])
            return await fetch(self, query, *args, **kwargs)
        monkeypatch.setattr(asyncpg.Connection, "execute", counting)
        monkeypatch.setattr(asyncpg.Connection, "fetch", fetching)
        hold = await db.hold(user.id, key.id, 100, "r", "m", budgeted=False)
        assert hold is not None and begun == [] and statements == ["INSERT"]
        await db.settle(hold, record(hold, 40))
        assert begun == []
        assert statements == ["INSERT", "SELECT"]  # the hold; the settlement
        seen = [row[0] for row in dbquery.query(url, "SELECT what FROM seen ORDER BY n")]
        assert seen == ["holds INSERT", "holds DELETE", "usage INSERT", "ledger INSERT"]
        used = await db.get_key(key.id)
        assert used is not None and used.spent == 40 and used.last_used_at is not None


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999),
                    timezones=st.just(UTC)))
def test_a_moment_is_stored_to_the_millisecond_below_and_read_back_exactly(moment: datetime) -> None:
    stored = to_ms(moment)
    assert from_ms(stored) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)
