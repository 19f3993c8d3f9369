"""The OpenAI surface through the official SDK, sync and async: content, usage, exact billing.

Every billed call checks the money three ways: ``usage.cost`` in the response, the balance
drop, and the ledger/usage rows, all against ``ceil((prompt*in + completion*out) / 1e6)``
micro-USD computed here from the usage the upstream (or the echo provider) reported.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from typer.testing import CliRunner

from apibox import reports, tokens
from apibox.cli.main import app as cli_app
from apibox.config import ModelSettings, Route, Settings
from apibox.money import format_usd
from apibox.pricing import Price
from apibox.store import open_store
from tests.conftest import Live, ServerThread, serving
from tests.fake_upstream import UPSTREAM_KEY, WORDS, FakeUpstream
from tests.gateway_helpers import (
    account,
    answers_from_chunks,
    answers_from_completion,
    auth,
    balance,
    charges,
    expected_cost,
    openai_sdk_chat,
    sse_json,
    usage_rows,
    wait_for_usage,
)

PROMPT = "Say hi to the gateway"
FAKE_TEXT = "".join(WORDS)
DEMO_TEXT = f"Echo: {PROMPT}"


@dataclass
class Reply:
    text: str
    usage: dict[str, Any]
    models: set[str]
    request_id: str | None
    finish_reason: str | None
    headers: dict[str, str] = field(default_factory=dict)


def _collect_stream(chunks: list[Any], headers: Any) -> Reply:
    usage = [c.usage.model_dump() for c in chunks if c.usage is not None]
    assert len(usage) == 1, "exactly one chunk carries usage when the client asks for it"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return Reply(text, usage[0], {c.model for c in chunks}, headers.get("x-request-id"), finish[-1] if finish else None,
                 dict(headers))


def _collect_completion(raw: Any) -> Reply:
    completion = raw.parse()
    return Reply(completion.choices[0].message.content, completion.usage.model_dump(), {completion.model},
                 raw.headers.get("x-request-id"), completion.choices[0].finish_reason, dict(raw.headers))


async def chat(live: Live, key: str, model: str, *, sdk: str, stream: bool, **extra: Any) -> Reply:
    """One chat completion through the official SDK (sync in a thread, or async)."""
    params: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}
    if stream:
        params["stream_options"] = {"include_usage": True}
    return await openai_sdk_chat(live, key, params, sdk=sdk, stream=stream, from_chunks=_collect_stream,
                                 from_completion=_collect_completion)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("sdk", ["sync", "async"])
@pytest.mark.parametrize("model", ["demo", "gpt-fake"])
async def test_chat_through_sdk_bills_exactly_the_reported_usage(live: Live, live_store, model: str, sdk: str,
                                                                   stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = balance(live, who.user_id)[0]

    reply = await chat(live, who.key, model, sdk=sdk, stream=stream)

    assert reply.text == (FAKE_TEXT if model == "gpt-fake" else DEMO_TEXT)
    assert reply.models == {model}
    assert reply.finish_reason == "stop"
    usage = reply.usage
    if model == "gpt-fake":
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (21, len(WORDS))
    else:
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    cost = expected_cost(model, usage["prompt_tokens"], usage["completion_tokens"])
    assert cost > 0
    assert Decimal(str(usage["cost"])) == Decimal(cost) / 1_000_000

    rows = await wait_for_usage(live, who.user_id, 1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["model"], row["charged"], row["cost"], row["estimated"]) == ("ok", model, cost, cost, 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row["provider"] == ("fake" if model == "gpt-fake" else "echo")
    assert row["request_id"] == reply.request_id
    assert charges(live, who.user_id) == [cost]
    assert balance(live, who.user_id) == (before - cost, 0)


ANSWERS = 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["gpt-fake", "demo"])
async def test_n_answers_each_reach_the_sdk_whole_and_are_billed_together(live: Live, live_store, model: str,
                                                                          stream: bool) -> None:
    """A request for three answers: the SDK gets three whole choices (a stream's chunks come
    interleaved, a choice each), the upstream is asked for each answer's share of the hold, and
    the charge is the usage of all three. The demo model answers n too."""
    who = await account(live_store, live, "ann@example.com", "1")
    params: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                              "n": ANSWERS, "max_tokens": 20}
    if stream:
        params["stream_options"] = {"include_usage": True}
    got = await openai_sdk_chat(live, who.key, params, sdk="async", stream=stream,
                                from_chunks=answers_from_chunks, from_completion=answers_from_completion)
    answer = FAKE_TEXT if model == "gpt-fake" else DEMO_TEXT
    assert got.texts == dict.fromkeys(range(ANSWERS), answer)
    assert got.finishes == dict.fromkeys(range(ANSWERS), "stop")
    assert got.models == {model}  # every choice's chunks renamed, not only the first's
    usage = got.usage
    per_answer = len(WORDS) if model == "gpt-fake" else tokens.count_tokens(DEMO_TEXT)
    assert usage["completion_tokens"] == ANSWERS * per_answer
    if model == "gpt-fake":
        assert live.fake.requests[-1].body["max_tokens"] == 20  # the hold is for 3 x 20: each answer's share
        assert usage["prompt_tokens"] == 21
    cost = expected_cost(model, usage["prompt_tokens"], ANSWERS * per_answer)
    assert Decimal(str(usage["cost"])) == Decimal(cost) / 1_000_000
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    assert (row["completion_tokens"], row["charged"], row["estimated"]) == (ANSWERS * per_answer, cost, 0)
    assert charges(live, who.user_id) == [cost]


async def test_n_streamed_answers_without_usage_are_charged_for_every_answers_text(live: Live, live_store) -> None:
    """The upstream reports no usage: the estimate counts what each of the three answers delivered."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.mode = "no_usage"
    params = {"model": "gpt-fake", "messages": [{"role": "user", "content": PROMPT}], "n": ANSWERS,
              "max_tokens": 20}
    got = await openai_sdk_chat(live, who.key, params, sdk="async", stream=True,
                                from_chunks=answers_from_chunks, from_completion=answers_from_completion)
    assert got.texts == dict.fromkeys(range(ANSWERS), FAKE_TEXT)
    row = (await wait_for_usage(live, who.user_id, 1))[0]
    delivered = ANSWERS * sum(tokens.count_tokens(word) for word in WORDS)
    assert (row["completion_tokens"], row["estimated"]) == (delivered, 1)
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] == row["cost"] > 0


