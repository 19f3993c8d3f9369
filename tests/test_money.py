"""Money: exact parsing of USD into micro-USD integers, formatting, and ceiling division."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apibox.money import MAX_AMOUNT_MICRO, MICRO, MoneyError, ceil_div, format_usd, parse_usd, usd_number

amounts = st.integers(min_value=-MAX_AMOUNT_MICRO, max_value=MAX_AMOUNT_MICRO)
positive_amounts = st.integers(min_value=1, max_value=MAX_AMOUNT_MICRO)


# -- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "micro"), [
    ("10", 10_000_000),
    ("10.5", 10_500_000),
    ("10.50", 10_500_000),
    ("0.000001", 1),
    ("$1_000", 1_000_000_000),
    ("1_000_000.5", 1_000_000_500_000),
    ("$10.25", 10_250_000),
    ("  7 ", 7_000_000),
    ("1000000000", MAX_AMOUNT_MICRO),
    ("999999999.999999", MAX_AMOUNT_MICRO - 1),
    ("0.075", 75_000),
    ("123456789.123456", 123_456_789_123_456),
])
def test_parse_usd_is_exact(text: str, micro: int) -> None:
    assert parse_usd(text) == micro


@pytest.mark.parametrize(("value", "micro"), [
    (10, 10_000_000),
    (Decimal("0.3"), 300_000),
    (0.075, 75_000),  # a float from YAML: its shortest repr, not its binary expansion
    (0.1, 100_000),
    (2.675, 2_675_000),
])
def test_parse_usd_accepts_numbers_exactly(value: object, micro: int) -> None:
    assert parse_usd(value) == micro  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [
    "-5", "abc", "1e999", "0.0000001", "nan", "NaN", "sNaN", "inf", "-inf", "Infinity", "-0.0000001", "",
    "   ", "$", "1.2.3", "10 USD", "1000000000.000001", "1000000001", "0x10", "--5", "-$5",
    "1_0", "1_00", "10_000_0", "1__000", "_1000", "1000_", "1_000.000_5", "1e1_0",
    # More than 6 decimals must be refused however many digits the amount has: the 7th-and-later
    # digits must not vanish in Decimal's 28-digit arithmetic.
    "1.0000000000000000000000000001",
    "123456789.1234560000000000000000000001",
    # Decimal itself reads every script's digits; an amount is ASCII digits only.
    "\u0661\u0660", "\uff11\uff10", "\u0967\u0966", "10.\u0665", "$\u0661",
])
def test_parse_usd_rejects(text: str) -> None:
    with pytest.raises(MoneyError):
        parse_usd(text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e-7, 1e300, -1.5])
def test_parse_usd_rejects_bad_floats(value: float) -> None:
    with pytest.raises(MoneyError):
        parse_usd(value)


def test_negative_only_when_allowed() -> None:
    with pytest.raises(MoneyError, match="negative"):
        parse_usd("-5")
    assert parse_usd("-5", allow_negative=True) == -5_000_000
    assert parse_usd("-0.000001", allow_negative=True) == -1
    with pytest.raises(MoneyError, match="6 decimals"):
        parse_usd("-0.0000001", allow_negative=True)
    with pytest.raises(MoneyError, match="too large"):
        parse_usd("-1000000000.000001", allow_negative=True)
    assert parse_usd("-1000000000", allow_negative=True) == -MAX_AMOUNT_MICRO


def test_zero_only_when_allowed() -> None:
    for text in ("0", "0.000000", "-0", "$0"):
        with pytest.raises(MoneyError, match="zero"):
            parse_usd(text)
        assert parse_usd(text, allow_zero=True, allow_negative=True) == 0


def test_tiny_exponent_is_not_rounded_to_zero() -> None:
    """1e-9999999999 USD is not zero dollars; it has far more than 6 decimals."""
    with pytest.raises(MoneyError, match="6 decimals"):
        parse_usd("1e-9999999999", allow_zero=True)


def test_error_messages_name_the_input() -> None:
    with pytest.raises(MoneyError, match="'abc'"):
        parse_usd("abc")


@given(st.integers(min_value=1, max_value=MAX_AMOUNT_MICRO // 10), st.integers(min_value=1, max_value=9),
       st.integers(min_value=0, max_value=40))
def test_seventh_decimal_is_always_rejected(micro: int, digit: int, zeros: int) -> None:
    """An amount with a non-zero digit anywhere past the 6th decimal is refused."""
    text = format_usd(micro) + "0" * zeros + str(digit)
    with pytest.raises(MoneyError, match="6 decimals"):
        parse_usd(text)


@given(positive_amounts, st.integers(min_value=0, max_value=40))
def test_trailing_zeros_do_not_change_the_amount(micro: int, zeros: int) -> None:
    assert parse_usd(format_usd(micro) + "0" * zeros) == micro


@given(positive_amounts)
def test_plain_decimal_strings_parse_exactly(micro: int) -> None:
    # Decimal's own str() of the USD value (may be "1E-6" style): still exact.
    assert parse_usd(str(Decimal(micro) / MICRO)) == micro
    assert parse_usd(f"${micro // MICRO:_}.{micro % MICRO:06d}") == micro


# -- formatting ----------------------------------------------------------------------------

@pytest.mark.parametrize(("micro", "text"), [
    (0, "0.000000"), (1, "0.000001"), (9_999_850, "9.999850"), (-1, "-0.000001"),
    (-10_500_000, "-10.500000"), (MAX_AMOUNT_MICRO, "1000000000.000000"),
])
def test_format_usd(micro: int, text: str) -> None:
    assert format_usd(micro) == text


@given(amounts)
def test_format_parse_round_trip(micro: int) -> None:
    text = format_usd(micro)
    assert re.fullmatch(r"-?\d+\.\d{6}", text)
    assert Decimal(text) * MICRO == micro
    assert parse_usd(text, allow_negative=True, allow_zero=True) == micro


@given(amounts)
def test_usd_number_is_the_nearest_float(micro: int) -> None:
    assert usd_number(micro) == float(Fraction(micro, MICRO))


# -- ceiling division ----------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d", "q"), [
    (0, 1_000_000, 0), (1, 1_000_000, 1), (999_999, 1_000_000, 1), (1_000_000, 1_000_000, 1),
    (1_000_001, 1_000_000, 2), (7, 1, 7), (-1, 2, 0), (-3, 2, -1),
])
def test_ceil_div_examples(n: int, d: int, q: int) -> None:
    assert ceil_div(n, d) == q


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**15))
def test_ceil_div_is_the_exact_ceiling(n: int, d: int) -> None:
    q = ceil_div(n, d)
    assert q == math.ceil(Fraction(n, d))
    assert q * d >= n > (q - 1) * d
