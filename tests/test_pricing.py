"""Pricing: the one rounding rule, the hold's worst case, and what a balance can pay for."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apibox.config import load_settings
from apibox.money import format_usd, parse_usd
from apibox.pricing import PER_MILLION, Price, Usage, affordable_output_tokens, cost_micro, worst_case_micro

rates = st.integers(min_value=0, max_value=200_000_000)  # up to $200 per 1M tokens
counts = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def prices(draw: st.DrawFn) -> Price:
    return Price(input=draw(rates), output=draw(rates), cached_input=draw(st.none() | rates),
                 cache_write=draw(st.none() | rates), cache_write_1h=draw(st.none() | rates),
                 reasoning=draw(st.none() | rates))


@st.composite
def usages(draw: st.DrawFn, max_prompt: int = 2_000_000, max_completion: int = 2_000_000) -> Usage:
    """Usage in OpenAI's convention: prompt includes cached and cache-write tokens,
    completion includes reasoning tokens."""
    prompt = draw(st.integers(min_value=0, max_value=max_prompt))
    cached = draw(st.integers(min_value=0, max_value=prompt))
    cache_write = draw(st.integers(min_value=0, max_value=prompt - cached))
    write_1h = draw(st.integers(min_value=0, max_value=cache_write))
    completion = draw(st.integers(min_value=0, max_value=max_completion))
    reasoning = draw(st.integers(min_value=0, max_value=completion))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                 cache_write_tokens=cache_write, cache_write_1h_tokens=write_1h, reasoning_tokens=reasoning)


def exact_cost(price: Price, usage: Usage) -> Fraction:
    """The oracle: each token class at its own rate (defaults as DESIGN.md says), in exact fractions of a micro."""
    cached_rate = price.input if price.cached_input is None else price.cached_input
    write_rate = price.input if price.cache_write is None else price.cache_write
    write_1h_rate = write_rate if price.cache_write_1h is None else price.cache_write_1h
    reasoning_rate = price.output if price.reasoning is None else price.reasoning
    plain_in = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
    plain_out = usage.completion_tokens - usage.reasoning_tokens
    write_5m = usage.cache_write_tokens - usage.cache_write_1h_tokens
    total = (plain_in * price.input + usage.cached_tokens * cached_rate + write_5m * write_rate
             + usage.cache_write_1h_tokens * write_1h_rate + plain_out * price.output
             + usage.reasoning_tokens * reasoning_rate)
    return Fraction(total, PER_MILLION)


# -- the rounding rule ---------------------------------------------------------------------

@given(prices(), usages())
def test_cost_is_the_exact_value_rounded_up_once(price: Price, usage: Usage) -> None:
    exact = exact_cost(price, usage)
    cost = cost_micro(price, usage)
    assert cost == math.ceil(exact)
    assert cost >= exact  # never in the user's favour
    assert cost - exact < 1  # and never more than 1 micro-USD against them


@pytest.mark.parametrize(("usage", "micro"), [
    (Usage(), 0),
    (Usage(prompt_tokens=1), 1),  # 0.15 micro rounds up to 1
    (Usage(prompt_tokens=1_000_000), 150_000),
    (Usage(completion_tokens=1_000_000), 600_000),
    (Usage(prompt_tokens=1_000, completion_tokens=500), 450),  # 150 + 300, exact: no rounding
    (Usage(prompt_tokens=7, completion_tokens=3), 3),  # 1.05 + 1.8 = 2.85 -> 3 (one rounding, not two)
])
def test_cost_examples_at_gpt4o_mini_prices(usage: Usage, micro: int) -> None:
    price = Price(input=parse_usd("0.15"), output=parse_usd("0.60"))
    assert cost_micro(price, usage) == micro


def test_each_token_class_has_its_own_rate() -> None:
    price = Price(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000,
                  reasoning=20_000_000)
    million = 1_000_000
    assert cost_micro(price, Usage(prompt_tokens=million)) == 3_000_000
    assert cost_micro(price, Usage(prompt_tokens=million, cached_tokens=million)) == 300_000
    assert cost_micro(price, Usage(prompt_tokens=million, cache_write_tokens=million)) == 3_750_000
    assert cost_micro(price, Usage(prompt_tokens=million, cache_write_tokens=million,
                                   cache_write_1h_tokens=million)) == 3_750_000  # unset: cache_write's rate
    assert cost_micro(replace(price, cache_write_1h=5_000_000),
                      Usage(prompt_tokens=million, cache_write_tokens=million, cache_write_1h_tokens=400_000)
                      ) == 600_000 * 3_750_000 // million + 400_000 * 5_000_000 // million
    assert cost_micro(price, Usage(completion_tokens=million)) == 15_000_000
    assert cost_micro(price, Usage(completion_tokens=million, reasoning_tokens=million)) == 20_000_000
    mixed = Usage(prompt_tokens=4 * million, cached_tokens=million, cache_write_tokens=million,
                  completion_tokens=2 * million, reasoning_tokens=million)
    assert cost_micro(price, mixed) == 2 * 3_000_000 + 300_000 + 3_750_000 + 15_000_000 + 20_000_000


def test_optional_rates_default_as_documented() -> None:
    """cached_input and cache_write default to input; reasoning defaults to output."""
    price = Price(input=2_000_000, output=8_000_000)
    assert price.cached_input_rate == 2_000_000
    assert price.cache_write_rate == 2_000_000
    assert price.reasoning_rate == 8_000_000
    usage = Usage(prompt_tokens=1_000, cached_tokens=400, cache_write_tokens=100, completion_tokens=50,
                  reasoning_tokens=20)
    assert cost_micro(price, usage) == cost_micro(price, Usage(prompt_tokens=1_000, completion_tokens=50))
    assert cost_micro(price, usage) == 2_000 + 400


@given(prices(), usages())
def test_class_split_never_costs_more_than_the_dearest_rates(price: Price, usage: Usage) -> None:
    assert cost_micro(price, usage) <= worst_case_micro(price, usage.prompt_tokens, usage.completion_tokens)


@given(prices(), counts, counts, counts, counts, counts)
def test_inconsistent_usage_never_bills_more_tokens_than_reported(
        price: Price, prompt: int, cached: int, cache_write: int, completion: int, reasoning: int) -> None:
    """An upstream may report cached + cache-write tokens beyond its prompt_tokens (or reasoning beyond
    completion); apibox must still not bill more input tokens than the prompt had, so the cost stays
    within the worst case of the reported counts."""
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                  cache_write_tokens=cache_write, reasoning_tokens=reasoning)
    assert cost_micro(price, usage) <= worst_case_micro(price, prompt, completion)


def test_overlapping_cache_counts_bill_each_prompt_token_once() -> None:
    price = Price(input=1_000_000, output=1_000_000)  # 1 micro a token
    usage = Usage(prompt_tokens=10, cached_tokens=8, cache_write_tokens=8)
    assert cost_micro(price, usage) == 10


# -- the hold ------------------------------------------------------------------------------

@given(prices(), st.data())
def test_worst_case_covers_every_usage_within_the_bound(price: Price, data: st.DataObject) -> None:
    prompt_bound = data.draw(st.integers(min_value=0, max_value=500_000), label="prompt_bound")
    output_cap = data.draw(st.integers(min_value=0, max_value=500_000), label="output_cap")
    usage = data.draw(usages(max_prompt=prompt_bound, max_completion=output_cap), label="usage")
    assert worst_case_micro(price, prompt_bound, output_cap) >= cost_micro(price, usage)


@given(prices(), counts, counts)
def test_worst_case_is_the_dearest_rates_rounded_up(price: Price, prompt: int, output: int) -> None:
    dearest_in = max(price.input, price.cached_input_rate, price.cache_write_rate, price.cache_write_1h_rate)
    dearest_out = max(price.output, price.reasoning_rate)
    exact = Fraction(prompt * dearest_in + output * dearest_out, PER_MILLION)
    assert worst_case_micro(price, prompt, output) == math.ceil(exact)


def test_worst_case_uses_a_dearer_cache_write_rate() -> None:
    price = Price(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000)
    assert worst_case_micro(price, 1_000_000, 0) == 3_750_000
    assert worst_case_micro(Price(input=1, output=2_000_000, reasoning=5_000_000), 0, 1_000_000) == 5_000_000
    assert worst_case_micro(replace(price, cache_write_1h=6_000_000), 1_000_000, 0) == 6_000_000


# -- what a balance pays for ----------------------------------------------------------------

@given(prices(), st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=1_000_000))
def test_affordable_output_is_affordable_and_one_more_is_not(price: Price, available: int, prompt: int) -> None:
    n = affordable_output_tokens(price, available, prompt)
    assert n >= 0
    if worst_case_micro(price, prompt, 0) > available:
        assert n == 0  # not even the prompt: nothing
        return
    assert worst_case_micro(price, prompt, n) <= available
    if price.max_output_rate > 0:
        assert worst_case_micro(price, prompt, n + 1) > available


def test_affordable_output_examples() -> None:
    price = Price(input=1_000_000, output=2_000_000)  # 1 and 2 micro a token
    assert affordable_output_tokens(price, 1_000, 100) == 450
    assert affordable_output_tokens(price, 1_001, 100) == 450
    assert affordable_output_tokens(price, 1_002, 100) == 451
    assert affordable_output_tokens(price, 100, 100) == 0
    assert affordable_output_tokens(price, 99, 100) == 0
    assert affordable_output_tokens(Price(input=1, output=0), 1, 0) == 2**31 - 1


# -- many small charges ---------------------------------------------------------------------

def test_ten_thousand_small_charges_sum_exactly() -> None:
    """Integers do not drift: 10,000 charges of 0.000450 USD are exactly 4.5 USD."""
    price = Price(input=parse_usd("0.15"), output=parse_usd("0.60"))
    usage = Usage(prompt_tokens=1_000, completion_tokens=500)
    costs = [cost_micro(price, usage) for _ in range(10_000)]
    total = sum(costs)
    assert total == 4_500_000
    assert format_usd(total) == "4.500000"
    assert sum(Decimal(format_usd(c)) for c in costs) == Decimal("4.5")
    # What floats would have done with the same per-request USD amounts:
    assert sum(0.00045 for _ in range(10_000)) != 4.5


@given(prices(), st.lists(usages(max_prompt=5_000, max_completion=5_000), min_size=1, max_size=200))
def test_a_sum_of_charges_is_the_sum_of_each_rounded_once(price: Price, batch: list[Usage]) -> None:
    total = sum(cost_micro(price, u) for u in batch)
    assert total == sum(math.ceil(exact_cost(price, u)) for u in batch)
    assert 0 <= total - sum(exact_cost(price, u) for u in batch) < len(batch)


# -- prices from configuration --------------------------------------------------------------

def test_config_prices_are_exact_micro_per_million(config_path: Path) -> None:
    models = load_settings(str(config_path)).model_index()
    assert models["gpt-fake"].price == Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)
    assert models["embed-fake"].price == Price(input=20_000, output=0)
    assert models["demo"].price == Price(input=5_000_000, output=15_000_000)


def test_a_model_anthropic_serves_prices_an_hours_cache_write_at_twice_input(tmp_path: Path) -> None:
    config = tmp_path / "apibox.yaml"
    config.write_text("""
providers:
  - {name: claude, type: anthropic, api_key: k}
  - {name: openai, type: openai, base_url: "http://127.0.0.1:9/v1", api_key: k}
models:
  - name: sonnet
    routes: [{provider: claude}]
    price: {input: 3, output: 15, cache_write: 3.75}
    price_schedule: [{effective_from: "2030-01-01T00:00:00Z", input: 2}]
  - name: sonnet-set
    routes: [{provider: claude}]
    price: {input: 3, output: 15, cache_write_1h: 5}
  - name: gpt
    routes: [{provider: openai}]
    price: {input: 3, output: 15}
""")
    models = {m.name: m for m in load_settings(str(config)).models}
    sonnet = models["sonnet"]
    assert (sonnet.price.cache_write_1h, sonnet.schedule[0][1].cache_write_1h) == (6_000_000, 4_000_000)
    assert worst_case_micro(sonnet.price, 1_000_000, 0) == 6_000_000  # the hold covers an hour's write
    assert models["sonnet-set"].price.cache_write_1h == 5_000_000  # the config's own rate stands
    assert models["gpt"].price.cache_write_1h is None and models["gpt"].price.max_input_rate == 3_000_000
