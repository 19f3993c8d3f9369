"""Usage reports on a million usage rows: how long `apibox usage report` takes on SQLite.

    python -m bench.report_scale                      # 1,000,000 rows in a temporary file
    python -m bench.report_scale --rows 200000 --keep # a smaller run; keep the database

It writes users, keys, top-ups, usage rows and their ledger charges straight into a fresh,
migrated SQLite file (executemany, one transaction), checks the books with the same audit as
`apibox db check`, then times the report core (``reports.build_report``, what the CLI and
``/admin/usage`` call) for several groupings, with the event loop's longest stall in one more
run of each (what a gateway's streams would wait while it serves that report), `apibox usage
report` end to end as a process, `apibox usage prune` of the oldest two thirds of the days, and
the same reports again over the live rows plus the daily aggregates, whose sums must not have
changed (the run fails if any did).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from apibox import reports
from apibox.store import open_store
from apibox.store.base import Store

T = TypeVar("T")

DAY_MS = 86_400_000
# model -> (provider, input, output, cached input) in micro-USD per 1M tokens
MODELS = {
    "gpt-4o-mini": ("openai", 150_000, 600_000, 75_000),
    "gpt-4o": ("openai", 2_500_000, 10_000_000, 1_250_000),
    "claude-sonnet": ("claude", 3_000_000, 15_000_000, 300_000),
    "claude-haiku": ("claude", 800_000, 4_000_000, 80_000),
    "gemini-flash": ("google", 300_000, 2_500_000, 75_000),
    "deepseek-chat": ("deepseek", 270_000, 1_100_000, 70_000),
}
STATUSES = (("ok", 200), ("error", 502), ("cut", 200), ("client_gone", 499))
GROUPINGS = ("day", "model", "user", "key", "provider", "day,model", "user,model", "hour")
CONFIG = "database:\n  url: sqlite:///{db}\n"


def generate(path: Path, rows: int, users: int, days: int, seed: int) -> dict[str, int]:
    """Users with two keys each, a top-up each, ``rows`` usage rows over ``days`` days (oldest first)
    and a ledger charge for every charged row, balances kept exact. Returns what was written."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    start = (now_ms // DAY_MS - days) * DAY_MS
    span = now_ms - start
    topup = 10**13  # 10 million USD each: nothing is ever capped
    models = list(MODELS)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany("INSERT INTO users (id, email, created_at) VALUES (?, ?, ?)",
                   [(u, f"user{u:04d}@example.com", start) for u in range(1, users + 1)])
    db.executemany("INSERT INTO balances (user_id, balance) VALUES (?, ?)",
                   [(u, topup) for u in range(1, users + 1)])
    db.executemany("INSERT INTO api_keys (id, user_id, key_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?)",
                   [(k, (k + 1) // 2, f"hash-{k}", f"sk-{k}", start) for k in range(1, 2 * users + 1)])
    db.executemany("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor) "
                   "VALUES (?, ?, 'topup', ?, ?, 'bench')", [(u, start, topup, topup) for u in range(1, users + 1)])
    balance = dict.fromkeys(range(1, users + 1), topup)
    spent = dict.fromkeys(range(1, 2 * users + 1), 0)
    usage: list[tuple[Any, ...]] = []
    ledger: list[tuple[Any, ...]] = []
    for i in range(1, rows + 1):
        created = start + span * i // (rows + 1)
        key = 1 + int(rng.random() ** 3 * 2 * users)  # a few keys make most of the traffic
        user = (key + 1) // 2
        model = models[int(rng.random() ** 2 * len(models))]  # cheap models are the popular ones
        provider, p_in, p_out, p_cached = MODELS[model]
        roll = rng.random()
        status, http = STATUSES[0 if roll < 0.96 else 1 if roll < 0.985 else 2 if roll < 0.995 else 3]
        if status == "error":
            prompt = completion = cached = cost = 0
        else:
            prompt = rng.randint(20, 6000)
            completion = rng.randint(1, 1500)
            cached = prompt // 2 if rng.random() < 0.2 else 0
            cost = -(-((prompt - cached) * p_in + cached * p_cached + completion * p_out) // 1_000_000)
        latency = int(rng.lognormvariate(6.5, 0.7))
        ttft = max(1, int(latency * rng.uniform(0.05, 0.4))) if rng.random() < 0.6 else None
        usage.append((i, f"req-{i:07d}", created, user, key, model, provider, "/v1/chat/completions", status, http,
                      prompt, completion, cached, int(status in ("cut", "client_gone")), cost, cost, latency, ttft))
        if cost:
            balance[user] -= cost
            spent[key] += cost
            ledger.append((user, created, -cost, balance[user], f"{model} req-{i:07d}", i))
    db.executemany(
        "INSERT INTO usage (id, request_id, created_at, user_id, key_id, model, provider, endpoint, status, "
        "http_status, prompt_tokens, completion_tokens, cached_tokens, estimated, cost, charged, latency_ms, "
        "ttft_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", usage)
    db.executemany("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, note, actor, usage_id) "
                   "VALUES (?, ?, 'charge', ?, ?, ?, 'gateway', ?)", ledger)
    db.executemany("UPDATE balances SET balance = ? WHERE user_id = ?", [(b, u) for u, b in balance.items()])
    db.executemany("UPDATE api_keys SET spent = ? WHERE id = ?", [(s, k) for k, s in spent.items()])
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()
    return {"users": users, "keys": 2 * users, "usage": rows, "charges": len(ledger), "start_ms": start}


def timed(fn: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[tuple[float, T]]]:
    async def run() -> tuple[float, T]:
        began = time.perf_counter()
        result = await fn()
        return time.perf_counter() - began, result
    return run


async def longest_stall(work: Awaitable[Any]) -> float:
    """The longest the event loop went without running a ticker that asks to run every
    millisecond, in seconds, while ``work`` ran: what every stream of a gateway serving a report
    to ``/admin/usage`` would wait for its next write."""
    gaps = [0.0]

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    gaps[0] = 0.0
    await work
    await asyncio.sleep(0.01)  # the gap that ends with the work's last step, counted
    ticker.cancel()
    return gaps[0]


Figure = tuple[str, float, float, int, float]


async def time_reports(store: Store, since: str, repeat: int) -> tuple[list[Figure], dict]:
    """(grouping, first run s, best run s, groups, the loop's longest stall s in one more run) for
    each grouping, and every report's totals."""
    figures: list[Figure] = []
    totals: dict[str, Any] = {}
    cases: list[tuple[str, dict[str, str]]] = [(by, {}) for by in GROUPINGS] + [
        ("day,model", {"since": since}), ("model", {"since": since}), ("day", {"model": "gpt-4o"}),
        ("day", {"user": "user0001@example.com"})]
    for by, where in cases:
        query = reports.ReportQuery(by=reports.parse_by(by), **where)
        runs = [await timed(lambda q=query: reports.build_report(store, q))() for _ in range(repeat)]
        report = runs[0][1]
        label = " ".join([f"--by {by}", *(f"--{k} {v}" for k, v in where.items())])
        stall = await longest_stall(reports.build_report(store, query))
        figures.append((label, runs[0][0], min(t for t, _ in runs), len(report.rows), stall))
        totals[label] = report
    return figures, totals


def additive(report: reports.Report) -> dict[str, Any]:
    """What a prune must not change: every sum, per group and in total (not the percentiles)."""
    def sums(row: Any) -> tuple[int, ...]:
        return (row.requests, row.errors, row.prompt_tokens, row.completion_tokens, row.cached_tokens,
                row.cache_write_tokens, row.reasoning_tokens, row.cost)
    return {"total": sums(report.total), "rows": {tuple(r.group.items()): sums(r) for r in report.rows}}


def cli_seconds(config: Path, args: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "apibox", *args, "--config", str(config)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def table(title: str, figures: list[Figure]) -> str:
    lines = [f"### {title}", "", "| report | groups | first run s | best of runs s | the loop's longest stall ms |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| `{label}` | {groups:,} | {first:.3f} | {best:.3f} | {stall * 1000:.0f} |"
              for label, first, best, groups, stall in figures]
    return "\n".join(lines)


def say(text: str = "") -> None:
    print(text, flush=True)


async def bench(args: argparse.Namespace, directory: Path) -> None:
    db = directory / "apibox.db"
    config = directory / "apibox.yaml"
    config.write_text(CONFIG.format(db=db))
    store = await open_store(f"sqlite:///{db}")
    await store.close()
    began = time.perf_counter()
    made = generate(db, args.rows, args.users, args.days, args.seed)
    say(f"{made['usage']:,} usage rows, {made['charges']:,} ledger charges, {made['users']} users, "
        f"{made['keys']} keys, {args.days} days; written in {time.perf_counter() - began:.1f} s; "
        f"database {db.stat().st_size / 1e6:.0f} MB\n")
    store = await open_store(f"sqlite:///{db}")
    try:
        seconds, problems = await timed(store.audit)()
        assert problems == [], problems[:5]
        say(f"`db check` (the audit) before prune: {seconds:.2f} s, OK\n")
        # a date, not "7d": the window must be the same before and after the prune
        week = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
        figures, before = await time_reports(store, week, args.repeat)
        say(table("Reports over live rows", figures) + "\n")
        for by in ("model", "user,model"):
            cli = cli_seconds(config, ["usage", "report", "--by", by, "--format", "json"])
            say(f"`apibox usage report --by {by} --format json` as a process (Python start-up included): {cli:.2f} s")
        say()
        cutoff = datetime.fromtimestamp(made["start_ms"] / 1000, UTC) + timedelta(days=args.days * 2 // 3)
        seconds, result = await timed(lambda: store.prune_usage(cutoff))()
        say(f"`usage prune --before {cutoff.date()}`: {result.rows:,} rows folded into {result.daily_rows:,} "
            f"daily rows in {seconds:.1f} s ({result.batches} transactions)")
        seconds, problems = await timed(store.audit)()
        assert problems == [], problems[:5]
        say(f"`db check` after prune: {seconds:.2f} s, OK\n")
        figures, after = await time_reports(store, week, args.repeat)
        for label, report in before.items():
            # grouped by hour, a folded day becomes one group: only its total must stay
            same = additive(report) == additive(after[label]) if "hour" not in label else \
                additive(report)["total"] == additive(after[label])["total"]
            assert same, f"{label}: totals changed by the prune"
        say(table("Reports after prune (live rows + daily aggregates); every sum identical", figures) + "\n")
    finally:
        await store.close()
    for by in ("model", "user,model"):
        cli = cli_seconds(config, ["usage", "report", "--by", by, "--format", "json"])
        say(f"`apibox usage report --by {by} --format json` as a process, after prune: {cli:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each report (first and best are shown)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="write the database here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="apibox-report-scale-"))
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "apibox.db").exists():
        parser.error(f"{directory / 'apibox.db'} exists; give an empty --dir")
    try:
        asyncio.run(bench(args, directory))
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"\nkept {directory}", file=sys.stderr)
    print(f"\n(python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
