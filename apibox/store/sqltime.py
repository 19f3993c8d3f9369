"""Times in the SQLite schema: INTEGER milliseconds since the Unix epoch, UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_ms(moment: datetime | None) -> int | None:
    """Milliseconds since the epoch, rounded down exactly: the seconds and the fraction apart, as
    ``timestamp() * 1000`` in floating point rounds the last millisecond of 9999 up into a year
    10000 that no ``datetime`` can hold when read back."""
    if moment is None:
        return None
    return int(moment.replace(microsecond=0).timestamp()) * 1000 + moment.microsecond // 1000


def from_ms(value: int | None) -> datetime | None:
    return None if value is None else EPOCH + timedelta(milliseconds=value)  # exact, where value / 1000 is not
