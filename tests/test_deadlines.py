"""Deadlines: many timeouts on one timer, each one as ``asyncio.timeout`` would behave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apibox.deadlines import Deadlines, Timeout

# A timeout of 0.05 s that fired this soon fired on its own deadline, not at the end of the 5 s it
# cut short: the margin is for a loaded CI machine, which has stalled for half a second.
ON_TIME = 2.0


async def _wait(deadlines: Deadlines, delay: float, seconds: float) -> str:
    with deadlines.timeout(delay):
        await asyncio.sleep(seconds)
    return "done"


async def test_a_wait_past_its_delay_ends_in_timeout_error_when_due() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        await _wait(deadlines, 0.05, 5)
    assert 0.05 <= loop.time() - began < ON_TIME
    assert len(deadlines) == 0


async def test_a_wait_that_ends_in_time_leaves_nothing_behind() -> None:
    deadlines = Deadlines()
    assert await _wait(deadlines, 0.05, 0) == "done"
    assert len(deadlines) == 0
    await asyncio.sleep(0.1)  # past the delay: the task is not cancelled after the fact
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    task = asyncio.create_task(_wait(deadlines, 10, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_a_cancellation_from_elsewhere_as_the_timeout_fires_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    entered: list[Timeout] = []

    async def wait() -> None:
        with deadlines.timeout(10) as timeout:
            entered.append(timeout)
            await asyncio.sleep(10)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    entered[0].check(asyncio.get_running_loop().time())  # due: it cancels the task...
    task.cancel()  # ...and so does someone else, in the same pass
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_waits_due_together_all_time_out() -> None:
    deadlines = Deadlines()
    results = await asyncio.gather(*(_wait(deadlines, 0.05, 5) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(result, TimeoutError) for result in results)
    assert len(deadlines) == 0


async def test_an_earlier_deadline_added_after_a_later_one_is_on_time() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    long_wait = asyncio.create_task(_wait(deadlines, 10, 10))
    await asyncio.sleep(0.01)
    began = loop.time()
    with pytest.raises(TimeoutError):
        await _wait(deadlines, 0.05, 5)
    assert loop.time() - began < ON_TIME
    assert not long_wait.done()  # its own deadline is still ahead
    long_wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_wait


async def test_after_firing_the_timer_is_armed_for_the_next_due() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    began = loop.time()
    short = asyncio.create_task(_wait(deadlines, 0.05, 5))
    longer = asyncio.create_task(_wait(deadlines, 0.15, 5))
    with pytest.raises(TimeoutError):
        await short
    assert not longer.done()
    with pytest.raises(TimeoutError):
        await longer
    assert 0.15 <= loop.time() - began < 0.1 + ON_TIME


async def test_waits_of_one_length_share_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    armed: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) is deadlines:  # not asyncio.sleep's timers
            armed.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    for _ in range(50):  # one after another, as requests come
        assert await _wait(deadlines, 5, 0) == "done"
    assert await asyncio.gather(*(_wait(deadlines, 5, 0.001) for _ in range(50))) == ["done"] * 50
    assert len(armed) == 1  # the first wait armed it; every later one was due after it
    assert len(deadlines) == 0


async def test_a_check_that_raises_leaves_the_later_waits_their_timer() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # the raise below is reported there

    class Broken:
        def check(self, now: float) -> float | None:
            raise RuntimeError("a broken watch")

    deadlines.add(Broken(), loop.time() + 0.02)
    with pytest.raises(TimeoutError):
        await _wait(deadlines, 0.1, 5)
