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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_indented_output_matches_the_standard_library(value: Any) -> None:
    assert dumps_pretty(value).decode() == stdlib(value)
