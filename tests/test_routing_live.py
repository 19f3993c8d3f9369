"""Routing through the live gateway: fallback, cooldown, failures mid-stream, and secrets.

The OpenAI SDK (``max_retries=0``, so every retry seen is apibox's own) calls a real gateway
in front of fake upstreams. The OpenAI fake here fails per upstream model, so one route of a
model can fail while another serves; every upstream attempt is recorded, so a test can say
which routes were tried. Money is checked exactly: one hold and one settlement per request,
one ledger charge, the amount computed here from the usage of the route that served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from apibox import billing, tokens
from apibox.config import RoutingSettings, Settings, Timeouts
from apibox.store.base import Store
from tests.conftest import Live, ServerThread, serving
from tests.fake_anthropic import ANTHROPIC_KEY
from tests.fake_anthropic import WORDS as CLAUDE_WORDS
from tests.fake_gemini import GEMINI_KEY
from tests.fake_upstream import UPSTREAM_KEY, WORDS, FakeUpstream
from tests.gateway_helpers import (
    Account,
    account,
    auth,
    balance,
    charges,
    delta_texts,
    expected_cost,
    sse_events,
    stream_until_error,
    usage_rows,
    wait_for_usage,
)

MESSAGES = [{"role": "user", "content": "hello"}]
START = 1_000_000  # every account here is topped up with $1
FULL = expected_cost("gpt-fallback", 21, len(WORDS))  # the OpenAI fake's usage: 21 prompt tokens, one per word
# claude-with-fallback: $3 in / $15 out per 1M tokens; the Anthropic fake reports 30 input tokens.
CLAUDE_FULL = -(-(30 * 3_000_000 + len(CLAUDE_WORDS) * 15_000_000) // 1_000_000)
ASCII_WORDS = [" word"] * 20  # one token each by any count


# -- a fake that fails per upstream model -----------------------------------------------------


@dataclass
class Fail:
    """Answer the route's requests with this HTTP error status."""

    status: int
    retry_after: str | None = None


@dataclass
class Slow:
    """Send no response head for ``seconds`` (then an error no one is waiting for)."""

    seconds: float


@dataclass
class Broken:
    """Start a stream, then break it: with an in-band error carrying ``message``, or (None) a cut connection."""

    message: str | None = None


@dataclass
class ErrorFirst:
    """Answer 200, then an error as the stream's very first event (nothing useful sent yet)."""

    message: str = "overloaded"


@dataclass
class Scripted(FakeUpstream):
    """The OpenAI fake, but requests for an upstream model in ``script`` get that behaviour."""

    script: dict[str, Fail | Slow | Broken | ErrorFirst] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        behaviour = self.script.get(body.get("model"))
        if behaviour is None:
            return await super().handle(request)
        await self._record(request)
        if isinstance(behaviour, ErrorFirst):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            error = {"error": {"message": behaviour.message, "type": "server_error"}}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            await response.write_eof()
            return response
        if isinstance(behaviour, Broken):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if behaviour.message is None:
                await asyncio.sleep(0.01)
                request.transport.close()
                return response
            error = {"error": {"message": behaviour.message, "type": "server_error"}}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            await response.write_eof()
            return response
        status, headers = 500, {}
        if isinstance(behaviour, Slow):
            await asyncio.sleep(behaviour.seconds)
        else:
            status = behaviour.status
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
        return web.json_response({"error": {"message": f"{body['model']} is down", "type": "server_error",
                                            "param": None, "code": None}}, status=status, headers=headers)

    def attempts(self) -> list[str]:
        """The upstream models asked, in order."""
        return [r.body["model"] for r in self.requests]


# -- a gateway whose config the test may change -----------------------------------------------


