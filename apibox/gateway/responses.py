"""OpenAI's Responses API: ``POST /v1/responses``.

Clients built on it (the openai SDK's ``client.responses``, the Agents SDK, Codex) reach every
model: on a route whose upstream speaks the API itself the request and its answer (events, for
a stream) pass through as they are, but for the model's name; other routes get it translated
to chat completions and back (``gateway.doors.ResponsesDoor``). Billing is the same flow as the
chat door's: a hold for the prompt and ``max_output_tokens`` (lowered when the balance is
short), then the usage the answer reports.
"""

from __future__ import annotations

from aiohttp import web

from apibox.errors import InvalidRequest
from apibox.formats.responses import billing_copy, paid_tool
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.doors import ResponsesDoor
from apibox.gateway.openai import authenticate, check_stream, read_json, require
from apibox.gateway.proxy import authorized_model, forward


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
    check_stream(body)
    if body.get("background"):  # answered later, by polling: the answer apibox would bill never passes through it
        raise InvalidRequest("Background responses are not supported: apibox charges a response as it answers, "
                             "so ask without 'background' (stream it, if it takes long).", param="background")
    paid = paid_tool(body.get("tools"))
    if paid is not None:
        raise InvalidRequest(f"The tool {body['tools'][paid]['type']!r} is billed by the upstream per call, which "
                             "apibox does not charge for; it is not available here.", param=f"tools[{paid}]")
    door = ResponsesDoor(body)
    gateway = request.app[GATEWAY]
    model = authorized_model(gateway, caller, body["model"])
    if not all(door.is_native(gateway.providers[route.provider]) for route in model.routes):
        door.chat_body()  # what a route that speaks only chat cannot carry is refused before the hold
    return await forward(request, caller, "responses", billing_copy(body), door)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
