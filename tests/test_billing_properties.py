"""Billing: holds and settlements keep every money invariant, whatever happens in between.

The properties run random histories of top-ups, adjustments, requests, upstream failures and
disconnects against a real database (a fresh one per example, on each engine), and check the invariants
after every step; a concurrency property fires hundreds of holds at once at a small balance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apibox import billing
from apibox.billing import MIN_ANSWER_TOKENS, Reservation
from apibox.errors import InsufficientQuota, InvalidRequest
from apibox.keys import generate_key, hash_key
from apibox.models import ApiKey, Balance, LedgerKind, UsageRecord, User
from apibox.pricing import Price, Usage, affordable_output_tokens, cost_micro, worst_case_micro
from apibox.store import open_store
from apibox.store.base import Credit, KeySpec, Store, UsageFilter
from tests.conftest import Databases

DB_PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])

prices = st.builds(
    Price,
    input=st.integers(min_value=0, max_value=20_000_000),
    output=st.integers(min_value=0, max_value=60_000_000),
    cached_input=st.none() | st.integers(min_value=0, max_value=5_000_000),
    cache_write=st.none() | st.integers(min_value=0, max_value=25_000_000),
    reasoning=st.none() | st.integers(min_value=0, max_value=60_000_000),
)

paid_prices = st.builds(Price, input=st.integers(min_value=0, max_value=20_000_000),
                        output=st.integers(min_value=1, max_value=60_000_000))


# -- helpers -------------------------------------------------------------------------------

async def add_user(store: Store, email: str, **key_spec: object) -> tuple[User, ApiKey]:
    user = await store.create_user(email, "", "default")
    secret = generate_key()
    key = await store.create_key(KeySpec(user_id=user.id, key_hash=hash_key(secret), prefix=secret[:12],
                                         **key_spec))  # type: ignore[arg-type]
    return user, key


async def credit(store: Store, user: User, amount: int, kind: LedgerKind = LedgerKind.TOPUP) -> None:
    await store.credit(Credit(user.id, amount, kind, "test"))


def usage_record(key: ApiKey, request_id: str, status: str = "ok") -> UsageRecord:
    return UsageRecord(request_id=request_id, user_id=key.user_id, key_id=key.id, model="m", provider="p",
                       endpoint="chat/completions", status=status)


def run_in_fresh_store(databases: Databases, body):  # type: ignore[no-untyped-def]
    """Run ``body(store)`` on a brand-new database in a new event loop; always close and drop it."""
    async def main() -> None:
        store = await open_store(url)
        try:
            await body(store)
        finally:
            await store.close()
    url = databases.new()
    try:
        asyncio.run(main())
    finally:
        databases.drop(url)


async def check_invariants(store: Store, user: User) -> None:
    balance = await store.get_balance(user.id)
    assert balance.balance >= 0
    assert balance.held >= 0
    assert balance.held <= balance.balance


async def check_books(store: Store, user: User, written: list[UsageRecord]) -> None:
    """At rest: nothing held, ledger sums to the balance, charges match usage rows."""
    balance = await store.get_balance(user.id)
    assert balance.held == 0
    entries = await store.ledger(user.id)
    assert sum(e.amount for e in entries) == balance.balance
    charges = -sum(e.amount for e in entries if e.kind == LedgerKind.CHARGE)
    assert charges == sum(r.charged for r in written)
    rows = await store.usage_report([], UsageFilter(user_id=user.id))
    assert charges == (rows[0].cost if rows else 0)
    assert (rows[0].requests if rows else 0) == len(written)
    for r in written:
        assert 0 <= r.charged <= r.cost
    assert await store.audit() == []


def expected_reservation(price: Price, available: int, prompt: int, output: int) -> tuple[int, int] | None:
    """What reserve() must do for a lone request: (output tokens, hold amount), or None for a 402."""
    min_out = min(MIN_ANSWER_TOKENS, output)
    if available < max(1, worst_case_micro(price, prompt, min_out)):
        return None
    wanted = output
    if available < max(1, worst_case_micro(price, prompt, output)):
        wanted = min(output, affordable_output_tokens(price, available, prompt))
    return wanted, max(1, worst_case_micro(price, prompt, wanted))


Pick = Callable[[int, int, str], int]  # a number in [low, high], labelled for hypothesis


def drawing(data: st.DataObject) -> Pick:
    """Each number drawn from hypothesis as it is needed."""
    return lambda low, high, label: data.draw(st.integers(low, high), label=label)


def planned(shares: Iterator[int]) -> Pick:
    """Each number a share (per mille) of its range, taken from a plan drawn beforehand: for
    requests whose number and bounds a race decides, which hypothesis must not see vary."""
    return lambda low, high, label: low + (high - low) * next(shares) // 1000


def draw_usage(pick: Pick, kind: str, prompt_bound: int, output: int) -> Usage:
    """The usage a finished request reports, by how it finished."""
    if kind == "fail":  # upstream failed before any output
        return Usage()
    if kind == "disconnect":  # no usage reported: apibox's estimate of what was delivered
        return Usage(prompt_tokens=pick(0, prompt_bound, "est_prompt"),
                     completion_tokens=pick(0, output, "delivered"), estimated=True)
    if kind == "over":  # the upstream billed more than the hold assumed
        prompt = pick(0, 2 * prompt_bound + 100, "prompt")
        completion = pick(output, 3 * output + 100, "completion")
    else:
        prompt = pick(0, prompt_bound, "prompt")
        completion = pick(0, output, "completion")
    cached = pick(0, prompt, "cached")
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                 cache_write_tokens=pick(0, prompt - cached, "cache_write"),
                 reasoning_tokens=pick(0, completion, "reasoning"))


# -- random histories ----------------------------------------------------------------------

@dataclass
class Open:
    reservation: Reservation
    prompt_bound: int


@dataclass
class Model:
    balance: int = 0
    open: list[Open] = field(default_factory=list)
    written: list[UsageRecord] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(o.reservation.hold.amount for o in self.open)


@DB_PROPERTY
@given(prices, st.data())
def test_random_histories_keep_every_invariant(databases: Databases, price: Price, data: st.DataObject) -> None:
    async def body(store: Store) -> None:
        user, key = await add_user(store, "ann@example.com")
        bystander, _ = await add_user(store, "bob@example.com")
        await credit(store, bystander, 777)
        model = Model()
        steps = data.draw(st.integers(min_value=1, max_value=40), label="steps")
        for step in range(steps):
            action = data.draw(st.sampled_from(["topup", "adjust", "open", "request", "finish", "finish"]),
                               label="action")
            if action == "topup":
                amount = data.draw(st.integers(min_value=1, max_value=5_000_000), label="topup")
                await credit(store, user, amount)
                model.balance += amount
            elif action == "adjust":
                amount = data.draw(st.integers(min_value=-5_000_000, max_value=5_000_000).filter(bool),
                                   label="adjust")
                if model.balance + amount >= model.held:
                    await credit(store, user, amount, LedgerKind.ADJUSTMENT)
                    model.balance += amount
                else:
                    with pytest.raises(InvalidRequest):
                        await credit(store, user, amount, LedgerKind.ADJUSTMENT)
            elif action in ("open", "request"):
                prompt = data.draw(st.integers(min_value=0, max_value=4_000), label="prompt_bound")
                output = data.draw(st.integers(min_value=1, max_value=4_000), label="max_tokens")
                expected = expected_reservation(price, model.balance - model.held, prompt, output)
                if expected is None:
                    with pytest.raises(InsufficientQuota):
                        await billing.reserve(store, key, model="m", price=price, request_id=f"r{step}",
                                              prompt_tokens=prompt, output_tokens=output)
                else:
                    reservation = await billing.reserve(store, key, model="m", price=price, request_id=f"r{step}",
                                                        prompt_tokens=prompt, output_tokens=output)
                    assert (reservation.output_tokens, reservation.hold.amount) == expected
                    assert reservation.lowered == (reservation.output_tokens < output)
                    model.open.append(Open(reservation, prompt))
                    if action == "request":
                        await finish(store, key, price, model, len(model.open) - 1, data)
            elif model.open:
                index = data.draw(st.integers(min_value=0, max_value=len(model.open) - 1), label="which")
                await finish(store, key, price, model, index, data)
            await check_invariants(store, user)
            balance = await store.get_balance(user.id)
            assert (balance.balance, balance.held) == (model.balance, model.held)
        while model.open:
            await finish(store, key, price, model, 0, data)
            await check_invariants(store, user)
        await check_books(store, user, model.written)
        assert (await store.get_balance(bystander.id)).balance == 777  # nobody else's money moved
    run_in_fresh_store(databases, body)


@DB_PROPERTY
@given(paid_prices, st.integers(min_value=1, max_value=2_000_000), st.data())
def test_a_key_never_spends_past_its_budget_whatever_the_upstream_bills(databases: Databases, price: Price,
                                                                         budget: int, data: st.DataObject) -> None:
    """Upstreams bill past the hold (a prompt the bound missed, an answer past max_tokens): the
    settlement caps the charge at the balance and at what the key's budget has left."""
    async def body(store: Store) -> None:
        user, key = await add_user(store, "ann@example.com", budget=budget)
        await credit(store, user, 10_000_000)
        for step in range(data.draw(st.integers(min_value=1, max_value=8), label="requests")):
            prompt = data.draw(st.integers(min_value=0, max_value=2_000), label="prompt_bound")
            try:
                reservation = await billing.reserve(store, key, model="m", price=price, request_id=f"r{step}",
                                                    prompt_tokens=prompt, output_tokens=100)
            except InsufficientQuota:
                continue
            left = await store.key_headroom(key.id)
            available = (await store.get_balance(user.id)).available
            usage = Usage(prompt_tokens=data.draw(st.integers(min_value=0, max_value=50 * prompt + 5_000),
                                                  label="billed prompt"), completion_tokens=100)
            written = await billing.settle(store, reservation, usage_record(key, f"r{step}"), usage)
            assert written.charged == min(written.cost, available + reservation.hold.amount,
                                          (left or 0) + reservation.hold.amount)
            spent = (await store.get_key(key.id)).spent  # type: ignore[union-attr]
            assert spent <= budget
        await check_invariants(store, user)
    run_in_fresh_store(databases, body)


