"""What an upstream reports as usage, read so that nothing real is charged as nothing.

A count is a JSON number: a whole one as it is, a float (JSON readers give numbers past 2**64
as floats) rounded up, so an absurd count is clamped by billing at 10**12 tokens rather than
read as zero. A usage object with no usable prompt count, or with a completion count that is
not a number, is no report: the gateway estimates, as it does when usage is missing.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apibox import tokens
from apibox.billing import MOST_TOKENS_A_REQUEST
from apibox.formats.anthropic import usage_from_anthropic
from apibox.formats.gemini import usage_from_gemini
from apibox.formats.responses import usage_from_responses
from apibox.openai_wire import usage_from_openai
from apibox.pricing import Usage, token_count
from tests.conftest import Live
from tests.fake_anthropic import WORDS as CLAUDE_WORDS
from tests.fake_gemini import WORDS as GEMINI_WORDS
from tests.fake_upstream import WORDS
from tests.gateway_helpers import account, balance, charges, wait_for_usage
from tests.live_variants import request

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "prompt_tokens_details",
              "completion_tokens_details", "prompt_cache_hit_tokens")


def test_a_count_is_a_json_number_and_nothing_else() -> None:
    assert [token_count(v) for v in (7, 0, -3, 2.0, 2.5, -0.5, 1e20, float("nan"), True, "5", None, [1])] == [
        7, 0, None, 2, 3, None, 10**18, None, None, None, None, None]
    assert token_count(orjson.loads(b"100000000000000000000")) == 10**18  # past 2**64: orjson gives a float


@pytest.mark.parametrize("raw", [{}, {"prompt_tokens": "5", "completion_tokens": 3},
                                 {"prompt_tokens": 5, "completion_tokens": "3"}, {"completion_tokens": 3},
                                 {"total_tokens": 8}, {"prompt_tokens": True, "completion_tokens": 1},
                                 {"prompt_tokens": -100, "completion_tokens": -50},
                                 {"prompt_tokens": 20, "completion_tokens": -1},
                                 {"prompt_tokens": 0, "completion_tokens": 0},
                                 {"prompt_tokens": 20}, {"prompt_tokens": 20, "completion_tokens": None},
                                 {"prompt_tokens": 20, "total_tokens": 19}])
def test_a_usage_object_without_usable_counts_is_no_report(raw: dict[str, Any]) -> None:
    assert usage_from_openai(raw) is None
    assert usage_from_responses({"input_tokens": raw.get("prompt_tokens"),
                                 "output_tokens": raw.get("completion_tokens")}) is None


def test_usable_counts_are_read_whatever_else_comes_with_them() -> None:
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0)  # embeddings: no completion
    assert usage_from_openai({"prompt_tokens": 1e20, "completion_tokens": 3.0, "prompt_tokens_details": "x",
                              "completion_tokens_details": [1]}) == Usage(10**18, 3)
    assert usage_from_openai({"prompt_tokens": 0, "input_tokens": 9, "output_tokens": 2}) == Usage(9, 2)
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 11}) == Usage(8, 3)  # the answer: the rest
    assert usage_from_anthropic({"input_tokens": 2.0e30, "output_tokens": 0}) == Usage(10**18, 0)
    assert usage_from_anthropic({"input_tokens": 0, "cache_read_input_tokens": 5, "output_tokens": 2}) == Usage(
        5, 2, cached_tokens=5)  # all of the prompt read from the cache
    assert usage_from_gemini({"promptTokenCount": 4.0, "candidatesTokenCount": 1e19}) == Usage(4, 10**18)
    assert usage_from_gemini({"promptTokenCount": 4, "totalTokenCount": 4}) == Usage(4, 0)  # an empty answer


@pytest.mark.parametrize("raw", [{}, {"input_tokens": 5}, {"output_tokens": 5},
                                 {"input_tokens": "5", "output_tokens": 1},
                                 {"input_tokens": 5, "output_tokens": "x"}, {"input_tokens": -5, "output_tokens": 1},
                                 {"input_tokens": 0, "output_tokens": 3}])
def test_an_anthropic_usage_without_both_counts_is_no_report(raw: dict[str, Any]) -> None:
    assert usage_from_anthropic(raw) is None


@pytest.mark.parametrize("raw", [{}, {"candidatesTokenCount": 3}, {"promptTokenCount": 4},
                                 {"promptTokenCount": -4, "candidatesTokenCount": 3},
                                 {"promptTokenCount": 4, "candidatesTokenCount": -3},
                                 {"promptTokenCount": 0, "candidatesTokenCount": 3, "totalTokenCount": 3}])
def test_a_gemini_usage_without_both_counts_is_no_report(raw: dict[str, Any]) -> None:
    """A prompt alone (a stream's early chunks) counts no answer: no report until one does."""
    assert usage_from_gemini(raw) is None


@given(st.dictionaries(st.sampled_from(USAGE_KEYS), JSON_VALUES, max_size=6))
def test_any_usage_object_reads_as_no_report_or_as_whole_non_negative_counts(raw: dict[str, Any]) -> None:
    for read in (usage_from_openai, usage_from_responses, usage_from_anthropic, usage_from_gemini):
        usage = read(raw)
        if usage is not None:
            counts = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens,
                      usage.reasoning_tokens)
            assert all(type(c) is int and c >= 0 for c in counts)


