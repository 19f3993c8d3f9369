"""Errors: what the client sees, and that refused or failed requests cost nothing.

Refusals (bad input, bad keys, no money) must leave the books exactly as they were. Upstream
failures before any output charge nothing and leave an ``error`` usage row; the upstream's own
API key never reaches a client or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from apibox import accounts, tokens
from apibox.config import default_settings
from apibox.gateway.app import create_app
from apibox.gateway.exchange import EXCHANGE, Exchange
from apibox.gateway.metrics import observer
from apibox.gateway.middlewares import add_response_headers
from apibox.metrics import Metrics
from apibox.models import UserState
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_upstream import UPSTREAM_KEY, WORDS, FakeUpstream
from tests.gateway_helpers import (
    GPT_FAKE,
    account,
    auth,
    balance,
    books,
    charges,
    execute,
    expected_cost,
    sse_json,
    usage_rows,
    wait_for_usage,
)
from tests.live_variants import openai_error

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": "gpt-fake", "messages": MESSAGES}


async def post(live: Live, path: str, *, key: str | None, json_body: Any = None,
               data: bytes | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    headers = auth(key) if key else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}{path}", json=json_body, data=data, headers=headers) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


# -- lowering max_tokens and 402 ----------------------------------------------------------


async def test_a_balance_short_of_the_full_answer_lowers_max_tokens(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "0.001")  # 1000 micro-USD: ~97 output tokens
    price = Price(input=GPT_FAKE[0], output=GPT_FAKE[1], cached_input=GPT_FAKE[2])
    bound = tokens.prompt_bound({"messages": MESSAGES})
    assert worst_case_micro(price, bound, 1000) > 1000  # the model's 1000-token default is unaffordable

    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
    completion = raw.parse()
    lowered = live.fake.requests[-1].body["max_tokens"]
    assert raw.headers["x-apibox-max-tokens"] == str(lowered)
    assert 16 <= lowered < 1000
    assert worst_case_micro(price, bound, lowered) <= 1000 < worst_case_micro(price, bound, lowered + 1)
    assert completion.choices[0].message.content == "".join(WORDS)
    cost = expected_cost("gpt-fake", 21, len(WORDS))
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1000 - cost, 0)


# Each upstream's field for a chat answer's length: o-fake's refuses max_tokens, as OpenAI's reasoning models do.
LIMIT_FIELDS = {"gpt-fake": ("max_tokens", "max_completion_tokens"), "o-fake": ("max_completion_tokens", "max_tokens")}


@pytest.mark.parametrize("model", ["gpt-fake", "o-fake"])
@pytest.mark.parametrize("client_field", ["max_tokens", "max_completion_tokens"])
async def test_a_stream_with_a_lowered_max_tokens_says_so(live: Live, live_store, client_field: str,
                                                          model: str) -> None:
    """The lowered limit goes in the field the upstream takes, whichever one the client used."""
    who = await account(live_store, live, "ann@example.com", "0.0005")
    status, headers, raw = await post(live, "/chat/completions", key=who.key,
                                      json_body={**CHAT, "model": model, "stream": True, client_field: 500})
    assert status == 200
    sent = live.fake.requests[-1].body
    own, other = LIMIT_FIELDS[model]
    assert other not in sent
    assert 16 <= sent[own] < 500
    assert headers["x-apibox-max-tokens"] == str(sent[own])
    assert sse_json(raw)[-1]["choices"][0]["finish_reason"] == "stop"
    await wait_for_usage(live, who.user_id, 1)
    assert len(charges(live, who.user_id)) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_request_without_a_limit_asks_the_upstream_for_no_more_than_is_held(live: Live, live_store,
                                                                                   stream: bool) -> None:
    """The hold assumed the model's max_output_tokens (1000): each upstream is asked for that much
    at most, in the field it takes, so a whole answer cannot run past what was held for it."""
    who = await account(live_store, live, "ann@example.com", "1")
    for model in ("gpt-fake", "o-fake", "gemini-fake", "claude-fake"):
        status, _, _ = await post(live, "/chat/completions", key=who.key,
                                  json_body={**CHAT, "model": model, "stream": stream})
        assert status == 200
    gpt, reasoner = (request.body for request in live.fake.requests[-2:])
    assert (gpt["max_tokens"], "max_completion_tokens" in gpt) == (1000, False)
    assert (reasoner["max_completion_tokens"], "max_tokens" in reasoner) == (1000, False)
    assert live.gemini.requests[-1].body["generationConfig"]["maxOutputTokens"] == 1000
    assert live.anthropic.requests[-1].body["max_tokens"] == 1000


@pytest.mark.parametrize("model", ["gpt-fake", "o-fake"])
async def test_an_unlowered_limit_moves_to_the_upstreams_field_and_both_give_the_lower(live: Live, live_store,
                                                                                       model: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    own, other = LIMIT_FIELDS[model]
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        alone = await client.chat.completions.create(**{**CHAT, "model": model, other: 3})
        both = await client.chat.completions.create(**{**CHAT, "model": model, "max_tokens": 2,
                                                       "max_completion_tokens": 4})
    first, second = (request.body for request in live.fake.requests[-2:])
    assert (first[own], other in first) == (3, False)
    assert (second[own], other in second) == (2, False)  # the lower: the hold was for 4
    assert alone.choices[0].message.content == "".join(WORDS[:3])
    assert both.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_upstream_that_refuses_max_tokens_teaches_the_provider_the_other_field(
        live: Live, live_store, stream: bool) -> None:
    """o-behind-proxy's provider is configured for max_tokens, which its reasoning model refuses (400,
    param max_tokens): the request is sent once more with max_completion_tokens, and so are the next."""
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        for _ in range(2):
            answer = await client.chat.completions.create(**{**CHAT, "model": "o-behind-proxy", "max_tokens": 3},
                                                          stream=stream)
            if stream:
                text = "".join([chunk.choices[0].delta.content or "" async for chunk in answer if chunk.choices])
            else:
                text = answer.choices[0].message.content
            assert text == "".join(WORDS[:3])
    sent = [(request.body.get("max_tokens"), request.body.get("max_completion_tokens"))
            for request in live.fake.requests]
    assert sent == [(3, None), (None, 3), (None, 3)]
    await wait_for_usage(live, who.user_id, 2)
    assert len(charges(live, who.user_id)) == 2


async def test_a_max_tokens_refused_as_too_large_teaches_the_provider_nothing(live: Live, live_store) -> None:
    """OpenAI's 400 for a max_tokens past the model's most also blames max_tokens: it is the client's
    error, passed on, and the next request still goes with max_tokens (a server that knows only it
    would otherwise get no limit at all, or refuse every request)."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.most_output = 100
    status, _, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "max_tokens": 500})
    assert status == 400 and "max_tokens is too large" in openai_error(raw)["message"]
    assert openai_error(raw)["param"] == "max_tokens"
    status, _, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "max_tokens": 5})
    assert status == 200, raw
    sent = [(request.body.get("max_tokens"), request.body.get("max_completion_tokens"))
            for request in live.fake.requests]
    assert sent == [(500, None), (5, None)]


