"""Stopping a Redis background task (the link's watch, the bus's subscriber): closing never waits
for ever, even when a cancellation is lost inside a client library."""

from __future__ import annotations

import asyncio
import logging

import pytest

from apibox import redis_link
from apibox.redis_link import stop_task


async def test_a_task_that_lost_its_first_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a library whose own timeout fired in the same pass may do

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    async with asyncio.timeout(2):
        await stop_task(task)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_stops_is_left_behind_with_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(redis_link, "STOP_GRACE_SECONDS", 0.3)
    released = asyncio.Event()

    async def deaf() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf(), name="deaf")
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.WARNING, logger="apibox.redis"):
        await stop_task(task)
    assert 0.3 <= loop.time() - began < 1.5
    assert "the background task deaf did not stop when cancelled" in caplog.text
    released.set()
    task.cancel()
    await asyncio.wait((task,))


async def test_a_task_that_had_failed_raises_its_own_error() -> None:
    async def failing() -> None:
        raise RuntimeError("its own failure")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="its own failure"):
        await stop_task(task)
