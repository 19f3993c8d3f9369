"""The Anthropic surface: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Anthropic clients (the anthropic SDK, Claude Code) reach any routed model here. Requests
to routes whose upstream speaks Anthropic pass through as they are; the rest are translated
both ways. Billing is the same flow as the OpenAI door's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from apibox import jsoncodec, tokens
from apibox.errors import InvalidRequest
from apibox.formats.anthropic import anthropic_to_openai_request
from apibox.gateway.admission import authorized_model
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.doors import AnthropicDoor
from apibox.gateway.exchange import EXCHANGE
from apibox.gateway.openai import authenticate, read_json
from apibox.gateway.proxy import forward


def _check(body: dict[str, Any], *, needs_max_tokens: bool) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("model: Field required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty list)", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{index}.role: must be 'user' or 'assistant'", param=f"messages.{index}")
        content = message.get("content")
        if not isinstance(content, str | list) or (isinstance(content, list) and
                                                  not all(isinstance(b, dict) for b in content)):
            raise InvalidRequest(f"messages.{index}.content: must be a string or a list of content blocks",
                                 param=f"messages.{index}.content")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidRequest("system: must be a string or a list of text blocks", param="system")
    if needs_max_tokens:
        limit = body.get("max_tokens")
        if limit is None:
            raise InvalidRequest("max_tokens: Field required (a positive whole number)", param="max_tokens")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(f"max_tokens: must be a positive whole number, not {limit!r}", param="max_tokens")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream: must be true or false", param="stream")
    for name, kind, what in (("tools", list, "a list of tools"), ("stop_sequences", list, "a list of strings"),
                             ("tool_choice", dict, "an object"), ("metadata", dict, "an object")):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise InvalidRequest(f"{name}: must be {what}", param=name)


def _translated(body: dict[str, Any]) -> dict[str, Any]:
    """The request in OpenAI's shape; content the translation cannot read is the client's 400, not a 500."""
    try:
        return anthropic_to_openai_request(body)
    except (TypeError, AttributeError, ValueError):
        raise InvalidRequest("messages: a content block or the system prompt has the wrong shape (text must be "
                             "a string, image sources objects)", param="messages") from None


# The blocks the OpenAI-shaped copy of a request carries (the billing flow measures that copy).
CARRIED_BLOCKS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})


def _uncarried_bytes(body: dict[str, Any]) -> int:
    """The size of the blocks the OpenAI-shaped copy leaves out (documents, search results): an
    Anthropic route still reads them, so the hold counts them, a byte a token at most."""
    return sum(len(jsoncodec.dumps(block)) for message in body["messages"] if isinstance(message["content"], list)
               for block in message["content"] if block.get("type") not in CARRIED_BLOCKS)


# Anthropic's server tools billed by the use (searches, a container's time) on top of the tokens,
# and betas that raise the token price: apibox charges the model's price for tokens, so the
# operator would pay the difference. Refused, as the Responses door refuses OpenAI's paid tools.
PAID_SERVER_TOOLS = ("web_search_", "code_execution_")
PREMIUM_BETAS = ("context-1m",)


def _refuse_unbilled(body: dict[str, Any], headers: Any) -> None:
    for index, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(PAID_SERVER_TOOLS):
            raise InvalidRequest(f"tools.{index}: the server tool {kind!r} is billed by the use, which apibox does "
                                 "not charge for; it is not available here", param=f"tools.{index}")
    for beta in headers.get("anthropic-beta", "").split(","):
        if beta.strip().startswith(PREMIUM_BETAS):
            raise InvalidRequest(f"anthropic-beta: {beta.strip()!r} bills tokens above the model's price, which "
                                 "apibox does not charge; it is not available here", param="anthropic-beta")


async def messages(request: web.Request) -> web.StreamResponse:
    caller = await authenticate(request)
    body = await read_json(request)
    _check(body, needs_max_tokens=True)
    _refuse_unbilled(body, request.headers)
    internal = _translated(body)
    if body.get("stream"):
        internal["stream_options"] = {"include_usage": True}
    return await forward(request, caller, "chat/completions", internal, AnthropicDoor(body, request.headers),
                         unseen_tokens=_uncarried_bytes(body))


async def count_tokens(request: web.Request) -> web.Response:
    """Free and unbilled: the upstream's count on Anthropic routes, apibox's estimate elsewhere."""
    caller = await authenticate(request)
    body = await read_json(request)
    _check(body, needs_max_tokens=False)
    gateway = request.app[GATEWAY]
    model = authorized_model(gateway, caller, body["model"])
    route = gateway.router.plan(model)[0]
    provider = gateway.providers[route.provider]
    if provider.native_format == "anthropic":
        count = await provider.count_tokens(  # type: ignore[attr-defined]
            {**body, "model": route.model}, request[EXCHANGE].request_id, request.headers)
    else:
        count = tokens.prompt_estimate(_translated(body))
    return web.json_response({"input_tokens": count})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
