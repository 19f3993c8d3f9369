"""Work over many items, done off the event loop when there are many.

The gateway's admin listings and reports run on the event loop that serves its API traffic. Their
Python work (rows into objects, groups into a report, objects into JSON) ran in one go: listing
100,000 users kept the loop for 1.3 s, a usage report by user and model over as many users for
1.6 s, and every stream on the loop waited that long for its next write. In a worker thread the
work still needs the GIL, but the interpreter hands it back to the loop every few milliseconds
(its switch interval), so the streams go on, a little slower, while the listing takes a little
longer. A few items stay on the loop: the thread hop costs more than they do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
OFF_LOOP_ITEMS = 1_000  # from this many items on, ``off_the_loop`` uses a thread (a few ms of work)


async def off_the_loop(work: Callable[[], T], items: int) -> T:
    """``work()``, which goes through ``items`` items: in a worker thread when they are many."""
    if items < OFF_LOOP_ITEMS:
        return work()
    return await asyncio.to_thread(work)
