"""OpenAI clients on an Anthropic-routed model (``claude-fake``): translation, tools, caching, failures.

The official OpenAI SDK talks to the live gateway, which talks to FakeAnthropic over real TCP.
Each test checks what the upstream received (the Messages API shape of PROTOCOLS.md 4.1),
what the client got back (4.2, 4.3) and the money: the charge is
``ceil((input*3 + cache_read*0.3 + cache_write*3.75 + output*15) / 1e6)`` micro-USD at
claude-fake's prices per 1M tokens, and must equal ``usage.cost``, the ledger charge, the
usage row and the balance drop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from apibox import tokens
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_anthropic import ANTHROPIC_KEY, WORDS
from tests.gateway_helpers import (
    Account,
    account,
    auth,
    balance,
    charges,
    delta_texts,
    sse_json,
    stream_until_error,
    usage_rows,
    wait_for_usage,
)
from tests.waiting import eventually

CLAUDE_TEXT = "".join(WORDS)
PROMPT = "Say hello in French"
MESSAGES = [{"role": "user", "content": PROMPT}]
# claude-fake's prices in micro-USD per 1M tokens.
INPUT, OUTPUT, CACHE_READ, CACHE_WRITE = 3_000_000, 15_000_000, 300_000, 3_750_000
# (an hour's cache write at twice input, Anthropic's rate, which a model routed to Anthropic gets by default)
CLAUDE_PRICE = Price(input=INPUT, output=OUTPUT, cached_input=CACHE_READ, cache_write=CACHE_WRITE,
                     cache_write_1h=2 * INPUT)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
PNG = "iVBORw0KGgo="


def claude_cost(input_tokens: int, output: int, cache_read: int = 0, cache_write: int = 0) -> int:
    scaled = input_tokens * INPUT + output * OUTPUT + cache_read * CACHE_READ + cache_write * CACHE_WRITE
    return -(-scaled // 1_000_000)


def usd(micro: int) -> Decimal:
    return Decimal(micro) / 1_000_000


async def assert_charged(live: Live, who: Account, cost: int, *, prompt: int, completion: int, cached: int = 0,
                         cache_write: int = 0, before: int = 1_000_000) -> dict[str, Any]:
    """One settled ``ok`` request on claude-fake, charged ``cost`` everywhere it shows."""
    rows = await wait_for_usage(live, who.user_id, 1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["provider"], row["status"], row["estimated"]) == ("claude-fake", "claude", "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (
        prompt, completion, cached, cache_write)
    assert (row["cost"], row["charged"]) == (cost, cost)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (before - cost, 0)
    return row


async def stream_chunks(client: openai.AsyncOpenAI, **params: Any) -> list[Any]:
    async with await client.chat.completions.create(**params, stream=True) as chunks:
        return [c async for c in chunks]


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def streamed_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """Tool calls assembled from their streamed fragments, by index."""
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls or ()) if c.choices else ():
            call = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or t.id
            call["name"] += t.function.name or ""
            call["arguments"] += t.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


# -- plain text ---------------------------------------------------------------------------


async def test_a_whole_reply_is_translated_and_billed_exactly(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(model="claude-fake", messages=MESSAGES)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "claude-fake"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", CLAUDE_TEXT, "stop")
    assert choice.message.tool_calls is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, len(WORDS), 30 + len(WORDS))
    cost = claude_cost(30, len(WORDS))
    assert cost == 195  # 30 x $3 + 7 x $15 per 1M
    assert Decimal(str(usage.model_dump()["cost"])) == usd(cost)
    row = await assert_charged(live, who, cost, prompt=30, completion=len(WORDS))
    assert row["request_id"] == raw.headers["x-request-id"]


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
async def test_a_stream_is_translated_and_billed_from_the_upstream_usage(live: Live, live_store,
                                                                         include_usage: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        chunks = await stream_chunks(client, model="claude-fake", messages=MESSAGES, **extra)
    assert streamed_text(chunks) == CLAUDE_TEXT
    assert {c.model for c in chunks} == {"claude-fake"}
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    cost = claude_cost(30, len(WORDS))
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
        usage = with_usage[0].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 7, 37)
        assert Decimal(str(usage.model_dump()["cost"])) == usd(cost)
    else:
        assert with_usage == [] and all(c.choices for c in chunks)  # no usage-only chunk it did not ask for
    # Billed from Anthropic's reported usage (message_start + message_delta), not an estimate.
    assert live.anthropic.requests[-1].body["stream"] is True
    await assert_charged(live, who, cost, prompt=30, completion=len(WORDS))


async def test_a_finished_stream_gives_its_upstream_connection_to_the_next(live: Live, live_store) -> None:
    """message_stop may come a read before the end of the body: the gateway waits for that end, and
    the next stream goes over the same connection."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.end_pause = 0.2
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        assert streamed_text(await stream_chunks(client, model="claude-fake", messages=MESSAGES)) == CLAUDE_TEXT
        await eventually(lambda: live.anthropic.bodies_ended == 1)
        assert streamed_text(await stream_chunks(client, model="claude-fake", messages=MESSAGES)) == CLAUDE_TEXT
    first, second = live.anthropic.requests
    assert first.peer == second.peer


