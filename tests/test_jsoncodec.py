"""The CLI's indented JSON (orjson) prints what the standard library's ``json.dumps`` printed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from apibox.jsoncodec import dumps_pretty


def stdlib(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n"


@dataclass
class Point:
    x: int


def test_what_orjson_cannot_write_goes_through_str_as_before() -> None:
    value = {"at": datetime(2026, 11, 27, 7, 5, tzinfo=UTC), "day": date(2026, 11, 27),
             "amount": Decimal("1.50"), "point": Point(1), 3: "int key", "empty": [], "none": {}}
    assert dumps_pretty(value).decode() == stdlib(value)


# the floats the CLI prints: rates to 4 decimals, averages to 1, multipliers (below 1e-4 orjson
# writes 0.00001 where json.dumps wrote 1e-05: the same number, other text)
cli_floats = st.floats(min_value=-1e15, max_value=1e15).map(lambda x: round(x, 4)).filter(
    lambda x: x == 0 or abs(x) >= 1e-4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | cli_floats | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_indented_output_matches_the_standard_library(value: Any) -> None:
    assert dumps_pretty(value).decode() == stdlib(value)
