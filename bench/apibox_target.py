"""apibox as a benchmark target: a throw-away config, database, user, balance and key, and the
money audit after the run.

Billing is fully on: every request is authenticated with a real key, holds its worst case,
settles once (usage row, ledger row, key spend) against a SQLite database in WAL mode, or a
fresh database on a PostgreSQL server (``--postgres URL``), exactly as `apibox serve` does in
production, with one worker or several (``--workers N``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MODEL = "bench-model"
USER = "bench@example.com"
TOPUP_USD = "1000000"  # large enough that no request is ever shortened or refused
PRICE = {"input": "2.5", "output": "10"}  # USD per 1M tokens: every request costs > 0 micro-USD


def cli() -> list[str]:
    """The apibox CLI of the interpreter running the benchmark (the editable install)."""
    return [sys.executable, "-m", "apibox"]


@dataclass
class ApiboxSetup:
    workdir: Path
    config: Path
    database_url: str
    port: int
    workers: int = 1
    key: str = ""
    topup_micro: int = 0
    log: list[str] = field(default_factory=list)

    def serve_cmd(self) -> list[str]:
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        return [*cli(), "serve", "--config", str(self.config), "--port", str(self.port), *workers]

    def query(self, sql: str) -> list[Sequence[Any]]:
        """Rows of one read-only statement (the SQL both engines speak), straight from the database."""
        if self.database_url.startswith("sqlite:"):
            con = sqlite3.connect(f"file:{self.database_url.removeprefix('sqlite:///')}?mode=ro", uri=True)
            try:
                return con.execute(sql).fetchall()
            finally:
                con.close()
        return asyncio.run(_pg_fetch(self.database_url, sql))

    def run(self, *args: str) -> str:
        cmd = [*cli(), *args, "--config", str(self.config)]
        self.log.append(" ".join(cmd))
        done = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout


def config_text(database_url: str, upstream_v1: str, port: int) -> str:
    return "\n".join([
        "# written by bench/: one model routed to the benchmark's mock upstream",
        "server:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        "database:",
        f"  url: {database_url}",
        "providers:",
        "  - name: mock",
        "    type: openai",
        f"    base_url: {upstream_v1}",
        "    api_key: bench-not-a-secret",
        "    stream_usage: true",
        "models:",
        f"  - name: {MODEL}",
        "    max_output_tokens: 4096",
        f"    price: {{input: {PRICE['input']}, output: {PRICE['output']}}}",
        "    routes: [{provider: mock, model: gpt-4o-mini}]",
        "",
    ])


def prepare(workdir: Path, upstream_v1: str, port: int, *, postgres: str | None = None,
            workers: int = 1) -> ApiboxSetup:
    """A fresh apibox: config, migrated database (a new SQLite file, or a new database on the
    ``postgres`` server named after the work directory), one user with a large balance, one key."""
    workdir.mkdir(parents=True, exist_ok=True)
    if postgres:
        database_url = fresh_postgres_database(postgres, "bench_" + workdir.parent.name.replace("-", "_") + "_"
                                               + workdir.name.replace("-", "_"))
    else:
        db = (workdir / "apibox.db").resolve()
        for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            stale.unlink(missing_ok=True)
        database_url = f"sqlite:///{db}"  # db is absolute, so this is sqlite:////abs/path
    cfg = workdir / "apibox.yaml"
    cfg.write_text(config_text(database_url, upstream_v1, port))
    setup = ApiboxSetup(workdir=workdir, config=cfg.resolve(), database_url=database_url, port=port,
                        workers=workers)
    setup.run("config", "check")
    setup.run("db", "migrate")
    setup.run("users", "create", USER, "--name", "Benchmark", "--json")
    topup = json.loads(setup.run("topup", USER, TOPUP_USD, "--reference", "bench-topup", "--json"))
    setup.topup_micro = to_micro(topup["amount_usd"])
    setup.key = json.loads(setup.run("keys", "create", USER, "--name", "bench", "--json"))["key"]
    return setup


def to_micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _pg_fetch(url: str, sql: str) -> list[Sequence[Any]]:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await con.fetch(sql)]
    finally:
        await con.close()


async def _pg_execute(url: str, *statements: str) -> None:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


def fresh_postgres_database(server_url: str, name: str) -> str:
    """Drop and create database ``name`` on the server ``server_url`` points at; its URL."""
    asyncio.run(_pg_execute(server_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    return with_database(server_url, name)


def drop_postgres_database(server_url: str, database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    asyncio.run(_pg_execute(server_url, f'DROP DATABASE IF EXISTS "{name}"'))


def postgres_server_pid(server_url: str) -> int | None:
    """The postmaster's pid when the server runs on this machine (its backends are its children), else None."""
    async def parent_of_backend() -> int | None:
        import asyncpg

        con = await asyncpg.connect(server_url)
        try:
            backend = await con.fetchval("SELECT pg_backend_pid()")
            with open(f"/proc/{backend}/stat") as stat:  # read while the backend lives
                return int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return None
        finally:
            await con.close()
    return asyncio.run(parent_of_backend())