async def finish(store: Store, key: ApiKey, price: Price, model: Model, index: int, data: st.DataObject) -> None:
    """Settle one open request the way the gateway would for the drawn outcome."""
    item = model.open.pop(index)
    reservation = item.reservation
    kind = data.draw(st.sampled_from(["ok", "ok", "over", "fail", "disconnect"]), label="outcome")
    usage = draw_usage(drawing(data), kind, item.prompt_bound, reservation.output_tokens)
    available = model.balance - model.held  # this hold is released; the others stay held
    status = {"ok": "ok", "over": "ok", "fail": "error", "disconnect": "client_gone"}[kind]
    written = await billing.settle(store, reservation, usage_record(key, reservation.hold.request_id, status), usage)
    assert written.cost == cost_micro(price, usage)
    assert written.charged == min(written.cost, available)
    if kind in ("ok", "fail", "disconnect"):
        assert written.cost <= reservation.hold.amount  # the hold covered it, so it was charged in full
        assert written.charged == written.cost
    if kind == "fail":
        assert written.charged == 0
    assert (written.prompt_tokens, written.completion_tokens, written.estimated) == (
        usage.prompt_tokens, usage.completion_tokens, usage.estimated)
    model.balance -= written.charged
    model.written.append(written)


# -- concurrency ---------------------------------------------------------------------------

