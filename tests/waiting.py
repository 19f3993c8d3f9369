"""Waiting for something another task or thread does, without betting on how long it takes.

A test that sleeps a fixed time and then looks fails on a loaded CI machine, which has stalled
for half a second; polling until a generous timeout costs nothing when the thing is quick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(check: Callable[[], object], timeout: float = 5.0, step: float = 0.01) -> float:
    """Wait until ``check()`` holds; returns how long it took (fails after ``timeout`` seconds)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - started
