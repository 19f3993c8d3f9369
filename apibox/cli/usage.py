"""`apibox usage report`: requests, tokens and cost, grouped and filtered."""

from __future__ import annotations

import csv
import sys
from typing import Annotated

import typer

from apibox import reports
from apibox.cli.common import ConfigOption, JsonOption, console, fail, handles_errors, print_json, with_store
from apibox.cli.render import table

app = typer.Typer(help="Usage reports.", no_args_is_help=True)
# Short headers so the table fits a terminal; csv and json keep the full field names.
TABLE_HEADERS = ("requests", "errors", "prompt tok", "output tok", "cached tok", "cost USD", "avg ms")


@app.command("report")
@handles_errors
def report(
    by: Annotated[str, typer.Option("--by", help="Group by day, model, user, key or provider "
                                    "(comma-separated for several).")] = "day",
    since: Annotated[str | None, typer.Option("--since", help="From a date or a duration ago (7d, 24h).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Up to (not including) a date or duration ago.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user (email or id).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Requests, tokens, errors and cost, with a totals row."""
    if output not in ("table", "csv", "json"):
        raise fail(f"--format must be table, csv or json, not {output!r}")
    query = reports.ReportQuery(by=reports.parse_by(by), since=since, until=until, user=user, key=key, model=model)
    rows = with_store(config, lambda store, _: reports.usage_report(store, query))
    data = [reports.row_json(r) for r in rows]
    if as_json or output == "json":
        print_json(data)
        return
    columns = [*query.by, "requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
               "avg_latency_ms"]
    if output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([row.get(c, "") for c in columns] for row in data)
        return
    width = len(query.by)
    total = reports.row_json(reports.totals(rows))
    lines = [[row.get(c, "") for c in columns] for row in data]
    lines.append([("TOTAL" if i == 0 else "") for i in range(width)] + [total[c] for c in columns[width:]])
    headers = [*query.by, *TABLE_HEADERS]
    console.print(table(None, headers, lines, right=TABLE_HEADERS))