@pytest.mark.parametrize(("max_tokens", "max_completion_tokens"), [(2, 4), (4, 2)])
async def test_both_limits_hold_and_send_the_lower_to_every_kind_of_upstream(
        live: Live, live_store, max_tokens: int, max_completion_tokens: int) -> None:
    """Anthropic's and Gemini's translations read one field: they get the lower, which is what was held."""
    who = await account(live_store, live, "ann@example.com", "1")
    limits = {"max_tokens": max_tokens, "max_completion_tokens": max_completion_tokens}
    for model in ("claude-fake", "gemini-fake"):
        status, _, raw = await post(live, "/chat/completions", key=who.key,
                                     json_body={**CHAT, "model": model, **limits})
        assert status == 200, raw
    assert live.anthropic.requests[-1].body["max_tokens"] == 2
    assert live.gemini.requests[-1].body["generationConfig"]["maxOutputTokens"] == 2


@pytest.mark.parametrize("extra", [{"prompt": ["one", "two", "three"]}, {"prompt": "one", "best_of": 3},
                                   {"prompt": "one", "n": 3}], ids=["three prompts", "best_of 3", "n 3"])
async def test_a_completion_that_makes_three_answers_holds_for_three(live: Live, live_store, extra: dict) -> None:
    """Legacy completions make ``n`` answers for each prompt of a list, and ``best_of`` of them when
    more: each up to max_tokens. $0.001 pays for about 95 tokens of gpt-fake's answer: the upstream
    is asked for no more than a third of that in each of the three."""
    who = await account(live_store, live, "ann@example.com", "0.001")
    status, headers, raw = await post(live, "/completions", key=who.key,
                                      json_body={"model": "gpt-fake", "max_tokens": 500, **extra})
    assert status == 200, raw
    sent = live.fake.requests[-1].body
    assert 16 <= sent["max_tokens"] <= 1000 // 10 // 3
    assert headers["x-apibox-max-tokens"] == str(sent["max_tokens"])
    await wait_for_usage(live, who.user_id, 1)
    assert len(charges(live, who.user_id)) == 1


