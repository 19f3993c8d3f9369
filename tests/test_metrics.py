"""GET /metrics on a live gateway: the page parses with prometheus-client's own text parser, and its
counters move with traffic by exactly what each request did.

Each request kind (an answer, a stream, 401, 402, 429, an upstream error, a stream the upstream
breaks) is made alone between two scrapes, and the test states every sample that must move and by
how much; everything else must stay put. Token and money counters are checked against the
gateway's own usage rows and the test's own price arithmetic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apibox.config import LimitSet, Route, default_settings
from apibox.gateway.app import create_app
from apibox.gateway.exchange import Exchange
from apibox.gateway.metrics import METRICS
from apibox.metrics import LATENCY_BUCKETS, Metrics, PlainCounter, PlainHistogram, PlainInstruments
from apibox.models import UsageRecord
from tests.conftest import Live, serving
from tests.fake_upstream import WORDS, FakeUpstream
from tests.gateway_helpers import Account, account, expected_cost, query, usage_rows
from tests.live_variants import CHAT, Variant, limits, openai_error, request, server, store_of

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]
PROMPT, COMPLETION = 21, len(WORDS)  # what the OpenAI fake reports
OK_COST = expected_cost("gpt-fake", PROMPT, COMPLETION)


def key(name: str, **labels: str) -> tuple[str, Labels]:
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (prometheus-client's own parser)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[key(sample.name, **sample.labels)] = sample.value
    return samples


async def scrape(live: Live) -> Samples:
    status, headers, raw = await request(live, "GET", "/metrics")  # no key
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/plain")
    return parse(raw.decode())


def moved(before: Samples, after: Samples) -> dict[tuple[str, Labels], float]:
    """apibox's samples that changed, without the ones that depend on time (_created, _sum, _bucket);
    the process's own (CPU, memory, garbage collection) move with the test itself."""
    names = {k for k in set(before) | set(after) if k[0].startswith("apibox_")}
    return {k: after.get(k, 0) - before.get(k, 0) for k in names
            if not k[0].endswith(("_created", "_sum", "_bucket")) and after.get(k, 0) != before.get(k, 0)}