CONCURRENT = 200
# how each request that wins a hold will finish, and the shares of its bounds its usage takes:
# drawn before the race, since on PostgreSQL which holds win (and how far each is lowered) may
# differ from one run of an example to the next, and hypothesis replays examples
OUTCOME_PLANS = st.lists(st.tuples(st.sampled_from(["ok", "over", "fail", "disconnect"]),
                                   st.lists(st.integers(0, 1000), min_size=5, max_size=5)),
                         min_size=CONCURRENT, max_size=CONCURRENT)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(paid_prices, st.integers(min_value=0, max_value=3_000),
       st.integers(min_value=MIN_ANSWER_TOKENS, max_value=3_000), st.integers(min_value=0, max_value=10**6),
       OUTCOME_PLANS)
def test_concurrent_holds_never_overspend(databases: Databases, price: Price, prompt: int, output: int, spare: int,
                                          plans: list[tuple[str, list[int]]]) -> None:
    full = max(1, worst_case_micro(price, prompt, output))
    starting = 20 * full + spare % full  # covers about 20 full requests

    async def body(store: Store) -> None:
        user, key = await add_user(store, "ann@example.com")
        await credit(store, user, starting)
        results = await asyncio.gather(*(
            billing.reserve(store, key, model="m", price=price, request_id=f"r{i}", prompt_tokens=prompt,
                            output_tokens=output) for i in range(CONCURRENT)), return_exceptions=True)
        won = [r for r in results if isinstance(r, Reservation)]
        lost = [r for r in results if not isinstance(r, Reservation)]
        assert all(isinstance(r, InsufficientQuota) for r in lost), lost[:3]
        assert won and lost
        assert sum(r.hold.amount for r in won) <= starting
        assert sum(1 for r in won if not r.lowered) <= 20
        for r in won:
            assert r.hold.amount >= max(1, worst_case_micro(price, prompt, r.output_tokens))
        balance = await store.get_balance(user.id)
        assert (balance.balance, balance.held) == (starting, sum(r.hold.amount for r in won))
        await check_invariants(store, user)
        written = []
        for r, (kind, shares) in zip(won, plans[:len(won)], strict=True):
            usage = draw_usage(planned(iter(shares)), kind, prompt, r.output_tokens)
            written.append(await billing.settle(store, r, usage_record(key, r.hold.request_id), usage))
            await check_invariants(store, user)
        await check_books(store, user, written)
    run_in_fresh_store(databases, body)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(paid_prices, st.data())
