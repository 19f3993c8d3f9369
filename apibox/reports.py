"""Usage aggregation for the CLI (and later the admin API)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apibox import accounts
from apibox.errors import InvalidRequest
from apibox.models import ReportRow
from apibox.money import format_usd
from apibox.store.base import REPORT_DIMENSIONS, Store, UsageFilter
from apibox.timeparse import TimeParseError, parse_since


@dataclass(frozen=True, slots=True)
class ReportQuery:
    by: tuple[str, ...] = ("day",)
    since: str | None = None
    until: str | None = None
    user: str | None = None
    key: str | None = None
    model: str | None = None


def parse_by(text: str) -> tuple[str, ...]:
    """``day,model`` -> ("day", "model"), rejecting unknown or repeated dimensions."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for part in parts:
        if part not in REPORT_DIMENSIONS:
            raise InvalidRequest(f"cannot group by {part!r} (choose from {', '.join(REPORT_DIMENSIONS)})")
    if len(set(parts)) != len(parts):
        raise InvalidRequest(f"--by names a dimension twice: {text!r}")
    return parts


async def usage_report(store: Store, query: ReportQuery, now: datetime | None = None) -> list[ReportRow]:
    now = now or datetime.now(UTC)
    try:
        since = parse_since(query.since, now) if query.since else None
        until = parse_since(query.until, now) if query.until else None
    except TimeParseError as exc:
        raise InvalidRequest(str(exc)) from None
    user_id = (await accounts.resolve_user(store, query.user)).id if query.user else None
    key_id = (await accounts.show_key(store, query.key)).id if query.key else None
    where = UsageFilter(since=since, until=until, user_id=user_id, key_id=key_id, model=query.model)
    return await store.usage_report(query.by, where)


def totals(rows: list[ReportRow]) -> ReportRow:
    requests = sum(r.requests for r in rows)
    latency = sum(r.avg_latency_ms * r.requests for r in rows) / requests if requests else 0.0
    return ReportRow(group={}, requests=requests, errors=sum(r.errors for r in rows),
                     prompt_tokens=sum(r.prompt_tokens for r in rows),
                     completion_tokens=sum(r.completion_tokens for r in rows),
                     cached_tokens=sum(r.cached_tokens for r in rows), cost=sum(r.cost for r in rows),
                     avg_latency_ms=latency)


def row_json(row: ReportRow) -> dict[str, Any]:
    return {**row.group, "requests": row.requests, "errors": row.errors, "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "cached_tokens": row.cached_tokens,
            "cost_usd": format_usd(row.cost), "avg_latency_ms": round(row.avg_latency_ms, 1)}
