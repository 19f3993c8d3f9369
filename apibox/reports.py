"""Usage aggregation, ledger statements and retention, for the CLI and the admin API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from apibox import accounts
from apibox.errors import InvalidRequest
from apibox.models import LedgerEntry, ReportRow, User
from apibox.money import format_usd
from apibox.store.base import REPORT_DIMENSIONS, ProgressFn, PruneResult, Store, UsageFilter
from apibox.timeparse import TimeParseError, parse_since

# The fields of a report row after its group keys, in the order csv and the table show them.
ROW_FIELDS = ("requests", "errors", "error_rate", "prompt_tokens", "completion_tokens", "cached_tokens",
              "cache_write_tokens", "reasoning_tokens", "cost_usd", "avg_latency_ms", "p50_latency_ms",
              "p95_latency_ms", "p50_ttft_ms")


@dataclass(frozen=True, slots=True)
class ReportQuery:
    by: tuple[str, ...] = ("day",)
    since: str | None = None
    until: str | None = None
    user: str | None = None
    key: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    rows: list[ReportRow]
    total: ReportRow  # every group together; its percentiles are over all the rows, not of the groups


def parse_by(text: str) -> tuple[str, ...]:
    """``day,model`` -> ("day", "model"), rejecting unknown or repeated dimensions."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for part in parts:
        if part not in REPORT_DIMENSIONS:
            raise InvalidRequest(f"cannot group by {part!r} (choose from {', '.join(REPORT_DIMENSIONS)})",
                                 param="by")
    if len(set(parts)) != len(parts):
        raise InvalidRequest(f"{text!r} names a dimension twice", param="by")
    return parts


def _moment(text: str | None, now: datetime, field: str) -> datetime | None:
    try:
        return parse_since(text, now) if text else None
    except TimeParseError as exc:
        raise InvalidRequest(str(exc), param=field) from None


def time_window(since: str | None, until: str | None, now: datetime) -> tuple[datetime | None, datetime | None]:
    """[since, until) as an operator typed them (a moment or a duration ago); ``until`` must come after."""
    start, end = _moment(since, now, "since"), _moment(until, now, "until")
    if start is not None and end is not None and end <= start:
        raise InvalidRequest("until must be after since", param="until")
    return start, end


async def usage_filter(store: Store, query: ReportQuery, now: datetime | None = None) -> UsageFilter:
    since, until = time_window(query.since, query.until, now or datetime.now(UTC))
    user_id = (await accounts.resolve_user(store, query.user)).id if query.user else None
    key_id = (await accounts.show_key(store, query.key)).id if query.key else None
    return UsageFilter(since=since, until=until, user_id=user_id, key_id=key_id, model=query.model)


async def build_report(store: Store, query: ReportQuery, now: datetime | None = None) -> Report:
    """The report the CLI and ``/admin/usage`` show: groups with percentiles, and their total."""
    rows, total = await store.usage_summary(query.by, await usage_filter(store, query, now))
    return Report(rows, total)


async def usage_report(store: Store, query: ReportQuery, now: datetime | None = None) -> list[ReportRow]:
    """The groups alone, with percentiles."""
    return (await build_report(store, query, now)).rows


def totals(rows: list[ReportRow]) -> ReportRow:
    """The sums of some rows (no percentiles: they do not add up; ``build_report`` has the real ones)."""
    requests = sum(r.requests for r in rows)
    latency = sum(r.avg_latency_ms * r.requests for r in rows) / requests if requests else 0.0
    return ReportRow(group={}, requests=requests, errors=sum(r.errors for r in rows),
                     prompt_tokens=sum(r.prompt_tokens for r in rows),
                     completion_tokens=sum(r.completion_tokens for r in rows),
                     cached_tokens=sum(r.cached_tokens for r in rows), cost=sum(r.cost for r in rows),
                     cache_write_tokens=sum(r.cache_write_tokens for r in rows),
                     reasoning_tokens=sum(r.reasoning_tokens for r in rows), avg_latency_ms=latency)


def row_json(row: ReportRow) -> dict[str, Any]:
    """A report row as JSON: the group keys, then ROW_FIELDS. ``cost_usd`` is what was charged;
    ``error_rate`` a fraction (0.0125 = 1.25%); percentiles in ms, null when not known."""
    return {**row.group, "requests": row.requests, "errors": row.errors, "error_rate": round(row.error_rate, 4),
            "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
            "cached_tokens": row.cached_tokens, "cache_write_tokens": row.cache_write_tokens,
            "reasoning_tokens": row.reasoning_tokens, "cost_usd": format_usd(row.cost),
            "avg_latency_ms": round(row.avg_latency_ms, 1), "p50_latency_ms": row.p50_latency_ms,
            "p95_latency_ms": row.p95_latency_ms, "p50_ttft_ms": row.p50_ttft_ms}


