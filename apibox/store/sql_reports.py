"""Usage reports, retention (folding old usage rows into daily totals) and the ledger audit, in
SQL both engines speak, as a mixin of ``SqlStore`` (reads through ``_read``, writes as scripts)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any

from apibox import jsoncodec
from apibox.errors import InvalidRequest, StoreError
from apibox.models import ReportRow
from apibox.offloop import off_the_loop
from apibox.store.base import REPORT_DIMENSIONS, ProgressFn, PruneResult, UsageFilter
from apibox.store.script import Row, Script, Want
from apibox.store.sqltime import to_ms

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How each report dimension is grouped in the live rows (g) and in the daily aggregates (a): raw
# values (day and hour numbers since the epoch, ids), labelled in Python after grouping. The unary
# + keeps SQLite from walking an index in group order, which reads the whole table at random
# (at 1M rows, 2.5x slower than a scan and a sort).
DIMENSION_SQL = {
    "day": (f"g.created_at / {DAY_MS}", f"a.day / {DAY_MS}"),
    "hour": (f"g.created_at / {HOUR_MS}", f"a.day / {HOUR_MS}"),
    "model": ("g.model", "a.model"),
    "user": ("+g.user_id", "+a.user_id"),
    "key": ("+g.key_id", "+a.key_id"),
    "provider": ("g.provider", "a.provider"),
}
# requests, errors, five token classes, charged, latency sum and count: the same ten in both sources.
LIVE_SUMS = ("count(*), sum(CASE WHEN g.status != 'ok' THEN 1 ELSE 0 END), sum(g.prompt_tokens), "
             "sum(g.completion_tokens), "
             "sum(g.cached_tokens), sum(g.cache_write_tokens), sum(g.reasoning_tokens), sum(g.charged), "
             "sum(g.latency_ms), count(*)")
DAILY_SUMS = ("sum(a.requests), sum(a.errors), sum(a.prompt_tokens), sum(a.completion_tokens), "
              "sum(a.cached_tokens), sum(a.cache_write_tokens), sum(a.reasoning_tokens), sum(a.charged), "
              "sum(a.latency_ms_sum), sum(a.latency_count)")

# A usage row may be folded only if its ledger charge matches it (user and amount): the audit then
# matches each user's folded charges, their count and sum, to the user's daily aggregates.
FOLD_MISMATCH_SQL = (
    "SELECT u.id FROM usage u LEFT JOIN ledger l ON l.usage_id = u.id WHERE u.created_at < ? AND "
    "CASE WHEN l.id IS NULL THEN u.charged != 0 ELSE l.kind != 'charge' OR -l.amount != u.charged "
    "OR l.user_id != u.user_id END LIMIT 1")
FOLD_SUMS = ("requests", "errors", "estimated", "prompt_tokens", "completion_tokens", "cached_tokens",
             "cache_write_tokens", "reasoning_tokens", "cost", "charged", "charges", "latency_ms_sum", "latency_count",
             "ttft_ms_sum", "ttft_count")
FOLD_SQL = (
    "INSERT INTO usage_daily (day, user_id, key_id, model, provider, status, " + ", ".join(FOLD_SUMS) + ") "
    f"SELECT created_at / {DAY_MS} * {DAY_MS}, user_id, key_id, model, provider, status, count(*), "
    "sum(CASE WHEN status != 'ok' THEN 1 ELSE 0 END), sum(estimated), sum(prompt_tokens), sum(completion_tokens), "
    "sum(cached_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(cost), sum(charged), "
    "sum(CASE WHEN charged > 0 THEN 1 ELSE 0 END), sum(latency_ms), "
    "count(*), "
    "coalesce(sum(ttft_ms), 0), count(ttft_ms) FROM usage WHERE created_at < ? GROUP BY 1, 2, 3, 4, 5, 6 "
    "ON CONFLICT (day, user_id, key_id, model, provider, status) DO UPDATE SET "
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in FOLD_SUMS))
# The live usage rows of one user, found by the index of each of the user's keys.
USER_THROUGH_KEYS = "g.key_id IN (SELECT k.id FROM api_keys k WHERE k.user_id = ?)"
PRUNE_BATCH_ROWS = 50_000
AUDIT_PROGRESS, PRUNE_PROGRESS = "audit", "usage rows"  # what the audit and a prune tell their progress as
PARALLEL_AUDIT_ROWS = 10_000  # from this many ledger rows on, the audit runs its checks side by side
SORTED_TEXT_MAX = 16_384  # about 3,500 values: below, sorting a list is faster; above, counting


class SqlReports:
    """Reports, pruning and the audit; the engine supplies ``_read``, ``_run`` and ``_concat``."""

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a read-only statement and return its rows (integers as int, never Decimal)."""
        raise NotImplementedError

    async def _run(self, script: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def _concat(column: str) -> str:
        """SQL joining a group's values with commas (the engine's group_concat / string_agg)."""
        raise NotImplementedError

    async def usage_report(self, by: Sequence[str], where: UsageFilter, *,
                           percentiles: bool = False) -> list[ReportRow]:
        return (await self._usage(by, where, percentiles))[0]

    async def usage_summary(self, by: Sequence[str], where: UsageFilter) -> tuple[list[ReportRow], ReportRow]:
        return await self._usage(by, where, True)

    async def _usage(self, by: Sequence[str], where: UsageFilter,
                     percentiles: bool) -> tuple[list[ReportRow], ReportRow]:
        unknown = [d for d in by if d not in REPORT_DIMENSIONS]
        if unknown:
            raise InvalidRequest(f"cannot group by {unknown[0]!r} (choose from {', '.join(REPORT_DIMENSIONS)})")
        results: list[tuple[bool, list[Row]]] = []
        for folded, table, sums in ((False, "usage g", LIVE_SUMS), (True, "usage_daily a", DAILY_SUMS)):
            clauses, params = _usage_where(folded, where)
            columns = "".join(f"{DIMENSION_SQL[d][folded]} AS d{i}, " for i, d in enumerate(by))
            # Percentiles: each group's latencies come back as one string, counted in Python (a
            # group's values at a time, not a million rows).
            samples = (f", {self._concat('g.latency_ms')}, {self._concat('g.ttft_ms')}"
                       if percentiles and not folded else "")
            group = f" GROUP BY {', '.join(f'd{i}' for i in range(len(by)))}" if by else ""
            results.append((folded, await self._read(
                f"SELECT {columns}{sums}{samples} FROM {table} WHERE {clauses}{group}", params)))
        users = await self._read("SELECT id, email FROM users") if "user" in by else []
        # the work grows with the usage rows behind the groups (each one's latencies are read), not the groups
        items = sum(len(rows) if folded else sum(r[len(by)] or 0 for r in rows) for folded, rows in results)
        return await off_the_loop(lambda: _report(by, results, {r[0]: r[1] for r in users}, percentiles),
                                  items + len(users))

    async def prune_usage(self, before: datetime, *, batch_rows: int = PRUNE_BATCH_ROWS,
                          progress: ProgressFn | None = None) -> PruneResult:
        before_ms = to_ms(before)
        assert before_ms is not None
        rows = requests = cost = charged = batches = 0
        first: int | None = None
        last: int | None = None
        to_fold = 0
        if progress is not None:  # a count (by the index of creation times) only for whoever shows it
            to_fold = int((await self._read("SELECT count(*) FROM usage WHERE created_at < ?", (before_ms,)))[0][0])
            progress(PRUNE_PROGRESS, 0, to_fold)
        while True:
            folded = await self._run(lambda: _fold_batch(before_ms, batch_rows))
            if folded is None:
                break
            stats, finished = folded
            batches += 1
            rows, requests, cost, charged = (rows + stats[0], requests + stats[1], cost + stats[2],
                                             charged + stats[3])
            first = stats[4] if first is None else min(first, stats[4])
            last = stats[5] if last is None else max(last, stats[5])
            if progress is not None:
                progress(PRUNE_PROGRESS, rows, max(rows, to_fold))  # rows made meanwhile may add to the count
            if finished:
                break
        forgotten = await self._run_statement("DELETE FROM stored_responses WHERE created_at < ?", (before_ms,),
                                              want=Want.COUNT)
        daily_rows = (await self._read("SELECT count(*) FROM usage_daily"))[0][0]
        return PruneResult(before=before, rows=rows, requests=requests, cost=cost, charged=charged,
                           first_day=_utc_date(first), last_day=_utc_date(last), batches=batches,
                           daily_rows=daily_rows, responses=forgotten[0][0])

    async def audit(self, progress: ProgressFn | None = None) -> list[str]:
        # The ledger is read whole, in one scan and one sort: the unary + keeps SQLite from walking
        # the ledger_user index, which fetches each row at random. At a million rows the whole audit
        # took 5.8-6.3 s on SQLite that way (the users' sums, each summed twice, 1.5-1.9 s; the
        # running sums 2.7-3.0 s) and 3.3-3.9 s in scans; on PostgreSQL 7.4-8.3 s and 4.6-5.0 s.
        checks = (
            ("SELECT user_id, sum(balance), sum(amount) FROM (SELECT user_id, balance, 0 AS amount FROM balances "
             "UNION ALL SELECT +user_id, 0, amount FROM ledger) t GROUP BY user_id HAVING sum(balance) != sum(amount)",
             "user {0}: balance {1} differs from the ledger's sum {2}"),
            ("SELECT * FROM (SELECT b.user_id, b.held, coalesce((SELECT sum(amount) FROM holds h "
             "WHERE h.user_id = b.user_id), 0) AS total FROM balances b) t WHERE held != total",
             "user {0}: held {1} differs from the open holds' sum {2}"),
            ("SELECT user_id, balance, held FROM balances WHERE balance < 0 OR held < 0 OR held > balance",
             "user {0}: balance {1} / held {2} break balance >= held >= 0"),
            ("SELECT id, user_id, balance_after, running FROM (SELECT id, user_id, balance_after, "
             "sum(amount) OVER (PARTITION BY +user_id ORDER BY id) AS running FROM ledger) t "
             "WHERE balance_after != running",
             "ledger row {0} (user {1}): balance_after {2} differs from the running sum {3}"),
            # A charge whose usage row is gone was folded by `usage prune`: the next check covers it.
            ("SELECT l.id, -l.amount, u.charged FROM ledger l LEFT JOIN usage u ON u.id = l.usage_id "
             "WHERE l.kind = 'charge' AND (l.usage_id IS NULL OR u.charged != -l.amount OR u.user_id != l.user_id)",
             "ledger charge {0} of {1} does not match its usage row (charged {2})"),
            ("SELECT user_id, sum(charges), sum(in_ledger), sum(folded_charges), sum(folded) FROM ("
             "SELECT l.user_id, 1 AS charges, -l.amount AS in_ledger, 0 AS folded_charges, 0 AS folded FROM ledger l "
             "WHERE l.kind = 'charge' AND l.usage_id IS NOT NULL "
             "AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.id = l.usage_id) "
             "UNION ALL SELECT user_id, 0, 0, charges, charged FROM usage_daily) t "
             "GROUP BY user_id HAVING sum(charges) != sum(folded_charges) OR sum(in_ledger) != sum(folded)",
             "user {0}: the ledger has {1} charges of {2} for usage rows no longer kept, the daily aggregates "
             "{3} of {4}"),
            ("SELECT u.id, u.charged FROM usage u LEFT JOIN ledger l ON l.usage_id = u.id "
             "WHERE u.charged > 0 AND l.id IS NULL",
             "usage row {0} charged {1} but has no ledger row"),
            ("SELECT id, cost, charged FROM usage WHERE charged > cost OR charged < 0",
             "usage row {0}: charged {2} is more than its cost {1}"),
        )
        done = 0

        async def check(sql: str, message: str) -> list[str]:
            nonlocal done
            problems = [message.format(*row) for row in await self._read(sql)]
            done += 1
            if progress is not None:
                progress(AUDIT_PROGRESS, done, len(checks))
            return problems

        if progress is not None:
            progress(AUDIT_PROGRESS, 0, len(checks))
        # On a large ledger, all at once: PostgreSQL runs them side by side on the pool's connections
        # (a million rows: 2.6-2.9 s against 4.1-4.7 in turn; SQLite's one reader runs them in turn
        # anyway). On a small one, in turn on the connection already open: an empty PostgreSQL
        # database's checks took 7 ms so, and 25 ms side by side, most of it opening seven connections.
        if await self._ledger_has(PARALLEL_AUDIT_ROWS):
            found = await asyncio.gather(*(check(sql, message) for sql, message in checks))
        else:
            found = [await check(sql, message) for sql, message in checks]
        return [problem for problems in found for problem in problems]

    async def _ledger_has(self, rows: int) -> bool:
        """Whether the ledger has at least ``rows`` rows, counting no further."""
        return (await self._read("SELECT count(*) FROM (SELECT 1 FROM ledger LIMIT ?) t", (rows,)))[0][0] >= rows


def _report(by: Sequence[str], results: list[tuple[bool, list[Row]]], emails: dict[int, str],
            percentiles: bool) -> tuple[list[ReportRow], ReportRow]:
    """The report's rows and total from the grouped rows of the live usage (``folded`` False, with
    each group's latencies when ``percentiles``) and of the daily aggregates."""
    n = len(by)
    groups: dict[tuple[Any, ...], _Group] = {}
    total = _Group()
    # the total's percentiles are over every live row: its values are counted (memory: distinct values)
    latencies: Counter[int] = Counter()
    ttfts: Counter[int] = Counter()
    for folded, rows in results:
        samples = percentiles and not folded
        for r in rows:
            if not r[n]:
                continue
            key = tuple((v, not folded) if d == "hour" else v for d, v in zip(by, r[:n], strict=True))
            acc = groups.setdefault(key, _Group())
            acc.add(r[n:n + 10])
            if samples:  # a group's live rows come in one result row: its percentiles are final
                acc.percentiles = (*_percentiles(r[n + 10], (50, 95), latencies),
                                   *_percentiles(r[n + 11], (50,), ttfts))
    out: list[tuple[tuple[Any, ...], ReportRow]] = []
    for key, acc in groups.items():
        total.add(acc.sums)
        labels = [_label(d, v, emails) for d, v in zip(by, key, strict=True)]
        out.append((tuple(sort for sort, _ in labels),
                    acc.row({d: text for d, (_, text) in zip(by, labels, strict=True)}, percentiles)))
    out.sort(key=lambda item: item[0])
    total.percentiles = (*_nearest_rank(latencies, (50, 95)), *_nearest_rank(ttfts, (50,)))
    return [row for _, row in out], total.row({}, percentiles)


@dataclass(slots=True)
class _Group:
    """One report group being summed: the ten sums, and p50, p95 latency and p50 ttft of its live rows."""

    sums: list[int] = field(default_factory=lambda: [0] * 10)
    percentiles: tuple[int | None, ...] = (None, None, None)

    def add(self, sums: Sequence[Any]) -> None:
        for i, value in enumerate(sums):
            self.sums[i] += value or 0

    def row(self, group: dict[str, str], percentiles: bool) -> ReportRow:
        s = self.sums
        p50, p95, ttft = self.percentiles if percentiles else (None, None, None)
        return ReportRow(group=group, requests=s[0], errors=s[1], prompt_tokens=s[2], completion_tokens=s[3],
                         cached_tokens=s[4], cache_write_tokens=s[5], reasoning_tokens=s[6], cost=s[7],
                         avg_latency_ms=s[8] / s[9] if s[9] else 0.0, p50_latency_ms=p50, p95_latency_ms=p95,
                         p50_ttft_ms=ttft)


def _utc_date(ms: int | None) -> date | None:
    return None if ms is None else (EPOCH + timedelta(milliseconds=ms)).date()


def _percentiles(text: str | None, percents: Sequence[int], total: Counter[int]) -> list[int | None]:
    """Nearest-rank percentiles of one group's values (a group_concat list), also counted into
    ``total``. The list is read as the JSON array it is without its brackets (orjson makes the ints
    three times faster than ``int()`` on each piece). Up to SORTED_TEXT_MAX characters the values
    are sorted (fastest); a larger group is counted 64 kB at a time, so memory stays near the text
    (about 5 bytes a value), never a million Python objects."""
    if not text:
        return [None] * len(percents)
    if len(text) <= SORTED_TEXT_MAX:
        values = jsoncodec.loads(f"[{text}]")
        total.update(values)
        values.sort()
        return [values[(len(values) * p + 99) // 100 - 1] for p in percents]
    counts: Counter[int] = Counter()
    start, size = 0, len(text)
    while start < size:
        end = text.find(",", min(start + 65_536, size))
        end = size if end < 0 else end
        counts.update(jsoncodec.loads(f"[{text[start:end]}]"))
        start = end + 1
    total.update(counts)  # the group's distinct values with their counts: far fewer than its values
    return _nearest_rank(counts, percents)


def _nearest_rank(counts: Counter[int], percents: Sequence[int]) -> list[int | None]:
    """The p-th percentiles of the counted values: the smallest value with at least ceil(p% of n)
    values at or below it (nearest rank: always an observed value, no interpolation)."""
    values = sorted(counts)
    cumulative = list(accumulate(counts[v] for v in values))
    if not cumulative:
        return [None] * len(percents)
    n = cumulative[-1]
    return [values[bisect_left(cumulative, (n * p + 99) // 100)] for p in percents]


def _label(dimension: str, value: Any, emails: dict[int, str]) -> tuple[Any, str]:
    """(sort key, label) of one group value: days and hours in UTC; a folded day under `hour`
    is labelled with its date alone and sorts before that day's live hours."""
    if dimension == "day":
        return value, (EPOCH + timedelta(days=value)).date().isoformat()
    if dimension == "hour":
        hour, live = value
        moment = EPOCH + timedelta(hours=hour)
        return value, moment.strftime("%Y-%m-%d %H:00") if live else moment.date().isoformat()
    if dimension == "user":
        email = emails.get(value, str(value))
        return email, email
    if dimension == "key":
        return value, str(value)
    return str(value), str(value)


def _usage_where(folded: bool, where: UsageFilter) -> tuple[str, list[Any]]:
    """The WHERE clause of a report over the daily aggregates (``a``) or the live rows (``g``)."""
    alias, time_column = ("a", "a.day") if folded else ("g", "g.created_at")
    clauses, params = [f"{alias}.status != 'interrupted'"], []
    by_user = "a.user_id = ?" if folded else USER_THROUGH_KEYS  # live rows have no index by user
    for clause, value in ((f"{time_column} >= ?", to_ms(where.since)), (f"{time_column} < ?", to_ms(where.until)),
                          (by_user, where.user_id), (f"{alias}.key_id = ?", where.key_id),
                          (f"{alias}.model = ?", where.model)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def _fold_batch(before_ms: int, limit: int) -> Script[tuple[tuple[int, int, int, int, int, int], bool] | None]:
    """Fold (and delete) the oldest ``limit`` or so usage rows made before ``before_ms``: all rows
    of one millisecond go together. Returns (rows, reported requests, cost, charged, first and
    last created_at) and whether nothing older is left, or None when there was nothing to fold."""
    first = (yield "SELECT min(created_at) FROM usage WHERE created_at < ?", (before_ms,))[0][0]
    if first is None:
        return None
    rows = yield ("SELECT created_at FROM usage WHERE created_at < ? ORDER BY created_at LIMIT 1 OFFSET ?",
                  (before_ms, limit))
    cut = before_ms if not rows else max(rows[0][0], first + 1)
    bad = yield FOLD_MISMATCH_SQL, (cut,)
    if bad:
        raise StoreError(f"usage row {bad[0][0]} does not match its ledger charge, so it was not folded (rows before "
                         "it were); `apibox db check` lists what is wrong")
    stats = (yield ("SELECT count(*), sum(CASE WHEN status != 'interrupted' THEN 1 ELSE 0 END), sum(cost), "
                    "sum(charged), min(created_at), max(created_at) FROM usage WHERE created_at < ?", (cut,)))[0]
    yield FOLD_SQL, (cut,)
    yield "DELETE FROM usage WHERE created_at < ?", (cut,)
    return tuple(stats), cut == before_ms  # type: ignore[return-value]
