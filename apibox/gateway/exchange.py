"""What is known about one request as it is served (``Exchange``), and its access-log line.

The ``observer`` middleware (``gateway.metrics``) gives every request one Exchange, under
``EXCHANGE``; handlers and error rendering tell it what they learn (who called, which model, the
billed call, the error answered, the rate-limit headers), and it counts and logs the request when
its answer is done. One object with attributes rather than several request keys: a request's
``get`` of a key it does not have raises and catches a KeyError (4.5k instructions).
The log holds metadata only: never a key, a prompt, a body or a query string.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import getrandbits
from typing import TYPE_CHECKING, Any

from aiohttp import web

from apibox import jsoncodec
from apibox.auth import Caller
from apibox.keys import KEY_PREFIX
from apibox.metrics import Metrics
from apibox.models import UsageRecord

if TYPE_CHECKING:
    from apibox.gateway.proxy import Call

access_log = logging.getLogger("apibox.access")
MAX_LOGGED_PATH = 200
_KEY_IN_PATH = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]*")


def new_request_id() -> str:
    # 128 random bits, like uuid4().hex, from the process's Mersenne Twister (seeded from os.urandom
    # at start): uuid4 asks the kernel each time, and a system call is dear on the request path.
    return f"req_{getrandbits(128):032x}"


@dataclass(slots=True)
class Exchange:
    """What is known about one request as it is served, for its metrics and its access-log line."""

    metrics: Metrics
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)
    model: str | None = None  # the configured model it resolved to
    user_id: int | None = None
    key_id: int | None = None
    call: Call | None = None  # the billed call, once its hold is taken
    error_code: str | None = None  # the code of the error answered, for metrics and the access log
    rate_limit_headers: dict[str, str] | None = None  # OpenAI's x-ratelimit-* headers, for a limited key

    def identified(self, caller: Caller) -> None:
        self.user_id, self.key_id = caller.user.id, caller.key.id

    def holding(self, call: Call) -> None:
        """A hold was taken: the request holds money until its settlement is written."""
        self.call = call
        self.metrics.holding(call.reservation.hold.amount)

    def finish(self, request: web.Request, status: int, counted: bool, log: bool) -> None:
        """Count and log the request once its answer is done and its settlement written."""
        seconds = time.monotonic() - self.started
        method, path = request.method, request.path  # read now: the request may be gone when settled
        settlement = self.call.settlement if self.call is not None else None
        if settlement is not None and not settlement.done():  # a client gone mid-stream: settled later
            settlement.add_done_callback(lambda _: self._finished(method, path, status, seconds, counted, log))
        else:
            self._finished(method, path, status, seconds, counted, log)

    def _finished(self, method: str, path: str, status: int, seconds: float, counted: bool, log: bool) -> None:
        record = self._record()
        provider = ""
        if self.call is not None:
            self.metrics.released(self.call.reservation.hold.amount)
            provider = self.call.route.provider if self.call.route is not None else ""
        if record is not None:
            status = record.http_status  # what the usage row says: 499 client gone, 502 stream broken
            self.metrics.settled(record)
        if counted:
            self.metrics.answered(self.model or "", provider, status, seconds, self.error_code)
        if log and access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", jsoncodec.dumps(self._line(method, path, status, seconds, provider,
                                                             record)).decode())

    def _record(self) -> UsageRecord | None:
        settlement = self.call.settlement if self.call is not None else None
        if settlement is None or settlement.cancelled() or settlement.exception() is not None:
            return None
        return settlement.result()

    def _line(self, method: str, path: str, status: int, seconds: float, provider: str,
              record: UsageRecord | None) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(self.arrived, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "request_id": self.request_id,
            "method": method,
            "path": logged_path(path),
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "model": self.model,
            "provider": provider or None,
            "user_id": self.user_id,
            "key_id": self.key_id,
            "error": self.error_code,
            "outcome": record.status if record else None,
            "prompt_tokens": record.prompt_tokens if record else None,
            "completion_tokens": record.completion_tokens if record else None,
            "cached_tokens": record.cached_tokens if record else None,
            "cost_micro_usd": record.cost if record else None,
            "charged_micro_usd": record.charged if record else None,
        }


EXCHANGE = web.RequestKey("exchange", Exchange)


def logged_path(path: str) -> str:
    """The path as logged: without anything shaped like an apibox key, and not too long."""
    return _KEY_IN_PATH.sub(KEY_PREFIX + "[redacted]", path[:MAX_LOGGED_PATH])