# -- the daily spend chart ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: date
    requests: int
    cost: int


async def daily_spend(store: Store, days: int, *, user: str | None = None, model: str | None = None,
                      now: datetime | None = None) -> list[DaySpend]:
    """What was charged on each of the last ``days`` UTC days (today included), oldest first, days
    without requests as zero. Pruned days count too: they come from the daily aggregates."""
    if not 1 <= days <= 3660:
        raise InvalidRequest(f"--days must be between 1 and 3660, not {days}")
    now = now or datetime.now(UTC)
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    where = await usage_filter(store, ReportQuery(user=user, model=model), now)
    where = UsageFilter(since=_midnight(first), until=_midnight(today + timedelta(days=1)),
                        user_id=where.user_id, model=where.model)
    found = {row.group["day"]: row for row in await store.usage_report(("day",), where)}
    out = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        row = found.get(day.isoformat())
        out.append(DaySpend(day, row.requests if row else 0, row.cost if row else 0))
    return out


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# -- the ledger statement ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    user: User
    entries: list[LedgerEntry]
    since: datetime | None = None
    until: datetime | None = None
    opening: int | None = None  # the balance when the period starts (only for a period)
    closing: int | None = None  # opening plus every entry of the period

    @property
    def is_period(self) -> bool:
        return self.opening is not None


async def statement(store: Store, ref: str, since: str | None = None, until: str | None = None,
                    now: datetime | None = None) -> Statement:
    """A user's ledger entries made in [since, until); for a period, the opening balance (the sum of
    every entry made before it) and the closing one (opening plus the period's entries), so the
    statement always adds up, whatever order entries were written in."""
    start, end = time_window(since, until, now or datetime.now(UTC))
    user = await accounts.resolve_user(store, ref)
    entries = await store.ledger(user.id, start, end)
    if start is None and end is None:
        return Statement(user, entries)
    opening = await store.ledger_sum(user.id, start) if start is not None else 0
    return Statement(user, entries, start, end, opening, opening + sum(e.amount for e in entries))


# -- retention -----------------------------------------------------------------------------------

_DAYS_AGO = re.compile(r"^(\d{1,5})([dw])$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def prune_boundary(text: str, now: datetime) -> date:
    """``--before``: a date (2026-01-31) or whole days/weeks ago (90d, 12w), at UTC midnight. It must
    be yesterday or earlier, so no request still being settled can land in a folded day."""
    raw = text.strip()
    duration = _DAYS_AGO.match(raw)
    today = now.astimezone(UTC).date()
    try:
        if duration:
            days = int(duration.group(1)) * (7 if duration.group(2) == "w" else 1)
            day = today - timedelta(days=days)
        elif _DATE.match(raw):
            day = date.fromisoformat(raw)
        else:
            raise ValueError(raw)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"--before {text!r} is not a date (give e.g. 2026-01-31, or 90d for 90 days ago)") \
            from None
    latest = today - timedelta(days=1)
    if day > latest:
        raise InvalidRequest(f"--before {day.isoformat()} is not at least a day in the past: give {latest.isoformat()} "
                             "or earlier (today's and yesterday's requests may still be settling)")
    return day


async def prune(store: Store, before: str, now: datetime | None = None, actor: str = "cli",
                progress: ProgressFn | None = None) -> PruneResult:
    """Fold the usage rows of the days before ``before`` into the daily aggregates (reports and the
    audit read both), and record it in the admin log."""
    day = prune_boundary(before, now or datetime.now(UTC))
    result = await store.prune_usage(_midnight(day), progress=progress)
    if result.rows or result.responses:
        await store.log_admin_action(actor, "usage.prune", f"before:{day.isoformat()}", None, prune_json(result))
    return result


def prune_json(result: PruneResult) -> dict[str, Any]:
    return {"before": result.before.date().isoformat(), "rows_folded": result.rows, "requests": result.requests,
            "cost_usd": format_usd(result.cost), "charged_usd": format_usd(result.charged),
            "first_day": result.first_day.isoformat() if result.first_day else None,
            "last_day": result.last_day.isoformat() if result.last_day else None,
            "transactions": result.batches, "daily_rows": result.daily_rows,
            "stored_responses_forgotten": result.responses}
