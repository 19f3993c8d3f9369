"""Streams: usage injection and stripping, alias model names, cut/malformed/usage-less/overrunning
upstream streams, and a client that goes away mid-stream, each settled exactly once."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter

import apibox
import apibox.providers.http
from apibox import tokens
from apibox.gateway.proxy import OVERRUN_SLACK_TOKENS
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_upstream import WORDS, FakeUpstream
from tests.garbage import apiboxs_own, collected_garbage
from tests.gateway_helpers import (
    GPT_FAKE,
    account,
    auth,
    balance,
    charges,
    delta_texts,
    expected_cost,
    sse_events,
    sse_json,
    stream_until_error,
    usage_rows,
    wait_for_usage,
)
from tests.waiting import eventually

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
APIBOX_SOURCE = Path(apibox.__file__).parent
ASCII_WORDS = [" word"] * 20  # one token each by any count, so estimates are predictable


async def raw_stream(live: Live, key: str, body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", json={"model": "gpt-fake", "messages": MESSAGES, "stream": True, **body},
            headers=auth(key)) as response:
        return response, await response.read()


async def test_usage_is_requested_upstream_and_stripped_when_the_client_did_not_ask(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    response, raw = await raw_stream(live, who.key, {})

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers.get("x-request-id", "").startswith("req_")
    assert live.fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert live.fake.requests[-1].body["model"] == "fake-model-1"
    assert sse_events(raw)[-1] == "[DONE]"
    chunks = sse_json(raw)
    assert chunks, raw
    for chunk in chunks:
        assert len(chunk["choices"]) >= 1, chunk  # no usage-only chunk
        assert "usage" not in chunk, chunk
        assert chunk["model"] == "gpt-fake"
        assert chunk["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(WORDS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert b"fake-model-1" not in raw

    cost = expected_cost("gpt-fake", 21, len(WORDS))
    rows = await wait_for_usage(live, who.user_id, 1)
    assert (rows[0]["status"], rows[0]["estimated"], rows[0]["charged"]) == ("ok", 0, cost)
    assert charges(live, who.user_id) == [cost]


async def test_a_client_that_has_read_the_end_of_a_stream_finds_it_in_the_books(live: Live, live_store) -> None:
    """The settlement is written before the stream's last event goes out, as before a reply."""
    who = await account(live_store, live, "ann@example.com", "1")
    for n in range(5):
        _, raw = await raw_stream(live, who.key, {"stream_options": {"include_usage": True}})
        assert sse_events(raw)[-1] == "[DONE]"
        rows = usage_rows(live, who.user_id)  # at once: no waiting for the books
        assert len(rows) == n + 1 and rows[-1]["status"] == "ok"
        assert balance(live, who.user_id)[1] == 0  # nothing held any more
        assert sum(charges(live, who.user_id)) == sum(r["charged"] for r in rows)
        assert sse_json(raw)[-1]["usage"]["cost"] == rows[-1]["cost"] / 1_000_000


async def test_a_streams_headers_go_out_with_its_first_events(live: Live, live_store, monkeypatch) -> None:
    """One write, not two: the headers wait for the first batch, which is in hand when they are made."""
    who = await account(live_store, live, "ann@example.com", "1")
    writes: list[bytes] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def recorded_write(self: StreamWriter, chunk: Any) -> None:
        writes.append(bytes(chunk))
        write(self, chunk)

    def recorded_writelines(self: StreamWriter, chunks: Any) -> None:
        chunks = [bytes(c) for c in chunks]
        writes.append(b"".join(chunks))
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", recorded_write)
    monkeypatch.setattr(StreamWriter, "_writelines", recorded_writelines)
    response, raw = await raw_stream(live, who.key, {})
    assert response.status == 200 and sse_events(raw)[-1] == "[DONE]"
    # the gateway's answer (the fake upstream, an aiohttp server too, sends its headers alone)
    first = next(w for w in writes if w.startswith(b"HTTP/1.1 200") and b"X-Accel-Buffering" in w)
    assert b"data: {" in first


