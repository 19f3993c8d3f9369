"""Keep-alive comments: a stream its upstream leaves silent gets ``: keep-alive`` comments, which the
official SDKs read past; a long wait for the first event sends the stream's head early, after which
a failure is an error event, charged nothing; a client gone during a silence stops the upstream's
answer at the next comment; and with the setting at 0 a silence stays silent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apibox.gateway.keepalive import KEEP_ALIVE
from tests.conftest import Live, serving
from tests.fake_upstream import WORDS, FakeUpstream
from tests.gateway_helpers import Account, account, auth, balance, delta_texts, sse_json, wait_for_usage
from tests.live_variants import MESSAGES, Variant, request, server, store_of
from tests.waiting import eventually

KEEPALIVE_SECONDS = 0.3
CHAT = {"model": "gpt-fake", "messages": MESSAGES, "stream": True}


def keepalive(tmp_path: Path, database_url: str, fake: FakeUpstream, seconds: float) -> Iterator[Live]:
    with serving(Variant(tmp_path, database_url, fake, server(stream_keepalive_seconds=seconds))) as running:
        yield running


@pytest.fixture
def beating(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A gateway whose streams get a keep-alive after 0.3 s of silence."""
    yield from keepalive(tmp_path, database_url, fake, KEEPALIVE_SECONDS)


@pytest.fixture
def silent(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A gateway with keep-alives turned off."""
    yield from keepalive(tmp_path, database_url, fake, 0)


async def timed_stream(live: Live, key: str) -> tuple[int, float, list[tuple[float, bytes]]]:
    """A raw stream: its status, when its head came and each piece of its body with when it came
    (seconds from the request)."""
    began = time.monotonic()
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", json=CHAT, headers=auth(key)) as response:
        head = time.monotonic() - began
        pieces = [(time.monotonic() - began, piece) async for piece in response.content.iter_any()]
        return response.status, head, pieces


def longest_gap(pieces: list[tuple[float, bytes]]) -> float:
    return max(later - earlier for (earlier, _), (later, _) in pairwise(pieces))


async def failing_after_the_head(live: Live) -> Account:
    """An account, on a gateway whose upstream fails (overloaded) after the first keep-alive."""
    live.fake.delay, live.fake.mode, live.fake.status = 0.8, "status", 503
    live.fake.error_message = "The engine is currently overloaded"
    async with store_of(live) as store:
        return await account(store, live, "ann@example.com", "1")


async def keepalives(live: Live, outcome: str) -> float:
    """apibox_stream_keepalives_total{outcome=...} on the gateway's /metrics page (0 when absent)."""
    _, _, raw = await request(live, "GET", "/metrics")
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name == "apibox_stream_keepalives_total" and sample.labels == {"outcome": outcome}:
                return sample.value
    return 0


def comments_in(pieces: list[tuple[float, bytes]]) -> int:
    return b"".join(piece for _, piece in pieces).count(KEEP_ALIVE)


async def test_a_silence_mid_stream_is_filled_with_comments_and_the_answer_is_whole(beating: Live) -> None:
    beating.fake.pause, beating.fake.pause_before = 1.2, 3
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    status, _, pieces = await timed_stream(beating, who.key)
    assert status == 200
    # 1.2 s of silence at most 0.3 s apart: three comments or more, none while the words flowed
    assert comments_in(pieces) >= 3
    assert longest_gap(pieces) < KEEPALIVE_SECONDS + 0.25
    raw = b"".join(piece for _, piece in pieces)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(raw)) == "".join(WORDS)
    [row] = await wait_for_usage(beating, who.user_id, 1)
    assert (row["status"], row["estimated"]) == ("ok", 0)
    assert await keepalives(beating, "sent") == comments_in(pieces)


async def test_the_openai_sdk_reads_past_the_comments(beating: Live) -> None:
    beating.fake.pause, beating.fake.pause_before = 0.8, 1
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=beating.v1, api_key=who.key, max_retries=0) as client, \
            await client.chat.completions.create(model="gpt-fake", messages=MESSAGES, stream=True) as stream:
        chunks = [chunk async for chunk in stream]
    assert "".join(delta_texts(chunks)) == "".join(WORDS)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_the_anthropic_sdk_reads_past_the_comments(beating: Live) -> None:
    beating.fake.pause, beating.fake.pause_before = 0.8, 2
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    async with anthropic.AsyncAnthropic(base_url=beating.url, api_key=who.key, max_retries=0) as sdk, \
            sdk.messages.stream(model="gpt-fake", max_tokens=100, messages=MESSAGES) as events:
        message = await events.get_final_message()
    assert message.content[0].text == "".join(WORDS)
    assert message.stop_reason == "end_turn"


