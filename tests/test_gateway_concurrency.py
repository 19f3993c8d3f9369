"""Money under pressure: many concurrent requests on one small balance, and holds left by a crash."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import aiohttp
import openai

from apibox.gateway.app import create_app
from apibox.store.base import Store
from tests.conftest import Live
from tests.fake_upstream import WORDS
from tests.gateway_helpers import account, auth, balance, charges, expected_cost, query, usage_rows, wait_for_usage

REQUESTS = 200


async def test_200_concurrent_requests_on_a_balance_for_20_never_overspend(live: Live, live_store) -> None:
    cost = expected_cost("gpt-fake", 21, len(WORDS))  # 143 micro-USD each
    who = await account(live_store, live, "ann@example.com", "0.00286")  # exactly 20 answers' worth
    start = balance(live, who.user_id)[0]
    assert start == 20 * cost

    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0, timeout=30) as client:
        async def one(i: int) -> tuple[int, str | None]:
            try:
                await client.chat.completions.create(
                    model="gpt-fake", max_tokens=20, messages=[{"role": "user", "content": f"question {i}"}])
            except openai.APIStatusError as exc:
                return exc.status_code, exc.code
            return 200, None

        began = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        elapsed = time.monotonic() - began

    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 402}, statuses
    assert all(code == "insufficient_quota" for status, code in results if status == 402)
    ok = statuses[200]
    assert 1 <= ok <= 20, statuses
    assert statuses[402] == REQUESTS - ok
    assert elapsed < 20

    rows = await wait_for_usage(live, who.user_id, ok)
    assert [r["status"] for r in rows] == ["ok"] * ok  # one row per answer, none for refusals
    assert len({r["request_id"] for r in rows}) == ok
    end, held = balance(live, who.user_id)
    assert held == 0
    assert end >= 0
    ledger = charges(live, who.user_id)
    assert len(ledger) == ok
    assert sum(ledger) == sum(r["charged"] for r in rows) == start - end
    assert all(r["charged"] == cost for r in rows)  # each paid in full: nothing was capped
    assert len(live.fake.requests) == ok  # no upstream call for a refused request
    problems = await live_store.audit()
    assert problems == []


async def test_concurrent_streams_and_replies_settle_each_request_once(live: Live, live_store) -> None:
    """A mix of streamed and whole answers from two keys of one user, plus a second user."""
    cost = expected_cost("gpt-fake", 21, len(WORDS))
    ann = await account(live_store, live, "ann@example.com", "0.0015")  # ~10 answers
    bob = await account(live_store, live, "bob@example.com", "1")

    async def one(session: aiohttp.ClientSession, key: str, i: int) -> int:
        body: dict[str, Any] = {"model": "gpt-fake", "max_tokens": 20, "stream": i % 2 == 0,
                                "messages": [{"role": "user", "content": f"q{i}"}]}
        async with session.post(f"{live.v1}/chat/completions", json=body, headers=auth(key)) as response:
            raw = await response.read()
            if response.status == 200 and body["stream"]:
                assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            return response.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(one(session, ann.key, i) for i in range(60)),
                                       *(one(session, bob.key, i) for i in range(20)))
    ann_results, bob_results = Counter(results[:60]), Counter(results[60:])
    assert set(ann_results) <= {200, 402}, ann_results
    assert bob_results == {200: 20}

    for who, ok in ((ann, ann_results[200]), (bob, 20)):
        rows = await wait_for_usage(live, who.user_id, ok)
        assert len(rows) == ok and all(r["status"] == "ok" for r in rows)
        assert charges(live, who.user_id) == [cost] * ok
    assert balance(live, bob.user_id) == (1_000_000 - 20 * cost, 0)
    assert balance(live, ann.user_id) == (1500 - ann_results[200] * cost, 0)


async def test_holds_left_by_a_crash_are_released_at_the_next_start(live: Live, live_store: Store,
                                                                     aiohttp_server) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    key_id = query(live, "SELECT id FROM api_keys WHERE user_id = ?", (who.user_id,))[0][0]
    # A request in flight when the process died: its hold was taken, its settlement never ran.
    hold = await live_store.hold(who.user_id, key_id, 12_345, "req_crashed", "gpt-fake")
    assert hold is not None
    assert balance(live, who.user_id) == (1_000_000, 12_345)

    server = await aiohttp_server(create_app(live.settings))  # a fresh gateway on the same database
    try:
        assert balance(live, who.user_id) == (1_000_000, 0)
        rows = usage_rows(live, who.user_id)
        assert len(rows) == 1
        row = rows[0]
        assert (row["request_id"], row["status"], row["model"], row["charged"]) == (
            "req_crashed", "interrupted", "gpt-fake", 0)
        assert charges(live, who.user_id) == []
        assert await live_store.audit() == []

        # The restarted gateway serves and bills as usual.
        async with aiohttp.ClientSession() as session, session.post(
                f"{server.make_url('/v1/chat/completions')}", headers=auth(who.key),
                json={"model": "demo", "messages": [{"role": "user", "content": "still there?"}]}) as response:
            assert response.status == 200
            reply = await response.json()
        assert charges(live, who.user_id) == [int(Decimal(str(reply["usage"]["cost"])) * 1_000_000)]
    finally:
        await server.close()
