"""A fake Gemini API (``generateContent`` and ``streamGenerateContent?alt=sse``), real wire format.

Modes: ``ok`` (text, or a function call with a thought signature when ``call_name`` is set
and the request declares tools), ``status`` (a Google RPC error), ``echo_key`` (an error whose
message holds the API key), ``no_finish`` (a stream whose body ends without any
``finishReason``, as when Google drops the connection mid-answer), ``stream_error`` (a
stream that sends half the answer, then an in-band error event naming the key, then ends) and
``raw_error`` (the same, but the error is raw multi-line JSON without ``data:``, as Google
sometimes sends it).

A request's ``candidateCount`` gets as many candidates, each the same answer: whole, in one
response; streamed, a chunk per word and candidate, interleaved, the usage on the last.
``finish_reason`` overrides the reason the last candidate reports, ``call_id`` gives the
function call an id (Gemini usually sends none) and ``thought`` adds a thought-summary part
(``thought: true``) before the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_upstream import Recorded

GEMINI_KEY = "AIza-upstream-SECRET-0123456789gemini"
WORDS = ["Hola", " desde", " Gemini", "!"]
SIGNATURE = "c2lnbmF0dXJlLWZha2U="


@dataclass
class FakeGemini:
    mode: str = "ok"
    status: int = 500
    words: list[str] = field(default_factory=lambda: list(WORDS))
    prompt_tokens: int = 40
    cached_tokens: int = 0
    thoughts_tokens: int = 0
    call_name: str | None = None
    call_args: dict[str, Any] = field(default_factory=lambda: {"city": "Madrid"})
    call_id: str | None = None
    finish_reason: str | None = None
    thought: str | None = None
    rpc_status: str = "INTERNAL"
    error_message: str = "Internal error"
    requests: list[Recorded] = field(default_factory=list)
    reported_usage: Any = None  # when set, the usageMetadata sent as it is (a stream's last)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self.generate)

    def usage(self, output: int) -> dict[str, Any]:
        if self.reported_usage is not None:
            return self.reported_usage  # type: ignore[no-any-return]
        return {"promptTokenCount": self.prompt_tokens, "candidatesTokenCount": output,
                "thoughtsTokenCount": self.thoughts_tokens, "cachedContentTokenCount": self.cached_tokens,
                "totalTokenCount": self.prompt_tokens + output + self.thoughts_tokens}

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Recorded.of(request, body, request.path_qs))
        model, _, method = request.match_info["target"].partition(":")
        if request.headers.get("x-goog-api-key") != GEMINI_KEY:
            return web.json_response({"error": {"code": 403, "message": "API key not valid",
                                                "status": "PERMISSION_DENIED"}}, status=403)
        if self.mode in ("status", "echo_key"):
            message = f"API key {GEMINI_KEY} is bad" if self.mode == "echo_key" else self.error_message
            return web.json_response({"error": {"code": self.status, "message": message,
                                                "status": self.rpc_status}}, status=self.status)
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens") or len(self.words)
        words = self.words[:limit]
        use_call = bool(self.call_name and body.get("tools"))
        finish = "STOP" if len(words) == len(self.words) or use_call else "MAX_TOKENS"
        finish = self.finish_reason or finish
        call_part = {"functionCall": {"name": self.call_name, "args": self.call_args, **(
            {"id": self.call_id} if self.call_id else {})}, "thoughtSignature": SIGNATURE}
        thought = [{"text": self.thought, "thought": True}] if self.thought else []
        answers = (body.get("generationConfig") or {}).get("candidateCount") or 1
        if method == "generateContent":
            parts: list[dict[str, Any]] = [*thought, {"text": "".join(words)}]
            if use_call:
                parts.append(call_part)
            candidates = [{"content": {"role": "model", "parts": parts}, "finishReason": finish, **_index(i)}
                          for i in range(answers)]
            return web.json_response({"candidates": candidates, "usageMetadata": self.usage(answers * len(words)),
                                      "modelVersion": model})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for (i, word), answer in itertools.product(enumerate(words), range(answers)):
            if self.mode == "stream_error" and i == len(words) // 2:
                error = {"error": {"code": 500, "message": f"Internal error for key {GEMINI_KEY}",
                                   "status": "INTERNAL"}}
                await response.write(b"data: " + json.dumps(error).encode() + b"\r\n\r\n")
                break
            if self.mode == "raw_error" and i == len(words) // 2:
                error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
                await response.write(json.dumps(error, indent=2).encode() + b"\n")
                break
            parts = [*thought, {"text": word}] if i == 0 else [{"text": word}]
            chunk: dict[str, Any] = {"candidates": [{"content": {"role": "model", "parts": parts}, **_index(answer)}],
                                     "usageMetadata": {"promptTokenCount": self.prompt_tokens}}
            last = i == len(words) - 1
            if last and use_call:
                chunk["candidates"][0]["content"]["parts"].append(call_part)
            if last and self.mode != "no_finish":
                chunk["candidates"][0]["finishReason"] = finish
                if answer == answers - 1:
                    chunk["usageMetadata"] = self.usage(answers * len(words))
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
            await asyncio.sleep(0)
        await response.write_eof()
        return response


def _index(candidate: int) -> dict[str, int]:
    """A candidate's ``index`` as Gemini writes it: left out when it is 0 (proto3 JSON omits defaults)."""
    return {"index": candidate} if candidate else {}
