"""Keep-alive comments on a stream while its upstream is silent.

A reasoning model may think for minutes before its first event, or between two. Whatever
stands between apibox and its client (nginx's 60 s read timeout, Cloudflare's 100 s, a
corporate proxy's) closes a connection that silent, and the answer is lost though the upstream
bills for it. So a stream that has sent its client nothing for ``server.stream_keepalive_seconds``
gets an SSE comment, ``: keep-alive``, which every SSE parser skips (the OpenAI and Anthropic
SDKs' among them), as DeepSeek and OpenRouter send it.

A stream's head (its 200 status) waits for the upstream's first events: a stream that fails
before then is an HTTP error status, which clients and their retries understand best. A
keep-alive due before that sends the head with it; from then on, a failure before any output
is an error event in the stream (another route may still answer it first).

The comment is written by a task of its own, started from the gateway's shared timer, while the
request's own task waits on the upstream. That task waits for a comment under way
(``Heartbeat.beat``) before it writes what the upstream sent, and stops the heartbeat before
its last write, which drops a comment not yet written: the two never write at once.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from apibox.deadlines import Deadlines
from apibox.metrics import PlainCounter

KEEP_ALIVE = b": keep-alive\n\n"
SENT, CLIENT_GONE = ("sent",), ("client_gone",)  # the outcomes apibox_stream_keepalives counts


class Heartbeat:
    """The keep-alive of one streamed answer: looked at every half ``seconds`` by the gateway's
    ``Deadlines``, it writes a comment when the stream has written nothing since the look before.
    So the client never waits longer than ``seconds`` for a byte, and a stream that flows costs a
    counter (``sent``) and a look every few seconds."""

    __slots__ = ("_counted", "_deadlines", "_period", "_request", "_response", "_seen", "_task", "beat",
                 "client_gone", "sent")

    def __init__(self, deadlines: Deadlines, seconds: float, request: web.Request,
                 response: web.StreamResponse, counted: PlainCounter) -> None:
        self.sent = 0  # the writes on the stream so far: its own task counts its own
        self._seen = 0
        self.beat: asyncio.Task[None] | None = None  # a comment being written
        self.client_gone = False  # True once a comment found the client gone (and cancelled the stream's task)
        self._deadlines, self._request, self._response = deadlines, request, response
        self._counted = counted  # apibox_stream_keepalives
        self._period = seconds / 2
        self._task = asyncio.current_task(deadlines.loop())
        if seconds > 0:
            deadlines.add(self, deadlines.loop().time() + seconds)

    def check(self, now: float) -> float:
        if self.sent == self._seen and self.beat is None:
            self.beat = self._deadlines.loop().create_task(self._write())
        self._seen = self.sent
        return now + self._period

    async def _write(self) -> None:
        try:
            transport = self._request.transport
            if transport is not None and transport.get_write_buffer_size():
                return  # the client has yet to take what was sent: the connection is not idle
            if not self._response.prepared:
                await self._response.prepare(self._request)
            await self._response.write(KEEP_ALIVE)
            self.sent += 1
            self._counted.inc(SENT)
        except ConnectionResetError:
            self._counted.inc(CLIENT_GONE)
            self.client_gone = True
            if self._task is not None:  # the client has gone: stop the upstream's answer now, not at its next event
                self._task.cancel()
        finally:
            self.beat = None

    def stop(self) -> None:
        """No more comments (one due but not yet written is dropped): the stream's own task writes its
        end, or its failure, next."""
        self._deadlines.discard(self)
        if self.beat is not None:
            self.beat.cancel()