class Tweaked(ServerThread):
    def __init__(self, tmp_path: Path, database_url: str, fake: FakeUpstream, routing: RoutingSettings | None,
                 primary_url: str | None, primary_first_byte: float | None) -> None:
        super().__init__(tmp_path, database_url, fake)
        self.routing, self.primary_url, self.primary_first_byte = routing, primary_url, primary_first_byte

    def configure(self, settings: Settings) -> Settings:
        providers = []
        for provider in settings.providers:
            if provider.name == "fake":  # the provider of gpt-fallback's (and claude-with-fallback's) first route
                if self.primary_url:
                    provider = replace(provider, base_url=self.primary_url)
                if self.primary_first_byte:
                    provider = replace(provider, timeouts=Timeouts(first_byte=self.primary_first_byte))
            providers.append(provider)
        return replace(settings, providers=tuple(providers), routing=self.routing or settings.routing)


@pytest.fixture
def fake() -> Scripted:
    return Scripted()


@pytest.fixture
def failure() -> str:
    """How the first route fails: none | 500 | 429 | refused | timeout (tests parametrize it)."""
    return "none"


@pytest.fixture
def routing() -> RoutingSettings | None:
    return None


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


FIRST_BYTE = 0.15  # the primary's first-byte timeout in the "timeout" case; the fake waits 0.6 s


@pytest.fixture
def live(tmp_path: Path, database_url: str, fake: Scripted, failure: str, routing: RoutingSettings | None,
         request: pytest.FixtureRequest) -> Iterator[Live]:
    primary_url = request.getfixturevalue("dead_url") if failure == "refused" else None
    server = Tweaked(tmp_path, database_url, fake, routing, primary_url, FIRST_BYTE if failure == "timeout" else None)
    with serving(server) as running:
        yield running


def break_primary(fake: Scripted, failure: str) -> None:
    """Make gpt-fallback's first route fail as ``failure`` says (config-level failures are set up by ``live``)."""
    if failure == "500":
        fake.script["fake-primary"] = Fail(500)
    elif failure == "429":
        fake.script["fake-primary"] = Fail(429, retry_after="7")
    elif failure == "timeout":
        fake.script["fake-primary"] = Slow(0.6)


@dataclass
class BillingCalls:
    reserve: int = 0
    settle: int = 0


@pytest.fixture
def billing_calls(monkeypatch: pytest.MonkeyPatch) -> BillingCalls:
    """Counts the gateway's holds and settlements (proxy calls them through the billing module)."""
    calls = BillingCalls()
    reserve, settle = billing.reserve, billing.settle

    async def counting_reserve(*args: Any, **kwargs: Any) -> Any:
        calls.reserve += 1
        return await reserve(*args, **kwargs)

    async def counting_settle(*args: Any, **kwargs: Any) -> Any:
        calls.settle += 1
        return await settle(*args, **kwargs)

    monkeypatch.setattr(billing, "reserve", counting_reserve)
    monkeypatch.setattr(billing, "settle", counting_settle)
    return calls


async def ask(live: Live, key: str, model: str = "gpt-fallback", stream: bool = False) -> tuple[str, dict[str, Any]]:
    """One chat completion through the SDK: (the answer's text, its usage object)."""
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0) as client:
        if stream:
            async with await client.chat.completions.create(
                    model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}) as chunks:
                got = [c async for c in chunks]
            assert {c.model for c in got} == {model}
            assert got[-1].usage is not None
            return "".join(c.choices[0].delta.content or "" for c in got if c.choices), got[-1].usage.model_dump()
        completion = await client.chat.completions.create(model=model, messages=MESSAGES)
        assert completion.model == model
        assert completion.usage is not None
        return completion.choices[0].message.content or "", completion.usage.model_dump()


def primary_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The gateway's log lines for failed attempts on gpt-fallback's first route (provider ``fake``)."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("route fake for gpt-fallback failed")]


def assert_charged_once(live: Live, who: Account, rows: list[dict[str, Any]], cost: int) -> None:
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["charged"], rows[0]["cost"], rows[0]["estimated"]) == ("ok", cost, cost, 0)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (START - cost, 0)


