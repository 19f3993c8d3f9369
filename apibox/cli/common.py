"""What every command shares: the --config and --json options, the store, the one-line error, the
progress bars and the spinner of long work."""

from __future__ import annotations

import asyncio
import csv
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from apibox.config import Settings, load_settings
from apibox.errors import ApiboxError, InvalidRequest
from apibox.jsoncodec import dumps_pretty
from apibox.models import Page
from apibox.store import missing_sqlite_file, open_store
from apibox.store.base import ProgressFn, Store

if TYPE_CHECKING:
    from apibox.cli.render import PlainTable

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # how a spreadsheet cell becomes a formula
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
T = TypeVar("T")

ConfigOption = Annotated[str | None, typer.Option(
    "--config", "-c", help="Config file (default: $APIBOX_CONFIG, then ./apibox.yaml, then built-in defaults).",
    show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else.")]
AfterOption = Annotated[int | None, typer.Option(
    "--after", help="Only those after this id: the last one of the page before.", show_default=False)]
LimitOption = Annotated[int | None, typer.Option("--limit", help="At most this many (default: every one).",
                                                 show_default=False)]

# markup and emoji codes are off: user data (notes, names) must print as typed, never as rich
# markup or with ":smile:" turned into a picture.
# Piped output is not cut to 80 columns: tables stay one row per line for grep and less.
console = Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print("error: ", style="red", end="")
    err_console.print(message, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Turn an ApiboxError into one line on stderr and exit code 1 (no traceback)."""
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except ApiboxError as exc:
            raise fail(exc.message) from None
    return wrapper


def with_store(config: str | None, action: Callable[[Store, Settings], Awaitable[T]], *,
               migrate: bool = True, create: bool = False) -> T:
    """Load the settings, open (and migrate) the store, run ``action``, close the store. A SQLite
    file that is not there is refused, unless ``create`` (the commands that start a database):
    a mistyped path would otherwise become a new, empty database that every check finds sound."""
    settings = load_settings(config)
    missing = None if create else missing_sqlite_file(settings.database.url)
    if missing is not None:
        raise InvalidRequest(f"there is no SQLite database at {missing} (database.url); check the path, or make "
                             "one with `apibox db migrate`")
    # The result is kept off the main task: on its way out, Python 3.11's asyncio.run formats the
    # repr of its SIGINT handler, the task in it and the task's result, a whole report with it.
    result: list[T] = []

    async def run() -> None:
        store = await open_store(settings.database.url, migrate=migrate, pool_size=settings.database.pool_size)
        try:
            result.append(await action(store, settings))
        finally:
            await store.close()
    asyncio.run(run())
    return result[0]


def next_page_hint(page: Page, ids: list[int], command: str) -> None:
    """After a full page of a listing, the command that shows the next one (on stderr: stdout
    keeps only the listing)."""
    if page.is_full(len(ids)):
        err_console.print(f"More may follow: {command} --after {ids[-1]} --limit {page.limit}", soft_wrap=True)


def write_csv(rows: Iterable[Sequence[object]]) -> None:
    """Rows as CSV on stdout, each text cell safe to open in a spreadsheet (``spreadsheet_safe``)."""
    csv.writer(sys.stdout).writerows([spreadsheet_safe(cell) for cell in row] for row in rows)


def spreadsheet_safe(cell: object) -> object:
    """A cell no spreadsheet runs as a formula: text that starts as one does (= + - @, a tab, a
    carriage return) gets a leading apostrophe (OWASP's advice for CSV). Notes and names are
    anyone's text; numbers, negative amounts among them, are left as they are."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def print_table(table: PlainTable) -> None:
    """A table on stdout. A ``PlainTable`` fits its lines to the console itself, so the console's
    own pass over every line to crop it is skipped: for 100,000 rows, most of the printing."""
    console.print(table, crop=False)


def print_json(data: Any) -> None:
    sys.stdout.write(dumps_pretty(data).decode())


@contextmanager
def progress_bars(hidden: bool) -> Iterator[ProgressFn]:
    """A ``ProgressFn`` that draws a bar on stderr for each thing it is told about while the block
    runs; the bars are cleared at its end. Drawn only on a terminal (a redirected stderr gets not
    even a blank line) and not when ``hidden`` (``--json``). rich's progress module loads here, not
    when the CLI starts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), console=err_console,
                  transient=True, disable=hidden or not err_console.is_terminal) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)

        yield progress


@contextmanager
def spinner(what: str, hidden: bool) -> Iterator[None]:
    """A spinner and ``what`` on stderr while the block runs, cleared at its end, for long work with
    nothing to count (a report over a million usage rows reads for seconds in one statement). Drawn
    only on a terminal and not when ``hidden`` (``--json``), as the progress bars are."""
    if hidden or not err_console.is_terminal:
        yield
        return
    with err_console.status(what):
        yield
