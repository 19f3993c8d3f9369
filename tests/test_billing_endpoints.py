"""Client-app endpoints on a live gateway: the legacy OpenAI billing shapes chat apps poll
(``/v1/dashboard/billing/subscription`` and ``/usage``) and ``GET /v1/me``.

Every figure is checked against the database the requests were really billed in: the ledger's
charges joined to their usage rows, summed here in integer micro-USD and compared with the
JSON numbers read back exactly (``Decimal(str(number))``). ``total_usage`` and line-item costs
are in cents, ``*_usd`` in dollars, as the clients that read them expect.

Requests go through the live gateway, so they are billed now; usage on other days (for date
windows and month edges) is settled through the store's own hold and settle at a chosen moment,
which writes the usage row and its ledger charge together, as the gateway does.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from apibox import accounts
from apibox.config import LimitSet
from apibox.models import UsageRecord, UserState
from apibox.store.base import Store
from tests.conftest import Live, ServerThread, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account, auth, balance, query, usage_rows, wait_for_usage
from tests.live_variants import Variant, limits, openai_error, request, store_of

SUBSCRIPTION = "/v1/dashboard/billing/subscription"
USAGE = "/v1/dashboard/billing/usage"
MESSAGES = [{"role": "user", "content": "How much is left?"}]
PROMPT_TOKENS = 123_457  # the fake upstream reports this many, so charges reach fractions of a cent


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(prompt_tokens=PROMPT_TOKENS)


# -- helpers --------------------------------------------------------------------------------


async def get(live: Live, path: str, key: str | None, **params: str) -> tuple[int, Any]:
    query_string = "&".join(f"{k}={v}" for k, v in params.items())
    status, _, raw = await request(live, "GET", f"{path}?{query_string}" if params else path, key=key)
    return status, json.loads(raw)


async def ok(live: Live, path: str, key: str, **params: str) -> dict[str, Any]:
    status, body = await get(live, path, key, **params)
    assert status == 200, body
    return body


async def call(live: Live, key: str, model: str = "gpt-fake") -> None:
    """One billed request through the gateway (chat, or embeddings for embedding models)."""
    if model.startswith("embed"):
        path, body = "/v1/embeddings", {"model": model, "input": "How much is left?"}
    else:
        path, body = "/v1/chat/completions", {"model": model, "messages": MESSAGES}
    status, _, raw = await request(live, "POST", path, key=key, json_body=body)
    assert status == 200, raw


def exact(number: Any) -> Decimal:
    """A JSON number exactly as written (the shortest repr of the double that was parsed)."""
    assert isinstance(number, int | float) and not isinstance(number, bool), number
    return Decimal(str(number))


def cents(micro: int) -> Decimal:
    return Decimal(micro) / 10_000


def usd(micro: int) -> Decimal:
    return Decimal(micro) / 1_000_000


def billed(live: Live, *, user_id: int | None = None, key_id: int | None = None) -> list[tuple[int, str, int]]:
    """(usage created_at ms, model, charge) for every ledger charge, joined to its usage row."""
    column, value = ("l.user_id", user_id) if user_id is not None else ("u.key_id", key_id)
    rows = query(live, f"SELECT u.created_at, u.model, -l.amount FROM ledger l JOIN usage u ON u.id = l.usage_id "
                       f"WHERE l.kind = 'charge' AND {column} = ? ORDER BY l.id", (value,))
    return [(r[0], r[1], r[2]) for r in rows]


def utc_day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


async def settle_at(db: Store, user_id: int, key_id: int, model: str, cost: int, moment: datetime,
                    prompt: int = 1000, completion: int = 100) -> None:
    """A request billed at ``moment``: hold, then settle (usage row and ledger charge in one transaction)."""
    request_id = f"req_{uuid.uuid4().hex}"
    hold = await db.hold(user_id, key_id, cost, request_id, model)
    assert hold is not None
    record = await db.settle(hold, UsageRecord(
        request_id=request_id, user_id=user_id, key_id=key_id, model=model, provider="fake",
        endpoint="chat/completions", status="ok", prompt_tokens=prompt, completion_tokens=completion,
        cost=cost, created_at=moment))
    assert record.charged == cost


def at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def key_id_of(live: Live, user_id: int, name: str | None = None) -> int:
    rows = query(live, "SELECT id, name FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,))
    return next(r["id"] for r in rows if name is None or r["name"] == name)


def js_round(value: float) -> int:
    """JavaScript's Math.round: halves go up."""
    return math.floor(value + 0.5)