# -- fallback within one request ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("failure", ["500", "429", "refused", "timeout"])
async def test_a_failing_primary_falls_back_and_the_backup_usage_is_charged_once(
        live: Live, live_store: Store, fake: Scripted, failure: str, stream: bool,
        billing_calls: BillingCalls, caplog: pytest.LogCaptureFixture) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    break_primary(fake, failure)
    text, usage = await ask(live, who.key, stream=stream)
    assert text == "".join(WORDS)
    assert len(primary_failures(caplog)) == 1  # the primary was tried, and failed, once
    # A refused connection never reaches the fake; every other failure was one attempt there.
    assert fake.attempts() == (["fake-secondary"] if failure == "refused" else ["fake-primary", "fake-secondary"])

    rows = await wait_for_usage(live, who.user_id, 1)
    assert rows[0]["provider"] == "fake-backup"
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (21, len(WORDS))
    assert_charged_once(live, who, rows, FULL)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (21, len(WORDS))
    assert Decimal(str(usage["cost"])) == Decimal(FULL) / 1_000_000
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)


@pytest.mark.parametrize("failure", ["timeout"])
async def test_a_first_byte_timeout_gives_up_on_the_primary_in_time(live: Live, live_store: Store,
                                                                    fake: Scripted, failure: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    break_primary(fake, failure)
    began = time.monotonic()
    await ask(live, who.key)
    assert time.monotonic() - began < 0.5  # the primary answers only after 0.6 s: the backup served before


async def assert_the_backup_claude_served(live: Live, fake: Scripted, who: Account, text: str) -> None:
    """claude-with-fallback's OpenAI primary failed once and its Anthropic backup answered, billed once."""
    assert text == "".join(CLAUDE_WORDS)
    assert fake.attempts() == ["fake-primary"]
    assert [r.body["model"] for r in live.anthropic.requests] == ["claude-upstream-2"]
    rows = await wait_for_usage(live, who.user_id, 1)
    assert rows[0]["provider"] == "claude"
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (30, len(CLAUDE_WORDS))
    assert_charged_once(live, who, rows, CLAUDE_FULL)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_claude_with_fallback_falls_from_openai_to_anthropic_and_charges_its_usage(
        live: Live, live_store: Store, fake: Scripted, stream: bool, billing_calls: BillingCalls) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = Fail(502)
    text, usage = await ask(live, who.key, model="claude-with-fallback", stream=stream)
    await assert_the_backup_claude_served(live, fake, who, text)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (30, len(CLAUDE_WORDS))
    assert Decimal(str(usage["cost"])) == Decimal(CLAUDE_FULL) / 1_000_000
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_claude_with_fallback_through_v1_messages_passes_the_anthropic_answer_through(
        live: Live, live_store: Store, fake: Scripted, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = Fail(500)
    status, _, raw = await post_door(live, who.key, "messages", "claude-with-fallback", stream)
    assert status == 200, raw
    if stream:
        events = [json.loads(e) for e in sse_events(raw)]
        assert events[0]["type"] == "message_start"
        assert events[-1]["type"] == "message_stop"
        text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    else:
        reply = json.loads(raw)
        assert (reply["model"], reply["usage"]["input_tokens"]) == ("claude-with-fallback", 30)
        text = "".join(block["text"] for block in reply["content"])
    await assert_the_backup_claude_served(live, fake, who, text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_upstream_400_is_not_retried_on_the_backup(live: Live, live_store: Store, fake: Scripted,
                                                            stream: bool, billing_calls: BillingCalls) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = Fail(400)
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(live, who.key, stream=stream)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert fake.attempts() == ["fake-primary"]  # the backup saw nothing
    assert balance(live, who.user_id) == (START, 0)
    assert charges(live, who.user_id) == []
    assert [(r["status"], r["charged"]) for r in usage_rows(live, who.user_id)] == [("error", 0)]
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)


async def test_upstream_400s_do_not_cool_the_route(live: Live, live_store: Store, fake: Scripted) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = Fail(400)
    for _ in range(4):  # more than failures_before_cooldown: the request was at fault, not the route
        with pytest.raises(openai.BadRequestError):
            await ask(live, who.key)
    fake.script.clear()
    fake.requests.clear()
    await ask(live, who.key)
    assert fake.attempts() == ["fake-primary"]
    assert usage_rows(live, who.user_id)[-1]["provider"] == "fake"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("primary", "backup", "status", "retry_after"), [
    (Fail(500), Fail(429, retry_after="7"), 429, "7"),
    (Fail(429, retry_after="7"), Fail(500), 502, None),
], ids=["500-then-429", "429-then-500"])
async def test_when_every_route_fails_the_client_gets_the_last_error_and_no_charge(
        live: Live, live_store: Store, fake: Scripted, primary: Fail, backup: Fail, status: int,
        retry_after: str | None, stream: bool, billing_calls: BillingCalls) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script.update({"fake-primary": primary, "fake-secondary": backup})
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(live, who.key, stream=stream)
    assert caught.value.status_code == status
    assert "fake-backup" in caught.value.message  # the backup's failure, the last one
    assert caught.value.response.headers.get("retry-after") == retry_after
    assert caught.value.response.headers.get("x-should-retry") != "false"  # worth retrying later
    assert fake.attempts() == ["fake-primary", "fake-secondary"]
    assert balance(live, who.user_id) == (START, 0)
    assert charges(live, who.user_id) == []
    assert [(r["status"], r["charged"]) for r in usage_rows(live, who.user_id)] == [("error", 0)]
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)


