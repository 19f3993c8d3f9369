"""Transaction scripts: one piece of code for a transaction, whichever engine runs it.

A script is a generator that yields ``(sql, params)`` and is sent back the rows each
statement returned. SQLite runs it start to end in one go on the event loop's thread
(``SqliteWriter``); PostgreSQL runs it on one pooled connection inside one
transaction, awaiting each statement. SQL is written once, with ``?`` placeholders, in the
subset both engines speak. The exceptions: PostgreSQL runs the settlement, and the hold of a
key with a budget, as one call of a function each, with the same steps (``PostgresStore``,
migration 0008), because there every statement is a round trip and the scripts took four or
five, some while the user's balance row was locked; and SQLite takes the hold of a key without a
budget in a cheaper form (``SqliteStore.hold``).

A statement whose caller wants only the id of the one row it inserted, or how many rows it
changed, says so (``Want``) instead of asking for rows with RETURNING: each engine then gets it
its cheapest way. On SQLite a RETURNING clause buffers its rows in a temporary b-tree, which
more than doubled an INSERT's instructions (38.5k against 16.9k, callgrind); the cursor
knows the new id and the count anyway. PostgreSQL adds the RETURNING clause itself.

When a statement breaks a constraint the runner throws ``IntegrityViolation`` into the
script at that ``yield``; a script may turn it into a domain error, but must not go on
querying (PostgreSQL aborts the transaction).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")
Row = Sequence[Any]


class Want(Enum):
    """What a statement's caller wants back instead of rows (a statement without it returns its rows)."""

    NEW_ID = "new_id"  # an INSERT of at most one row into a table keyed by ``id``: [(its id,)], or [] if none
    COUNT = "count"  # [(how many rows the statement inserted, updated or deleted,)]


Query = tuple[str, Sequence[Any]] | tuple[str, Sequence[Any], Want]
Script = Generator[Query, list[Row], T]


class IntegrityViolation(Exception):
    """A statement broke a UNIQUE, CHECK or foreign-key constraint (either engine)."""


def single(sql: str, params: Sequence[Any] = (), want: Want | None = None) -> Script[list[Row]]:
    """A script of one statement, returning its rows (or what ``want`` asks for)."""
    return (yield (sql, params) if want is None else (sql, params, want))


def unless_refused(sql: str, params: Sequence[Any] = (), want: Want | None = None) -> Script[list[Row]]:
    """A script of one statement that a constraint may refuse: then it returns ``[]``, not an error.
    SQLite only, where a refused statement is undone alone and its transaction (a group commit's,
    shared with other requests') goes on; PostgreSQL aborts the whole transaction."""
    try:
        return (yield from single(sql, params, want))
    except IntegrityViolation:
        return []


def drive(script: Script[T], execute: Any, integrity_errors: tuple[type[BaseException], ...]) -> T:
    """Run ``script`` with a synchronous ``execute(sql, params[, want]) -> rows``."""
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