def assert_subscription_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"object", "has_payment_method", "soft_limit_usd", "hard_limit_usd",
                         "system_hard_limit_usd", "access_until", "plan"}
    assert body["object"] == "billing_subscription"
    assert body["has_payment_method"] is True
    for field in ("soft_limit_usd", "hard_limit_usd", "system_hard_limit_usd"):
        assert type(body[field]) is float, (field, body[field])
    assert body["soft_limit_usd"] == body["hard_limit_usd"] == body["system_hard_limit_usd"]
    assert type(body["access_until"]) is int
    assert set(body["plan"]) == {"title", "id"}
    assert all(type(v) is str and v for v in body["plan"].values())


def assert_usage_shape(body: dict[str, Any], start: date, end: date) -> None:
    assert set(body) == {"object", "daily_costs", "total_usage"}
    assert body["object"] == "list"
    assert type(body["total_usage"]) is float
    days = body["daily_costs"]
    assert isinstance(days, list) and len(days) == (end - start).days
    for index, day in enumerate(days):
        assert set(day) == {"timestamp", "line_items"}
        assert type(day["timestamp"]) is int
        assert day["timestamp"] == midnight(start + timedelta(days=index))  # every day, in order, no gaps
        assert isinstance(day["line_items"], list)
        for item in day["line_items"]:
            assert set(item) == {"name", "cost"}
            assert type(item["name"]) is str and type(item["cost"]) is float
        assert len({item["name"] for item in day["line_items"]}) == len(day["line_items"])


def expected_days(charges: list[tuple[int, str, int]], start: date, end: date) -> dict[date, dict[str, int]]:
    """Micro-USD per UTC day and model for the charges inside [start, end)."""
    out: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for created_ms, model, amount in charges:
        if start <= utc_day(created_ms) < end:
            out[utc_day(created_ms)][model] += amount
    return {day: dict(models) for day, models in out.items()}


def reported_days(body: dict[str, Any]) -> dict[date, dict[str, int]]:
    """The usage body's line items back in micro-USD (exactly: cents * 10,000)."""
    out: dict[date, dict[str, int]] = {}
    for day in body["daily_costs"]:
        if day["line_items"]:
            when = datetime.fromtimestamp(day["timestamp"], UTC).date()
            micro = {item["name"]: exact(item["cost"]) * 10_000 for item in day["line_items"]}
            assert all(v == v.to_integral_value() for v in micro.values()), micro
            out[when] = {name: int(v) for name, v in micro.items()}
    return out


# -- shapes and exact reconciliation --------------------------------------------------------