def test_concurrent_request_lifecycles_keep_the_books(databases: Databases, price: Price, data: st.DataObject) -> None:
    """Requests hold, yield to each other, then settle (many over their hold) while others hold."""
    prompt = data.draw(st.integers(min_value=0, max_value=2_000), label="prompt")
    output = data.draw(st.integers(min_value=MIN_ANSWER_TOKENS, max_value=2_000), label="output")
    starting = 10 * max(1, worst_case_micro(price, prompt, output))
    plans = [(data.draw(st.sampled_from(["ok", "over", "fail", "disconnect"]), label=f"kind{i}"),
              data.draw(st.integers(min_value=0, max_value=3), label=f"pause{i}")) for i in range(CONCURRENT)]

    async def body(store: Store) -> None:
        user, key = await add_user(store, "ann@example.com")
        await credit(store, user, starting)
        written: list[UsageRecord] = []
        violations: list[str] = []
        done = asyncio.Event()

        async def request(i: int, kind: str, pause: int) -> None:
            try:
                r = await billing.reserve(store, key, model="m", price=price, request_id=f"r{i}",
                                          prompt_tokens=prompt, output_tokens=output)
            except InsufficientQuota:
                return
            for _ in range(pause):
                await asyncio.sleep(0)
            # An over-the-hold usage that cannot depend on `data` from inside a task: scale it.
            usage = {"ok": Usage(prompt_tokens=prompt, completion_tokens=r.output_tokens),
                     "over": Usage(prompt_tokens=2 * prompt + 7, completion_tokens=3 * r.output_tokens + 5),
                     "fail": Usage(),
                     "disconnect": Usage(prompt_tokens=prompt // 2, completion_tokens=r.output_tokens // 3,
                                         estimated=True)}[kind]
            written.append(await billing.settle(store, r, usage_record(key, r.hold.request_id), usage))

        async def watch() -> None:
            while not done.is_set():
                b = await store.get_balance(user.id)
                if not (b.balance >= 0 and 0 <= b.held <= b.balance):
                    violations.append(repr(b))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(request(i, kind, pause) for i, (kind, pause) in enumerate(plans)))
        done.set()
        await watcher
        assert violations == []
        assert written  # at least the first requests were served
        assert sum(r.charged for r in written) <= starting
        await check_books(store, user, written)
    run_in_fresh_store(databases, body)