@pytest.mark.parametrize(("body", "param"), [({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
                                             ({"prompt": "x", "best_of": 21}, "best_of"),
                                             ({"prompt": "x", "best_of": "3"}, "best_of")])
async def test_a_best_of_that_cannot_be_is_refused(live: Live, live_store, body: dict, param: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await post(live, "/completions", key=who.key, json_body={"model": "gpt-fake", **body})
    assert status == 400 and openai_error(raw)["param"] == param
    assert live.fake.requests == []


async def test_a_balance_that_cannot_pay_a_minimal_answer_for_each_of_n_gets_402(live: Live, live_store) -> None:
    """$0.0005 pays for about 45 tokens of answer: not 16 for each of 100 choices. Lowered to what it
    pays for, each choice's limit would be 0, which upstreams take as no limit or refuse."""
    who = await account(live_store, live, "ann@example.com", "0.0005")
    status, _, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "n": 100})
    assert status == 402, raw
    assert live.fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_balance_that_cannot_pay_the_prompt_gets_402(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "0.00002")  # 20 micro-USD
    before = books(live)
    status, headers, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "stream": stream})
    assert status == 402
    error = openai_error(raw)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "balance" in error["message"].lower()
    assert headers["x-should-retry"] == "false"
    assert headers["x-request-id"].startswith("req_")
    assert live.fake.requests == []
    assert books(live) == before


async def test_the_sdk_does_not_retry_a_402(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "0")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=2) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(**CHAT)
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"


# -- upstream failures --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_500_before_output_costs_nothing(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = "status", 500
    status, headers, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "stream": stream})
    assert 500 <= status < 600
    error = openai_error(raw)
    assert error["type"] == "server_error"
    assert headers["x-request-id"].startswith("req_")
    assert balance(live, who.user_id) == (1_000_000, 0)
    assert charges(live, who.user_id) == []
    rows = usage_rows(live, who.user_id)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["charged"], rows[0]["request_id"]) == ("error", 0, headers["x-request-id"])