async def test_upstream_gets_its_own_model_name_and_key_never_the_clients(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    reply = await chat(live, who.key, "gpt-fake", sdk="async", stream=False)
    assert reply.models == {"gpt-fake"}
    sent = live.fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "fake-model-1"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert who.key not in json.dumps(sent.headers) + json.dumps(sent.body)
    assert UPSTREAM_KEY not in json.dumps(reply.headers) + reply.text


async def test_cached_prompt_tokens_are_priced_at_the_cached_rate(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.cached_tokens = 10
    reply = await chat(live, who.key, "gpt-fake", sdk="sync", stream=False)
    assert reply.usage["prompt_tokens_details"]["cached_tokens"] == 10
    cost = expected_cost("gpt-fake", 21, len(WORDS), cached=10)
    assert cost == 130  # 11 x $2.50 + 10 x $1.25 + 9 x $10 per 1M, rounded up: cheaper than uncached 143
    assert cost < expected_cost("gpt-fake", 21, len(WORDS))
    assert Decimal(str(reply.usage["cost"])) == Decimal(cost) / 1_000_000
    assert charges(live, who.user_id) == [cost]
    assert usage_rows(live, who.user_id)[0]["cached_tokens"] == 10


async def test_usage_report_shows_what_was_billed(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    await chat(live, who.key, "gpt-fake", sdk="async", stream=False)
    await chat(live, who.key, "gpt-fake", sdk="async", stream=True)
    demo = await chat(live, who.key, "demo", sdk="async", stream=False)
    await wait_for_usage(live, who.user_id, 3)
    fake_cost = expected_cost("gpt-fake", 21, len(WORDS))
    demo_cost = expected_cost("demo", demo.usage["prompt_tokens"], demo.usage["completion_tokens"])

    rows = await reports.usage_report(live_store, reports.ReportQuery(by=("model",), user=who.email))
    by_model = {r.group["model"]: r for r in rows}
    assert set(by_model) == {"demo", "gpt-fake"}
    assert (by_model["gpt-fake"].requests, by_model["gpt-fake"].cost) == (2, 2 * fake_cost)
    assert (by_model["gpt-fake"].prompt_tokens, by_model["gpt-fake"].completion_tokens) == (42, 2 * len(WORDS))
    assert (by_model["demo"].requests, by_model["demo"].cost, by_model["demo"].errors) == (1, demo_cost, 0)

    result = await asyncio.to_thread(CliRunner().invoke, cli_app, [
        "usage", "report", "--by", "model", "--format", "json", "--config", str(live.config_path)])
    assert result.exit_code == 0, result.output
    cli_rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert cli_rows["gpt-fake"]["requests"] == 2
    assert cli_rows["gpt-fake"]["cost_usd"] == format_usd(2 * fake_cost)
    assert cli_rows["demo"]["cost_usd"] == format_usd(demo_cost)


# -- legacy completions and embeddings ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_legacy_completions_work_and_bill(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        if stream:
            chunks = [c async for c in await client.completions.create(
                model="gpt-fake", prompt="Once upon", max_tokens=5, stream=True,
                stream_options={"include_usage": True})]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage = next(c.usage for c in chunks if c.usage)
            models = {c.model for c in chunks}
        else:
            completion = await client.completions.create(model="gpt-fake", prompt="Once upon", max_tokens=5)
            text, usage, models = completion.choices[0].text, completion.usage, {completion.model}
    assert text == "".join(WORDS[:5])
    assert models == {"gpt-fake"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (21, 5)
    cost = expected_cost("gpt-fake", 21, 5)
    assert Decimal(str(usage.model_dump()["cost"])) == Decimal(cost) / 1_000_000
    sent = live.fake.requests[-1]
    assert sent.path == "/v1/completions"
    assert (sent.body["model"], sent.body["prompt"], sent.body["max_tokens"]) == ("fake-model-1", "Once upon", 5)
    rows = await wait_for_usage(live, who.user_id, 1)
    assert (rows[0]["endpoint"], rows[0]["status"], rows[0]["charged"]) == ("completions", "ok", cost)
    assert charges(live, who.user_id) == [cost]


async def test_legacy_completions_on_demo(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")

    def run() -> Any:
        with openai.OpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
            return client.completions.create(model="demo", prompt="alpha beta gamma", max_tokens=50)
    completion = await asyncio.to_thread(run)
    assert completion.choices[0].text == "Echo: alpha beta gamma"
    assert completion.model == "demo"
    cost = expected_cost("demo", completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert charges(live, who.user_id) == [cost]
    assert Decimal(str(completion.usage.model_dump()["cost"])) == Decimal(cost) / 1_000_000


async def test_embeddings_with_the_sdk_default_base64_on_embed_fake(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        result = await client.embeddings.create(model="embed-fake", input=["one", "two"])
    sent = live.fake.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body["encoding_format"] == "base64"  # the SDK's default, passed through
    assert sent.body["model"] == "emb-1"
    assert [d.embedding for d in result.data] == [[0.5, -0.25, 0.125]] * 2
    assert result.model == "embed-fake"
    assert result.usage.prompt_tokens == 6
    cost = expected_cost("embed-fake", 6, 0)
    assert cost == 1  # 6 tokens at $0.02/1M round up to one micro-USD
    assert charges(live, who.user_id) == [cost]
    row = usage_rows(live, who.user_id)[0]
    assert (row["endpoint"], row["status"], row["prompt_tokens"], row["charged"]) == ("embeddings", "ok", 6, 1)


async def test_embeddings_refuse_a_chat_model(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="demo", input="x")
    assert "does not support /v1/embeddings" in caught.value.message
    assert usage_rows(live, who.user_id) == []


class EchoEmbeddingServer(ServerThread):
    """The standard live gateway plus an ``embed-demo`` model on the offline echo provider."""

    def configure(self, settings: Settings) -> Settings:
        embed = ModelSettings(name="embed-demo", routes=(Route(provider="echo", model="echo-embed"),),
                              price=Price(input=100_000_000, output=0), kind="embedding")
        return replace(settings, models=(*settings.models, embed))


@pytest.fixture
def echo_live(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """conftest's ``live`` with the ``embed-demo`` model added; books checked after."""
    with serving(EchoEmbeddingServer(tmp_path, database_url, fake)) as running:
        yield running


async def test_embeddings_base64_on_the_echo_provider_are_decoded_by_the_sdk(echo_live: Live) -> None:
    store = await open_store(echo_live.settings.database.url)
    try:
        who = await account(store, echo_live, "ann@example.com", "1")
    finally:
        await store.close()
    async with openai.AsyncOpenAI(base_url=echo_live.v1, api_key=who.key, max_retries=0) as client:
        raw = await client.embeddings.with_raw_response.create(model="embed-demo", input="hello embedding world")
        result = raw.parse()
    body = json.loads(raw.content)
    assert isinstance(body["data"][0]["embedding"], str)  # base64 on the wire, as the SDK asked
    vector = result.data[0].embedding
    assert len(vector) == 16 and all(isinstance(v, float) and -1 <= v < 1 for v in vector)
    tokens = result.usage.prompt_tokens
    assert tokens > 0
    cost = -(-tokens * 100_000_000 // 1_000_000)  # $100 per 1M input tokens
    assert Decimal(str(body["usage"]["cost"])) == Decimal(cost) / 1_000_000
    assert charges(echo_live, who.user_id) == [cost]
    assert balance(echo_live, who.user_id) == (1_000_000 - cost, 0)


# -- tools and images ---------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\": 21}"},
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_tools_images_and_tool_calls_reach_the_upstream_unchanged(live: Live, live_store, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        params: dict[str, Any] = {"model": "gpt-fake", "messages": MESSAGES, "tools": TOOLS,
                                  "tool_choice": "auto", "parallel_tool_calls": False, "temperature": 0.2}
        if stream:
            async with await client.chat.completions.create(**params, stream=True) as chunks:
                text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            text = (await client.chat.completions.create(**params)).choices[0].message.content
    assert text == FAKE_TEXT
    body = live.fake.requests[-1].body
    assert body["messages"] == MESSAGES
    assert body["tools"] == TOOLS
    assert (body["tool_choice"], body["parallel_tool_calls"], body["temperature"]) == ("auto", False, 0.2)
    await wait_for_usage(live, who.user_id, 1)
    assert charges(live, who.user_id) == [expected_cost("gpt-fake", 21, len(WORDS))]


@dataclass
class ToolCallingUpstream(FakeUpstream):
    """Answers every chat request with one tool call (streamed in OpenAI's fragment shape)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        head = {"id": "chatcmpl-tool", "created": 1, "model": body["model"]}
        call = {"id": "call_xyz", "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": "{\"city\": \"Paris\"}"}}
        usage = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
        if not body.get("stream"):
            return web.json_response({**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                 "logprobs": None, "finish_reason": "tool_calls"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        fragments = [
            {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_xyz", "type": "function", "function": {"name": "get_weather",
                                                                                "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]},
        ]
        events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in fragments]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        events.append({"choices": [], "usage": usage})
        for event in events:
            await self._write(response, b"data: " + json.dumps({**head, "object": "chat.completion.chunk",
                                                                **event}).encode() + b"\n\n")
        await self._write(response, b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class TestToolCallsFromTheUpstream:
    @pytest.fixture
    def fake(self) -> ToolCallingUpstream:
        return ToolCallingUpstream()

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
    async def test_tool_calls_come_back_to_the_client(self, live: Live, live_store, stream: bool) -> None:
        who = await account(live_store, live, "ann@example.com", "1")
        params: dict[str, Any] = {"model": "gpt-fake", "messages": [{"role": "user", "content": "weather?"}],
                                  "tools": TOOLS}
        async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
            if stream:
                async with await client.chat.completions.create(**params, stream=True) as chunks:
                    deltas = [c async for c in chunks]
                assert all(c.choices for c in deltas)  # the usage-only chunk was not asked for
                calls = [t for c in deltas for t in c.choices[0].delta.tool_calls or ()]
                name = "".join(t.function.name or "" for t in calls)
                arguments = "".join(t.function.arguments or "" for t in calls)
                finish = deltas[-1].choices[0].finish_reason
            else:
                choice = (await client.chat.completions.create(**params)).choices[0]
                call = choice.message.tool_calls[0]
                name, arguments, finish = call.function.name, call.function.arguments, choice.finish_reason
        assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
        rows = await wait_for_usage(live, who.user_id, 1)
        assert (rows[0]["status"], rows[0]["charged"]) == ("ok", expected_cost("gpt-fake", 30, 12))


# -- models, me, probes -------------------------------------------------------------------


async def test_models_list_only_the_keys_models_with_pricing(live: Live, live_store) -> None:
    everything = await account(live_store, live, "ann@example.com", "1")
    scoped = await account(live_store, live, "bob@example.com", "1", models=("gpt-fake", "embed-fake"))
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=everything.key, max_retries=0) as client:
        ids = [m.id async for m in client.models.list()]
    assert ids == [m.name for m in live.settings.models]  # every configured model, in config order
    assert {"demo", "gpt-fake", "gpt-fallback", "embed-fake"} <= set(ids)
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=scoped.key, max_retries=0) as client:
        models = [m async for m in client.models.list()]
        assert [m.id for m in models] == ["gpt-fake", "embed-fake"]
        one = await client.models.retrieve("gpt-fake")
        assert (one.id, one.object, one.owned_by) == ("gpt-fake", "model", "apibox")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("demo")  # exists, but not for this key
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")
    pricing = models[0].model_dump()["pricing"]
    assert pricing == {"unit": "USD per 1M tokens", "input": "2.500000", "output": "10.000000",
                       "cached_input": "1.250000"}
    assert all(isinstance(m.created, int) for m in models)


async def test_me_shows_the_balance_as_strings(live: Live, live_store) -> None:
    who = await account(live_store, live, "Ann@Example.com", "12.5", name="laptop", models=("demo",))
    await chat(live, who.key, "demo", sdk="async", stream=False)
    async with aiohttp.ClientSession() as session, session.get(f"{live.v1}/me", headers=auth(who.key)) as response:
        assert response.status == 200
        assert response.headers.get("x-request-id", "").startswith("req_")
        me = await response.json()
    spent = charges(live, who.user_id)[0]
    assert me["user"]["email"] == "ann@example.com"
    assert me["user"]["state"] == "active"
    assert me["key"]["name"] == "laptop" and me["key"]["models"] == ["demo"]
    assert me["key"]["spent_usd"] == format_usd(spent)
    assert me["balance"] == {"balance_usd": format_usd(12_500_000 - spent), "held_usd": "0.000000",
                             "available_usd": format_usd(12_500_000 - spent)}
    assert who.key not in json.dumps(me)


async def test_health_and_readiness(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        for path, expected in (("/healthz", {"status": "ok", "pid": os.getpid()}),
                               ("/readyz", {"status": "ok", "database": "ok"})):
            async with session.get(live.url + path) as response:
                assert response.status == 200
                assert await response.json() == expected
                assert response.headers.get("x-request-id", "").startswith("req_")


async def test_streams_and_completions_carry_a_request_id(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{live.v1}/chat/completions", json=body, headers=auth(who.key)) as response:
            assert response.status == 200
            whole_id = response.headers.get("x-request-id")
        async with session.post(f"{live.v1}/chat/completions", json={**body, "stream": True},
                                headers=auth(who.key)) as response:
            assert response.status == 200
            stream_id = response.headers.get("x-request-id")
            assert sse_json(await response.read())
    assert whole_id and whole_id.startswith("req_")
    assert stream_id and stream_id.startswith("req_") and stream_id != whole_id
    rows = await wait_for_usage(live, who.user_id, 2)
    assert {r["request_id"] for r in rows} == {whole_id, stream_id}
