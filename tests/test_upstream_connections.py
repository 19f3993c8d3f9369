"""An upstream's connections over a real server: one from the pool that the upstream closes as a
request goes out on it costs the request nothing, an upstream that never answers is not asked
forever, and a configured HTTP proxy carries every request, its password never shown."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apibox.providers.base import UpstreamFailure
from apibox.providers.http import HttpUpstream
from apibox.settings import ProviderSettings

PROXY_PASSWORD = "proxypass-Z81"


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
        assert await http.read_json(await http.send(url, {"model": "m"}, {})) == {"id": "x"}
    # each connection answered one request and was closed under the next, which a new one answered
    assert sorted(upstream.requests.values()) == [1, 2, 2]


async def test_an_upstream_that_closes_every_connection_unanswered_is_a_503_after_a_second_try(
        aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    upstream = ClosingUpstream(answered=0)
    url = await serve(aiohttp_server, upstream)
    http = http_upstream(session)
    with pytest.raises(UpstreamFailure) as failure:
        await http.send(url, {"model": "m"}, {})
    assert (failure.value.status, failure.value.code) == (503, "upstream_unavailable")
    assert sorted(upstream.requests.values()) == [1, 1]
    assert len(http._deadlines) == 0


class FakeProxy:
    """An HTTP proxy that answers requests itself: what it was asked for, and with what credentials."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.asked: list[tuple[str, str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.asked.append((str(request.url), request.headers.get("Proxy-Authorization")))
        if self.status == 407:  # as a proxy may: the credentials it was given, echoed
            return web.json_response({"error": {"message": f"bad proxy login egress:{PROXY_PASSWORD}"}}, status=407)
        return web.json_response({"id": "through the proxy"})


async def proxied_upstream(aiohttp_server: Any, session: aiohttp.ClientSession, proxy: FakeProxy) -> HttpUpstream:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", proxy.handle)
    server = await aiohttp_server(app)
    address = f"http://egress:{PROXY_PASSWORD}@127.0.0.1:{server.port}"
    return HttpUpstream(ProviderSettings(name="up", type="openai", proxy=address), session, {})


async def test_a_configured_proxy_carries_the_request_with_its_credentials(
        aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    proxy = FakeProxy()
    http = await proxied_upstream(aiohttp_server, session, proxy)
    # a host no resolver knows: only the proxy can have answered
    url = "http://upstream.invalid:9/v1/chat/completions"
    assert await http.read_json(await http.send(url, {"model": "m"}, {})) == {"id": "through the proxy"}
    assert proxy.asked == [(url, "Basic " + base64.b64encode(f"egress:{PROXY_PASSWORD}".encode()).decode())]


async def test_a_proxy_refusing_apiboxs_credentials_is_a_503_without_them(
        aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    http = await proxied_upstream(aiohttp_server, session, FakeProxy(status=407))
    with pytest.raises(UpstreamFailure) as failure:
        await http.send("http://upstream.invalid:9/v1/chat/completions", {"model": "m"}, {})
    assert failure.value.status == 503
    assert "HTTP 407" in failure.value.message and PROXY_PASSWORD not in failure.value.message