async def test_an_upstream_429_cools_the_primary_at_once(live: Live, live_store: Store, fake: Scripted) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = Fail(429, retry_after="7")
    await ask(live, who.key)
    fake.requests.clear()
    await ask(live, who.key)
    assert fake.attempts() == ["fake-secondary"]  # one 429 with retry-after was enough


@pytest.mark.parametrize("failure", ["500", "refused"])
async def test_one_failure_does_not_cool_the_primary(live: Live, live_store: Store, fake: Scripted,
                                                     failure: str, caplog: pytest.LogCaptureFixture) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    break_primary(fake, failure)
    await ask(live, who.key)
    fake.script.clear()  # a dead port stays dead: there the primary must be tried (and refused) again
    fake.requests.clear()
    await ask(live, who.key)
    if failure == "refused":
        assert len(primary_failures(caplog)) == 2
        assert [r["provider"] for r in usage_rows(live, who.user_id)] == ["fake-backup", "fake-backup"]
    else:
        assert fake.attempts() == ["fake-primary"]
        assert [r["provider"] for r in usage_rows(live, who.user_id)] == ["fake-backup", "fake"]


# -- cooldown across requests ------------------------------------------------------------------

COOLDOWN = 0.6


class TestCooldown:
    @pytest.fixture
    def routing(self) -> RoutingSettings:
        return RoutingSettings(failures_before_cooldown=3, cooldown_seconds=COOLDOWN)

    async def _fail_three_times(self, live: Live, who: Account, fake: Scripted) -> float:
        fake.script["fake-primary"] = Fail(500)
        for _ in range(3):
            fake.requests.clear()
            await ask(live, who.key)
            assert fake.attempts() == ["fake-primary", "fake-secondary"]
        return time.monotonic()

    async def test_a_cooled_primary_is_skipped_until_its_cooldown_passes(self, live: Live, live_store: Store,
                                                                       fake: Scripted) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        cooled_at = await self._fail_three_times(live, who, fake)
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-secondary"]  # straight to the backup
        fake.script.clear()  # the primary is healthy again, but still cooling
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-secondary"]
        assert time.monotonic() - cooled_at < COOLDOWN, "the machine was too slow for this test's timing"

        await asyncio.sleep(COOLDOWN - (time.monotonic() - cooled_at) + 0.1)
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-primary"]  # half-open: tried, and it served
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-primary"]

        rows = await wait_for_usage(live, who.user_id, 7)
        assert [r["provider"] for r in rows] == ["fake-backup"] * 5 + ["fake"] * 2
        assert all(r["charged"] == FULL for r in rows)
        assert charges(live, who.user_id) == [FULL] * 7
        assert balance(live, who.user_id) == (START - 7 * FULL, 0)

    async def test_a_half_open_primary_that_fails_once_is_cooled_again(self, live: Live, live_store: Store,
                                                                        fake: Scripted) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        cooled_at = await self._fail_three_times(live, who, fake)
        await asyncio.sleep(COOLDOWN - (time.monotonic() - cooled_at) + 0.1)
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-primary", "fake-secondary"]  # half-open: tried once more
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-secondary"]  # that one failure cooled it again
        assert charges(live, who.user_id) == [FULL] * 5

    async def test_a_stream_that_ends_well_clears_the_primary_failures(self, live: Live, live_store: Store,
                                                                        fake: Scripted) -> None:
        who = await account(live_store, live, "ann@example.com", "1")

        async def two_failures() -> None:
            fake.script["fake-primary"] = Fail(500)
            for _ in range(2):
                fake.requests.clear()
                await ask(live, who.key)
                assert fake.attempts() == ["fake-primary", "fake-secondary"]

        await two_failures()
        fake.script.clear()
        fake.requests.clear()
        assert (await ask(live, who.key, stream=True))[0] == "".join(WORDS)
        assert fake.attempts() == ["fake-primary"]
        await two_failures()  # two since the good stream: not yet three in a row
        fake.requests.clear()
        await ask(live, who.key)
        assert fake.attempts() == ["fake-primary", "fake-secondary"]  # so the primary was not cooled

    @pytest.mark.parametrize("how", [None, "upstream overloaded"], ids=["cut", "error-event"])
    async def test_a_primary_whose_streams_keep_breaking_is_cooled_too(self, live: Live, live_store: Store,
                                                                        fake: Scripted, how: str | None) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        fake.script["fake-primary"] = Broken(how)
        for _ in range(3):
            with pytest.raises(openai.APIError, match="incomplete"):
                await ask(live, who.key, stream=True)
        assert fake.attempts() == ["fake-primary"] * 3  # broken after output: never retried elsewhere
        fake.requests.clear()
        text, _ = await ask(live, who.key, stream=True)
        assert text == "".join(WORDS)
        assert fake.attempts() == ["fake-secondary"]  # three broken streams in a row cooled the primary
        rows = await wait_for_usage(live, who.user_id, 4)
        assert [(r["provider"], r["status"]) for r in rows] == [("fake", "cut")] * 3 + [("fake-backup", "ok")]


