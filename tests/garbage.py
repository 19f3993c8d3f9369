"""What the cyclic garbage collector finds, for tests that a piece of code makes no reference cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collected_garbage() -> Iterator[list[object]]:
    """The objects left in reference cycles by the code run inside the block: the collector is off
    meanwhile, and one pass at the end keeps what it finds unreachable (``gc.DEBUG_SAVEALL``)
    instead of freeing it. What existed before the block is collected first."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def apiboxs_own(objects: list[object]) -> list[str]:
    """The names of the classes, defined in apibox, of ``objects``."""
    return sorted({type(o).__qualname__ for o in objects if type(o).__module__.startswith("apibox.")})
