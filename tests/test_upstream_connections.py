"""An upstream's pooled connections over a real server: one the upstream closes as a request goes
out on it costs the request nothing, and an upstream that never answers is not asked forever."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apibox.providers.base import UpstreamFailure
from apibox.providers.http import HttpUpstream
from apibox.settings import ProviderSettings


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60)) as session:
        yield session


class ClosingUpstream:
    """Answers the first ``answered`` requests of each connection, then closes the connection
    when the next one arrives, without an answer: as a server whose keep-alive ran out just as
    the request was sent."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.requests: Counter[Any] = Counter()  # by the connection (its peer address)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        self.requests[peer] += 1
        if self.requests[peer] > self.answered:
            request.transport.close()
        return web.json_response({"id": "x"})


async def serve(aiohttp_server: Any, upstream: ClosingUpstream) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1/chat/completions"))


def http_upstream(session: aiohttp.ClientSession) -> HttpUpstream:
    return HttpUpstream(ProviderSettings(name="up", type="openai"), session, {})


async def test_a_request_on_a_connection_the_upstream_closed_is_sent_again_on_another(
        aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    upstream = ClosingUpstream(answered=1)
    url = await serve(aiohttp_server, upstream)
    http = http_upstream(session)
    for _ in range(3):
        assert await http.read_json(await http.post(url, {"model": "m"}, {})) == {"id": "x"}
    # each connection answered one request and was closed under the next, which a new one answered
    assert sorted(upstream.requests.values()) == [1, 2, 2]


async def test_an_upstream_that_closes_every_connection_unanswered_is_a_503_after_a_second_try(
        aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    upstream = ClosingUpstream(answered=0)
    url = await serve(aiohttp_server, upstream)
    http = http_upstream(session)
    with pytest.raises(UpstreamFailure) as failure:
        await http.post(url, {"model": "m"}, {})
    assert (failure.value.status, failure.value.code) == (503, "upstream_unavailable")
    assert sorted(upstream.requests.values()) == [1, 1]
    assert len(http._deadlines) == 0
