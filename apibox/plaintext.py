"""Text that reaches an operator's terminal: one line, with no control characters in it.

Names, notes and references are stored as given and later printed in the CLI's tables. A control
character there would reach the terminal as it is: an escape sequence can move the cursor, rewrite
the screen or set the window's title, a line break splits a table's row. So the accounts refuse
such text, and the CLI writes out any that a database holds from elsewhere (``\\x1b``, ``\\n``).
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and Unicode's line and paragraph separators.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def first_control(text: str) -> str | None:
    """The first control character in ``text``, or None when it has none."""
    found = CONTROL.search(text)
    return found.group() if found else None


def escaped(text: str) -> str:
    """``text`` with each control character written out as Python writes it in a string (``\\t``, ``\\x1b``)."""
    return CONTROL.sub(lambda found: repr(found.group())[1:-1], text)