async def test_a_long_wait_for_the_first_event_sends_the_head_early(beating: Live) -> None:
    beating.fake.delay = 1.0  # the upstream's own head comes after a second
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    status, head, pieces = await timed_stream(beating, who.key)
    assert status == 200
    assert KEEPALIVE_SECONDS - 0.05 <= head < 0.8  # the keep-alive's, not the upstream's
    assert pieces[0][1].startswith(KEEP_ALIVE)
    assert comments_in(pieces) >= 2
    raw = b"".join(piece for _, piece in pieces)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(raw)) == "".join(WORDS)


async def test_a_failure_after_the_head_is_one_error_event_and_costs_nothing(beating: Live) -> None:
    who = await failing_after_the_head(beating)
    async with aiohttp.ClientSession() as session, session.post(
            f"{beating.v1}/chat/completions", json=CHAT, headers=auth(who.key)) as response:
        raw = await response.read()
    assert response.status == 200 and raw.startswith(KEEP_ALIVE)
    [event] = sse_json(raw)
    error = event["error"]
    assert "overloaded" in error["message"] and error["type"] == "server_error"
    assert b"[DONE]" not in raw
    [row] = await wait_for_usage(beating, who.user_id, 1)
    assert (row["status"], row["http_status"], row["charged"]) == ("error", 503, 0)
    assert balance(beating, who.user_id) == (1_000_000, 0)  # the hold released, nothing spent


async def test_the_openai_sdk_raises_the_failure_after_the_head(beating: Live) -> None:
    who = await failing_after_the_head(beating)
    async with openai.AsyncOpenAI(base_url=beating.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.APIError) as caught:
            async with await client.chat.completions.create(model="gpt-fake", messages=MESSAGES,
                                                            stream=True) as stream:
                _ = [chunk async for chunk in stream]
    assert "upstream" in caught.value.message


async def test_the_anthropic_sdk_raises_the_failure_after_the_head_in_anthropics_shape(beating: Live) -> None:
    who = await failing_after_the_head(beating)
    async with anthropic.AsyncAnthropic(base_url=beating.url, api_key=who.key, max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with sdk.messages.stream(model="gpt-fake", max_tokens=100, messages=MESSAGES) as events:
                await events.get_final_message()
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    [row] = await wait_for_usage(beating, who.user_id, 1)
    assert (row["status"], row["charged"]) == ("error", 0)


async def test_a_failure_before_the_keepalive_is_still_an_http_status(beating: Live) -> None:
    beating.fake.mode, beating.fake.status = "status", 503
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    status, _, pieces = await timed_stream(beating, who.key)
    assert status == 503 and comments_in(pieces) == 0


async def test_a_client_gone_in_a_silence_stops_the_upstream_at_the_next_comment(beating: Live) -> None:
    beating.fake.pause, beating.fake.pause_before = 5.0, 1  # one event, then the silence
    async with store_of(beating) as store:
        who = await account(store, beating, "ann@example.com", "1")
    began = time.monotonic()
    async with aiohttp.ClientSession() as session, session.post(
            f"{beating.v1}/chat/completions", json=CHAT, headers=auth(who.key)) as response:
        await response.content.readuntil(b"\n\n")  # the first event, then the client leaves
    [row] = await wait_for_usage(beating, who.user_id, 1, timeout=4.0)
    await eventually(lambda: beating.fake.hung_up == 1, timeout=1.0)
    assert time.monotonic() - began < 2.0  # not at the end of the upstream's 5 s silence
    assert (row["status"], row["http_status"]) == ("client_gone", 499)
    assert await keepalives(beating, "client_gone") == 1


async def test_with_keepalives_off_a_silence_stays_silent(silent: Live) -> None:
    silent.fake.pause, silent.fake.pause_before = 0.8, 3
    async with store_of(silent) as store:
        who = await account(store, silent, "ann@example.com", "1")
    status, _, pieces = await timed_stream(silent, who.key)
    assert status == 200 and comments_in(pieces) == 0
    assert longest_gap(pieces) >= 0.7
    assert await keepalives(silent, "sent") == 0