async def test_the_sdk_sees_an_upstream_500_as_a_server_error(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = "status", 500
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(**CHAT)
    assert caught.value.status_code >= 500
    assert balance(live, who.user_id) == (1_000_000, 0)


@dataclass
class FailingModels(FakeUpstream):
    """Fails (HTTP ``status``) only the requests for the upstream models in ``failing``."""

    failing: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") in self.failing:
            await self._record(request)
            return web.json_response({"error": {"message": "primary is down", "type": "server_error",
                                                "param": None, "code": None}}, status=self.status)
        return await super().handle(request)


class TestFallback:
    @pytest.fixture
    def fake(self) -> FailingModels:
        return FailingModels(failing={"fake-primary"})

    @pytest.mark.parametrize("failing_status", [500, 200], ids=["500", "error-in-200"])
    @pytest.mark.parametrize("stream", [False, True])
    async def test_a_failing_first_route_falls_back_and_charges_once(self, live: Live, live_store,
                                                                     stream: bool, failing_status: int) -> None:
        """An error body with status 200 (some proxies answer so) is a failure too, not an answer."""
        live.fake.status = failing_status
        who = await account(live_store, live, "ann@example.com", "1")
        async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
            if stream:
                async with await client.chat.completions.create(
                        model="gpt-fallback", messages=MESSAGES, stream=True,
                        stream_options={"include_usage": True}) as chunks:
                    got = [c async for c in chunks]
                text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
                models = {c.model for c in got}
            else:
                completion = await client.chat.completions.create(model="gpt-fallback", messages=MESSAGES)
                text, models = completion.choices[0].message.content, {completion.model}
        assert text == "".join(WORDS)
        assert models == {"gpt-fallback"}
        assert [r.body["model"] for r in live.fake.requests] == ["fake-primary", "fake-secondary"]
        rows = await wait_for_usage(live, who.user_id, 1)
        assert len(rows) == 1
        cost = expected_cost("gpt-fallback", 21, len(WORDS))
        assert (rows[0]["provider"], rows[0]["status"], rows[0]["charged"]) == ("fake-backup", "ok", cost)
        assert charges(live, who.user_id) == [cost]
        assert balance(live, who.user_id) == (1_000_000 - cost, 0)

    async def test_when_every_route_fails_nothing_is_charged(self, live: Live, live_store) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        live.fake.failing = {"fake-primary", "fake-secondary"}
        status, _, raw = await post(live, "/chat/completions", key=who.key,
                                    json_body={"model": "gpt-fallback", "messages": MESSAGES})
        assert status >= 500
        assert openai_error(raw)["type"] == "server_error"
        assert len(live.fake.requests) == 2
        assert balance(live, who.user_id) == (1_000_000, 0)
        assert [r["status"] for r in usage_rows(live, who.user_id)] == ["error"]

    async def test_an_upstream_400_is_not_tried_on_the_next_route(self, live: Live, live_store) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        live.fake.status = 400
        status, headers, raw = await post(live, "/chat/completions", key=who.key,
                                          json_body={"model": "gpt-fallback", "messages": MESSAGES})
        assert status == 400
        assert headers["x-should-retry"] == "false"
        assert openai_error(raw)["type"] == "invalid_request_error"
        assert [r.body["model"] for r in live.fake.requests] == ["fake-primary"]
        assert balance(live, who.user_id) == (1_000_000, 0)


@pytest.mark.parametrize(("given", "passed_on"), [
    ("7", "7"), ("0.4", "1"), ("99999", "60"),  # at most 60 s: the SDKs give up at once beyond it
    ("in 30 s", "30"),
])
async def test_an_upstream_429_is_passed_on_with_retry_after(live: Live, live_store, given: str,
                                                             passed_on: str) -> None:
    """In seconds, or as an HTTP date (RFC 9110), as upstreams send it."""
    who = await account(live_store, live, "ann@example.com", "1")
    if given == "in 30 s":
        given = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    live.fake.mode, live.fake.status, live.fake.retry_after = "status", 429, given
    status, headers, raw = await post(live, "/chat/completions", key=who.key, json_body=CHAT)
    assert status == 429
    assert abs(int(headers["Retry-After"]) - int(passed_on)) <= 2  # (a date's seconds run on meanwhile)
    assert headers.get("x-should-retry") != "false"
    assert openai_error(raw)["type"] == "rate_limit_exceeded"
    assert balance(live, who.user_id) == (1_000_000, 0)
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)


