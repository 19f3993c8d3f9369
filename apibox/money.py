"""Money as integers of micro-USD (1 USD = 1,000,000). Floats never touch a balance.

Parsing is exact (Decimal); formatting is for the edges (CLI, JSON, HTTP) only.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation

MICRO = 1_000_000
# The largest amount apibox accepts in one operation or holds in one balance: $1 billion.
# Far below 2**63 micro-USD, so sums of many of them still fit a BIGINT column.
MAX_AMOUNT_MICRO = 1_000_000_000 * MICRO
# The most a 64-bit integer column holds: no balance can be larger, nor any amount stored.
MAX_STORED_MICRO = 2**63 - 1


# An amount whose whole part is grouped by thousands with underscores (Decimal takes them anywhere).
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:_\d{3})+(?:\.\d*)?")


class MoneyError(ValueError):
    """An amount that is not an exact, finite, in-range USD value."""


def parse_usd(text: str | int | float | Decimal, *, allow_negative: bool = False,
              allow_zero: bool = False) -> int:
    """Parse a USD amount like ``"10"``, ``"10.5"`` or ``"0.000001"`` into micro-USD.

    Rejects digits other than ASCII's, NaN, infinities, exponents that overflow, more than 6
    decimals, negatives (unless allowed), zero (unless allowed) and amounts above ``MAX_AMOUNT_MICRO``.
    """
    raw = str(text).strip()
    if isinstance(text, float):
        raw = repr(text)  # shortest repr keeps 0.075 exact
    raw = raw.removeprefix("$")
    if "_" in raw:  # a thousands separator, where it belongs: "1_0" is a typo, not ten dollars
        if not _GROUPED.fullmatch(raw):
            raise MoneyError(f"{text!r} is not an amount of USD (separate thousands as in 1_000, or not at all)")
        raw = raw.replace("_", "")
    try:  # ASCII only: Decimal reads any script's digits, and "١٠" would be 10 USD
        value: Decimal | None = Decimal(raw) if raw.isascii() else None
    except (InvalidOperation, ValueError):
        value = None
    if value is None:
        raise MoneyError(f"{text!r} is not an amount of USD (expected e.g. 10 or 10.50)")
    if not value.is_finite():
        raise MoneyError(f"{text!r} is not a finite amount")
    if value.is_signed() and value != 0 and not allow_negative:
        raise MoneyError(f"{text!r} is negative; the amount must be positive")
    if abs(value) > Decimal(MAX_AMOUNT_MICRO) / MICRO:
        raise MoneyError(f"{text!r} is too large (the most is {format_usd(MAX_AMOUNT_MICRO)} USD)")
    try:
        # Exact or refused: the default 28-digit context would silently round away a 7th
        # decimal far enough to the right (and flush a tiny exponent to zero).
        micro: Decimal | None = Context(traps=[Inexact]).multiply(value, MICRO)
    except Inexact:
        micro = None
    if micro is None or micro != micro.to_integral_value():
        raise MoneyError(f"{text!r} has more than 6 decimals; the smallest unit is 0.000001 USD")
    result = int(micro)
    if result == 0 and not allow_zero:
        raise MoneyError(f"{text!r} is zero; the amount must not be zero")
    return result


def format_usd(micro: int) -> str:
    """Format micro-USD as a decimal string with exactly 6 decimals: ``9999850 -> "9.999850"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def usd_number(micro: int) -> float:
    """USD as a JSON number, for fields such as ``usage.cost`` that clients read as numbers: the
    float nearest the exact amount (Python's int division is correctly rounded; a Decimal on the
    way cost a microsecond on every answer)."""
    return micro / MICRO


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding up (towards +infinity), for non-negative denominators."""
    return -(-numerator // denominator)
