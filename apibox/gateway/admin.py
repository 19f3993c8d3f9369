"""The admin HTTP API under ``/admin``: the CLI's use-cases over JSON, for automating the business.

Off (404) when no ``server.admin_key`` is configured; otherwise the admin key is required as
a bearer token, compared in constant time. Every change is written to the admin log by the
same core functions the CLI calls.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from apibox import accounts, jsoncodec, reports
from apibox.bus import Change
from apibox.errors import ConfigError, InvalidApiKey, InvalidRequest, NotFound
from apibox.gateway.appkeys import GATEWAY, SETTINGS, SUPERVISOR
from apibox.gateway.openai import bearer_secret, read_json, request_address
from apibox.gateway.reload import reload_config
from apibox.models import Page
from apibox.money import format_usd
from apibox.offloop import off_the_loop
from apibox.store.base import Store
from apibox.views import balance_json, entry_json, iso, key_json, user_json

LOG_PAGE_MAX = 1000  # admin log entries in one answer, at most


def _store(request: web.Request) -> Store:
    """The store, once the caller has shown the admin key."""
    admin_key = request.app[SETTINGS].server.admin_key
    if not admin_key:
        raise NotFound(f"Unknown request URL: {request.method} {request.path} (the admin API is off: "
                       "set server.admin_key to turn it on).")
    gateway = request.app[GATEWAY]
    if not gateway.auth.check_secret(bearer_secret(request) or "", admin_key, request_address(request)):
        raise InvalidApiKey("The admin API needs the admin key as 'Authorization: Bearer ADMIN_KEY'.")
    return request.app[GATEWAY].store


def _actor(request: web.Request) -> str:
    return f"admin-api:{request.remote or 'unknown'}"


async def _json_of_many(make: Callable[[], Any], items: int) -> web.Response:
    """The JSON of a listing or a report of ``items`` items, made off the event loop when they are many."""
    return web.Response(body=await off_the_loop(lambda: jsoncodec.dumps(make()), items),
                        content_type="application/json")


def _page(request: web.Request) -> Page:
    """The page a listing's query asks for (``after``, ``limit``): every item when it names none."""
    return accounts.page_of(request.query.get("after"), request.query.get("limit"))


async def _page_json(request: web.Request, page: Page, ids: list[int], make: Callable[[], Any]) -> web.Response:
    """A page of a listing (items with ``ids``) as JSON; a full one links to the next, as GitHub's
    API does: ``Link: <...?after=LAST&limit=N>; rel="next"``."""
    response = await _json_of_many(make, len(ids))
    if page.is_full(len(ids)):
        _link_next(request, response, after=ids[-1])
    return response


def _link_next(request: web.Request, response: web.StreamResponse, **query: int) -> None:
    """Link a full page to the next: this request's URL with ``query`` changed, as GitHub's API does."""
    response.headers["Link"] = f'<{request.rel_url.update_query(**query)}>; rel="next"'


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"Missing required field: '{name}'.", param=name)
        return None
    is_stray_bool = isinstance(value, bool) and kind is not bool  # JSON true is not a number here
    if is_stray_bool or not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' has the wrong type.", param=name)
    return value