async def test_a_stream_leaves_no_generator_of_its_own_for_the_event_loop_to_close(live: Live, live_store) -> None:
    """Every async generator a stream runs through is closed by the stream itself: one left
    suspended is closed by the event loop, in a task of its own, when it is collected. The
    upstream sends each answer in one write, so its last batch ends the stream."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.whole = True
    first_iteration, finalizer = await live.in_gateway_thread(sys.get_asyncgen_hooks)
    left_to_the_loop: list[str] = []

    def recording(generator: AsyncGenerator[Any, None]) -> None:
        if Path(generator.ag_code.co_filename).is_relative_to(APIBOX_SOURCE):
            left_to_the_loop.append(generator.__qualname__)
        if finalizer is not None:
            finalizer(generator)

    await live.in_gateway_thread(lambda: sys.set_asyncgen_hooks(first_iteration, recording))
    try:
        for _ in range(3):
            _, raw = await raw_stream(live, who.key, {})
            assert sse_events(raw)[-1] == "[DONE]"
        await live.in_gateway_thread(gc.collect)
    finally:
        await live.in_gateway_thread(lambda: sys.set_asyncgen_hooks(first_iteration, finalizer))
    assert left_to_the_loop == []
    assert len(usage_rows(live, who.user_id)) == 3


STREAM = {"model": "gpt-fake", "messages": MESSAGES, "stream": True}


@pytest.mark.parametrize(("path", "body", "upstream", "status"), [
    ("/chat/completions", {"model": "gpt-fake", "messages": MESSAGES}, "ok", 200),
    ("/chat/completions", STREAM, "ok", 200),
    ("/chat/completions", {**STREAM, "n": 2}, "ok", 200),
    ("/messages", {**STREAM, "max_tokens": 100}, "ok", 200),
    ("/chat/completions", STREAM, "status", 502),
    ("/nothing/here", {}, "ok", 404),
    ("/chat/completions", STREAM, "ok", 402),
    ("/responses", {"model": "gpt-fake", "input": "hi"}, "ok", 200),
    ("/responses", {"model": "gpt-fake", "input": "hi", "stream": True}, "ok", 200),
    ("/responses", {"model": "demo", "input": "hi", "stream": True}, "ok", 200),
], ids=["whole", "stream", "stream-n2", "anthropic-stream", "upstream-failed", "unknown-url", "no-money",
        "responses-whole", "responses-stream", "responses-translated"])
async def test_a_request_leaves_none_of_apiboxs_objects_to_the_cyclic_garbage_collector(
        live: Live, live_store, path: str, body: dict[str, Any], upstream: str, status: int) -> None:
    """What a request makes is freed as its last reference goes: an object in a reference cycle
    waits for the cyclic collector, whose passes then grow with the load (a renderer that kept its
    own bound method cost streams a fifth of their throughput), and with an upstream's failures."""
    who = await account(live_store, live, "ann@example.com", "0" if status == 402 else "1")
    live.fake.mode = upstream
    headers = {**auth(who.key), "x-api-key": who.key, "anthropic-version": "2023-06-01"}
    billed = 0 if status in (402, 404) else 1  # the usage rows a request writes (a failed one's charges nothing)

    async def answered(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{live.v1}{path}", json=body, headers=headers) as response:
            assert response.status == status, await response.read()
            await response.read()

    async with aiohttp.ClientSession() as session:
        await answered(session)  # what a first request sets up for good is not garbage
        await eventually(lambda: len(usage_rows(live, who.user_id)) == billed)
        with collected_garbage() as left:
            for _ in range(3):
                await answered(session)
            await eventually(lambda: len(usage_rows(live, who.user_id)) == 4 * billed)
    assert apiboxs_own(left) == []


@pytest.mark.parametrize("whole", [False, True], ids=["split", "whole"])
async def test_openais_padding_reaches_the_client_as_the_upstream_sent_it(live: Live, live_store,
                                                                           whole: bool) -> None:
    """OpenAI pads every chunk with a random ``obfuscation`` string after ``"usage": null``: the
    client gets each chunk's own padding, its model's name and no usage, and pays the upstream's count."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.obfuscation, live.fake.whole = True, whole
    response, raw = await raw_stream(live, who.key, {})
    assert response.status == 200 and sse_events(raw)[-1] == "[DONE]"
    chunks = sse_json(raw)
    assert [c.get("obfuscation") for c in chunks] == live.fake.pads_sent
    assert len(set(live.fake.pads_sent)) > 1
    assert all(c["model"] == "gpt-fake" and "usage" not in c for c in chunks)
    assert "".join(delta_texts_of(chunks)) == "".join(WORDS)
    await wait_for_usage(live, who.user_id, 1)
    assert charges(live, who.user_id) == [expected_cost("gpt-fake", 21, len(WORDS))]

    live.fake.pads_sent.clear()  # a client that asks for no padding: none is asked for, none comes
    _, raw = await raw_stream(live, who.key, {"stream_options": {"include_obfuscation": False}})
    assert live.fake.requests[-1].body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert live.fake.pads_sent == [] and all("obfuscation" not in c for c in sse_json(raw))


async def test_a_padded_stream_that_ignores_max_tokens_is_cut_at_length(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words, live.fake.obfuscation, live.fake.whole = "overrun", [" word"] * 200, True, True
    response, raw = await raw_stream(live, who.key, {"max_tokens": 5})
    assert response.status == 200 and sse_events(raw)[-1] == "[DONE]"
    chunks = sse_json(raw)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(delta_texts_of(chunks)) == " word" * (5 + OVERRUN_SLACK_TOKENS + 1)  # and the one past them
    assert [c.get("obfuscation") for c in chunks[:-1]] == live.fake.pads_sent[:len(chunks) - 1]
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"]) == ("cut", 1)
    assert charges(live, who.user_id) == [row["charged"]]


def delta_texts_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"].get("content") or "" for c in chunks]


async def test_the_sdk_sees_only_choice_chunks_without_usage(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")

    def run() -> list[Any]:
        with openai.OpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client, \
                client.chat.completions.create(model="gpt-fake", messages=MESSAGES, stream=True) as chunks:
            return list(chunks)
    chunks = await asyncio.to_thread(run)
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert {c.model for c in chunks} == {"gpt-fake"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
    await wait_for_usage(live, who.user_id, 1)
    assert charges(live, who.user_id) == [expected_cost("gpt-fake", 21, len(WORDS))]


async def test_a_client_that_asks_gets_one_usage_chunk_with_the_cost(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    response, raw = await raw_stream(live, who.key, {"stream_options": {"include_usage": True}})
    assert response.status == 200
    chunks = sse_json(raw)
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1
    last = usage_chunks[0]
    assert last is chunks[-1]  # after the finish chunk, before [DONE]
    assert last["choices"] == []
    assert last["model"] == "gpt-fake"
    assert all(c.get("usage", None) is None for c in chunks[:-1])
    cost = expected_cost("gpt-fake", 21, len(WORDS))
    assert (last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"]) == (21, len(WORDS))
    assert Decimal(str(last["usage"]["cost"])) == Decimal(cost) / 1_000_000
    before = 1_000_000
    await wait_for_usage(live, who.user_id, 1)
    assert balance(live, who.user_id) == (before - cost, 0)


async def test_a_cut_stream_raises_in_the_sdk_and_is_charged_by_estimate(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = "cut", list(ASCII_WORDS)
    chunks, error = await stream_until_error(live, who.key, "gpt-fake", MESSAGES)
    assert "incomplete" in str(error)
    delivered = "".join(delta_texts(chunks))
    assert 0 < len(delivered) < len("".join(ASCII_WORDS))

    rows = await wait_for_usage(live, who.user_id, 1)
    row = rows[0]
    assert (row["status"], row["estimated"]) == ("cut", 1)
    full = expected_cost("gpt-fake", live.fake.prompt_tokens, len(ASCII_WORDS))
    assert 0 < row["charged"] < full
    assert row["completion_tokens"] == tokens.count_tokens(delivered)  # only what was delivered
    assert charges(live, who.user_id) == [row["charged"]]
    assert balance(live, who.user_id) == (1_000_000 - row["charged"], 0)


@pytest.mark.parametrize("mode", ["cut", "malformed"])
async def test_a_broken_stream_ends_with_an_error_event(live: Live, live_store, mode: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = mode, list(ASCII_WORDS)
    response, raw = await raw_stream(live, who.key, {})
    assert response.status == 200  # the error comes in-band, after the headers were sent
    events = sse_json(raw)
    assert "error" in events[-1], events[-1]
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in events[:-1])
    delivered = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert 0 < len(delivered) < len("".join(ASCII_WORDS))

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"]) == ("cut", 1)
    assert 0 < row["charged"] < expected_cost("gpt-fake", live.fake.prompt_tokens, len(ASCII_WORDS))
    assert charges(live, who.user_id) == [row["charged"]]


async def test_the_words_before_a_malformed_event_reach_the_client_though_they_came_in_its_read(
        live: Live, live_store) -> None:
    """The whole stream in one write: the chunks the malformed event came with are still sent."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words, live.fake.whole = "malformed", list(ASCII_WORDS), True
    _, raw = await raw_stream(live, who.key, {})
    events = sse_json(raw)
    assert "error" in events[-1]
    delivered = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert delivered == "".join(ASCII_WORDS[:len(ASCII_WORDS) // 2 - 1])  # (the role chunk is the first event)
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert row["completion_tokens"] == tokens.count_tokens(delivered) > 0


async def test_a_stream_without_usage_is_charged_by_estimate(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = "no_usage", list(ASCII_WORDS)
    response, raw = await raw_stream(live, who.key, {"stream_options": {"include_usage": True}})
    assert response.status == 200
    chunks = sse_json(raw)
    # The client asked for usage and the upstream sent none: it gets the estimate it pays for.
    *answer, usage_chunk = chunks
    assert answer[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in answer) == "".join(ASCII_WORDS)
    assert usage_chunk["choices"] == []

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"]) == ("ok", 1)
    prompt = tokens.prompt_estimate({"messages": MESSAGES})
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, len(ASCII_WORDS))
    assert (usage_chunk["usage"]["prompt_tokens"], usage_chunk["usage"]["completion_tokens"]) == (
        prompt, len(ASCII_WORDS))
    assert usage_chunk["usage"]["cost"] * 1_000_000 == pytest.approx(row["charged"])
    cost = expected_cost("gpt-fake", prompt, len(ASCII_WORDS))
    assert row["charged"] == cost > 0
    assert charges(live, who.user_id) == [cost]


@pytest.mark.parametrize("whole", [False, True], ids=["split", "whole"])
async def test_a_reasoning_stream_without_usage_is_charged_for_its_thinking_too(live: Live, live_store,
                                                                                whole: bool) -> None:
    """DeepSeek-style thinking (``reasoning_content``) reaches the client, and is output the
    estimate counts, whether its chunks came parsed or as runs."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words, live.fake.thoughts, live.fake.whole = "no_usage", list(ASCII_WORDS), \
        [" hmm"] * 12, whole
    _, raw = await raw_stream(live, who.key, {})
    chunks = sse_json(raw)
    assert "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks) == " hmm" * 12
    assert "".join(delta_texts_of(chunks)) == "".join(ASCII_WORDS)
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"], row["completion_tokens"]) == ("ok", 1, 12 + len(ASCII_WORDS))
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] > 0


async def test_a_reply_without_usage_is_charged_by_estimate(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = "no_usage", list(ASCII_WORDS)
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        completion = await client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert completion.choices[0].message.content == "".join(ASCII_WORDS)
    row = usage_rows(live, who.user_id)[0]
    assert (row["status"], row["estimated"]) == ("ok", 1)
    assert completion.usage.completion_tokens == row["completion_tokens"] >= len(ASCII_WORDS)
    cost = expected_cost("gpt-fake", row["prompt_tokens"], row["completion_tokens"])
    assert row["charged"] == cost > 0
    assert Decimal(str(completion.usage.model_dump()["cost"])) == Decimal(cost) / 1_000_000
    assert charges(live, who.user_id) == [cost]


async def test_an_upstream_that_ignores_max_tokens_is_cut_at_length(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = "overrun", [" word"] * 200
    body = {"model": "gpt-fake", "messages": MESSAGES, "max_tokens": 5}
    held = worst_case_micro(_price(), tokens.prompt_bound(body), 5)
    response, raw = await raw_stream(live, who.key, {"max_tokens": 5})
    assert response.status == 200
    assert live.fake.requests[-1].body["max_tokens"] == 5
    chunks = sse_json(raw)
    assert sse_events(raw)[-1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    delivered = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    # Every word is one token: exactly the paid-for 5, the slack and the chunk that went past them
    # go out (it is counted, so sent), wherever the reads split the stream (one run of plain chunks or several).
    assert delivered == " word" * (5 + OVERRUN_SLACK_TOKENS + 1)

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"]) == ("cut", 1)  # the upstream's usage never came
    assert row["completion_tokens"] <= 5
    assert 0 < row["charged"] <= held
    assert charges(live, who.user_id) == [row["charged"]]
    assert balance(live, who.user_id) == (1_000_000 - row["charged"], 0)


@pytest.mark.parametrize("door", ["openai", "anthropic"])
async def test_a_chunk_that_goes_far_past_the_paid_for_length_is_sent_and_the_hold_charged(
        live: Live, live_store, door: str) -> None:
    """One chunk of 300 tokens where 5 were paid for: the client gets it (the loop counted it),
    its door's stream stays well formed, and the charge is the hold's 5, not 300 nor 0."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words = "overrun", ["Hi", " word" * 300]
    if door == "openai":
        response, raw = await raw_stream(live, who.key, {"max_tokens": 5})
        assert response.status == 200
        chunks = sse_json(raw)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hi" + " word" * 300
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as sdk, \
                sdk.messages.stream(model="gpt-fake", max_tokens=5, messages=MESSAGES) as stream:
            types = [event.type async for event in stream]
            final = await stream.get_final_message()
        assert types[0] == "message_start" and types[-1] == "message_stop"
        assert (final.content[0].text, final.stop_reason) == ("Hi" + " word" * 300, "max_tokens")
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["completion_tokens"]) == ("cut", 5)
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] > 0


async def test_a_finished_stream_gives_its_upstream_connection_to_the_next(live: Live, live_store) -> None:
    """[DONE] may come a read before the end of the body: the gateway waits for that end rather
    than closing the connection at [DONE], and the next stream goes over the same connection."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.end_pause = 0.2
    response, raw = await raw_stream(live, who.key, {})
    assert (response.status, sse_events(raw)[-1]) == (200, "[DONE]")
    await eventually(lambda: live.fake.bodies_ended == 1)
    response, raw = await raw_stream(live, who.key, {})
    assert (response.status, sse_events(raw)[-1]) == (200, "[DONE]")
    first, second = live.fake.requests
    assert first.peer == second.peer
    assert live.fake.hung_up == 0


async def test_a_stream_whose_body_does_not_end_after_done_is_closed_after_a_grace(live: Live, live_store,
                                                                                 monkeypatch) -> None:
    """An upstream that keeps the connection after [DONE] gets it closed, and the client has its
    answer meanwhile."""
    monkeypatch.setattr(apibox.providers.http, "BODY_END_GRACE_SECONDS", 0.1)
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.end_pause = 30
    response, raw = await raw_stream(live, who.key, {})
    assert (response.status, sse_events(raw)[-1]) == (200, "[DONE]")
    await eventually(lambda: live.fake.hung_up == 1)
    assert live.fake.bodies_ended == 0


async def test_a_stream_cut_before_done_hangs_up_on_the_upstream_at_once(live: Live, live_store, monkeypatch) -> None:
    """A stream cut at the paid-for length stops the upstream generating: no waiting for an end."""
    monkeypatch.setattr(apibox.providers.http, "BODY_END_GRACE_SECONDS", 60)
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode, live.fake.words, live.fake.end_pause = "overrun", [" word"] * 200, 30
    response, raw = await raw_stream(live, who.key, {"max_tokens": 5})
    assert (response.status, sse_json(raw)[-1]["choices"][0]["finish_reason"]) == (200, "length")
    await eventually(lambda: live.fake.hung_up == 1)


def _price() -> Price:
    return Price(input=GPT_FAKE[0], output=GPT_FAKE[1], cached_input=GPT_FAKE[2])


@dataclass
class SlowUpstream(FakeUpstream):
    """Streams its words with a pause before each, so a stream is still running when a client leaves.

    (FakeUpstream lists a ``slow`` mode, but its only delay comes before the response starts.)
    """

    word_pause: float = 0.05

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:  # type: ignore[override]
        if b'"content"' in data:
            await asyncio.sleep(self.word_pause)
        await FakeUpstream._write(response, data)

    async def stream(self, request: web.Request, *args: Any) -> web.StreamResponse:
        try:
            return await super().stream(request, *args)
        except asyncio.CancelledError:
            self.hung_up += 1  # the gateway hung up on us: it cancelled the upstream call
            raise


class TestClientDisconnect:
    @pytest.fixture
    def fake(self) -> SlowUpstream:
        return SlowUpstream(words=[" word"] * 200)

    async def test_a_client_that_leaves_mid_stream_is_settled(self, live: Live, live_store) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{live.v1}/chat/completions", headers=auth(who.key), json={
                "model": "gpt-fake", "messages": MESSAGES, "stream": True})
            assert response.status == 200
            events = 0
            buffer = b""
            while events < 2:
                buffer += await response.content.readany()
                events = buffer.count(b"\n\n")
            held = balance(live, who.user_id)[1]
            assert held > 0  # still streaming: the hold is open
            response.close()  # hang up mid-answer

        row = (await wait_for_usage(live, who.user_id, 1, timeout=3.0))[0]
        assert row["status"] == "client_gone"
        assert row["estimated"] == 1
        assert row["completion_tokens"] < 200
        assert 0 < row["charged"] <= held
        assert balance(live, who.user_id) == (1_000_000 - row["charged"], 0)
        assert charges(live, who.user_id) == [row["charged"]]
        await eventually(lambda: live.fake.hung_up == 1)  # the upstream stream is closed when the client leaves
        assert len(live.fake.requests) == 1


async def test_streamed_usage_cost_matches_the_charge_with_cached_tokens(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.cached_tokens = 20
    _, raw = await raw_stream(live, who.key, {"stream_options": {"include_usage": True}})
    usage = sse_json(raw)[-1]["usage"]
    cost = expected_cost("gpt-fake", 21, len(WORDS), cached=20)
    assert Decimal(str(usage["cost"])) == Decimal(cost) / 1_000_000
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["charged"], row["cached_tokens"]) == (cost, 20)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 20