async def test_subscription_and_usage_reconcile_exactly_with_the_ledger(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "25")
    other = await account(live_store, live, "bob@example.com", "5")  # not Ann's: never in her figures
    for model in ("gpt-fake", "gpt-fake", "demo", "embed-fake"):
        await call(live, who.key, model)
    await call(live, other.key)
    await wait_for_usage(live, who.user_id, 4)
    await wait_for_usage(live, other.user_id, 1)
    today = utc_day(max(created for created, _, _ in billed(live, user_id=who.user_id)))
    # Earlier days: one request 3 days back, two 40 days back (one of them a single micro-dollar).
    key_id = key_id_of(live, who.user_id)
    await settle_at(live_store, who.user_id, key_id, "demo", 77_777, at(today - timedelta(days=3)))
    await settle_at(live_store, who.user_id, key_id, "gpt-fake", 1_234_567, at(today - timedelta(days=40), 0))
    await settle_at(live_store, who.user_id, key_id, "gpt-fake", 1, at(today - timedelta(days=40), 23))
    charges = billed(live, user_id=who.user_id)
    assert len(charges) == 7 and all(amount > 0 for _, _, amount in charges)
    assert sorted(amount for _, _, amount in charges) == sorted(r["charged"] for r in usage_rows(live, who.user_id))
    settled, held = balance(live, who.user_id)
    assert held == 0
    assert settled == 25_000_000 - sum(amount for _, _, amount in charges)
    assert settled == query(live, "SELECT sum(amount) FROM ledger WHERE user_id = ?", (who.user_id,))[0][0]

    subscription = await ok(live, SUBSCRIPTION, who.key)
    assert_subscription_shape(subscription)
    assert subscription["access_until"] == 0
    assert subscription["plan"] == {"title": "default", "id": "default"}
    # hard limit = balance + everything charged, so hard - usage of all time = the balance, to the micro-dollar.
    assert exact(subscription["hard_limit_usd"]) == usd(settled + sum(amount for _, _, amount in charges))

    # A window holding every charge.
    start, end = today - timedelta(days=45), today + timedelta(days=1)
    everything = await ok(live, USAGE, who.key, start_date=start.isoformat(), end_date=end.isoformat())
    assert_usage_shape(everything, start, end)
    assert exact(everything["total_usage"]) == cents(sum(amount for _, _, amount in charges))
    assert exact(subscription["hard_limit_usd"]) - exact(everything["total_usage"]) / 100 == usd(settled)
    assert reported_days(everything) == expected_days(charges, start, end)
    assert len(reported_days(everything)) >= 3  # today, 3 days back, 40 days back
    assert reported_days(everything)[today - timedelta(days=40)] == {"gpt-fake": 1_234_568}
    per_item = sum(exact(i["cost"]) for d in everything["daily_costs"] for i in d["line_items"])
    assert per_item == exact(everything["total_usage"])

    # A window of the last 5 days leaves out the two requests 40 days back.
    start = today - timedelta(days=5)
    recent = await ok(live, USAGE, who.key, start_date=start.isoformat(), end_date=end.isoformat())
    assert_usage_shape(recent, start, end)
    inside = expected_days(charges, start, end)
    assert reported_days(recent) == inside
    assert exact(recent["total_usage"]) == cents(sum(sum(m.values()) for m in inside.values()))
    assert {name for d in recent["daily_costs"] for name in (i["name"] for i in d["line_items"])} == {
        "gpt-fake", "demo", "embed-fake"}

    # One day alone, and a window with no usage at all.
    alone = await ok(live, USAGE, who.key, start_date=(today - timedelta(days=3)).isoformat(),
                     end_date=(today - timedelta(days=2)).isoformat())
    assert alone["daily_costs"][0]["line_items"] == [{"name": "demo", "cost": 7.7777}]
    assert alone["total_usage"] == 7.7777
    quiet = await ok(live, USAGE, who.key, start_date=(today - timedelta(days=20)).isoformat(),
                     end_date=(today - timedelta(days=10)).isoformat())
    assert_usage_shape(quiet, today - timedelta(days=20), today - timedelta(days=10))
    assert quiet["total_usage"] == 0 and all(d["line_items"] == [] for d in quiet["daily_costs"])


async def test_a_new_account_has_its_balance_as_the_limit_and_no_usage(live: Live, live_store) -> None:
    who = await account(live_store, live, "new@example.com", "3.000001")
    subscription = await ok(live, SUBSCRIPTION, who.key)
    assert_subscription_shape(subscription)
    assert exact(subscription["hard_limit_usd"]) == Decimal("3.000001")
    body = await ok(live, USAGE, who.key, start_date="2026-01-01", end_date="2026-01-08")
    assert_usage_shape(body, date(2026, 1, 1), date(2026, 1, 8))
    assert body["total_usage"] == 0
    empty = await account(live_store, live, "empty@example.com", "0")
    assert exact((await ok(live, SUBSCRIPTION, empty.key))["hard_limit_usd"]) == 0


# -- keys with and without a budget ---------------------------------------------------------