async def test_a_503_after_every_route_failed_says_when_to_try_again(live: Live, live_store) -> None:
    """The upstream said nothing of when: the client is still given a wait for its backoff."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = "status", 503
    status, headers, _ = await post(live, "/chat/completions", key=who.key, json_body=CHAT)
    assert (status, headers["Retry-After"]) == (503, "1")


async def test_an_upstream_400_is_a_400_and_the_sdk_does_not_retry_it(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = "status", 400
    live.fake.error_message = "Invalid value for 'temperature'"
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**CHAT, temperature=5)
    assert "temperature" in caught.value.message
    assert len(live.fake.requests) == 1  # neither apibox nor the SDK retried
    assert balance(live, who.user_id) == (1_000_000, 0)
    assert [r["status"] for r in usage_rows(live, who.user_id)] == ["error"]


async def test_an_upstream_message_is_one_line_in_the_log_and_the_answer(live: Live, live_store, caplog) -> None:
    caplog.set_level(logging.WARNING)
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = "status", 400
    live.fake.error_message = "bad value\n2026-11-28 00:00:00 ERROR apibox.gateway: forged line"  # quoting a client
    status, _, raw = await post(live, "/chat/completions", key=who.key, json_body=CHAT)
    assert status == 400 and "bad value 2026-11-28" in json.loads(raw)["error"]["message"]
    assert not [r for r in caplog.records if "\n" in r.getMessage()]  # no record spans a line of its own
    assert any("forged line" in r.getMessage() for r in caplog.records)


async def test_a_priority_service_tier_is_refused_before_the_hold(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    for path, body in (("/chat/completions", CHAT), ("/responses", {"model": "gpt-fake", "input": "Hi"})):
        status, _, raw = await post(live, path, key=who.key, json_body={**body, "service_tier": "priority"})
        assert (status, json.loads(raw)["error"]["param"]) == (400, "service_tier")
    assert live.fake.requests == [] and usage_rows(live, who.user_id) == []
    status, _, _ = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "service_tier": "flex"})
    assert status == 200  # a cheaper tier is the caller's to ask for


@pytest.mark.parametrize(("mode", "upstream_status"), [("echo_key", 401), ("echo_key", 400), ("echo_key", 200),
                                                      ("echo_key_with_id", 200), ("echo_key_split", 400)])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_key_never_reaches_the_client_or_the_log(live: Live, live_store, caplog, mode: str,
                                                                    upstream_status: int, stream: bool) -> None:
    """Nor when the upstream's error comes with status 200, or breaks its key across lines."""
    caplog.set_level(logging.DEBUG)
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.status = mode, upstream_status
    status, headers, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "stream": stream})
    assert status >= 400
    openai_error(raw)
    assert live.fake.requests, "the upstream was called"
    assert UPSTREAM_KEY not in raw.decode()
    assert UPSTREAM_KEY not in json.dumps(list(headers.items()))
    assert UPSTREAM_KEY[:20] not in raw.decode() and UPSTREAM_KEY[-12:] not in raw.decode()
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(**CHAT)
    assert UPSTREAM_KEY not in str(caught.value)
    assert caplog.records, "the failure should be logged"
    assert UPSTREAM_KEY not in caplog.text
    assert who.key not in caplog.text
    assert balance(live, who.user_id) == (1_000_000, 0)


# -- bad input: clear errors, no change to the books --------------------------------------

