"""Helpers shared by the report and retention tests (test_reports.py, test_prune.py).

Usage rows are written the way the gateway writes them (a hold, then one settlement: usage row,
ledger charge, balance), with every field under the test's control. ``expected`` is an
independent reference implementation of a report, computed in Python from the records.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apibox import accounts
from apibox.models import ApiKey, UsageRecord
from apibox.money import format_usd
from apibox.store.base import Store

# model -> provider, as in conftest's config
MODELS = {"demo": "echo", "gpt-fake": "fake", "claude-fake": "claude"}
ADDITIVE = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
            "reasoning_tokens", "cost_usd")
SINGLE_DIMENSIONS = ("day", "hour", "model", "user", "key", "provider")


@dataclass
class Book:
    """Every usage row written, and who is who."""

    now: datetime
    records: list[UsageRecord] = field(default_factory=list)
    keys: list[ApiKey] = field(default_factory=list)
    emails: dict[int, str] = field(default_factory=dict)

    def key(self, n: int) -> ApiKey:
        return self.keys[n]


async def open_account(store: Store, book: Book, email: str, keys: int = 1, usd: str = "100") -> list[ApiKey]:
    user = await accounts.create_user(store, email)
    book.emails[user.id] = email
    made = []
    for i in range(keys):
        new = await accounts.create_key(store, email, accounts.KeyOptions(name=f"k{i}"), known_models=MODELS)
        made.append(new.key)
    if usd != "0":
        await accounts.topup(store, email, usd)
    book.keys.extend(made)
    return made


async def record(store: Store, book: Book, key: ApiKey, at: datetime, *, model: str = "demo",
                 status: str = "ok", prompt: int = 0, completion: int = 0, cached: int = 0, cache_write: int = 0,
                 reasoning: int = 0, cost: int = 0, latency: int = 100, ttft: int | None = None) -> UsageRecord:
    """One request settled as the gateway settles it: hold, then usage row + ledger charge."""
    request_id = f"req-{len(book.records)}"
    hold = await store.hold(key.user_id, key.id, max(cost, 1), request_id, model)
    assert hold is not None
    usage = UsageRecord(request_id=request_id, user_id=key.user_id, key_id=key.id, model=model,
                        provider=MODELS[model], endpoint="/v1/chat/completions", status=status,
                        http_status=200 if status == "ok" else 502, prompt_tokens=prompt, completion_tokens=completion,
                        cached_tokens=cached, cache_write_tokens=cache_write, reasoning_tokens=reasoning,
                        estimated=status == "cut", cost=cost, latency_ms=latency, ttft_ms=ttft, created_at=at)
    settled = await store.settle(hold, usage)
    book.records.append(settled)
    return settled


async def seed_mixed(store: Store, now: datetime, days: int = 8, per_day: int = 9, seed: int = 7) -> Book:
    """Three users, four keys, three models on three providers, over ``days`` days up to ``now``:
    ok, error and cut requests, every token class, streams (with ttft) and not."""
    book = Book(now=now)
    rng = random.Random(seed)
    await open_account(store, book, "ann@example.com", keys=2)
    await open_account(store, book, "bob@example.com")
    await open_account(store, book, "cyd@example.com")
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
    for day in range(days):
        for _ in range(per_day):
            at = start + timedelta(days=day, minutes=rng.randrange(0, 23 * 60))
            if at > now:
                at = now - timedelta(minutes=rng.randrange(1, 60))
            status = rng.choice(("ok", "ok", "ok", "ok", "error", "cut"))
            tokens = {} if status == "error" else {
                "prompt": rng.randrange(1, 5000), "completion": rng.randrange(1, 900),
                "cached": rng.choice((0, 0, 64, 128)), "cache_write": rng.choice((0, 0, 10)),
                "reasoning": rng.choice((0, 0, 33))}
            await record(store, book, rng.choice(book.keys), at, model=rng.choice(list(MODELS)), status=status,
                         cost=0 if status == "error" else rng.randrange(1, 50_000),
                         latency=rng.randrange(5, 3000), ttft=rng.choice((None, rng.randrange(1, 400))), **tokens)
    return book


def _rank(values: list[int], percent: int) -> int | None:
    """Nearest rank: the value at position ceil(p/100 * n) of the sorted values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, -(-len(ordered) * percent // 100)) - 1]


def label(book: Book, dimension: str, r: UsageRecord) -> str:
    at = r.created_at.astimezone(UTC)  # type: ignore[union-attr]
    return {"day": at.strftime("%Y-%m-%d"), "hour": at.strftime("%Y-%m-%d %H:00"), "model": r.model,
            "user": book.emails[r.user_id], "key": str(r.key_id), "provider": r.provider}[dimension]


def reported(book: Book, since: datetime | None = None, until: datetime | None = None) -> list[UsageRecord]:
    return [r for r in book.records if r.status != "interrupted"
            and (since is None or r.created_at >= since)  # type: ignore[operator]
            and (until is None or r.created_at < until)]  # type: ignore[operator]


def summary(records: Iterable[UsageRecord]) -> dict[str, Any]:
    rows = list(records)
    requests = len(rows)
    errors = sum(r.status != "ok" for r in rows)
    latencies = [r.latency_ms for r in rows]
    return {"requests": requests, "errors": errors, "error_rate": round(errors / requests, 4) if requests else 0.0,
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
            "completion_tokens": sum(r.completion_tokens for r in rows),
            "cached_tokens": sum(r.cached_tokens for r in rows),
            "cache_write_tokens": sum(r.cache_write_tokens for r in rows),
            "reasoning_tokens": sum(r.reasoning_tokens for r in rows),
            "cost_usd": format_usd(sum(r.charged for r in rows)),
            "avg_latency_ms": round(sum(latencies) / requests, 1) if requests else 0.0,
            "p50_latency_ms": _rank(latencies, 50), "p95_latency_ms": _rank(latencies, 95),
            "p50_ttft_ms": _rank([r.ttft_ms for r in rows if r.ttft_ms is not None], 50)}


def expected(book: Book, by: tuple[str, ...], records: list[UsageRecord] | None = None) -> dict[tuple[str, ...], dict]:
    """The report grouped by ``by``, keyed by the groups' labels."""
    groups: dict[tuple[str, ...], list[UsageRecord]] = defaultdict(list)
    for r in reported(book) if records is None else records:
        groups[tuple(label(book, d, r) for d in by)].append(r)
    return {key: summary(rows) for key, rows in groups.items()}


def keyed(rows: list[dict[str, Any]], by: tuple[str, ...]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Report rows (JSON) keyed by their group labels, without the group keys."""
    return {tuple(row[d] for d in by): {k: v for k, v in row.items() if k not in by} for row in rows}


def additive(rows: dict[tuple[str, ...], dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {key: {k: row[k] for k in ADDITIVE} for key, row in rows.items()}


def micro(usd: str) -> int:
    whole, _, frac = usd.lstrip("-").partition(".")
    value = int(whole) * 1_000_000 + int(frac.ljust(6, "0"))
    return -value if usd.startswith("-") else value
