"""Many timeouts on one timer: each upstream's first byte and silences, each Redis call.

A timer of its own for every wait (``asyncio.timeout``, ``loop.call_at``) cost about 3% of a
non-streamed request's CPU: uvloop makes and frees a libuv timer each time. Here a wait is an
entry in a dict, and one timer is armed for the earliest moment any entry must be looked at.
A wait added with a later due time (the usual case: a provider's waits all last as long)
leaves the timer as it is, and a wait that ends only leaves the dict. When the timer fires it
checks every entry that is due, then is armed again for the earliest of the rest. A timeout
fires when it is due, as a timer of its own would, not on a coarse tick.

One ``Deadlines`` serves one event loop (its owner's, such as an upstream's HTTP session's): the
loop it is first used in, kept, since asking asyncio for the running loop costs a ``getpid``
system call each time.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Protocol

# uvloop's timers count whole milliseconds: one may fire a little before the time it was set for
CLOCK_SLACK_SECONDS = 0.001


class Watch(Protocol):
    def check(self, now: float) -> float | None:
        """Called once due: act and return None (done), or return when to be looked at again."""
        ...


class Deadlines:
    """The waits of one event loop that may time out, and the one timer that looks at them."""

    __slots__ = ("_armed_for", "_due", "_handle", "_loop")

    def __init__(self) -> None:
        self._due: dict[Watch, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop these waits belong to."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def add(self, watch: Watch, due: float) -> None:
        """Look at ``watch`` at the loop's time ``due`` (unless discarded before)."""
        self._due[watch] = due
        if due < self._armed_for:
            self._arm(due)

    def discard(self, watch: Watch) -> None:
        self._due.pop(watch, None)

    def timeout(self, delay: float) -> Timeout:
        """``asyncio.timeout(delay)``, for a ``with`` block, on this shared timer."""
        return Timeout(self, delay)

    def __len__(self) -> int:
        return len(self._due)

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = due
        self._handle = self.loop().call_at(due, self._fire)

    def _fire(self) -> None:
        self._handle, self._armed_for = None, math.inf
        now = self.loop().time() + CLOCK_SLACK_SECONDS
        try:
            for watch, due in list(self._due.items()):
                if due <= now:
                    del self._due[watch]  # first: a check that raises is not looked at again
                    later = watch.check(now)
                    if later is not None:
                        self._due[watch] = later
        finally:  # even after a check raised (the loop reports it), the other waits keep their timer
            if self._due:
                self._arm(min(self._due.values()))


class Timeout:
    """Cancels the task in the ``with`` block once ``delay`` has passed and turns that
    cancellation into ``TimeoutError``, as ``asyncio.timeout`` does: a cancellation from
    elsewhere meanwhile (the client gone, a shutdown) stays a cancellation."""

    __slots__ = ("_cancelling", "_deadlines", "_delay", "_expired", "_task")

    def __init__(self, deadlines: Deadlines, delay: float) -> None:
        self._deadlines = deadlines
        self._delay = delay
        self._expired = False

    def __enter__(self) -> Timeout:
        loop = self._deadlines.loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a Timeout must be used inside a task")
        self._task, self._cancelling = task, task.cancelling()
        self._deadlines.add(self, loop.time() + self._delay)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._deadlines.discard(self)
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def check(self, now: float) -> None:
        self._expired = True
        self._task.cancel()