async def test_the_sync_sdk_streams_too(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")

    def run() -> list[Any]:
        with openai.OpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client, \
                client.chat.completions.create(model="claude-fake", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True}) as chunks:
            return list(chunks)
    chunks = await asyncio.to_thread(run)
    assert streamed_text(chunks) == CLAUDE_TEXT
    assert chunks[-1].usage.prompt_tokens == 30
    await assert_charged(live, who, claude_cost(30, 7), prompt=30, completion=7)


# -- what the upstream receives -----------------------------------------------------------


@pytest.mark.parametrize(("tool_choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
], ids=["auto", "required-serial", "none", "named"])
async def test_the_upstream_gets_a_messages_api_request(live: Live, live_store, tool_choice: Any,
                                                        parallel: bool | None, expected: dict[str, Any]) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}]},
        {"role": "developer", "content": "Answer in French."},
    ]
    extra: dict[str, Any] = {"parallel_tool_calls": parallel} if parallel is not None else {}
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="claude-fake", messages=messages, temperature=1.6, top_p=0.9, stop=["###", "END"],
            tools=TOOLS, tool_choice=tool_choice, user="user-42", seed=7, **extra)
    assert completion.choices[0].message.content == CLAUDE_TEXT

    sent = live.anthropic.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.body == {
        "model": "claude-upstream-1",
        "system": "You are terse.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}],
        "max_tokens": 1000,  # claude-fake's max_output_tokens: the client gave none
        "temperature": 1.0,  # clamped to Anthropic's range
        "top_p": 0.9,
        "stop_sequences": ["###", "END"],
        "metadata": {"user_id": "user-42"},
        "tools": [{"name": "get_weather", "description": "Weather in a city", "input_schema": TOOLS[0][
            "function"]["parameters"]}],
        "tool_choice": expected,
        "stream": False,
    }
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers
    assert who.key not in json.dumps(sent.headers) + json.dumps(sent.body)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_the_clients_max_tokens_is_sent_and_a_cut_answer_finishes_with_length(live: Live, live_store,
                                                                                   field: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        completion = await client.chat.completions.create(model="claude-fake", messages=MESSAGES, **{field: 3})
    assert live.anthropic.requests[-1].body["max_tokens"] == 3
    assert completion.choices[0].message.content == "".join(WORDS[:3])
    assert completion.choices[0].finish_reason == "length"  # Anthropic's max_tokens
    await assert_charged(live, who, claude_cost(30, 3), prompt=30, completion=3)


@pytest.mark.parametrize(("field", "stream"), [(None, False), (None, True), ("max_tokens", False),
                                           ("max_completion_tokens", True)])
async def test_a_short_balance_lowers_the_upstream_max_tokens(live: Live, live_store, field: str | None,
                                                              stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "0.005")  # 5000 micro-USD: ~330 output tokens
    bound = tokens.prompt_bound({"messages": MESSAGES})
    # Neither the model's 1000-token default nor the client's 900 is affordable.
    assert worst_case_micro(CLAUDE_PRICE, bound, 900) > 5000
    asked = {field: 900} if field else {}
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", headers=auth(who.key),
            json={"model": "claude-fake", "messages": MESSAGES, "stream": stream, **asked}) as response:
        assert response.status == 200
        header = response.headers["x-apibox-max-tokens"]
        raw = await response.read()
    lowered = live.anthropic.requests[-1].body["max_tokens"]
    assert header == str(lowered)
    assert 16 <= lowered < 900
    assert worst_case_micro(CLAUDE_PRICE, bound, lowered) <= 5000 < worst_case_micro(CLAUDE_PRICE, bound, lowered + 1)
    if stream:
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(raw) if c["choices"]) == \
            CLAUDE_TEXT
    else:
        assert json.loads(raw)["choices"][0]["message"]["content"] == CLAUDE_TEXT
    await assert_charged(live, who, claude_cost(30, 7), prompt=30, completion=7, before=5000)


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}, None),
], ids=["n=2", "bad-arguments", "tiff-image"])
async def test_requests_anthropic_cannot_take_are_refused_before_the_upstream_and_cost_nothing(
        live: Live, live_store, extra: dict[str, Any], param: str | None) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**{"model": "claude-fake", "messages": MESSAGES, **extra})
    assert caught.value.param == param
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert live.anthropic.requests == []
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)


