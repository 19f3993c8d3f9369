"""Prices as users meet them: schedules by arrival time, group multipliers and plans, fees."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest

from apibox import accounts
from apibox.config import Settings, parse_settings
from apibox.pricing import Price
from tests.conftest import Live, ServerThread, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account, balance, charges, wait_for_usage
from tests.live_variants import MESSAGES

CHANGE_AT = datetime(2026, 12, 1, tzinfo=UTC)
OLD = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)
NEW = Price(input=2_000_000, output=8_000_000, cached_input=1_250_000, per_request=1_000)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Scheduled(ServerThread):
    """The test config, with gpt-fake's price changing at CHANGE_AT, on a clock the test moves."""

    def configure(self, settings: Settings) -> Settings:
        models = tuple(replace(m, schedule=((CHANGE_AT, NEW),)) if m.name == "gpt-fake" else m
                       for m in settings.models)
        return replace(settings, models=models)


@pytest.fixture
def clock() -> Clock:
    return Clock(CHANGE_AT - timedelta(seconds=1))


@pytest.fixture
def live(tmp_path: Path, database_url: str, fake: FakeUpstream, clock: Clock) -> Iterator[Live]:
    server = Scheduled(tmp_path, database_url, fake)
    server.clock = clock
    with serving(server) as running:
        yield running


def cost(price: Price, prompt: int, completion: int, cached: int = 0, multiplier: int = 1_000_000) -> int:
    """The rounding rule written out independently: one ceil over tokens, fee and multiplier."""
    scaled = (prompt - cached) * price.input + cached * price.cached_input_rate + completion * price.output
    return -(-(scaled + price.per_request * 1_000_000) * multiplier // 10**12)


async def chat(live: Live, key: str) -> openai.types.chat.ChatCompletion:
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=key, max_retries=0) as client:
        return await client.chat.completions.create(model="gpt-fake", messages=MESSAGES)


async def test_a_price_change_applies_only_to_requests_arriving_after_it(live: Live, live_store, clock: Clock) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    prompt, completion = live.fake.prompt_tokens, len(live.fake.words)
    before = await chat(live, who.key)
    clock.now = CHANGE_AT  # the moment itself already has the new price
    after = await chat(live, who.key)
    await wait_for_usage(live, who.user_id, 2)
    expected = [cost(OLD, prompt, completion), cost(NEW, prompt, completion)]
    assert charges(live, who.user_id) == expected
    assert [round(r.usage.cost * 1_000_000) for r in (before, after)] == expected  # type: ignore[union-attr]
    assert balance(live, who.user_id) == (1_000_000 - sum(expected), 0)


async def test_models_list_the_current_price_and_the_next_change(live: Live, live_store, clock: Clock) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=who.key, max_retries=0) as client:
        model = await client.models.retrieve("gpt-fake")
        pricing = model.pricing  # type: ignore[attr-defined]
        assert (pricing["input"], pricing["output"]) == ("2.500000", "10.000000")
        assert pricing["next"] == {"effective_from": CHANGE_AT.isoformat(), "unit": "USD per 1M tokens",
                                   "input": "2.000000", "output": "8.000000", "cached_input": "1.250000",
                                   "per_request_usd": "0.001000"}
        clock.now = CHANGE_AT + timedelta(days=1)
        pricing = (await client.models.retrieve("gpt-fake")).pricing  # type: ignore[attr-defined]
        assert (pricing["input"], pricing["per_request_usd"]) == ("2.000000", "0.001000")
        assert "next" not in pricing


async def test_a_group_multiplier_applies_to_every_class_and_the_fee(live: Live, live_store, clock: Clock) -> None:
    clock.now = CHANGE_AT  # the price with a fee
    live.fake.cached_tokens = 8
    plain = await account(live_store, live, "ann@example.com", "1")
    await accounts.create_user(live_store, "vip@example.com", group="vip")
    new = await accounts.create_key(live_store, "vip@example.com", accounts.KeyOptions(),
                                    known_models=live.settings.model_index())
    await accounts.topup(live_store, "vip@example.com", "1")
    vip_id = (await accounts.resolve_user(live_store, "vip@example.com")).id
    await chat(live, plain.key)
    reply = await chat(live, new.secret)
    await wait_for_usage(live, vip_id, 1)
    prompt, completion = live.fake.prompt_tokens, len(live.fake.words)
    full = cost(NEW, prompt, completion, cached=8)
    vip = cost(NEW, prompt, completion, cached=8, multiplier=800_000)
    assert charges(live, plain.user_id) == [full]
    assert charges(live, vip_id) == [vip]
    assert vip < full and round(reply.usage.cost * 1_000_000) == vip  # type: ignore[union-attr]


async def test_a_groups_model_set_is_enforced(live: Live, live_store) -> None:
    await accounts.create_user(live_store, "trial@example.com", group="trial")
    new = await accounts.create_key(live_store, "trial@example.com", accounts.KeyOptions(),
                                    known_models=live.settings.model_index())
    await accounts.topup(live_store, "trial@example.com", "1")
    async with openai.AsyncOpenAI(base_url=live.v1, api_key=new.secret, max_retries=0) as client:
        assert sorted([m.id async for m in client.models.list()]) == ["demo", "gpt-fake"]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="gpt-fallback", messages=MESSAGES)
        assert refused.value.code == "model_not_in_plan"
        assert (await client.chat.completions.create(model="demo", messages=MESSAGES)).choices


def test_schedule_entries_keep_what_they_do_not_change_and_must_be_in_order() -> None:
    text = """
providers: [{name: e, type: echo}]
models:
  - name: m
    routes: [{provider: e}]
    price: {input: 3, output: 15, cached_input: 0.3}
    price_schedule:
      - {effective_from: "2026-12-01T00:00:00Z", output: 12}
      - {effective_from: 2027-01-01, per_request: 0.01}
"""
    model = parse_settings(text, env={}).models[0]
    assert model.price_at(datetime(2026, 11, 30, tzinfo=UTC)) == Price(3_000_000, 15_000_000, 300_000)
    assert model.price_at(datetime(2026, 12, 2, tzinfo=UTC)) == Price(3_000_000, 12_000_000, 300_000)
    assert model.price_at(datetime(2027, 6, 1, tzinfo=UTC)) == Price(3_000_000, 12_000_000, 300_000,
                                                                      per_request=10_000)
    with pytest.raises(Exception, match="time order"):
        parse_settings(text.replace("2027-01-01", "2026-11-01"), env={})


def test_prices_command_shows_current_and_upcoming(cli, config_path: Path) -> None:
    text = config_path.read_text().replace(  # give gpt-fake an announced change
        "    price: {input: 2.5, output: 10, cached_input: 1.25}\n",
        "    price: {input: 2.5, output: 10, cached_input: 1.25}\n"
        "    price_schedule: [{effective_from: \"2099-01-01T00:00:00Z\", input: 2}]\n", 1)
    config_path.write_text(text)
    result = cli("prices", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    gpt = [r for r in data["prices"] if r["model"] == "gpt-fake"]
    assert [(r["current"], r["input"]) for r in gpt] == [(True, "2.500000"), (False, "2.000000")]
    assert data["groups"]["vip"]["multiplier"] == "0.800000"
