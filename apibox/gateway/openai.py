"""The OpenAI-compatible surface: chat, legacy completions, embeddings, models."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from apibox import jsoncodec
from apibox.accounts import whole_number
from apibox.auth import Caller, client_address
from apibox.config import ModelSettings
from apibox.errors import InvalidRequest, ModelNotFound
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.exchange import EXCHANGE
from apibox.gateway.proxy import forward
from apibox.views import model_pricing_json

MODEL_CREATED = 1_700_000_000  # a fixed `created` for configured models
MODEL_CREATED_AT = "2023-11-14T22:13:20Z"  # the same moment, as Anthropic's models give it
BODY_READ_SECONDS = 30


def bearer_secret(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def request_address(request: web.Request) -> str:
    """The caller's address, believing X-Forwarded-For only from the configured proxies. Every
    line of the header counts, in order, as one list (RFC 9110): a proxy that adds a line of its
    own (HAProxy's ``option forwardfor``) leaves the client's forged line first, not last."""
    proxies = request.app[GATEWAY].settings.server.trusted_proxies
    if not proxies:
        return request.remote or ""
    return client_address(request.remote, ", ".join(request.headers.getall("X-Forwarded-For", ())), proxies)


async def authenticate(request: web.Request) -> Caller:
    caller = await request.app[GATEWAY].auth.authenticate(bearer_secret(request), request_address(request))
    request[EXCHANGE].identified(caller)  # the user and key ids, for the access log
    return caller


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        if request.content.is_eof():  # the whole body came with the head (the usual case): nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(BODY_READ_SECONDS):  # a client trickling its body does not hold a slot forever
                raw = await request.read()
    except TimeoutError:
        raise InvalidRequest(f"The request body did not arrive within {BODY_READ_SECONDS}s.") from None
    except RequestPayloadError:
        raise InvalidRequest(f"The request body could not be decoded as its Content-Encoding "
                             f"({request.headers.get('Content-Encoding', '')!r}) says.") from None
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = jsoncodec.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request ({exc}). "
                             "Send valid JSON with Content-Type: application/json.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def require(body: dict[str, Any], field: str, kinds: tuple[type, ...], what: str) -> None:
    if field not in body:
        raise InvalidRequest(f"Missing required parameter: '{field}'.", param=field)
    value = body[field]
    if not isinstance(value, kinds) or isinstance(value, bool) or (hasattr(value, "__len__") and not len(value)):
        raise InvalidRequest(f"'{field}' must be {what}.", param=field)


def check_shared_fields(body: dict[str, Any]) -> None:
    """The fields chat, completions and the Responses API share: ``stream``, ``stream_options``, and
    ``service_tier``, whose ``priority`` OpenAI bills above the model's price (apibox does not)."""
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if body.get("service_tier") == "priority":
        raise InvalidRequest("service_tier 'priority' is billed above the model's price, which apibox does not "
                             "charge; leave it out.", param="service_tier")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    caller = await authenticate(request)
    body = await read_json(request)
    require(body, "messages", (list,), "a non-empty array of messages")
    for index, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]")
    check_shared_fields(body)
    return await forward(request, caller, "chat/completions", body)


async def completions(request: web.Request) -> web.StreamResponse:
    caller = await authenticate(request)
    body = await read_json(request)
    require(body, "prompt", (str, list), "a string or an array of strings or token ids")
    check_shared_fields(body)
    return await forward(request, caller, "completions", body)


async def embeddings(request: web.Request) -> web.StreamResponse:
    caller = await authenticate(request)
    body = await read_json(request)
    require(body, "input", (str, list), "a string or an array of strings or token ids")
    if body.get("stream"):
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream")
    return await forward(request, caller, "embeddings", body)


def model_object(request: web.Request, caller: Caller, model: ModelSettings) -> dict[str, Any]:
    gateway = request.app[GATEWAY]
    multiplier = gateway.settings.group(caller.user.group).multiplier
    return {"id": model.name, "object": "model", "created": MODEL_CREATED, "owned_by": "apibox",
            "pricing": model_pricing_json(model, gateway.clock(), multiplier)}


def _visible(request: web.Request, caller: Caller, models: list[ModelSettings]) -> list[ModelSettings]:
    """The models this key (and the user's plan) may use."""
    group = request.app[GATEWAY].settings.group(caller.user.group)
    return [m for m in models if (not caller.key.models or m.name in caller.key.models)
            and (not group.models or m.name in group.models)]


def _anthropic_client(request: web.Request) -> bool:
    """Anthropic's SDKs send ``anthropic-version`` with every request: they read models in their shape."""
    return "anthropic-version" in request.headers


def anthropic_model_object(model: ModelSettings) -> dict[str, Any]:
    return {"type": "model", "id": model.name, "display_name": model.name, "created_at": MODEL_CREATED_AT,
            "max_tokens": model.max_output_tokens}


def _anthropic_page(request: web.Request, models: list[ModelSettings]) -> dict[str, Any]:
    """Anthropic's page of models: at most ``limit`` (1-1000, 20 by default), those just after
    ``after_id`` or just before ``before_id``."""
    names = [m.name for m in models]

    def position(cursor: str) -> int:
        name = request.query[cursor]
        if name not in names:
            raise InvalidRequest(f"{cursor}: no model `{name}` in the list", param=cursor)
        return names.index(name)

    limit = whole_number(request.query.get("limit", "20"), "limit", 1, 1000)
    after, before = "after_id" in request.query, "before_id" in request.query
    window = models[position("after_id") + 1 if after else 0:position("before_id") if before else len(models)]
    chosen = window[-limit:] if before and not after else window[:limit]
    data = [anthropic_model_object(m) for m in chosen]
    return {"data": data, "has_more": len(chosen) < len(window), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


async def list_models(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    models = _visible(request, caller, request.app[GATEWAY].router.models)
    if _anthropic_client(request):
        return web.json_response(_anthropic_page(request, models))
    return web.json_response({"object": "list", "data": [model_object(request, caller, m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    model = request.app[GATEWAY].router.resolve(request.match_info["model"])
    if model not in _visible(request, caller, [model]):
        raise ModelNotFound(f"The model `{request.match_info['model']}` does not exist or you do not have "
                            "access to it.", param="model")
    if _anthropic_client(request):
        return web.json_response(anthropic_model_object(model))
    return web.json_response(model_object(request, caller, model))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
