"""An upstream's timeouts over a real connection: the first byte, a reply's body, a caller that
leaves meanwhile; each ends on time, with the failure a client should see, and leaves no wait
behind on the upstream's shared timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apibox.providers.base import UpstreamFailure
from apibox.providers.http import HttpUpstream
from apibox.settings import ProviderSettings, Timeouts

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def serve(aiohttp_server: Any, handler: Handler) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1/chat/completions"))


async def slow(request: web.Request) -> web.Response:
    """An upstream that answers after two seconds."""
    await asyncio.sleep(2)
    return web.json_response({})


def upstream(session: aiohttp.ClientSession, first_byte: float = 120.0, idle: float = 120.0) -> HttpUpstream:
    settings = ProviderSettings(name="up", type="openai", timeouts=Timeouts(first_byte=first_byte, idle=idle))
    return HttpUpstream(settings, session, {})


async def test_an_upstream_slower_than_first_byte_is_a_504_on_time(aiohttp_server: Any,
                                                                   session: aiohttp.ClientSession) -> None:
    url = await serve(aiohttp_server, slow)
    http = upstream(session, first_byte=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamFailure) as failure:
        await http.send(url, {"model": "m"}, {})
    assert 0.2 <= loop.time() - began < 1.0
    assert (failure.value.status, failure.value.code) == (504, "upstream_timeout")
    assert "did not answer within 0.2s" in failure.value.message
    assert len(http._deadlines) == 0


async def test_an_upstream_in_time_answers_and_is_not_cancelled_later(aiohttp_server: Any,
                                                                      session: aiohttp.ClientSession) -> None:
    async def quick(request: web.Request) -> web.Response:
        return web.json_response({"id": "x"})
    url = await serve(aiohttp_server, quick)
    http = upstream(session, first_byte=0.2)
    assert await http.read_json(await http.send(url, {"model": "m"}, {})) == {"id": "x"}
    await asyncio.sleep(0.3)  # past first_byte: nothing fires at this task after the fact
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert len(http._deadlines) == 0


async def test_a_reply_whose_body_stalls_past_idle_is_a_502(aiohttp_server: Any,
                                                           session: aiohttp.ClientSession) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"id": ')
        await asyncio.sleep(2)
        return response
    url = await serve(aiohttp_server, stalls)
    http = upstream(session, idle=0.2)
    response = await http.send(url, {"model": "m"}, {})
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamFailure, match="broke off its reply") as failure:
        await http.read_json(response)
    assert 0.2 <= loop.time() - began < 1.0
    assert failure.value.status == 502
    assert len(http._deadlines) == 0


async def test_a_caller_cancelled_while_waiting_is_cancelled_not_timed_out(aiohttp_server: Any,
                                                                          session: aiohttp.ClientSession) -> None:
    url = await serve(aiohttp_server, slow)
    http = upstream(session, first_byte=0.3)
    waiting = asyncio.create_task(http.send(url, {"model": "m"}, {}))
    await asyncio.sleep(0.1)
    waiting.cancel()  # the client left before the upstream answered
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(http._deadlines) == 0