# -- failures after the first byte -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cut", "malformed"])
async def test_a_stream_that_breaks_after_output_is_not_retried_and_charges_what_was_delivered(
        live: Live, live_store: Store, fake: Scripted, mode: str, billing_calls: BillingCalls) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.mode, fake.words = mode, list(ASCII_WORDS)
    chunks, error = await stream_until_error(live, who.key, "gpt-fallback", MESSAGES)
    # An error event in the stream (HTTP 200 was already sent), not an error status.
    assert not isinstance(error, openai.APIStatusError)
    assert "incomplete" in error.message
    assert fake.attempts() == ["fake-primary"]  # the backup saw nothing
    delivered = sum(tokens.count_tokens(piece) for piece in delta_texts(chunks))
    assert 0 < delivered < len(ASCII_WORDS)

    rows = await wait_for_usage(live, who.user_id, 1)
    row = rows[0]
    assert (row["provider"], row["status"], row["estimated"]) == ("fake", "cut", 1)
    prompt = tokens.prompt_estimate({"messages": MESSAGES})
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, delivered)
    cost = expected_cost("gpt-fallback", prompt, delivered)
    assert row["charged"] == cost < expected_cost("gpt-fallback", prompt, len(ASCII_WORDS))
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (START - cost, 0)
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)