BAD_BODIES = {
    "malformed json": (b'{"model": "gpt-fake", "messages": [', 400, None),
    "empty body": (b"", 400, None),
    "body not an object": (b'["gpt-fake"]', 400, None),
    "missing model": (json.dumps({"messages": MESSAGES}).encode(), 400, "model"),
    "model not a string": (json.dumps({"model": 7, "messages": MESSAGES}).encode(), 400, "model"),
    "unknown model": (json.dumps({"model": "gpt-nope", "messages": MESSAGES}).encode(), 404, "model"),
    "missing messages": (json.dumps({"model": "gpt-fake"}).encode(), 400, "messages"),
    "empty messages": (json.dumps({"model": "gpt-fake", "messages": []}).encode(), 400, "messages"),
    "message without role": (json.dumps({"model": "gpt-fake", "messages": [{"content": "x"}]}).encode(), 400,
                             "messages[0]"),
    "negative max_tokens": (json.dumps({**CHAT, "max_tokens": -1}).encode(), 400, "max_tokens"),
    "zero max_tokens": (json.dumps({**CHAT, "max_tokens": 0}).encode(), 400, "max_tokens"),
    "string max_tokens": (json.dumps({**CHAT, "max_tokens": "abc"}).encode(), 400, "max_tokens"),
    "bool max_completion_tokens": (json.dumps({**CHAT, "max_completion_tokens": True}).encode(), 400,
                                   "max_completion_tokens"),
    # the hold took the valid field: the other, were it sent on, could ask the upstream for far more
    "string max_tokens beside a valid max_completion_tokens": (
        json.dumps({**CHAT, "max_completion_tokens": 16, "max_tokens": "100000"}).encode(), 400, "max_tokens"),
    "string stream": (json.dumps({**CHAT, "stream": "yes"}).encode(), 400, "stream"),
    "bad stream_options": (json.dumps({**CHAT, "stream": True, "stream_options": "all"}).encode(), 400,
                           "stream_options"),
    "n out of range": (json.dumps({**CHAT, "n": 0}).encode(), 400, "n"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_input_is_refused_clearly_and_changes_nothing(live: Live, live_store, case: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = books(live)
    data, expected_status, param = BAD_BODIES[case]
    status, headers, raw = await post(live, "/chat/completions", key=who.key, data=data)
    assert status == expected_status, raw
    error = openai_error(raw)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if expected_status == 404:
        assert error["code"] == "model_not_found"
        assert "gpt-nope" in error["message"]
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-should-retry"] == "false"
    assert live.fake.requests == []
    assert books(live) == before


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/completions", {"model": "gpt-fake"}, "prompt"),
    ("/completions", {"model": "gpt-fake", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/embeddings", {"model": "embed-fake"}, "input"),
    ("/embeddings", {"model": "embed-fake", "input": "x", "stream": True}, "stream"),
])
async def test_bad_input_on_the_other_endpoints(live: Live, live_store, path: str, body: dict, param: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = books(live)
    status, headers, raw = await post(live, path, key=who.key, json_body=body)
    assert status == 400
    assert openai_error(raw)["param"] == param
    assert headers["x-request-id"].startswith("req_")
    assert books(live) == before


@pytest.mark.parametrize("model", ["claude-fake", "gemini-fake"])
async def test_a_field_the_translation_cannot_take_is_the_clients_400_not_the_upstreams_502(
        live: Live, live_store, model: str) -> None:
    """``"stop": 5`` cannot become Anthropic's or Gemini's stop sequences: the request is refused
    before anything is sent, as the client's fault and not a failure of the route, which answers next."""
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await post(live, "/chat/completions", key=who.key,
                                      json_body={**CHAT, "model": model, "stop": 5})
    assert status == 400, raw
    error = openai_error(raw)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    assert "cannot be translated" in error["message"]
    assert headers["x-should-retry"] == "false"
    assert live.anthropic.requests == [] and live.gemini.requests == []
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["http_status"], row["charged"]) == ("error", 400, 0)
    assert balance(live, who.user_id) == (1_000_000, 0)
    status, _, raw = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "model": model})
    assert status == 200, raw


async def test_a_request_one_routes_translation_cannot_take_goes_to_the_next_route(live: Live, live_store) -> None:
    """claude-then-gpt's first route cannot carry ``"stop": 5``; its second, OpenAI-compatible, takes
    it as it is. The first route is not rested for it: the next request goes there."""
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await post(live, "/chat/completions", key=who.key,
                                json_body={**CHAT, "model": "claude-then-gpt", "stop": 5})
    assert status == 200, raw
    assert live.anthropic.requests == [] and live.fake.requests[-1].body["stop"] == 5
    status, _, raw = await post(live, "/chat/completions", key=who.key,
                                json_body={**CHAT, "model": "claude-then-gpt"})
    assert status == 200, raw
    assert len(live.anthropic.requests) == 1 and len(live.fake.requests) == 1
    await wait_for_usage(live, who.user_id, 2)
    assert len(charges(live, who.user_id)) == 2


# -- keys and accounts --------------------------------------------------------------------


async def _refused(live: Live, key: str | None, expected_status: int, body: dict | None = None) -> dict[str, Any]:
    before = books(live)
    status, headers, raw = await post(live, "/chat/completions", key=key, json_body=body or CHAT)
    assert status == expected_status, raw
    error = openai_error(raw)
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-should-retry"] == "false"
    assert books(live) == before
    assert live.fake.requests == []
    return error


async def test_no_key_is_a_401(live: Live) -> None:
    error = await _refused(live, None, 401)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "API key" in error["message"]


async def test_an_unknown_key_is_a_401(live: Live, live_store) -> None:
    await account(live_store, live, "ann@example.com", "1")
    error = await _refused(live, "sk-ab-" + "x" * 43, 401)
    assert error["code"] == "invalid_api_key"
    error = await _refused(live, "not-even-a-key", 401)
    assert error["code"] == "invalid_api_key"


async def test_a_revoked_key_is_a_401(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    key = (await accounts.list_keys(live_store, who.email))[0]
    await accounts.revoke_key(live_store, str(key.id))
    error = await _refused(live, who.key, 401)
    assert error["code"] == "invalid_api_key"
    assert "revoked" in error["message"]


async def test_a_key_revoked_after_use_is_refused_within_a_second(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, _ = await post(live, "/chat/completions", key=who.key, json_body=CHAT)
    assert status == 200
    key = (await accounts.list_keys(live_store, who.email))[0]
    await accounts.revoke_key(live_store, str(key.id))
    await asyncio.sleep(1.1)
    live.fake.requests.clear()
    error = await _refused(live, who.key, 401)
    assert "revoked" in error["message"]


async def test_an_expired_key_is_a_401(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", expires="30d")
    past = int((datetime.now(UTC) - timedelta(minutes=1)).timestamp() * 1000)
    execute(live, "UPDATE api_keys SET expires_at = ? WHERE user_id = ?", (past, who.user_id))
    error = await _refused(live, who.key, 401)
    assert error["code"] == "invalid_api_key"
    assert "expired" in error["message"]


async def test_a_key_scoped_to_other_models_is_a_403(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1", models=("demo",))
    error = await _refused(live, who.key, 403)
    assert error["type"] == "permission_denied"
    assert error["param"] == "model"
    assert "gpt-fake" in error["message"]
    status, _, _ = await post(live, "/chat/completions", key=who.key, json_body={**CHAT, "model": "demo"})
    assert status == 200


@pytest.mark.parametrize("state", [UserState.SUSPENDED, UserState.BANNED])
async def test_a_suspended_or_banned_user_is_a_403(live: Live, live_store, state: UserState) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    await accounts.set_user_state(live_store, who.email, state, reason="unpaid invoice")
    error = await _refused(live, who.key, 403)
    assert error["type"] == "permission_denied"
    assert error["code"] == f"account_{state.value}"
    assert "unpaid invoice" in error["message"]
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=2) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(**CHAT)


async def test_an_unknown_path_is_an_openai_shaped_404_with_a_request_id(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{live.v1}/no/such/thing") as response:
            assert response.status == 404
            assert response.headers["x-request-id"].startswith("req_")
            error = openai_error(await response.read())
            assert error["type"] == "invalid_request_error"
        async with session.get(f"{live.v1}/chat/completions") as response:
            assert response.status == 405
            assert response.headers["x-request-id"].startswith("req_")
            openai_error(await response.read())


async def test_models_and_me_need_a_key(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/models", "/models/gpt-fake", "/me"):
            async with session.get(f"{live.v1}{path}") as response:
                assert response.status == 401, path
                assert response.headers["x-request-id"].startswith("req_")
                assert openai_error(await response.read())["code"] == "invalid_api_key"


async def test_a_client_gone_before_its_request_is_read_is_counted_499_not_logged_as_an_error(caplog) -> None:
    """wrk ending a run with requests still queued: reading their bodies raises ConnectionResetError."""
    metrics = Metrics()
    observe = observer(metrics, access_log_json=False)

    async def gone(request: web.Request) -> web.StreamResponse:
        raise ConnectionResetError("Connection lost")
    request = make_mocked_request("POST", "/v1/chat/completions", app=create_app(default_settings()))
    with caplog.at_level(logging.ERROR, logger="apibox.gateway"):
        response = await observe(request, gone)
    assert response.status == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert metrics.requests.values[("", "", "499")] == 1


async def test_every_answer_carries_a_request_id_and_a_limited_keys_headers() -> None:
    """add_response_headers: the id and x-ratelimit-* headers come from the request's Exchange; an answer
    prepared for a request the observer never saw still gets a fresh id."""
    exchange = Exchange(Metrics(), "req_known", rate_limit_headers={"x-ratelimit-limit-requests": "60"})
    seen = make_mocked_request("POST", "/v1/chat/completions")
    seen[EXCHANGE] = exchange
    response = web.Response()
    await add_response_headers(seen, response)
    assert response.headers["x-request-id"] == "req_known"
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    unseen, bare = make_mocked_request("GET", "/"), web.Response()
    await add_response_headers(unseen, bare)
    assert bare.headers["x-request-id"].startswith("req_") and len(bare.headers["x-request-id"]) == 36
    assert "x-ratelimit-limit-requests" not in bare.headers


async def test_a_client_that_leaves_a_whole_answer_is_charged_for_it_and_its_row_says_so(live: Live,
                                                                                        live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.delay = 0.8
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(TimeoutError):
            await session.post(f"{live.v1}/chat/completions", json=CHAT, headers=auth(who.key))
    [row] = await wait_for_usage(live, who.user_id, 1, timeout=5)
    assert (row["status"], row["http_status"]) == ("client_gone", 499)
    assert row["charged"] == expected_cost("gpt-fake", 21, len(WORDS))  # the answer the upstream made, whole
    assert charges(live, who.user_id) == [row["charged"]]
