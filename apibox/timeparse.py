"""Dates and durations typed by operators: ``30d``, ``12h``, ``2026-12-31``, ISO date-times."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class TimeParseError(ValueError):
    pass


def parse_duration(text: str) -> timedelta | None:
    """``30d`` -> 30 days; None when ``text`` is not a duration."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_moment(text: str) -> datetime:
    """An ISO date (midnight UTC) or date-time (UTC when no zone is given)."""
    raw = text.strip()
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise TimeParseError(f"{text!r} is not a date (use e.g. 2026-12-31, 2026-12-31T18:00:00Z or 30d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _representable(text: str, make: Callable[[], datetime]) -> datetime:
    """The moment ``make`` builds, refused when it (or it in UTC, as it is stored) leaves years 1-9999."""
    try:
        moment = make()
        moment.astimezone(UTC)
    except OverflowError:
        raise TimeParseError(f"{text!r} is too far away") from None
    return moment


def parse_expiry(text: str, now: datetime) -> datetime:
    """When a key expires: a duration from now (``30d``) or a moment; must be in the future."""
    duration = parse_duration(text)
    moment = _representable(text, lambda: now + duration if duration is not None else parse_moment(text))
    if moment <= now:
        raise TimeParseError(f"{text!r} is not in the future")
    return moment


def parse_since(text: str, now: datetime) -> datetime:
    """The start of a report window: a duration back from now (``7d``) or a moment."""
    duration = parse_duration(text)
    return _representable(text, lambda: now - duration if duration is not None else parse_moment(text))
