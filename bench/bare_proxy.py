"""Fallback bare forwarder, used only when ../shared/bench/bare_proxy.py is absent.

The least any aiohttp gateway must do, and nothing more: read the request body, send it
upstream over one shared, pooled ``ClientSession``, and pass the answer back (a sized body
in one piece, anything else chunk by chunk as it arrives). No auth, no parsing, no
accounting: the floor that apibox's ratios are measured against.

    python bench/bare_proxy.py --port 18001 --upstream http://127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import sys

import aiohttp
from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    uvloop = None

# hop-by-hop headers and the ones aiohttp sets itself
SKIP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"})

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def passable(headers) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {k: v for k, v in headers.items() if k.lower() not in SKIP}


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    async with request.app[SESSION].request(request.method, url, data=body,
                                            headers=passable(request.headers)) as up:
        headers = passable(up.headers)
        if up.content_length is not None and not up.content_type.endswith("event-stream"):
            return web.Response(status=up.status, body=await up.read(), headers=headers)
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        async for piece in up.content.iter_any():
            await resp.write(piece)
        await resp.write_eof()
        return resp


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                         auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    yield
    await app[SESSION].close()


def main() -> None:
    ap = argparse.ArgumentParser(description="bare aiohttp forwarder (the benchmark's floor)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18001)
    ap.add_argument("--upstream", default="http://127.0.0.1:18000")
    args = ap.parse_args()
    app = web.Application(client_max_size=8 << 20)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{path:.*}", forward)
    if uvloop is not None:
        uvloop.install()
    print(f"bench bare forwarder on {args.host}:{args.port} -> {args.upstream}", file=sys.stderr)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
