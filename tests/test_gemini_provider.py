"""The Gemini provider end to end: official openai and anthropic SDKs -> apibox -> fake Gemini.

``gemini-fake`` routes to provider ``google`` (upstream model ``gemini-upstream-1``), priced at
input 0.3 / output 2.5 / cached input 0.075 USD per 1M tokens. Every billed call checks the money
three ways against ``ceil(sum(tokens_k * price_k) / 1e6)`` micro-USD computed here: the cost in
the response, the balance drop, and the ledger and usage rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict

from apibox import tokens
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_gemini import GEMINI_KEY, SIGNATURE, WORDS
from tests.gateway_helpers import (
    Account,
    account,
    answers_from_chunks,
    answers_from_completion,
    auth,
    balance,
    books,
    charges,
    delta_texts,
    openai_sdk_chat,
    sse_json,
    stream_until_error,
    usage_rows,
    wait_for_usage,
)
from tests.live_variants import openai_error

MODEL = "gemini-fake"
UPSTREAM_MODEL = "gemini-upstream-1"
RATES = (300_000, 2_500_000, 75_000)  # micro-USD per 1M: input, output (thoughts too), cached input
TEXT = "".join(WORDS)
PROMPT = "Say hi from Gemini"
MESSAGES = [{"role": "user", "content": PROMPT}]
UNARY_PATH = f"/v1beta/models/{UPSTREAM_MODEL}:generateContent"
STREAM_PATH = f"/v1beta/models/{UPSTREAM_MODEL}:streamGenerateContent?alt=sse"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def gemini_cost(prompt: int, completion: int, cached: int = 0) -> int:
    """ceil((uncached*in + cached*cached_in + completion*out) / 1e6); completion includes thoughts."""
    rate_in, rate_out, rate_cached = RATES
    return -(-((prompt - cached) * rate_in + cached * rate_cached + completion * rate_out) // 1_000_000)


DEFAULT_COST = gemini_cost(40, len(WORDS))  # the fake's default usage: 40 prompt, 4 candidates


def test_the_default_cost_by_hand() -> None:
    assert DEFAULT_COST == 22  # 40 x 0.3 + 4 x 2.5 = 22 micro-USD exactly
    assert gemini_cost(1234, 325, cached=1000) == 958  # 70.2 + 75 + 812.5 = 957.7, rounded up


async def settled(live: Live, who: Account, costs: list[int], *, before: int = 1_000_000) -> list[dict[str, Any]]:
    """The user paid exactly ``costs`` (one successful row each), and nothing stays held."""
    rows = await wait_for_usage(live, who.user_id, len(costs))
    assert len(rows) == len(costs)
    for row, cost in zip(rows, costs, strict=True):
        assert (row["status"], row["model"], row["provider"], row["estimated"]) == ("ok", MODEL, "google", 0)
        assert row["cost"] == row["charged"] == cost
    assert charges(live, who.user_id) == costs
    assert balance(live, who.user_id) == (before - sum(costs), 0)
    return rows


def assert_cost(usage: dict[str, Any], cost: int) -> None:
    assert Decimal(str(usage["cost"])) == Decimal(cost) / 1_000_000


# -- the openai SDK ---------------------------------------------------------------------------


@dataclass
class Reply:
    text: str
    finish: str | None
    usage: dict[str, Any] | None
    models: set[str]
    headers: dict[str, str]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[Any] = field(default_factory=list)


def _from_chunks(chunks: list[Any], headers: Any) -> Reply:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            entry = calls.setdefault(delta_call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta_call.id or entry["id"]
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
    usage = [c.usage.model_dump() for c in chunks if c.usage is not None]
    assert len(usage) <= 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return Reply("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), finish[-1] if finish else None,
                 usage[0] if usage else None, {c.model for c in chunks}, dict(headers),
                 [calls[i] for i in sorted(calls)], chunks)


def _from_completion(raw: Any) -> Reply:
    completion = raw.parse()
    message = completion.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]
    return Reply(message.content or "", completion.choices[0].finish_reason, completion.usage.model_dump(),
                 {completion.model}, dict(raw.headers), calls)


async def chat(live: Live, key: str, *, stream: bool, sdk: str = "async", include_usage: bool = True,
               messages: list[dict[str, Any]] | None = None, **extra: Any) -> Reply:
    """One chat completion on gemini-fake through the official openai SDK (sync in a thread, or async)."""
    params: dict[str, Any] = {"model": MODEL, "messages": messages or MESSAGES, **extra}
    if stream and include_usage:
        params["stream_options"] = {"include_usage": True}
    return await openai_sdk_chat(live, key, params, sdk=sdk, stream=stream, from_chunks=_from_chunks,
                                 from_completion=_from_completion)


@pytest.mark.parametrize("mode", ["whole", "stream_with_usage", "stream_without_usage"])
@pytest.mark.parametrize("sdk", ["sync", "async"])
async def test_text_through_the_openai_sdk_bills_exactly(live: Live, live_store, sdk: str, mode: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    stream = mode != "whole"
    reply = await chat(live, who.key, stream=stream, sdk=sdk, include_usage=mode == "stream_with_usage")

    assert reply.text == TEXT
    assert reply.finish == "stop"
    assert reply.models == {MODEL}
    assert reply.tool_calls == []
    (sent,) = live.gemini.requests
    assert sent.path == (STREAM_PATH if stream else UNARY_PATH)
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY
    assert who.key not in json.dumps(sent.headers) + json.dumps(sent.body)
    assert sent.body == {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
                         "generationConfig": {"maxOutputTokens": 1000}}  # the model's default answer length
    if mode == "stream_without_usage":
        assert reply.usage is None
        assert all(c.choices and c.usage is None for c in reply.chunks)  # no usage-only chunk
    else:
        assert reply.usage is not None
        assert (reply.usage["prompt_tokens"], reply.usage["completion_tokens"], reply.usage["total_tokens"]) == (
            40, len(WORDS), 40 + len(WORDS))
        assert_cost(reply.usage, DEFAULT_COST)
    rows = await settled(live, who, [DEFAULT_COST])
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (40, len(WORDS))
    assert rows[0]["request_id"] == reply.headers["x-request-id"]
    assert GEMINI_KEY not in json.dumps(reply.headers)


TRANSLATED = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]},
    {"role": "assistant", "content": "A cat."},
    {"role": "developer", "content": "Answer in Spanish."},
    {"role": "user", "content": "And its colour?"},
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_request_reaches_gemini_translated(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    reply = await chat(live, who.key, stream=stream, messages=TRANSLATED, max_tokens=77, temperature=0.3,
                       top_p=0.9, stop=["END"])
    assert reply.text == TEXT
    (sent,) = live.gemini.requests
    assert sent.path == (STREAM_PATH if stream else UNARY_PATH)
    assert sent.body == {
        "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Answer in Spanish."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What is in this picture?"},
                                       {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
            {"role": "model", "parts": [{"text": "A cat."}]},
            {"role": "user", "parts": [{"text": "And its colour?"}]},
        ],
        "generationConfig": {"maxOutputTokens": 77, "temperature": 0.3, "topP": 0.9, "stopSequences": ["END"]},
    }
    assert "x-apibox-max-tokens" not in reply.headers  # the asked-for length was affordable
    await settled(live, who, [DEFAULT_COST])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_short_balance_lowers_max_output_tokens(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "0.001")  # 1000 micro-USD: ~400 output tokens
    price = Price(input=RATES[0], output=RATES[1], cached_input=RATES[2])
    bound = tokens.prompt_bound({"messages": MESSAGES})
    assert worst_case_micro(price, bound, 1000) > 1000  # the model's 1000-token default is unaffordable

    reply = await chat(live, who.key, stream=stream)

    lowered = live.gemini.requests[-1].body["generationConfig"]["maxOutputTokens"]
    assert reply.headers["x-apibox-max-tokens"] == str(lowered)
    assert 16 <= lowered < 1000
    assert worst_case_micro(price, bound, lowered) <= 1000 < worst_case_micro(price, bound, lowered + 1)
    assert reply.text == TEXT
    await settled(live, who, [DEFAULT_COST], before=1000)


FINISH_CASES = {
    "stop": ({}, {}, "stop", TEXT, len(WORDS)),
    "length": ({}, {"max_tokens": 2}, "length", "".join(WORDS[:2]), 2),
    "content_filter": ({"finish_reason": "SAFETY"}, {}, "content_filter", TEXT, len(WORDS)),
    "tool_calls": ({"call_name": "get_weather"}, {"tools": [WEATHER]}, "tool_calls", TEXT, len(WORDS)),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(FINISH_CASES))
async def test_finish_reasons(live: Live, live_store, case: str, stream: bool) -> None:
    fake_setup, params, expected, text, completion = FINISH_CASES[case]
    for name, value in fake_setup.items():
        setattr(live.gemini, name, value)
    who = await account(live_store, live, "ann@example.com", "1")
    reply = await chat(live, who.key, stream=stream, **params)
    assert reply.finish == expected
    assert reply.text == text
    if case == "length":
        assert live.gemini.requests[-1].body["generationConfig"]["maxOutputTokens"] == 2
    if case == "tool_calls":
        assert [(c["name"], json.loads(c["arguments"])) for c in reply.tool_calls] == [
            ("get_weather", {"city": "Madrid"})]
    else:
        assert reply.tool_calls == []
    assert reply.usage is not None and reply.usage["completion_tokens"] == completion
    cost = gemini_cost(40, completion)
    assert_cost(reply.usage, cost)
    await settled(live, who, [cost])


@pytest.mark.parametrize("call_id", [None, "fc-7"], ids=["synthesized_id", "gemini_id"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_tool_call_round_trip_sends_the_thought_signature_back(live: Live, live_store, stream: bool,
                                                                     call_id: str | None) -> None:
    live.gemini.call_name, live.gemini.call_id = "get_weather", call_id
    who = await account(live_store, live, "ann@example.com", "1")
    question = [{"role": "user", "content": "Weather in Madrid?"}]

    first = await chat(live, who.key, stream=stream, messages=question, tools=[WEATHER], tool_choice="auto")

    assert first.finish == "tool_calls"
    (tool_call,) = first.tool_calls
    assert (tool_call["name"], json.loads(tool_call["arguments"])) == ("get_weather", {"city": "Madrid"})
    if call_id:
        assert tool_call["id"] == call_id  # Gemini's own id when it sends one
    else:
        assert tool_call["id"].startswith("call_") and len(tool_call["id"]) > len("call_")
    assert SIGNATURE not in json.dumps(first.tool_calls)  # the signature stays with apibox
    declared = live.gemini.requests[0].body
    assert declared["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather in a city",
        "parametersJsonSchema": WEATHER["function"]["parameters"]}]}]
    assert declared["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    live.gemini.call_name = None  # the model answers in words once it has the result
    history = [*question,
               {"role": "assistant", "content": first.text, "tool_calls": [
                   {"id": tool_call["id"], "type": "function",
                    "function": {"name": tool_call["name"], "arguments": tool_call["arguments"]}}]},
               {"role": "tool", "tool_call_id": tool_call["id"], "content": "{\"temp\": 21}"}]
    second = await chat(live, who.key, stream=stream, messages=history, tools=[WEATHER])

    assert (second.text, second.finish, second.tool_calls) == (TEXT, "stop", [])
    assert len(live.gemini.requests) == 2
    assert live.gemini.requests[1].body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Madrid?"}]},
        {"role": "model", "parts": [
            {"text": TEXT},
            {"functionCall": {"name": "get_weather", "args": {"city": "Madrid"}}, "thoughtSignature": SIGNATURE}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"output": {"temp": 21}}}}]},
    ]
    await settled(live, who, [DEFAULT_COST, DEFAULT_COST])


async def test_a_tool_call_id_apibox_never_issued_gets_the_placeholder_signature(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_from_elsewhere", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
               {"role": "tool", "tool_call_id": "call_from_elsewhere", "content": "cold"}]
    reply = await chat(live, who.key, stream=False, messages=history, tools=[WEATHER])
    assert reply.text == TEXT
    model_turn = live.gemini.requests[-1].body["contents"][1]
    assert model_turn == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
         "thoughtSignature": "skip_thought_signature_validator"}]}
    assert live.gemini.requests[-1].body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"output": "cold"}}}]
    await settled(live, who, [DEFAULT_COST])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_cached_and_thinking_tokens_are_reported_and_priced(live: Live, live_store, stream: bool) -> None:
    live.gemini.prompt_tokens, live.gemini.cached_tokens, live.gemini.thoughts_tokens = 1234, 1000, 321
    live.gemini.thought = "Thinking about how to greet"
    who = await account(live_store, live, "ann@example.com", "1")

    reply = await chat(live, who.key, stream=stream)

    assert reply.text == TEXT  # the thought summary is not part of the answer
    usage = reply.usage
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (1234, 325, 1559)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 1000
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 321
    cost = gemini_cost(1234, 4 + 321, cached=1000)
    assert cost == 958
    assert cost < gemini_cost(1234, 325)  # cached tokens are cheaper than fresh ones
    assert cost > gemini_cost(1234, 4, cached=1000)  # thoughts are billed as output
    assert_cost(usage, cost)
    (row,) = await settled(live, who, [cost])
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (
        1234, 325, 1000, 321)


# -- the anthropic SDK on /v1/messages --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_anthropic_sdk_reaches_gemini(live: Live, live_store, stream: bool) -> None:
    live.gemini.prompt_tokens, live.gemini.cached_tokens, live.gemini.thoughts_tokens = 1234, 1000, 321
    who = await account(live_store, live, "ann@example.com", "1")
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "system": "Be brief.", "stop_sequences": ["END"],
                              "messages": [{"role": "user", "content": PROMPT}],
                              "extra_body": {"temperature": 0.5}}  # this SDK no longer has the parameter
    async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as client:
        if stream:
            async with client.messages.stream(**params) as events:
                streamed = "".join([text async for text in events.text_stream])
                message = await events.get_final_message()
            assert streamed == TEXT
        else:
            message = await client.messages.create(**params)

    (sent,) = live.gemini.requests
    assert sent.path == (STREAM_PATH if stream else UNARY_PATH)
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY
    assert sent.body == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"maxOutputTokens": 100, "temperature": 0.5, "stopSequences": ["END"]},
    }
    assert message.model == MODEL
    assert [(b.type, b.text) for b in message.content] == [("text", TEXT)]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        234, 1000, 325)  # input_tokens is the uncached part, as Anthropic counts it
    await settled(live, who, [gemini_cost(1234, 325, cached=1000)])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_anthropic_tool_use_round_trips_through_gemini(live: Live, live_store, stream: bool) -> None:
    live.gemini.call_name = "get_weather"
    who = await account(live_store, live, "ann@example.com", "1")
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    question = {"role": "user", "content": "Weather in Madrid?"}

    async def ask(messages: list[dict[str, Any]]) -> Any:
        async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as client:
            params = {"model": MODEL, "max_tokens": 200, "tools": [tool], "messages": messages}
            if stream:
                async with client.messages.stream(**params) as events:
                    return await events.get_final_message()
            return await client.messages.create(**params)

    first = await ask([question])
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert (use.name, use.input) == ("get_weather", {"city": "Madrid"})

    live.gemini.call_name = None
    second = await ask([question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                      "content": "{\"temp\": 21}"}]}])
    assert [(b.type, b.text) for b in second.content] == [("text", TEXT)]
    contents = live.gemini.requests[1].body["contents"]
    assert contents[1]["role"] == "model"
    assert {"functionCall": {"name": "get_weather", "args": {"city": "Madrid"}},
            "thoughtSignature": SIGNATURE} in contents[1]["parts"]
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": {"temp": 21}}}}]}
    await settled(live, who, [DEFAULT_COST, DEFAULT_COST])


# -- errors -----------------------------------------------------------------------------------


async def post(live: Live, path: str, key: str, body: dict[str, Any]) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(f"{live.v1}{path}", json=body,
                                                                headers=auth(key)) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def assert_free_error(live: Live, who: Account, request_id: str) -> None:
    """A failure before any output: one error row, nothing charged, nothing held."""
    rows = usage_rows(live, who.user_id)
    assert [(r["status"], r["charged"], r["request_id"]) for r in rows] == [("error", 0, request_id)]
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("upstream", "expected"), [(500, 502), (503, 503)])
async def test_gemini_server_errors_are_5xx_and_cost_nothing(live: Live, live_store, upstream: int, expected: int,
                                                             stream: bool) -> None:
    live.gemini.mode, live.gemini.status = "status", upstream
    live.gemini.rpc_status = "INTERNAL" if upstream == 500 else "UNAVAILABLE"
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await post(live, "/chat/completions", who.key,
                                      {"model": MODEL, "messages": MESSAGES, "stream": stream})
    assert status == expected
    error = openai_error(raw)
    assert error["type"] == "server_error"
    assert str(upstream) in error["message"]
    assert len(live.gemini.requests) == 1
    assert_free_error(live, who, headers["x-request-id"])


async def test_the_sdk_sees_a_gemini_500_as_a_server_error(live: Live, live_store) -> None:
    live.gemini.mode, live.gemini.status = "status", 500
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 502
    assert_free_error(live, who, caught.value.response.headers["x-request-id"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_gemini_429_is_a_429(live: Live, live_store, stream: bool) -> None:
    live.gemini.mode, live.gemini.status, live.gemini.rpc_status = "status", 429, "RESOURCE_EXHAUSTED"
    live.gemini.error_message = "Quota exceeded for metric generate_content_requests"
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
    assert caught.value.status_code == 429
    assert "Quota exceeded" in caught.value.message
    assert caught.value.response.headers["Retry-After"] == "1"
    assert caught.value.response.headers.get("x-should-retry") != "false"
    assert_free_error(live, who, caught.value.response.headers["x-request-id"])


async def test_a_gemini_400_is_a_400_and_not_retried(live: Live, live_store) -> None:
    live.gemini.mode, live.gemini.status, live.gemini.rpc_status = "status", 400, "INVALID_ARGUMENT"
    live.gemini.error_message = "Invalid value at 'generation_config.temperature' (TYPE_FLOAT), 5"
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert "generation_config.temperature" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(live.gemini.requests) == 1  # neither apibox nor the SDK tried again
    assert live.gemini.requests[0].body["generationConfig"]["temperature"] == 5
    assert_free_error(live, who, caught.value.response.headers["x-request-id"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("upstream", [400, 429, 500])
async def test_the_gemini_key_never_reaches_a_client_or_the_log(live: Live, live_store, caplog, upstream: int,
                                                                stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    live.gemini.mode, live.gemini.status = "echo_key", upstream
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await post(live, "/chat/completions", who.key,
                                      {"model": MODEL, "messages": MESSAGES, "stream": stream})
    assert status == {400: 400, 429: 429, 500: 502}[upstream]
    message = openai_error(raw)["message"]
    assert "is bad" in message  # the upstream's message is passed on, cleaned
    assert GEMINI_KEY not in raw.decode() and GEMINI_KEY[:12] not in raw.decode()
    assert GEMINI_KEY not in json.dumps(list(headers.items()))
    async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert GEMINI_KEY not in caught.value.response.text and GEMINI_KEY not in str(caught.value)
    assert len(live.gemini.requests) == 2
    assert caplog.records, "the failure should be logged"
    assert GEMINI_KEY not in caplog.text
    assert who.key not in caplog.text
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)


@pytest.mark.parametrize(("mode", "says"), [("stream_error", "Internal error"),
                                            ("raw_error", "The model is overloaded")])  # (raw JSON, no data:)
async def test_a_gemini_error_mid_stream_is_cleaned_and_charged_by_estimate(live: Live, live_store, caplog,
                                                                            mode: str, says: str) -> None:
    caplog.set_level(logging.DEBUG)
    live.gemini.mode = mode
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await post(live, "/chat/completions", who.key,
                                {"model": MODEL, "messages": MESSAGES, "stream": True})
    assert status == 200
    events = sse_json(raw)
    assert set(events[-1]) == {"error"}
    assert says in events[-1]["error"]["message"]
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events[:-1])
    assert GEMINI_KEY not in raw.decode() and GEMINI_KEY not in caplog.text
    delivered = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert delivered == "".join(WORDS[:len(WORDS) // 2])
    (row,) = await wait_for_usage(live, who.user_id, 1)
    prompt = tokens.prompt_estimate({"messages": MESSAGES})
    assert (row["status"], row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (
        "cut", 1, prompt, tokens.count_tokens(delivered))
    cost = gemini_cost(prompt, tokens.count_tokens(delivered))
    assert row["charged"] == cost > 0
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1_000_000 - cost, 0)


@pytest.mark.parametrize(("path", "body", "says"), [
    ("/embeddings", {"model": MODEL, "input": "hello"}, "does not support /v1/embeddings"),
    ("/completions", {"model": MODEL, "prompt": "Once upon"}, "/v1/completions is not available on Gemini"),
])
async def test_embeddings_and_legacy_completions_on_gemini_are_a_clear_400(live: Live, live_store, path: str,
                                                                          body: dict[str, Any], says: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await post(live, path, who.key, body)
    assert status == 400
    error = openai_error(raw)
    assert error["type"] == "invalid_request_error"
    assert says in error["message"], error
    assert headers["x-should-retry"] == "false"
    assert live.gemini.requests == []  # Gemini was never asked
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError):
            if path == "/embeddings":
                await client.embeddings.create(model=MODEL, input="hello")
            else:
                await client.completions.create(model=MODEL, prompt="Once upon")
    assert live.gemini.requests == []


async def test_invalid_tool_arguments_are_refused_before_gemini(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = books(live)
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert "arguments" in caught.value.message
    assert live.gemini.requests == []
    after = books(live)
    assert after.balances == before.balances and after.ledger_rows == before.ledger_rows
    assert [(r["status"], r["charged"]) for r in usage_rows(live, who.user_id)] == [("error", 0)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_n_answers_are_gemini_candidates_each_a_choice_billed_together(live: Live, live_store,
                                                                             stream: bool) -> None:
    """``n`` asks Gemini for as many candidates, each answer's share of the hold its length; the
    SDK gets every candidate as a choice (streamed: their chunks interleaved, candidate 0 without
    an index, as Gemini writes it) and the charge is the usage of all."""
    who = await account(live_store, live, "ann@example.com", "1")
    params: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "n": 3, "max_tokens": 20}
    if stream:
        params["stream_options"] = {"include_usage": True}
    got = await openai_sdk_chat(live, who.key, params, sdk="async", stream=stream,
                                from_chunks=answers_from_chunks, from_completion=answers_from_completion)
    assert got.texts == dict.fromkeys(range(3), TEXT)
    assert got.finishes == dict.fromkeys(range(3), "stop")
    assert got.models == {MODEL}
    (sent,) = live.gemini.requests
    assert sent.body["generationConfig"] == {"maxOutputTokens": 20, "candidateCount": 3}
    assert (got.usage["prompt_tokens"], got.usage["completion_tokens"]) == (40, 3 * len(WORDS))
    cost = gemini_cost(40, 3 * len(WORDS))
    assert_cost(got.usage, cost)
    rows = await settled(live, who, [cost])
    assert (rows[0]["completion_tokens"], rows[0]["estimated"]) == (3 * len(WORDS), 0)


# -- a stream that never finishes ---------------------------------------------------------------


async def test_a_stream_without_finish_reason_is_an_error_and_charged_by_estimate(live: Live, live_store) -> None:
    live.gemini.mode = "no_finish"
    live.gemini.prompt_tokens = 500  # reported on every chunk, but never with a final count
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await post(live, "/chat/completions", who.key,
                                      {"model": MODEL, "messages": MESSAGES, "stream": True,
                                       "stream_options": {"include_usage": True}})
    assert status == 200  # the error comes in-band: the answer had started
    events = sse_json(raw)
    assert set(events[-1]) == {"error"}
    assert "incomplete" in events[-1]["error"]["message"]
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events[:-1])
    assert not any("usage" in e for e in events)
    delivered = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert delivered == TEXT

    (row,) = await wait_for_usage(live, who.user_id, 1)
    prompt = tokens.prompt_estimate({"messages": MESSAGES})
    completion = tokens.count_tokens(delivered)
    assert (row["status"], row["http_status"], row["estimated"]) == ("cut", 502, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["request_id"] == headers["x-request-id"]
    cost = gemini_cost(prompt, completion)
    assert row["charged"] == row["cost"] == cost > 0
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1_000_000 - cost, 0)


async def test_the_sdk_raises_on_a_stream_without_finish_reason(live: Live, live_store) -> None:
    live.gemini.mode = "no_finish"
    who = await account(live_store, live, "ann@example.com", "1")
    chunks, error = await stream_until_error(live, who.key, MODEL, MESSAGES)
    assert "incomplete" in str(error)
    assert "".join(delta_texts(chunks)) == TEXT
    (row,) = await wait_for_usage(live, who.user_id, 1)
    cost = gemini_cost(tokens.prompt_estimate({"messages": MESSAGES}), tokens.count_tokens(TEXT))
    assert (row["status"], row["estimated"], row["charged"]) == ("cut", 1, cost)
    assert charges(live, who.user_id) == [cost]
