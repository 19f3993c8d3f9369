"""apibox as a benchmark target: a throw-away config, database, user, balance and key, and the
money audit after the run.

Billing is fully on: every request is authenticated with a real key, holds its worst case,
settles once (usage row, ledger row, key spend) against a SQLite database in WAL mode,
exactly as `apibox serve` does in production.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

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
    db: Path
    port: int
    key: str = ""
    topup_micro: int = 0
    log: list[str] = field(default_factory=list)

    def serve_cmd(self) -> list[str]:
        return [*cli(), "serve", "--config", str(self.config), "--port", str(self.port)]

    def run(self, *args: str) -> str:
        cmd = [*cli(), *args, "--config", str(self.config)]
        self.log.append(" ".join(cmd))
        done = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout


def config_text(db: Path, upstream_v1: str, port: int) -> str:
    return "\n".join([
        "# written by bench/: one model routed to the benchmark's mock upstream",
        "server:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        "database:",
        f"  url: sqlite:///{db}",  # db is absolute, so this is sqlite:////abs/path
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


def prepare(workdir: Path, upstream_v1: str, port: int) -> ApiboxSetup:
    """A fresh apibox: config, migrated SQLite DB, one user with a large balance, one key."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = (workdir / "apibox.db").resolve()
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    cfg = workdir / "apibox.yaml"
    cfg.write_text(config_text(db, upstream_v1, port))
    setup = ApiboxSetup(workdir=workdir, config=cfg.resolve(), db=db, port=port)
    setup.run("config", "check")
    setup.run("db", "migrate")
    setup.run("users", "create", USER, "--name", "Benchmark", "--json")
    topup = json.loads(setup.run("topup", USER, TOPUP_USD, "--reference", "bench-topup", "--json"))
    setup.topup_micro = to_micro(topup["amount_usd"])
    setup.key = json.loads(setup.run("keys", "create", USER, "--name", "bench", "--json"))["key"]
    return setup


def to_micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


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

    con = sqlite3.connect(f"file:{setup.db}?mode=ro", uri=True)
    try:
        one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        result["ledger_charged"] = -one("SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind = 'charge'")
        result["ledger_charge_rows"] = one("SELECT count(*) FROM ledger WHERE kind = 'charge'")
        result["usage_cost"] = one("SELECT coalesce(sum(cost), 0) FROM usage")
        result["usage_charged"] = one("SELECT coalesce(sum(charged), 0) FROM usage")
        result["usage_rows"] = one("SELECT count(*) FROM usage")
        result["usage_by_status"] = {f"{s} {h}": n for s, h, n in con.execute(
            "SELECT status, http_status, count(*) FROM usage GROUP BY status, http_status ORDER BY 3 DESC")}
        result["usage_2xx"] = one("SELECT count(*) FROM usage WHERE http_status < 300")
        result["usage_ok_2xx"] = one("SELECT count(*) FROM usage WHERE status = 'ok' AND http_status < 300")
        result["usage_estimated"] = one("SELECT count(*) FROM usage WHERE estimated != 0")
        result["balance"], result["held"] = con.execute("SELECT balance, held FROM balances").fetchone()
        result["open_holds"] = one("SELECT count(*) FROM holds")
    finally:
        con.close()

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
