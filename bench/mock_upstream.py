"""Fallback fake OpenAI upstream, used only when ../shared/bench/mock_upstream.py is absent.

Speaks the same wire format as the reference mock, so figures stay comparable:

* ``POST /v1/chat/completions``: one ``chat.completion`` JSON with ``usage``; with
  ``"stream": true`` an SSE stream of a role chunk, ``--chunks`` content chunks, a
  ``finish_reason`` chunk, then (when ``stream_options.include_usage``) a usage-only chunk
  with ``choices: []``, then ``data: [DONE]``. With ``--obfuscation`` every chunk but the usage
  chunk ends in OpenAI's ``"obfuscation"`` padding, a string of 1-16 random letters and digits
  that differs from chunk to chunk, as OpenAI's own streams do unless asked not to
  (``stream_options.include_obfuscation: false``); the reference mock has no such option.
* ``GET /v1/models``, ``GET /health``.

Prompt tokens are ``len(body) // 4`` (at least 1); completion tokens are the chunk count,
for both modes. Everything that does not depend on the request is rendered once per model
name, so the mock spends its time on I/O, not on JSON encoding.

    python bench/mock_upstream.py --port 18000 --chunks 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import string
import sys
import time

from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    uvloop = None

TEXT = ("Gateways", "forward", "tokens", "from", "the", "model", "to", "the", "client", "and", "count",
        "every", "one", "of", "them", "so", "that", "each", "key", "pays", "exactly", "for", "what", "it", "used")
ID_MARK = b"<<rid>>"
TIME_MARK = b"<<created>>"
PAD_MARK = b"<<pad>>"
PAD_ALPHABET = string.ascii_letters + string.digits


def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Renderer:
    """Byte templates for one model name; per request only ids, times and tokens change."""

    def __init__(self, model: str, pieces: list[str]) -> None:
        self.completion_tokens = len(pieces)
        base = {"id": "ID", "object": "chat.completion.chunk", "created": 0, "model": model,
                "system_fingerprint": "fp_benchmock"}

        def event(delta: dict, finish: str | None, usage_null: bool, padded: bool) -> bytes:
            chunk = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            if usage_null:
                chunk["usage"] = None
            if padded:
                chunk["obfuscation"] = PAD_MARK.decode()
            return self._marks(b"data: " + compact(chunk) + b"\n\n")

        self.events = {}  # by (usage null in every chunk, obfuscation padding in every chunk)
        for usage_null, padded in itertools.product((False, True), repeat=2):
            parts = [event({"role": "assistant", "content": ""}, None, usage_null, padded)]
            parts += [event({"content": p}, None, usage_null, padded) for p in pieces]
            parts.append(event({}, "stop", usage_null, padded))
            self.events[usage_null, padded] = parts
        usage = {"prompt_tokens": "P", "completion_tokens": self.completion_tokens, "total_tokens": "T",
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}
        self.usage_event = self._marks(b"data: " + compact(dict(base, choices=[], usage=usage)) + b"\n\n")
        whole = {"id": "ID", "object": "chat.completion", "created": 0, "model": model,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces).strip(),
                                                      "refusal": None},
                              "logprobs": None, "finish_reason": "stop"}],
                 "usage": usage, "system_fingerprint": "fp_benchmock"}
        self.whole = self._marks(compact(whole))

    @staticmethod
    def _marks(raw: bytes) -> bytes:
        return (raw.replace(b'"id":"ID"', b'"id":"' + ID_MARK + b'"', 1)
                   .replace(b'"created":0', b'"created":' + TIME_MARK, 1))

    def fill(self, raw: bytes, rid: bytes, created: bytes, prompt_tokens: int = 0, pad: bytes = b"") -> bytes:
        raw = raw.replace(ID_MARK, rid, 1).replace(TIME_MARK, created, 1)
        if pad:
            raw = raw.replace(PAD_MARK, pad, 1)
        if b'"P"' in raw:
            raw = (raw.replace(b'"prompt_tokens":"P"', b'"prompt_tokens":%d' % prompt_tokens, 1)
                      .replace(b'"total_tokens":"T"',
                               b'"total_tokens":%d' % (prompt_tokens + self.completion_tokens), 1))
        return raw


class Mock:
    def __init__(self, chunks: int, chunk_delay_ms: float, latency_ms: float, obfuscation: bool = False) -> None:
        self.obfuscation = obfuscation
        draw = random.Random(7)  # made once: the mock spends its time on I/O
        self.pads = itertools.cycle([
            "".join(draw.choices(PAD_ALPHABET, k=draw.randint(1, 16))).encode() for _ in range(97)])
        self.pieces = [TEXT[i % len(TEXT)] + " " for i in range(chunks)]
        self.chunk_delay = chunk_delay_ms / 1000
        self.latency = latency_ms / 1000
        self.ids = itertools.count(1)
        self.renderers: dict[str, Renderer] = {}

    def renderer(self, model: str) -> Renderer:
        found = self.renderers.get(model)
        if found is None:
            found = Renderer(model, self.pieces)
            if len(self.renderers) < 32:  # model names come from clients: bound the cache
                self.renderers[model] = found
        return found

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            model = str(body.get("model") or "gpt-4o-mini")
        except (ValueError, AttributeError):
            return web.json_response({"error": {"message": "body is not a JSON object",
                                                "type": "invalid_request_error"}}, status=400)
        r = self.renderer(model)
        rid = b"chatcmpl-bench%d" % next(self.ids)
        created = b"%d" % int(time.time())
        prompt_tokens = max(1, len(raw) // 4)
        if self.latency:
            await asyncio.sleep(self.latency)
        if not body.get("stream"):
            return web.Response(body=r.fill(r.whole, rid, created, prompt_tokens), content_type="application/json")
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage"))
        padded = self.obfuscation and options.get("include_obfuscation") is not False
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, part in enumerate(r.events[with_usage, padded]):
            if self.chunk_delay and i:
                await asyncio.sleep(self.chunk_delay)
            await resp.write(r.fill(part, rid, created, pad=next(self.pads) if padded else b""))
        if with_usage:
            await resp.write(r.fill(r.usage_event, rid, created, prompt_tokens))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "bench"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def main() -> None:
    ap = argparse.ArgumentParser(description="fake OpenAI upstream for the apibox benchmark")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--obfuscation", action="store_true", help="pad every chunk as OpenAI does by default")
    args = ap.parse_args()
    mock = Mock(args.chunks, args.chunk_delay_ms, args.latency_ms, args.obfuscation)
    app = web.Application(client_max_size=8 << 20)
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/chat/completions", mock.chat)
        app.router.add_get(prefix + "/models", mock.models)
    app.router.add_get("/health", mock.health)
    if uvloop is not None:
        uvloop.install()
    print(f"bench mock upstream on {args.host}:{args.port}, {args.chunks} chunks", file=sys.stderr)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
