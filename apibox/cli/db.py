"""`apibox db migrate / check`: the schema and the ledger audit."""

from __future__ import annotations

import typer

from apibox import billing
from apibox.cli.common import ConfigOption, JsonOption, console, err_console, handles_errors, print_json, with_store

app = typer.Typer(help="Database schema and audit.", no_args_is_help=True)


@app.command("migrate")
@handles_errors
def migrate(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Apply any pending schema migrations (serve does this too)."""
    applied = with_store(config, lambda store, _: store.migrate(), migrate=False)
    if as_json:
        print_json({"applied": applied})
    else:
        console.print(f"Applied {', '.join(applied)}." if applied else "The schema is up to date.")


@app.command("check")
@handles_errors
def check(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Audit the books: balances equal ledger sums, holds add up, charges match usage. Exit 1 on any problem."""
    problems = with_store(config, lambda store, _: billing.check(store))
    if as_json:
        print_json({"ok": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            err_console.print(f"problem: {problem}", style="red")
    else:
        console.print("OK: balances, holds, ledger and usage agree.")
    if problems:
        raise typer.Exit(1)