async def test_a_key_with_a_budget_reports_its_own_spend_and_budget(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "10", name="team", budget="2.5",
                        expires="2031-06-01T12:00:00Z")
    plain = (await accounts.create_key(live_store, who.email, accounts.KeyOptions(name="plain"),
                                       known_models=live.settings.model_index())).secret
    for key in (who.key, who.key, plain):
        await call(live, key)
    await wait_for_usage(live, who.user_id, 3)
    team_id = key_id_of(live, who.user_id, "team")
    team = billed(live, key_id=team_id)
    everyone = billed(live, user_id=who.user_id)
    assert len(team) == 2 and len(everyone) == 3
    settled = balance(live, who.user_id)[0]
    team_spent = sum(a for _, _, a in team)
    assert team_spent == query(live, "SELECT spent FROM api_keys WHERE id = ?", (team_id,))[0][0]
    today = utc_day(max(c for c, _, _ in everyone))
    window = {"start_date": today.isoformat(), "end_date": (today + timedelta(days=1)).isoformat()}

    # The budgeted key: its own spend plus what its budget still allows (less than the balance here).
    sub = await ok(live, SUBSCRIPTION, who.key)
    assert_subscription_shape(sub)
    assert exact(sub["hard_limit_usd"]) == Decimal("2.5")
    assert sub["access_until"] == int(datetime(2031, 6, 1, 12, tzinfo=UTC).timestamp())
    used = await ok(live, USAGE, who.key, **window)
    assert exact(used["total_usage"]) == cents(team_spent)
    assert exact(sub["hard_limit_usd"]) - exact(used["total_usage"]) / 100 == usd(2_500_000 - team_spent)

    # The key without a budget: the whole account, balance plus everything charged to any key.
    sub = await ok(live, SUBSCRIPTION, plain)
    assert sub["access_until"] == 0
    assert exact(sub["hard_limit_usd"]) == usd(settled + sum(a for _, _, a in everyone))
    used = await ok(live, USAGE, plain, **window)
    assert exact(used["total_usage"]) == cents(sum(a for _, _, a in everyone))
    assert exact(sub["hard_limit_usd"]) - exact(used["total_usage"]) / 100 == usd(settled)


