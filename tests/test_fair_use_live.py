"""Fair use on a live gateway: rpm, tpm and concurrency per key and per user, x-ratelimit-*
headers, account states and key scopes, IP allowlists behind trusted proxies, bad-key
limits per address, key budgets, body size and in-flight caps.

Every refusal must leave the books as they were; every live server's books are audited
(`apibox db check`) when it stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict
from typer.testing import CliRunner

from apibox import accounts, tokens
from apibox.cli.main import app as cli_app
from apibox.config import LimitSet
from tests.conftest import Live, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account, balance, books, charges, execute, query, usage_rows, wait_for_usage
from tests.live_variants import CHAT, MESSAGES, Variant, limits, openai_error, request, server, store_of
from tests.waiting import eventually

LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


async def chat(live: Live, key: str | None, body: dict[str, Any] | None = None, *,
               forwarded_for: str | None = None) -> tuple[int, Any, bytes]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    return await request(live, "POST", "/v1/chat/completions", key=key, json_body=body or CHAT, headers=headers)


async def refused(live: Live, key: str | None, status: int, body: dict[str, Any] | None = None, *,
                  forwarded_for: str | None = None) -> tuple[dict[str, Any], Any]:
    """A request that must be refused with ``status`` and leave the books and the upstream untouched."""
    before, upstream_calls = books(live), len(live.fake.requests)
    got, headers, raw = await chat(live, key, body, forwarded_for=forwarded_for)
    assert got == status, raw
    assert headers["x-request-id"].startswith("req_")
    assert books(live) == before
    assert len(live.fake.requests) == upstream_calls
    return openai_error(raw), headers


def rate_limited(error: dict[str, Any], headers: Any) -> int:
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 60
    return retry_after


@pytest.fixture
def start(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Callable[..., Live]]:
    """start(change, ...) -> a live gateway with changed settings, stopped and audited after the test."""
    with ExitStack() as stack:
        yield lambda *changes: stack.enter_context(serving(Variant(tmp_path, database_url, fake, *changes)))


# -- requests per minute ------------------------------------------------------------------


async def test_rpm_3_gets_429_with_retry_after_on_the_fourth_request(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", rpm=3)
    remaining = []
    for _ in range(3):
        status, headers, raw = await chat(live, who.key)
        assert status == 200, raw
        assert headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(headers["x-ratelimit-remaining-requests"])
        assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]
    error, headers = await refused(live, who.key, 429)
    rate_limited(error, headers)
    assert "requests per min" in error["message"] and "3" in error["message"]
    # streams count too, and the official SDK sees a RateLimitError
    await refused(live, who.key, 429, {**CHAT, "stream": True})
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)
    assert len(usage_rows(live, who.user_id)) == 3


async def test_rpm_is_per_key(live: Live, live_store) -> None:
    limited = await account(live_store, live, "ann@example.com", "1", rpm=1)
    other = await account(live_store, live, "bob@example.com", "1", rpm=1)
    assert (await chat(live, limited.key))[0] == 200
    await refused(live, limited.key, 429)
    assert (await chat(live, other.key))[0] == 200


async def test_ratelimit_headers_on_a_402_and_on_a_stream(live: Live, live_store) -> None:
    broke = await account(live_store, live, "ann@example.com", "0", rpm=5)
    error, headers = await refused(live, broke.key, 402)
    assert error["code"] == "insufficient_quota"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert "x-ratelimit-reset-requests" in headers
    rich = await account(live_store, live, "bob@example.com", "1", rpm=5, tpm=100_000)
    status, headers, _ = await chat(live, rich.key, {**CHAT, "stream": True})
    assert status == 200
    for name in (*LIMIT_HEADERS, "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"):
        assert name in headers, name
    assert headers["x-ratelimit-limit-tokens"] == "100000"


async def test_an_unlimited_key_gets_no_ratelimit_headers(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, _ = await chat(live, who.key)
    assert status == 200
    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]


# -- requests at once ---------------------------------------------------------------------


async def test_concurrency_2_refuses_a_third_request_at_once(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", concurrency=2)
    live.fake.delay = 0.6
    slow = [asyncio.ensure_future(chat(live, who.key)) for _ in range(2)]
    await eventually(lambda: len(live.fake.requests) == 2)  # both are waiting on the upstream
    status, headers, raw = await chat(live, who.key)
    assert status == 429
    error = openai_error(raw)
    assert rate_limited(error, headers) == 1
    assert "at once" in error["message"] and "2" in error["message"]
    assert [r[0] for r in await asyncio.gather(*slow)] == [200, 200]
    live.fake.delay = 0
    assert (await chat(live, who.key))[0] == 200  # the slots were released
    rows = await wait_for_usage(live, who.user_id, 3)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert len(live.fake.requests) == 3


async def test_concurrency_slot_is_released_after_a_refusal_or_a_failure(live: Live, live_store) -> None:
    broke = await account(live_store, live, "ann@example.com", "0", concurrency=1)
    for _ in range(3):
        await refused(live, broke.key, 402)  # a leaked slot would make the second one a 429
    who = await account(live_store, live, "bob@example.com", "1", concurrency=1)
    live.fake.mode = "status"  # the upstream fails
    assert (await chat(live, who.key))[0] >= 500
    assert (await chat(live, who.key, {**CHAT, "stream": True}))[0] >= 500
    live.fake.mode = "ok"
    assert (await chat(live, who.key))[0] == 200


# -- tokens per minute --------------------------------------------------------------------


async def test_tpm_refuses_a_request_larger_than_the_limit_and_corrects_at_settlement(live: Live,
                                                                                      live_store) -> None:
    body = {**CHAT, "max_tokens": 100}
    estimate = tokens.prompt_estimate({"messages": MESSAGES}) + 100
    # the fake upstream reports 21 prompt + 9 completion tokens: 30 actually used
    tpm = estimate + 40  # room for one estimate plus 40: a second request fits only once the first is corrected
    who = await account(live_store, live, "ann@example.com", "1", tpm=tpm)

    error, headers = await refused(live, who.key, 429, {**CHAT, "max_tokens": tpm})
    rate_limited(error, headers)
    assert "set a lower max_tokens" in error["message"]
    assert headers["x-should-retry"] == "false"  # the SDKs would wait and send it again, to no end

    status, headers, _ = await chat(live, who.key, body)
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert headers["x-ratelimit-remaining-tokens"] == str(tpm - estimate)
    status, headers, raw = await chat(live, who.key, body)  # 30 + estimate <= tpm only after the correction
    assert status == 200, raw
    assert headers["x-ratelimit-remaining-tokens"] == str(tpm - 30 - estimate)
    error, headers = await refused(live, who.key, 429, body)  # 60 + estimate > tpm
    rate_limited(error, headers)
    assert "tokens per min" in error["message"]
    # what is left is tpm - 60 = estimate - 20: max_tokens 80 fits exactly, 81 does not
    await refused(live, who.key, 429, {**CHAT, "max_tokens": 81})
    assert (await chat(live, who.key, {**CHAT, "max_tokens": 80}))[0] == 200
    assert len(usage_rows(live, who.user_id)) == 3


# -- per-user limits from the config --------------------------------------------------------


async def test_user_limits_from_config_hold_across_two_keys(start) -> None:
    live = start(limits(user=LimitSet(rpm=3)))
    async with store_of(live) as db:
        ann = await account(db, live, "ann@example.com", "1")
        second = (await accounts.create_key(db, ann.email, accounts.KeyOptions(name="second"),
                                            known_models=live.settings.model_index())).secret
        bob = await account(db, live, "bob@example.com", "1")
    assert (await chat(live, ann.key))[0] == 200
    assert (await chat(live, second))[0] == 200
    status, headers, _ = await chat(live, ann.key)
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "3"  # the user's limit: the key has none of its own
    assert headers["x-ratelimit-remaining-requests"] == "0"
    for key in (second, ann.key):
        error, headers = await refused(live, key, 429)
        rate_limited(error, headers)
        assert "user" in error["message"]
    assert (await chat(live, bob.key))[0] == 200  # another user is not affected
    assert len(usage_rows(live, ann.user_id)) == 3


async def test_user_concurrency_from_config_holds_across_keys(start) -> None:
    live = start(limits(user=LimitSet(concurrency=1)))
    async with store_of(live) as db:
        ann = await account(db, live, "ann@example.com", "1")
        second = (await accounts.create_key(db, ann.email, accounts.KeyOptions(),
                                            known_models=live.settings.model_index())).secret
    live.fake.delay = 0.5
    first = asyncio.ensure_future(chat(live, ann.key))
    await eventually(lambda: len(live.fake.requests) == 1)
    status, _, raw = await chat(live, second)
    assert status == 429
    assert "at once" in openai_error(raw)["message"]
    assert (await first)[0] == 200


async def test_key_defaults_from_config_apply_unless_the_key_has_its_own(start) -> None:
    live = start(limits(key=LimitSet(rpm=2)))
    async with store_of(live) as db:
        default = await account(db, live, "ann@example.com", "1")
        own = await account(db, live, "bob@example.com", "1", rpm=4)
    for _ in range(2):
        assert (await chat(live, default.key))[0] == 200
    await refused(live, default.key, 429)
    for _ in range(4):
        status, headers, _ = await chat(live, own.key)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "4"
    await refused(live, own.key, 429)


# -- account states and key scopes ----------------------------------------------------------


@pytest.mark.parametrize(("state", "word"), [("suspend", "suspended"), ("ban", "banned")])
async def test_suspended_and_banned_users_get_a_clear_403(live: Live, live_store, state: str, word: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    await asyncio.to_thread(cli, live, "users", state, who.email, "--reason", "unpaid invoice")
    error, headers = await refused(live, who.key, 403)
    assert error["type"] == "permission_denied"
    assert error["code"] == f"account_{word}"
    assert f"account is {word}" in error["message"] and "unpaid invoice" in error["message"]
    assert headers["x-should-retry"] == "false"


async def test_a_closed_user_is_refused_with_a_403_that_says_so_and_keeps_the_balance(live: Live,
                                                                                     live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "2.5")
    await asyncio.to_thread(cli, live, "users", "close", who.email, "--reason", "asked to leave")
    error, _ = await refused(live, who.key, 403)
    assert error["code"] == "account_closed"
    assert "account is closed" in error["message"] and "asked to leave" in error["message"]
    assert [r[0] for r in query(live, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE user_id = ?",
                                (who.user_id,))] == [1]
    assert balance(live, who.user_id) == (2_500_000, 0)  # kept for a manual refund


async def test_a_model_outside_the_keys_scope_is_a_403(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", models=("demo",))
    error, _ = await refused(live, who.key, 403)
    assert (error["type"], error["code"], error["param"]) == ("permission_denied", "model_not_allowed", "model")
    assert "may not use the model `gpt-fake`" in error["message"]
    for path, body in (("/v1/completions", {"model": "gpt-fake", "prompt": "x"}),
                       ("/v1/embeddings", {"model": "embed-fake", "input": "x"})):
        status, _, raw = await request(live, "POST", path, key=who.key, json_body=body)
        assert status == 403 and openai_error(raw)["code"] == "model_not_allowed"
    assert (await chat(live, who.key, {**CHAT, "model": "demo"}))[0] == 200


async def test_an_address_outside_the_allowlist_is_a_403(live: Live, live_store) -> None:
    outside = await account(live_store, live, "ann@example.com", "1", allow_ips=("10.0.0.0/8",))
    error, _ = await refused(live, outside.key, 403)
    assert (error["type"], error["code"]) == ("permission_denied", "ip_not_allowed")
    assert "127.0.0.1 is not allowed" in error["message"]
    # X-Forwarded-For from a peer that is not a trusted proxy is ignored
    await refused(live, outside.key, 403, forwarded_for="10.1.2.3")
    inside = await account(live_store, live, "bob@example.com", "1", allow_ips=("127.0.0.1/32",))
    assert (await chat(live, inside.key))[0] == 200
    assert (await chat(live, inside.key, forwarded_for="10.1.2.3"))[0] == 200  # still judged by the peer


async def test_x_forwarded_for_is_honoured_from_a_trusted_proxy(start) -> None:
    live = start(server(trusted_proxies=("127.0.0.1/32",)))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1", allow_ips=("10.0.0.0/8",))
    assert (await chat(live, who.key, forwarded_for="10.1.2.3"))[0] == 200
    # the last hop that is not a trusted proxy is the client, whatever it claims before that
    assert (await chat(live, who.key, forwarded_for="192.0.2.7, 10.9.9.9"))[0] == 200
    error, _ = await refused(live, who.key, 403, forwarded_for="10.1.2.3, 192.0.2.7")
    assert "192.0.2.7" in error["message"]
    await refused(live, who.key, 403)  # the proxy's own address is not in the allowlist
    # a proxy that adds a header line of its own leaves the client's forged line first: both count
    lines = CIMultiDict([("Authorization", f"Bearer {who.key}"), ("X-Forwarded-For", "10.1.2.3"),
                         ("X-Forwarded-For", "192.0.2.7")])
    async with aiohttp.ClientSession() as session, session.post(f"{live.v1}/chat/completions", json=CHAT,
                                                                headers=lines) as response:
        assert response.status == 403 and "192.0.2.7" in (await response.json())["error"]["message"]


async def test_an_expired_key_is_a_401(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", expires="30d")
    past = int((datetime.now(UTC) - timedelta(seconds=5)).timestamp() * 1000)
    execute(live, "UPDATE api_keys SET expires_at = ? WHERE user_id = ?", (past, who.user_id))
    error, headers = await refused(live, who.key, 401)
    assert error["code"] == "invalid_api_key" and "expired" in error["message"]
    assert headers["x-should-retry"] == "false"


# -- CLI changes reach the running server within a second -----------------------------------


def cli(live: Live, *args: str) -> str:
    result = CliRunner().invoke(cli_app, [*args, "--config", str(live.config_path)])
    assert result.exit_code == 0, result.output
    return result.output


async def seconds_until(live: Live, key: str, status: int, limit: float = 3.0) -> float:
    started = time.monotonic()
    while True:
        got = (await request(live, "GET", "/v1/me", key=key))[0]
        if got == status:
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"still {got} after {limit}s"
        await asyncio.sleep(0.02)


async def test_cli_suspend_activate_and_revoke_reach_the_running_server_within_a_second(live: Live,
                                                                                        live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    assert (await chat(live, who.key))[0] == 200  # the key is now in the server's cache
    await asyncio.to_thread(cli, live, "users", "suspend", who.email)
    assert await seconds_until(live, who.key, 403) <= 1.2
    await asyncio.to_thread(cli, live, "users", "activate", who.email)
    assert await seconds_until(live, who.key, 200) <= 1.2
    key_id = str((await accounts.list_keys(live_store, who.email))[0].id)
    await asyncio.to_thread(cli, live, "keys", "revoke", key_id)
    assert await seconds_until(live, who.key, 401) <= 1.2
    await refused(live, who.key, 401)


# -- bad keys per address ------------------------------------------------------------------


async def test_bad_keys_from_one_address_lock_it_out_but_not_others(start) -> None:
    live = start(server(trusted_proxies=("127.0.0.1/32",), failed_auth_per_minute=3))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    attacker = "192.0.2.66"
    for guess in ("sk-ab-" + "x" * 43, "nonsense", None):
        error, _ = await refused(live, guess, 401, forwarded_for=attacker)
        assert error["code"] == "invalid_api_key"
    error, headers = await refused(live, who.key, 429, forwarded_for=attacker)  # even a valid key now
    rate_limited(error, headers)
    assert "invalid API keys" in error["message"]
    assert who.key not in error["message"]
    status, _, _ = await request(live, "GET", "/v1/models", key=who.key, headers={"X-Forwarded-For": attacker})
    assert status == 429
    assert (await chat(live, who.key, forwarded_for="192.0.2.67"))[0] == 200  # a neighbour is unaffected
    assert (await chat(live, who.key))[0] == 200  # so is the proxy itself


async def test_x_forwarded_for_from_an_untrusted_peer_cannot_dodge_the_bad_key_limit(start) -> None:
    live = start(server(failed_auth_per_minute=3))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    for n in range(3):  # each claims a different address; all come from 127.0.0.1
        await refused(live, "sk-wrong", 401, forwarded_for=f"192.0.2.{n}")
    error, _ = await refused(live, who.key, 429, forwarded_for="198.51.100.1")
    assert error["code"] == "rate_limit_exceeded"


# -- key budgets ---------------------------------------------------------------------------


def key_spent(live: Live, user_id: int) -> int:
    return query(live, "SELECT spent FROM api_keys WHERE user_id = ?", (user_id,))[0][0]


async def test_a_key_budget_stops_requests_with_402_once_spent(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "5", budget="0.001")
    statuses = []
    for _ in range(12):
        statuses.append((await chat(live, who.key))[0])
        if statuses[-1] == 402:
            break
    assert statuses[-1] == 402 and set(statuses[:-1]) == {200}
    error, _ = await refused(live, who.key, 402)
    assert error["code"] == "insufficient_quota" and "budget" in error["message"]
    assert "raise the key's budget" in error["message"] and "Top up" not in error["message"]
    assert sum(charges(live, who.user_id)) == key_spent(live, who.user_id) <= 1000
    assert balance(live, who.user_id) == (5_000_000 - key_spent(live, who.user_id), 0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_usage_past_its_hold_is_charged_no_more_than_the_budget_has_left(live: Live, live_store,
                                                                              stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "5", budget="0.01")
    live.fake.prompt_tokens = 1_000_000  # $2.50 of input at gpt-fake's price: an upstream billing far past the hold
    status, _, raw = await chat(live, who.key, {**CHAT, "stream": stream})
    assert status == 200, raw
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert row["cost"] > 10_000 and row["charged"] == 10_000  # the budget's whole rest, not the $2.50
    assert key_spent(live, who.user_id) == 10_000 == sum(charges(live, who.user_id))
    assert balance(live, who.user_id) == (5_000_000 - 10_000, 0)
    await refused(live, who.key, 402)  # and the key is spent


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_budget_lowered_while_requests_are_in_flight_caps_their_charges(live: Live, live_store,
                                                                               stream: bool) -> None:
    """Held under a budget of $1, settled after it became $0.0001: their charges fit the new one."""
    who = await account(live_store, live, "ann@example.com", "5", budget="1")
    live.fake.delay = 0.5
    asked = [asyncio.ensure_future(chat(live, who.key, {**CHAT, "stream": stream})) for _ in range(3)]
    await eventually(lambda: len(live.fake.requests) == 3)  # all three held and at the upstream
    [(key_id,)] = query(live, "SELECT id FROM api_keys WHERE user_id = ?", (who.user_id,))
    await accounts.update_key(live_store, str(key_id), accounts.KeyChanges(budget="0.0001"),
                              known_models=live.settings.model_index())
    assert [status for status, _, _ in await asyncio.gather(*asked)] == [200] * 3
    rows = await wait_for_usage(live, who.user_id, 3)
    assert key_spent(live, who.user_id) == sum(r["charged"] for r in rows) == sum(charges(live, who.user_id)) <= 100
    assert sum(r["cost"] for r in rows) > 100  # without the cap, they would have spent past it


async def test_a_key_budget_holds_under_20_concurrent_requests(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "5", budget="0.001")
    live.fake.delay = 0.1  # keep them in flight together
    results = await asyncio.gather(*(chat(live, who.key, {**CHAT, "stream": n % 2 == 0}) for n in range(20)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 402}, statuses
    assert 200 in statuses and 402 in statuses
    for status, _, raw in results:
        if status == 402:
            assert openai_error(raw)["code"] == "insufficient_quota"
    rows = await wait_for_usage(live, who.user_id, statuses.count(200))
    spent = key_spent(live, who.user_id)
    assert spent <= 1000
    assert sum(charges(live, who.user_id)) == spent == sum(r["cost"] for r in rows)
    assert query(live, "SELECT count(*) FROM holds")[0][0] == 0


# -- body size and in-flight caps -------------------------------------------------------------


async def test_a_body_over_max_body_mb_is_a_413_and_changes_nothing(start) -> None:
    live = start(server(max_body_mb=0.01))  # 10 kB
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]}
    error, _ = await refused(live, who.key, 413, big)
    assert error["code"] == "request_too_large" and "0.01 MB" in error["message"]
    status, _, raw = await request(live, "POST", "/v1/messages", key=who.key,
                                   json_body={**big, "max_tokens": 5})
    assert status == 413 and "error" in raw.decode()
    assert (await chat(live, who.key, {**CHAT, "messages": [{"role": "user", "content": "x" * 5_000}]}))[0] == 200


async def test_max_in_flight_1_refuses_the_second_concurrent_request_with_503(start) -> None:
    live = start(server(max_in_flight=1))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    live.fake.delay = 0.5
    first = asyncio.ensure_future(chat(live, who.key))
    await eventually(lambda: len(live.fake.requests) == 1)
    status, headers, raw = await chat(live, who.key)
    assert status == 503
    error = openai_error(raw)
    assert error["code"] == "overloaded"
    async with aiohttp.ClientSession() as session:  # probes still answer while the gateway is full
        for probe in ("/healthz", "/readyz"):
            async with session.get(f"{live.url}{probe}") as response:
                assert response.status == 200
    assert headers["Retry-After"] == "1" and headers["x-request-id"].startswith("req_")
    assert (await first)[0] == 200
    assert len(usage_rows(live, who.user_id)) == 1  # the 503 left no trace
    assert len(live.fake.requests) == 1
    assert (await chat(live, who.key))[0] == 200  # the slot is free again
