"""OpenAI's Responses API (``/v1/responses``) through the official openai SDK: on a route whose
upstream speaks it, a whole response and a stream pass through as they came, but for the model's
name; on the others (the demo, Anthropic, Gemini) they are translated from chat completions, tool
calls included; each is billed by the usage it reports; a short balance lowers
``max_output_tokens``; what chat cannot carry, a malformed request and an upstream's refusal
cost nothing."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from apibox import tokens
from apibox.formats.responses import billing_copy
from apibox.gateway.proxy import OVERRUN_SLACK_TOKENS
from apibox.pricing import Price, worst_case_micro
from tests.conftest import Live
from tests.fake_anthropic import WORDS as CLAUDE_WORDS
from tests.fake_gemini import WORDS as GEMINI_WORDS
from tests.fake_upstream import WORDS
from tests.gateway_helpers import (
    PRICES,
    account,
    auth,
    balance,
    charges,
    expected_cost,
    sse_json,
    usage_rows,
    wait_for_usage,
)
from tests.live_variants import request

TEXT = "".join(WORDS)
STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added", *["response.output_text.delta"] * len(WORDS),
                 "response.output_text.done", "response.content_part.done", "response.output_item.done",
                 "response.completed"]


def client(live: Live, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0)


async def test_a_whole_response_passes_through_and_is_billed_by_its_usage(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        answer = await sdk.responses.create(model="gpt-fake", input="Tell me a story", instructions="Be brief.")
    assert (answer.output_text, answer.model, answer.status) == (TEXT, "gpt-fake", "completed")
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (21, len(WORDS))
    sent = live.fake.requests[-1]
    assert (sent.path, sent.body["model"], sent.body["input"]) == ("/v1/responses", "fake-model-1", "Tell me a story")
    assert sent.body["instructions"] == "Be brief."
    assert sent.body["max_output_tokens"] == 1000  # none asked for: the model's max_output_tokens, as held
    [row] = await wait_for_usage(live, who.user_id, 1)
    cost = expected_cost("gpt-fake", 21, len(WORDS))
    assert (row["endpoint"], row["status"], row["estimated"], row["charged"]) == ("responses", "ok", 0, cost)
    assert answer.usage.model_extra["cost"] == pytest.approx(cost / 1e6)  # type: ignore[index]


async def test_a_stream_passes_through_event_for_event(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}]
    async with client(live, who.key) as sdk, sdk.responses.stream(model="gpt-fake", input=items) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert [e.type for e in events if e.type in STREAM_EVENTS] == STREAM_EVENTS
    assert [e.sequence_number for e in events if e.type in STREAM_EVENTS] == list(range(len(STREAM_EVENTS)))
    assert (final.output_text, final.model, final.usage.output_tokens) == (TEXT, "gpt-fake", len(WORDS))
    assert live.fake.requests[-1].body["input"] == items
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["estimated"], row["charged"]) == ("ok", 0, expected_cost("gpt-fake", 21, len(WORDS)))
    assert live.fake.bodies_ended == 1 and live.fake.hung_up == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_short_balance_lowers_max_output_tokens(live: Live, live_store: Any, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "0.001")
    body = {"model": "gpt-fake", "input": "Tell me a story", "max_output_tokens": 500, "stream": stream}
    status, headers, raw = await request(live, "POST", "/v1/responses", key=who.key, json_body=body)
    assert status == 200, raw
    lowered = live.fake.requests[-1].body["max_output_tokens"]
    assert headers["x-apibox-max-tokens"] == str(lowered) and 16 <= lowered < 500
    bound = tokens.prompt_bound(billing_copy(body))
    assert worst_case_micro(Price(*PRICES["gpt-fake"]), bound, lowered) <= 1000 < worst_case_micro(
        Price(*PRICES["gpt-fake"]), bound, lowered + 1)
    final = sse_json(raw)[-1]["response"] if stream else json.loads(raw)
    assert (final["status"], final["model"]) == ("completed", "gpt-fake")
    assert final["output"][0]["content"][0]["text"] == TEXT
    assert charges(live, who.user_id) == [expected_cost("gpt-fake", 21, len(WORDS))]
    assert balance(live, who.user_id)[1] == 0  # the hold released


async def test_a_stream_past_its_paid_for_length_is_cut_and_ends_incomplete(live: Live, live_store: Any) -> None:
    live.fake.mode, live.fake.words = "overrun", [" word"] * 300  # an upstream that ignores max_output_tokens
    who = await account(live_store, live, "ann@example.com", "0.001")
    body = {"model": "gpt-fake", "input": "Tell me a long story", "stream": True}
    status, headers, raw = await request(live, "POST", "/v1/responses", key=who.key, json_body=body)
    assert status == 200
    paid_for = int(headers["x-apibox-max-tokens"])
    events = sse_json(raw)
    last = events[-1]
    assert last["type"] == "response.incomplete" and last["response"]["id"] == events[0]["response"]["id"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert (last["response"]["model"], last["response"]["incomplete_details"]) == (
        "gpt-fake", {"reason": "max_output_tokens"})
    delivered = sum(1 for e in events if e["type"] == "response.output_text.delta")
    assert paid_for < delivered <= paid_for + OVERRUN_SLACK_TOKENS + 1
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["estimated"]) == ("cut", 1)
    assert last["response"]["usage"]["output_tokens"] == row["completion_tokens"] == paid_for
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] <= 1000


async def test_a_translated_stream_past_its_paid_for_length_ends_incomplete_in_sequence(
        live: Live, live_store: Any) -> None:
    live.anthropic.mode, live.anthropic.words = "overrun", [" word"] * 300
    who = await account(live_store, live, "ann@example.com", "0.002")
    body = {"model": "claude-fake", "input": "Tell me a long story", "stream": True}
    status, headers, raw = await request(live, "POST", "/v1/responses", key=who.key, json_body=body)
    assert status == 200
    events = sse_json(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-4]["text"] == deltas  # the text done is every delta sent, none held back
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["estimated"]) == ("cut", 1)
    paid_for = int(headers["x-apibox-max-tokens"])
    assert paid_for < tokens.count_tokens(deltas) <= paid_for + OVERRUN_SLACK_TOKENS + 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_openai_compatible_upstream_without_the_api_is_asked_in_chat_from_then_on(
        live: Live, live_store: Any, stream: bool) -> None:
    live.fake.responses_api = False  # a vLLM or an Ollama that answers /v1/responses with 404
    who = await account(live_store, live, "ann@example.com", "1")
    for _ in range(2):
        async with client(live, who.key) as sdk:
            if stream:
                async with sdk.responses.stream(model="gpt-fake", input="Tell me a story") as events:
                    answer = await events.get_final_response()
            else:
                answer = await sdk.responses.create(model="gpt-fake", input="Tell me a story")
        assert (answer.output_text, answer.model, answer.usage.output_tokens) == (TEXT, "gpt-fake", len(WORDS))
    # the first request found the API missing and was answered in chat; the second went to chat at once
    assert [r.path for r in live.fake.requests] == ["/v1/responses", "/v1/chat/completions", "/v1/chat/completions"]
    rows = await wait_for_usage(live, who.user_id, 2)
    assert [(r["status"], r["charged"]) for r in rows] == [("ok", expected_cost("gpt-fake", 21, len(WORDS)))] * 2


TRANSLATED_TEXT = {"demo": "Echo: Tell me a story", "claude-fake": "".join(CLAUDE_WORDS),
                   "gemini-fake": "".join(GEMINI_WORDS)}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", list(TRANSLATED_TEXT))
async def test_other_routes_answer_translated_and_billed_by_their_usage(live: Live, live_store: Any, model: str,
                                                                       stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        if stream:
            async with sdk.responses.stream(model=model, input="Tell me a story") as events:
                kinds = [event.type async for event in events]
                answer = await events.get_final_response()
            assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"]
            assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                                  "response.output_item.done", "response.completed"]
        else:
            answer = await sdk.responses.create(model=model, input="Tell me a story")
    assert (answer.output_text, answer.model, answer.status) == (TRANSLATED_TEXT[model], model, "completed")
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["endpoint"], row["status"], row["estimated"]) == ("responses", "ok", 0)
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (row["prompt_tokens"], row["completion_tokens"])
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_translated_tool_call_is_a_function_call_item(live: Live, live_store: Any, stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.gemini.call_name = "get_weather"
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    async with client(live, who.key) as sdk:
        if stream:
            async with sdk.responses.stream(model="gemini-fake", input="Weather?", tools=[tool]) as events:
                answer = await events.get_final_response()
        else:
            answer = await sdk.responses.create(model="gemini-fake", input="Weather?", tools=[tool])
    calls = [item for item in answer.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Madrid"})]
    assert calls[0].call_id and answer.output_text == "".join(GEMINI_WORDS)
    assert live.gemini.requests[-1].body["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"


@pytest.mark.parametrize(("extra", "param"), [({"tools": [{"type": "local_shell"}]}, "tools[0]"),
                                              ({"input": [{"type": "file_search_call", "id": "x"}]}, "input[0]")])
async def test_what_chat_cannot_carry_is_refused_on_translated_routes_and_costs_nothing(
        live: Live, live_store: Any, extra: dict[str, Any], param: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "demo", "input": "Hi", **extra}
    status, _, raw = await request(live, "POST", "/v1/responses", key=who.key, json_body=body)
    error = json.loads(raw)["error"]
    assert (status, error["param"]) == (400, param) and "use a model routed to OpenAI" in error["message"]
    assert charges(live, who.user_id) == [] and balance(live, who.user_id) == (1_000_000, 0)
    assert usage_rows(live, who.user_id) == []  # refused before the hold: no trace but the 400


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-fake"}, "input"), ({"model": "gpt-fake", "input": []}, "input"),
    ({"model": "gpt-fake", "input": 7}, "input"), ({"input": "Hi"}, "model"),
    ({"model": "gpt-fake", "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "gpt-fake", "input": "Hi", "max_output_tokens": "9"}, "max_output_tokens"),
    ({"model": "gpt-fake", "input": "Hi", "instructions": ["x"]}, "instructions"),
    ({"model": "gpt-fake", "input": "Hi", "stream": "yes"}, "stream"),
    ({"model": "gpt-fake", "input": "Hi", "background": True}, "background"),
    ({"model": "gpt-fake", "input": "Hi", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]},
     "tools[1]")])
async def test_malformed_requests_are_refused_with_the_parameter_named(live: Live, live_store: Any,
                                                                       body: dict[str, Any], param: str) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await request(live, "POST", "/v1/responses", key=who.key, json_body=body)
    assert status == 400 and json.loads(raw)["error"]["param"] == param
    assert live.fake.requests == [] and charges(live, who.user_id) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_upstream_failure_is_the_clients_error_and_costs_nothing(live: Live, live_store: Any,
                                                                          stream: bool) -> None:
    live.fake.mode, live.fake.status = "status", 503
    who = await account(live_store, live, "ann@example.com", "1")
    async with client(live, who.key) as sdk:
        with pytest.raises(openai.APIStatusError) as failed:
            if stream:
                async with sdk.responses.stream(model="gpt-fake", input="Hi") as events:
                    await events.get_final_response()
            else:
                await sdk.responses.create(model="gpt-fake", input="Hi")
    assert failed.value.status_code == 503
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["charged"]) == ("error", 0)


async def test_a_stream_cut_midway_is_an_error_event_and_charged_for_what_was_delivered(
        live: Live, live_store: Any) -> None:
    live.fake.mode = "cut"
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, raw = await request(live, "POST", "/v1/responses", key=who.key,
                                   json_body={"model": "gpt-fake", "input": "Hi", "stream": True},
                                   headers=auth(who.key))
    assert status == 200
    events = sse_json(raw)
    assert events[-1]["type"] == "error" and "incomplete" in events[-1]["message"]
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1
    delivered = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert 0 < len(delivered) < len(TEXT)
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["estimated"]) == ("cut", 1)
    assert row["completion_tokens"] == tokens.count_tokens(delivered)