# -- tool calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_tool_call_round_trip(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.tool_name = "get_weather"
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        if stream:
            chunks = await stream_chunks(client, model="claude-fake", messages=messages, tools=TOOLS)
            text, calls, finish = streamed_text(chunks), streamed_calls(chunks), finish_reasons(chunks)
        else:
            choice = (await client.chat.completions.create(model="claude-fake", messages=messages,
                                                           tools=TOOLS)).choices[0]
            text, finish = choice.message.content, [choice.finish_reason]
            calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                     for t in choice.message.tool_calls]
        assert text == CLAUDE_TEXT
        assert finish == ["tool_calls"]
        assert len(calls) == 1
        assert (calls[0]["id"], calls[0]["name"]) == ("toolu_fake1", "get_weather")
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

        live.anthropic.tool_name = None  # the second turn answers in text
        messages += [
            {"role": "assistant", "content": text, "tool_calls": [
                {"id": calls[0]["id"], "type": "function",
                 "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "21C and sunny"},
        ]
        second = await client.chat.completions.create(model="claude-fake", messages=messages, tools=TOOLS)
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == (CLAUDE_TEXT, "stop")
    assert live.anthropic.requests[-1].body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": CLAUDE_TEXT},
            {"type": "tool_use", "id": "toolu_fake1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_fake1", "content": "21C and sunny"}]},
    ]
    rows = await wait_for_usage(live, who.user_id, 2)
    first_cost, second_cost = claude_cost(30, len(WORDS) + 10), claude_cost(30, len(WORDS))  # the fake adds 10
    assert [(r["completion_tokens"], r["charged"], r["status"]) for r in rows] == [
        (len(WORDS) + 10, first_cost, "ok"), (len(WORDS), second_cost, "ok")]
    assert charges(live, who.user_id) == [first_cost, second_cost]
    assert balance(live, who.user_id) == (1_000_000 - first_cost - second_cost, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("case", "finish"), [("end_turn", "stop"), ("max_tokens", "length"),
                                              ("tool_use", "tool_calls")])