def postgres_settings(server_url: str) -> str:
    """The server's version and the settings that decide what a commit costs, for the report."""
    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers")
    rows = asyncio.run(_pg_fetch(server_url, "SELECT name, setting, unit FROM pg_settings WHERE name IN ("
                                             + ", ".join(f"'{n}'" for n in names) + ") ORDER BY name"))
    return ", ".join(f"{name}={setting}{unit or ''}" for name, setting, unit in rows)


def money_check(setup: ApiboxSetup, *, client_2xx: int, slack: int) -> dict:
    """After the gateway has stopped: `apibox db check`, then the totals side by side.

    ``client_2xx`` is every 2xx answer the clients saw (wrk's requests minus its status errors,
    warm-ups included, plus the harness's readiness and validation calls). ``slack`` is how many
    requests could have been in flight when a wrk run ended (the sum of its connections over
    all runs): wrk does not count those, but apibox still settles them, so the usage rows may
    exceed the 2xx count by at most that much, and never fall short of it.
    """
    result: dict = {"checks": {}}
    done = subprocess.run([*cli(), "db", "check", "--json", "--config", str(setup.config)], cwd=setup.workdir,
                          capture_output=True, text=True, timeout=600)
    try:
        audit = json.loads(done.stdout)
    except ValueError:
        audit = {"ok": False, "problems": [done.stdout.strip() or done.stderr.strip()]}
    result["db_check_exit"] = done.returncode
    result["db_check_problems"] = audit.get("problems", [])[:20]
    result["checks"]["apibox db check"] = done.returncode == 0 and bool(audit.get("ok"))

    report = json.loads(setup.run("usage", "report", "--by", "model", "--json"))
    result["usage_report_requests"] = sum(r["requests"] for r in report)
    result["usage_report_cost"] = sum(to_micro(r["cost_usd"]) for r in report)

    one = lambda sql: int(setup.query(sql)[0][0])  # noqa: E731
    result["ledger_charged"] = -one("SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind = 'charge'")
    result["ledger_charge_rows"] = one("SELECT count(*) FROM ledger WHERE kind = 'charge'")
    result["usage_cost"] = one("SELECT coalesce(sum(cost), 0) FROM usage")
    result["usage_charged"] = one("SELECT coalesce(sum(charged), 0) FROM usage")
    result["usage_rows"] = one("SELECT count(*) FROM usage")
    result["usage_by_status"] = {f"{s} {h}": int(n) for s, h, n in setup.query(
        "SELECT status, http_status, count(*) FROM usage GROUP BY status, http_status ORDER BY 3 DESC")}
    result["usage_2xx"] = one("SELECT count(*) FROM usage WHERE http_status < 300")
    result["usage_ok_2xx"] = one("SELECT count(*) FROM usage WHERE status = 'ok' AND http_status < 300")
    result["usage_estimated"] = one("SELECT count(*) FROM usage WHERE estimated != 0")
    result["balance"], result["held"] = (int(v) for v in setup.query("SELECT balance, held FROM balances")[0])
    result["open_holds"] = one("SELECT count(*) FROM holds")

    charged = result["ledger_charged"]
    result["client_2xx"] = client_2xx
    result["slack"] = slack
    result["extra_rows"] = result["usage_2xx"] - client_2xx
    checks = result["checks"]
    checks["ledger charges == usage charged"] = charged == result["usage_charged"]
    checks["charged total == usage total (cost)"] = charged == result["usage_cost"] == result["usage_report_cost"]
    checks["topup - balance == charged"] = setup.topup_micro - result["balance"] == charged
    checks["no open holds, held == 0"] = result["open_holds"] == 0 and result["held"] == 0
    checks["a settled 'ok' usage row for every 2xx answer"] = result["usage_ok_2xx"] >= client_2xx
    checks[f"2xx usage rows - 2xx answers within the in-flight slack (0..{slack})"] = 0 <= result["extra_rows"] <= slack
    result["ok"] = all(checks.values())
    return result


def money_lines(m: dict) -> list[str]:
    usd = lambda micro: f"${Decimal(micro) / 1_000_000:,.6f}"  # noqa: E731
    lines = [
        f"charged total (ledger charges): {usd(m['ledger_charged'])} over {m['ledger_charge_rows']} charges",
        f"usage total: cost {usd(m['usage_cost'])}, charged {usd(m['usage_charged'])}, "
        f"`usage report` {usd(m['usage_report_cost'])} over {m['usage_report_requests']} requests",
        f"usage rows: {m['usage_rows']} ({', '.join(f'{k}: {v}' for k, v in m['usage_by_status'].items())}; "
        f"{m['usage_estimated']} estimated); 2xx usage rows {m['usage_2xx']} vs 2xx answers seen by clients "
        f"{m['client_2xx']} (difference {m['extra_rows']:+d}, allowed 0..{m['slack']})",
        f"balance left {usd(m['balance'])}, held {usd(m['held'])}, open holds {m['open_holds']}",
    ]
    lines += [f"  [{'OK' if ok else 'FAIL'}] {name}" for name, ok in m["checks"].items()]
    lines += [f"  db check problem: {p}" for p in m["db_check_problems"]]
    lines.append(f"money check: {'OK' if m['ok'] else 'FAIL'}")
    return lines
