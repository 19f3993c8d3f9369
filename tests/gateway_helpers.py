"""Helpers shared by the live-gateway tests (test_gateway_*.py): DB reads, prices, SSE parsing.

The tests read the gateway's database directly (tests/dbquery.py, either engine) so that what they
check is what was written, not what the store's own methods report; money is recomputed here with integer
math, independently of apibox.pricing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
import pytest

from apibox import accounts
from apibox.store.base import Store
from tests import dbquery
from tests.conftest import Live, fund

T = TypeVar("T")

# Test-config prices in micro-USD per 1M tokens (input, output, cached input).
GPT_FAKE = (2_500_000, 10_000_000, 1_250_000)
GPT_FALLBACK = (2_500_000, 10_000_000, 2_500_000)
DEMO = (5_000_000, 15_000_000, 5_000_000)
EMBED_FAKE = (20_000, 0, 20_000)
PRICES = {"gpt-fake": GPT_FAKE, "gpt-fallback": GPT_FALLBACK, "demo": DEMO, "embed-fake": EMBED_FAKE}


def expected_cost(model: str, prompt: int, completion: int, cached: int = 0) -> int:
    """ceil((uncached*in + cached*cached_in + completion*out) / 1e6) micro-USD."""
    rate_in, rate_out, rate_cached = PRICES[model]
    scaled = (prompt - cached) * rate_in + cached * rate_cached + completion * rate_out
    return -(-scaled // 1_000_000)


def query(live: Live, sql: str, params: tuple[Any, ...] = ()) -> list[dbquery.Row]:
    return dbquery.query(live.settings.database.url, sql, params)


def execute(live: Live, sql: str, params: tuple[Any, ...] = ()) -> None:
    dbquery.execute(live.settings.database.url, sql, params)


def usage_rows(live: Live, user_id: int | None = None) -> list[dict[str, Any]]:
    where, params = ("WHERE user_id = ?", (user_id,)) if user_id is not None else ("", ())
    return [dict(r) for r in query(live, f"SELECT * FROM usage {where} ORDER BY id", params)]


def charges(live: Live, user_id: int) -> list[int]:
    """The user's ledger charges, as positive micro-USD amounts."""
    return [-r["amount"] for r in query(live, "SELECT amount FROM ledger WHERE user_id = ? AND kind = 'charge' "
                                               "ORDER BY id", (user_id,))]


def balance(live: Live, user_id: int) -> tuple[int, int]:
    """(balance, held) in micro-USD."""
    row = query(live, "SELECT balance, held FROM balances WHERE user_id = ?", (user_id,))[0]
    return row["balance"], row["held"]


@dataclass(frozen=True)
class Books:
    """Everything a refused request must leave unchanged."""

    balances: tuple[tuple[int, int, int], ...]
    ledger_rows: int
    usage_rows: int
    holds: int
    key_spent: tuple[tuple[int, int], ...]


def books(live: Live) -> Books:
    return Books(
        balances=tuple(tuple(r) for r in query(live, "SELECT user_id, balance, held FROM balances ORDER BY user_id")),
        ledger_rows=query(live, "SELECT count(*) FROM ledger")[0][0],
        usage_rows=query(live, "SELECT count(*) FROM usage")[0][0],
        holds=query(live, "SELECT count(*) FROM holds")[0][0],
        key_spent=tuple(tuple(r) for r in query(live, "SELECT id, spent FROM api_keys ORDER BY id")),
    )


async def wait_for_usage(live: Live, user_id: int, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Poll until the user has ``count`` usage rows and no open holds (streams settle after [DONE])."""
    deadline = time.monotonic() + timeout
    while True:
        rows = usage_rows(live, user_id)
        if len(rows) >= count and balance(live, user_id)[1] == 0:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"user {user_id}: {len(rows)} usage rows (wanted {count}), "
                                 f"held {balance(live, user_id)[1]} after {timeout}s")
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Account:
    key: str
    user_id: int
    email: str


async def account(store: Store, live: Live, email: str, usd: str, **key_options: object) -> Account:
    secret = await fund(store, live.settings, email, usd, **key_options)
    user = await accounts.resolve_user(store, email)
    return Account(secret, user.id, email)


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (comments dropped)."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    events = []
    for block in text.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def sse_json(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, without the final ``[DONE]``."""
    return [json.loads(e) for e in sse_events(raw) if e != "[DONE]"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def openai_sdk_chat(live: Live, key: str, params: dict[str, Any], *, sdk: str, stream: bool,
                          from_chunks: Callable[[list[Any], Any], T], from_completion: Callable[[Any], T]) -> T:
    """One chat completion through the official openai SDK, the sync client (in a thread) or the
    async one: a stream's chunks and response headers go to ``from_chunks``, a whole reply (raw,
    with its headers) to ``from_completion``."""
    if stream:
        params = {**params, "stream": True}
    if sdk == "sync":
        def run() -> T:
            with openai.OpenAI(base_url=live.v1, api_key=key, max_retries=0) as client:
                if stream:
                    with client.chat.completions.create(**params) as chunks:
                        return from_chunks(list(chunks), chunks.response.headers)
                return from_completion(client.chat.completions.with_raw_response.create(**params))
        return await asyncio.to_thread(run)
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0) as client:
        if stream:
            async with await client.chat.completions.create(**params) as chunks:
                return from_chunks([c async for c in chunks], chunks.response.headers)
        return from_completion(await client.chat.completions.with_raw_response.create(**params))


async def stream_until_error(live: Live, key: str, model: str,
                             messages: list[dict[str, Any]]) -> tuple[list[Any], openai.APIError]:
    """A streamed chat completion that the async openai SDK must end by raising: the chunks it
    yielded before, and what it raised."""
    received: list[Any] = []
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0) as client:
        with pytest.raises(openai.APIError) as caught:
            async with await client.chat.completions.create(model=model, messages=messages, stream=True) as chunks:
                async for chunk in chunks:
                    received.append(chunk)
    return received, caught.value


def delta_texts(chunks: list[Any]) -> list[str]:
    """Each chunk's content delta ("" when it has none)."""
    return [chunk.choices[0].delta.content or "" for chunk in chunks]


@dataclass
class Answers:
    """What the SDK made of a reply with several choices."""

    texts: dict[int, str]  # each choice's text, by its index
    finishes: dict[int, str]
    usage: dict[str, Any]
    models: set[str]  # the model every chunk (or the reply) named


def answers_from_chunks(chunks: list[Any], headers: Any) -> Answers:
    """Each choice's text and finish reason, gathered from a stream's interleaved chunks."""
    answers = Answers({}, {}, {}, {chunk.model for chunk in chunks})
    for chunk in chunks:
        for choice in chunk.choices:
            answers.texts[choice.index] = answers.texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                answers.finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            answers.usage = chunk.usage.model_dump()
    return answers


def answers_from_completion(raw: Any) -> Answers:
    completion = raw.parse()
    return Answers({c.index: c.message.content for c in completion.choices},
                   {c.index: c.finish_reason for c in completion.choices}, completion.usage.model_dump(),
                   {completion.model})