# -- reserve, example by example -------------------------------------------------------------

PRICE = Price(input=1_000_000, output=2_000_000)  # 1 micro-USD a prompt token, 2 an output token


async def reserve(store: Store, key: ApiKey, prompt: int, output: int, request_id: str = "r") -> Reservation:
    return await billing.reserve(store, key, model="m", price=PRICE, request_id=request_id, prompt_tokens=prompt,
                                 output_tokens=output)


async def settle(store: Store, key: ApiKey, reservation: Reservation, usage: Usage) -> UsageRecord:
    return await billing.settle(store, reservation, usage_record(key, reservation.hold.request_id), usage)


async def test_reserve_holds_the_full_worst_case_when_affordable(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 10_000)
    r = await reserve(store, key, 100, 1_000)
    assert (r.output_tokens, r.lowered, r.hold.amount) == (1_000, False, 2_100)
    assert (await store.get_balance(user.id)).held == 2_100
    await settle(store, key, r, Usage(prompt_tokens=90, completion_tokens=10))
    assert (await store.get_balance(user.id)).balance == 10_000 - 110


async def test_reserve_lowers_the_answer_to_what_the_user_can_pay(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 1_000)
    r = await reserve(store, key, 100, 1_000)
    assert r.lowered
    assert r.output_tokens == 450  # (1,000 - 100) / 2
    assert r.hold.amount == 1_000
    await settle(store, key, r, Usage(prompt_tokens=100, completion_tokens=450))
    assert (await store.get_balance(user.id)).balance == 0


async def test_reserve_lowers_an_answer_longer_than_any_balance_could_pay_for(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 1_000)
    r = await reserve(store, key, 100, 10**19)  # its worst case is past 2**63 micro-USD
    assert (r.lowered, r.output_tokens, r.hold.amount) == (True, 450, 1_000)
    await settle(store, key, r, Usage(prompt_tokens=100, completion_tokens=450))
    assert (await store.get_balance(user.id)).balance == 0


async def test_a_usage_report_past_any_real_request_is_clamped_and_still_settles(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 10_000)
    r = await reserve(store, key, 100, 1_000)
    absurd = 10**20  # an upstream's report: more than a 64-bit column holds
    record = await settle(store, key, r, Usage(prompt_tokens=absurd, completion_tokens=absurd, cached_tokens=absurd))
    most = billing.MOST_TOKENS_A_REQUEST
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (most, most, most)
    assert record.charged == 10_000  # capped at the balance, as any cost past it
    assert await store.get_balance(user.id) == Balance(user.id, 0, 0)  # settled: the hold released