async def test_stop_reasons_become_finish_reasons(live: Live, live_store, case: str, finish: str,
                                                  stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    params: dict[str, Any] = {"model": "claude-fake", "messages": MESSAGES}
    if case == "max_tokens":
        params["max_tokens"] = 2
    if case == "tool_use":
        live.anthropic.tool_name, params["tools"] = "get_weather", TOOLS
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        if stream:
            got = finish_reasons(await stream_chunks(client, **params))
        else:
            got = [(await client.chat.completions.create(**params)).choices[0].finish_reason]
    assert got == [finish]
    await wait_for_usage(live, who.user_id, 1)


# -- prompt caching -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_cache_reads_and_writes_are_reported_and_priced_at_their_own_rates(live: Live, live_store,
                                                                                 stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.cache_read, live.anthropic.cache_write = 1000, 200
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        if stream:
            chunks = await stream_chunks(client, model="claude-fake", messages=MESSAGES,
                                         stream_options={"include_usage": True})
            usage = chunks[-1].usage
        else:
            usage = (await client.chat.completions.create(model="claude-fake", messages=MESSAGES)).usage
    assert usage.prompt_tokens == 30 + 1000 + 200  # the whole prompt, as OpenAI clients expect
    assert usage.prompt_tokens_details.cached_tokens == 1000
    assert usage.model_dump()["prompt_tokens_details"]["cache_write_tokens"] == 200
    assert usage.completion_tokens == len(WORDS)
    assert usage.total_tokens == 1230 + len(WORDS)
    cost = claude_cost(30, len(WORDS), cache_read=1000, cache_write=200)
    assert cost == 1245  # 30 x $3 + 1000 x $0.30 + 200 x $3.75 + 7 x $15 per 1M
    assert cost != claude_cost(1230, len(WORDS))  # not the whole prompt at the input rate (3795)
    assert Decimal(str(usage.model_dump()["cost"])) == usd(cost)
    await assert_charged(live, who, cost, prompt=1230, completion=len(WORDS), cached=1000, cache_write=200)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_cache_writes_kept_an_hour_are_priced_at_twice_input(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.cache_write, live.anthropic.cache_write_1h = 1000, 600
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        if stream:
            await stream_chunks(client, model="claude-fake", messages=MESSAGES, stream_options={"include_usage": True})
        else:
            await client.chat.completions.create(model="claude-fake", messages=MESSAGES)
    cost = -(-(30 * INPUT + 400 * CACHE_WRITE + 600 * 2 * INPUT + len(WORDS) * OUTPUT) // 1_000_000)
    assert cost == 30 * 3 + 400 * 3.75 + 600 * 6 + 7 * 15 == 5_295  # micro-USD: the hour's 600 at $6 per 1M
    await assert_charged(live, who, cost, prompt=1030, completion=len(WORDS), cache_write=1000)


async def test_a_json_schema_reaches_anthropic_as_its_output_format(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        await client.chat.completions.create(model="claude-fake", messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}})
        assert live.anthropic.requests[-1].body["output_config"] == {"format": {"type": "json_schema",
                                                                                "schema": schema}}
        await client.responses.create(model="claude-fake", input=PROMPT, text={"format": {
            "type": "json_schema", "name": "A", "schema": schema, "strict": True}})
        assert live.anthropic.requests[-1].body["output_config"]["format"]["schema"] == schema
    await wait_for_usage(live, who.user_id, 2)


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_upstream_500_before_output_costs_nothing(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode, live.anthropic.status = "status", 500
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            if stream:
                await stream_chunks(client, model="claude-fake", messages=MESSAGES)
            else:
                await client.chat.completions.create(model="claude-fake", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.type == "server_error"
    assert len(live.anthropic.requests) == 1
    rows = usage_rows(live, who.user_id)
    assert [(r["status"], r["charged"], r["provider"]) for r in rows] == [("error", 0, "claude")]
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_anthropic_529_is_a_503_for_openai_clients(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode, live.anthropic.status = "status", 529
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", headers=auth(who.key),
            json={"model": "claude-fake", "messages": MESSAGES, "stream": stream}) as response:
        status, body = response.status, await response.json()
    assert status == 503
    assert set(body) == {"error"} and body["error"]["type"] == "server_error"
    assert "529" in body["error"]["message"]
    assert balance(live, who.user_id) == (1_000_000, 0)
    assert [r["status"] for r in usage_rows(live, who.user_id)] == ["error"]


@pytest.mark.parametrize("mode", ["cut", "error_event"])
async def test_a_stream_broken_mid_answer_charges_only_what_was_delivered(live: Live, live_store,
                                                                          mode: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode = mode
    chunks, error = await stream_until_error(live, who.key, "claude-fake", MESSAGES)
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks)  # never told the answer finished
    assert "incomplete" in str(error)
    delivered = "".join(delta_texts(chunks))
    assert delivered == "".join(WORDS[: len(WORDS) // 2])  # the fake broke off before word 3

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"], row["http_status"]) == ("cut", 1, 502)
    prompt = tokens.prompt_estimate({"model": "claude-fake", "messages": MESSAGES, "stream": True})
    completion = tokens.count_tokens(delivered)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    cost = claude_cost(prompt, completion)
    assert 0 < cost < claude_cost(30, len(WORDS))
    assert (row["cost"], row["charged"]) == (cost, cost)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1_000_000 - cost, 0)


@pytest.mark.parametrize("mode", ["cut", "error_event"])
async def test_a_broken_stream_ends_with_an_openai_error_event(live: Live, live_store, mode: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode = mode
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", headers=auth(who.key),
            json={"model": "claude-fake", "messages": MESSAGES, "stream": True,
                  "stream_options": {"include_usage": True}}) as response:
        assert response.status == 200
        raw = await response.read()
    assert b"[DONE]" not in raw
    events = sse_json(raw)
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert not any("usage" in e and e["usage"] for e in events)  # no usage chunk for a broken answer
    await wait_for_usage(live, who.user_id, 1)


async def test_an_upstream_that_ignores_max_tokens_is_cut_at_length(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode, live.anthropic.words = "overrun", [" word"] * 200  # one token each
    body = {"model": "claude-fake", "messages": MESSAGES, "max_tokens": 5}
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        chunks = await stream_chunks(client, **body, stream_options={"include_usage": True})
    assert live.anthropic.requests[-1].body["max_tokens"] == 5
    assert finish_reasons(chunks) == ["length"]
    assert 5 <= tokens.count_tokens(streamed_text(chunks)) < 200
    usage = chunks[-1].usage
    prompt = tokens.prompt_estimate({**body, "stream": True})
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, 5)  # never more than was paid for
    cost = claude_cost(prompt, 5)
    assert Decimal(str(usage.model_dump()["cost"])) == usd(cost)
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"], row["charged"]) == ("cut", 1, cost)
    assert charges(live, who.user_id) == [cost]


@pytest.mark.parametrize(("mode", "upstream_status", "stream"), [
    ("echo_key", 401, False), ("echo_key", 400, False), ("echo_key", 500, True), ("echo_key", 400, True),
    ("error_event", 200, True),
])
async def test_the_upstream_key_never_reaches_the_client_or_the_log(live: Live, live_store, caplog, mode: str,
                                                                    upstream_status: int, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode, live.anthropic.status = mode, upstream_status
    live.anthropic.error_message = f"invalid x-api-key {ANTHROPIC_KEY}"  # used by the mid-stream error event
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", headers=auth(who.key),
            json={"model": "claude-fake", "messages": MESSAGES, "stream": stream}) as response:
        status, headers, raw = response.status, dict(response.headers), (await response.read()).decode()
    assert live.anthropic.requests, "the upstream was called"
    assert status >= 400 or "error" in sse_json(raw.encode())[-1]
    assert "[redacted]" in raw or upstream_status == 401  # the message was kept, minus the key
    for leak in (ANTHROPIC_KEY, ANTHROPIC_KEY[:20], ANTHROPIC_KEY[-16:]):
        assert leak not in raw
        assert leak not in json.dumps(headers)
        assert leak not in caplog.text
    assert caplog.records, "the failure is logged"
    assert who.key not in caplog.text
    rows = await wait_for_usage(live, who.user_id, 1)
    assert rows[0]["status"] in ("error", "cut")
