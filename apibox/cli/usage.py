"""`apibox usage report / chart / prune`: requests, tokens and cost, grouped and filtered; a daily
spend chart; folding old usage rows into daily totals."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich import box
from rich.bar import Bar
from rich.table import Table

from apibox import reports
from apibox.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    fail,
    handles_errors,
    print_json,
    print_table,
    progress_bars,
    spinner,
    with_store,
    write_csv,
)
from apibox.cli.render import table
from apibox.money import format_usd

app = typer.Typer(help="Usage reports, the daily spend chart, and retention.", no_args_is_help=True)
# Short headers so the table fits a terminal (cache-write and reasoning tokens are in csv and json);
# csv and json keep the full field names.
TABLE_FIELDS = {"requests": "requests", "errors": "errors", "error_rate": "err %", "prompt_tokens": "prompt tok",
                "completion_tokens": "output tok", "cached_tokens": "cached tok", "cost_usd": "cost USD",
                "avg_latency_ms": "avg ms", "p50_latency_ms": "p50 ms", "p95_latency_ms": "p95 ms",
                "p50_ttft_ms": "ttft p50"}
BAR_WIDTH = 40
# Help texts with a short first paragraph (the command list shows it) and no line breaks inside one.
REPORT_HELP = (
    "Requests, errors, tokens, cost, latency and time to first token, per group, with a totals row.\n\n"
    "Cost is what the ledger charged. Latency is the average, p50 and p95; time to first token the p50 "
    "(nearest rank, in ms). Percentiles cover the usage rows not yet pruned; pruned days keep every sum.")
PRUNE_HELP = (
    "Fold old usage rows into daily totals, then delete them (retention).\n\n"
    "The totals are kept per day, user, key, model, provider and outcome. Reports and `db check` read them, so "
    "no report's sums change; the percentiles and per-request detail of those days are gone. Running it again "
    "folds nothing new. Responses the upstream stored before the cut (Responses API) are forgotten too: their "
    "users can no longer continue, read or delete them through apibox.")


def _cell(field: str, value: Any) -> Any:
    if field == "error_rate":
        return f"{value * 100:.1f}"
    return value


@app.command("report", help=REPORT_HELP)
@handles_errors
def report(
    by: Annotated[str, typer.Option("--by", help="Group by day, hour, model, user, key or provider "
                                    "(comma-separated for several; '' for one total row).")] = "day",
    since: Annotated[str | None, typer.Option("--since", help="From a date or a duration ago (7d, 24h).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Up to (not including) a date or duration ago.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user (email or id).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    output: Annotated[str, typer.Option("--format", help="table, csv or json (json: the group rows only; "
                                        "table and csv end with a TOTAL row).")] = "table",
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Requests, errors, tokens, cost, latency and time to first token, per group, with a totals row."""
    if output not in ("table", "csv", "json"):
        raise fail(f"--format must be table, csv or json, not {output!r}")
    query = reports.ReportQuery(by=reports.parse_by(by), since=since, until=until, user=user, key=key, model=model)
    with spinner("Reading usage...", hidden=as_json or output == "json"):
        result = with_store(config, lambda store, _: reports.build_report(store, query))
    data = [reports.row_json(r) for r in result.rows]
    if as_json or output == "json":
        print_json(data)
        return
    total = reports.row_json(result.total)
    width = len(query.by)
    if width:
        total.update({name: ("TOTAL" if i == 0 else "") for i, name in enumerate(query.by)})
        data.append(total)
    else:
        data = [total]  # grouped by nothing, the one row is the total
    if output == "csv":
        columns = [*query.by, *reports.ROW_FIELDS]
        write_csv([columns, *([row.get(c, "") for c in columns] for row in data)])
        return
    lines = [[row[c] for c in query.by] + [_cell(f, row[f]) for f in TABLE_FIELDS] for row in data]
    print_table(table(None, [*query.by, *TABLE_FIELDS.values()], lines, right=TABLE_FIELDS.values()))


@app.command("chart")
@handles_errors
def chart(
    days: Annotated[int, typer.Option("--days", help="How many days, today (UTC) included.")] = 30,
    user: Annotated[str | None, typer.Option("--user", help="Only this user (email or id).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """What was charged each day (UTC), as a bar chart in the terminal with the exact amounts."""
    with spinner("Reading usage...", hidden=as_json):
        spend = with_store(config, lambda store, _: reports.daily_spend(store, days, user=user, model=model))
    if as_json:
        print_json([{"day": d.day.isoformat(), "requests": d.requests, "cost_usd": format_usd(d.cost)}
                    for d in spend])
        return
    top = max(d.cost for d in spend)
    grid = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    grid.add_column("day (UTC)")
    grid.add_column("spend", width=BAR_WIDTH, no_wrap=True)
    grid.add_column("cost USD", justify="right", no_wrap=True)
    grid.add_column("requests", justify="right", no_wrap=True)
    for d in spend:
        grid.add_row(d.day.isoformat(), Bar(top or 1, 0, d.cost, width=BAR_WIDTH), format_usd(d.cost),
                     str(d.requests))
    grid.add_row("TOTAL", "", format_usd(sum(d.cost for d in spend)), str(sum(d.requests for d in spend)),
                 style="bold")
    console.print(grid)


@app.command("prune", help=PRUNE_HELP)
@handles_errors
def prune(
    before: Annotated[str, typer.Option("--before", help="Fold usage rows of the days before this date "
                                        "(2026-01-31, or 90d for 90 days ago); yesterday at the latest.",
                                        show_default=False)],
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Fold old usage rows into daily totals, then delete them (retention)."""
    with progress_bars(hidden=as_json) as progress:
        result = with_store(config, lambda store, _: reports.prune(store, before, progress=progress))
    if as_json:
        print_json(reports.prune_json(result))
    else:
        if not result.rows:
            console.print(f"Nothing to fold: no usage rows before {result.before.date().isoformat()}.")
        else:
            console.print(f"Folded {result.rows} usage rows from {result.first_day} to {result.last_day} "
                          f"({result.requests} requests, {format_usd(result.charged)} USD charged) into the daily "
                          f"totals, in {result.batches} transaction{'s' if result.batches > 1 else ''}; "
                          f"{result.daily_rows} daily rows in all.")
        if result.responses:
            console.print(f"Forgot {result.responses} stored response{'s' if result.responses > 1 else ''} "
                          "made before then: their users can no longer continue, read or delete them here.")