async def settled_scrape(live: Live, requests: int, timeout: float = 5.0) -> Samples:
    """A scrape once ``requests`` API requests in all are counted and none is in flight or holding money
    (a stream is counted just after its last byte, so a client may see the end first)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(live)
        counted = sum(v for (name, _), v in samples.items() if name == "apibox_requests_total")
        idle = all(samples.get(key(name), 0) == 0 for name in
                   ("apibox_requests_in_flight", "apibox_open_holds", "apibox_held_micro_usd"))
        if counted == requests and idle:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{counted} requests counted (wanted {requests}); in flight or holding: {samples}")
        await asyncio.sleep(0.02)


def billed(model: str, provider: str, prompt: int, completion: int, cost: int, status: str = "200",
           ttft: bool = True) -> dict[tuple[str, Labels], float]:
    """What one billed request that reached its upstream adds."""
    changes = {
        key("apibox_requests_total", model=model, provider=provider, status=status): 1,
        key("apibox_request_duration_seconds_count", model=model): 1,
        key("apibox_upstream_response_seconds_count", provider=provider): 1,
        key("apibox_tokens_total", model=model, **{"class": "prompt"}): prompt,
        key("apibox_tokens_total", model=model, **{"class": "completion"}): completion,
        key("apibox_cost_micro_usd_total", model=model): cost,
        key("apibox_charged_micro_usd_total", model=model): cost,
    }
    if ttft:
        changes[key("apibox_time_to_first_token_seconds_count", model=model, provider=provider)] = 1
    return {k: v for k, v in changes.items() if v}


def refused(model: str, status: int, code: str) -> dict[tuple[str, Labels], float]:
    """What a request refused before any upstream call adds."""
    changes = {key("apibox_requests_total", model=model, provider="", status=str(status)): 1,
               key("apibox_request_duration_seconds_count", model=model): 1}
    if status == 429:
        changes[key("apibox_rate_limited_total", code=code)] = 1
    else:
        changes[key("apibox_rejected_total", status=str(status), code=code)] = 1
    return changes


@pytest.fixture
def start(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Callable[..., Live]]:
    """start(change, ...) -> a live gateway with changed settings, stopped and audited after the test."""
    with ExitStack() as stack:
        yield lambda *changes: stack.enter_context(serving(Variant(tmp_path, database_url, fake, *changes)))


# -- the page ---------------------------------------------------------------------------------


async def test_the_page_needs_no_key_parses_and_is_not_itself_counted(live: Live) -> None:
    status, headers, raw = await request(live, "GET", "/metrics")
    assert status == 200 and headers["x-request-id"].startswith("req_")
    assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    for name, kind in (("apibox_requests", "counter"), ("apibox_request_duration_seconds", "histogram"),
                       ("apibox_time_to_first_token_seconds", "histogram"),
                       ("apibox_upstream_response_seconds", "histogram"), ("apibox_tokens", "counter"),
                       ("apibox_cost_micro_usd", "counter"), ("apibox_charged_micro_usd", "counter"),
                       ("apibox_open_holds", "gauge"), ("apibox_held_micro_usd", "gauge"),
                       ("apibox_rate_limited", "counter"), ("apibox_rejected", "counter"),
                       ("apibox_upstream_failures", "counter"), ("apibox_requests_in_flight", "gauge")):
        assert families[name].type == kind, name
        assert families[name].documentation
    first = parse(raw.decode())
    for path in ("/metrics", "/healthz", "/readyz", "/metrics"):
        assert (await request(live, "GET", path))[0] == 200
    again = await scrape(live)
    assert moved(first, again) == {}  # neither scrapes nor probes are API requests
    assert again[key("apibox_requests_in_flight")] == 0  # not even the scrape being answered
    assert not [k for k in again if k[0] == "apibox_requests_total"]


async def test_metrics_answer_at_the_in_flight_cap_and_show_the_open_hold(start) -> None:
    live = start(server(max_in_flight=1))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    live.fake.delay = 0.5
    slow = asyncio.ensure_future(request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT))
    deadline = time.monotonic() + 5
    while not live.fake.requests:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    during = await scrape(live)  # the one slot is taken, yet /metrics answers
    holds = query(live, "SELECT amount FROM holds")
    assert len(holds) == 1 and holds[0]["amount"] > 0
    assert during[key("apibox_open_holds")] == 1
    assert during[key("apibox_held_micro_usd")] == holds[0]["amount"]
    assert during[key("apibox_requests_in_flight")] == 1
    status, _, raw = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT)
    assert status == 503 and openai_error(raw)["code"] == "overloaded"
    assert (await slow)[0] == 200
    after = await settled_scrape(live, 2)
    assert moved(during, after) == {
        **billed("gpt-fake", "fake", PROMPT, COMPLETION, OK_COST),
        key("apibox_requests_total", model="", provider="", status="503"): 1,
        key("apibox_request_duration_seconds_count", model=""): 1,
        key("apibox_open_holds"): -1, key("apibox_held_micro_usd"): -holds[0]["amount"],
        key("apibox_requests_in_flight"): -1,
    }


# -- counters move with traffic ---------------------------------------------------------------


async def test_each_kind_of_request_moves_exactly_its_counters(start) -> None:
    live = start(limits(user=LimitSet(rpm=4)))
    async with store_of(live) as db:
        ann = await account(db, live, "ann@example.com", "1")
        broke = await account(db, live, "bob@example.com", "0")
    counted = 0

    async def step(user: Account | None, body: dict[str, Any], status: int, *, secret: str | None = None,
                   path: str = "/v1/chat/completions") -> tuple[dict[tuple[str, Labels], float], bytes]:
        nonlocal counted
        before = await settled_scrape(live, counted)
        got, _, raw = await request(live, "POST", path, key=secret or (user.key if user else None), json_body=body)
        assert got == status, raw
        counted += 1
        return moved(before, await settled_scrape(live, counted)), raw

    changes, _ = await step(ann, CHAT, 200)
    assert changes == billed("gpt-fake", "fake", PROMPT, COMPLETION, OK_COST)

    changes, raw = await step(ann, {**CHAT, "stream": True}, 200)
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert changes == billed("gpt-fake", "fake", PROMPT, COMPLETION, OK_COST)

    changes, _ = await step(broke, CHAT, 402)
    assert changes == refused("gpt-fake", 402, "insufficient_quota")

    changes, _ = await step(None, CHAT, 401, secret="sk-ab-" + "x" * 40)
    assert changes == refused("", 401, "invalid_api_key")

    live.fake.mode, live.fake.status = "status", 500
    changes, raw = await step(ann, CHAT, 502)
    assert openai_error(raw)["code"] == "upstream_error"
    assert changes == {
        key("apibox_requests_total", model="gpt-fake", provider="fake", status="502"): 1,
        key("apibox_request_duration_seconds_count", model="gpt-fake"): 1,
        key("apibox_upstream_response_seconds_count", provider="fake"): 1,  # its error head came
        key("apibox_upstream_failures_total", provider="fake", code="upstream_error"): 1,
    }

    live.fake.mode = "cut"  # the upstream's connection dies half-way through a stream
    changes, raw = await step(ann, {**CHAT, "stream": True}, 200)
    row = usage_rows(live, ann.user_id)[-1]
    assert (row["status"], row["http_status"]) == ("cut", 502)
    assert row["completion_tokens"] > 0 and row["cost"] > 0
    assert changes == billed("gpt-fake", "fake", row["prompt_tokens"], row["completion_tokens"], row["cost"],
                             status="502")

    live.fake.mode = "ok"  # ann's fifth request within the minute: over the user rpm of 4
    changes, raw = await step(ann, CHAT, 429)
    assert openai_error(raw)["code"] == "rate_limit_exceeded"
    assert changes == refused("gpt-fake", 429, "rate_limit_exceeded")

    rows = usage_rows(live)
    total = await settled_scrape(live, counted)
    assert sum(r["cost"] for r in rows) == sum(
        v for (name, _), v in total.items() if name == "apibox_cost_micro_usd_total")
    assert sum(r["charged"] for r in rows) == sum(
        v for (name, _), v in total.items() if name == "apibox_charged_micro_usd_total")


async def test_other_routes_count_under_their_own_provider(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    before = await settled_scrape(live, 0)
    for model in ("claude-fake", "gemini-fake"):
        status, _, raw = await request(live, "POST", "/v1/chat/completions", key=who.key,
                                       json_body={**CHAT, "model": model})
        assert status == 200, raw
    changes = moved(before, await settled_scrape(live, 2))
    rows = {r["model"]: r for r in usage_rows(live, who.user_id)}
    expected: dict[tuple[str, Labels], float] = {}
    for model, provider in (("claude-fake", "claude"), ("gemini-fake", "google")):
        row = rows[model]
        assert row["provider"] == provider
        expected.update(billed(model, provider, row["prompt_tokens"], row["completion_tokens"], row["cost"]))
        for token_class, column in (("cached", "cached_tokens"), ("cache_write", "cache_write_tokens"),
                                    ("reasoning", "reasoning_tokens")):
            if row[column]:
                expected[key("apibox_tokens_total", model=model, **{"class": token_class})] = row[column]
    assert changes == expected


async def test_cached_and_reasoning_tokens_are_counted_in_their_classes(live: Live, live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.cached_tokens, live.fake.reasoning_tokens = 5, 2
    before = await settled_scrape(live, 0)
    assert (await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT))[0] == 200
    changes = moved(before, await settled_scrape(live, 1))
    cost = usage_rows(live, who.user_id)[0]["cost"]
    assert cost == expected_cost("gpt-fake", PROMPT, COMPLETION, cached=5)
    assert changes == {
        **billed("gpt-fake", "fake", PROMPT, COMPLETION, cost),
        key("apibox_tokens_total", model="gpt-fake", **{"class": "cached"}): 5,
        key("apibox_tokens_total", model="gpt-fake", **{"class": "reasoning"}): 2,
    }


async def test_the_page_has_the_processs_cpu_memory_and_garbage_collector(live: Live, live_store) -> None:
    samples = await scrape(live)
    assert samples[key("process_resident_memory_bytes")] > 10_000_000
    assert samples[key("process_cpu_seconds_total")] > 0
    assert samples[key("process_open_fds")] > 0
    for generation in "012":
        assert key("python_gc_collections_total", generation=generation) in samples
    assert [labels for name, labels in samples if name == "python_info"] != []


# -- one registry per app ---------------------------------------------------------------------


def test_two_apps_in_one_process_keep_their_own_counts() -> None:
    first, second = create_app(default_settings()), create_app(default_settings())
    assert first[METRICS].registry is not second[METRICS].registry
    first[METRICS].answered("demo", "echo", 200, 0.1, None)
    assert parse(first[METRICS].exposition().decode())[
        key("apibox_requests_total", model="demo", provider="echo", status="200")] == 1
    assert not [k for k in parse(second[METRICS].exposition().decode()) if k[0] == "apibox_requests_total"]
    assert prometheus_client.REGISTRY.get_sample_value(
        "apibox_requests_total", {"model": "demo", "provider": "echo", "status": "200"}) is None


# -- a settlement written after the answer ----------------------------------------------------


class FakeRequest(dict):
    method, path = "POST", "/v1/chat/completions"


async def test_a_request_whose_settlement_is_still_being_written_is_counted_once_it_is() -> None:
    """A client gone mid-stream can leave its handler before its (shielded) settlement is written: the hold
    stays open in the gauge until then, and the request is counted with the usage row's status and tokens."""
    metrics = Metrics()
    settlement = asyncio.get_running_loop().create_future()
    call = SimpleNamespace(settlement=settlement, route=Route("fake", "fake-model-1"),
                           reservation=SimpleNamespace(hold=SimpleNamespace(amount=70)))
    exchange = Exchange(metrics, "req_1", model="gpt-fake")
    exchange.holding(call)  # type: ignore[arg-type]
    exchange.finish(FakeRequest(), 200, counted=True, log=False)  # type: ignore[arg-type]
    before = parse(metrics.exposition().decode())
    assert before[key("apibox_open_holds")] == 1 and before[key("apibox_held_micro_usd")] == 70
    assert not [k for k in before if k[0] == "apibox_requests_total"]
    settlement.set_result(UsageRecord(
        request_id="req_1", user_id=1, key_id=1, model="gpt-fake", provider="fake", endpoint="chat/completions",
        status="client_gone", http_status=499, prompt_tokens=21, completion_tokens=3, cost=83, charged=83,
        latency_ms=40, ttft_ms=12))
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    expected = billed("gpt-fake", "fake", 21, 3, 83, status="499")
    del expected[key("apibox_upstream_response_seconds_count", provider="fake")]  # no upstream call here
    assert moved(before, parse(metrics.exposition().decode())) == {
        **expected, key("apibox_open_holds"): -1, key("apibox_held_micro_usd"): -70}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(min_value=0, max_value=500, allow_nan=False)),
                max_size=40))
def test_the_plain_instruments_expose_what_prometheus_clients_own_would(observations: list[tuple[str, float]]) -> None:
    """Same families, names, labels, buckets, counts and sums as prometheus-client's Counter and Histogram."""
    plain_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    counter = PlainCounter("x_requests", "Requests.", ("model",))
    histogram = PlainHistogram("x_seconds", "Seconds.", ("model",), LATENCY_BUCKETS)
    plain_registry.register(PlainInstruments([counter, histogram]))
    reference_counter = Counter("x_requests", "Requests.", ("model",), registry=reference_registry)
    reference_histogram = Histogram("x_seconds", "Seconds.", ("model",), buckets=LATENCY_BUCKETS,
                                    registry=reference_registry)
    for model, value in observations:
        counter.inc((model,), value)
        histogram.observe((model,), value)
        reference_counter.labels(model).inc(value)
        reference_histogram.labels(model).observe(value)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, Labels], float]:
        return {k: pytest.approx(v) for k, v in parse(generate_latest(registry).decode()).items()
                if not k[0].endswith("_created")}
    assert samples(plain_registry) == samples(reference_registry)
