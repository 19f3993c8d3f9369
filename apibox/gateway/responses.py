"""OpenAI's Responses API: ``POST /v1/responses``.

Clients built on it (the openai SDK's ``client.responses``, the Agents SDK, Codex) reach every
model: on a route whose upstream speaks the API itself the request and its answer (events, for
a stream) pass through as they are, but for the model's name; other routes get it translated
to chat completions and back (``gateway.doors.ResponsesDoor``). Billing is the same flow as the
chat door's: a hold for the prompt and ``max_output_tokens`` (lowered when the balance is
short), then the usage the answer reports.

OpenAI keeps a response (unless asked with ``store: false``) for the account that asked, and
every apibox user shares the operator's account: apibox records whose each response is
(``stored_responses``), so that a user may continue (``previous_response_id``), read, list the
input of, or delete only their own, and only on the upstream that keeps it; a continuation's
hold counts the conversation the upstream reads again. What would reach stored items around
that record (``conversation``, ``item_reference`` input items) is refused.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from apibox import jsoncodec
from apibox.auth import Caller
from apibox.errors import InvalidRequest, NotFound
from apibox.formats.responses import billing_copy, paid_tool
from apibox.gateway.admission import authorized_model
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.context import Gateway
from apibox.gateway.doors import ResponsesDoor
from apibox.gateway.openai import authenticate, check_shared_fields, read_json, require
from apibox.gateway.proxy import forward
from apibox.models import StoredResponse
from apibox.providers.base import UpstreamFailure


async def responses(request: web.Request) -> web.StreamResponse:
    caller = await authenticate(request)
    body = await read_json(request)
    require(body, "model", (str,), "a model's name")
    require(body, "input", (str, list), "a string or a non-empty array of input items")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise InvalidRequest("'instructions' must be a string.", param="instructions")
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidRequest("'max_output_tokens' must be a positive whole number.", param="max_output_tokens")
    check_shared_fields(body)
    if body.get("background"):  # answered later, by polling: the answer apibox would bill never passes through it
        raise InvalidRequest("Background responses are not supported: apibox charges a response as it answers, "
                             "so ask without 'background' (stream it, if it takes long).", param="background")
    paid = paid_tool(body.get("tools"))
    if paid is not None:
        raise InvalidRequest(f"The tool {body['tools'][paid]['type']!r} is billed by the upstream per call, which "
                             "apibox does not charge for; it is not available here.", param=f"tools[{paid}]")
    _refuse_stored_items(body)
    gateway = request.app[GATEWAY]
    door = ResponsesDoor(body, gateway.store, caller.user.id)
    model = authorized_model(gateway, caller, body["model"])
    previous = await _previous(gateway, caller, body)
    keeper = previous.provider if previous is not None else None
    routes = [route for route in model.routes if keeper is None or route.provider == keeper]
    if keeper is not None and not routes:
        raise InvalidRequest(f"The response '{body['previous_response_id']}' is kept by an upstream that the model "
                             f"`{model.name}` does not use: continue it with the model that answered it.",
                             param="previous_response_id")
    if not all(door.is_native(gateway.providers[route.provider]) for route in routes):
        door.chat_body()  # what a route that speaks only chat cannot carry is refused before the hold
    return await forward(request, caller, "responses", billing_copy(body), door, only_provider=keeper,
                         unseen_tokens=previous.context_tokens if previous is not None else 0)


def _refuse_stored_items(body: dict[str, Any]) -> None:
    """Refuse what would bring in items the upstream keeps by an id apibox has no owner for."""
    if body.get("conversation") is not None:
        raise InvalidRequest("Conversations are not available through apibox: continue a response with "
                             "'previous_response_id', or send the whole input.", param="conversation")
    items = body["input"] if isinstance(body["input"], list) else ()
    for index, item in enumerate(items):
        # a reference need not say so: an item without a type is one, unless it is a message (a role)
        if isinstance(item, dict) and (item.get("type") == "item_reference" or
                                       (item.get("type") is None and "role" not in item)):
            raise InvalidRequest("Input items by reference are not available through apibox: send the item "
                                 "itself, or continue the response it came from with 'previous_response_id'.",
                                 param=f"input[{index}]")


async def _previous(gateway: Gateway, caller: Caller, body: dict[str, Any]) -> StoredResponse | None:
    """The response ``previous_response_id`` continues (None without one): where it is kept, and
    its conversation's tokens, which the upstream reads again. A response that is not the
    caller's is as unknown as one that never was."""
    previous = body.get("previous_response_id")
    if previous is None:
        return None
    if not isinstance(previous, str) or not previous:
        raise InvalidRequest("'previous_response_id' must be a response's id.", param="previous_response_id")
    stored = await gateway.store.stored_response(previous)
    if stored is None or stored.user_id != caller.user.id:
        raise InvalidRequest(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                             code="previous_response_not_found")
    return stored


async def _owned(request: web.Request) -> tuple[StoredResponse, Any]:
    """The caller's stored response named in the path, and the provider that keeps it."""
    caller = await authenticate(request)
    gateway = request.app[GATEWAY]
    response_id = request.match_info["response_id"]
    stored = await gateway.store.stored_response(response_id)
    provider = gateway.providers.get(stored.provider) if stored is not None else None
    if stored is None or stored.user_id != caller.user.id or provider is None:
        raise NotFound(f"Response with id '{response_id}' not found.")
    return stored, provider


async def _upstream(stored: StoredResponse, provider: Any, method: str, path: str,
                    request: web.Request) -> dict[str, Any]:
    """The upstream's answer about a stored response; its 404 (expired there) is the client's."""
    query = f"?{request.query_string}" if request.query_string else ""
    try:
        return await provider.stored_response(method, f"{stored.response_id}{path}{query}")  # type: ignore[no-any-return]
    except UpstreamFailure as exc:
        if exc.upstream_status == 404:
            raise NotFound(f"Response with id '{stored.response_id}' not found.") from None
        raise


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=jsoncodec.dumps(body), content_type="application/json")


async def retrieve(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}``: the caller's stored response, under the model's apibox name."""
    stored, provider = await _owned(request)
    if request.query.get("stream", "false").lower() != "false":
        raise InvalidRequest("A stored response cannot be read as a stream here: read it whole.", param="stream")
    answer = await _upstream(stored, provider, "GET", "", request)
    if "model" in answer:
        answer["model"] = stored.model
    return _json(answer)


async def input_items(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}/input_items``: the input the caller's stored response was asked with."""
    stored, provider = await _owned(request)
    return _json(await _upstream(stored, provider, "GET", "/input_items", request))


async def delete(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{id}``: deleted upstream, then forgotten here (also when the upstream no
    longer had it)."""
    stored, provider = await _owned(request)
    gone_upstream = None
    try:
        answer = await _upstream(stored, provider, "DELETE", "", request)
    except NotFound as exc:
        gone_upstream = exc
    await request.app[GATEWAY].store.forget_response(stored.response_id)
    if gone_upstream is not None:
        raise gone_upstream
    return _json(answer)


async def cancel(request: web.Request) -> web.Response:
    """``POST /v1/responses/{id}/cancel``: only background responses can be, and apibox takes none."""
    await _owned(request)
    raise InvalidRequest("Only a background response can be cancelled, and apibox does not take background "
                         "requests.")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", input_items)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel)
