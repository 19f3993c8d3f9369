"""`apibox db migrate / check / copy`: the schema, the ledger audit, moving to another database."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from apibox import billing
from apibox.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    err_console,
    handles_errors,
    print_json,
    progress_bars,
    with_store,
)
from apibox.errors import InvalidRequest
from apibox.store import missing_sqlite_file, open_store
from apibox.store.base import ProgressFn
from apibox.urls import masked_url

if TYPE_CHECKING:  # the copy's module loads only for `db copy`
    from apibox.store.copying import CopyResult

app = typer.Typer(help="Database schema and audit.", no_args_is_help=True)


@app.command("migrate")
@handles_errors
def migrate(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Apply any pending schema migrations (serve does this too)."""
    applied = with_store(config, lambda store, _: store.migrate(), migrate=False, create=True)
    if as_json:
        print_json({"applied": applied})
    else:
        console.print(f"Applied {', '.join(applied)}." if applied else "The schema is up to date.", soft_wrap=True)


@app.command("check")
@handles_errors
def check(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Audit the books: balances equal ledger sums, holds add up, charges match usage. Exit 1 on any problem."""
    with progress_bars(hidden=as_json) as progress:
        problems = with_store(config, lambda store, _: billing.check(store, progress))
    if as_json:
        print_json({"ok": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            err_console.print(f"problem: {problem}", style="red", soft_wrap=True)
    else:
        console.print("OK: balances, holds, ledger and usage agree.")
    if problems:
        raise typer.Exit(1)


@app.command("copy")
@handles_errors
def copy(
    source: Annotated[str, typer.Option("--from", help="The database to copy, e.g. sqlite:///apibox.db.",
                                        show_default=False)],
    target: Annotated[str, typer.Option("--to", help="An empty database to copy into, e.g. "
                                        "postgresql://apibox@db.internal/apibox.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Copy every user, key, balance, ledger entry and usage row into an empty database, and verify it.
    Stop the gateways using the source first.

    The copy is verified by its row counts, its money totals and the ledger audit."""
    with progress_bars(hidden=as_json) as progress:
        result = asyncio.run(_copy(source, target, progress))
    if as_json:
        print_json({"rows": result.rows, "totals": result.totals, "ok": True})
        return
    for table, rows in result.rows.items():
        console.print(f"{table:<12} {rows:>10} rows")
    console.print(f"Copied {masked_url(source)} to {masked_url(target)}; counts, balances, ledger and usage totals "
                  "match and the audit of the copy is clean.")


async def _copy(source_url: str, target_url: str, progress: ProgressFn) -> CopyResult:
    if source_url == target_url:
        raise InvalidRequest("--from and --to are the same database")
    for url in (source_url, target_url):
        if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise InvalidRequest(f"{masked_url(url)!r} is not a database URL (sqlite:///PATH or postgresql://...)")
    if missing_sqlite_file(source_url) is not None:
        raise InvalidRequest(f"there is no SQLite database at {missing_sqlite_file(source_url)}")
    from apibox.store.copying import copy_database

    source = await open_store(source_url)
    try:
        target = await open_store(target_url)
        try:
            return await copy_database(source, target, progress)  # type: ignore[arg-type]
        finally:
            await target.close()
    finally:
        await source.close()