async def test_a_budget_larger_than_the_balance_is_capped_by_the_balance(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", budget="100")
    await call(live, who.key)
    await wait_for_usage(live, who.user_id, 1)
    spent = billed(live, user_id=who.user_id)[0][2]
    settled = balance(live, who.user_id)[0]
    sub = await ok(live, SUBSCRIPTION, who.key)
    # What the key can still spend is the balance (less than its budget): limit = spent + balance.
    assert exact(sub["hard_limit_usd"]) == usd(spent + settled) == Decimal(1)


# -- a client that parses like ChatGPT-Next-Web ---------------------------------------------


async def test_a_chatgpt_next_web_style_client_reads_used_and_total(live: Live, live_store) -> None:
    """ChatGPT-Next-Web's ChatGPTApi.usage(): start = first of the month, end = tomorrow, both
    paths joined to the base URL without /v1; used = Math.round(total_usage) / 100 and
    total = Math.round(hard_limit_usd * 100) / 100."""
    who = await account(live_store, live, "ann@example.com", "20")
    for _ in range(7):
        await call(live, who.key)
    await wait_for_usage(live, who.user_id, 7)
    charges = billed(live, user_id=who.user_id)
    today = utc_day(max(c for c, _, _ in charges))
    start, end = today.replace(day=1), today + timedelta(days=1)
    status, used = await get(live, "/dashboard/billing/usage", who.key, start_date=start.isoformat(),
                             end_date=end.isoformat())
    assert status == 200
    status, subs = await get(live, "/dashboard/billing/subscription", who.key)
    assert status == 200
    assert "error" not in used and "error" not in subs

    client_used = js_round(used["total_usage"]) / 100
    client_total = js_round(subs["hard_limit_usd"] * 100) / 100
    spent = sum(a for _, _, a in charges)
    assert spent > 10_000  # more than a cent, so the client shows something
    assert client_used == js_round(float(cents(spent))) / 100
    settled = balance(live, who.user_id)[0]
    assert client_total == js_round(float(usd(settled + spent) * 100)) / 100
    # A balance checker's "remaining" (hard - total_usage / 100) is the balance, to float precision.
    assert subs["hard_limit_usd"] - used["total_usage"] / 100 == pytest.approx(float(usd(settled)), abs=1e-9)
    # The same answers under /v1.
    assert await ok(live, USAGE, who.key, start_date=start.isoformat(), end_date=end.isoformat()) == used
    assert await ok(live, SUBSCRIPTION, who.key) == subs


# -- validation and authentication ----------------------------------------------------------


@pytest.mark.parametrize(("params", "param"), [
    ({"end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "2026-01-01"}, "end_date"),
    ({"start_date": "", "end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "2026-1-01", "end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "2026-02-30", "end_date": "2026-03-02"}, "start_date"),
    ({"start_date": "20260101", "end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "2026-01-01T00:00:00", "end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "yesterday", "end_date": "2026-01-02"}, "start_date"),
    ({"start_date": "2026-01-01", "end_date": "2026-13-01"}, "end_date"),
    ({"start_date": "2026-01-01", "end_date": "%EF%BC%92026-01-02"}, "end_date"),  # a full-width digit
    ({"start_date": "2026-01-05", "end_date": "2026-01-04"}, "end_date"),  # end before start
    ({"start_date": "2026-01-05", "end_date": "2026-01-05"}, "end_date"),  # empty: end_date is exclusive
    ({"start_date": "2026-01-01", "end_date": "2026-04-12"}, "end_date"),  # 101 days
    ({"start_date": "2025-01-01", "end_date": "2026-01-01"}, "end_date"),
])
async def test_bad_dates_are_a_400_naming_the_field(live: Live, live_store, params: dict[str, str],
                                                    param: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await request(live, "GET", f"{USAGE}?" + "&".join(f"{k}={v}" for k, v in params.items()),
                                   key=who.key)
    assert status == 400
    error = openai_error(raw)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]


async def test_a_hundred_days_and_the_calendar_edges_are_accepted(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = await ok(live, USAGE, who.key, start_date="2026-01-01", end_date="2026-04-11")
    assert_usage_shape(body, date(2026, 1, 1), date(2026, 4, 11))
    assert len(body["daily_costs"]) == 100
    for start, end in (("0001-01-01", "0001-01-03"), ("9999-12-29", "9999-12-31"), ("2024-02-28", "2024-03-01")):
        body = await ok(live, USAGE, who.key, start_date=start, end_date=end)
        assert_usage_shape(body, date.fromisoformat(start), date.fromisoformat(end))


BILLING_PATHS = [SUBSCRIPTION, f"{USAGE}?start_date=2026-01-01&end_date=2026-01-02", "/dashboard/billing/subscription",
                 "/dashboard/billing/usage?start_date=2026-01-01&end_date=2026-01-02", "/v1/me"]


@pytest.mark.parametrize("path", BILLING_PATHS)
async def test_the_endpoints_need_a_valid_key(live: Live, live_store, path: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    for key in (None, "sk-apibox-not-a-real-key-0123456789", who.key + "x"):
        status, headers, raw = await request(live, "GET", path, key=key)
        assert status == 401, (path, key)
        assert openai_error(raw)["code"] == "invalid_api_key"
        assert headers["x-should-retry"] == "false"
        assert headers["x-request-id"].startswith("req_")
    assert (await request(live, "GET", path, key=who.key))[0] == 200


async def test_the_endpoints_refuse_a_suspended_users_key(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    for path in BILLING_PATHS:
        assert (await request(live, "GET", path, key=who.key))[0] == 200, path
    await live_store.set_user_state(who.user_id, UserState.SUSPENDED, "test")
    deadline = time.monotonic() + 3  # the gateway's key cache forgets the user within a second
    while (status := (await request(live, "GET", SUBSCRIPTION, key=who.key))[0]) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert status == 403
    for path in BILLING_PATHS:
        status, _, raw = await request(live, "GET", path, key=who.key)
        assert status == 403, path
        assert openai_error(raw)["code"] == "account_suspended", path


# -- /v1/me: effective limits and the key's own usage this month ------------------------------


@pytest.fixture
def limited(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A live gateway with default limits: key rpm 600 and concurrency 32, user rpm 1200."""
    server = Variant(tmp_path, database_url, fake,
                     limits(key=LimitSet(rpm=600, concurrency=32), user=LimitSet(rpm=1200)))
    with serving(server) as running:
        yield running


def month_of(moment: datetime) -> tuple[datetime, datetime]:
    first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    return first, datetime(first.year + first.month // 12, first.month % 12 + 1, 1, tzinfo=UTC)


async def test_me_shows_effective_limits_and_the_keys_own_usage_this_month(limited: Live) -> None:
    live = limited
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "10", name="own", rpm=50, tpm=10_000_000)
        other = (await accounts.create_key(db, who.email, accounts.KeyOptions(name="defaults"),
                                           known_models=live.settings.model_index())).secret
        for key in (who.key, who.key, who.key, other):
            await call(live, key)
        rows = await wait_for_usage(live, who.user_id, 4)
        own_id = key_id_of(live, who.user_id, "own")
        first, _ = month_of(datetime.fromtimestamp(rows[0]["created_at"] / 1000, UTC))
        await settle_at(db, who.user_id, own_id, "gpt-fake", 999, first - timedelta(milliseconds=1))  # last month
    counted = [r for r in rows if r["key_id"] == own_id]
    other_row = next(r for r in rows if r["key_id"] != own_id)
    assert len(counted) == 3

    status, _, raw = await request(live, "GET", "/v1/me", key=who.key)
    assert status == 200
    me = json.loads(raw)
    assert set(me) == {"user", "key", "balance", "limits", "usage_this_month"}
    assert me["key"]["limits"] == {"rpm": 50, "tpm": 10_000_000, "concurrency": None}  # the key's own settings
    assert me["limits"] == {"key": {"rpm": 50, "tpm": 10_000_000, "concurrency": 32},  # own, else the defaults
                            "user": {"rpm": 1200, "tpm": None, "concurrency": None}}
    month = me["usage_this_month"]
    charged = {r[0]: -r[1] for r in query(live, "SELECT usage_id, amount FROM ledger WHERE kind = 'charge'")}
    assert month == {
        "since": first.isoformat(), "until": month_of(first)[1].isoformat(),
        "requests": 3,
        "prompt_tokens": sum(r["prompt_tokens"] for r in counted),
        "completion_tokens": sum(r["completion_tokens"] for r in counted),
        "total_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in counted),
        "cost_usd": str(usd(sum(charged[r["id"]] for r in counted)).quantize(Decimal("0.000001"))),
    }
    assert month["prompt_tokens"] == 3 * PROMPT_TOKENS
    assert who.key not in raw.decode()

    status, _, raw = await request(live, "GET", "/v1/me", key=other)
    me = json.loads(raw)
    assert me["key"]["limits"] == {"rpm": None, "tpm": None, "concurrency": None}
    assert me["limits"]["key"] == {"rpm": 600, "tpm": None, "concurrency": 32}
    assert me["usage_this_month"]["requests"] == 1
    assert Decimal(me["usage_this_month"]["cost_usd"]) == usd(charged[other_row["id"]])


MOMENT = datetime(2031, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def march_2031(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A live gateway whose clock says 15 March 2031, so "this month" is March 2031."""
    server = ServerThread(tmp_path, database_url, fake)
    server.clock = lambda: MOMENT
    with serving(server) as running:
        yield running


async def test_this_month_follows_the_gateways_clock_and_its_edges(march_2031: Live) -> None:
    live = march_2031
    march, april = datetime(2031, 3, 1, tzinfo=UTC), datetime(2031, 4, 1, tzinfo=UTC)
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "10")
        key_id = key_id_of(live, who.user_id)
        await call(live, who.key)  # billed now, years before March 2031: not in that month
        await wait_for_usage(live, who.user_id, 1)
        # The month's first and last millisecond count; the ones just outside do not.
        for cost, moment in ((101, march), (202, april - timedelta(milliseconds=1)),
                             (404, march - timedelta(milliseconds=1)), (808, april)):
            await settle_at(db, who.user_id, key_id, "demo", cost, moment, prompt=cost, completion=1)
    status, _, raw = await request(live, "GET", "/v1/me", key=who.key)
    assert status == 200
    assert json.loads(raw)["usage_this_month"] == {
        "since": "2031-03-01T00:00:00+00:00", "until": "2031-04-01T00:00:00+00:00", "requests": 2,
        "prompt_tokens": 303, "completion_tokens": 2, "total_tokens": 305, "cost_usd": "0.000303"}


async def test_me_without_configured_limits_or_usage(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with aiohttp.ClientSession() as session, session.get(f"{live.v1}/me", headers=auth(who.key)) as response:
        assert response.status == 200
        me = await response.json()
    assert me["limits"] == {"key": {"rpm": None, "tpm": None, "concurrency": None},
                            "user": {"rpm": None, "tpm": None, "concurrency": None}}
    month = me["usage_this_month"]
    assert (month["requests"], month["prompt_tokens"], month["completion_tokens"], month["total_tokens"],
            month["cost_usd"]) == (0, 0, 0, 0, "0.000000")
    since = datetime.fromisoformat(month["since"])
    assert since.day == 1 and (since.hour, since.minute, since.second) == (0, 0, 0)
    assert datetime.fromisoformat(month["until"]) > datetime.now(UTC) >= since - timedelta(seconds=5)
