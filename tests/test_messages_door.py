"""Anthropic clients on ``POST /v1/messages``: pass-through to Anthropic, translation to the rest.

The official ``anthropic`` SDK talks to the live gateway. On ``claude-fake`` the request and
the stream must reach the client as Anthropic sent them (only the model name changes); on
``gpt-fake``, ``demo`` and ``gemini-fake`` they are translated (PROTOCOLS.md 4.7, 4.8). Every
billed call checks the money: the charge is ``ceil(sum(tokens_k * price_k) / 1e6)`` micro-USD
at the model's prices and must match the ledger, the usage row and the balance drop. Every
refusal is in Anthropic's error shape and leaves the books untouched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from multidict import CIMultiDict

from apibox import accounts, tokens
from apibox.formats.anthropic import anthropic_to_openai_request
from apibox.models import UserState
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_anthropic import ANTHROPIC_KEY
from tests.fake_anthropic import WORDS as CLAUDE_WORDS
from tests.fake_gemini import WORDS as GEMINI_WORDS
from tests.fake_upstream import UPSTREAM_KEY, FakeUpstream
from tests.fake_upstream import WORDS as GPT_WORDS
from tests.gateway_helpers import (
    Account,
    account,
    balance,
    books,
    charges,
    usage_rows,
    wait_for_usage,
)

PROMPT = "Say hello in French"
MESSAGES = [{"role": "user", "content": PROMPT}]
CLAUDE_TEXT = "".join(CLAUDE_WORDS)
# Micro-USD per 1M tokens: input, output, cached input, cache write.
PRICES = {
    "claude-fake": (3_000_000, 15_000_000, 300_000, 3_750_000, 6_000_000),  # and an hour's write: twice input
    "gpt-fake": (2_500_000, 10_000_000, 1_250_000, 2_500_000),
    "demo": (5_000_000, 15_000_000, 5_000_000, 5_000_000),
    "gemini-fake": (300_000, 2_500_000, 75_000, 300_000),
}
PROVIDERS = {"claude-fake": "claude", "gpt-fake": "fake", "demo": "echo", "gemini-fake": "google"}
RAW_EVENTS = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
              "message_stop"}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def cost_of(model: str, input_tokens: int, output: int, cache_read: int = 0, cache_write: int = 0) -> int:
    """Anthropic-convention usage (input excludes the cache) at ``model``'s prices, rounded up once."""
    rate_in, rate_out, rate_read, rate_write = PRICES[model][:4]
    scaled = input_tokens * rate_in + output * rate_out + cache_read * rate_read + cache_write * rate_write
    return -(-scaled // 1_000_000)


def client(live: Live, key: str, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=live.url, api_key=key, max_retries=0, **options)


async def assert_charged(live: Live, who: Account, model: str, usage: Any, *, before: int = 1_000_000) -> int:
    """The client's reported usage is what was charged, exactly, in every place it shows."""
    read = usage.cache_read_input_tokens or 0
    write = usage.cache_creation_input_tokens or 0
    cost = cost_of(model, usage.input_tokens, usage.output_tokens, read, write)
    assert cost > 0
    rows = await wait_for_usage(live, who.user_id, 1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["provider"], row["status"], row["estimated"]) == (model, PROVIDERS[model], "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (
        usage.input_tokens + read + write, usage.output_tokens, read, write)
    assert (row["cost"], row["charged"]) == (cost, cost)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (before - cost, 0)
    return cost


async def post(live: Live, path: str, body: Any, headers: dict[str, str]) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.url}{path}", data=body if isinstance(body, bytes) else json.dumps(body),
            headers={"Content-Type": "application/json", **headers}) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def sse_frames(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, JSON data) for every SSE frame of an Anthropic-format stream."""
    frames = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        names = [line[6:].strip() for line in lines if line.startswith("event:")]
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        if data:
            frames.append((names[0] if names else None, json.loads("\n".join(data))))
    return frames


def anthropic_error(raw: bytes, kind: str, headers: CIMultiDict[str]) -> str:
    body = json.loads(raw)
    assert set(body) == {"type", "error", "request_id"}, body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind
    assert body["request_id"] == headers["x-request-id"] and body["request_id"].startswith("req_")
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


# -- pass-through to an Anthropic route ----------------------------------------------------


async def test_a_whole_message_passes_through_faithfully(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    params: dict[str, Any] = {
        "model": "claude-fake", "max_tokens": 200, "stop_sequences": ["###"], "output_config": {"effort": "low"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]},
                     {"role": "assistant", "content": "Bonjour"}],  # a prefill
        "metadata": {"user_id": "u-1"},
    }
    betas = "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"
    async with client(live, who.key) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            **params, extra_headers={"anthropic-beta": betas}, extra_body={"temperature": 0.4, "top_k": 5})
        message = await raw.parse()
        version = sdk.default_headers["anthropic-version"]

    sent = live.anthropic.requests[-1]
    assert sent.path == "/v1/messages"
    # The client's body as it was (fields apibox does not know included), for the upstream's model.
    assert sent.body == {**params, "model": "claude-upstream-1", "temperature": 0.4, "top_k": 5, "stream": False}
    assert sent.headers["anthropic-beta"] == betas
    assert sent.headers["anthropic-version"] == version
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert "Authorization" not in sent.headers
    assert who.key not in json.dumps(sent.headers) + json.dumps(sent.body)

    assert message.to_dict() == {
        "id": "msg_fake1", "type": "message", "role": "assistant", "model": "claude-fake",
        "content": [{"type": "text", "text": CLAUDE_TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 7,
                  "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}}
    assert raw.headers["x-request-id"] == usage_rows(live, who.user_id)[0]["request_id"]
    assert await assert_charged(live, who, "claude-fake", message.usage) == 195  # 30 x $3 + 7 x $15 per 1M


@pytest.mark.parametrize("how", ["sdk-betas", "capitalised-header"])
async def test_betas_reach_the_upstream_however_they_are_sent(live: Live, live_store, how: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    if how == "sdk-betas":  # client.beta.messages
        async with client(live, who.key) as sdk:
            message = await sdk.beta.messages.create(model="claude-fake", max_tokens=50, messages=MESSAGES,
                                                     betas=["token-efficient-tools-2025-02-19", "b2"])
        assert message.content[0].text == CLAUDE_TEXT
    else:  # header names are case-insensitive; the beta surface's query string is ignored
        status, _, _ = await post(live, "/v1/messages?beta=true", {"model": "claude-fake", "max_tokens": 50,
                                                         "messages": MESSAGES},
                                  {"x-api-key": who.key, "Anthropic-Beta": "token-efficient-tools-2025-02-19,b2",
                                   "Anthropic-Version": "2023-06-01"})
        assert status == 200
    sent = live.anthropic.requests[-1].headers
    assert sent["anthropic-beta"] == "token-efficient-tools-2025-02-19,b2"
    await wait_for_usage(live, who.user_id, 1)


async def test_a_stream_passes_through_event_for_event(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        stream = await sdk.messages.create(model="claude-fake", max_tokens=100, messages=MESSAGES, stream=True)
        events = [e async for e in stream]
    sent = [(name, data) for name, data in live.anthropic.sent if name != "ping"]
    assert [e.type for e in events] == [name for name, _ in sent]
    assert [e.type for e in events] == ["message_start", "content_block_start", *["content_block_delta"] * 7,
                                        "content_block_stop", "message_delta", "message_stop"]
    # Each event's data as the upstream sent it, but for the model's name.
    expected = json.loads(json.dumps([data for _, data in sent]))
    expected[0]["message"]["model"] = "claude-fake"
    assert [e.to_dict() for e in events] == expected
    assert live.anthropic.requests[-1].body == {"model": "claude-upstream-1", "max_tokens": 100,
                                                "messages": MESSAGES, "stream": True}
    assert await assert_charged(live, who, "claude-fake", anthropic.types.Usage(input_tokens=30, output_tokens=7)) \
        == 195


async def test_a_streamed_final_message_carries_the_usage_that_was_charged(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.cache_read, live.anthropic.cache_write = 1000, 200
    async with client(live, who.key) as sdk, sdk.messages.stream(model="claude-fake", max_tokens=100,
                                                                 messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == CLAUDE_TEXT
    assert (final.model, final.stop_reason) == ("claude-fake", "end_turn")
    usage = final.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.output_tokens) == (30, 1000, 200, 7)
    # Each token class at its own rate: 30 x $3 + 1000 x $0.30 + 200 x $3.75 + 7 x $15 per 1M.
    assert await assert_charged(live, who, "claude-fake", usage) == 1245


@pytest.mark.parametrize("how", ["x-api-key", "bearer", "sdk-auth-token"])
async def test_both_auth_headers_are_accepted(live: Live, live_store, how: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES}
    if how == "sdk-auth-token":
        async with anthropic.AsyncAnthropic(base_url=live.url, auth_token=who.key, max_retries=0) as sdk:
            message = await sdk.messages.create(**body)
        usage = message.usage
    else:
        headers = {"x-api-key": who.key} if how == "x-api-key" else {"Authorization": f"Bearer {who.key}"}
        status, _, raw = await post(live, "/v1/messages", body, {**headers, "anthropic-version": "2023-06-01"})
        assert status == 200, raw
        usage = anthropic.types.Message.model_validate(json.loads(raw)).usage
    assert await assert_charged(live, who, "claude-fake", usage) == 195


async def test_count_tokens_is_forwarded_to_anthropic_and_free(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.count = 1234
    before = books(live)
    params: dict[str, Any] = {"model": "claude-fake", "messages": MESSAGES, "system": "Be brief.",
                              "tools": [WEATHER_TOOL]}
    async with client(live, who.key) as sdk:
        counted = await sdk.messages.count_tokens(**params, extra_headers={"anthropic-beta": "b1"})
    assert counted.input_tokens == 1234
    sent = live.anthropic.requests[-1]
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.body == {**params, "model": "claude-upstream-1"}
    assert (sent.headers["x-api-key"], sent.headers["anthropic-beta"]) == (ANTHROPIC_KEY, "b1")
    assert books(live) == before  # no hold, no charge, no usage row


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_short_balance_lowers_max_tokens_on_the_pass_through(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "0.005")
    body = {"model": "claude-fake", "max_tokens": 1000, "messages": MESSAGES, "stream": stream}
    price = Price(*PRICES["claude-fake"])
    bound = tokens.prompt_bound(anthropic_to_openai_request(body))
    status, headers, raw = await post(live, "/v1/messages", body, {"x-api-key": who.key})
    assert status == 200
    lowered = live.anthropic.requests[-1].body["max_tokens"]
    assert headers["x-apibox-max-tokens"] == str(lowered)
    assert 16 <= lowered < 1000
    assert worst_case_micro(price, bound, lowered) <= 5000 < worst_case_micro(price, bound, lowered + 1)
    if stream:
        assert [name for name, _ in sse_frames(raw)][-1] == "message_stop"
    else:
        assert json.loads(raw)["content"][0]["text"] == CLAUDE_TEXT
    await assert_charged(live, who, "claude-fake", anthropic.types.Usage(input_tokens=30, output_tokens=7),
                         before=5000)


# -- translated routes ---------------------------------------------------------------------

EXPECTED_TEXT = {"gpt-fake": "".join(GPT_WORDS), "demo": f"Echo: {PROMPT}", "gemini-fake": "".join(GEMINI_WORDS)}


async def ask(sdk: anthropic.AsyncAnthropic, stream: bool, **params: Any) -> tuple[Any, list[str]]:
    """The final message, and the raw event types when streamed."""
    if not stream:
        return await sdk.messages.create(**params), []
    async with sdk.messages.stream(**params) as events:
        types = [e.type async for e in events if e.type in RAW_EVENTS]
        return await events.get_final_message(), types


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["gpt-fake", "demo", "gemini-fake"])
async def test_text_from_other_routes_is_translated_and_billed_exactly(live: Live, live_store, model: str,
                                                                       stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        message, types = await ask(sdk, stream, model=model, max_tokens=200, system="Be brief.",
                                   messages=MESSAGES)
    assert message.id.startswith("msg_")
    assert (message.type, message.role, message.model) == ("message", "assistant", model)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == EXPECTED_TEXT[model]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    if stream:
        assert types == ["message_start", "content_block_start", *["content_block_delta"] * (len(types) - 5),
                         "content_block_stop", "message_delta", "message_stop"]
        assert len(types) > 5
    usage = message.usage
    if model == "gpt-fake":
        assert (usage.input_tokens, usage.output_tokens) == (21, len(GPT_WORDS))
        sent = live.fake.requests[-1].body
        assert sent["model"] == "fake-model-1"
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *MESSAGES]
        assert sent["max_tokens"] == 200
        assert sent.get("stream_options") == ({"include_usage": True} if stream else None)
    elif model == "gemini-fake":
        assert (usage.input_tokens, usage.output_tokens) == (40, len(GEMINI_WORDS))
        assert live.gemini.requests, "the Gemini upstream was called"
    else:
        assert usage.input_tokens > 0 and usage.output_tokens == tokens.count_tokens(EXPECTED_TEXT["demo"])
    await assert_charged(live, who, model, usage)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_reasoning_model_that_refuses_max_tokens_gets_the_limit_as_max_completion_tokens(
        live: Live, live_store, stream: bool) -> None:
    """Claude Code on a route to OpenAI's o-series or gpt-5: their API refuses ``max_tokens``
    (400), so the required limit of an Anthropic request goes in ``max_completion_tokens``."""
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        message, _ = await ask(sdk, stream, model="o-fake", max_tokens=200, messages=MESSAGES)
    assert message.content[0].text == "".join(GPT_WORDS)
    sent = live.fake.requests[-1].body
    assert sent["model"].startswith("o-reasoner") and "max_tokens" not in sent
    assert sent["max_completion_tokens"] == 200
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, len(GPT_WORDS))
    cost = -(-(21 * 2_000_000 + len(GPT_WORDS) * 8_000_000) // 1_000_000)  # o-fake: $2 in, $8 out
    assert charges(live, who.user_id) == [cost]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["gpt-fake", "demo", "gemini-fake"])
async def test_a_length_cut_is_max_tokens_on_other_routes(live: Live, live_store, model: str, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        message, _ = await ask(sdk, stream, model=model, max_tokens=2, messages=MESSAGES)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2
    await assert_charged(live, who, model, message.usage)


@dataclass
class ToolCallingUpstream(FakeUpstream):
    """An OpenAI upstream that answers every chat request with one get_weather call."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        head = {"id": "chatcmpl-tool", "created": 1, "model": body["model"]}
        call = {"id": "call_xyz", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        usage = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
        if not body.get("stream"):
            return web.json_response({**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
                 "logprobs": None, "finish_reason": "tool_calls"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = [
            {"role": "assistant", "content": "Checking."},
            {"tool_calls": [{"index": 0, "id": "call_xyz", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        ]
        events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
                   {"choices": [], "usage": usage}]
        for event in events:
            await self._write(response, b"data: " + json.dumps({**head, "object": "chat.completion.chunk",
                                                                **event}).encode() + b"\n\n")
        await self._write(response, b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class TestToolCallsOnOtherRoutes:
    @pytest.fixture
    def fake(self) -> ToolCallingUpstream:
        return ToolCallingUpstream()

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
    async def test_an_openai_tool_call_becomes_a_tool_use_block(self, live: Live, live_store, stream: bool) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        async with client(live, who.key) as sdk:
            message, types = await ask(sdk, stream, model="gpt-fake", max_tokens=200, messages=MESSAGES,
                                       tools=[WEATHER_TOOL], tool_choice={"type": "any",
                                                                          "disable_parallel_tool_use": True})
            sent = live.fake.requests[-1].body
            assert sent["tools"] == [{"type": "function", "function": {
                "name": "get_weather", "description": "Weather in a city",
                "parameters": WEATHER_TOOL["input_schema"]}}]
            assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)
            assert message.stop_reason == "tool_use"
            assert [b.type for b in message.content] == ["text", "tool_use"]
            assert message.content[0].text == "Checking."
            use = message.content[1]
            assert (use.id, use.name, use.input) == ("call_xyz", "get_weather", {"city": "Paris"})
            if stream:
                assert types == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                 "content_block_start", "content_block_delta", "content_block_delta",
                                 "content_block_stop", "message_delta", "message_stop"]
            assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 12)
            await assert_charged(live, who, "gpt-fake", message.usage)

            # The result goes back as an OpenAI tool message after the assistant's tool call.
            await sdk.messages.create(model="gpt-fake", max_tokens=200, tools=[WEATHER_TOOL], messages=[
                *MESSAGES,
                {"role": "assistant", "content": [b.to_dict() for b in message.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_xyz", "content": "21C"}]},
            ])
        assert live.fake.requests[-1].body["messages"] == [
            *MESSAGES,
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_xyz", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "call_xyz", "content": "21C"},
        ]
        assert len(await wait_for_usage(live, who.user_id, 2)) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_gemini_function_call_becomes_a_tool_use_block(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.gemini.call_name = "get_weather"
    async with client(live, who.key) as sdk:
        message, _ = await ask(sdk, stream, model="gemini-fake", max_tokens=200, messages=MESSAGES,
                               tools=[WEATHER_TOOL])
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert len(uses) == 1
    assert (uses[0].name, uses[0].input) == ("get_weather", {"city": "Madrid"})
    assert uses[0].id
    assert "".join(b.text for b in message.content if b.type == "text") == "".join(GEMINI_WORDS)
    await assert_charged(live, who, "gemini-fake", message.usage)


@pytest.mark.parametrize("model", ["gpt-fake", "demo", "gemini-fake"])
async def test_count_tokens_elsewhere_is_apiboxs_estimate_and_free(live: Live, live_store, model: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = books(live)
    params: dict[str, Any] = {"model": model, "system": "Be brief.", "tools": [WEATHER_TOOL],
                              "messages": [*MESSAGES, {"role": "assistant", "content": "Bonjour"},
                                           {"role": "user", "content": "And in Spanish, please?"}]}
    async with client(live, who.key) as sdk:
        counted = await sdk.messages.count_tokens(**params)
    assert counted.input_tokens == tokens.prompt_estimate(anthropic_to_openai_request(params))
    assert counted.input_tokens > tokens.prompt_estimate(anthropic_to_openai_request({**params, "tools": None}))
    assert live.fake.requests == [] and live.gemini.requests == [] and live.anthropic.requests == []
    assert books(live) == before


# -- errors in Anthropic's shape -----------------------------------------------------------

GOOD = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES}
BAD_BODIES: dict[str, tuple[Any, int, str]] = {
    "unknown model": ({**GOOD, "model": "claude-nope"}, 404, "not_found_error"),
    "missing model": ({k: v for k, v in GOOD.items() if k != "model"}, 400, "invalid_request_error"),
    "missing max_tokens": ({k: v for k, v in GOOD.items() if k != "max_tokens"}, 400, "invalid_request_error"),
    "zero max_tokens": ({**GOOD, "max_tokens": 0}, 400, "invalid_request_error"),
    "string max_tokens": ({**GOOD, "max_tokens": "100"}, 400, "invalid_request_error"),
    "missing messages": ({"model": "claude-fake", "max_tokens": 100}, 400, "invalid_request_error"),
    "empty messages": ({**GOOD, "messages": []}, 400, "invalid_request_error"),
    "system role in messages": ({**GOOD, "messages": [{"role": "system", "content": "x"}]}, 400,
                                "invalid_request_error"),
    "content not text or blocks": ({**GOOD, "messages": [{"role": "user", "content": 7}]}, 400,
                                   "invalid_request_error"),
    "block not an object": ({**GOOD, "messages": [{"role": "user", "content": ["hi"]}]}, 400,
                            "invalid_request_error"),
    "system not text": ({**GOOD, "system": 5}, 400, "invalid_request_error"),
    "string stream": ({**GOOD, "stream": "yes"}, 400, "invalid_request_error"),
    "malformed json": (b'{"model": "claude-fake", "messages": [', 400, "invalid_request_error"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_requests_are_refused_in_anthropics_shape_and_change_nothing(live: Live, live_store,
                                                                              case: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body, status, kind = BAD_BODIES[case]
    before = books(live)
    got, headers, raw = await post(live, "/v1/messages", body, {"x-api-key": who.key})
    assert got == status
    message = anthropic_error(raw, kind, headers)
    if "max_tokens" in case:
        assert "max_tokens" in message
    assert headers["x-should-retry"] == "false"
    assert live.anthropic.requests == []
    assert books(live) == before


REFUSALS = [("no key", 401, "authentication_error"), ("unknown key", 401, "authentication_error"),
            ("key scoped to other models", 403, "permission_error"), ("unknown model", 404, "not_found_error")]


@pytest.mark.parametrize(("path", "case", "status", "kind"), [
    *[("/v1/messages", *refusal) for refusal in REFUSALS],
    ("/v1/messages", "no balance", 402, "billing_error"),
    ("/v1/messages", "no balance, streamed", 402, "billing_error"),
    *[("/v1/messages/count_tokens", *refusal) for refusal in REFUSALS],
])
async def test_refused_callers_get_anthropic_errors_and_change_nothing(live: Live, live_store, path: str, case: str,
                                                                      status: int, kind: str) -> None:
    usd = "0" if case.startswith("no balance") else "1"
    options = {"models": ("demo",)} if case == "key scoped to other models" else {}
    who = await account(live_store, live, "ann@example.com", usd, **options)
    headers = {} if case == "no key" else {"x-api-key": "sk-wrong-key" if case == "unknown key" else who.key}
    body = {**GOOD, "model": "claude-nope"} if case == "unknown model" else GOOD
    if case.endswith("streamed"):
        body = {**body, "stream": True}
    before = books(live)
    got, response_headers, raw = await post(live, path, body, headers)
    assert got == status
    anthropic_error(raw, kind, response_headers)
    assert response_headers["x-should-retry"] == "false"
    assert live.anthropic.requests == []
    assert books(live) == before


async def test_counting_tokens_needs_no_balance(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "0")
    before = books(live)
    async with client(live, who.key) as sdk:
        counted = await sdk.messages.count_tokens(model="claude-fake", messages=MESSAGES)
    assert counted.input_tokens == live.anthropic.count
    assert books(live) == before


@pytest.mark.parametrize(("case", "error_class", "status"), [
    ("unknown key", anthropic.AuthenticationError, 401),
    ("no balance", anthropic.PaymentRequiredError, 402),
    ("scoped key", anthropic.PermissionDeniedError, 403),
    ("unknown model", anthropic.NotFoundError, 404),
    ("system role", anthropic.BadRequestError, 400),
])
async def test_the_sdk_raises_the_matching_exception(live: Live, live_store, case: str,
                                                     error_class: type[anthropic.APIStatusError],
                                                     status: int) -> None:
    options = {"models": ("demo",)} if case == "scoped key" else {}
    who = await account(live_store, live, "ann@example.com", "0" if case == "no balance" else "1", **options)
    params: dict[str, Any] = dict(GOOD)
    if case == "unknown model":
        params["model"] = "claude-nope"
    if case == "system role":
        params["messages"] = [{"role": "system", "content": "x"}]
    before = books(live)
    # max_retries=2: a refusal that retrying cannot fix must not be retried (x-should-retry: false).
    async with anthropic.AsyncAnthropic(base_url=live.url, api_key="sk-bad" if case == "unknown key" else who.key,
                                        max_retries=2) as sdk:
        with pytest.raises(error_class) as caught:
            await sdk.messages.create(**params)
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert books(live) == before


# -- upstream failures ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("upstream_status", "status", "kind", "error_class"), [
    (500, 502, "api_error", anthropic.InternalServerError),
    (529, 503, "overloaded_error", anthropic.ServiceUnavailableError),
])
async def test_an_upstream_failure_before_output_costs_nothing(live: Live, live_store, stream: bool,
                                                               upstream_status: int, status: int, kind: str,
                                                               error_class: type[anthropic.APIStatusError]) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode, live.anthropic.status = "status", upstream_status
    async with client(live, who.key) as sdk:
        with pytest.raises(error_class) as caught:
            if stream:
                async with sdk.messages.stream(**GOOD) as events:
                    [e async for e in events]
            else:
                await sdk.messages.create(**GOOD)
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == kind
    assert len(live.anthropic.requests) == 1
    assert [(r["status"], r["charged"]) for r in usage_rows(live, who.user_id)] == [("error", 0)]
    assert charges(live, who.user_id) == []
    assert balance(live, who.user_id) == (1_000_000, 0)


@pytest.mark.parametrize(("model", "mode"), [("claude-fake", "cut"), ("claude-fake", "error_event"),
                                             ("gpt-fake", "cut")])
async def test_a_stream_broken_mid_answer_ends_with_an_error_event_and_charges_what_was_delivered(
        live: Live, live_store, model: str, mode: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode = live.fake.mode = mode
    body = {"model": model, "max_tokens": 100, "messages": MESSAGES, "stream": True}

    status, _, raw = await post(live, "/v1/messages", body, {"x-api-key": who.key})
    assert status == 200  # the failure is reported in-band
    frames = sse_frames(raw)
    name, error = frames[-1]
    assert name == "error"
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert error["error"]["message"].endswith(". The answer is incomplete.")
    assert ".." not in error["error"]["message"] and " The" in error["error"]["message"]
    names = [n for n, _ in frames[:-1]]
    assert "message_stop" not in names and "message_delta" not in names  # never told it finished
    delivered = "".join(d["delta"].get("text", "") for n, d in frames if n == "content_block_delta")
    words = CLAUDE_WORDS if model == "claude-fake" else GPT_WORDS
    assert 0 < len(delivered) < len("".join(words))
    if model == "claude-fake":
        assert [(n, d) for n, d in frames[1:-1]] == [(n, d) for n, d in live.anthropic.sent[1:] if n != "ping"][
            : len(frames) - 2]

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"], row["http_status"]) == ("cut", 1, 502)
    # Anthropic reports the prompt at the stream's start: that is charged, not apibox's estimate.
    prompt = (live.anthropic.input_tokens if model == "claude-fake"
              else tokens.prompt_estimate(anthropic_to_openai_request(body)))
    completion = tokens.count_tokens(delivered)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    cost = cost_of(model, prompt, completion)
    assert (row["cost"], row["charged"]) == (cost, cost)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1_000_000 - cost, 0)

    # The SDK raises on the error event instead of returning a truncated message.
    async with client(live, who.key) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with sdk.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as events:
                [e async for e in events]
    assert "incomplete" in str(caught.value)
    await wait_for_usage(live, who.user_id, 2)


@pytest.mark.parametrize("model", ["claude-fake", "gpt-fake"])
async def test_an_upstream_that_ignores_max_tokens_is_cut_and_reports_what_was_charged(live: Live, live_store,
                                                                                      model: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode = live.fake.mode = "overrun"
    live.anthropic.words = live.fake.words = [" word"] * 200  # one token each
    body = {"model": model, "max_tokens": 5, "messages": MESSAGES}
    async with client(live, who.key) as sdk, sdk.messages.stream(**body) as stream:
        types = [e.type async for e in stream if e.type in RAW_EVENTS]
        final = await stream.get_final_message()
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]  # a well-formed ending
    assert final.stop_reason == "max_tokens"
    delivered = final.content[0].text
    assert 5 <= tokens.count_tokens(delivered) < 200  # stopped long before the upstream's 200 words

    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["status"], row["estimated"]) == ("cut", 1)
    prompt = (live.anthropic.input_tokens if model == "claude-fake"  # reported at the stream's start
              else tokens.prompt_estimate(anthropic_to_openai_request(body)))
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 5)  # never more than was paid for
    cost = cost_of(model, prompt, 5)
    assert (row["cost"], row["charged"]) == (cost, cost)
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (1_000_000 - cost, 0)
    # The final message's usage is what was charged.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt, 5)


@pytest.mark.parametrize(("model", "mode", "upstream_status", "stream"), [
    ("claude-fake", "echo_key", 401, False), ("claude-fake", "echo_key", 400, False),
    ("claude-fake", "echo_key", 500, True), ("claude-fake", "error_event", 200, True),
    ("gpt-fake", "echo_key", 400, True),
])
async def test_the_upstream_key_never_reaches_the_client_or_the_log(live: Live, live_store, caplog, model: str,
                                                                    mode: str, upstream_status: int,
                                                                    stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.mode = live.fake.mode = mode
    live.anthropic.status = live.fake.status = upstream_status
    live.anthropic.error_message = f"invalid x-api-key {ANTHROPIC_KEY}"
    status, headers, raw = await post(live, "/v1/messages", {**GOOD, "model": model, "stream": stream},
                                      {"x-api-key": who.key})
    assert status >= 400 or sse_frames(raw)[-1][0] == "error"
    assert live.anthropic.requests or live.fake.requests, "the upstream was called"
    text = raw.decode()
    for secret in (ANTHROPIC_KEY, ANTHROPIC_KEY[:20], UPSTREAM_KEY, UPSTREAM_KEY[:20]):
        assert secret not in text
        assert secret not in json.dumps(list(headers.items()))
        assert secret not in caplog.text
    assert caplog.records, "the failure is logged"
    assert who.key not in caplog.text
    await wait_for_usage(live, who.user_id, 1)


async def test_a_suspended_user_gets_a_permission_error(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    await accounts.set_user_state(live_store, who.email, UserState.SUSPENDED, reason="unpaid invoice")
    before = books(live)
    status, headers, raw = await post(live, "/v1/messages", GOOD, {"x-api-key": who.key})
    assert status == 403
    assert "unpaid invoice" in anthropic_error(raw, "permission_error", headers)
    assert books(live) == before


@pytest.mark.parametrize(("change", "says"), [
    ({"max_tokens": -1}, "max_tokens: must be a positive whole number, not -1"),
    ({"max_tokens": "5"}, "max_tokens: must be a positive whole number, not '5'"),
    ({"max_tokens": None}, "max_tokens: Field required"),
    ({"model": "embed-fake"}, "does not support /v1/messages")])
async def test_a_refused_message_says_what_is_wrong_with_it(live: Live, live_store: Any, change: dict[str, Any],
                                                           says: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES, **change}
    status, _, raw = await post(live, "/v1/messages", {k: v for k, v in body.items() if v is not None},
                                {"x-api-key": who.key})
    assert status == 400 and says in json.loads(raw)["error"]["message"]


async def test_a_missing_key_is_explained_for_anthropic_clients_too(live: Live) -> None:
    status, _, raw = await post(live, "/v1/messages", {"model": "claude-fake", "max_tokens": 5, "messages": MESSAGES},
                                {})
    assert status == 401 and "x-api-key" in json.loads(raw)["error"]["message"]


async def test_anthropic_clients_list_and_read_models_in_anthropics_shape(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "1", models=["demo", "claude-fake", "gpt-fake"])
    async with client(live, who.key) as sdk:
        listed = [m async for m in sdk.models.list(limit=2)]  # two pages, followed by the SDK
        one = await sdk.models.retrieve("claude-fake")
        page = await sdk.models.list(limit=1, after_id="demo")
        before = await sdk.models.list(limit=5, before_id="gpt-fake")
    assert [m.id for m in listed] == ["demo", "gpt-fake", "claude-fake"]  # the config's order, the key's models
    assert all(m.type == "model" and m.display_name == m.id and m.created_at.year == 2023 for m in listed)
    assert (one.id, one.max_tokens) == ("claude-fake", 1000)
    assert ([m.id for m in page.data], page.has_more) == (["gpt-fake"], True)
    assert ([m.id for m in before.data], before.has_more) == (["demo"], False)
    async with aiohttp.ClientSession() as session, session.get(  # OpenAI clients: OpenAI's shape
            f"{live.url}/v1/models", headers={"Authorization": f"Bearer {who.key}"}) as response:
        assert response.status == 200 and (await response.json())["object"] == "list"


async def test_an_output_format_reaches_an_openai_route_as_its_response_format(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    async with client(live, who.key) as sdk:
        await sdk.messages.create(model="gpt-fake", max_tokens=50, messages=MESSAGES,
                                  extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert live.fake.requests[-1].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    await wait_for_usage(live, who.user_id, 1)


async def test_a_documents_bytes_are_held_for_before_an_anthropic_route_reads_it(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "0.5")  # $0.50 pays ~160k prompt tokens at $3
    pdf = "JVBERi0xLjQK" * 25_000  # 300 KB of base64: the copy for translated routes leaves documents out
    messages = [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
        {"type": "text", "text": "Summarize it"}]}]
    asked = len(live.anthropic.requests)
    status, _, raw = await post(live, "/v1/messages", {"model": "claude-fake", "max_tokens": 100,
                                                       "messages": messages}, {"x-api-key": who.key})
    assert status == 402 and json.loads(raw)["error"]["type"] == "billing_error"  # refused before the upstream
    assert len(live.anthropic.requests) == asked and usage_rows(live, who.user_id) == []
    messages[0]["content"][0]["source"]["data"] = "JVBERi0xLjQK"  # a small one goes through
    status, _, raw = await post(live, "/v1/messages", {"model": "claude-fake", "max_tokens": 100,
                                                       "messages": messages}, {"x-api-key": who.key})
    assert status == 200, raw
    assert live.anthropic.requests[-1].body["messages"][0]["content"][0]["type"] == "document"
    await wait_for_usage(live, who.user_id, 1)


@pytest.mark.parametrize(("tools", "beta", "named"), [
    ([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}], None, "tools.0"),
    ([{"name": "f", "input_schema": {"type": "object"}},
      {"type": "code_execution_20250522", "name": "code_execution"}], None, "tools.1"),
    (None, "prompt-caching-2024-07-31, context-1m-2025-08-07", "context-1m-2025-08-07")])
async def test_what_anthropic_bills_beyond_tokens_is_refused_before_the_hold(
        live: Live, live_store: Any, tools: Any, beta: str | None, named: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES, **({"tools": tools} if tools else {})}
    asked = len(live.anthropic.requests)
    status, _, raw = await post(live, "/v1/messages", body,
                                {"x-api-key": who.key, **({"anthropic-beta": beta} if beta else {})})
    message = json.loads(raw)["error"]["message"]
    assert status == 400 and named in message and "not available here" in message, raw
    assert len(live.anthropic.requests) == asked and usage_rows(live, who.user_id) == []
    status, _, _ = await post(live, "/v1/messages", {**body, "tools": [{"name": "f", "input_schema": {}}]},
                              {"x-api-key": who.key, "anthropic-beta": "prompt-caching-2024-07-31"})
    assert status == 200  # a tool of the client's own and a beta that costs nothing more go through
    await wait_for_usage(live, who.user_id, 1)
