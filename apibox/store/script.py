"""Transaction scripts: one piece of code for a transaction, whichever engine runs it.

A script is a generator that yields ``(sql, params)`` and is sent back the rows each
statement returned. SQLite runs it start to end in one go on the event loop's thread
(``SqliteWriter``); PostgreSQL runs it on one pooled connection inside one
transaction, awaiting each statement. SQL is written once, with ``?`` placeholders, in the
subset both engines speak; the one exception is a step of the settlement that PostgreSQL does
in one statement where SQLite needs three (``SqlStore._charge``), because there every statement
is a round trip while the user's balance row is locked.

When a statement breaks a constraint the runner throws ``IntegrityViolation`` into the
script at that ``yield``; a script may turn it into a domain error, but must not go on
querying (PostgreSQL aborts the transaction).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Row = Sequence[Any]
Query = tuple[str, Sequence[Any]]
Script = Generator[Query, list[Row], T]


class IntegrityViolation(Exception):
    """A statement broke a UNIQUE, CHECK or foreign-key constraint (either engine)."""


def single(sql: str, params: Sequence[Any] = ()) -> Script[list[Row]]:
    """A script of one statement, returning its rows."""
    return (yield sql, params)


def drive(script: Script[T], execute: Any, integrity_errors: tuple[type[BaseException], ...]) -> T:
    """Run ``script`` with a synchronous ``execute(sql, params) -> rows``."""
    try:
        query = next(script)
        while True:
            try:
                rows = execute(*query)
            except integrity_errors as exc:
                query = script.throw(IntegrityViolation(str(exc)))
            else:
                query = script.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