@given(st.integers(min_value=1, max_value=10**30), st.integers(min_value=0, max_value=10**30))
def test_whole_counts_are_read_as_they_came(prompt: int, completion: int) -> None:
    assert usage_from_openai({"prompt_tokens": prompt, "completion_tokens": completion}) == Usage(prompt, completion)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("reported", [{}, {"prompt_tokens": "21", "completion_tokens": "9"},
                                      {"prompt_tokens": -100, "completion_tokens": -50},
                                      {"prompt_tokens": 0, "completion_tokens": 0}, {"prompt_tokens": 21}],
                         ids=["empty", "strings", "negative", "zero", "no-answer"])
async def test_an_answer_with_unusable_usage_is_charged_an_estimate(live: Live, live_store: Any, stream: bool,
                                                                    reported: dict[str, Any]) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.reported_usage = reported
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Tell me a story"}], "stream": stream}
    status, _, _ = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=body)
    assert status == 200
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["estimated"]) == ("ok", 1)
    assert row["completion_tokens"] == sum(tokens.count_tokens(word) for word in WORDS) and row["prompt_tokens"] > 0
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("model", "reported"), [
    ("claude-fake", {}), ("claude-fake", {"input_tokens": -30, "output_tokens": -9}),
    ("gemini-fake", {}), ("gemini-fake", {"promptTokenCount": -40, "candidatesTokenCount": 4})],
    ids=["claude-none", "claude-negative", "gemini-none", "gemini-negative"])
async def test_anthropic_and_gemini_answers_without_usable_usage_are_charged_an_estimate(
        live: Live, live_store: Any, model: str, reported: dict[str, Any], stream: bool) -> None:
    """Translated for an OpenAI client, as an OpenAI upstream's are: never charged as nothing."""
    who = await account(live_store, live, "ann@example.com", "1")
    fake = live.anthropic if model == "claude-fake" else live.gemini
    fake.reported_usage = reported
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}], "stream": stream}
    status, _, _ = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=body)
    assert status == 200
    [row] = await wait_for_usage(live, who.user_id, 1)
    words = CLAUDE_WORDS if model == "claude-fake" else GEMINI_WORDS
    assert (row["status"], row["estimated"]) == ("ok", 1)
    assert row["completion_tokens"] == sum(tokens.count_tokens(word) for word in words) and row["prompt_tokens"] > 0
    assert charges(live, who.user_id) == [row["charged"]] and row["charged"] > 0


async def test_an_absurd_count_is_clamped_and_charged_no_more_than_the_balance(live: Live, live_store: Any) -> None:
    who = await account(live_store, live, "ann@example.com", "0.5")
    live.fake.reported_usage = json.loads('{"prompt_tokens": 100000000000000000000, "completion_tokens": 3}')
    status, _, raw = await request(live, "POST", "/v1/chat/completions", key=who.key,
                                   json_body={"model": "gpt-fake", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["prompt_tokens"], row["estimated"]) == (MOST_TOKENS_A_REQUEST, 0)
    assert row["charged"] == 500_000 < row["cost"] and balance(live, who.user_id) == (0, 0)
    assert json.loads(raw)["usage"]["cost"] == 0.5  # what the client was charged, not the price of the count


def test_the_prompts_bound_counts_what_else_the_upstream_reads() -> None:
    from apibox.tokens import prompt_bound
    plain = {"messages": [{"role": "user", "content": "Hi"}]}
    schema = {"type": "json_schema", "json_schema": {"name": "A", "schema": {"type": "object", "properties": {
        f"field{n}": {"type": "string", "description": "x" * 100} for n in range(50)}}}}
    assert prompt_bound({**plain, "response_format": schema}) >= prompt_bound(plain) + len(str(schema))
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR" * 10_000, "format": "wav"}}
    file = {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "JVBER" * 10_000}}
    for part in (audio, file):
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}]}
        assert prompt_bound(body) >= prompt_bound(plain) + 50_000