async def test_a_stream_failing_before_its_first_item_falls_back(live: Live, live_store: Store, fake: Scripted,
                                                                 billing_calls: BillingCalls) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-primary"] = ErrorFirst()
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        chunks = await client.chat.completions.create(model="gpt-fallback", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in chunks])
    assert text == "".join(fake.words)  # the backup's whole answer, nothing of the primary's error
    assert fake.attempts() == ["fake-primary", "fake-secondary"]
    rows = await wait_for_usage(live, who.user_id, 1)
    assert (rows[0]["provider"], rows[0]["status"]) == ("fake-backup", "ok")
    assert (billing_calls.reserve, billing_calls.settle) == (1, 1)
    assert charges(live, who.user_id) == [rows[0]["charged"]]


# -- upstream keys never leave apibox ----------------------------------------------------------

SECRETS = (UPSTREAM_KEY, ANTHROPIC_KEY, GEMINI_KEY)
# model, the fake that serves it, the header that carries its key upstream
UPSTREAMS = {"openai": ("gpt-fake", "fake", "Authorization"),
             "anthropic": ("claude-fake", "anthropic", "x-api-key"),
             "gemini": ("gemini-fake", "gemini", "x-goog-api-key")}


async def post_door(live: Live, key: str, door: str, model: str, stream: bool) -> tuple[int, CIMultiDict[str], bytes]:
    if door == "openai":
        path, body = "/chat/completions", {"model": model, "messages": MESSAGES, "stream": stream}
    else:
        path, body = "/messages", {"model": model, "max_tokens": 50, "messages": MESSAGES, "stream": stream}
    async with aiohttp.ClientSession() as session, session.post(f"{live.v1}{path}", json=body,
                                                                headers=auth(key)) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def leaks(text: str) -> list[str]:
    """Each secret (or its distinctive middle) found in ``text``."""
    return [s for s in SECRETS if s in text] + (["SECRET"] if "SECRET" in text else [])


def log_leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = leaks(caplog.text)
    for record in caplog.records:
        found += leaks(record.getMessage()) + leaks(record.exc_text or "") + leaks(repr(record.args))
    return found


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("apibox", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.parametrize("door", ["openai", "messages"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("status", [400, 401, 500])
@pytest.mark.parametrize("upstream", list(UPSTREAMS))
async def test_an_upstream_key_echoed_in_an_error_never_leaves_apibox(
        live: Live, live_store: Store, debug_logs: pytest.LogCaptureFixture, upstream: str, status: int,
        stream: bool, door: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    model, fake_name, key_header = UPSTREAMS[upstream]
    fake = getattr(live, fake_name)
    fake.mode, fake.status = "echo_key", status

    got, headers, raw = await post_door(live, who.key, door, model, stream)
    assert got >= 400
    assert len(fake.requests) == 1
    assert fake.requests[0].headers[key_header].removeprefix("Bearer ") in SECRETS  # the key was sent...
    body = raw.decode()
    assert leaks(body) == [], body  # ...and is nowhere in what came back
    assert leaks(json.dumps(list(headers.items()))) == []
    if status != 401:  # the upstream's message is passed on, with the key cut out
        assert "[redacted]" in body, body
    assert any(r.name.startswith("apibox") and "failed" in r.getMessage() for r in debug_logs.records)
    assert log_leaks(debug_logs) == []
    assert balance(live, who.user_id) == (START, 0)


@pytest.mark.parametrize("door", ["openai", "messages"])
async def test_an_upstream_key_echoed_mid_stream_never_leaves_apibox(
        live: Live, live_store: Store, fake: Scripted, debug_logs: pytest.LogCaptureFixture, door: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    fake.script["fake-model-1"] = Broken(f"Incorrect API key provided: {UPSTREAM_KEY}")
    got, headers, raw = await post_door(live, who.key, door, "gpt-fake", stream=True)
    assert got == 200
    events = sse_events(raw)
    assert "Hi" in raw.decode()  # the stream had started
    assert "error" in json.loads(events[-1]), events[-1]  # and ends with the in-band error
    assert leaks(raw.decode()) == [], raw
    assert leaks(json.dumps(list(headers.items()))) == []
    assert any(r.name.startswith("apibox") and "broke" in r.getMessage() for r in debug_logs.records)
    assert log_leaks(debug_logs) == []
    await wait_for_usage(live, who.user_id, 1)
