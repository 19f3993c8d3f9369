"""Responses the upstream stores belong to the user who asked for them.

OpenAI keeps a Responses API answer (unless asked with ``store: false``) for the account that
asked, and every apibox user shares the operator's: apibox records whose each one is, so a user
may continue (``previous_response_id``), read, list the input of and delete only their own, on
the upstream that keeps it. Another user's id is as unknown as a made-up one, refused before the
hold; what would reach stored items around the record (``conversation``, ``item_reference``)
is refused too. Through the official openai SDK, against a fake upstream that keeps responses
and refuses unknown ids as OpenAI does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest

from apibox.models import StoredResponse
from tests.conftest import Live
from tests.fake_upstream import WORDS
from tests.gateway_helpers import Account, account, balance, charges, expected_cost, query, usage_rows, wait_for_usage
from tests.live_variants import request

TEXT = "".join(WORDS)


def client(live: Live, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0)


def kept_rows(live: Live) -> list[dict[str, Any]]:
    return [dict(r) for r in query(live, "SELECT response_id, user_id, provider, model FROM stored_responses "
                                         "ORDER BY response_id")]


async def ask(sdk: openai.AsyncOpenAI, stream: bool, **params: Any) -> Any:
    """A response, whole or streamed (its final response)."""
    if not stream:
        return await sdk.responses.create(**params)
    async with sdk.responses.stream(**params) as events:
        return await events.get_final_response()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_user_continues_their_own_response(live: Live, live_store: Any, stream: bool) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    async with client(live, ann.key) as sdk:
        first = await ask(sdk, stream, model="gpt-fake", input="Tell me a story")
        assert kept_rows(live) == [{"response_id": first.id, "user_id": ann.user_id, "provider": "fake",
                                    "model": "gpt-fake"}]  # recorded before the answer went out
        second = await ask(sdk, stream, model="gpt-fake", input="And then?", previous_response_id=first.id)
    assert (second.output_text, second.previous_response_id) == (TEXT, first.id)
    assert live.fake.requests[-1].body["previous_response_id"] == first.id
    assert [r["response_id"] for r in kept_rows(live)] == sorted([first.id, second.id])
    cost = expected_cost("gpt-fake", 21, len(WORDS))
    assert [r["charged"] for r in await wait_for_usage(live, ann.user_id, 2)] == [cost, cost]


async def ann_and_bob(live: Live, live_store: Any) -> tuple[Account, Account, Any]:
    """Two users, and a response the upstream keeps for the first."""
    ann = await account(live_store, live, "ann@example.com", "1")
    bob = await account(live_store, live, "bob@example.com", "1")
    async with client(live, ann.key) as sdk:
        return ann, bob, await sdk.responses.create(model="gpt-fake", input="My secret plan")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_another_users_response_is_not_found_and_costs_nothing(live: Live, live_store: Any,
                                                                     stream: bool) -> None:
    _, bob, anns = await ann_and_bob(live, live_store)
    asked = len(live.fake.requests)
    for foreign in (anns.id, "resp_made_up"):
        async with client(live, bob.key) as sdk:
            with pytest.raises(openai.BadRequestError) as refused:
                await ask(sdk, stream, model="gpt-fake", input="What did I say?", previous_response_id=foreign)
        error = refused.value.body
        assert (error["code"], error["param"]) == ("previous_response_not_found", "previous_response_id")
        assert error["message"] == f"Previous response with id '{foreign}' not found."
    assert len(live.fake.requests) == asked  # refused before the upstream was asked
    assert usage_rows(live, bob.user_id) == [] and charges(live, bob.user_id) == []
    assert balance(live, bob.user_id) == (1_000_000, 0)


async def test_another_users_response_cannot_be_read_listed_deleted_or_cancelled(live: Live,
                                                                                 live_store: Any) -> None:
    ann, bob, anns = await ann_and_bob(live, live_store)
    asked = len(live.fake.requests)
    async with client(live, bob.key) as sdk:
        for call in (sdk.responses.retrieve(anns.id), sdk.responses.input_items.list(anns.id),
                     sdk.responses.delete(anns.id), sdk.responses.cancel(anns.id)):
            with pytest.raises(openai.NotFoundError) as missing:
                await call
            assert missing.value.body["message"] == f"Response with id '{anns.id}' not found."
    assert len(live.fake.requests) == asked and anns.id in live.fake.kept
    assert [r["user_id"] for r in kept_rows(live)] == [ann.user_id]


async def test_a_user_reads_lists_and_deletes_their_own_response(live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    async with client(live, ann.key) as sdk:
        made = await sdk.responses.create(model="gpt-fake", input="Tell me a story")
        read = await sdk.responses.retrieve(made.id)
        items = await sdk.responses.input_items.list(made.id, limit=5)
        assert live.fake.requests[-1].body == {"limit": "5"}  # the query goes on as it came
        await sdk.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(made.id)
    assert (read.id, read.model, read.output_text) == (made.id, "gpt-fake", TEXT)  # apibox's name, not upstream's
    assert [item.content[0].text for item in items.data] == ["Tell me a story"]
    assert made.id not in live.fake.kept and kept_rows(live) == []
    assert len(usage_rows(live, ann.user_id)) == 1  # reading and deleting are not billed


async def test_a_response_the_upstream_no_longer_has_is_not_found_and_deleting_it_forgets_it(
        live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    async with client(live, ann.key) as sdk:
        made = await sdk.responses.create(model="gpt-fake", input="Tell me a story")
        del live.fake.kept[made.id]  # expired upstream (OpenAI keeps them 30 days)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(made.id)
        assert len(kept_rows(live)) == 1
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.delete(made.id)
    assert kept_rows(live) == []


async def test_a_response_asked_not_to_be_stored_is_not_recorded(live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    async with client(live, ann.key) as sdk:
        made = await sdk.responses.create(model="gpt-fake", input="Tell me a story", store=False)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(model="gpt-fake", input="And then?", previous_response_id=made.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    assert kept_rows(live) == [] and made.id not in live.fake.kept


async def test_a_continued_response_goes_to_the_upstream_that_keeps_it(live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    # answered earlier by gpt-fallback's second route (its first was cooling then)
    live.fake.kept["resp_on_backup"] = {"response": {}, "input": "Hi"}
    await live_store.remember_response(StoredResponse("resp_on_backup", ann.user_id, "fake-backup", "gpt-fallback"))
    async with client(live, ann.key) as sdk:
        answer = await sdk.responses.create(model="gpt-fallback", input="And then?",
                                            previous_response_id="resp_on_backup")
        assert live.fake.requests[-1].body["model"] == "fake-secondary"  # not the first route, fake-primary
        with pytest.raises(openai.BadRequestError) as refused:  # a model that cannot reach that upstream
            await sdk.responses.create(model="gpt-fake", input="And then?", previous_response_id="resp_on_backup")
    assert answer.output_text == TEXT
    assert refused.value.body["param"] == "previous_response_id" and "gpt-fake" in refused.value.body["message"]
    assert len(usage_rows(live, ann.user_id)) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_continuations_hold_counts_the_conversation_the_upstream_reads_again(live: Live, live_store: Any,
                                                                                    stream: bool) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    live.fake.prompt_tokens = 300_000  # a long conversation: $0.75 of input at gpt-fake's $2.5 per 1M
    async with client(live, ann.key) as sdk:
        first = await ask(sdk, stream, model="gpt-fake", input="Summarize the attached book")
        [row] = query(live, "SELECT context_tokens FROM stored_responses")
        assert row[0] == 300_000 + len(WORDS)  # its input and its output
        assert balance(live, ann.user_id)[0] == 1_000_000 - expected_cost("gpt-fake", 300_000, len(WORDS))
        asked = len(live.fake.requests)
        with pytest.raises(openai.APIStatusError) as refused:  # $0.25 left cannot pay for reading it again
            await ask(sdk, stream, model="gpt-fake", input="And then?", previous_response_id=first.id)
        assert refused.value.status_code == 402 and len(live.fake.requests) == asked
        live.fake.prompt_tokens = 21
        fresh = await ask(sdk, stream, model="gpt-fake", input="And then?")  # a new conversation fits
    assert fresh.output_text == TEXT


@pytest.mark.parametrize(("extra", "param"), [
    ({"conversation": "conv_123"}, "conversation"),
    ({"input": ["x", {"type": "item_reference", "id": "msg_123"}]}, "input[1]"),
    ({"input": [{"id": "msg_123"}]}, "input[0]"),  # a reference need not name its type
    ({"input": [{"role": "user", "content": "Hi"}, {"id": "msg_123", "type": None}]}, "input[1]"),
    ({"previous_response_id": 7}, "previous_response_id"),
    ({"previous_response_id": ""}, "previous_response_id")])
async def test_what_would_reach_stored_items_around_the_record_is_refused(
        live: Live, live_store: Any, extra: dict[str, Any], param: str) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    asked = len(live.fake.requests)
    status, _, raw = await request(live, "POST", "/v1/responses", key=ann.key,
                                   json_body={"model": "gpt-fake", "input": "Hi", **extra})
    assert (status, json.loads(raw)["error"]["param"]) == (400, param)
    assert len(live.fake.requests) == asked and usage_rows(live, ann.user_id) == []


async def test_reading_as_a_stream_and_cancelling_are_refused_for_ones_own(live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    async with client(live, ann.key) as sdk:
        made = await sdk.responses.create(model="gpt-fake", input="Hi")
    status, _, raw = await request(live, "GET", f"/v1/responses/{made.id}?stream=true", key=ann.key)
    assert (status, json.loads(raw)["error"]["param"]) == (400, "stream")
    status, _, raw = await request(live, "POST", f"/v1/responses/{made.id}/cancel", key=ann.key)
    assert status == 400 and "background" in json.loads(raw)["error"]["message"]
    status, _, _ = await request(live, "GET", f"/v1/responses/{made.id}")
    assert status == 401


async def test_usage_prune_forgets_the_stored_responses_made_before_its_cut(live: Live, live_store: Any) -> None:
    ann = await account(live_store, live, "ann@example.com", "1")
    old = datetime.now(UTC) - timedelta(days=40)
    await live_store.remember_response(StoredResponse("resp_old", ann.user_id, "fake", "gpt-fake", created_at=old))
    await live_store.remember_response(StoredResponse("resp_new", ann.user_id, "fake", "gpt-fake"))
    pruned = await live_store.prune_usage(datetime.now(UTC) - timedelta(days=30))
    assert pruned.responses == 1 and [r["response_id"] for r in kept_rows(live)] == ["resp_new"]
