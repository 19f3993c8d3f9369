"""JSON on the request path: orjson, several times faster than the standard library on the
small objects a stream is made of (a chunk is parsed and written again for every token); and
the CLI's indented ``--json`` output.

``loads`` raises ``ValueError`` on bad input, like ``json.loads``; ``dumps`` returns UTF-8 bytes.
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# What the CLI's --json printed with the standard library, at orjson's speed: dates and dataclasses
# still through str(), int keys as strings. Non-ASCII text is now UTF-8 rather than \u escapes,
# and a float below 1e-4 is written 0.00001 rather than 1e-05 (the CLI rounds to 4 decimals).
_PRETTY = (orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
           | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS)


def dumps_pretty(value: Any) -> bytes:
    """Indented JSON for people and scripts; whatever orjson cannot write goes through ``str``."""
    return orjson.dumps(value, default=str, option=_PRETTY)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def objects(value: Any) -> list[dict[str, Any]]:
    """The JSON objects in ``value`` when it is a list (an upstream's blocks, choices or parts),
    skipping anything else in it; none when it is not a list, whatever an upstream sent."""
    if type(value) is not list:
        return []
    return [item for item in value if type(item) is dict]


def obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if type(value) is dict else {}