def _usd(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """Money arrives as a string ("10.50") or a number; parsed exactly by the core."""
    value = _field(body, name, (str, int, float), required=required)
    return value if value is None or isinstance(value, str) else repr(value)


def _strings(body: dict[str, Any], name: str) -> tuple[str, ...] | None:
    """A list of strings (``models``, ``allow_ips``), or None when the field is left out."""
    values = _field(body, name, list)
    if values is not None and not all(isinstance(v, str) for v in values):
        raise InvalidRequest(f"'{name}' must be a list of strings.", param=name)
    return None if values is None else tuple(values)


def _amount(body: dict[str, Any]) -> str:
    return _usd(body, "amount", required=True) or ""  # (required: never None)


async def list_users(request: web.Request) -> web.Response:
    store, query = _store(request), request.query
    page = _page(request)
    only = accounts.user_filter(query.get("state"), query.get("group"), query.get("below"))
    overviews = await accounts.list_users(store, page, only)
    return await _page_json(request, page, [o.user.id for o in overviews], lambda: [
        {**user_json(o.user), **balance_json(o.user, o.balance), "keys": o.key_count} for o in overviews])


async def create_user(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    user = await accounts.create_user(store, _field(body, "email", str, required=True), _field(body, "name", str) or "",
                                      _field(body, "group", str) or "default", actor=_actor(request),
                                      known_groups=request.app[GATEWAY].settings.groups)
    return web.json_response(user_json(user), status=201)


async def show_user(request: web.Request) -> web.Response:
    detail = await accounts.show_user(_store(request), request.match_info["user"])
    return web.json_response({**user_json(detail.user), **balance_json(detail.user, detail.balance),
                              "keys": [key_json(k) for k in detail.keys]})


async def update_user(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    user = await accounts.update_user(store, request.match_info["user"], name=_field(body, "name", str),
                                      group=_field(body, "group", str), actor=_actor(request),
                                      known_groups=request.app[GATEWAY].settings.groups,
                                      notify=request.app[GATEWAY].notifier)
    return web.json_response(user_json(user))


async def set_state(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    state = accounts.user_state(_field(body, "state", str, required=True))
    user = await accounts.set_user_state(store, request.match_info["user"], state, _field(body, "reason", str) or "",
                                         actor=_actor(request), notify=request.app[GATEWAY].notifier)
    return web.json_response(user_json(user))


async def balance(request: web.Request) -> web.Response:
    user, current = await accounts.balance(_store(request), request.match_info["user"])
    return web.json_response(balance_json(user, current))


async def ledger(request: web.Request) -> web.Response:
    store = _store(request)
    start, end = reports.time_window(request.query.get("since"), request.query.get("until"), datetime.now(UTC))
    page = _page(request)
    user, entries = await accounts.ledger(store, request.match_info["user"], start, end, page)
    balance = balance_json(user, await store.get_balance(user.id))
    return await _page_json(request, page, [e.id for e in entries],
                            lambda: {**balance, "entries": [entry_json(e) for e in entries]})


async def list_keys(request: web.Request) -> web.Response:
    store = _store(request)
    page = _page(request)
    keys = await accounts.list_keys(store, request.query.get("user"), page)
    return await _page_json(request, page, [k.id for k in keys], lambda: [key_json(k) for k in keys])


async def create_key(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    options = accounts.KeyOptions(
        name=_field(body, "name", str) or "", models=_strings(body, "models") or (), budget=_usd(body, "budget"),
        expires=_field(body, "expires", str), rpm=_field(body, "rpm", int), tpm=_field(body, "tpm", int),
        concurrency=_field(body, "concurrency", int), allow_ips=_strings(body, "allow_ips") or ())
    new = await accounts.create_key(store, str(_field(body, "user", (str, int), required=True)), options,
                                    known_models=request.app[GATEWAY].settings.model_index(), actor=_actor(request))
    return web.json_response({**key_json(new.key), "key": new.secret}, status=201)


async def update_key(request: web.Request) -> web.Response:
    """A field left out stays as it is; null takes a setting away (no budget, never expires, the
    config's default limit, every model, any address)."""
    store, body = _store(request), await read_json(request)
    changes: dict[str, Any] = {}
    for name, kind in (("name", str), ("expires", str), ("rpm", int), ("tpm", int), ("concurrency", int)):
        if name in body:
            changes[name] = _field(body, name, kind)
    if "budget" in body:
        changes["budget"] = _usd(body, "budget")
    for name in ("models", "allow_ips"):
        if name in body:
            changes[name] = _strings(body, name) or ()
    key = await accounts.update_key(store, request.match_info["key"], accounts.KeyChanges(**changes),
                                    known_models=request.app[GATEWAY].settings.model_index(), actor=_actor(request),
                                    notify=request.app[GATEWAY].notifier)
    return web.json_response(key_json(key))


async def show_key(request: web.Request) -> web.Response:
    return web.json_response(key_json(await accounts.show_key(_store(request), request.match_info["key"])))


async def revoke_key(request: web.Request) -> web.Response:
    key = await accounts.revoke_key(_store(request), request.match_info["key"], actor=_actor(request),
                                    notify=request.app[GATEWAY].notifier)
    return web.json_response(key_json(key))


async def _credit_response(store: Store, ref: str, result: Any) -> web.Response:
    user = await accounts.resolve_user(store, ref)
    return web.json_response({**balance_json(user, result.balance), "ledger_id": result.entry.id,
                              "amount_usd": format_usd(result.entry.amount), "reference": result.entry.reference,
                              "created": result.created}, status=201 if result.created else 200)


async def topup(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    ref = str(_field(body, "user", (str, int), required=True))
    result = await accounts.topup(store, ref, _amount(body), note=_field(body, "note", str) or "",
                                  reference=_field(body, "reference", str), actor=_actor(request))
    return await _credit_response(store, ref, result)


async def adjust(request: web.Request) -> web.Response:
    store, body = _store(request), await read_json(request)
    ref = str(_field(body, "user", (str, int), required=True))
    result = await accounts.adjust(store, ref, _amount(body), note=_field(body, "note", str) or "",
                                   actor=_actor(request))
    return await _credit_response(store, ref, result)


async def usage(request: web.Request) -> web.Response:
    store, query = _store(request), request.query
    report_query = reports.ReportQuery(by=reports.parse_by(query.get("by", "day")), since=query.get("since"),
                                       until=query.get("until"), user=query.get("user"), key=query.get("key"),
                                       model=query.get("model"))
    report = await reports.build_report(store, report_query)
    return await _json_of_many(lambda: {"rows": [reports.row_json(r) for r in report.rows],
                                        "total": reports.row_json(report.total)}, len(report.rows))


async def reload(request: web.Request) -> web.Response:
    """Reload this gateway's config file now, and with Redis every other gateway's too; without
    it, a worker of `serve --workers N` asks its supervisor to pass SIGHUP to every worker."""
    store, gateway = _store(request), request.app[GATEWAY]
    try:
        done = reload_config(gateway)
    except ConfigError as exc:
        raise InvalidRequest(f"The config was not reloaded (the gateway keeps the previous one): {exc.message}") \
            from None
    await gateway.notifier.changed(Change(config=True))
    supervisor = request.app.get(SUPERVISOR)
    if supervisor is not None and gateway.settings.redis is None:
        os.kill(supervisor, signal.SIGHUP)  # (this worker reloads again: the same file, nothing changes)
    summary = {"source": done.source, "models": done.models, "providers": done.providers,
               "needs_restart": list(done.needs_restart)}
    await store.log_admin_action(_actor(request), "config.reload", done.source, None, summary)
    return web.json_response(summary)


async def admin_log(request: web.Request) -> web.Response:
    """Newest first; a full page links to the one older (``before`` its last entry)."""
    store, query = _store(request), request.query
    limit = accounts.whole_number(query.get("limit", "100"), "limit", 1, LOG_PAGE_MAX)
    before = accounts.whole_number(query["before"], "before", 1) if "before" in query else None
    actions = await store.admin_actions(limit, before)
    response = web.json_response([{"id": a.id, "created_at": iso(a.created_at), "actor": a.actor,
                                   "action": a.action, "target": a.target, "before": a.before, "after": a.after}
                                  for a in actions])
    if len(actions) == limit:
        _link_next(request, response, before=actions[-1].id, limit=limit)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/users", list_users)
    app.router.add_post("/admin/users", create_user)
    app.router.add_get("/admin/users/{user}", show_user)
    app.router.add_patch("/admin/users/{user}", update_user)
    app.router.add_post("/admin/users/{user}/state", set_state)
    app.router.add_get("/admin/users/{user}/balance", balance)
    app.router.add_get("/admin/users/{user}/ledger", ledger)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys/{key}", show_key)
    app.router.add_patch("/admin/keys/{key}", update_key)
    app.router.add_post("/admin/keys/{key}/revoke", revoke_key)
    app.router.add_post("/admin/topups", topup)
    app.router.add_post("/admin/adjustments", adjust)
    app.router.add_get("/admin/usage", usage)
    app.router.add_get("/admin/log", admin_log)
    app.router.add_post("/admin/reload", reload)