async def test_reserve_refuses_when_not_even_prompt_and_minimal_answer_fit(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    need = 100 + 2 * MIN_ANSWER_TOKENS
    await credit(store, user, need - 1)
    with pytest.raises(InsufficientQuota, match="balance") as refused:
        await reserve(store, key, 100, 1_000)
    assert refused.value.status == 402
    assert "0.000131" in refused.value.message and "0.000132" in refused.value.message
    assert (await store.get_balance(user.id)).held == 0
    await credit(store, user, 1)
    r = await reserve(store, key, 100, 1_000)
    assert (r.output_tokens, r.lowered, r.hold.amount) == (MIN_ANSWER_TOKENS, True, need)
    await settle(store, key, r, Usage())


async def test_reserve_with_a_small_max_tokens_needs_only_that_much(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 100 + 2 * 5)
    r = await reserve(store, key, 100, 5)  # asks for fewer tokens than MIN_ANSWER_TOKENS
    assert (r.output_tokens, r.lowered, r.hold.amount) == (5, False, 110)
    with pytest.raises(InsufficientQuota, match=r"at least \$0\.000110 "):  # not the price of 16 tokens
        await reserve(store, key, 100, 5, "again")
    await settle(store, key, r, Usage(prompt_tokens=100, completion_tokens=5))


async def test_reserve_counts_money_held_by_requests_in_flight(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 3_000)
    first = await reserve(store, key, 100, 1_000, "a")  # 2,100 held
    second = await reserve(store, key, 100, 1_000, "b")  # 900 left: lowered
    assert (second.output_tokens, second.lowered, second.hold.amount) == (400, True, 900)
    with pytest.raises(InsufficientQuota):
        await reserve(store, key, 0, 1_000, "c")
    for r in (first, second):
        await settle(store, key, r, Usage())


async def test_reserve_respects_the_key_budget(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com", budget=500)
    await credit(store, user, 1_000_000)
    r = await reserve(store, key, 100, 1_000)
    assert (r.output_tokens, r.lowered, r.hold.amount) == (200, True, 500)  # (500 - 100) / 2
    await settle(store, key, r, Usage(prompt_tokens=100, completion_tokens=150))
    key = await store.get_key(key.id)  # type: ignore[assignment]
    assert key.spent == 400
    r = await reserve(store, key, 20, 1_000)
    assert (r.output_tokens, r.hold.amount) == (40, 100)
    await settle(store, key, r, Usage(prompt_tokens=20, completion_tokens=40))
    key = await store.get_key(key.id)  # type: ignore[assignment]
    assert key.spent == 500
    with pytest.raises(InsufficientQuota, match="budget"):
        await reserve(store, key, 0, 1_000)
    assert (await store.get_balance(user.id)).balance == 1_000_000 - 500


async def test_a_free_request_takes_a_token_hold_and_costs_nothing(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 1)
    free = Price(input=0, output=0)
    r = await billing.reserve(store, key, model="m", price=free, request_id="f", prompt_tokens=1_000,
                              output_tokens=1_000)
    assert (r.output_tokens, r.lowered, r.hold.amount) == (1_000, False, 1)
    written = await billing.settle(store, r, usage_record(key, "f"), Usage(prompt_tokens=900, completion_tokens=900))
    assert (written.cost, written.charged) == (0, 0)
    assert (await store.get_balance(user.id)).balance == 1


async def test_settle_records_the_usage_and_the_charge(store: Store) -> None:
    user, key = await add_user(store, "ann@example.com")
    await credit(store, user, 10_000)
    cached_price = Price(input=1_000_000, output=2_000_000, cached_input=500_000, reasoning=3_000_000)
    r = await billing.reserve(store, key, model="m", price=cached_price, request_id="q", prompt_tokens=100,
                              output_tokens=100)
    usage = Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=40, reasoning_tokens=10)
    written = await billing.settle(store, r, usage_record(key, "q"), usage)
    assert (written.prompt_tokens, written.completion_tokens, written.cached_tokens, written.reasoning_tokens) == (
        100, 50, 40, 10)
    assert written.cost == 60 + 20 + 80 + 30
    assert written.charged == written.cost
    assert (await store.ledger(user.id))[-1].amount == -written.cost
