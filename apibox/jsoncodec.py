"""JSON on the request path: orjson, several times faster than the standard library on the
small objects a stream is made of (a chunk is parsed and written again for every token).

``loads`` raises ``ValueError`` on bad input, like ``json.loads``; ``dumps`` returns UTF-8 bytes.
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)
